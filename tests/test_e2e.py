"""The whole product as a newcomer uses it: `hb run params/smoke.yaml` end to end on the CPU (the shared
session series), reports that read as reports, a rerun that skips finished stages, then `hb compare` with a
second, smaller run that differs in lora_r. Slow (minutes): CI runs it."""

from __future__ import annotations

import json
import math
import re

import nbformat
import pytest

from tests.conftest import SMOKE, as_flags, hb

STAGES = ["01_eda", "02_format_split", "03_train_qlora", "04_evaluate", "05_qualitative"]


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


def report_problems(path) -> list[str]:
    """What a reader of an executed report should never see: errors, stderr, a bare dict/list repr as a result."""
    nb = nbformat.read(path, as_version=4)
    problems = []
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.output_type == "error":
                problems.append(f"cell {i}: error {out.ename}")
            elif out.output_type == "stream" and out.name == "stderr":
                problems.append(f"cell {i}: stderr {out.text[:300]!r}")
            elif out.output_type == "execute_result" and "text/html" not in out.data and "image/png" not in out.data:
                text = out.data.get("text/plain", "")
                if text[:1] in "{[":
                    problems.append(f"cell {i}: bare repr {text[:120]!r}")
    return problems


@pytest.mark.slow
def test_smoke_series_end_to_end_reports_rerun_and_compare(smoke_series):
    proc, run = smoke_series.proc, smoke_series.run
    for stage in STAGES:
        assert re.search(rf"^{stage}\s+done\s", proc.stdout, flags=re.M), proc.stdout
    assert not proc.stderr.strip(), proc.stderr[-2000:]  # one line per notebook, nothing else
    for stage in STAGES:
        report = run.reports / f"{stage}.ipynb"
        assert report_problems(report) == [], stage
        html = (run.reports / f"{stage}.html").read_text()
        assert "hb-toggle" in html
        # opens on the title, then the "this run vs Experiment 1" table; the parameters cells are left out
        title = nbformat.read(report, as_version=4).cells[0].source.splitlines()[0].lstrip("# ").strip()
        assert html.index(title.split("·")[-1].strip()[:20]) < html.index("vs Experiment 1")
        assert "sample_size" in html[html.index("vs Experiment 1"):][:6000]  # smoke differs there
        assert "Generated from hb_utils/config.py" not in html and "# Parameters" not in html
    assert "data:image/png;base64" in (run.reports / "03_train_qlora.html").read_text()
    for name in ("train.json", "eval.json"):
        finite_numbers(json.loads((run.metrics / name).read_text()), name)
    assert (run.metrics / "predictions.jsonl").read_text().strip()
    assert (run.metrics / "qualitative.jsonl").read_text().strip()
    conf = json.loads((run.root / "config.json").read_text())
    assert all(conf["stages"][s]["status"] == "done" for s in STAGES)
    assert conf["machine"]["cpu"]["class"] in ("bf16", "fp32")

    # Rerunning the finished run skips every stage.
    again = hb("run", str(SMOKE), *as_flags(smoke_series.params))
    assert again.returncode == 0 and again.stdout.count("skipped") == 5

    # A second, smaller run that differs in lora_r, started at training (`--from 03` on a new experiment: 03
    # makes the split itself, as a user skipping the data notebooks gets it), then the comparison.
    small = {"experiment": "smoke_r16", "lora_r": 16, "max_steps": 2, "grad_accum": 1, "eval_size": 2, "ppl_size": 2,
             "eval_max_new_tokens": 8, "qual_max_new_tokens": 8}
    proc = hb("run", str(SMOKE), *as_flags({**smoke_series.params, **small}), "--from", "03")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "01_eda" not in proc.stdout and re.search(r"^05_qualitative\s+done\s", proc.stdout, flags=re.M)
    out = run.root.parent
    proc = hb("compare", str(run.root), str(out / "smoke_r16"), "--out", str(out / "compare"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (out / "compare" / "comparison.md").read_text()
    assert "lora_r" in md and "smoke_r16" in md
    assert "data:image/png;base64" in (out / "compare" / "06_compare.html").read_text()
    assert report_problems(out / "compare" / "06_compare.ipynb") == []
