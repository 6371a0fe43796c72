# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Train: QLoRA fine-tuning with TRL's SFTTrainer
#
# The base model is loaded in **4-bit NF4** (`load_in_4bit`) and only small **LoRA** matrices (`lora_r`,
# `lora_alpha`, `lora_target_modules`) are trained — the same code path on a GPU and on a CPU.
#
# Each training example is a conversation: the **prompt** is the system message plus the question, the
# **completion** is the reference answer. The model's own chat template renders it, and with
# `completion_only_loss=True` (default) only the answer **and its end-of-turn token** carry loss, so the model
# learns *what* to answer and *when to stop*. The original notebook padded with the end-of-sequence token, which
# masked every end-of-turn token out of the loss, and trained on the system prompt and the question as well;
# `completion_only_loss=False` restores its full-text loss for comparison.
#
# Checkpoints go to `checkpoints/` every `save_steps`; if the kernel dies, rerunning this notebook with the same
# parameters **continues from the newest checkpoint** (`resume="auto"`). The split is rebuilt here when
# 02_format_split has not run.

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
# --- train: the adapter (03) ---
model_name: str = 'TinyLlama/TinyLlama-1.1B-Chat-v1.0'  # Hub id, local model dir, or the offline alias smollm2-135m-instruct.
max_length: int = 512  # Maximum tokens per training example.
load_in_4bit: bool = True  # Quantize the base model to 4-bit (QLoRA).
bnb_4bit_quant_type: str = 'nf4'  # 4-bit quantization type.
bnb_4bit_double_quant: bool = True  # Double quantization of the 4-bit constants.
compute_dtype: str = 'auto'  # auto (bf16 where supported, else fp16 on GPU / fp32 on CPU), bf16, fp16, fp32.
lora_r: int = 8  # LoRA rank.
lora_alpha: int = 16  # LoRA alpha; the adapter output is scaled by alpha / r.
lora_dropout: float = 0.05  # LoRA dropout, in [0, 1).
fast_lora_dropout: bool = True  # On CPU, draw LoRA dropout masks 16 bits at a time (faster; p rounded to 2**-16); False: nn.Dropout.
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
optim: str = 'paged_adamw_8bit'  # Optimizer (transformers name); paged_adamw_8bit runs unpaged on a CPU.
max_grad_norm: float = 0.3  # Gradient clipping norm.
gradient_checkpointing: bool = True  # Recompute activations to save memory.
group_by_length: bool = False  # Batch examples of similar length (less padding).
eval_steps: int = 100  # Validate every N steps.
save_steps: int = 200  # Checkpoint every N steps.
load_best_model: bool = True  # Keep the checkpoint with the best validation loss.
completion_only_loss: bool = True  # Loss on answer tokens only (False: original full-sequence loss).
seed: int = 42  # Training seed.
num_processes: int = 1  # Data-parallel training processes (accelerate; docs/distributed.md); effective batch is batch x accum x N.

# %% tags=["hide-input"]
from hb_utils.runs.notebook import begin

cfg = begin(globals(), stage="03_train_qlora")  # validates the parameters above (a typo fails here), shows this run vs Experiment 1

# %% [markdown]
# ## Data, model and trainable parameters

# %%
from IPython.display import display

from hb_utils.train import training

run = training.prepare(cfg)  # split (rebuilt if missing), tokenizer, 4-bit model + LoRA, SFTTrainer
print(training.describe(run))

# %% [markdown]
# ## One training example, as the model sees it
# The text the model reads, rendered with its chat template. The part in **⟦ ⟧** is supervised (its tokens carry
# loss); everything else is context only. It ends with the end-of-turn token, so the model learns to stop.

# %%
if not run.already_trained:
    print(training.example_view(run, 0))

# %% [markdown]
# ## Training
# In headless runs (papermill, `hb run`) one line is printed per `logging_steps`; a NaN/inf loss stops the run with
# a message, and running out of memory names the parameters to lower.
#
# On a CPU three defaults make each step cheaper without changing the recipe: `attn_implementation: auto` uses plain
# matmul attention for short bf16 training batches (PyTorch's fused CPU attention has a slow backward there; in fp32
# SDPA is faster), `fast_lora_dropout` draws the LoRA dropout masks 16 bits at a time (same `lora_dropout`, another
# random stream), and the frozen 4-bit weights are dequantized once, not in every step (same results, more memory;
# `HB_DEQUANT_CACHE=0` turns it off).
# `params/cpu_exp1_fast.yaml` also turns gradient checkpointing off and groups examples by length;
# `benchmarks/bench_train.py` measures each of these against the original method.
#
# With `num_processes > 1` (e.g. `hb run … -p num_processes 2 -p grad_accum 2`, effective batch kept at 8) the
# same training runs data-parallel in N processes started with `accelerate launch`: this cell streams rank 0's
# lines, a failing rank stops the run with its error here, and the results below are the same files
# (docs/distributed.md).

# %%
metrics = training.fit(run)  # adapter/ + metrics/train.json + metrics/log_history.json + plots/loss_curve.png

# %% [markdown]
# ## Loss curves
# Training loss every `logging_steps`, validation loss every `eval_steps`. The saved adapter is the checkpoint with
# the lowest validation loss when `load_best_model=True`.

# %%
from hb_utils import plots
from hb_utils.run_dir import RunPaths, read_json

run_paths = RunPaths.for_config(cfg)
plots.loss_curve(read_json(run_paths.metrics / "log_history.json"), run_paths.plot("loss_curve"));

# %% [markdown]
# ## Metrics

# %%
import pandas as pd

keys = ["global_step", "epochs", "n_train", "n_val", "final_train_loss", "best_val_loss", "best_val_step",
        "final_val_loss", "saved_model", "train_runtime_s", "train_samples_per_second", "tokens_per_second",
        "compute_dtype", "resumed_from"]
table = {k: metrics.get(k) for k in keys}
table["trainable parameters"] = f"{metrics['parameters']['trainable']:,} ({metrics['parameters']['trainable_pct']}%)"
table["peak memory (GB)"] = f"{metrics['peak_memory']['gb']} ({metrics['peak_memory']['kind']})"
display(pd.Series(table, name="value").to_frame())
print("adapter:", run_paths.adapter)
print("metrics:", run_paths.metrics / "train.json")

# %% [markdown]
# ## The saved adapter, reloaded
# A fresh base model with the adapter loaded from `adapter/` answers two validation questions (greedy,
# `eval_max_new_tokens`): the files on disk are a complete adapter of this config. `stopped` says whether the
# model ended its turn by itself.

# %%
for row in training.reload_check(cfg):
    print(f"Q: {row['question']}\nA: {row['answer']}\n({row['new_tokens']} tokens, stopped: {row['stopped']})\n")

# %% [markdown]
# **Next:** `04_evaluate` compares base and fine-tuned answers on held-out test questions.
