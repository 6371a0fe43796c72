"""The console policy (hb_utils.quiet): what library output reaches a terminal or a report, and who is headless."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import types

import nbformat
import pytest

from hb_utils import quiet
from hb_utils.runs.notebook import PARAMETERS_HEADER, parameter_names_from_history, parameters_cell_source
from tests.conftest import ROOT

BAR_MARKS = ("it/s]", "s/it]", "%|", "\r", "application/vnd.jupyter.widget-view+json")


def test_console_prints_the_kits_notes_and_no_library_warnings():
    """What `hb export` printed on a CPU with AVX512-BF16 (bitsandbytes' kernel loader, transformers' own
    FutureWarning), in a process where a library configured the root logger, as every `hb` command runs."""
    script = """
import logging, warnings
logging.basicConfig()  # a library that configures the root logger ("WARNING:name:message")
from hb_utils import quiet
with quiet.console():
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
        "Failed to load CPU gemm_4bit_forward from kernels-community: could not verify publisher trust status")
    logging.getLogger("kernels._internals.hf_hub").warning("Skipping publisher trust check")
    import transformers
    from transformers.utils import logging as hf_logging
    hf_logging.get_logger("transformers.modeling_utils").warning("a transformers warning")
    warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
    logging.getLogger("hb_utils.export.gguf_file").warning("the kit's own note")
    warnings.warn("a warning nobody filtered", UserWarning)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env={k: v for k, v in os.environ.items() if k not in quiet.QUIET_ENV})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == "note: the kit's own note", proc.stderr
    assert "a warning nobody filtered" in proc.stderr  # real warnings still show
    for noise in ("gemm_4bit_forward", "publisher trust", "a transformers warning", "is_gradient_checkpointing",
                  "WARNING:"):
        assert noise not in proc.stderr, proc.stderr


def test_console_restores_what_it_changed(monkeypatch):
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    logging.getLogger("bitsandbytes").setLevel(logging.NOTSET)
    kit = logging.getLogger("hb_utils")
    handlers = list(kit.handlers)
    with quiet.console():
        assert not logging.getLogger("bitsandbytes.backends.cpu.ops").isEnabledFor(logging.WARNING)
        assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"
        assert not kit.propagate
    assert logging.getLogger("bitsandbytes").level == logging.NOTSET
    assert "TRANSFORMERS_VERBOSITY" not in os.environ
    assert kit.propagate and kit.handlers == handlers


def test_no_progress_bars_also_silences_the_gguf_tensor_bar():
    """transformers' GGUF loader draws its "Converting and de-quantizing GGUF tensors" bar (272 lines for
    SmolLM2's conversion) with plain tqdm, which transformers' progress-bar switch does not reach."""
    reader = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    from transformers.utils import logging as hf_logging

    original = reader.tqdm
    with quiet.no_progress_bars():
        assert reader.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...").disable
        assert hf_logging.tqdm(range(3), desc="Loading weights").__class__.__name__ == "EmptyTqdm"
    assert reader.tqdm is original


# --------------------------------------------------------------------------- is_headless
def test_injected_by_papermill_reads_the_kernels_history():
    ours = parameters_cell_source("01_eda")
    injected = "# Parameters\nexperiment = \"x\"\n"
    assert quiet.injected_by_papermill(["", ours, injected, "cfg = begin(globals())"])
    assert not quiet.injected_by_papermill(["", ours, "cfg = begin(globals())"])
    assert not quiet.injected_by_papermill([])
    assert ours.startswith(PARAMETERS_HEADER) and quiet.first_line(ours) != quiet.PAPERMILL_PARAMETERS_HEADER
    # the parameter logic of runs.notebook reads the same cell the same way
    assert parameter_names_from_history(["", ours, injected]) is not None
    assert "experiment" in parameter_names_from_history(["", ours, injected])


@pytest.mark.parametrize(("history", "headless"), [(["", "# Parameters\nlora_r = 4\n", "x = 1"], True),
                                                   (["", "x = 1"], False)], ids=["papermill", "person"])
def test_a_kernel_that_ran_papermills_cell_is_headless(monkeypatch, history, headless):
    """Inside a Jupyter kernel, with neither HB_HEADLESS nor CI set: papermill (another process) left its
    injected parameters cell in the kernel's history; a person's kernel has none."""
    import IPython

    monkeypatch.delenv("HB_HEADLESS", raising=False)
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    shell = types.SimpleNamespace(user_ns={"In": history})
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    assert quiet.is_headless() is headless


def test_hb_headless_decides_when_set(monkeypatch):
    monkeypatch.setenv("HB_HEADLESS", "0")
    monkeypatch.setenv("CI", "1")
    assert not quiet.is_headless()
    monkeypatch.setenv("HB_HEADLESS", "1")
    assert quiet.is_headless()


PROBE_CELLS = [
    "from hb_utils.runs.notebook import begin\ncfg = begin(globals(), show=False)",
    "from hb_utils import quiet\nprint('headless:', quiet.is_headless())",
    "from hb_utils.progress import pbar\ntotal = sum(pbar(range(200), desc='work'))",
    "from transformers.utils import logging as hf_logging\n"
    "loaded = list(hf_logging.tqdm(range(50), desc='Loading weights'))",
    "from hb_utils import chat\nchat_app = chat.show_in_notebook(cfg)",
]


def outputs_text(nb: nbformat.NotebookNode) -> str:
    """Every output of every code cell as text (streams, rich data and their mime types, errors)."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            parts += [out.get("text", ""), *out.get("traceback", []), str(out.get("ename", ""))]
            parts += [f"{mime}: {value}" for mime, value in out.get("data", {}).items()]
    return "\n".join(parts)


@pytest.mark.slow
def test_plain_papermill_runs_headless_without_ci_or_hb_headless(tmp_path):
    """`papermill nb.ipynb out.ipynb -f params/smoke.yaml`, as the design card runs a notebook, with CI and
    HB_HEADLESS removed from the environment: the kernel knows papermill runs it, so no progress bar (the
    kit's, transformers') and no chat app end up in the report."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(parameters_cell_source())
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# probe"), params, *map(nbformat.v4.new_code_cell, PROBE_CELLS)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "probe.ipynb")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "HB_HEADLESS")}
    proc = subprocess.run([sys.executable, "-m", "papermill", str(tmp_path / "probe.ipynb"),
                           str(tmp_path / "out.ipynb"), "-f", str(ROOT / "params" / "smoke.yaml"),
                           "-p", "output_root", str(tmp_path / "outputs")],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = outputs_text(nbformat.read(tmp_path / "out.ipynb", as_version=4))
    assert "headless: True" in text, text
    assert "Chat app skipped (headless run)" in text and "iframe" not in text, text
    for mark in BAR_MARKS:
        assert mark not in text, f"{mark!r} in the report:\n{text}"


@pytest.mark.slow
def test_the_one_time_smollm2_conversion_prints_two_lines(tmp_path):
    """What `hb run` printed on a fresh machine before 01 started: the GGUF reader's 272-step tensor bar and
    transformers' shard-writing bar around the kit's own two lines."""
    from hb_utils.errors import ModelError
    from hb_utils.model import source

    try:
        source.packaged_gguf()
    except ModelError as exc:
        pytest.skip(str(exc))
    script = "from hb_utils import quiet\nfrom hb_utils.model import source\nwith quiet.console():  # as `hb run`\n" \
             "    source.smollm2_model_dir()\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HB_CACHE_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == "", proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("Converting ") and lines[1].startswith("Converted in"), proc.stdout
