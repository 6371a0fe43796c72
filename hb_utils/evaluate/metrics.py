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
* Perplexity lives in :mod:`hb_utils.evaluate.perplexity` (it runs the model; this module only scores).
* Behaviour rates say what ROUGE cannot: does the model stop by itself, how long it talks, whether
  it advises seeing a healthcare professional (advice, not a mere mention; the reference answers'
  own rate is the baseline), and whether it returns nothing or loops.
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

# "Advises seeing a healthcare professional" is ADVICE, not a mention: an imperative or a recommendation
# whose object is a professional ("See a doctor", "You should talk to your provider", "We recommend
# seeing a specialist", "Consultation with a neurologist is recommended"), or to seek medical help.
# Mentions such as "Doctors diagnose it with an MRI", "Consult the references below" or "genetic
# consultation" do not count. Case-insensitive; tests/data/advice_sentences.txt holds the labelled
# sentences that pin the behaviour down.
_PROFESSIONAL = r"""(?:
    doctors?|physicians?|gps?|general\ practitioners?|family\ practitioners?
  | (?:health\ ?care|health|medical|mental\ health|primary\ care)\ (?:providers?|professionals?|practitioners?|teams?|workers?)
  | (?<!insurance\ )(?<!service\ )(?<!internet\ )providers?|clinicians?|nurses?(?:\ practitioners?)?|pharmacists?
  | specialists?|professionals?|(?:care|medical)\ teams?|(?:genetic\ )?counsell?ors?|therapists?|dentists?|surgeons?|midwi(?:fe|ves)
  | dietitians?|nutritionists?|p(?:a)?ediatricians?|obstetricians?|optometrists?|psychiatrists?|allergists?|geneticists?
  | (?:neuro|cardio|dermato|gastroentero|endocrino|rheumato|uro|gyn(?:a)?eco|onco|ophthalmo|psycho|audio|h(?:a)?emato
     |nephro|pulmono|immuno)logists?
)\b"""
# Words allowed between the verb and the professional: "see [your family] doctor", "ask [a qualified] nurse".
_MODIFIERS = r"""(?:(?:your|a|an|the|their|his|her|our|my|one|another|[\w-]+'s|childs|babys|own|family|local|regular|usual
  |personal|qualified|licensed|trained|certified|board-certified|experienced|treating|primary|general|medical|health|mental)\s+){0,4}
  (?:[\w-]+\s+)?"""  # and one word of any kind: "a foot doctor", "a genetics professional"
_ADVICE_VERB = r"""(?:
    see(?:ing)?|visit(?:ing)?|consult(?:ing)?(?:\s+with)?|(?:talk|speak)(?:ing)?\s+(?:to|with)|ask(?:ing)?
  | contact(?:ing)?|call(?:ing)?|phon(?:e|ing)|tell(?:ing)?|inform(?:ing)?|notify(?:ing)?|let(?:ting)?
  | check(?:ing)?\s+(?:in\s+)?with|follow(?:ing)?[\s-]up\s+with|work(?:ing)?\s+with|go(?:ing)?\s+(?:back\s+)?to
  | get(?:ting)?\s+in\s+touch\s+with|reach(?:ing)?\s+out\s+to
  | be\s+(?:[\w-]+\s+){0,3}?(?:seen|evaluated|examined|checked|assessed|treated|followed|monitored|referred|reported
     |discussed)\s+(?:by|to|with)
  | (?:seek|seeking|get|getting|obtain|obtaining)\s+(?:an?\s+)?(?:[\w-]+\s+)?(?:help|advice|care|treatment|guidance|support|opinion
     |evaluation|assessment)\s+from
  | (?:ask(?:ing)?\s+for|get(?:ting)?|request(?:ing)?)\s+a\s+referral\s+to
  | (?:make|making|schedule|scheduling|book|booking|arrange|arranging)\s+(?:an?\s+)?(?:appointment|visit|consultation|check-?up)\s+(?:with|to\s+see)
  | discuss(?:ing)?(?:\s+[\w',-]+){0,8}?\s+with
)"""
# What makes the verb advice: the start of a sentence or clause (an imperative), a modal or a recommendation.
_CUE = r"""(?:
    (?:^|(?<=[.!?;:,()"\-])|(?<=\band)|(?<=\bor)|(?<=\bthen))\s*
  | \b(?:please|should|must|ought\s+to|needs?\s+to|(?:may|might)\s+(?:want|need|wish)\s+to|you\s+(?:can|could|may|might)
     |be\s+sure\s+to|make\s+sure\s+(?:to|you)|remember\s+to|do(?:n't|\s+not)\s+hesitate\s+to|consider|try\s+to
     |it(?:'s|\s+is)\s+(?:\w+\s+){0,2}?(?:important|best|wise|advisable|recommended|essential|a\s+good\s+idea|helpful|necessary)\s+to
     |(?:is|are)\s+to|(?:is|are)\s+(?:strongly\s+)?(?:advised|encouraged|recommended|urged)\s+to
     |(?:recommend|advise|suggest|encourage|urge)(?:s|d|ed)?(?:\s+that)?(?:\s+[\w'-]+){0,3}?(?:\s+to)?
    )\s+
)(?:(?:please|always|also|so|first|now|just|immediately|promptly|instead|therefore|then)\s+)*"""
_SEEK_HELP = r"""(?:seek|seeking|get|getting|obtain|need|receive)\s+(?:\w+\s+)?(?:medical|professional|emergency)\s+
  (?:help|attention|care|advice|treatment|evaluation)
  | go\s+to\s+(?:the\s+|an\s+|your\s+)?(?:nearest\s+)?(?:emergency\s+(?:room|department)|er|hospital)\b
  | call\s+(?:911|999|112|an\s+ambulance|emergency\s+services)"""
_RECOMMENDED = r"""\b(?:consultation|evaluation|diagnosis|treatment|care|supervision|monitoring|follow-?up|referral|assessment
  |visits?|an\s+appointment|check-?ups?)(?:\s+[\w-]+){0,3}?\s+(?:with|by|to)\s+""" + _MODIFIERS + _PROFESSIONAL + r"""(?:\s+[\w'-]+){0,4}?\s+(?:is|are|may\s+be|should\s+be|can\s+be)\s+
  (?:\w+\s+)?(?:recommended|advised|important|suggested|encouraged|essential|needed|necessary|helpful)"""
ADVICE_PATTERNS = (
    _CUE + _ADVICE_VERB + r"\s+" + _MODIFIERS + _PROFESSIONAL,  # see / talk to / ask ... a professional
    _CUE + r"(?:" + _SEEK_HELP + r")",  # seek medical attention, go to the emergency room
    _RECOMMENDED,  # consultation with a specialist is recommended
)
DISCLAIMER_PATTERNS = ADVICE_PATTERNS  # the older name (notebook 05 cites it)
_ADVICE_RE = re.compile("|".join(f"(?:{p})" for p in ADVICE_PATTERNS), re.IGNORECASE | re.VERBOSE | re.MULTILINE)
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
def advises_professional(text: str) -> bool:
    """True when the text *advises* seeing or asking a healthcare professional (ADVICE_PATTERNS):
    "Talk to your doctor", "You should see a specialist", "Seek medical attention". Merely mentioning
    one ("Doctors diagnose it with an MRI") does not count, which is what a rate of 'advises a
    professional' has to measure."""
    return bool(_ADVICE_RE.search(text))


def has_disclaimer(text: str) -> bool:
    """The per-example ``disclaimer`` flag of the evaluation: :func:`advises_professional`."""
    return advises_professional(text)


def reference_advice_rate(references: Sequence[str], *, samples: int, seed: int,
                          confidence: float = 0.95) -> dict[str, float]:
    """Share of reference answers that advise seeing a professional, with its bootstrap interval.

    The baseline for the ``disclaimer`` rate of base and fine-tuned: a fine-tuned model that imitates
    the references should approach this rate, not 100%. Same seed and samples as
    :func:`compare_systems`, hence the same resampled indices as the systems' intervals."""
    return bootstrap_ci(mean_statistic(np.array([float(advises_professional(t)) for t in references])),
                        len(references), samples=samples, seed=seed, confidence=confidence)


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
    and ``p_not_better``: the share of bootstrap resamples in which the new system is not better
    (difference <= 0, or >= 0 when lower is better; left out when ``higher_is_better`` is None).

    ``p_not_better`` is NOT a p-value: no null hypothesis is tested, and the resamples are drawn around
    the observed difference, not under "no difference". Read it as how often the improvement vanishes
    when the examples are resampled, and label it "share of resamples not better"."""
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
