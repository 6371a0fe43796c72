"""Each stage notebook takes only the parameters of the scopes it reads (hb_utils.config.STAGE_SCOPES)."""

from __future__ import annotations

import subprocess
import sys

import nbformat
import pytest
import yaml

from hb_utils.config import FIELDS, STAGE_SCOPES, ExperimentConfig, stage_fields, stages_using
from hb_utils.errors import ConfigError
from hb_utils.runs.notebook import config_from_namespace, file_only_names, parameters_cell_source
from tests.conftest import ROOT


def test_stage_fields_follow_the_scopes():
    assert set(stage_fields("01_eda")) == {n for n, f in FIELDS.items() if f.metadata["scope"] in ("run", "data")}
    assert "lora_r" in stage_fields("03_train_qlora") and "eval_size" not in stage_fields("03_train_qlora")
    assert set(stage_fields("05_qualitative")) == set(FIELDS) == set(stage_fields(None))
    assert stages_using("lora_r") == ["03_train_qlora", "04_evaluate", "05_qualitative"]
    assert stages_using("sample_size") == list(STAGE_SCOPES)


def test_a_parameter_of_another_stage_is_refused_naming_the_stages_that_read_it():
    with pytest.raises(ConfigError, match=r"01_eda does not read lora_r: lora_r \(train scope\) is read by "
                                          r"03_train_qlora, 04_evaluate, 05_qualitative.*--only 01"):
        config_from_namespace({"experiment": "x", "lora_r": 8}, stage="01_eda")
    with pytest.raises(ConfigError, match="03_train_qlora does not read eval_size"):
        config_from_namespace({"eval_size": 4}, stage="03_train_qlora")
    cfg = config_from_namespace({"experiment": "x", "sample_size": 9}, stage="01_eda")
    assert (cfg.experiment, cfg.sample_size, cfg.lora_r) == ("x", 9, ExperimentConfig().lora_r)
    assert config_from_namespace({"lora_r": 4}, stage="04_evaluate").lora_r == 4


def test_file_only_names_reads_a_papermill_command_line(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("experiment: e\nlora_r: 4\neval_size: 3\n")
    argv = ["/v/bin/python", "/v/bin/papermill", "nb.ipynb", "out.ipynb", "-f", str(params), "-p", "lora_r", "8",
            "-y", "{qual_seed: 1}", "--cwd", "x"]
    assert file_only_names(argv) == {"experiment", "eval_size"}  # lora_r was also given with -p
    assert file_only_names(["python", "-m", "papermill", "a", "b", "-f", str(params)]) == {"experiment", "lora_r",
                                                                                        "eval_size"}
    assert file_only_names(["/v/bin/hb", "run", "-f", str(params)]) == set()  # not papermill: nothing is a file's
    relative = ["/v/bin/papermill", "nb.ipynb", "out.ipynb", "-f", "p.yaml"]  # read from papermill's directory
    assert file_only_names(relative, cwd=str(tmp_path)) == {"experiment", "lora_r", "eval_size"}


def _fixture(path, stage: str) -> None:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(parameters_cell_source(stage))
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        "from hb_utils.runs.notebook import config_from_namespace\n"
        f"cfg = config_from_namespace(globals(), stage={stage!r})\nprint('lora_r', cfg.lora_r, cfg.sample_size)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.mark.slow
def test_papermill_refuses_another_stages_parameter_but_takes_a_whole_params_file(tmp_path):
    """The real papermill command: `-p lora_r 8` to a data notebook fails naming the stages; the same name
    inside `-f params.yaml` (the whole experiment) is left to the later stages."""
    nb = tmp_path / "01_fixture.ipynb"
    _fixture(nb, "01_eda")
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"experiment": "e", "sample_size": 7, "lora_r": 4, "eval_size": 3}))
    papermill = [sys.executable, "-m", "papermill", "--cwd", str(ROOT), "-k", "python3"]
    bad = subprocess.run([*papermill, str(nb), str(tmp_path / "bad.ipynb"), "-p", "lora_r", "8"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert "01_eda does not read lora_r" in bad.stderr + bad.stdout and "03_train_qlora" in bad.stderr + bad.stdout
    ok = subprocess.run([*papermill, str(nb), str(tmp_path / "ok.ipynb"), "-f", str(params)],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    out = nbformat.read(tmp_path / "ok.ipynb", as_version=4)
    printed = "".join(o.get("text", "") for c in out.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert f"lora_r {ExperimentConfig().lora_r} 7" in printed  # sample_size taken; lora_r left to 03


def test_help_notebook_lists_the_notebooks_own_fields():
    import papermill as pm

    for stage in STAGE_SCOPES:
        assert set(pm.inspect_notebook(str(ROOT / "notebooks" / f"{stage}.ipynb"))) == set(stage_fields(stage))
