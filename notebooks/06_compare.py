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
# Which setting makes a better HealthBot? Each run is compared with a **baseline run** on the same test questions:
# run − baseline per metric, with a paired bootstrap interval over the questions both answered (the same resampled
# questions for both runs, so how hard a question is cancels out). Several runs times several metrics make many
# comparisons, so each verdict uses a Bonferroni-adjusted interval; "not distinguishable" is an answer.
# Below the verdicts: each metric against each swept parameter, what differs between the configs, every run's own
# numbers and its loss curves. Every number is read from the runs' files (`config.json`, `metrics/*.json`,
# `metrics/predictions.jsonl`).
#
# Run it with `hb compare outputs/exp1 outputs/exp2 … [--baseline exp1]`, or let `hb sweep` make it for a series.

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
baseline: str = ""  # The run every other is compared with (its directory name); empty: the first run.
swept: list = []  # Parameters to plot the metrics against; empty: every parameter that differs between the runs.
title: str = ""  # Report title; empty: "Experiment comparison".

# %% tags=["hide-input"]
from IPython.display import Markdown, display

from hb_utils import quiet
from hb_utils.runs import compare

quiet.apply()
runs = [compare.load_run(d) for d in run_dirs]
out = compare.claim_out(out_dir, "out_dir")  # never the filesystem root, your home or a folder of yours
base = compare.find_run(runs, baseline)
verdicts = compare.compare_to_baseline(runs, base.name)
display(Markdown(f"## {title or 'Experiment comparison'}: {len(runs)} runs against **{base.name}**\n\n"
                 + compare.verdict_summary(verdicts) + "\n\n"
                 + "\n".join(f"- {line}" for line in compare.verdict_lines(verdicts))))

# %% [markdown]
# ## Verdicts
# One row per run and metric: run − baseline with its 95% interval, the adjusted interval the verdict reads, the
# number of questions compared and whether the comparison is paired (same test questions) or not (and why).

# %%
compare.verdict_table(verdicts)

# %% [markdown]
# ## Each metric against each swept parameter
# One point per run (fine-tuned model) with its own 95% interval; the baseline is hollow.

# %%
compare.plot_metric_vs_param(runs, compare.swept_parameters(runs, swept), out / "metric_vs_param.png",
                             baseline=base.name);

# %% [markdown]
# ## What differs between the configs

# %%
compare.config_diff(runs)

# %% [markdown]
# ## Every run's own results
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

# %% [markdown]
# ## External evaluation sets
# Questions from outside MedQuAD, where a run was evaluated on them (`eval.json["external"]`): each run's
# fine-tuned value and its difference to its own base model, side by side (not paired across runs).

# %%
external = compare.external_tables(runs)
for name, table in external.items():
    display(Markdown(f"### {name}"), table.T)
if not external:
    display(Markdown("No run was evaluated on an external set."))

# %%
files = compare.write_tables(runs, out, baseline=base.name, swept=swept, title=title, verdicts=verdicts)
display(Markdown("Written: " + ", ".join(f"`{p.name}`" for p in files.values())))
