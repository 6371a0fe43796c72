# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Exploring MedQuAD
#
# What does the raw data hold before we clean anything? This notebook answers the questions that decide
# the next steps: which sources actually have answers, how long questions and answers are (our model sees
# at most `max_length` tokens), and how often the *same* question recurs — the reason `02_format_split`
# splits by question rather than by row.
#
# Data: **MedQuAD** (Ben Abacha & Demner-Fushman, *A question-entailment approach to question answering*,
# BMC Bioinformatics 20, 511, 2019), CC BY 4.0. Three MedlinePlus subsets ship without answers to respect
# MedlinePlus copyright.

# %% tags=["hide-cell"]
# Colab: install this repository's package first (README, "Colab"). Does nothing where hb_utils is installed.
import importlib.util
import sys
from typing import Union  # noqa: F401 - names the type of some parameters below

from IPython import get_ipython

if importlib.util.find_spec("hb_utils") is None and "google.colab" in sys.modules:
    get_ipython().run_line_magic("pip", "install -q -e ..")  # run from the cloned repository's notebooks/

# %% tags=["parameters"]
# Parameters (papermill: -f params/<name>.yaml, -p name value). Defaults = Experiment 1.
# Generated from hb_utils/config.py (`python scripts/nbtools.py params`); the next cell validates them.
# --- run: bookkeeping and kernels (same results) ---
experiment: str = 'exp1'  # Run name: artifacts go to <output_root>/<experiment>/.
output_root: str = 'outputs'  # Where run directories live (relative paths: to the repo root).
overwrite: bool = False  # Replace artifacts of a different config in this run directory.
attn_implementation: str = 'auto'  # Attention kernel: auto (the faster one per device and dtype, hb_utils.model.attention), sdpa or eager.
logging_steps: int = 25  # Log training loss every N steps.
report_to: str = 'none'  # Training logger: none, tensorboard (logs in checkpoints/runs/) or trackio (logs in <output_root>/trackio/).
accelerate_config: str = ''  # accelerate config YAML for num_processes > 1 (e.g. accelerate/fsdp_qlora.yaml); empty: DDP defaults.
resume: str = 'auto'  # auto: continue from this config's newest checkpoint; never: start fresh.
progress: bool = True  # Show progress bars (kept quiet in headless runs).
# --- data: the split (02) ---
dataset: str = 'lavita/MedQuAD'  # Hub dataset id, MedQuAD XML release dir, or .parquet/.jsonl/.csv file.
dataset_split: str = 'train'  # Split of a Hub dataset to load.
system_prompt: str = 'You are HealthBot, a knowledgeable and empathetic medical information assistant. You provide accurate, evidence-based health information to help users understand medical conditions, symptoms, and treatments. Always remind users to consult a qualified healthcare professional for personal medical advice.'  # System message of every chat record.
strip_html: bool = True  # Strip HTML tags from questions and answers.
min_question_chars: int = 10  # Keep questions longer than this many characters.
min_answer_chars: int = 20  # Keep answers longer than this many characters.
max_answer_words: int = 300  # Keep answers of at most this many words.
sample_size: int = 1500  # Number of pairs sampled after cleaning.
sample_seed: int = 42  # Seed of the sample.
train_frac: float = 0.8  # Fraction of pairs for training.
val_frac: float = 0.1  # Fraction of pairs for validation.
test_frac: float = 0.1  # Fraction of pairs for testing.
split_seed: int = 42  # Seed of the train/val/test split.
split_by: str = 'question'  # What never spans two splits: question (+ same or near-duplicate answer), focus, or row (the original's).
external_eval: list[str] = []  # External sets (LiveQA XML, MedLFQA JSONL; paths from the repo root): 02 drops pairs leaking into them, 04 scores each.

# %% tags=["hide-input"]
from hb_utils.runs.notebook import begin

cfg = begin(globals(), stage="01_eda")  # validates the parameters above (a typo fails here), shows this run vs Experiment 1

# %%
from IPython.display import display

from hb_utils.data import eda, medquad, plots
from hb_utils.run_dir import RunPaths
from hb_utils.runs import report

run = RunPaths.for_config(cfg)
raw, info = medquad.load_raw(cfg.dataset, cfg.dataset_split)
print(f"source: {info['source']} ({info['kind']})")
print(f"{info['rows']:,} QA pairs, {info['answered']:,} with an answer")
raw.head(3)

# %% [markdown]
# ## Columns: types, missing values, distinct values
# Empty strings count as missing: the XML release has empty `<Answer/>` elements where answers were removed.

# %%
eda.overview(raw)

# %% [markdown]
# ## Rows per source, answered vs unanswered
# Only answered pairs can be used for fine-tuning; whole sources drop out here.

# %%
display(eda.per_source(raw))
plots.answered_by_source(raw, run.plot("eda_sources"));

# %% [markdown]
# ## Question types

# %%
display(eda.per_question_type(raw).head(15))
plots.question_types(raw, run.plot("eda_question_types"));

# %% [markdown]
# ## Lengths
# The red line is the `max_answer_words` filter of the config; longer answers are dropped in 02.

# %%
display(eda.length_summary(raw))
plots.length_distributions(raw, cfg.max_answer_words, run.plot("eda_lengths"));

# %% [markdown]
# ## Duplicate questions
# The same normalized question (lowercase, no punctuation) under several sources or documents. A random *row* split puts copies on both sides of the train/test line, so test scores would partly measure memorisation. This is why `split_by` defaults to `question`.

# %%
dups = eda.duplicate_questions(raw)
eda.write_summary(cfg, info, dups)  # data/eda.json, stamped with the data fingerprint
report.as_table(dups)

# %% [markdown]
# **Next:** `02_format_split` cleans, filters, samples and splits these pairs into chat records.
