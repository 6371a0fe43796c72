"""Developer tools for the committed notebooks (not imported by hb_utils).

    python scripts/nbtools.py sync     # rewrite every notebook's parameters cell from the config
    python scripts/nbtools.py strip    # remove outputs and execution counts

Why: the config class is the single source of defaults. Every notebook carries the same
``parameters`` cell (so ``papermill -f params/x.yaml`` and ``hb run`` pass every name without
warnings); ``sync`` regenerates it from ``ExperimentConfig`` and ``tests/test_notebooks.py``
fails when a notebook drifts. ``write_notebook`` is how notebooks are authored from a script.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hb_utils.config import parameters_cell_source  # noqa: E402

NOTEBOOKS = ROOT / "notebooks"
PARAMS_HEADER = (
    "# Parameters (papermill: -f params/<name>.yaml, -p name value). Defaults = Experiment 1.\n"
    "# Generated from hb_utils/config.py by `python scripts/nbtools.py sync`; the next cell validates them.\n"
)


# The first code cell of every notebook: makes `hb_utils` importable on Colab, does nothing elsewhere.
COLAB_SETUP = """\
# Colab: install this repository's package first (README, "Colab"). Does nothing where hb_utils is installed.
import importlib.util
import sys
from typing import Union  # noqa: F401 - names the type of some parameters below

if importlib.util.find_spec("hb_utils") is None and "google.colab" in sys.modules:
    get_ipython().run_line_magic("pip", "install -q -e ..")  # run from the cloned repository's notebooks/
"""
CONFIG_CELL = """\
from hb_utils.config import config_from_namespace

cfg = config_from_namespace(globals())  # validates every parameter above; unknown names fail here
"""


def standard_head(title_md: str) -> list[tuple[str, str]]:
    """Title, Colab setup, parameters and validated config: the same first cells in every notebook."""
    return [("md", title_md), ("code", COLAB_SETUP), ("params", ""), ("code", CONFIG_CELL)]


def params_cell() -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(PARAMS_HEADER + parameters_cell_source())
    cell.metadata["tags"] = ["parameters"]
    return cell


def write_notebook(path: Path, cells: list[tuple[str, str]]) -> None:
    """cells: ("md", text) | ("code", source) | ("params", "") in order."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, src in cells:
        if kind == "md":
            nb.cells.append(nbformat.v4.new_markdown_cell(src.strip("\n")))
        elif kind == "code":
            nb.cells.append(nbformat.v4.new_code_cell(src.strip("\n")))
        elif kind == "params":
            nb.cells.append(params_cell())
        else:
            raise ValueError(kind)
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"c{i:02d}"
    nbformat.validate(nb)
    nbformat.write(nb, path)


# Notebooks with parameters of their own (not the experiment config): `sync` leaves them alone.
OWN_PARAMETERS = {"06_compare"}


def sync() -> None:
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        if path.stem in OWN_PARAMETERS:
            continue
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if "parameters" in cell.metadata.get("tags", []):
                cell.source = params_cell().source
        nbformat.write(nb, path)
        print("synced", path.name)


def strip() -> None:
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        nbformat.write(nb, path)


if __name__ == "__main__":
    {"sync": sync, "strip": strip}[sys.argv[1]]()
