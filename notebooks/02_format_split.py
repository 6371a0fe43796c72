# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Clean, sample, split and format
#
# From raw pairs to training records, in four steps, each counted:
#
# 1. **clean** — strip HTML tags, collapse whitespace;
# 2. **filter** — keep questions longer than `min_question_chars`, answers longer than `min_answer_chars` and at
#    most `max_answer_words` words; drop exact duplicate pairs;
# 3. **sample** `sample_size` pairs with `sample_seed`;
# 4. **split** train/val/test by `split_by` with `split_seed`: all pairs of one group (linked by a normalized
#    question or focus, the same answer, or a near-duplicate answer) land in the same split, so no test question
#    or test answer is seen in training.
#
# Records are chat messages (system, user, assistant); the model's own chat template renders them in 03.
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

cfg = begin(globals(), stage="02_format_split")  # validates the parameters above (a typo fails here), shows this run vs Experiment 1

# %%
import pandas as pd
from IPython.display import display

from hb_utils.data import external, medquad, plots, split
from hb_utils.run_dir import RunPaths
from hb_utils.runs import report

run = RunPaths.for_config(cfg)
prepared = medquad.prepare_splits(cfg)  # writes data/{train,val,test}.jsonl and data/stats.json
stats = prepared.stats

# %% [markdown]
# ## The filter funnel

# %%
display(pd.DataFrame(stats["funnel"]).set_index("step"))
plots.funnel(stats["funnel"], run.plot("split_funnel"));

# %% [markdown]
# ## Sampling
# If the filters leave fewer pairs than `sample_size`, all of them are used and this says so.

# %%
report.as_table(stats["sample"])

# %% [markdown]
# ## The split and its leakage
# MedQuAD repeats questions under several sources, asks many questions about one focus, and reuses whole
# answers (templated paragraphs such as an inheritance paragraph shared by hundreds of conditions) under
# different questions. So a group here is every pair linked by the same normalized question (or focus, with
# `split_by: focus`), the same answer, or a near-duplicate answer (word 5-gram Jaccard ≥ 0.8, found with MinHash
# LSH and verified exactly), and a group never spans two splits. The table counts, for validation and test,
# the pairs whose question, answer or near-duplicate answer also occurs in train: for the chosen `split_by` and
# for a plain row split of the same sample (the original method). *pairs_regrouped* counts the pairs whose
# group the answer links joined across questions (foci): their split was decided together.

# %%
split_stats = stats["split"]
display(report.as_table({**split_stats["sizes"], **split_stats["grouping"]}, "pairs / groups"))
split.leakage_table(split_stats)

# %% [markdown]
# ## Pairs that leak into the external sets
# The external sets of `external_eval` (consumer questions from TREC 2017 LiveQA-Med and MedLFQA, see
# docs/evaluation.md) measure whether the model generalises beyond MedQuAD. MedQuAD was built partly to answer
# LiveQA's questions, so some of its pairs answer those very questions. Before sampling, every cleaned pair is
# compared with every question text and reference answer of each set — same normalized question, near-duplicate
# question or answer (word 5-gram Jaccard ≥ 0.8, the split's own measure), same answer, or answers sharing half the
# shorter one's 5-grams (a reference copied into a longer MedQuAD answer) — and dropped when any of these holds
# (the funnel's last step). *questions touched*: the set's questions that some dropped pair overlapped.

# %%
external.drop_table(stats["external"]) if "external" in stats else print("external_eval is empty: no set to check.")

# %%
plots.split_lengths(prepared.frames, run.plot("split_lengths"));

# %% [markdown]
# ## One record
# The stored record is model-agnostic chat messages. Shown here in the TinyLlama/Zephyr layout of the original notebook; training renders it with the model's own template.

# %%
example = prepared.records["train"][0]
print(medquad.render_zephyr(example["messages"]))

# %% [markdown]
# ## Files written
# Each is stamped with the data fingerprint; 03 rebuilds them if they are missing.

# %%
print("data fingerprint:", stats["stamp"]["fingerprints"]["data"])
for name, path in prepared.files.items():
    print(f"{name:6s} {path}")
