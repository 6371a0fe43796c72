# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 06 · Compare experiments
#
# Side by side: what differs between the runs' configs, and what that did to training and evaluation.
# Every number is read from the runs' own files (`config.json`, `metrics/train.json`, `metrics/eval.json`),
# nothing is recomputed. Intervals are the 95% bootstrap intervals computed in `04_evaluate`; two runs whose
# intervals overlap widely are not shown to differ by these test questions.
#
# Run it with `hb compare outputs/exp1 outputs/exp2 …`, or with papermill and `-p run_dirs '[...]'`.

# %% tags=["hide-cell"]
# Colab: install this repository's package first (README, "Colab"). Does nothing where hb_utils is installed.
import importlib.util
import sys
from typing import Union  # noqa: F401 - names the type of some parameters below

from IPython import get_ipython

if importlib.util.find_spec("hb_utils") is None and "google.colab" in sys.modules:
    get_ipython().run_line_magic("pip", "install -q -e ..")  # run from the cloned repository's notebooks/

# %% tags=["parameters"]
# Parameters (papermill: -p run_dirs '["outputs/exp1", "outputs/exp2"]').
run_dirs: list = ["outputs/smoke", "outputs/smoke_r16"]  # Run directories to compare.
out_dir: str = "outputs/compare"  # Where tables, plots and this report go.

# %%
from IPython.display import Markdown, display

from hb_utils import quiet
from hb_utils.runs import compare

quiet.apply()
runs = [compare.load_run(d) for d in run_dirs]
out = compare.claim_out(out_dir, "out_dir")  # never the filesystem root, your home or a folder of yours
print("runs:", ", ".join(f"{r.name} ({r.root})" for r in runs))

# %% [markdown]
# ## What differs between the configs

# %%
compare.config_diff(runs)

# %% [markdown]
# ## Results
# Fine-tuned model; `Δ vs base` is the paired bootstrap difference to the same run's base model.

# %%
compare.results_table(runs).T

# %% [markdown]
# ## Loss curves
# Solid: training loss; dashed: validation loss.

# %%
compare.plot_loss_curves(runs, out / "loss_curves.png");

# %% [markdown]
# ## Generation metrics with 95% intervals

# %%
compare.plot_metric_bars(runs, out / "metrics.png");

# %%
files = compare.write_tables(runs, out)
display(Markdown("Written: " + ", ".join(f"`{p.name}`" for p in files.values())))
