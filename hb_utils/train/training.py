"""Stage 03: QLoRA supervised fine-tuning with TRL's SFTTrainer, driven by one config.

The notebook stays a thin story: :func:`prepare` checks the run directory and builds the trainer
(:mod:`hb_utils.train.trl_setup`), :func:`fit` trains with the guards of :mod:`hb_utils.train.callbacks`,
resumes from this config's newest checkpoint, saves the adapter atomically and writes the metrics and
the loss curve to ``outputs/<experiment>/``; :func:`reload_check` proves the saved adapter loads and
answers. An adapter or checkpoints of another config are never overwritten or resumed: every one of
them carries a :func:`hb_utils.run_dir.stamp`, checked by :func:`hb_utils.run_dir.require`.

With ``num_processes > 1``, :func:`prepare` only checks the run directory and :func:`fit` hands the
training to :func:`hb_utils.train.distributed.launch`; each launched rank runs :func:`prepare_worker` and
:func:`fit` from this module (the one code path), and only rank 0 writes into the run directory.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PrinterCallback, TrainerCallback
from trl import SFTTrainer

from hb_utils import plots, results, run_dir
from hb_utils.config import ExperimentConfig
from hb_utils.data import medquad
from hb_utils.errors import DataError
from hb_utils.model import device, loading
from hb_utils.model.generation import generate_answers
from hb_utils.model.source import load_tokenizer
from hb_utils.quiet import no_progress_bars
from hb_utils.train import distributed
from hb_utils.train.callbacks import CompactLogCallback, NanGuardCallback, oom_guard
from hb_utils.train.trl_setup import build_sft_config, build_trainer, mark_supervised, to_prompt_completion

CHECKPOINT_META = "hb_meta.json"  # in RunPaths.checkpoints: the stamp of the config that made them


# --------------------------------------------------------------------------- run-directory guards
def check_adapter_slot(cfg: ExperimentConfig) -> str:
    """What is in ``adapter/``: "empty", "same" (this config's finished adapter); raises RunError for an
    adapter of another config (or of unknown origin) unless ``cfg.overwrite``, which returns "replace"."""
    run = run_dir.RunPaths.for_config(cfg)
    if not run.adapter.exists() or not any(run.adapter.iterdir()):
        return "empty"
    found = (loading.read_adapter_meta(run.adapter) or {}).get("stamp")
    if run_dir.stamp_matches(found, cfg, "train"):
        return "same"
    if not cfg.overwrite:  # raises: the stamp differs (checked above), naming the parameters that do
        run_dir.require(found, cfg, "train", what=run.adapter,
                        fix="It is not overwritten: use a new `experiment` name, delete that folder, or set "
                            "overwrite=True to replace it.")
    return "replace"


_checkpoint_dirs = run_dir.checkpoint_dirs  # complete checkpoints, oldest first


def resolve_resume(cfg: ExperimentConfig) -> str | None:
    """The checkpoint to resume from (``resume="auto"``), or None to start fresh.

    Checkpoints are stamped with the train fingerprint (``checkpoints/hb_meta.json``). Those of another
    config are never resumed: RunError, unless ``cfg.overwrite`` (then they are deleted).
    ``resume="never"`` deletes this run's checkpoints and starts fresh.
    """
    folder = run_dir.RunPaths.for_config(cfg).checkpoints
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    found = run_dir.read_json(folder / CHECKPOINT_META).get("stamp") if (folder / CHECKPOINT_META).is_file() else None
    same = run_dir.stamp_matches(found, cfg, "train")
    if not same and not cfg.overwrite and cfg.resume != "never":
        run_dir.require(found, cfg, "train", what=f"{folder} (checkpoints)",
                        fix="They cannot be resumed: use a new `experiment` name, delete that folder, or set "
                            "resume='never' (or overwrite=True) to discard them.")
    if not same or cfg.resume == "never":
        print(f"[train] discarding the old checkpoints in {folder} (resume={cfg.resume!r}"
              + ("" if same else ", made by another config") + ")", flush=True)
        shutil.rmtree(folder)
        return None
    done = _checkpoint_dirs(folder)
    return str(done[-1]) if done else None


def _stamp_checkpoints(cfg: ExperimentConfig) -> None:
    folder = run_dir.RunPaths.for_config(cfg).checkpoints
    run_dir.write_json(folder / CHECKPOINT_META, {"model_name": cfg.model_name,
                                                  "stamp": run_dir.stamp(cfg, "train", "training.fit")})


# --------------------------------------------------------------------------- the run
@dataclass
class TrainRun:
    """Everything of one training run, built by :func:`prepare` and consumed by :func:`fit`."""

    cfg: ExperimentConfig
    paths: run_dir.RunPaths
    trainer: SFTTrainer | None
    tokenizer: Any
    splits: dict[str, list[dict[str, Any]]]
    resume_from: str | None = None
    already_trained: bool = False
    compute_dtype: torch.dtype | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    n_truncated: int = 0
    launcher: bool = False  # num_processes > 1 in the notebook kernel: fit() launches the ranks


def prepare(cfg: ExperimentConfig, *, callbacks: Sequence[TrainerCallback] = (),
            check_devices: bool = True) -> TrainRun:
    """Check the run directory, load the splits, tokenizer and 4-bit model, and build the SFTTrainer.

    When this config's adapter is already complete (and ``resume="auto"``), nothing is loaded:
    ``run.already_trained`` is True and :func:`fit` returns the stored metrics. With
    ``num_processes > 1`` no model is loaded here either (the ranks load their own): the resume point
    is decided once, the splits are written, ``num_processes`` is checked against this machine's
    devices (``check_devices``), and :func:`fit` launches the ranks.
    """
    run_paths = run_dir.claim(cfg, made_by="training.prepare")
    slot = check_adapter_slot(cfg)
    finished = run_dir.stamp_matches(run_dir.read_stamp(run_paths.metrics / "train.json"), cfg, "train")
    if slot == "same" and cfg.resume == "auto" and finished:
        print(f"[train] {run_paths.adapter} already holds this config's adapter (train fingerprint "
              f"{cfg.fingerprint('train')}); reusing it. Set resume='never' to train again.", flush=True)
        return TrainRun(cfg, run_paths, None, None, {}, already_trained=True)
    resume_from = resolve_resume(cfg)
    splits = medquad.ensure_splits(cfg)
    if cfg.num_processes > 1 and not distributed.in_worker():
        if check_devices:
            distributed.check_num_processes(cfg)  # refused before anything starts
        return TrainRun(cfg, run_paths, None, None, splits, resume_from=resume_from, launcher=True,
                        compute_dtype=None)
    return _build(cfg, run_paths, splits, resume_from, callbacks)


def prepare_worker(cfg: ExperimentConfig, *, resume_from: str | None,
                   callbacks: Sequence[TrainerCallback] = ()) -> TrainRun:
    """One rank of a multi-process run: the launcher already checked the run directory and chose
    ``resume_from``, so no rank deletes or picks checkpoints on its own; the splits are read."""
    run = _build(cfg, run_dir.RunPaths.for_config(cfg), medquad.ensure_splits(cfg), resume_from, callbacks)
    if distributed.is_main_process():  # what 03 shows before training, shown here once, by rank 0
        print(f"[train] {describe(run).splitlines()[2]}", flush=True)
        print("[train] training example 0 (supervised part in ⟦ ⟧):\n" + example_view(run, 0), flush=True)
    return run


def _build(cfg: ExperimentConfig, run_paths: run_dir.RunPaths, splits: dict[str, list[dict[str, Any]]],
           resume_from: str | None, callbacks: Sequence[TrainerCallback]) -> TrainRun:
    train_ds = to_prompt_completion(splits["train"])
    eval_ds = to_prompt_completion(splits["val"]) if splits.get("val") else None
    dtype = device.resolve_compute_dtype(cfg.compute_dtype)
    args = build_sft_config(cfg, has_eval=eval_ds is not None, compute_dtype=dtype)

    callbacks = [NanGuardCallback(), *callbacks]
    with no_progress_bars() if args.disable_tqdm else contextlib.nullcontext():  # headless: no load bars
        tokenizer = load_tokenizer(cfg.model_name)
        # Cheap checks first: a config no example or module can satisfy fails here, naming the parameter,
        # not minutes later inside datasets or PEFT.
        loading.check_prompt_fits(cfg, tokenizer, [r["question"] for r in splits["train"]])
        loading.check_lora_targets(cfg)
        trainer = build_trainer(cfg, args, tokenizer, train_ds, eval_ds, callbacks=callbacks)
    if args.disable_tqdm:  # headless: one compact line per log instead of raw dicts
        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(CompactLogCallback())
    n_truncated = sum(len(ids) >= cfg.max_length for ids in trainer.train_dataset["input_ids"])
    counts = loading.parameter_counts(trainer.model)
    return TrainRun(cfg, run_paths, trainer, tokenizer, splits, resume_from=resume_from, compute_dtype=dtype,
                    parameters=counts, n_truncated=n_truncated)


def describe(run: TrainRun) -> str:
    """A few lines for the notebook: data sizes, parameters, dtype, resume point."""
    if run.already_trained:
        return f"already trained: {run.paths.adapter}"
    cfg = run.cfg
    if run.launcher:
        return "\n".join([
            f"train / val examples: {len(run.splits['train'])} / {len(run.splits.get('val') or [])}",
            f"{cfg.num_processes} training processes (accelerate launch"
            + (f", {cfg.accelerate_config}" if cfg.accelerate_config else ", DDP") + "): each loads its own model; "
            "parameters and a training example are printed by rank 0 when training starts",
            f"optimizer: {cfg.optim}; effective batch: {cfg.batch_size} x {cfg.grad_accum} x {cfg.num_processes} = "
            f"{effective_batch(cfg)}",
            f"resume from: {run.resume_from or 'nothing (fresh start)'}",
        ])
    p = run.parameters
    lines = [
        f"train / val examples: {len(run.trainer.train_dataset)} / {len(run.splits.get('val') or [])}"
        f" ({run.n_truncated} training examples reach max_length={run.cfg.max_length} and are cut)",
        f"trainable parameters: {p['trainable']:,} of {p['total']:,} ({p['trainable_pct']:.3f}%)",
        f"compute dtype: {run.compute_dtype}; optimizer: {run.cfg.optim}; effective batch: {effective_batch(cfg)}"
        + (f" ({cfg.batch_size} x {cfg.grad_accum} x {cfg.num_processes} processes)" if cfg.num_processes > 1 else ""),
        "loss on: "
        f"{'the answer + end-of-turn token only' if run.cfg.completion_only_loss else 'the whole text (original)'}",
        f"resume from: {run.resume_from or 'nothing (fresh start)'}",
    ]
    return "\n".join(lines)


def effective_batch(cfg: ExperimentConfig) -> int:
    """Examples per optimizer step over all processes: batch_size x grad_accum x num_processes."""
    return cfg.batch_size * cfg.grad_accum * cfg.num_processes


def example_view(run: TrainRun, index: int = 0) -> str:
    """Training example ``index`` as the model sees it, the supervised part in ⟦ ⟧."""
    if run.launcher:  # the tokenized dataset lives in the ranks; rank 0 prints this view when it starts
        return "(multi-process run: rank 0 prints training example 0 when training starts)"
    ex = run.trainer.train_dataset[index]
    batch = run.trainer.data_collator([ex])
    return mark_supervised(run.tokenizer, batch["input_ids"][0], batch["labels"][0],
                           batch.get("attention_mask", [None])[0])


def fit(run: TrainRun) -> dict[str, Any]:
    """Train (resuming when possible), save adapter + tokenizer + hb_meta.json, write the metrics,
    the log history and the loss-curve plot. Returns the metrics dict (also in metrics/train.json)."""
    if run.already_trained:
        return run_dir.read_json(run.paths.metrics / "train.json")
    if run.launcher:
        return distributed.launch(run.cfg, run.resume_from)
    cfg, trainer = run.cfg, run.trainer
    main = distributed.is_main_process()
    if main:
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
    if not main:
        return {}
    metrics = _collect_metrics(run, result.metrics, state0)
    run_dir.write_json(run.paths.metrics / "train.json", metrics)
    run_dir.write_json(run.paths.metrics / "log_history.json", trainer.state.log_history)
    plots.close(plots.loss_curve(trainer.state.log_history, run.paths.plot("loss_curve")))  # the notebook shows it
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
    run_paths = run_dir.RunPaths.for_config(cfg)
    val = medquad.ensure_splits(cfg).get("val") or []
    if not val:
        raise DataError("The validation split is empty, so there is no question to try the adapter on: "
                        "raise sample_size or val_frac.")
    questions = [r["question"] for r in val[:n_questions]]
    model, tokenizer = loading.load_adapter_model(cfg, run_paths.adapter)
    answers = generate_answers(model, tokenizer, questions, cfg.system_prompt, batch_size=cfg.gen_batch_size,
                               progress=cfg.progress, max_new_tokens=cfg.eval_max_new_tokens)
    return [{"question": q, "answer": a.text, "new_tokens": a.n_new_tokens, "stopped": a.stopped}
            for q, a in zip(questions, answers, strict=True)]


def _save_adapter(run: TrainRun) -> None:
    """Write adapter + tokenizer + hb_meta.json to a temporary folder, then swap it in, so adapter/
    never holds a half-written adapter."""
    final = run.paths.adapter
    tmp = final.with_name(final.name + ".partial")
    main = distributed.is_main_process()
    if main and tmp.exists():
        shutil.rmtree(tmp)
    distributed.barrier()
    if getattr(run.trainer, "is_fsdp_enabled", False):  # PEFT's FSDP recipe: gather a full adapter to save
        run.trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    run.trainer.save_model(str(tmp))  # every rank calls it (FSDP gathers); only rank 0 writes files
    if not main:
        return
    run.tokenizer.save_pretrained(str(tmp))
    loading.write_adapter_meta(run.cfg, tmp)
    if final.exists():
        check_adapter_slot(run.cfg)  # still ours (or overwrite=True)?
        shutil.rmtree(final)
    tmp.replace(final)


def _collect_metrics(run: TrainRun, train_metrics: dict[str, Any], start: dict[str, int]) -> dict[str, Any]:
    trainer, cfg = run.trainer, run.cfg
    history = trainer.state.log_history
    losses, evals = results.loss_points(history)
    best = min(evals, key=lambda e: e[1]) if evals else (None, None)
    runtime = float(train_metrics.get("train_runtime", 0.0))
    tokens = trainer.state.num_input_tokens_seen - start["tokens"]
    return {
        "stamp": run_dir.stamp(cfg, "train", "training.fit"),
        "experiment": cfg.experiment,
        "model_name": cfg.model_name,
        "resumed_from": run.resume_from,
        "resumed_from_step": start["step"] if run.resume_from else None,
        "global_step": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "epochs": trainer.state.epoch,
        "n_train": len(trainer.train_dataset),
        "n_val": len(run.splits.get("val") or []),
        "n_train_truncated": run.n_truncated,
        "completion_only_loss": cfg.completion_only_loss,
        "num_processes": cfg.num_processes,
        "effective_batch_size": effective_batch(cfg),
        "per_device_batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
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
        "peak_memory": device.peak_memory(),  # of rank 0 when num_processes > 1
        "parameters": run.parameters,
        "compute_dtype": device.dtype_name(run.compute_dtype),
        "device": device.summary(),
    }
