"""TRL's side of stage 03: chat records as prompt/completion data, the SFTConfig, and the trainer.

Why this module exists: the original notebook rendered each pair to one string, set pad = eos and
trained with ``DataCollatorForLanguageModeling``. That collator masks every pad-id token in the
labels, so with pad = eos the end-of-turn token was never supervised (the model never learned to
stop), and the loss covered the system prompt and the question too. Here every example is a
conversational prompt/completion record (prompt = [system, user], completion = [assistant]) that
TRL renders with the model's own chat template; with ``completion_only_loss`` (the default) only
the answer and its end-of-turn token carry loss. ``completion_only_loss=False`` keeps the original
full-sequence loss (the end-of-turn token stays supervised either way). :func:`mark_supervised`
shows exactly which tokens carry loss, and :func:`build_sft_config` is the one place every training
argument of the config reaches TRL.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import TrainerCallback
from transformers.integrations import is_tensorboard_available, is_trackio_available
from trl import SFTConfig, SFTTrainer

from hb_utils import run_dir
from hb_utils.config import ExperimentConfig
from hb_utils.errors import ConfigError, DataError
from hb_utils.model import loading, lora_dropout
from hb_utils.model.device import resolve_compute_dtype
from hb_utils.quiet import is_headless
from hb_utils.train.sft_trainer import SupervisedLogitsSFTTrainer

SAVE_TOTAL_LIMIT = 2  # newest checkpoints kept (plus the best one when load_best_model); bounds disk use


# --------------------------------------------------------------------------- data
def to_prompt_completion(records: Sequence[dict[str, Any]]) -> Dataset:
    """Chat records (hb_utils.data.medquad) -> a conversational prompt/completion dataset for TRL.

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
                            "(hb_utils.data.medquad.prepare_splits).")
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
    tracking = trackio_settings(cfg) if cfg.report_to == "trackio" else {}
    dtype = compute_dtype if compute_dtype is not None else resolve_compute_dtype(cfg.compute_dtype)
    quiet = is_headless() or not cfg.progress
    return SFTConfig(
        output_dir=str(output_dir or run_dir.RunPaths.for_config(cfg).checkpoints),
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
        # non-reentrant checkpointing + no unused-parameter search: TRL/PEFT's DDP recipe for LoRA (the frozen
        # base has no gradients, every LoRA weight gets one; reentrant checkpointing breaks DDP's hooks)
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg.gradient_checkpointing else None,
        ddp_find_unused_parameters=False,
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
        **tracking,
        disable_tqdm=quiet,
    )


TRACKIO_DEFAULT_PROJECT = "healthbot"


def trackio_settings(cfg: ExperimentConfig) -> dict[str, Any]:
    """What ``report_to: trackio`` adds to the training arguments: the project ($HB_TRACKIO_PROJECT, which
    ``hb sweep`` sets to the series name: one project per series, else "healthbot"), the run (the experiment) and
    local storage only (no Hugging Face Space). The logs go to $TRACKIO_DIR, by default ``<output_root>/trackio``
    (a series' own folder under ``hb sweep``): ``TRACKIO_DIR=<that folder> trackio show`` opens the dashboard.
    Set here, before transformers imports trackio, which reads the folder once."""
    if not is_trackio_available():
        raise ConfigError("report_to='trackio' needs the trackio package: `pip install -e \".[tracking]\"` (or "
                          "`pip install trackio`), or set report_to: none.")
    os.environ.setdefault("TRACKIO_DIR", str(run_dir.resolve(cfg.output_root) / "trackio"))
    return {"project": os.environ.get("HB_TRACKIO_PROJECT") or TRACKIO_DEFAULT_PROJECT, "run_name": cfg.experiment,
            "trackio_space_id": None, "trackio_static_space_id": False}


def build_trainer(cfg: ExperimentConfig, args: SFTConfig, tokenizer: Any, train_ds: Dataset,
                  eval_ds: Dataset | None = None, *, callbacks: Sequence[TrainerCallback] = (),
                  trainer_class: type[SFTTrainer] = SupervisedLogitsSFTTrainer) -> SFTTrainer:
    """The 4-bit base model, its LoRA adapter (built by TRL from ``peft_config``) and the trainer.

    The one place that assembles them, so :func:`prepare` and ``benchmarks/bench_train.py`` train
    the same thing; with ``fast_lora_dropout`` PEFT's dropout modules are swapped for
    :class:`hb_utils.model.lora_dropout.FastDropout` before any step.
    """
    trainer = trainer_class(model=loading.load_base_model(cfg, for_training=True, tokenizer=tokenizer), args=args,
                            train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tokenizer,
                            peft_config=loading.lora_config(cfg), callbacks=list(callbacks))
    if cfg.fast_lora_dropout:
        lora_dropout.install(trainer.model)
    keep_adapter_in_compute_precision(trainer.model, args)
    return trainer


def keep_adapter_in_compute_precision(model: torch.nn.Module, args: SFTConfig) -> int:
    """Trainable (LoRA) weights in fp32 unless the run computes in bf16; returns how many were changed.

    TRL (1.x) casts every trainable weight of a quantized model to bf16 after building the adapter,
    following the QLoRA paper, where bf16 is the compute dtype. Where it is not, that cast is costly:
    with fp32 compute (CPUs without bf16 units, ``compute_dtype: auto`` there) every LoRA matmul became a
    bf16 matmul, which such CPUs emulate at about 1 GFLOP/s -- 45 % of a smoke training step on an
    AVX2-only EPYC went to the rank-8 LoRA products -- and with fp16 autocast (T4) the optimizer would
    step bf16 weights. fp32 adapter weights are PEFT's own default (``autocast_adapter_dtype``) and are
    exact master weights; in bf16 runs TRL's choice is kept.
    """
    if args.bf16:
        return 0
    changed = 0
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
            changed += 1
    return changed
