"""Author notebooks/06_compare.ipynb (run: python scripts/make_nb_06.py)."""

import nbformat
from nbtools import COLAB_SETUP, NOTEBOOKS, write_notebook

CELLS = [
    ("md", """\
# 06 · Compare experiments

Side by side: what differs between the runs' configs, and what that did to training and evaluation.
Every number is read from the runs' own files (`config.json`, `metrics/train.json`, `metrics/eval.json`),
nothing is recomputed. Intervals are the 95% bootstrap intervals computed in `04_evaluate`; two runs whose
intervals overlap widely are not shown to differ by these test questions.

Run it with `hb compare outputs/exp1 outputs/exp2 …`, or with papermill and `-p run_dirs '[...]'`."""),
    ("code", COLAB_SETUP),
    ("params", ""),
    ("code", """\
from IPython.display import Markdown, display

from hb_utils import compare, paths

runs = [compare.load_run(d) for d in run_dirs]
out = paths.resolve(out_dir)
print("runs:", ", ".join(f"{r.name} ({r.root})" for r in runs))"""),
    ("md", "## What differs between the configs"),
    ("code", "compare.config_diff(runs)"),
    ("md", "## Results\nFine-tuned model; `Δ vs base` is the paired bootstrap difference to the same run's base model."),
    ("code", "compare.results_table(runs).T"),
    ("md", "## Loss curves\nSolid: training loss; dashed: validation loss."),
    ("code", "compare.plot_loss_curves(runs, out / \"loss_curves.png\");"),
    ("md", "## Generation metrics with 95% intervals"),
    ("code", "compare.plot_metric_bars(runs, out / \"metrics.png\");"),
    ("code", """\
files = compare.write_tables(runs, out)
display(Markdown("Written: " + ", ".join(f"`{p.name}`" for p in files.values())))"""),
]

if __name__ == "__main__":
    path = NOTEBOOKS / "06_compare.ipynb"
    write_notebook(path, CELLS)
    # 06 has its own parameters (run directories), not the experiment config's.
    nb = nbformat.read(path, as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = ('# Parameters (papermill: -p run_dirs \'["outputs/exp1", "outputs/exp2"]\').\n'
                   'run_dirs: list = ["outputs/smoke", "outputs/smoke_r16"]  # Run directories to compare.\n'
                   'out_dir: str = "outputs/compare"  # Where tables, plots and this report go.')
    nbformat.write(nb, path)
    print("wrote", path.name)
