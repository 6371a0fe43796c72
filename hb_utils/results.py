"""How results are read and shown, in one place for 03, 04, 05 and 06 (``compare``).

Why: the loss history, the metric labels, their display scales (ROUGE and rates in percent, BLEU on its
own 0-100 scale, lengths as counts) and the "value [low, high]" interval format were each written twice,
once for a run's own report and once for the comparison of runs, and had started to drift.
"""

from __future__ import annotations

from typing import Any

# Display label and scale of every generation metric in eval.json["generation"], in report order.
METRICS: dict[str, tuple[str, float]] = {
    "rouge1": ("ROUGE-1", 100.0), "rouge2": ("ROUGE-2", 100.0), "rougeL": ("ROUGE-L", 100.0),
    "rougeLsum": ("ROUGE-Lsum", 100.0), "bleu": ("BLEU", 1.0),
    "stopped": ("stops by itself %", 100.0), "disclaimer": ("advises a professional %", 100.0),
    "empty_or_loop": ("empty or looping %", 100.0), "words": ("answer words", 1.0), "tokens": ("answer tokens", 1.0),
}
TEXT_METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum", "bleu")
RATE_METRICS = ("stopped", "disclaimer", "empty_or_loop")
LENGTH_METRICS = ("words", "tokens")


def label(metric: str) -> str:
    return METRICS.get(metric, (metric, 1.0))[0]


def scale(metric: str) -> float:
    return METRICS.get(metric, (metric, 1.0))[1]


def loss_points(log_history: list[dict[str, Any]]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(step, training loss) and (step, validation loss) pairs from a Trainer's ``log_history``."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    val = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    return train, val


def format_ci(d: dict[str, Any] | None, factor: float = 1.0, digits: int = 1) -> str:
    """``value [low, high]`` of an interval dict (``value`` or, for paired differences, ``delta``)."""
    if not d:
        return "-"
    value = d.get("value", d.get("delta"))
    return f"{value * factor:.{digits}f} [{d['ci_low'] * factor:.{digits}f}, {d['ci_high'] * factor:.{digits}f}]"
