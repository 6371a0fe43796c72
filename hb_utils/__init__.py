"""HealthBot experiment kit: the tested code behind the notebooks (01_eda … 06_compare) and the ``hb`` command.

Code map. Imports go one way, down this list's layers (``tests/test_import_graph.py`` checks it):

    cli.py, __main__.py   ``hb run | sweep | compare | export | chat``: each command maps to one function
    runs/                 run a series of notebooks: runner (papermill), notebook start, reports, kernels; a
                          series of runs: sweep (spec, trials, series.json), executors (local pool, Ray); compare
    chat.py               the gradio chat app (``hb chat``)
    export/               merge the adapter, GGUF + Ollama Modelfile, model card, agreement measurement
    evaluate/             stages 04/05: metrics, perplexity, answers of base vs fine-tuned, external sets and the
                          statement judge, qualitative, reruns
    train/                stage 03: TRL's SFTTrainer set-up, callbacks, multi-process launch and worker
    data/                 stages 01/02: MedQuAD loading and cleaning, leakage-safe split, EDA tables and figures,
                          external sets (LiveQA XML, MedLFQA JSONL) and their leakage check against MedQuAD
    model/                model source (Hub, local, packaged GGUF), tokenizer policy, 4-bit + LoRA loading,
                          device/dtype, CPU levers (attention, kept dequantized weights, LoRA dropout), generation
    core (top level)      config.py + params_file.py (ExperimentConfig: every parameter once), errors.py (user
                          errors that name the fix), run_dir.py (run directory layout, stamps, JSON files),
                          quiet.py + progress.py (console policy), results.py + plots.py (metric names, figures)

A layer imports only lower layers (``data`` and ``model`` are independent of each other); a later stage may
read what an earlier one wrote (export reads 04's metrics), never the reverse. Lower-level functions take
explicit arguments (tensors, tokenizers, lists) rather than the config where they can.
"""

__version__ = "0.1.0"
