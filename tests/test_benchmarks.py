"""benchmarks/bench_train.py: each variant trains the config it claims, and a tiny real run reports both methods."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from hb_utils.config import load_config
from tests.conftest import ROOT


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variants_train_the_config_they_name():
    bench = load_bench("bench_train")
    fast_params = load_config(ROOT / "params" / "cpu_exp1_fast.yaml")  # levers on in the file
    assert not fast_params.gradient_checkpointing and fast_params.group_by_length
    project = bench.variant_config(fast_params, "project")  # Experiment 1's values whatever the file says
    assert project.gradient_checkpointing and not project.group_by_length
    assert project.fast_lora_dropout and project.attn_implementation == "auto"
    fast = bench.variant_config(load_config(ROOT / "params" / "cpu_exp1.yaml"), "project_fast")
    assert not fast.gradient_checkpointing and fast.group_by_length
    lever = bench.variant_config(fast, "project_fast_sdpa_torch_dropout")
    assert lever.attn_implementation == "sdpa" and not lever.fast_lora_dropout
    assert bench.variant_config(fast, "project_fast_eager").attn_implementation == "eager"
    with pytest.raises(ValueError, match="unknown variant"):
        bench.variant_config(fast, "fastest")
    with pytest.raises(SystemExit, match="unknown variants"):
        bench.main(["--variants", "original,fastest"])
    args = bench.parse_args([])
    assert args.params.endswith("cpu_exp1.yaml") and args.max_length is None and args.threads == 2


def test_bench_eval_arguments_take_extra_batch_sizes(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as when it runs as a script: imports bench_machine
    bench = load_bench("bench_eval")
    args = bench.parse_args(["--gen-batch-sizes", "8, 16", "--parts", "gen"])
    assert args.sizes == {"gen": [8, 16], "ppl": []} and args.parts == {"gen"}
    assert bench.parse_args([]).sizes == {"gen": [], "ppl": []}
    for bad in (["--parts", "speed"], ["--ppl-batch-sizes", "4,x"], ["--gen-batch-sizes", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


@pytest.mark.slow
@pytest.mark.integration
def test_tiny_benchmark_run_reports_both_methods(medquad_dir, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_train.py", "--examples", "4", "--steps", "1", "--grad-accum", "1",
         "--max-length", "128", "--val-examples", "2", "--threads", "1", "--variants", "original,project_fast",
         "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "project_fast vs original:" in proc.stdout and "target (>=2x, loss within +5%)" in proc.stdout
    results = json.loads(out.read_text())["results"]
    original, fast = results["original"], results["project_fast"]
    assert original["gradient_checkpointing"] and not fast["gradient_checkpointing"]
    for r in (original, fast):
        assert r["max_length"] == 128 and r["examples"] == 2 and r["examples_per_s"] > 0 and r["real_tokens"] > 0
        assert math.isfinite(r["val_answer_loss"]) and r["val_answer_loss"] > 0
    # both evaluated on the same validation answers: one optimizer step cannot move the loss far apart
    assert abs(fast["val_answer_loss"] - original["val_answer_loss"]) < 0.5


def test_gpu_check_script_parses_and_passes_only_known_parameters():
    """benchmarks/gpu_check.sh runs only on a GPU machine: here, check it is valid bash and that every
    `-p NAME` it passes is a config field (a typo would fail on the GPU, after minutes of setup)."""
    import re

    from hb_utils.config import FIELDS

    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    names = set(re.findall(r"-p (\w+) ", script.read_text()))
    assert {"compute_dtype", "optim", "model_name", "output_root"} <= names
    assert names <= set(FIELDS), names - set(FIELDS)
