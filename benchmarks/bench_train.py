"""Training speed: the project's SFT pipeline against the original notebook's method, in one run.

    python benchmarks/bench_train.py                      # Experiment 1's settings, one round: about 3 minutes
    python benchmarks/bench_train.py --repeats 3          # what the README quotes: medians of 3 interleaved rounds
    python benchmarks/bench_train.py --examples 64 --steps 8 --max-length 256 --threads 1

Same model (SmolLM2-135M-Instruct, 4-bit NF4 + the same LoRA config), same MedQuAD training examples
(from the split of ``--params``, by default params/cpu_exp1.yaml: Experiment 1's data filters, max_length
512 and hyperparameters), same number of optimizer steps and effective batch, same optimizer, schedule and
compute dtype, on both cores. Variants:

* ``original``      the original notebook's method: the full chat text tokenized per example, pad = eos,
                    transformers' ``DataCollatorForLanguageModeling(mlm=False)`` (which masks every pad-id
                    token, so every end-of-turn token, out of the loss), full-sequence loss, gradient
                    checkpointing on, plain ``transformers.Trainer``, transformers' default attention (SDPA),
                    PEFT's ``nn.Dropout``, bitsandbytes' own 4-bit path (dequantize in every call).
* ``project``       hb_utils.train.training as configured for Experiment 1 (TRL SFTTrainer, prompt/completion,
                    loss on the answer + end-of-turn only, gradient checkpointing on, no length grouping,
                    whatever ``--params`` says about these two) with the project's
                    default kernels: ``attn_implementation: auto`` (hb_utils.model.attention),
                    ``fast_lora_dropout`` (hb_utils.model.lora_dropout) and the kept dequantized 4-bit weights
                    (hb_utils.model.dequantized_weights; ``HB_DEQUANT_CACHE=0`` turns them off).
* ``project_fast``  the same with the two settings that pay on CPU: ``gradient_checkpointing=False`` (the
                    model is small, activations fit) and ``group_by_length=True`` (less padding) -- what
                    ``params/cpu_exp1_fast.yaml`` runs.

Lever checks (``--variants``): ``project_fast_sdpa`` / ``project_fast_eager`` (another attention kernel),
``project_fast_torch_dropout`` (PEFT's ``nn.Dropout``), ``project_fast_trl_loss`` (TRL's own loss).

Each variant runs in its own subprocess (so its peak RSS is its own) with ``--threads`` torch threads. Speed
is measured over the optimizer steps only (model loading, final save excluded). This machine is noisy (the
same variant varies by 10-15 % between runs), so ``--repeats`` runs all variants in interleaved rounds and
the report gives each round's ratio and the median. Quality: the token-weighted loss of the *answer +
end-of-turn tokens* of the same validation examples, computed the same way for every variant after
training (a variant's own training loss is not comparable: the original's covers the prompt).

Not used: padding-free batches. transformers 5 would keep example boundaries (it builds a block-diagonal
mask from packed ``position_ids`` for SDPA and eager attention too), but TRL allows ``padding_free`` without
packing only when ``max_length`` is unset, and packing changes how many examples make a step. Tried and
dropped: a larger per-device batch at the same effective batch (8 x 1: slower, 5.4 GB; 4 x 2: +3%),
running the system turn shared by a micro-batch once (see hb_utils.train.sft_trainer), ``torch_compile``
(compiling had not finished 4 steps after 8 minutes), and eager attention for every call (+7 % at
max_length 256 without checkpointing, equal at 512, 4 % slower with checkpointing: what led to ``auto``).
Measured and left: glibc's allocator (a step spends about 7 % in the kernel on page faults of fresh
activation buffers; raising ``M_MMAP_THRESHOLD`` / ``M_TRIM_THRESHOLD`` did not lower them), a row-chunked
loss that never materializes the fp32 logits (90 ms of a 2.4 s micro-batch: 2-3 %), SDPA's causal fast path
for right-padded batches (5-15 % of the attention backward, 1-2 % of a step).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("original", "project", "project_fast")
# lever checks: TRL's own fused-head loss instead of ours; PEFT's nn.Dropout instead of hb_utils.model.lora_dropout;
# SDPA or eager attention instead of auto (hb_utils.model.attention)
EXTRA_VARIANTS = ("project_fast_trl_loss", "project_fast_torch_dropout", "project_fast_sdpa", "project_fast_eager",
                  "project_fast_sdpa_torch_dropout", "project_fast_eager_torch_dropout")  # before both kernels


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=32, help="training examples (the pool the steps draw from)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per variant")
    p.add_argument("--max-length", type=int, help="max tokens per example (default: the params file's, 512)")
    p.add_argument("--batch-size", type=int, default=2, help="per-device batch size (Experiment 1: 2)")
    p.add_argument("--grad-accum", type=int, default=4, help="gradient accumulation (Experiment 1: 4)")
    p.add_argument("--val-examples", type=int, default=16, help="validation examples for the answer loss")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads per variant (2: both cores here; use 1 while anything else runs, or "
                        "two OpenMP threads thrash)")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of all variants (interleaved); the report quotes medians and per-round ratios")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    p.add_argument("--params", default=str(ROOT / "params" / "cpu_exp1.yaml"),
                   help="base parameter file (model, data filters, hyperparameters)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one variant
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def base_config(args: argparse.Namespace, workdir: Path):
    from hb_utils.config import load_config

    lengths = {} if args.max_length is None else {"max_length": args.max_length}
    return load_config(args.params, output_root=str(workdir / "runs"), experiment="bench_train",
                       max_steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       logging_steps=1, save_steps=10**6, eval_steps=10**6,
                       sample_size=max(60, math.ceil(max(args.examples / 0.75, args.val_examples / 0.08))), **lengths)


def variant_config(cfg, name: str):
    """The config variant ``name`` trains with, whatever ``--params`` says about these levers."""
    if name in ("original", "project"):  # Experiment 1's values (the original's recipe is in run_original)
        cfg = cfg.replace(gradient_checkpointing=True, group_by_length=False)
    elif name.startswith("project_fast"):
        cfg = cfg.replace(gradient_checkpointing=False, group_by_length=True)
    else:
        raise ValueError(f"unknown variant {name!r}")
    if "_torch_dropout" in name:
        cfg = cfg.replace(fast_lora_dropout=False)
    for kernel in ("sdpa", "eager"):
        if f"_{kernel}" in name:
            cfg = cfg.replace(attn_implementation=kernel)
    return cfg


# --------------------------------------------------------------------------- measurement helpers (child)
def make_clock():
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        """Wall time and real (non-pad) tokens over the optimizer steps only."""

        t0 = t1 = None
        tokens = 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                self.t1 = time.perf_counter()
                self.tokens = state.num_input_tokens_seen

    return Clock()


def answer_loss(model, tokenizer, records: list[dict], max_length: int, dtype) -> float:
    """Token-weighted NLL of the answer + end-of-turn tokens given the prompt (the same for every variant)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    for rec in records:
        full = tokenizer.apply_chat_template(rec["messages"], tokenize=False)
        prompt = tokenizer.apply_chat_template(rec["messages"][:-1], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_length]
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        labels = [-100] * min(n_prompt, len(ids)) + ids[n_prompt:]
        n = sum(1 for t in labels[1:] if t != -100)
        if n == 0:
            continue
        with torch.no_grad(), autocast:
            out = model(input_ids=torch.tensor([ids], device=device), labels=torch.tensor([labels], device=device))
        total += float(out.loss) * n
        count += n
    if count == 0:
        raise SystemExit(f"no validation answer token fits in --max-length {max_length}: raise --max-length")
    return total / count


def run_original(cfg, train: list[dict], workdir: Path, clock, dtype):
    """The original notebook's recipe on the same model, LoRA config and optimizer settings."""
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from hb_utils.model import loading
    from hb_utils.model.source import load_tokenizer

    cfg = cfg.replace(attn_implementation="sdpa")  # transformers' default attention, as the original had
    os.environ["HB_DEQUANT_CACHE"] = "0"  # bitsandbytes' own 4-bit path: the kept weights are a project lever
    tokenizer = load_tokenizer(cfg.model_name)
    tokenizer.pad_token = tokenizer.eos_token  # as the original: pad = eos (end-of-turn)
    texts = [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in train]
    dataset = Dataset.from_dict({"text": texts}).map(
        # the rendered text already holds the BOS where the tokenizer uses one (hb_utils.model.tokenizer): no second one
        lambda ex: tokenizer(ex["text"], truncation=True, max_length=cfg.max_length, add_special_tokens=False),
        remove_columns=["text"])
    model = loading.load_base_model(cfg, for_training=True)
    model = get_peft_model(model, loading.lora_config(cfg))
    model.enable_input_require_grads()  # needed with gradient checkpointing on a frozen, quantized base
    args = TrainingArguments(
        output_dir=str(workdir / "original"), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, max_steps=cfg.max_steps, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler, warmup_steps=min(cfg.warmup_ratio, 0.999999),
        weight_decay=cfg.weight_decay, optim=cfg.optim, max_grad_norm=cfg.max_grad_norm,
        activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": False},
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, use_cpu=not torch.cuda.is_available(),
        logging_steps=1, save_strategy="no", report_to="none", seed=cfg.seed, disable_tqdm=True,
        include_num_input_tokens_seen="non_padding")
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False), callbacks=[clock])
    trainer.train()
    return trainer.model, tokenizer, trainer.state.log_history


def run_project(cfg, train: list[dict], workdir: Path, clock, name: str):
    """hb_utils.train.trl_setup.build_trainer (what training.prepare trains), without the run directory."""
    from trl import SFTTrainer

    from hb_utils.model.source import load_tokenizer
    from hb_utils.train import trl_setup
    from hb_utils.train.sft_trainer import SupervisedLogitsSFTTrainer

    tokenizer = load_tokenizer(cfg.model_name)
    args = trl_setup.build_sft_config(cfg, output_dir=workdir / name, has_eval=False)
    args.disable_tqdm = True
    trainer_class = SFTTrainer if name.endswith("trl_loss") else SupervisedLogitsSFTTrainer
    trainer = trl_setup.build_trainer(cfg, args, tokenizer, trl_setup.to_prompt_completion(train), callbacks=[clock],
                                     trainer_class=trainer_class)
    trainer.train()
    return trainer.model, tokenizer, trainer.state.log_history


def child(args: argparse.Namespace) -> None:
    import bench_machine as machine
    import torch

    from hb_utils.model import device

    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    split = json.loads((workdir / "split.json").read_text())
    cfg = variant_config(base_config(args, workdir), args.child)
    dtype = device.resolve_compute_dtype(cfg.compute_dtype)
    clock = make_clock()
    if args.child == "original":
        model, tokenizer, history = run_original(cfg, split["train"], workdir, clock, dtype)
    else:
        model, tokenizer, history = run_project(cfg, split["train"], workdir, clock, args.child)
    seconds = clock.t1 - clock.t0
    n_examples = args.steps * args.batch_size * args.grad_accum
    result = {
        "variant": args.child, "seconds": round(seconds, 2), "examples": n_examples,
        "examples_per_s": round(n_examples / seconds, 3), "real_tokens": clock.tokens,
        "real_tokens_per_s": round(clock.tokens / seconds, 1),
        "last_train_loss": [h["loss"] for h in history if "loss" in h][-1],
        "val_answer_loss": round(answer_loss(model, tokenizer, split["val"], cfg.max_length, dtype), 4),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "gradient_checkpointing": cfg.gradient_checkpointing, "max_length": cfg.max_length,
        "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads(),
        "matmul_params": machine.matmul_params(model),
    }
    # executed matmul FLOPs (benchmarks/bench_machine.py): forward + input gradients, + a recomputed forward
    per_token = (6 if cfg.gradient_checkpointing else 4) * result["matmul_params"]
    result["gflops_per_s"] = round(per_token * clock.tokens / seconds / 1e9, 1)
    (workdir / f"{args.child}.json").write_text(json.dumps(result))


# --------------------------------------------------------------------------- parent
def prepare_split(args: argparse.Namespace, workdir: Path) -> dict:
    from hb_utils.data import medquad

    splits = medquad.ensure_splits(base_config(args, workdir))
    if len(splits["train"]) < args.examples:
        raise SystemExit(f"only {len(splits['train'])} training examples available; lower --examples")
    split = {"train": splits["train"][: args.examples], "val": splits["val"][: args.val_examples]}
    (workdir / "split.json").write_text(json.dumps(split))
    return split


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.child:
        child(args)
        return {}
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS) - set(EXTRA_VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {VARIANTS + EXTRA_VARIANTS}")
    command = "python benchmarks/bench_train.py " + " ".join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        workdir = Path(tmp)
        args.max_length = base_config(args, workdir).max_length  # the params file's when not given
        split = prepare_split(args, workdir)
        print(f"{len(split['train'])} training examples, {len(split['val'])} validation examples, "
              f"{args.steps} steps x batch {args.batch_size} x accumulation {args.grad_accum}, "
              f"max_length {args.max_length}, {args.threads} thread(s); load average {os.getloadavg()[0]:.1f}",
              flush=True)
        passthrough = [f"--examples={args.examples}", f"--steps={args.steps}", f"--max-length={args.max_length}",
                       f"--batch-size={args.batch_size}", f"--grad-accum={args.grad_accum}",
                       f"--val-examples={args.val_examples}", f"--threads={args.threads}", f"--params={args.params}"]
        import bench_machine as machine

        print(machine.cpu_line(), flush=True)
        rates = machine.machine_rates(args.threads)
        print("GEMM rate measured now, " + ", ".join(f"{k} {v} GFLOP/s" for k, v in rates.items())
              + f" ({args.threads} thread(s))", flush=True)
        env = {**os.environ, "HB_HEADLESS": "1", "OMP_NUM_THREADS": str(args.threads),
               "PYTHONPATH": str(ROOT / "benchmarks") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        rounds = []
        for i in range(args.repeats):
            results = {}
            for name in variants:
                t = time.perf_counter()
                proc = subprocess.run([sys.executable, __file__, *passthrough, "--child", name, "--workdir", tmp],
                                      env=env, cwd=ROOT, capture_output=True, text=True)
                if proc.returncode:
                    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
                    raise SystemExit(f"variant {name} failed (exit {proc.returncode})")
                results[name] = json.loads((workdir / f"{name}.json").read_text())
                print(f"  round {i + 1}/{args.repeats} {name}: {results[name]['examples_per_s']} examples/s "
                      f"(done in {time.perf_counter() - t:.0f} s)", flush=True)
            rounds.append(results)
    results = {name: median_run([r[name] for r in rounds]) for name in variants}
    report(results, rounds, command, rates)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "cpu": machine.cpu_line(), "gemm_gflops": rates,
                                               "results": results, "rounds": rounds}, indent=2))
    return results


def median_run(runs: list[dict]) -> dict:
    """The run with the median examples/s (the lower middle one for an even count)."""
    return sorted(runs, key=lambda r: r["examples_per_s"])[(len(runs) - 1) // 2]


def report(results: dict, rounds: list[dict], command: str, rates: dict[str, float]) -> None:
    for r in results.values():  # the share of this machine's GEMM rate in the variant's compute dtype
        rate = rates.get("bf16" if r["dtype"] == "bfloat16" else "fp32", rates["fp32"])
        r["gemm_share"] = f"{r['gflops_per_s'] / rate:.0%}"
    cols = ["examples_per_s", "real_tokens_per_s", "seconds", "val_answer_loss", "last_train_loss", "peak_rss_gb",
            "gradient_checkpointing", "dtype", "gflops_per_s", "gemm_share"]
    print(f"\nmedian of {len(rounds)} round(s):")
    print("variant".ljust(27) + "".join(c.rjust(22) for c in cols))
    for name, r in results.items():
        print(name.ljust(27) + "".join(str(r[c]).rjust(22) for c in cols))
    if "original" in results:
        print()
        for name, r in results.items():
            if name == "original":
                continue
            ratios = sorted(rd[name]["examples_per_s"] / rd["original"]["examples_per_s"] for rd in rounds)
            speed = ratios[(len(ratios) - 1) // 2]
            tok = r["real_tokens_per_s"] / results["original"]["real_tokens_per_s"]
            base_loss = results["original"]["val_answer_loss"]
            loss = (r["val_answer_loss"] - base_loss) / base_loss
            ok = speed >= 2.0 and loss <= 0.05
            per_round = ", ".join(f"{x:.2f}" for x in ratios)
            print(f"{name} vs original: {speed:.2f}x examples/s (median of rounds: {per_round}), "
                  f"{tok:.2f}x real tokens/s (medians), val answer loss {loss:+.1%}  "
                  f"-> target (>=2x, loss within +5%): {'met' if ok else 'NOT met'}")
    print(f"\ncommand: {command}")


if __name__ == "__main__":
    main()
