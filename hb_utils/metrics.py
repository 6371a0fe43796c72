"""Evaluation metrics: ROUGE, BLEU, bootstrap confidence intervals, behaviour rates.

Why this module exists, and what it fixes in the original notebook's evaluation:

* Text overlap comes from the reference implementations, called locally: ``rouge-score``
  (Google's re-implementation of ROUGE-1.5.5, ``use_stemmer=True``) and ``sacrebleu`` (corpus
  BLEU, 13a tokenisation). Never ``evaluate.load`` (a Hub download of code at run time). The
  names and versions are written next to every number (:func:`implementations`).
* ROUGE-Lsum needs one sentence per line; answers are split into sentences with a simple
  punctuation rule (:func:`sentences_per_line`) because nltk's punkt model cannot be downloaded.
* Every generation metric gets a seeded 95% bootstrap interval over *examples*, and base vs
  fine-tuned gets a *paired* bootstrap (the same resampled indices for both systems), because 20
  questions without an interval cannot tell a real improvement from noise. BLEU is a corpus
  metric, so each resample recomputes corpus BLEU from per-example sufficient statistics (the
  method of sacrebleu's own ``significance`` module), not a mean of sentence BLEUs.
* Perplexity lives in :mod:`hb_utils.perplexity` (it runs the model; this module only scores).
* Behaviour rates say what ROUGE cannot: does the model stop by itself, how long it talks, whether
  it points to a healthcare professional, and whether it returns nothing or loops.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from importlib.metadata import version
from typing import Any

import numpy as np
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# Phrases that count as "advises seeing a healthcare professional" (case-insensitive, whole words).
DISCLAIMER_PATTERNS = (
    r"\bdoctors?\b",
    r"\bphysicians?\b",
    r"\bhealth ?care (?:provider|professional|team|practitioner)s?\b",
    r"\bmedical (?:professional|provider|practitioner|advice|attention|help|care)s?\b",
    r"\b(?:qualified|licensed) (?:health|medical)\w*\b",
    r"\bconsult(?:s|ed|ing|ation)?\b",
    r"\bseek (?:immediate |prompt |professional )?(?:medical|professional|emergency) (?:help|care|advice|attention)\b",
    r"\b(?:see|visit|talk to|speak (?:to|with)|ask) (?:a |your )?(?:gp|specialist|pharmacist|nurse)\b",
)
_DISCLAIMER_RE = re.compile("|".join(DISCLAIMER_PATTERNS), re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def implementations() -> dict[str, str]:
    """Names, versions and settings of the metric implementations, stored next to the numbers."""
    bleu = _bleu()
    bleu.corpus_score(["x"], [["x"]])  # the signature is only known once references were seen
    return {
        "rouge": f"rouge-score {version('rouge-score')} (F-measure, use_stemmer=True, "
                 "rougeLsum on punctuation-split sentences, one per line; scale 0-1)",
        "bleu": f"sacrebleu {version('sacrebleu')} corpus BLEU, signature {bleu.get_signature()} (scale 0-100)",
        "bootstrap": "percentile bootstrap over examples, numpy.random.default_rng(seed); paired for deltas",
        "perplexity": "exp(total answer NLL / total answer tokens); prompt (chat template) masked",
    }


# --------------------------------------------------------------------------- text overlap
def sentences_per_line(text: str) -> str:
    """One sentence per line (split after . ! ? and at newlines), as ROUGE-Lsum expects."""
    return "\n".join(s.strip() for s in _SENTENCE_END.split(text.strip()) if s.strip())


def rouge_per_example(predictions: Sequence[str], references: Sequence[str]) -> dict[str, np.ndarray]:
    """ROUGE-1/2/L/Lsum F-measure (0-1) of each prediction against its reference."""
    _check_lengths(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    out = {k: np.zeros(len(predictions)) for k in ROUGE_TYPES}
    for i, (pred, ref) in enumerate(zip(predictions, references, strict=True)):
        scores = scorer.score(sentences_per_line(ref), sentences_per_line(pred))  # (target, prediction)
        for k in ROUGE_TYPES:
            out[k][i] = scores[k].fmeasure
    return out


def _bleu() -> BLEU:
    return BLEU()  # sacrebleu defaults: 13a tokeniser, exp smoothing, mixed case


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) with one reference per prediction."""
    _check_lengths(predictions, references)
    return float(_bleu().corpus_score(list(predictions), [list(references)]).score)


def bleu_statistics(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Per-example BLEU sufficient statistics (lengths, n-gram matches and totals), shape (n, 10).

    Summing rows of any subset and calling :func:`bleu_from_statistics` gives that subset's corpus
    BLEU, which makes a bootstrap over examples cheap."""
    _check_lengths(predictions, references)
    return np.asarray(_bleu()._extract_corpus_statistics(list(predictions), [list(references)]), dtype=np.int64)


def bleu_from_statistics(stats: np.ndarray) -> float:
    """Corpus BLEU (0-100) from summed (or per-example, summed here) sufficient statistics."""
    summed = stats.sum(axis=0) if stats.ndim == 2 else stats
    return float(_bleu()._compute_score_from_stats(summed.tolist()).score)


# --------------------------------------------------------------------------- behaviour
def has_disclaimer(text: str) -> bool:
    """True when the text advises consulting a doctor / healthcare professional (DISCLAIMER_PATTERNS)."""
    return bool(_DISCLAIMER_RE.search(text))


def _tokens(text: str) -> list[str]:
    return _TOKEN_RE.findall(text.lower())


def repeated_ngram_ratio(text: str, n: int = 4) -> float:
    """Share of the text's word n-grams that repeat an earlier one (0 = no repetition)."""
    toks = _tokens(text)
    grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def is_looping(text: str, *, min_repeats: int = 3, min_span: int = 9, max_period: int = 40,
               ngram_ratio: float = 0.5, min_ngrams: int = 20) -> bool:
    """A degenerate repetition loop, in either of two forms.

    1. A unit of ``p`` tokens (words or punctuation marks, 1 <= p <= max_period) repeated at least
       ``min_repeats`` times back to back, covering at least ``min_span`` tokens ("I am sorry. I am
       sorry. I am sorry." loops; "very very very" is too short to count).
    2. With at least ``min_ngrams`` word 4-grams, at least ``ngram_ratio`` of them repeat an earlier
       one (a cycle of sentences that are not exactly consecutive).
    """
    toks = _tokens(text)
    n = len(toks)
    for p in range(1, min(max_period, n // min_repeats) + 1):
        need = max(min_repeats * p, min_span)
        run = 0  # length of the current stretch where toks[i] == toks[i - p]
        for i in range(p, n):
            run = run + 1 if toks[i] == toks[i - p] else 0
            if run + p >= need:
                return True
    return n - 3 >= min_ngrams and repeated_ngram_ratio(text, 4) >= ngram_ratio


def behaviour_per_example(texts: Sequence[str], n_new_tokens: Sequence[int],
                          stopped: Sequence[bool]) -> dict[str, np.ndarray]:
    """Per-answer behaviour: stopped by itself, words, tokens, disclaimer, empty or looping (0/1)."""
    return {
        "stopped": np.array([float(s) for s in stopped]),
        "words": np.array([float(len(t.split())) for t in texts]),
        "tokens": np.array([float(k) for k in n_new_tokens]),
        "disclaimer": np.array([float(has_disclaimer(t)) for t in texts]),
        "empty_or_loop": np.array([float(not t.strip() or is_looping(t)) for t in texts]),
    }


# --------------------------------------------------------------------------- bootstrap
def bootstrap_indices(n: int, samples: int, seed: int) -> np.ndarray:
    """``samples`` resamples of ``n`` example indices, drawn with replacement (seeded)."""
    if n < 1:
        raise ValueError("bootstrap needs at least one example")
    return np.random.default_rng(seed).integers(0, n, size=(samples, n))


Statistic = Callable[[np.ndarray], float]  # example indices -> metric value


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    lo, hi = np.percentile(values, [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(lo), float(hi)


def bootstrap_ci(stat: Statistic, n: int, *, samples: int, seed: int,
                 confidence: float = 0.95) -> dict[str, float]:
    """The statistic on all examples plus its percentile bootstrap interval."""
    idx = bootstrap_indices(n, samples, seed)
    boot = np.array([stat(row) for row in idx])
    lo, hi = _interval(boot, confidence)
    return {"value": float(stat(np.arange(n))), "ci_low": lo, "ci_high": hi}


def paired_bootstrap(stat_base: Statistic, stat_new: Statistic, n: int, *, samples: int, seed: int,
                     confidence: float = 0.95, higher_is_better: bool | None = True) -> dict[str, float]:
    """new - base on all examples, its interval from the SAME resampled indices for both systems,
    and ``p_not_better``: the share of resamples where the new system is not better (difference
    <= 0, or >= 0 when lower is better; left out when ``higher_is_better`` is None)."""
    idx = bootstrap_indices(n, samples, seed)
    diffs = np.array([stat_new(row) - stat_base(row) for row in idx])
    lo, hi = _interval(diffs, confidence)
    full = np.arange(n)
    out = {"delta": float(stat_new(full) - stat_base(full)), "ci_low": lo, "ci_high": hi}
    if higher_is_better is not None:
        out["p_not_better"] = float(np.mean(diffs <= 0 if higher_is_better else diffs >= 0))
    return out


# Direction of each generation metric: lower is better for loops; lengths have no "better".
HIGHER_IS_BETTER: dict[str, bool | None] = {"empty_or_loop": False, "words": None, "tokens": None}


def mean_statistic(values: np.ndarray) -> Statistic:
    return lambda idx: float(np.mean(values[idx]))


def generation_statistics(texts: Sequence[str], references: Sequence[str], n_new_tokens: Sequence[int],
                          stopped: Sequence[bool]) -> tuple[dict[str, Statistic], dict[str, np.ndarray]]:
    """Every generation metric of one system as a bootstrap-able statistic, plus the per-example
    scores (ROUGE and behaviour) for predictions.jsonl."""
    per_example = {**rouge_per_example(texts, references), **behaviour_per_example(texts, n_new_tokens, stopped)}
    stats = bleu_statistics(texts, references)
    fns: dict[str, Statistic] = {k: mean_statistic(v) for k, v in per_example.items()}
    fns["bleu"] = lambda idx: bleu_from_statistics(stats[idx])
    return fns, per_example


def compare_systems(base: dict[str, Statistic], new: dict[str, Statistic], n: int, *, samples: int,
                    seed: int) -> dict[str, dict[str, Any]]:
    """For each metric: base and fine-tuned value with CI, and the paired delta with CI."""
    return {
        name: {
            "base": bootstrap_ci(base[name], n, samples=samples, seed=seed),
            "finetuned": bootstrap_ci(new[name], n, samples=samples, seed=seed),
            "delta": paired_bootstrap(base[name], new[name], n, samples=samples, seed=seed,
                                      higher_is_better=HIGHER_IS_BETTER.get(name, True)),
        }
        for name in base
    }


# --------------------------------------------------------------------------- selection
def select_first(records: Sequence[dict[str, Any]], size: int | str) -> list[dict[str, Any]]:
    """The first ``size`` records in split order (all of them for ``"all"``): deterministic."""
    if size == "all":
        return list(records)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int or 'all', got {size!r}")
    return list(records[:size])


def _check_lengths(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
