"""The committed notebooks: parameters cell in step with the config, no outputs, and real papermill runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import nbformat
import papermill as pm
import pytest

from hb_utils.config import FIELDS, ExperimentConfig, load_config
from hb_utils.paths import RunPaths
from tests.conftest import ROOT

EXPECTED = ["01_eda", "02_format_split", "03_train_qlora", "04_evaluate", "05_qualitative"]
ALL_NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NOTEBOOKS = [p for p in ALL_NOTEBOOKS if p.stem in EXPECTED]  # the stages share the experiment config


def test_the_series_is_there():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED
    assert "06_compare" in [p.stem for p in ALL_NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_matches_the_config(path):
    params = pm.inspect_notebook(str(path))
    assert set(params) == set(FIELDS), "run `python scripts/nbtools.py sync`"
    defaults = ExperimentConfig()
    for name, info in params.items():
        assert eval(info["default"]) == getattr(defaults, name), name  # noqa: S307 - our own literal
        assert info["help"], name
    nb = nbformat.read(path, as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert "config_from_namespace(globals())" in nb.cells[tagged[0] + 1].source


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebooks_carry_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: run `python scripts/nbtools.py strip`"


def test_notebooks_are_what_their_authoring_scripts_write(tmp_path):
    """Notebooks are authored by scripts/make_nb_*.py; a hand edit of a notebook would be lost on the next run."""
    shutil.copytree(ROOT / "scripts", tmp_path / "scripts")
    (tmp_path / "notebooks").mkdir()
    for script in sorted((tmp_path / "scripts").glob("make_nb_*.py")):
        subprocess.run([sys.executable, str(script)], cwd=tmp_path, check=True, capture_output=True)
    for path in ALL_NOTEBOOKS:
        fresh = nbformat.read(tmp_path / "notebooks" / path.name, as_version=4)
        committed = nbformat.read(path, as_version=4)
        assert [(c.cell_type, c.source) for c in fresh.cells] == [(c.cell_type, c.source) for c in committed.cells], (
            f"{path.name} differs from what its scripts/make_nb_*.py writes: edit the script and rerun it")


def run_notebook(name: str, out_dir, cwd, params: dict, params_file=ROOT / "params" / "smoke.yaml"):
    """Run one notebook with the papermill CLI as a user would, from `cwd`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name}.ipynb"
    cmd = [sys.executable, "-m", "papermill", str(ROOT / "notebooks" / f"{name}.ipynb"), str(out),
           "-f", str(params_file), "--log-level", "WARNING"]
    for k, v in params.items():
        cmd += ["-p", k, str(v)]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "HB_HEADLESS": "1"})
    return proc, out


def error_outputs(path):
    nb = nbformat.read(path, as_version=4)
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]


@pytest.mark.slow
@pytest.mark.integration
def test_01_and_02_run_headless_from_root_and_notebooks_dir(medquad, tmp_path):
    out_root = tmp_path / "outputs"
    common = {"output_root": str(out_root), "dataset": str(medquad)}
    proc, nb01 = run_notebook("01_eda", tmp_path, ROOT, common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not error_outputs(nb01)
    proc, nb02 = run_notebook("02_format_split", tmp_path, ROOT / "notebooks", common)
    assert proc.returncode == 0, proc.stderr[-3000:]

    cfg = load_config(ROOT / "params" / "smoke.yaml", **common)
    run = RunPaths.for_config(cfg)
    stats = json.loads(run.data_stats.read_text())
    assert stats["data_fingerprint"] == cfg.fingerprint("data")
    assert stats["raw"]["rows"] == 47_441
    sizes = stats["split"]["sizes"]
    assert sum(sizes.values()) == cfg.sample_size and sizes["train"] >= 0.7 * cfg.sample_size
    assert stats["split"]["leakage"] == {"val_questions_in_train": 0, "test_questions_in_train": 0}
    for split, n in sizes.items():
        assert len(run.split(split).read_text().splitlines()) == n
    for plot in ("eda_sources", "eda_lengths", "split_funnel"):
        assert run.plot(plot).stat().st_size > 1000
    assert json.loads((run.data / "eda.json").read_text())["duplicates"]["answered_pairs"] == 16_407
    # The executed copy went to outputs, the committed notebook stayed clean.
    assert not nbformat.read(ROOT / "notebooks" / "02_format_split.ipynb", as_version=4).cells[4].outputs


@pytest.mark.slow
def test_unknown_parameter_stops_the_notebook(tmp_path, release):
    proc, out = run_notebook("02_format_split", tmp_path, ROOT,
                             {"output_root": str(tmp_path / "o"), "dataset": str(release), "lora_rr": 4})
    assert proc.returncode != 0
    assert "Unknown parameter 'lora_rr'" in proc.stderr and "Did you mean 'lora_r'" in proc.stderr
    assert not (tmp_path / "o").exists()  # nothing was written


def stream_text(path) -> str:
    nb = nbformat.read(path, as_version=4)
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.output_type == "stream")


@pytest.mark.slow
@pytest.mark.integration
def test_03_trains_from_notebooks_dir_and_a_rerun_from_root_reuses_the_adapter(medquad, tmp_path):
    """The issue's command, `papermill notebooks/03_train_qlora.ipynb OUT -f params/smoke.yaml -p lora_r 8`,
    from notebooks/ (no 02 run before: 03 builds the split) and again from the repo root."""
    common = {"output_root": str(tmp_path / "outputs"), "dataset": str(medquad), "lora_r": 8}
    proc, first = run_notebook("03_train_qlora", tmp_path / "a", ROOT / "notebooks", common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not error_outputs(first)
    cfg = load_config(ROOT / "params" / "smoke.yaml", **common)
    run = RunPaths.for_config(cfg)
    metrics = json.loads((run.metrics / "train.json").read_text())
    assert metrics["global_step"] == cfg.max_steps and metrics["parameters"]["trainable"] > 0
    assert json.loads((run.adapter / "adapter_config.json").read_text())["r"] == 8
    text = stream_text(first)
    assert "⟦" in text  # the supervised part of the example is marked
    answers = re.findall(r"\nA: (.*?)\n\((\d+) tokens, stopped: (?:True|False)\)", text, flags=re.S)
    assert len(answers) == 2 and all(a.strip() and int(n) > 0 for a, n in answers)  # the reloaded adapter answered

    proc, second = run_notebook("03_train_qlora", tmp_path / "b", ROOT, common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not error_outputs(second)
    assert "already holds this config's adapter" in stream_text(second)
    assert json.loads((run.metrics / "train.json").read_text()) == metrics  # reused, not retrained
