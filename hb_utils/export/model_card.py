"""The model card (``README.md``) of an exported HealthBot: what it is, where it came from, how good.

Why a generated card: a merged model travels without its run directory, so the card must carry
what a reader needs to judge it: the base model and its licence, the training data with its
licence and citation (MedQuAD, CC BY 4.0, which requires attribution), the exact config, the
evaluation with confidence intervals, how faithful the export is to the evaluated model, and the
caveat that this is not medical advice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hb_utils.config import ExperimentConfig
from hb_utils.errors import HBError
from hb_utils.evaluate import evaluation
from hb_utils.export.paths import ExportPaths
from hb_utils.model import source
from hb_utils.run_dir import RunPaths, read_json, repo_root

MEDQUAD_CITATION = ("Ben Abacha, A. & Demner-Fushman, D. A question-entailment approach to question answering. "
                    "BMC Bioinformatics 20, 511 (2019). https://doi.org/10.1186/s12859-019-3119-4")
CAVEAT = ("HealthBot is a research model fine-tuned on a small sample of MedQuAD. It can be wrong, out of date or "
          "incomplete, and it is not medical advice: do not use it to diagnose or treat anyone; ask a qualified "
          "healthcare professional.")


def base_model_licence(cfg: ExperimentConfig) -> str | None:
    """The base model's licence where the kit can know it offline: the packaged SmolLM2 GGUF states
    it in ``general.license``; for other models the card points to the base model's own card."""
    if cfg.model_name.strip().lower() != source.SMOLLM2_ALIAS:
        return None
    from gguf import GGUFReader

    field = GGUFReader(source.packaged_gguf()).get_field("general.license")
    return field.contents() if field is not None else None


def _measurement_line(paths: ExportPaths, record: dict[str, Any]) -> str:
    if not paths.measurement.is_file():
        return "No merge measurement was recorded."
    m = read_json(paths.measurement)
    parts = [f"{mode}: greedy-token agreement {v['greedy_token_agreement']:.3f}, mean |Δp| {v['mean_abs_dp']:.2e}, "
             f"max |Δp| {v['max_abs_dp']:.2e}, ROUGE-L {v['rougeL_vs_reference']:.3f}"
             for mode, v in m["modes"].items()]
    return (f"Merged into the **{record['merge_into']}** weights (chosen by {m['chosen_by']}). Measured against the "
            f"adapter on the 4-bit base on {next(iter(m['modes'].values()))['questions']} test questions: "
            + "; ".join(parts) + ".")


def _eval_section(cfg: ExperimentConfig) -> str:
    path = RunPaths.for_config(cfg).metrics / "eval.json"
    if not path.is_file():
        return "No `metrics/eval.json` in the run directory: stage 04 (evaluate) has not run."
    try:
        result = evaluation.load_eval(cfg)
        table = evaluation.comparison_table(result).to_markdown()
        ppl = evaluation.perplexity_table(result).to_markdown()
    except (HBError, KeyError, TypeError, ValueError) as exc:
        return f"`metrics/eval.json` could not be summarised ({exc})."
    s = result.get("settings", {})
    return (f"Greedy answers of the base model and of HealthBot (adapter on the 4-bit base) on "
            f"{s.get('eval_examples')} test questions, value [95% bootstrap interval]:\n\n{table}\n\n"
            f"Answer perplexity:\n\n{ppl}\n")


def _gguf_section(record: dict[str, Any]) -> str:
    if not record.get("gguf"):
        return "No GGUF file was exported (`hb export <run> --gguf f16|q8_0`)."
    lines = []
    for qtype, g in record["gguf"].items():
        rt = g.get("roundtrip", {})
        agreement, max_dp = rt.get("greedy_token_agreement", float("nan")), rt.get("max_abs_dp", float("nan"))
        lines.append(f"- `{Path(g['file']).name}` ({qtype}, {g['bytes'] / 2**20:.1f} MiB) with an Ollama `Modelfile`. "
                     f"Loaded back with transformers and compared with this merged model: greedy-token agreement "
                     f"{agreement:.3f}, max |Δp| {max_dp:.2e}.")
    return "\n".join(lines)


def greedy_kwargs(cfg: ExperimentConfig) -> str:
    """The ``generate`` arguments that reproduce stage 04's greedy answers on the merged model: no
    sampling and no repetition penalty, overriding the sampling defaults of its generation_config
    (:func:`hb_utils.export.merge.set_sampling`), and 04's answer length."""
    return (f"do_sample=False, temperature=None, top_p=None, repetition_penalty=1.0, "
            f"max_new_tokens={cfg.eval_max_new_tokens}")


def _shown(path: Path) -> str:
    """``path`` relative to the repository root when inside it (outputs/<exp>/...), else absolute."""
    try:
        return str(path.relative_to(repo_root()))
    except ValueError:
        return str(path)


def write_model_card(cfg: ExperimentConfig, paths: ExportPaths, record: dict[str, Any]) -> Path:
    """Write ``merged/README.md`` from the run's config, eval.json, the merge measurement and GGUF record."""
    licence = base_model_licence(cfg)
    front = ["---", f"base_model: {cfg.model_name}", f"license: {licence or 'other'}", "datasets:", "- MedQuAD",
             "language:", "- en", "tags:", "- medical", "- qlora", "- lora-merged", "- healthbot", "---"]
    run_json = RunPaths.for_config(cfg).config_json  # as the run recorded it (not re-pointed at this folder)
    config_json = json.dumps(read_json(run_json)["config"] if run_json.is_file() else cfg.to_dict(), indent=2)
    body = f"""
# HealthBot ({cfg.experiment}): {cfg.model_name} fine-tuned on MedQuAD, LoRA merged

> **Caveat.** {CAVEAT}

## Use

A plain transformers model (no peft, no bitsandbytes needed), weights in {record['dtype']}:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("merged")
model = AutoModelForCausalLM.from_pretrained("merged")
messages = [{{"role": "system", "content": SYSTEM_PROMPT}}, {{"role": "user", "content": "What is asthma?"}}]
ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
print(tok.decode(model.generate(**ids)[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
```

`generation_config.json` stops at the chat template's end-of-turn token and samples with the run's qualitative
settings, as stage 05 did: `do_sample: true`, temperature {cfg.qual_temperature}, top_p {cfg.qual_top_p},
`repetition_penalty: {cfg.qual_repetition_penalty}`, max_new_tokens {cfg.qual_max_new_tokens}. Every
`generate` call starts from these, so `model.generate(**ids, do_sample=False)` alone is greedy *with* the
repetition penalty, which is not how the model was evaluated. Stage 04's greedy answers (the ones its metrics
score) need the penalty switched off as well:

```python
out = model.generate(**ids, {greedy_kwargs(cfg)})
```

The system prompt it was trained with:

> {cfg.system_prompt}

Or chat with it in the browser: `hb chat {_shown(paths.merged)}`.

## Base model

`{cfg.model_name}`; licence: {licence or "see the base model's own model card"}. The merged weights are a
derivative of the base model and carry its licence terms.

## Training data and licence

MedQuAD (Medical Question Answering Dataset), 47,457 question-answer pairs from 12 NIH websites, released
under **CC BY 4.0** (attribution required). This run used {cfg.sample_size} sampled pairs
(`dataset: {cfg.dataset}`). Cite:

> {MEDQUAD_CITATION}

## How it was made

QLoRA (r={cfg.lora_r}, alpha={cfg.lora_alpha}, 4-bit {cfg.bnb_4bit_quant_type}) on `{cfg.model_name}`, then PEFT
`merge_and_unload`. {_measurement_line(paths, record)}

Adapter fingerprint `{record['adapter'].get('fingerprint')}`, weights sha256
`{record['adapter']['weights_sha256'][:16]}…`.

## Evaluation

{_eval_section(cfg)}

## GGUF

{_gguf_section(record)}

## Config of the run

```json
{config_json}
```
"""
    path = paths.merged / "README.md"
    path.write_text("\n".join(front) + "\n" + body)
    return path

