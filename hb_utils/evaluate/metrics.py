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
  own rate is the baseline; :func:`advice_pattern_scores` measures the patterns' precision and recall
  on a labelled list), and whether it returns nothing or loops.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

from hb_utils.errors import DataError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# "Advises seeing a healthcare professional" is ADVICE, not a mention: an imperative or a recommendation
# whose object is a professional ("See a doctor", "You should talk to your provider", "We recommend
# seeing a specialist", "Consultation with a neurologist is recommended", "A doctor should examine any
# mole that changes", "Have a dermatologist take a look"), or to seek medical help ("needs prompt medical
# attention"). Mentions such as "Doctors diagnose it with an MRI", "Consult the references below", "genetic
# consultation", "Seeing a doctor regularly was associated with ..." or "Researchers, however, consult
# with geneticists" do not count. Case-insensitive; tests/data/advice_sentences.txt holds the labelled
# sentences that pin the behaviour down, and advice_pattern_scores() measures precision and recall on them.
# The patterns are compiled with re.VERBOSE: a literal space is written "\ " or "\s".
_PROFESSIONAL = r"""(?:
    doctors?|physicians?|gps?|general\ practitioners?|family\ practitioners?
  | (?:health\ ?care|health|medical|mental\ health|primary\ care)
    \ (?:providers?|professionals?|practitioners?|teams?|workers?)
  | (?<!insurance\ )(?<!service\ )(?<!internet\ )providers?|clinicians?|nurses?(?:\ practitioners?)?|pharmacists?
  | specialists?|professionals?|(?:genetic\ )?counsell?ors?|(?:physio)?therapists?|dentists?|surgeons?|midwi(?:fe|ves)
  | (?:care|medical|diabetes|cancer|transplant|treatment|surgical|palliative|rehabilitation)\ teams?
  | dietitians?|nutritionists?|p(?:a)?ediatricians?|obstetricians?|optometrists?|opticians?|podiatrists?|psychiatrists?
  | allergists?|geneticists?|prescribers?|ear,?\ nose,?\ and\ throat\ (?:doctors?|specialists?|surgeons?)
  | (?!(?:bio|socio|epidemio|techno|geo|zoo|eco|anthropo|archaeo|meteoro|theo|ideo|crimino|musico)log)\w+ologists?
)\b"""
# Words allowed between the verb and the professional: "see [your family] doctor", "ask [a qualified] nurse",
# "get to [an eye clinic or a] doctor", and up to two words of any kind but a preposition, article or "and"/"or":
# "a foot doctor", "their anticoagulation clinic nurse"; not "tell the family about the specialist".
_MODIFIERS = r"""(?:(?:an?|the|your)\s+(?:[\w-]+\s+){1,3}?(?:or|and)\s+)?
  (?:(?:your|a|an|the|their|his|her|our|my|one|another|[\w-]+['’]s|childs|babys|own|family|local|regular|usual
  |personal|qualified|licensed|trained|certified|board-certified|experienced|treating|primary|general|medical|health|mental)\s+){0,4}
  (?:(?!(?:about|after|at|before|for|from|in|of|on|to|with|by|and|or|the|a|an)\s)[\w-]+\s+){0,2}"""
# Advice verbs in two forms, imperative and gerund. The imperative form counts after any cue (the start of a
# clause, a modal, "it is important to"); the gerund only after a cue that takes one ("consider seeing",
# "we recommend talking to", "don't put off seeing"): a gerund that starts a sentence is a subject or an
# adjective ("Seeing a doctor regularly was associated with ...", "Visiting nurses provide care").
_OBJECT = r"(?:\s+[\w'’-]+){1,4}?"  # run [the new dose] past, clear [it] with
# What completes some verbs before the professional: "be [seen] by", "seek [advice] from", "book [an appointment] with".
_PASSIVE = r"""(?:\s+[\w-]+){0,3}?\s+(?:seen|evaluated|examined|checked(?:\s+out)?|assessed|treated|followed|monitored
  |referred|reported|discussed|looked\s+at|reviewed|inspected|tested|confirmed|diagnosed|managed)\s+(?:by|to|with)"""
_FROM = r"""\s+(?:an?\s+)?(?:[\w-]+\s+)?(?:help|advice|care|treatment|guidance|support|opinion|evaluation
  |assessment)\s+from"""
_APPOINTMENT = r"""\s+(?:an?\s+)?(?:[\w-]+\s+)?(?:appointment|visit|consultation|check-?up)\s+(?:with|to\s+see|to)"""
_VERBS = (  # (imperative, gerund, what follows the verb before the professional)
    (r"see", r"seeing", ""),
    (r"visit", r"visiting", ""),
    (r"meet(?:\s+with)?", r"meeting(?:\s+with)?", ""),
    (r"consult(?:\s+with)?", r"consulting(?:\s+with)?", ""),
    (r"(?:talk|speak)\s+(?:to|with)", r"(?:talking|speaking)\s+(?:to|with)", ""),
    (r"(?:ask|contact|call|ring|phone|tell|inform|notify|let)",
     r"(?:asking|contacting|calling|ringing|phoning|telling|informing|notifying|letting)", ""),
    (r"(?:double-)?check\s+(?:in\s+)?with", r"(?:double-)?checking\s+(?:in\s+)?with", ""),
    (r"(?:run|check|clear|review|go\s+over|go\s+through)", r"(?:running|checking|clearing|reviewing|going\s+over"
     r"|going\s+through)", _OBJECT + r"\s+(?:by|past|with)"),
    (r"follow[\s-]up\s+with", r"following[\s-]up\s+with", ""),
    (r"work\s+with", r"working\s+with", ""),
    (r"(?:go|get)", r"(?:going|getting)", r"(?:\s+(?:back|yourself|him|her|them|your\s+[\w-]+))?\s+to"),
    (r"(?:take|bring)", r"(?:taking|bringing)",
     r"\s+(?:yourself|him|her|them|your\s+[\w-]+|the\s+(?:child|baby|patient))\s+(?:back\s+)?to"),
    (r"get\s+in\s+touch\s+with", r"getting\s+in\s+touch\s+with", ""),
    (r"reach\s+out\s+to", r"reaching\s+out\s+to", ""),
    (r"(?:be|get)", r"(?:being|getting)", _PASSIVE),
    (r"(?:seek|get|obtain)", r"(?:seeking|getting|obtaining)", _FROM),
    (r"(?:ask\s+for|get|request)\s+a\s+referral\s+to", r"(?:asking\s+for|getting|requesting)\s+a\s+referral\s+to", ""),
    (r"(?:make|schedule|book|arrange)", r"(?:making|scheduling|booking|arranging)", _APPOINTMENT),
    (r"discuss(?:\s+[\w'’,-]+){0,8}?\s+with", r"discussing(?:\s+[\w'’,-]+){0,8}?\s+with", ""),
)
# "have / get / let / keep" + professional + what they are to do: "Have a dermatologist take a look",
# "get a doctor to check it", "keep your care team informed".
_CAUSATIVE = (r"(?:have|get|let|keep)", r"(?:having|getting|letting|keeping)")
_CAUSATIVE_END = r"""(?:\s+to)?\s+(?:look|take\s+a\s+look|check|examine|evaluate|assess|review|inspect|test|see
  |go\s+over|know|informed|updated|up\s+to\s+date|in\s+the\s+loop)\b"""
_IMPERATIVE, _GERUND = 0, 1


def _advice_verb(form: int) -> str:
    """The advice verbs in one form (_IMPERATIVE or _GERUND), each with its completion, then the professional."""
    return r"(?:" + "|".join(v[form] + v[2] for v in _VERBS) + r")\s+" + _MODIFIERS + _PROFESSIONAL


def _causative(form: int) -> str:
    return _CAUSATIVE[form] + r"\s+" + _MODIFIERS + _PROFESSIONAL + _CAUSATIVE_END


# A clause start: the start of the text or a sentence, or after a comma, parenthesis, "and", "or", "then".
_CLAUSE_START = r"(?:^|(?<=[.!?;:,()\"\-])|(?<=\band)|(?<=\bor)|(?<=\bthen))\s*"
# Not after a comma that closes a parenthetical behind a short subject: "Researchers, however, consult with ..."
# (but "If it bleeds, however, see a doctor" is advice). advises_professional() drops those two commas first.
_PARENTHETICALS = ("however", "though", "therefore", "thus", "also", "too", "instead", "meanwhile", "moreover",
                   "furthermore", "then", "typically", "usually", "often", "sometimes", "generally", "likewise",
                   r"in\sturn", r"in\spractice", r"in\sgeneral", r"in\scontrast", r"by\scontrast", r"in\sparticular",
                   r"for\sexample", r"for\sinstance", r"of\scourse", r"as\sa\srule", r"in\smost\scases",
                   r"in\ssome\scases", r"in\smany\scases", r"on\saverage", r"e\.g\.", r"i\.e\.")
_SUBJECT_PARENTHETICAL = re.compile(
    r"(^|[.!?]\s+)((?!(?:if|when|whenever|before|after|while|once|unless|until|although|though|because|since|as|in|for"
    r"|at|on|during|to|with|without|by|from|of)\b)[\w'’-]+(?:\s+[\w'’-]+){0,4}),\s+("
    + "|".join(_PARENTHETICALS) + r"),",
    re.IGNORECASE | re.MULTILINE)
_NOT = r"(?<!\bnot\s)(?<!n't\s)(?<!n’t\s)(?<!\bnever\s)(?<!\brarely\s)(?<!\bseldom\s)(?<!\bno\s)"
_ADVERBS = r"""(?:(?:please|always|also|so|first|now|just|immediately|promptly|instead|therefore|then|definitely|still
  |regularly|do|go|go\s+and|come\s+and)\s+)*"""
# A cue that makes an imperative (or a "to" infinitive) advice.
_CUE = r"""(?:""" + _CLAUSE_START + r"""
  | \b(?:please|should|must|ought\s+to|""" + _NOT + r"""needs?\s+to
     |(?:may|might)\s+(?:also\s+|still\s+)?(?:want|need|wish)\s+to
     |you\s+(?:can|could|may|might)|be\s+sure\s+to|make\s+sure\s+(?:to|you)|remember\s+to
     |do(?:n['’]t|\s+not)\s+hesitate\s+to|try\s+to
     |it(?:['’]s|\s+is|\s+(?:would|could|may|might)\s+be)\s+(?:(?!not\b|never\b)\w+\s+){0,2}?
        (?:important|best|wise|advisable|recommended|essential|a\s+good\s+idea|helpful|necessary|vital|crucial)
        (?:(?:\s+for(?:\s+[\w'’-]+){1,3}?)?\s+to|\s+that\s+(?:you|they|he|she|we|patients|people)(?:\s+should)?)
     |it(?:['’]s|\s+is|\s+may\s+be|\s+might\s+be)\s+(?:\w+\s+)?time\s+to
     |(?:is|are)\s+to|(?:is|are)\s+(?:strongly\s+)?(?:advised|encouraged|recommended|urged)\s+to
     |(?:recommend|advise|suggest|encourage|urge)(?:s|d|ed)?(?:\s+that)?(?:\s+[\w'’-]+){0,3}?(?:\s+to)?
    )\s+
)""" + _ADVERBS
# A cue that takes a gerund: "consider seeing", "we recommend talking to", "don't put off seeing", "it is worth asking".
_GERUND_CUE = r"""(?:\b(?:consider|try|think\s+about|(?:it(?:['’]s|\s+is)\s+)?(?:well\s+)?worth
  |(?:don['’]t|do\s+not|never)\s+(?:put\s+off|delay|postpone|avoid|wait\s+before)
  |(?:recommend|advise|suggest|encourage|urge)(?:s|d|ed)?)
  | """ + _CLAUSE_START + r"""(?:start|begin|keep)  # as imperatives only: "Keep seeing your dentist"
)\s+""" + _ADVERBS
_SEEK_HELP = r"""(?:seek|seeking|get|getting|obtain|need|receive)\s+(?:\w+\s+)?(?:medical|professional|emergency)\s+
  (?:help|attention|care|advice|treatment|evaluation)
  | go\s+to\s+(?:the\s+|an\s+|your\s+)?(?:nearest\s+)?(?:emergency\s+(?:room|department)|er|hospital)\b
  | (?:call|ring|dial|phone)\s+(?:911|999|112|111|an\s+ambulance|emergency\s+services)"""
# "needs prompt medical attention", "warrants immediate medical evaluation", "requires urgent evaluation by a doctor";
# not "never needs medical treatment", and care or treatment only when urgent ("needs medical care" describes).
_URGENT = r"(?:prompt|immediate|urgent|emergency|quick|rapid|timely|same-day|early|expert)"
_NEEDS_CARE = (r"\b" + _NOT + r"(?<!\bwho\s)(?<!\bthat\s)"
               r"(?:needs|requires|warrants|deserves|merits|calls\s+for)\s+(?:an?\s+)?"
               r"(?:" + _URGENT + r"(?:\s*,?\s+(?:and\s+)?" + _URGENT + r")*\s+(?:medical|professional|specialist)\s+"
               r"(?:attention|evaluation|assessment|advice|help|care|treatment|review|examination)"
               r"|(?:medical|professional|specialist)\s+(?:attention|evaluation|assessment|advice|examination)\b"
               r"|(?:" + _URGENT + r"\s+)?(?:attention|evaluation|assessment|examination|review|treatment|care"
               r"|a\s+check(?:-?up)?)\s+(?:by|from)\s+" + _MODIFIERS + _PROFESSIONAL + r")")
_RECOMMENDATION = r"""(?:recommended|advised|advisable|important|suggested|encouraged|essential|needed|necessary|helpful
  |crucial|vital|wise|sensible|worthwhile|a\s+good\s+idea|the\s+(?:best|safest|first)\s+(?:way|step|option|course|thing))"""
_RECOMMENDED = (r"""\b(?:consultation|evaluation|diagnosis|treatment|care|supervision|monitoring|follow-?up|referral
  |assessment|visits?|trips?|reviews?|sessions?|meetings?|an\s+appointment|check-?ups?)(?:\s+[\w-]+){0,3}?
  \s+(?:with|by|to)\s+""" + _MODIFIERS + _PROFESSIONAL
                + r"""(?:\s+[\w'’-]+){0,4}?\s+(?:is|are|may\s+be|should\s+be|can\s+be)\s+(?:\w+\s+)?"""
                + _RECOMMENDATION)
# A gerund that is the subject of a recommendation: "Seeing an eye doctor every two years is recommended",
# "Talking to a counselor can help"; not "Seeing a doctor regularly was associated with ...".
_GERUND_RECOMMENDED = (_CLAUSE_START + _advice_verb(_GERUND) + r"""(?:\s+[\w'’-]+){0,6}?\s+
  (?:(?:is|are|may\s+be|can\s+be|would\s+be|will\s+be)\s+(?:\w+\s+)?""" + _RECOMMENDATION
                       + r"|(?:can|may|might|will|could|often)\s+help)\b")
# A professional as the subject of advice: "A doctor should examine any mole that changes", "Your doctor should
# know if you are pregnant", "A pharmacist is the best person to ask"; not "Physicians should monitor kidney
# function" (guidance for professionals, no determiner) or "The surgeon must remove the cyst".
_SUBJECT_ADVICE = (_CLAUSE_START + r"""(?:a|an|your|their|his|her|our|my|one['’]s)\s+(?:[\w'’-]+\s+){0,2}?"""
                   + _PROFESSIONAL + r"""(?:\s+or\s+(?:a\s+|an\s+|your\s+)?(?:[\w-]+\s+)?""" + _PROFESSIONAL + r""")?
  \s+(?:should|must|ought\s+to|needs\s+to|has\s+to)\s+(?:always\s+|also\s+|first\s+|then\s+|promptly\s+|immediately\s+)?
  (?:examine|check|look\s+at|take\s+a\s+look|see|evaluate|assess|review|inspect|go\s+over|hear\s+about
   |know\s+(?:about|if|whether|that|when|what|which)|be\s+(?:told|informed|consulted|contacted|called|notified|involved))\b
  | \b(?:a|an|your|their|his|her|our|my)\s+(?:[\w'’-]+\s+){0,2}?""" + _PROFESSIONAL
                   + r"""\s+(?:is|are|will\s+be|would\s+be)\s+(?:the|your)\s+(?:best|right|ideal|first)
  \s+(?:person|people|one|port\s+of\s+call|contact)\s+(?:to|for)\b""")
_BEST_SEEN_BY = r"""\b(?:is|are)\s+best\s+(?:\w+\s+)?(?:seen|checked|examined|evaluated|assessed|treated|managed
  |looked\s+at|handled|discussed|reviewed|diagnosed)(?:\s+out)?\s+(?:by|with)\s+""" + _MODIFIERS + _PROFESSIONAL
_MAKE_SURE = (_CUE + r"(?:make\s+sure|ensure|be\s+sure)\s+(?:that\s+)?" + _MODIFIERS + _PROFESSIONAL
              + r"\s+(?:knows|is\s+(?:aware|told|informed)|has\s+been\s+told|has\s+a\s+(?:copy|list))\b")
ADVICE_PATTERNS = (
    _CUE + _advice_verb(_IMPERATIVE),  # see / talk to / ask / be seen by ... a professional
    _CUE + _causative(_IMPERATIVE),  # have a dermatologist take a look, keep your care team informed
    _GERUND_CUE + _advice_verb(_GERUND),  # consider talking to a counselor
    _GERUND_CUE + _causative(_GERUND),  # it is worth having a nurse check it
    _CUE + r"(?:" + _SEEK_HELP + r")",  # seek medical attention, go to the emergency room
    _NEEDS_CARE,  # needs prompt medical attention
    _RECOMMENDED,  # consultation with a specialist is recommended
    _GERUND_RECOMMENDED,  # seeing a specialist is recommended
    _SUBJECT_ADVICE,  # a doctor should examine it; your pharmacist is the best person to ask
    _BEST_SEEN_BY,  # moles are best checked by a dermatologist
    _MAKE_SURE,  # make sure your surgeon knows
)
DISCLAIMER_PATTERNS = ADVICE_PATTERNS  # the older name (notebook 05 cites it)
_ADVICE_RE = re.compile("|".join(f"(?:{p})" for p in ADVICE_PATTERNS), re.IGNORECASE | re.VERBOSE | re.MULTILINE)
# Every pattern needs one of these words in the sentence it matches, so only such sentences are searched (a
# matter of speed on long answers; no pattern reaches over a sentence end, where a sentence start begins a clause).
_KEYWORD_RE = re.compile(
    _PROFESSIONAL + r"|\b(?:medical|professional|emergency|hospital|ambulance|er|911|999|112|111)\b",
    re.IGNORECASE | re.VERBOSE)
_SENTENCE_BOUNDARY = re.compile(r"(?<=[.!?])\s+")
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
    professional' has to measure. The commas around a parenthetical behind a short subject are dropped
    first ("Researchers, however, consult with geneticists" is not an imperative)."""
    text = _SUBJECT_PARENTHETICAL.sub(r"\1\2 \3", text)
    return any(_ADVICE_RE.search(s) for s in _SENTENCE_BOUNDARY.split(text) if _KEYWORD_RE.search(s))


def has_disclaimer(text: str) -> bool:
    """The per-example ``disclaimer`` flag of the evaluation: :func:`advises_professional`."""
    return advises_professional(text)


def read_labelled_advice(path: str | Path) -> list[tuple[str, bool]]:
    """The labelled sentences of ``path``: one ``label<TAB>sentence`` a line, 1 = advice, 0 = not advice;
    blank lines and ``#`` comments skipped. A malformed line is an error, so a typo cannot drop a sentence
    silently from the measured precision and recall."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        label, sep, sentence = line.partition("\t")
        if not sep or label not in ("0", "1") or not sentence.strip() or "\t" in sentence:
            raise DataError(f"{path}, line {number}: expected '1<TAB>sentence' or '0<TAB>sentence', got {line!r}; "
                            "fix the line or comment it out with '#'")
        rows.append((sentence, label == "1"))
    return rows


def advice_pattern_scores(path: str | Path,
                          predict: Callable[[str], bool] = advises_professional) -> dict[str, Any]:
    """Precision and recall of ``predict`` (the advice patterns by default) on a labelled list.

    The instrument behind the ``disclaimer`` rate is a set of regular expressions, so its own accuracy is
    reported next to the rate: precision = share of flagged sentences that are advice, recall = share of
    advice sentences flagged. ``false_positives`` and ``false_negatives`` list the sentences it gets wrong."""
    rows = read_labelled_advice(path)
    flagged = [(sentence, advice, bool(predict(sentence))) for sentence, advice in rows]
    tp = sum(advice and hit for _, advice, hit in flagged)
    fp = [sentence for sentence, advice, hit in flagged if hit and not advice]
    fn = [sentence for sentence, advice, hit in flagged if advice and not hit]
    positives = sum(advice for _, advice in rows)
    return {
        "n": len(rows), "advice": positives, "not_advice": len(rows) - positives,
        "tp": tp, "fp": len(fp), "fn": len(fn), "tn": len(rows) - positives - len(fp),
        "precision": tp / (tp + len(fp)) if tp + len(fp) else float("nan"),
        "recall": tp / positives if positives else float("nan"),
        "false_positives": fp, "false_negatives": fn,
    }


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
