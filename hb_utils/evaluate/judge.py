"""Statement grading with a judge model: does an answer state (or clearly imply) a given statement?

Why: ROUGE against one reference answer says little about whether an answer contains what it must. MedLFQA
gives, per question, the ``Must_have`` and ``Nice_to_have`` statements a good answer contains; K-QA and
MedLFQA score comprehensiveness as the share of must-have statements an answer supports, and HealthBench
grades rubric items with a grader model. Here a judge model (``judge_model``: Hub id, local directory or the
offline alias) is asked, for each (answer, statement), the fixed question of :data:`RUBRIC`.

The instrument is measured, not trusted:

* **Fixed rubric, greedy decoding** (temperature 0), a few new tokens, the judge's own chat template.
* **Strict parsing** (:func:`parse_verdict`): the reply must be the single word ``yes`` or ``no`` (any case,
  an optional final period). Anything else — "Yes, because…", "Maybe", an empty reply — is *not judged*:
  counted and shown, never guessed. A question's score is the share of its judged statements that are met.
* **Measured accuracy** (:func:`judge_accuracy`) on a labelled set of (answer, statement, met) triples,
  balanced between met and not met (``tests/data/judge_labels.jsonl``); a reply that is not judged counts as
  wrong there. A judge under :data:`RELIABLE_ACCURACY` is labelled unreliable next to every score it made.

A word-overlap proxy is not a judge: this module never falls back to one.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hb_utils import run_dir
from hb_utils.config import ExperimentConfig
from hb_utils.errors import DataError
from hb_utils.model.generation import generate_answers

RELIABLE_ACCURACY = 0.8  # below this accuracy on the labelled set, a judge's scores are labelled unreliable
MAX_NEW_TOKENS = 5  # room for "Yes." and an end-of-turn token; a longer reply is cut and then not judged
LABELS = Path("tests") / "data" / "judge_labels.jsonl"  # relative to the repository root

RUBRIC_SYSTEM = ("You check whether a medical answer contains a given statement. "
                 "You reply with exactly one word: yes or no.")
RUBRIC = """Answer:
<<<
{answer}
>>>

Statement:
<<<
{statement}
>>>

Does the answer state the statement or clearly imply it? Paraphrases and synonyms count. Reply "no" if the \
answer leaves it out, only touches its topic, or says something that contradicts it.
Reply with one word: yes or no."""
_VERDICT = re.compile(r"\s*(yes|no)\.?\s*", re.IGNORECASE)


def rubric_id() -> str:
    """A short hash of the rubric (system + user text): eval.json records which rubric made a score."""
    return hashlib.sha256((RUBRIC_SYSTEM + "\n" + RUBRIC).encode()).hexdigest()[:12]


def judge_prompt(answer: str, statement: str) -> str:
    """The user turn of one judgement."""
    return RUBRIC.format(answer=answer.strip() or "(empty answer)", statement=statement.strip())


def parse_verdict(reply: str) -> bool | None:
    """True for "yes", False for "no" (any case, an optional final period, surrounding spaces); None for any
    other reply: not judged."""
    match = _VERDICT.fullmatch(reply or "")
    return None if match is None else match.group(1).lower() == "yes"


@dataclass
class Verdict:
    """One judgement: the judge's raw reply and what it parses to (None: not judged)."""

    reply: str
    met: bool | None


def judge(model: Any, tokenizer: Any, pairs: Sequence[tuple[str, str]], *, batch_size: int,
          progress: bool = False) -> list[Verdict]:
    """The judge's verdict on each (answer, statement) pair, ``batch_size`` prompts at a time, greedy."""
    replies = generate_answers(model, tokenizer, [judge_prompt(a, s) for a, s in pairs], RUBRIC_SYSTEM,
                               max_new_tokens=MAX_NEW_TOKENS, batch_size=batch_size, progress=progress)
    return [Verdict(r.text, parse_verdict(r.text)) for r in replies]


def load_judge(cfg: ExperimentConfig) -> tuple[Any, Any]:
    """The judge model and its tokenizer, loaded as the evaluated model is (``load_in_4bit``, ``compute_dtype``,
    ``attn_implementation`` of the config), without any adapter."""
    from hb_utils.model import loading  # lazy: transformers
    from hb_utils.model.source import load_tokenizer

    judge_cfg = cfg.replace(model_name=cfg.judge_model)
    tokenizer = load_tokenizer(judge_cfg.model_name)
    return loading.load_base_model(judge_cfg, tokenizer=tokenizer), tokenizer


# --------------------------------------------------------------------------- the labelled set
def labels_path() -> Path:
    return run_dir.repo_root() / LABELS


def load_labels(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The labelled (answer, statement, met) triples; DataError for a missing file or a malformed line."""
    path = Path(path) if path is not None else labels_path()
    if not path.is_file():
        raise DataError(f"The judge's labelled set {path} does not exist: it ships with the repository "
                        f"({LABELS}); run from a checkout of it.")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {n} is not JSON ({exc.msg}).") from None
        if not (isinstance(row, dict) and isinstance(row.get("answer"), str) and isinstance(row.get("statement"), str)
                and isinstance(row.get("met"), bool)):
            raise DataError(f"{path} line {n} needs \"answer\" and \"statement\" (text) and \"met\" (true/false).")
        rows.append(row)
    if not rows:
        raise DataError(f"{path} holds no labelled triples.")
    return rows


def labels_digest(path: str | Path | None = None) -> str:
    path = Path(path) if path is not None else labels_path()
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def judge_accuracy(verdicts: Sequence[Verdict], labels: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The judge's accuracy on the labelled set: share of triples where its verdict equals the label (a reply
    not judged counts as wrong), recall on each class, how many replies were not judged, and whether the judge
    reaches :data:`RELIABLE_ACCURACY`."""
    if len(verdicts) != len(labels):
        raise ValueError(f"{len(verdicts)} verdicts but {len(labels)} labels")  # a bug in the caller
    truth = np.array([bool(row["met"]) for row in labels])
    said = [v.met for v in verdicts]
    correct = np.array([s is not None and s == t for s, t in zip(said, truth, strict=True)])
    judged = np.array([s is not None for s in said])
    accuracy = float(correct.mean())

    def recall(cls: bool) -> float | None:
        mask = truth == cls
        return float(correct[mask].mean()) if mask.any() else None

    return {"labelled": len(labels), "met": int(truth.sum()), "not_met": int((~truth).sum()),
            "correct": int(correct.sum()), "not_judged": int((~judged).sum()), "accuracy": accuracy,
            "met_recall": recall(True), "not_met_recall": recall(False),
            "said_yes": int(sum(s is True for s in said)), "said_no": int(sum(s is False for s in said)),
            "threshold": RELIABLE_ACCURACY, "reliable": accuracy >= RELIABLE_ACCURACY}


def reliability_label(accuracy: dict[str, Any]) -> str:
    """The words shown next to a judged score: reliable, or UNRELIABLE with the measured accuracy."""
    pct = f"{accuracy['accuracy']:.0%} on {accuracy['labelled']} labelled statements"
    if accuracy["reliable"]:
        return f"judge accuracy {pct}"
    return f"UNRELIABLE: judge accuracy {pct}, under {accuracy['threshold']:.0%}"


def measure(model: Any, tokenizer: Any, *, batch_size: int, labels: Sequence[dict[str, Any]] | None = None,
            progress: bool = False) -> tuple[dict[str, Any], list[Verdict]]:
    """Run the judge on the labelled set: (:func:`judge_accuracy`, its verdicts)."""
    labels = load_labels() if labels is None else labels
    verdicts = judge(model, tokenizer, [(r["answer"], r["statement"]) for r in labels], batch_size=batch_size,
                     progress=progress)
    return judge_accuracy(verdicts, labels), verdicts


# --------------------------------------------------------------------------- scores
def coverage(met: Sequence[Sequence[bool | None]]) -> tuple[np.ndarray, int, int]:
    """Per question, the share of its judged statements that are met (NaN where none was judged or it has
    none), the number of judgements and how many were not judged."""
    scores = np.full(len(met), np.nan)
    total = unjudged = 0
    for i, verdicts in enumerate(met):
        judged = [v for v in verdicts if v is not None]
        total += len(verdicts)
        unjudged += len(verdicts) - len(judged)
        if judged:
            scores[i] = float(np.mean(judged))
    return scores, total, unjudged
