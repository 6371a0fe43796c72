"""Developer tool for the notebook pairs in notebooks/ (not imported by hb_utils).

    python scripts/nbtools.py params    # rewrite every parameters cell from hb_utils/config.py, then sync the pairs

Why: the config class is the single source of defaults, types and help. Every stage notebook carries
a ``parameters`` cell with the fields of the scopes that stage reads (``hb_utils.config.STAGE_SCOPES``;
``papermill --help-notebook`` documents them); this rewrites it in the ``.py`` half of each jupytext
pair and lets jupytext update the ``.ipynb`` half. ``tests/runs/test_notebooks.py`` fails on drift.
Outputs are stripped by nbstripout (the pre-commit hook, README "Development").
"""

from __future__ import annotations

import sys
from pathlib import Path

import jupytext
from jupytext.cli import jupytext as jupytext_cli

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hb_utils.runs.notebook import parameters_cell_source  # noqa: E402

NOTEBOOKS = ROOT / "notebooks"
# Notebooks with parameters of their own (not the experiment config): left alone.
OWN_PARAMETERS = {"06_compare"}


def params() -> None:
    for py in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py")):
        if py.stem in OWN_PARAMETERS:
            continue
        nb = jupytext.read(py)
        cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        if len(cells) != 1:
            raise SystemExit(f"{py.name}: expected one cell tagged 'parameters', found {len(cells)}")
        if cells[0].source != parameters_cell_source(py.stem):
            cells[0].source = parameters_cell_source(py.stem)
            jupytext.write(nb, py, fmt="py:percent")
            print("rewrote the parameters cell of", py.name)
    jupytext_cli(["--sync", "--quiet", *map(str, sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py")))])


if __name__ == "__main__":
    {"params": params}[sys.argv[1] if len(sys.argv) > 1 else "params"]()
