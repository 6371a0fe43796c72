# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · Qualitative: what do the answers look like?
#
# Numbers hide the texture of the answers. Here base and fine-tuned model (the same loaded weights, adapter on and
# off) answer six standard prompts — four health questions and two **out-of-domain** requests a medical assistant
# should decline or redirect — plus any extra `prompts` of the config.
#
# Answers are **sampled** (`qual_temperature`, `qual_top_p`, `qual_repetition_penalty`, `qual_max_new_tokens`)
# with the fixed seed `qual_seed`, so rerunning this notebook gives the same text.
#
# Each answer gets simple, documented flags (heuristics, to guide reading — not a grade):
#
# * **stopped** — ended by itself (end of turn) before the token limit;
# * **disclaimer** — advises seeing a professional: an imperative or recommendation (see / talk to / ask /
#   contact / seek …, "should see", "is recommended") whose object is a doctor, nurse, pharmacist, specialist,
#   health care provider …, or to seek medical help (`hb_utils.evaluate.metrics.ADVICE_PATTERNS`); a mere mention
#   ("Doctors diagnose it with an MRI") does not count;
# * **on topic** (in-domain) — mentions a content word of the prompt (first five letters, stop words ignored);
# * **declined** (out-of-domain) — refuses or redirects ("I'm sorry", "I can't", "outside my scope",
#   "I only answer health questions" …);
# * **EMPTY/LOOP** — no text, or a repetition loop (`hb_utils.evaluate.metrics.is_looping`).

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
# --- eval: evaluation (04, 05) ---
eval_size: "Union[int, str]" = 20  # Test questions to generate answers for (an int, or 'all').
eval_max_new_tokens: int = 150  # New-token limit of evaluation answers (greedy).
ppl_size: "Union[int, str]" = 50  # Test texts for perplexity (an int, or 'all').
gen_batch_size: int = 32  # Batch size of evaluation generation (left-padded, greedy).
ppl_batch_size: int = 8  # Batch size of the perplexity passes.
bootstrap_samples: int = 1000  # Bootstrap resamples for confidence intervals.
external_size: "Union[int, str]" = 100  # Questions of each external set to answer (an int, or 'all').
liveqa_questions: list[str] = ['summary', 'message']  # LiveQA question text asked, one set each: summary (NLM), paraphrase (NIST), message (the consumer's own).
judge_model: str = 'Qwen/Qwen2.5-7B-Instruct'  # Model judging the MedLFQA statements (Hub id, local dir or smollm2-135m-instruct); empty: none.
judge_batch_size: int = 16  # Batch size of the judge's calls.
prompts: list[str] = []  # Extra prompts for 05_qualitative, besides the six standard ones.
qual_temperature: float = 0.3  # Sampling temperature of qualitative answers.
qual_top_p: float = 0.9  # Nucleus sampling top_p.
qual_repetition_penalty: float = 1.15  # Repetition penalty.
qual_max_new_tokens: int = 256  # New-token limit of qualitative answers.
qual_seed: int = 42  # Sampling seed, so a rerun gives the same text.

# %% tags=["hide-input"]
from hb_utils.runs.notebook import begin

cfg = begin(globals(), stage="05_qualitative")  # validates the parameters above (a typo fails here), shows this run vs Experiment 1

# %%
from IPython.display import Markdown, display

from hb_utils.evaluate import qualitative

rows = qualitative.run_qualitative(cfg)  # writes metrics/qualitative.jsonl and metrics/qualitative.md
print("sampling:", rows[0]["sampling"])

# %% [markdown]
# ## Side by side

# %%
display(Markdown(qualitative.qualitative_markdown(rows)))

# %% [markdown]
# ## Flags per prompt kind
# Share of answers with each flag (1.0 = all).

# %%
qualitative.flag_rates(rows)

# %% [markdown]
# **Reading guide.** A fine-tuned model that answers "What is the capital of France?" fluently has learnt style, not
# scope; one that loops or never stops needs more steps or a lower learning rate. Keyword flags can be fooled in both
# directions — read the answers.

# %% [markdown]
# ## Talk to it
# Run interactively, the cell below opens the chat app of this run right here (streaming answers, a Fine-tuned /
# Base switch, the sampling settings above). In a headless run (`hb run`, papermill) it only prints the command
# that starts the same app in a browser: `hb chat outputs/<experiment>`.

# %%
from hb_utils import chat

chat_app = chat.show_in_notebook(cfg)
