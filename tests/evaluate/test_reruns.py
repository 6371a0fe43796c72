"""Changing an evaluation parameter of a finished run reruns 04 on the same adapter and keeps the old metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hb_utils import run_dir
from hb_utils.config import load_config
from hb_utils.model import loading
from hb_utils.runs import runner
from tests.conftest import SMOKE, as_flags, write_release
from tests.conftest import hb as hb_process
from tests.runs.world import BASE, World, fake_stage, snapshot


@pytest.fixture(scope="module")
def evaluable_run(tmp_path_factory) -> tuple[Path, dict]:
    """A run whose stages 01-03 are done, with a real (untrained: LoRA B = 0) adapter of the offline SmolLM2
    and metrics of its config from an earlier 04/05 (stamped stand-ins): enough for real 04 runs, without the
    minutes of training."""
    from peft import get_peft_model

    from hb_utils.model.source import load_tokenizer

    root = tmp_path_factory.mktemp("evaluable")
    params = {**BASE, "dataset": str(write_release(root / "release", n_docs=30)), "output_root": str(root / "outputs"),
              "sample_size": 40, "eval_size": 2, "ppl_size": 2, "eval_max_new_tokens": 8, "gen_batch_size": 2,
              "bootstrap_samples": 20}
    cfg = load_config(SMOKE, **params)  # the file and flags `hb run` gets below
    world = World(root)
    state = runner.open_run(cfg)
    for stage in ("01_eda", "02_format_split", "04_evaluate", "05_qualitative"):
        fake_stage(world)(stage, cfg, run_dir.RunPaths.for_config(cfg).reports)
    paths = run_dir.RunPaths.for_config(cfg)
    model = get_peft_model(loading.load_base_model(cfg, for_training=True), loading.lora_config(cfg))
    model.save_pretrained(paths.adapter)
    load_tokenizer(cfg.model_name).save_pretrained(paths.adapter)
    loading.write_adapter_meta(cfg, paths.adapter)
    run_dir.write_json(paths.metrics / "train.json", {"stamp": run_dir.stamp(cfg, "train", "test")})
    for stage in runner.STAGES:
        state.set_stage(stage, {"status": "done"})
    return root, params


@pytest.mark.slow
def test_eval_reruns_on_a_finished_run_keep_the_recorded_metrics(evaluable_run):
    """Scope-aware rerun with real kernels: `hb run -p eval_size 3 --only 04` on a finished run reruns 04 on
    the same adapter (03's files untouched) and keeps the previous metrics and report aside. (04 run directly
    with papermill and other eval parameters:
    tests/evaluate/test_eval_notebooks.py::test_04_runs_alone_from_notebooks_dir.)"""
    root, params = evaluable_run
    first = load_config(SMOKE, **params)
    run = run_dir.RunPaths.for_config(first)
    adapter_before, train_before = snapshot(run.adapter), (run.metrics / "train.json").read_bytes()
    proc = hb_process("run", str(SMOKE), *as_flags({**params, "eval_size": 3}), "--only", "04")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "evaluation parameters changed (eval_size: 2 -> 3): the adapter is reused and 04/05 rerun" in proc.stdout
    assert snapshot(run.adapter) == adapter_before and (run.metrics / "train.json").read_bytes() == train_before
    kept = run.metrics / "previous" / first.fingerprint("eval")
    assert json.loads((kept / "eval.json").read_text())["stamp"]["params"]["eval_size"] == 2
    assert (kept / "04_evaluate.ipynb").is_file() and (kept / "qualitative.jsonl").is_file()
    conf = json.loads(run.config_json.read_text())
    assert conf["config"]["eval_size"] == 3 and conf["stages"]["04_evaluate"]["status"] == "done"
    assert conf["stages"]["05_qualitative"]["status"] == "stale"
    assert json.loads((run.metrics / "eval.json").read_text())["settings"]["eval_examples"] == 3

