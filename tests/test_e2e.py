"""The whole product as a newcomer uses it: `hb run params/smoke.yaml` end to end on the CPU, then
`hb compare` on two smoke runs that differ in lora_r. Slow (minutes): CI runs it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import nbformat
import pytest

from tests.conftest import ROOT

STAGES = ["01_eda", "02_format_split", "03_train_qlora", "04_evaluate", "05_qualitative"]


def hb(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "hb_utils", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "HB_HEADLESS": "1"}, timeout=1800)


def finite_numbers(obj, where=""):
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return
    if isinstance(obj, int | float):
        assert math.isfinite(obj), f"non-finite value at {where}"
    elif isinstance(obj, dict):
        for k, v in obj.items():
            finite_numbers(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            finite_numbers(v, f"{where}[{i}]")


@pytest.mark.slow
@pytest.mark.integration
def test_smoke_series_end_to_end_and_compare(medquad, tmp_path):
    out = tmp_path / "outputs"
    common = ["-p", "output_root", str(out), "-p", "dataset", str(medquad)]
    proc = hb("run", "params/smoke.yaml", *common)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in STAGES:
        assert f"{stage}" in proc.stdout and "done" in proc.stdout
    run = out / "smoke"
    for stage in STAGES:
        nb = nbformat.read(run / "reports" / f"{stage}.ipynb", as_version=4)
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors, f"{stage}: {errors[:1]}"
        html = (run / "reports" / f"{stage}.html").read_text()
        assert "hb-toggle" in html
    assert "data:image/png;base64" in (run / "reports" / "03_train_qlora.html").read_text()
    for name in ("train.json", "eval.json"):
        finite_numbers(json.loads((run / "metrics" / name).read_text()), name)
    assert (run / "metrics" / "predictions.jsonl").read_text().strip()
    assert (run / "metrics" / "qualitative.jsonl").read_text().strip()
    conf = json.loads((run / "config.json").read_text())
    assert all(conf["stages"][s]["status"] == "done" for s in STAGES)

    # Rerunning the finished run skips every stage.
    again = hb("run", "params/smoke.yaml", *common)
    assert again.returncode == 0 and again.stdout.count("skipped") == 5

    # A second run that differs in lora_r, then the comparison.
    proc = hb("run", "params/smoke.yaml", *common, "-p", "lora_r", "16", "-p", "experiment", "smoke_r16")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = hb("compare", str(run), str(out / "smoke_r16"), "--out", str(out / "compare"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "compare" / "comparison.md").read_text()
    assert "lora_r" in md and "smoke_r16" in md
    assert "data:image/png;base64" in (out / "compare" / "06_compare.html").read_text()
