"""`hb run` on small fixture notebooks (papermill's own testing style): stage selection, failures,
resuming an interrupted run, refusing a conflicting run directory, the HTML report."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import nbformat
import pytest

from hb_utils import cli
from hb_utils.config import load_config, stage_fields
from hb_utils.errors import ConfigError, ModelError, RunError
from hb_utils.model import source
from hb_utils.runs import runner
from hb_utils.runs.notebook import parameters_cell_source
from hb_utils.train import distributed
from tests.conftest import ROOT


def fixture_notebook(path, body: str) -> None:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(parameters_cell_source())
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# fixture"), params,
                nbformat.v4.new_code_cell("from hb_utils.runs.notebook import config_from_namespace\n"
                                          "cfg = config_from_namespace(globals())"),
                nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture
def stages(tmp_path, monkeypatch):
    """Three fixture stages; stage 02 fails while the file `<run>/block` exists."""
    nbdir = tmp_path / "nbs"
    nbdir.mkdir()
    body = ("from hb_utils.run_dir import RunPaths\nrun = RunPaths.for_config(cfg)\n"
            "(run.root / 'ran').mkdir(parents=True, exist_ok=True)\n"
            "(run.root / 'ran' / '{name}').write_text(str(cfg.lora_r))\n"
            "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3]); plt.show()\n")
    fixture_notebook(nbdir / "01_a.ipynb", body.format(name="01_a"))
    fixture_notebook(nbdir / "02_b.ipynb", "from hb_utils.run_dir import RunPaths\n"
                     "if (RunPaths.for_config(cfg).root / 'block').exists():\n"
                     "    raise RuntimeError('blocked on purpose')\n" + body.format(name="02_b"))
    fixture_notebook(nbdir / "03_c.ipynb", body.format(name="03_c"))
    monkeypatch.setattr(runner, "STAGES", ["01_a", "02_b", "03_c"])
    monkeypatch.setattr(runner, "notebook_path", lambda s: nbdir / f"{s}.ipynb")
    monkeypatch.setattr(runner, "stage_fields", lambda s: stage_fields(None))  # fixture stages read every field
    return nbdir


def cfg_in(tmp_path, **kw):
    return load_config(output_root=str(tmp_path / "out"), experiment="e", **kw)


def test_select_stages():
    assert runner.select_stages() == runner.STAGES
    assert runner.select_stages(start="03") == ["03_train_qlora", "04_evaluate", "05_qualitative"]
    assert runner.select_stages(only="4") == ["04_evaluate"]
    with pytest.raises(RunError, match="Unknown stage '09'"):
        runner.select_stages(only="09")


@pytest.mark.slow
def test_run_writes_reports_config_and_html(stages, tmp_path, capfd):
    cfg = cfg_in(tmp_path, lora_r=4)
    lines: list[str] = []
    results = runner.run_experiment(cfg, echo=lines.append)
    assert [r.status for r in results] == ["done"] * 3
    assert "Kernel is running over TCP" not in capfd.readouterr().err  # the kernels' start-up noise stays out
    root = tmp_path / "out" / "e"
    assert (root / "ran" / "03_c").read_text() == "4"  # the same resolved parameters reached every notebook
    conf = json.loads((root / "config.json").read_text())
    assert conf["fingerprints"]["eval"] == cfg.fingerprint() and conf["config"]["lora_r"] == 4
    assert conf["machine"]["versions"]["torch"] and conf["machine"]["cpu"]["cores"]
    assert all(conf["stages"][s]["status"] == "done" for s in runner.STAGES)
    html = (root / "reports" / "01_a.html").read_text()
    assert "data:image/png;base64" in html and "hb-toggle" in html
    assert len(lines) == 3 and all("done" in line for line in lines)


@pytest.mark.slow
def test_failing_stage_keeps_partial_report_and_rerun_continues(stages, tmp_path):
    cfg = cfg_in(tmp_path)
    root = tmp_path / "out" / "e"
    root.mkdir(parents=True)
    runner.open_run(cfg)
    (root / "block").write_text("")
    lines: list[str] = []
    results = runner.run_experiment(cfg, echo=lines.append)
    assert [r.status for r in results] == ["done", "failed"]
    assert "02_b failed in cell" in results[1].error and "blocked on purpose" in results[1].error
    partial = nbformat.read(root / "reports" / "02_b.ipynb", as_version=4)
    assert any(o.output_type == "error" for c in partial.cells if c.cell_type == "code" for o in c.outputs)
    assert (root / "reports" / "02_b.html").is_file()
    assert not (root / "ran" / "03_c").exists()
    # "Kill" fixed: the same command continues — 01 is skipped, 02 and 03 run.
    (root / "block").unlink()
    again = runner.run_experiment(cfg, echo=lines.append)
    assert [r.status for r in again] == ["skipped", "done", "done"]
    # --only reruns a finished stage explicitly.
    assert [r.status for r in runner.run_experiment(cfg, only="01", echo=lines.append)] == ["done"]


def test_conflicting_run_directory_is_refused_then_kept_aside(tmp_path):
    cfg = cfg_in(tmp_path)
    runner.open_run(cfg).set_stage("01_eda", {"status": "done"})
    marker = tmp_path / "out" / "e" / "adapter.bin"
    marker.write_text("precious")
    with pytest.raises(RunError, match=r"different config \(changed: lora_r: 8 -> 32\).*experiment e_2.*--overwrite"):
        runner.open_run(cfg.replace(lora_r=32))
    assert marker.read_text() == "precious"
    state = runner.open_run(cfg.replace(lora_r=32), overwrite=True)
    assert state.payload["config"]["lora_r"] == 32
    kept = list((tmp_path / "out").glob("e.replaced-*"))
    assert len(kept) == 1 and (kept[0] / "adapter.bin").read_text() == "precious"


def test_foreign_directory_is_refused(tmp_path):
    cfg = cfg_in(tmp_path)
    (tmp_path / "out" / "e").mkdir(parents=True)
    (tmp_path / "out" / "e" / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match=r"was not made by this kit.*even with --overwrite"):
        runner.open_run(cfg, overwrite=True)
    assert (tmp_path / "out" / "e" / "notes.txt").read_text() == "mine"


def test_bad_parameter_exits_before_any_notebook(tmp_path, capsys):
    code = cli.main(["run", str(ROOT / "params" / "smoke.yaml"), "-p", "lora_rr", "4",
                     "-p", "output_root", str(tmp_path / "o")])
    assert code == 2
    assert "Unknown parameter 'lora_rr'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert cli.main(["run", str(ROOT / "params" / "smoke.yaml"), "-p", "learning_rate", "2e-4x"]) == 2


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "hb_utils", "run", "params/nope.yaml"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


# --------------------------------------------------------------------------- checks before 01 runs
@pytest.fixture
def no_stage_runs(monkeypatch):
    """Stages that ran (none should): execute_stage records instead of starting a kernel."""
    ran: list[str] = []
    monkeypatch.setattr(runner, "execute_stage", lambda stage, *a, **k: ran.append(stage))
    return ran


def test_a_missing_accelerate_config_is_found_before_01_runs(tmp_path, release, monkeypatch, no_stage_runs):
    """It used to surface in cell 6 of 03, after 01 and 02 had run."""
    monkeypatch.setattr(distributed, "available_devices", lambda: ("cpu", 8))
    cfg = cfg_in(tmp_path, dataset=str(release), model_name="smollm2-135m-instruct", num_processes=2,
                 accelerate_config="accelerate/no_such.yaml")
    with pytest.raises(ConfigError, match=r"accelerate_config 'accelerate/no_such.yaml' does not exist"):
        runner.run_experiment(cfg, echo=lambda *_: None)
    assert no_stage_runs == [] and not (tmp_path / "out" / "e" / "config.json").exists()


def test_a_hub_model_without_the_hub_fails_in_seconds_before_01_runs(tmp_path, release, monkeypatch, no_stage_runs):
    monkeypatch.setattr(source, "hub_reachable", lambda timeout=source.HUB_PROBE_SECONDS: False)
    cfg = cfg_in(tmp_path, dataset=str(release), model_name="hb-tests/no-such-model")
    start = time.perf_counter()
    with pytest.raises(ModelError) as err:
        runner.run_experiment(cfg, echo=lambda *_: None)
    assert time.perf_counter() - start < 30
    message = str(err.value)
    assert "cannot be reached" in message and "local model directory" in message
    assert "offline alias 'smollm2-135m-instruct'" in message
    assert no_stage_runs == []


def test_hb_run_with_a_hub_model_and_no_internet_exits_in_seconds(tmp_path, release, capsys, no_stage_runs):
    """The real probe, where the Hub cannot be reached (as on the test machines): exit 2 and the fix, not
    two minutes of transformers' retries."""
    if source.hub_reachable():
        pytest.skip("the Hugging Face Hub is reachable from here")
    start = time.perf_counter()
    code = cli.main(["run", str(ROOT / "params" / "smoke.yaml"), "-p", "model_name", "hb-tests/no-such-model",
                     "-p", "output_root", str(tmp_path / "out"), "-p", "dataset", str(release)])
    assert code == 2 and time.perf_counter() - start < 60
    err = capsys.readouterr().err
    assert "hb-tests/no-such-model" in err and "offline alias" in err and no_stage_runs == []
