"""Training-loop guards and logging: a NaN/inf stop, one compact line per log event, out-of-memory advice.

Why: a diverged run should stop at once with what to change, not train on for hours; a headless report
should hold one readable line per ``logging_steps`` (the Trainer's tqdm bar would store every redraw);
and an out-of-memory error should name the parameters that lower memory.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from typing import Any

import torch
from transformers import TrainerCallback

from hb_utils.config import ExperimentConfig
from hb_utils.errors import RunError


class NanGuardCallback(TrainerCallback):
    """Stop the run with a RunError as soon as a logged loss or gradient norm is NaN/inf."""

    KEYS = ("loss", "eval_loss", "grad_norm")

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        for key in self.KEYS:
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise RunError(
                    f"Training diverged: {key} = {value} at step {state.global_step}. Lower learning_rate "
                    f"(now {args.learning_rate:g}), keep max_grad_norm small (now {args.max_grad_norm:g}), or use "
                    "compute_dtype='bf16'/'fp32' instead of fp16. Checkpoints before this step stay in checkpoints/; "
                    "rerun with resume='never' after changing the config.")


class CompactLogCallback(TrainerCallback):
    """One short line per log event, for headless runs (the Trainer's tqdm bar is disabled there)."""

    def __init__(self) -> None:
        self.t0 = time.time()
        self.step0 = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.t0, self.step0 = time.time(), state.global_step
        if not getattr(state, "is_world_process_zero", True):  # multi-process runs: rank 0 speaks for all
            return
        where = f" (resumed at step {state.global_step})" if state.global_step else ""
        print(f"[train] {state.max_steps} optimizer steps{where}", flush=True)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if not getattr(state, "is_world_process_zero", True):
            return
        logs = logs or {}
        step = f"step {state.global_step}/{state.max_steps}"
        if "loss" in logs:
            done = state.global_step - self.step0
            per = (time.time() - self.t0) / done if done else float("nan")
            eta = per * (state.max_steps - state.global_step)
            print(f"[train] {step} | loss {logs['loss']:.4f} | lr {logs.get('learning_rate', 0):.2e} | "
                  f"{per:.2f} s/step | eta {_fmt_seconds(eta)}", flush=True)
        elif "eval_loss" in logs:
            print(f"[eval]  {step} | val loss {logs['eval_loss']:.4f}", flush=True)
        elif "train_runtime" in logs:
            print(f"[train] done in {_fmt_seconds(logs['train_runtime'])}, mean loss {logs.get('train_loss', 0):.4f}",
                  flush=True)


def _fmt_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@contextlib.contextmanager
def oom_guard(cfg: ExperimentConfig) -> Iterator[None]:
    """Turn CUDA/CPU out-of-memory errors into a RunError that names the parameters to lower."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
        text = str(exc).lower()
        if not isinstance(exc, (torch.OutOfMemoryError, MemoryError)) and not (
                "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text):
            raise
        tips = [f"batch_size (now {cfg.batch_size}; raise grad_accum, now {cfg.grad_accum}, to keep the effective "
                "batch)", f"max_length (now {cfg.max_length})", f"eval_batch_size (now {cfg.eval_batch_size})"]
        if not cfg.gradient_checkpointing:
            tips.insert(0, "set gradient_checkpointing=True")
        if not cfg.load_in_4bit:
            tips.append("set load_in_4bit=True")
        raise RunError(f"Out of memory while training ({type(exc).__name__}). Lower: " + "; ".join(tips)
                       + ". Checkpoints written so far are resumed on the next run.") from exc
