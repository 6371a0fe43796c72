"""`hb run -p/-r/-y` read values exactly as papermill's `-p/-r/-y` do, and refuse the same ones."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from hb_utils import cli
from hb_utils.config import load_config
from hb_utils.errors import ConfigError
from hb_utils.runs.notebook import config_from_namespace
from tests.conftest import ROOT
from tests.runs.test_runner import fixture_notebook

TRICKY = [
    ("experiment", "lr_test #2"), ("system_prompt", "Answer briefly. #1 rule: be kind."),
    ("system_prompt", "Q: what? A: this"), ("system_prompt", "line one\nline two"), ("experiment", "2024"),
    ("experiment", "yes"), ("dataset_split", "no"), ("lr_scheduler", "null"), ("learning_rate", "2e-4"),
    ("num_epochs", "2"), ("lora_r", "16"), ("load_in_4bit", "False"), ("eval_size", "all"),
    ("lora_target_modules", "[q_proj, v_proj]"), ("lora_target_modules", "q_proj,v_proj"),
    ("prompts", '["What is #2?", "a: b"]'), ("prompts", "Hi, what is a fever?"),
]
REFUSED = [("experiment", "1.5"), ("system_prompt", "None"), ("strip_html", "yes"), ("lora_r", "2.5")]


def papermill_config(tmp_path: Path, flags: list[str]) -> dict:
    """The config a notebook builds from papermill's own CLI: ``papermill --prepare-only IN OUT FLAGS`` parses
    and injects the parameters exactly as a run does; the parameters cells are then executed in order, as the
    kernel would, and the notebook's :func:`config_from_namespace` reads them (with the kernel's ``In``)."""
    from click.testing import CliRunner
    from papermill.cli import papermill as papermill_cli

    src, out = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    fixture_notebook(src, "pass")
    result = CliRunner().invoke(papermill_cli, [str(src), str(out), "--prepare-only", *flags], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    nb = nbformat.read(out, as_version=4)
    cells = [c.source for c in nb.cells if {"parameters", "injected-parameters"} & set(c.metadata.get("tags", []))]
    assert len(cells) == 2
    namespace: dict = {"In": ["", *cells]}
    for source in cells:
        exec(source, namespace)  # noqa: S102 - the notebook's own parameters cells
    return config_from_namespace(namespace).to_dict()


@pytest.mark.parametrize(("name", "value"), TRICKY, ids=[f"{n}={v!r}" for n, v in TRICKY])
def test_hb_run_and_papermill_read_p_alike(tmp_path, name, value):
    hb_cfg = load_config(**cli.parse_overrides([(name, value)])).to_dict()
    assert hb_cfg == papermill_config(tmp_path, ["-p", name, value])
    text_fields = ("experiment", "system_prompt", "dataset_split", "lr_scheduler")
    if name in text_fields:
        assert hb_cfg[name] == value  # faithful: the text as typed


@pytest.mark.parametrize(("name", "value"), REFUSED, ids=[f"{n}={v!r}" for n, v in REFUSED])
def test_hb_run_and_papermill_refuse_alike(tmp_path, name, value):
    with pytest.raises(ConfigError, match=name):
        load_config(**cli.parse_overrides([(name, value)]))
    with pytest.raises(ConfigError, match=name):
        papermill_config(tmp_path, ["-p", name, value])


@pytest.mark.parametrize("text", ["prompts: [a, 'b: c']", "dataset_split: 2024-01-01",
                                  "{experiment: 'x #1', lora_r: 4}"])
def test_hb_run_and_papermill_read_y_alike(tmp_path, text):
    assert load_config(**cli.parse_overrides(yamls=[text])).to_dict() == papermill_config(tmp_path, ["-y", text])


# --------------------------------------------------------------------------- slow: real kernels, real signals
@pytest.mark.slow
def test_papermill_kernel_and_hb_run_give_the_same_config(tmp_path):
    """The real path end to end: papermill executes a notebook (a kernel) that dumps its config."""
    values = [("experiment", "lr_test #2"), ("system_prompt", "Answer briefly. #1 rule: be kind.\nQ: what? A: this"),
              ("dataset_split", "2024"), ("lr_scheduler", "yes"), ("learning_rate", "2e-4"),
              ("lora_target_modules", "[q_proj, v_proj]"), ("prompts", '["What is #2?", "a: b"]')]
    dump = tmp_path / "cfg.json"
    fixture_notebook(tmp_path / "dump.ipynb", f"import json\nopen({str(dump)!r}, 'w').write(json.dumps(cfg.to_dict()))")
    flags = [x for n, v in values for x in ("-p", n, v)]
    proc = subprocess.run([sys.executable, "-m", "papermill", str(tmp_path / "dump.ipynb"), str(tmp_path / "o.ipynb"),
                           *flags], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(dump.read_text()) == load_config(**cli.parse_overrides(values)).to_dict()




@pytest.mark.slow
def test_hb_export_prints_its_own_lines_only(tiny_run, tmp_path):
    """`hb export` as a person runs it, GGUF included: one line per step, as `hb run` prints per notebook; no
    library warning (transformers' FutureWarnings, bitsandbytes' kernel loader), log line or progress bar
    ("Loading weights" per model load, "Writing model shards", the GGUF reader's tensor bar)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("export"))
    proc = subprocess.run([sys.executable, "-m", "hb_utils", "export", str(run), "--gguf", "q8_0"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    for noise in ("Warning", "WARNING", "warnings.warn", "gemm_4bit_forward", "Loading weights", "Writing model",
                  "GGUF tensors", "it/s]", "s/it]", "%|", "\r", "Traceback"):
        assert noise not in console, f"{noise!r} on the console:\n{console}"
    assert all(line.startswith("note: ") for line in proc.stderr.splitlines()), proc.stderr
    assert "merged model" in proc.stdout and "GGUF q8_0" in proc.stdout
    assert len(proc.stdout.splitlines()) <= 6, proc.stdout
