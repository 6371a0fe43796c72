"""Author notebooks/03_train_qlora.ipynb (run: python scripts/make_nb_03.py)."""

from nbtools import NOTEBOOKS, standard_head, write_notebook

CELLS = standard_head("""\
# 03 · Train: QLoRA fine-tuning with TRL's SFTTrainer

The base model is loaded in **4-bit NF4** (`load_in_4bit`) and only small **LoRA** matrices (`lora_r`,
`lora_alpha`, `lora_target_modules`) are trained — the same code path on a GPU and on a CPU.

Each training example is a conversation: the **prompt** is the system message plus the question, the
**completion** is the reference answer. The model's own chat template renders it, and with
`completion_only_loss=True` (default) only the answer **and its end-of-turn token** carry loss, so the model
learns *what* to answer and *when to stop*. The original notebook padded with the end-of-sequence token, which
masked every end-of-turn token out of the loss, and trained on the system prompt and the question as well;
`completion_only_loss=False` restores its full-text loss for comparison.

Checkpoints go to `checkpoints/` every `save_steps`; if the kernel dies, rerunning this notebook with the same
parameters **continues from the newest checkpoint** (`resume="auto"`). The split is rebuilt here when
02_format_split has not run.""") + [
    ("md", "## Data, model and trainable parameters"),
    ("code", """\
from IPython.display import display

from hb_utils import training

run = training.prepare(cfg)  # split (rebuilt if missing), tokenizer, 4-bit model + LoRA, SFTTrainer
print(training.describe(run))"""),
    ("md", """\
## One training example, as the model sees it
The text the model reads, rendered with its chat template. The part in **⟦ ⟧** is supervised (its tokens carry
loss); everything else is context only. It ends with the end-of-turn token, so the model learns to stop."""),
    ("code", """\
if not run.already_trained:
    print(training.example_view(run, 0))"""),
    ("md", """\
## Training
In headless runs (papermill, `hb run`) one line is printed per `logging_steps`; a NaN/inf loss stops the run with
a message, and running out of memory names the parameters to lower.

On a CPU two defaults make each step cheaper without changing the recipe: `attn_implementation: auto` uses plain
matmul attention for short training batches (PyTorch's fused CPU attention has a slow backward there) and
`fast_lora_dropout` draws the LoRA dropout masks 16 bits at a time (same `lora_dropout`, another random stream).
`params/cpu_exp1_fast.yaml` also turns gradient checkpointing off and groups examples by length;
`benchmarks/bench_train.py` measures each of these against the original method."""),
    ("code", """\
metrics = training.fit(run)  # adapter/ + metrics/train.json + metrics/log_history.json + plots/loss_curve.png"""),
    ("md", """\
## Loss curves
Training loss every `logging_steps`, validation loss every `eval_steps`. The saved adapter is the checkpoint with
the lowest validation loss when `load_best_model=True`."""),
    ("code", """\
from hb_utils.paths import RunPaths, read_json

paths = RunPaths.for_config(cfg)
training.plot_loss_curve(read_json(paths.metrics / "log_history.json"), paths.plot("loss_curve"));"""),
    ("md", "## Metrics"),
    ("code", """\
import pandas as pd

keys = ["global_step", "epochs", "n_train", "n_val", "final_train_loss", "best_val_loss", "best_val_step",
        "final_val_loss", "saved_model", "train_runtime_s", "train_samples_per_second", "tokens_per_second",
        "compute_dtype", "resumed_from"]
table = {k: metrics.get(k) for k in keys}
table["trainable parameters"] = f"{metrics['parameters']['trainable']:,} ({metrics['parameters']['trainable_pct']}%)"
table["peak memory (GB)"] = f"{metrics['peak_memory']['gb']} ({metrics['peak_memory']['kind']})"
display(pd.Series(table, name="value").to_frame())
print("adapter:", paths.adapter)
print("metrics:", paths.metrics / "train.json")"""),
    ("md", """\
## The saved adapter, reloaded
A fresh base model with the adapter loaded from `adapter/` answers two validation questions (greedy,
`eval_max_new_tokens`): the files on disk are a complete adapter of this config. `stopped` says whether the
model ended its turn by itself."""),
    ("code", """\
for row in training.reload_check(cfg):
    print(f"Q: {row['question']}\\nA: {row['answer']}\\n({row['new_tokens']} tokens, stopped: {row['stopped']})\\n")"""),
    ("md", "**Next:** `04_evaluate` compares base and fine-tuned answers on held-out test questions."),
]

if __name__ == "__main__":
    write_notebook(NOTEBOOKS / "03_train_qlora.ipynb", CELLS)
    print("wrote 03_train_qlora.ipynb")
