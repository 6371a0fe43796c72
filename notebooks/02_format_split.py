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
experiment: str = 'exp1'  # Run name: artifacts go to <output_root>/<experiment>/.
output_root: str = 'outputs'  # Where run directories live (relative paths: to the repo root).
overwrite: bool = False  # Replace artifacts of a different config in this run directory.
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
split_by: str = 'question'  # What never spans two splits: question (pairs sharing a question, an answer or a near-duplicate answer), focus (also sharing a focus), or row (the original notebook's split).
model_name: str = 'TinyLlama/TinyLlama-1.1B-Chat-v1.0'  # Hub id, local model dir, or the offline alias smollm2-135m-instruct.
max_length: int = 512  # Maximum tokens per training example.
load_in_4bit: bool = True  # Quantize the base model to 4-bit (QLoRA).
bnb_4bit_quant_type: str = 'nf4'  # 4-bit quantization type.
bnb_4bit_double_quant: bool = True  # Double quantization of the 4-bit constants.
compute_dtype: str = 'auto'  # auto (bf16 where supported, else fp16 on GPU / fp32 on CPU), bf16, fp16, fp32.
attn_implementation: str = 'auto'  # Attention kernel: auto (SDPA, except short bf16 CPU training batches (at most 320 tokens at 1 thread, 160 at 2), which use matmul attention: faster there; fp32 always SDPA; see hb_utils.model.attention), sdpa, or eager; same results up to rounding.
lora_r: int = 8  # LoRA rank.
lora_alpha: int = 16  # LoRA alpha; the adapter output is scaled by alpha / r.
lora_dropout: float = 0.05  # LoRA dropout, in [0, 1).
fast_lora_dropout: bool = True  # On CPU, draw LoRA dropout masks 16 bits at a time (faster masks, p rounded to 2**-16, a different random stream); False: PEFT's nn.Dropout.
lora_target_modules: list[str] = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj']  # Module names that get LoRA adapters.
learning_rate: float = 0.0002  # Peak learning rate.
batch_size: int = 2  # Per-device training batch size.
eval_batch_size: int = 2  # Per-device evaluation batch size.
grad_accum: int = 4  # Gradient accumulation steps.
num_epochs: float = 1.0  # Training epochs.
max_steps: int = -1  # Stop after this many optimizer steps (-1: run num_epochs).
lr_scheduler: str = 'cosine'  # Learning-rate schedule (transformers name).
warmup_ratio: float = 0.05  # Share of steps for warm-up.
weight_decay: float = 0.001  # Weight decay.
optim: str = 'paged_adamw_8bit'  # Optimizer (transformers name). paged_adamw_8bit: 8-bit AdamW whose states page out to CPU memory under GPU memory pressure; on a CPU bitsandbytes runs the same 8-bit AdamW unpaged (and warns so).
max_grad_norm: float = 0.3  # Gradient clipping norm.
gradient_checkpointing: bool = True  # Recompute activations to save memory.
group_by_length: bool = False  # Batch examples of similar length (less padding).
logging_steps: int = 25  # Log training loss every N steps.
eval_steps: int = 100  # Validate every N steps.
save_steps: int = 200  # Checkpoint every N steps.
load_best_model: bool = True  # Keep the checkpoint with the best validation loss.
completion_only_loss: bool = True  # Loss on answer tokens only (False: original full-sequence loss).
seed: int = 42  # Training seed.
report_to: str = 'none'  # Training logger: none or tensorboard (needs `pip install tensorboard`; logs in checkpoints/runs/).
num_processes: int = 1  # Training processes (data-parallel through `accelerate launch`: one per GPU, or CPU processes; docs/distributed.md). The effective batch is batch_size x grad_accum x num_processes: keep Experiment 1's 8 by lowering grad_accum to 8 / (batch_size x num_processes). Scope train: another N is another optimisation (batch, data order, per-rank RNG), so its adapter/checkpoints are never reused or resumed.
accelerate_config: str = ''  # accelerate config YAML for num_processes > 1 (e.g. accelerate/fsdp_qlora.yaml: FSDP for models that do not fit one GPU); empty: DDP with accelerate's defaults. Same optimisation either way (only rounding differs).
resume: str = 'auto'  # auto: continue from this config's newest checkpoint; never: start fresh.
eval_size: "Union[int, str]" = 20  # Test questions to generate answers for (an int, or 'all').
eval_max_new_tokens: int = 150  # New-token limit of evaluation answers (greedy).
ppl_size: "Union[int, str]" = 50  # Test texts for perplexity (an int, or 'all').
gen_batch_size: int = 32  # Batch size of evaluation generation (left-padded, greedy).
ppl_batch_size: int = 8  # Batch size of the perplexity passes.
bootstrap_samples: int = 1000  # Bootstrap resamples for confidence intervals.
prompts: list[str] = []  # Extra prompts for 05_qualitative, besides the six standard ones.
qual_temperature: float = 0.3  # Sampling temperature of qualitative answers.
qual_top_p: float = 0.9  # Nucleus sampling top_p.
qual_repetition_penalty: float = 1.15  # Repetition penalty.
qual_max_new_tokens: int = 256  # New-token limit of qualitative answers.
qual_seed: int = 42  # Sampling seed, so a rerun gives the same text.
progress: bool = True  # Show progress bars (kept quiet in headless runs).

# %% tags=["hide-input"]
from hb_utils.runs.notebook import begin

cfg = begin(globals())  # validates the parameters above (a typo fails here), shows this run vs Experiment 1

# %%
import pandas as pd
from IPython.display import display

from hb_utils.data import medquad, plots, split
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
