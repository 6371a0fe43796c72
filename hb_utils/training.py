"""Stage 03: QLoRA supervised fine-tuning with TRL's SFTTrainer, driven by one config.

Why this module exists: the original notebook rendered each pair to one string, set pad = eos and
trained with ``DataCollatorForLanguageModeling``. That collator masks every pad-id token in the
labels, so with pad = eos the end-of-turn token was never supervised (the model never learned to
stop), and the loss covered the system prompt and the question too. Here every example is a
conversational prompt/completion record (prompt = [system, user], completion = [assistant]) that
TRL renders with the model's own chat template; with ``completion_only_loss`` (the default) only
the answer and its end-of-turn token carry loss. ``completion_only_loss=False`` keeps the original
full-sequence loss (the end-of-turn token stays supervised either way).

Everything a run needs is here so the notebook stays a thin story and tests reach every line:
the SFTConfig built from the config, a NaN/inf guard, compact headless logging, resume from this
config's newest checkpoint, an out-of-memory message that names what to lower, a refusal to
overwrite an adapter of another config, and the metrics/plots written to ``outputs/<experiment>/``.
"""

from __future__ import annotations

import contextlib
import math
import re
import resource
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from datasets import Dataset
from transformers import PrinterCallback, TrainerCallback
from transformers.integrations import is_tensorboard_available
from trl import SFTConfig, SFTTrainer

from hb_utils import data, lora_dropout, modeling, paths
from hb_utils.config import ExperimentConfig
from hb_utils.errors import ConfigError, DataError, RunError
from hb_utils.progress import is_headless
from hb_utils.sft_trainer import SupervisedLogitsSFTTrainer
from hb_utils.tokenizer import load_tokenizer

CHECKPOINT_META = "hb_meta.json"  # in RunPaths.checkpoints: which train fingerprint made the checkpoints
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
SAVE_TOTAL_LIMIT = 2  # newest checkpoints kept (plus the best one when load_best_model); bounds disk use


# --------------------------------------------------------------------------- data
def to_prompt_completion(records: Sequence[dict[str, Any]]) -> Dataset:
    """Chat records (hb_utils.data) -> a conversational prompt/completion dataset for TRL.

    prompt = every message before the last (system + user), completion = [the assistant answer].
    TRL renders ``prompt + completion`` with the tokenizer's chat template and marks the tokens
    after the rendered prompt (with its generation prompt) as the completion.
    """
    rows = []
    for i, rec in enumerate(records):
        messages = rec.get("messages") if isinstance(rec, dict) else None
        if not messages or len(messages) < 2 or messages[-1].get("role") != "assistant":
            raise DataError(f"Record {i} ({rec.get('id', '?') if isinstance(rec, dict) else rec!r}) has no chat "
                            "messages ending with an assistant answer. Rebuild the splits with 02_format_split "
                            "(hb_utils.data.prepare_splits).")
        rows.append({"prompt": [dict(m) for m in messages[:-1]], "completion": [dict(messages[-1])]})
    if not rows:
        raise DataError("No training records: the split is empty. Raise sample_size or train_frac.")
    return Dataset.from_list(rows)


def supervised_text(tokenizer: Any, input_ids: Sequence[int] | torch.Tensor,
                    labels: Sequence[int] | torch.Tensor) -> str:
    """The decoded tokens that carry loss (labels != -100), in order."""
    ids = [int(t) for t, lab in zip(_as_list(input_ids), _as_list(labels), strict=True) if int(lab) != -100]
    return tokenizer.decode(ids, skip_special_tokens=False)


def mark_supervised(tokenizer: Any, input_ids: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor,
                    attention_mask: Sequence[int] | torch.Tensor | None = None, *,
                    start: str = "⟦", end: str = "⟧") -> str:
    """The example as the model sees it, with every supervised span wrapped in ``start``/``end``.

    Padding (attention_mask == 0) is left out. Spans are decoded separately, so the marks sit
    exactly on the token boundary where the loss starts and stops.
    """
    ids, labs = _as_list(input_ids), _as_list(labels)
    mask = _as_list(attention_mask) if attention_mask is not None else [1] * len(ids)
    pieces: list[str] = []
    span: list[int] = []
    span_supervised: bool | None = None
    for tok, lab, keep in zip(ids, labs, mask, strict=True):
        if not int(keep):
            continue
        sup = int(lab) != -100
        if span and sup != span_supervised:
            pieces.append(_decode_span(tokenizer, span, bool(span_supervised), start, end))
            span = []
        span.append(int(tok))
        span_supervised = sup
    if span:
        pieces.append(_decode_span(tokenizer, span, bool(span_supervised), start, end))
    return "".join(pieces)


def _decode_span(tokenizer: Any, ids: list[int], supervised: bool, start: str, end: str) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return f"{start}{text}{end}" if supervised else text


def _as_list(x: Any) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


# --------------------------------------------------------------------------- config
def build_sft_config(cfg: ExperimentConfig, *, output_dir: str | Path | None = None, has_eval: bool = True,
                     compute_dtype: torch.dtype | None = None) -> SFTConfig:
    """Every training argument of the experiment, from cfg (defaults = Experiment 1).

    ``output_dir`` defaults to the run's checkpoints folder. ``has_eval=False`` (empty validation
    split) turns evaluation and best-model selection off.
    """
    if has_eval and cfg.load_best_model and cfg.save_steps % cfg.eval_steps:
        raise ConfigError(f"save_steps ({cfg.save_steps}) must be a multiple of eval_steps ({cfg.eval_steps}) when "
                          "load_best_model=True (the best checkpoint is chosen among evaluated ones). "
                          f"Set e.g. save_steps={cfg.eval_steps * max(1, round(cfg.save_steps / cfg.eval_steps))}.")
    if cfg.report_to == "tensorboard" and not is_tensorboard_available():  # what transformers' callback needs
        raise ConfigError("report_to='tensorboard' needs the tensorboard package: `pip install tensorboard` "
                          "(or `pip install -e \".[tensorboard]\"`), or set report_to: none.")
    dtype = compute_dtype if compute_dtype is not None else modeling.resolve_compute_dtype(cfg.compute_dtype)
    quiet = is_headless() or not cfg.progress
    return SFTConfig(
        output_dir=str(output_dir or paths.RunPaths.for_config(cfg).checkpoints),
        # optimisation
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.num_epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=min(cfg.warmup_ratio, 0.999999),  # a float in [0, 1) is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        optim=cfg.optim,
        max_grad_norm=cfg.max_grad_norm,
        activation_checkpointing=cfg.gradient_checkpointing,  # transformers 5 name of gradient checkpointing
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu=not torch.cuda.is_available(),  # lets bf16 autocast run on CPUs that have it
        seed=cfg.seed,
        # data: conversational prompt/completion, loss on the completion only (or the whole text)
        max_length=cfg.max_length,
        completion_only_loss=cfg.completion_only_loss,
        assistant_only_loss=False,
        packing=False,
        padding_free=False,
        # logging, evaluation, checkpoints
        logging_strategy="steps",
        logging_steps=cfg.logging_steps,
        logging_nan_inf_filter=False,  # the NaN guard must see a NaN loss, not a smoothed stand-in
        include_num_input_tokens_seen="non_padding",  # real tokens (attention_mask sums) for tokens/s
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=SAVE_TOTAL_LIMIT,
        load_best_model_at_end=bool(cfg.load_best_model and has_eval),
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        report_to="none" if cfg.report_to == "none" else [cfg.report_to],
        disable_tqdm=quiet,
    )


# --------------------------------------------------------------------------- callbacks
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
        where = f" (resumed at step {state.global_step})" if state.global_step else ""
        print(f"[train] {state.max_steps} optimizer steps{where}", flush=True)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
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


# --------------------------------------------------------------------------- run-directory guards
def check_adapter_slot(cfg: ExperimentConfig) -> str:
    """What is in ``adapter/``: "empty", "same" (this config's finished adapter); raises RunError for an
    adapter of another config (or of unknown origin) unless ``cfg.overwrite``, which returns "replace"."""
    run = paths.RunPaths.for_config(cfg)
    if not run.adapter.exists() or not any(run.adapter.iterdir()):
        return "empty"
    old = (modeling.read_adapter_meta(run.adapter) or {}).get("train_fingerprint")
    new = cfg.fingerprint("train")
    if old == new:
        return "same"
    if cfg.overwrite:
        return "replace"
    raise RunError(
        f"{run.adapter} holds an adapter of another training config (train fingerprint {old or 'unknown'}; this "
        f"config: {new}). It is not overwritten. Use a new `experiment` name, delete that folder, or set "
        "overwrite=True to replace it.")


def _checkpoint_dirs(folder: Path) -> list[Path]:
    """Complete checkpoints (trainer_state.json is written last), oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir()
             if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name)) and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


def resolve_resume(cfg: ExperimentConfig) -> str | None:
    """The checkpoint to resume from (``resume="auto"``), or None to start fresh.

    Checkpoints are stamped with the train fingerprint (``checkpoints/hb_meta.json``). Those of another
    config are never resumed: RunError, unless ``cfg.overwrite`` (then they are deleted).
    ``resume="never"`` deletes this run's checkpoints and starts fresh.
    """
    folder = paths.RunPaths.for_config(cfg).checkpoints
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    meta_file = folder / CHECKPOINT_META
    old = paths.read_json(meta_file).get("train_fingerprint") if meta_file.is_file() else None
    new = cfg.fingerprint("train")
    if old != new and not cfg.overwrite and cfg.resume != "never":
        raise RunError(
            f"{folder} holds checkpoints of another training config (train fingerprint {old or 'unknown'}; this "
            f"config: {new}); they cannot be resumed. Use a new `experiment` name, delete that folder, or set "
            "resume='never' (or overwrite=True) to discard them.")
    if old != new or cfg.resume == "never":
        print(f"[train] discarding the old checkpoints in {folder} (resume={cfg.resume!r}, "
              f"fingerprint {old or 'unknown'} -> {new})", flush=True)
        shutil.rmtree(folder)
        return None
    done = _checkpoint_dirs(folder)
    return str(done[-1]) if done else None


def _stamp_checkpoints(cfg: ExperimentConfig) -> None:
    folder = paths.RunPaths.for_config(cfg).checkpoints
    paths.write_json(folder / CHECKPOINT_META, {"train_fingerprint": cfg.fingerprint("train"),
                                                "model_name": cfg.model_name, "created": paths.utc_now()})


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


# --------------------------------------------------------------------------- the run
@dataclass
class TrainRun:
    """Everything of one training run, built by :func:`prepare` and consumed by :func:`fit`."""

    cfg: ExperimentConfig
    paths: paths.RunPaths
    trainer: SFTTrainer | None
    tokenizer: Any
    splits: dict[str, list[dict[str, Any]]]
    resume_from: str | None = None
    already_trained: bool = False
    compute_dtype: torch.dtype | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    n_truncated: int = 0


def build_trainer(cfg: ExperimentConfig, args: SFTConfig, tokenizer: Any, train_ds: Dataset,
                  eval_ds: Dataset | None = None, *, callbacks: Sequence[TrainerCallback] = (),
                  trainer_class: type[SFTTrainer] = SupervisedLogitsSFTTrainer) -> SFTTrainer:
    """The 4-bit base model, its LoRA adapter (built by TRL from ``peft_config``) and the trainer.

    The one place that assembles them, so :func:`prepare` and ``benchmarks/bench_train.py`` train
    the same thing; with ``fast_lora_dropout`` PEFT's dropout modules are swapped for
    :class:`hb_utils.lora_dropout.FastDropout` before any step.
    """
    trainer = trainer_class(model=modeling.load_base_model(cfg, for_training=True), args=args,
                            train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                            peft_config=modeling.lora_config(cfg), callbacks=list(callbacks))
    if cfg.fast_lora_dropout:
        lora_dropout.install(trainer.model)
    return trainer


def prepare(cfg: ExperimentConfig, *, callbacks: Sequence[TrainerCallback] = ()) -> TrainRun:
    """Check the run directory, load the splits, tokenizer and 4-bit model, and build the SFTTrainer.

    When this config's adapter is already complete (and ``resume="auto"``), nothing is loaded:
    ``run.already_trained`` is True and :func:`fit` returns the stored metrics.
    """
    run_paths = paths.RunPaths.for_config(cfg)
    slot = check_adapter_slot(cfg)
    if slot == "same" and cfg.resume == "auto" and run_paths.metrics.joinpath("train.json").is_file():
        print(f"[train] {run_paths.adapter} already holds this config's adapter (train fingerprint "
              f"{cfg.fingerprint('train')}); reusing it. Set resume='never' to train again.", flush=True)
        return TrainRun(cfg, run_paths, None, None, {}, already_trained=True)
    resume_from = resolve_resume(cfg)

    splits = data.ensure_splits(cfg)
    train_ds = to_prompt_completion(splits["train"])
    eval_ds = to_prompt_completion(splits["val"]) if splits.get("val") else None
    dtype = modeling.resolve_compute_dtype(cfg.compute_dtype)
    args = build_sft_config(cfg, has_eval=eval_ds is not None, compute_dtype=dtype)

    callbacks = [NanGuardCallback(), *callbacks]
    with _quiet_bars(args.disable_tqdm):
        tokenizer = load_tokenizer(cfg.model_name)
        trainer = build_trainer(cfg, args, tokenizer, train_ds, eval_ds, callbacks=callbacks)
    if args.disable_tqdm:  # headless: one compact line per log instead of raw dicts
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(CompactLogCallback())
    n_truncated = sum(len(ids) >= cfg.max_length for ids in trainer.train_dataset["input_ids"])
    counts = modeling.parameter_counts(trainer.model)
    return TrainRun(cfg, run_paths, trainer, tokenizer, splits, resume_from=resume_from, compute_dtype=dtype,
                    parameters=counts, n_truncated=n_truncated)


@contextlib.contextmanager
def _quiet_bars(quiet: bool) -> Iterator[None]:
    """Headless runs: no weight-loading / dataset-preparation bars (each redraw would land in the executed
    notebook). Restores the previous state afterwards."""
    from transformers.utils import logging as hf_logging

    was = datasets.is_progress_bar_enabled(), hf_logging.is_progress_bar_enabled()
    if quiet:
        datasets.disable_progress_bars()
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was[0]:
            datasets.enable_progress_bars()
        if quiet and was[1]:
            hf_logging.enable_progress_bar()


def describe(run: TrainRun) -> str:
    """A few lines for the notebook: data sizes, parameters, dtype, resume point."""
    if run.already_trained:
        return f"already trained: {run.paths.adapter}"
    p = run.parameters
    lines = [
        f"train / val examples: {len(run.trainer.train_dataset)} / {len(run.splits.get('val') or [])}"
        f" ({run.n_truncated} training examples reach max_length={run.cfg.max_length} and are cut)",
        f"trainable parameters: {p['trainable']:,} of {p['total']:,} ({p['trainable_pct']:.3f}%)",
        f"compute dtype: {run.compute_dtype}; optimizer: {run.cfg.optim}; effective batch: "
        f"{run.cfg.batch_size * run.cfg.grad_accum}",
        f"loss on: {'the answer + end-of-turn token only' if run.cfg.completion_only_loss else 'the whole text (original)'}",
        f"resume from: {run.resume_from or 'nothing (fresh start)'}",
    ]
    return "\n".join(lines)


def example_view(run: TrainRun, index: int = 0) -> str:
    """Training example ``index`` as the model sees it, the supervised part in ⟦ ⟧."""
    ex = run.trainer.train_dataset[index]
    batch = run.trainer.data_collator([ex])
    return mark_supervised(run.tokenizer, batch["input_ids"][0], batch["labels"][0], batch.get("attention_mask", [None])[0])


def fit(run: TrainRun) -> dict[str, Any]:
    """Train (resuming when possible), save adapter + tokenizer + hb_meta.json, write the metrics,
    the log history and the loss-curve plot. Returns the metrics dict (also in metrics/train.json)."""
    if run.already_trained:
        return paths.read_json(run.paths.metrics / "train.json")
    cfg, trainer = run.cfg, run.trainer
    if run.resume_from is None:
        _stamp_checkpoints(cfg)
    print(f"[train] {describe(run).splitlines()[1]}", flush=True)
    if run.resume_from:
        print(f"[train] resuming from {run.resume_from}", flush=True)
    state0 = {"step": 0, "tokens": 0}

    class _Start(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            state0.update(step=state.global_step, tokens=state.num_input_tokens_seen)

    trainer.add_callback(_Start())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with oom_guard(cfg):
        result = trainer.train(resume_from_checkpoint=run.resume_from)

    _save_adapter(run)
    metrics = _collect_metrics(run, result.metrics, state0)
    paths.write_json(run.paths.metrics / "train.json", metrics)
    paths.write_json(run.paths.metrics / "log_history.json", trainer.state.log_history)
    import matplotlib.pyplot as plt

    plt.close(plot_loss_curve(trainer.state.log_history, run.paths.plot("loss_curve")))  # the notebook shows it
    return metrics


def train(cfg: ExperimentConfig, *, callbacks: Sequence[TrainerCallback] = ()) -> dict[str, Any]:
    """The whole stage 03 in one call: :func:`prepare` then :func:`fit`."""
    return fit(prepare(cfg, callbacks=callbacks))


def reload_check(cfg: ExperimentConfig, n_questions: int = 2) -> list[dict[str, Any]]:
    """Load the saved ``adapter/`` from disk onto a fresh base model and answer a few validation questions.

    Why: it proves, at the end of 03, that the files written are a complete adapter of this config
    that loads and generates (``modeling.load_adapter_model`` refuses a missing or foreign one), before
    04 spends minutes on evaluation. Greedy, ``eval_max_new_tokens``; validation questions, so the
    test split stays unseen.
    """
    from hb_utils.generation import generate_answers

    run_paths = paths.RunPaths.for_config(cfg)
    val = data.ensure_splits(cfg).get("val") or []
    if not val:
        raise DataError("The validation split is empty, so there is no question to try the adapter on: "
                        "raise sample_size or val_frac.")
    questions = [r["question"] for r in val[:n_questions]]
    model, tokenizer = modeling.load_adapter_model(cfg, run_paths.adapter)
    answers = generate_answers(model, tokenizer, questions, cfg.system_prompt,
                               max_new_tokens=cfg.eval_max_new_tokens, batch_size=cfg.gen_batch_size,
                               progress=False)
    return [{"question": q, "answer": a.text, "new_tokens": a.n_new_tokens, "stopped": a.stopped}
            for q, a in zip(questions, answers, strict=True)]


def _save_adapter(run: TrainRun) -> None:
    """Write adapter + tokenizer + hb_meta.json to a temporary folder, then swap it in, so adapter/
    never holds a half-written adapter."""
    final = run.paths.adapter
    tmp = final.with_name(final.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    run.trainer.save_model(str(tmp))
    run.tokenizer.save_pretrained(str(tmp))
    modeling.write_adapter_meta(run.cfg, tmp)
    if final.exists():
        check_adapter_slot(run.cfg)  # still ours (or overwrite=True)?
        shutil.rmtree(final)
    tmp.replace(final)


def _collect_metrics(run: TrainRun, train_metrics: dict[str, Any], start: dict[str, int]) -> dict[str, Any]:
    trainer, cfg = run.trainer, run.cfg
    history = trainer.state.log_history
    losses = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    best = min(evals, key=lambda e: e[1]) if evals else (None, None)
    runtime = float(train_metrics.get("train_runtime", 0.0))
    tokens = trainer.state.num_input_tokens_seen - start["tokens"]
    return {
        "experiment": cfg.experiment,
        "model_name": cfg.model_name,
        "fingerprints": cfg.fingerprints(),
        "created": paths.utc_now(),
        "resumed_from": run.resume_from,
        "resumed_from_step": start["step"] if run.resume_from else None,
        "global_step": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "epochs": trainer.state.epoch,
        "n_train": len(trainer.train_dataset),
        "n_val": len(run.splits.get("val") or []),
        "n_train_truncated": run.n_truncated,
        "completion_only_loss": cfg.completion_only_loss,
        "effective_batch_size": cfg.batch_size * cfg.grad_accum,
        "train_loss_mean": train_metrics.get("train_loss"),
        "final_train_loss": losses[-1][1] if losses else None,
        "best_val_loss": best[1],
        "best_val_step": best[0],
        "final_val_loss": evals[-1][1] if evals else None,
        "final_val_step": evals[-1][0] if evals else None,
        "saved_model": "best val checkpoint" if trainer.args.load_best_model_at_end else "last step",
        "train_runtime_s": runtime,
        "train_samples_per_second": train_metrics.get("train_samples_per_second"),
        "train_steps_per_second": train_metrics.get("train_steps_per_second"),
        "tokens_seen_this_run": tokens,
        "tokens_per_second": round(tokens / runtime, 2) if runtime else None,
        "peak_memory": peak_memory(),
        "parameters": run.parameters,
        "compute_dtype": str(run.compute_dtype).replace("torch.", ""),
        "device": modeling.device_summary(),
        "versions": library_versions(),
    }


def peak_memory() -> dict[str, Any]:
    """Peak GPU memory allocated (CUDA) or the peak resident memory of this process (CPU)."""
    if torch.cuda.is_available():
        return {"kind": "cuda_max_allocated", "gb": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss = rss_kb if sys.platform == "darwin" else rss_kb * 1024
    return {"kind": "process_peak_rss", "gb": round(rss / 2**30, 3)}


def library_versions() -> dict[str, str | None]:
    """Python and the library versions that shape a run (the same list config.json records)."""
    from hb_utils.runner import package_versions

    return {"python": sys.version.split()[0], **package_versions()}



# --------------------------------------------------------------------------- plot
def plot_loss_curve(log_history: list[dict[str, Any]], path: Path | None = None) -> Any:
    """Training and validation loss against the optimizer step; saved as PNG when ``path`` is given."""
    import matplotlib.pyplot as plt

    from hb_utils.plots import save

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    val = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    if train:
        ax.plot(*zip(*train, strict=True), marker="o", ms=3, label="train loss")
    if val:
        ax.plot(*zip(*val, strict=True), marker="s", ms=4, label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / supervised token)")
    ax.set_title("Training and validation loss")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    return save(fig, path)
