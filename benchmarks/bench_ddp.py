"""Data-parallel training on a CPU: 2 processes x 1 thread against 1 process x 2 threads, in one run.

    python benchmarks/bench_ddp.py                                  # Experiment 1's settings, 64 examples, 4 steps
    python benchmarks/bench_ddp.py --examples 16 --steps 1 --max-length 128   # a quick check that it works

Both variants run stage 03 as the notebook does (hb_utils.train.training.prepare + fit; the 2-process one through
``accelerate launch`` and gloo) on the same MedQuAD training examples from ``--params`` (default
params/cpu_exp1.yaml: 4-bit NF4 QLoRA, max_length 512, Experiment 1's hyperparameters) with the same
effective batch of 8: 1 process uses batch 2 x grad_accum 4, 2 processes batch 2 x grad_accum 2 each. The
question: do two single-threaded ranks beat one two-threaded process on two cores? Examples/s is the
optimizer steps' examples over the Trainer's ``train_runtime`` (model loading excluded). Each variant runs
in its own subprocess, on an otherwise idle machine only: other load skews the two variants differently.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hb_utils import device  # noqa: E402
from hb_utils.config import load_config  # noqa: E402

VARIANTS = {"1proc_x_2threads": (1, 2), "2procs_x_1thread": (2, 1)}  # name: (processes, threads per process)

CHILD = """
import json, sys
from hb_utils.train import training
from hb_utils.config import ExperimentConfig
cfg = ExperimentConfig(**json.loads(sys.argv[1]))
print("RESULT " + json.dumps(training.train(cfg), default=str), flush=True)
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", default=str(ROOT / "params" / "cpu_exp1.yaml"))
    p.add_argument("--examples", type=int, default=64, help="MedQuAD pairs sampled (80%% train)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per variant")
    p.add_argument("--max-length", type=int, help="max tokens per example (default: the params file's)")
    p.add_argument("--effective-batch", type=int, default=8, help="examples per optimizer step (Experiment 1: 8)")
    p.add_argument("--out", help="output root (default: a temporary folder)")
    return p.parse_args(argv)


def variant_config(base, processes: int, effective_batch: int, out: str, name: str):
    """The same recipe for either variant: only num_processes and grad_accum differ (same effective batch)."""
    per_step = base.batch_size * processes
    if effective_batch % per_step:
        raise SystemExit(f"--effective-batch {effective_batch} is not a multiple of "
                         f"batch_size x processes ({per_step})")
    return base.replace(num_processes=processes, grad_accum=effective_batch // per_step, output_root=out,
                        experiment=f"bench_ddp_{name}")


def run_variant(cfg, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HB_HEADLESS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if cfg.num_processes > 1:
        env["HB_ALLOW_CPU_OVERSUBSCRIBE"] = os.environ.get("HB_ALLOW_CPU_OVERSUBSCRIBE", "0")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg.to_dict())], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"variant with {cfg.num_processes} processes failed:\n"
                         f"{proc.stderr[-3000:]}\n{proc.stdout[-2000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    metrics = json.loads(line[len("RESULT "):])
    examples = metrics["global_step"] * metrics["effective_batch_size"]
    return {"processes": cfg.num_processes, "threads_per_process": threads, "grad_accum": cfg.grad_accum,
            "effective_batch": metrics["effective_batch_size"], "steps": metrics["global_step"],
            "train_runtime_s": round(metrics["train_runtime_s"], 1),
            "examples_per_s": round(examples / metrics["train_runtime_s"], 3),
            "tokens_per_s": metrics["tokens_per_second"], "final_train_loss": metrics["final_train_loss"],
            "wall_s_with_loading": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    overrides = {"sample_size": args.examples, "max_steps": args.steps, "logging_steps": 1,
                 "eval_steps": args.steps, "save_steps": args.steps, "load_best_model": False}
    if args.max_length:
        overrides["max_length"] = args.max_length
    base = load_config(args.params, **overrides)
    out = args.out or tempfile.mkdtemp(prefix="bench_ddp_")
    cpu = device.cpu_info()
    print(f"CPU: {cpu['model']} ({cpu['cores']} cores, class {cpu['class']}); params {args.params}, "
          f"{args.examples} pairs, {args.steps} steps, max_length {base.max_length}, effective batch "
          f"{args.effective_batch}", flush=True)
    results = {}
    for name, (processes, threads) in VARIANTS.items():
        results[name] = run_variant(variant_config(base, processes, args.effective_batch, out, name), threads)
        print(f"{name:18s} {json.dumps(results[name])}", flush=True)
    one, two = results["1proc_x_2threads"], results["2procs_x_1thread"]
    print(f"2 processes x 1 thread / 1 process x 2 threads: {two['examples_per_s'] / one['examples_per_s']:.2f}x "
          "examples/s", flush=True)
    return {"cpu": cpu, "results": results}


if __name__ == "__main__":
    main()
