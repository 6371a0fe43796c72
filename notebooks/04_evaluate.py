# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Evaluate: base vs fine-tuned on held-out test questions
#
# Does the adapter help, and by how much *more than noise*? We load the base model **once** with the adapter
# on top and answer the first `eval_size` test questions twice with the same greedy settings
# (`eval_max_new_tokens`): with the adapter, and with it switched off (`model.disable_adapter()`), so the only
# difference between the two systems is the adapter.
#
# What is measured, and why:
#
# * **ROUGE-1/2/L/Lsum** (`rouge-score`, stemming) and **corpus BLEU** (`sacrebleu`): overlap with the MedQuAD
#   reference answer. Only the *new* tokens are scored — never the prompt — and questions go through the model's
#   chat template exactly as in training.
# * **95% bootstrap intervals** over questions for every number, and a **paired** bootstrap of fine-tuned minus
#   base (the same resampled questions for both). With a few dozen questions, differences inside the interval are
#   not evidence.
# * **Perplexity** of the reference answers, token-weighted over the whole set (total NLL / total answer tokens;
#   the prompt is masked). The original notebook's variant (full text, mean of per-example losses) is shown next to
#   it, labelled, for comparison only.
# * **Behaviour**: does the answer stop by itself before the token limit, how long is it, does it advise seeing a
#   healthcare professional, is it empty or stuck in a loop.

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

cfg = begin(globals(), stage="04_evaluate")  # validates the parameters above (a typo fails here), shows this run vs Experiment 1

# %%
import pandas as pd
from IPython.display import display

from hb_utils.evaluate import evaluation
from hb_utils.run_dir import RunPaths

run = RunPaths.for_config(cfg)
result = evaluation.run_evaluation(cfg)  # writes metrics/eval.json and metrics/predictions.jsonl
print(evaluation.scored_note(result))
print("seconds:", result["seconds"])

# %% [markdown]
# ## Text overlap and behaviour, with 95% intervals
# ROUGE and the behaviour rates in percent, BLEU on its 0–100 scale, lengths in words/tokens. *difference* is
# fine-tuned − base from the paired bootstrap; *share of resamples not better* is the share of bootstrap
# resamples in which the fine-tuned model did not beat the base (a resampling share, not a p-value; fewer
# empty/looping answers count as better; lengths have no better direction). *Advises a professional* counts
# advice ("talk to your doctor", "seek medical attention"), not mentions ("doctors diagnose it with an MRI");
# *reference answers* gives how often the test set's own answers do so: the rate fine-tuning should approach.

# %%
evaluation.comparison_table(result)

# %%
evaluation.plot_comparison(result, run.plot("eval_comparison"));

# %% [markdown]
# ## Perplexity of the reference answers
# Lower is better. The first row is the number to use. The second reproduces the original notebook's method —
# each example's loss over its *full* text (prompt included), averaged over examples — which weights a short answer
# like a long one and rewards predicting the fixed system prompt.

# %%
evaluation.perplexity_table(result)

# %% [markdown]
# ## External sets: consumer questions nobody trained on
# The test split's questions share MedQuAD's agencies and templates with training. The sets of `external_eval`
# (docs/evaluation.md) hold questions people sent to the U.S. National Library of Medicine (TREC 2017 LiveQA-Med,
# asked with the NLM summary and with the consumer's own message, per `liveqa_questions`) and MedLFQA's LiveQA and
# MedicationQA questions. Each set gets the measures above for its first `external_size` questions, base vs
# fine-tuned with paired intervals; an answer is scored against the reference answer it matches best.
#
# **Leakage**: the scored questions are compared with this run's train and validation pairs (same or near-duplicate
# question or answer, or answers sharing half their 5-grams): 0 for a run whose 02 dropped the pairs it found.
#
# **Statements** (MedLFQA): a judge model (`judge_model`) answers, for each answer and each must-have or nice-to-have
# statement, whether the answer states or clearly implies it (a fixed rubric, greedy, strict yes/no parsing: any
# other reply is *not judged* and counted). A question's score is the share of its judged statements met. The judge
# is measured on a labelled set of statements (tests/data/judge_labels.jsonl, half met, half not): its accuracy
# stands next to every judged score, and under 80 % the scores are marked UNRELIABLE.

# %%
from IPython.display import Markdown

from hb_utils.evaluate import external

for name, block in result.get("external", {}).items():
    display(Markdown(external.section_markdown(name, block)))
    display(evaluation.comparison_table(block))
    if (statements := external.statement_table(block)) is not None:
        display(statements)
if result.get("judge"):
    display(Markdown("### The judge, measured on the labelled set"))
    display(external.judge_table(result["judge"]))
if not result.get("external"):
    print("external_eval is empty: no external set was scored.")

# %% [markdown]
# ## Best and worst answers by ROUGE-L
# ROUGE-L rewards wording, not correctness: read the texts. Ranked by the fine-tuned model's ROUGE-L.

# %%
preds = evaluation.load_predictions(cfg)
with pd.option_context("display.max_colwidth", 400):
    display(evaluation.extreme_examples(preds, k=2, best=True))
    display(evaluation.extreme_examples(preds, k=2, best=False))

# %% [markdown]
# ## Implementations and provenance
# Every number above comes from these libraries and settings.

# %%
print("config fingerprints:", result["stamp"]["fingerprints"])
print("adapter:", result["adapter_meta"])
for name, impl in result["implementations"].items():
    print(f"{name:10s} {impl}")
print("files:", run.metrics / "eval.json", run.metrics / "predictions.jsonl")

# %% [markdown]
# **Next:** `05_qualitative` reads answers to hand-picked prompts, in-domain and out-of-domain.
