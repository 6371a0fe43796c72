"""External evaluation sets: consumer health questions nobody trained on, and the check that nobody did.

Why this module exists: 04 scores the model on MedQuAD's own test split, whose questions come from the same
agencies and templates as the training pairs. Whether fine-tuning helps with the questions people really
ask needs sets from elsewhere, and MedQuAD was built partly to answer one of them (TREC 2017 LiveQA-Med),
so some MedQuAD answers *are* answers to those questions. A set only measures "unseen" once the training
pairs that leak into it are gone: :func:`find_leaks` finds them with the split's own near-duplicate machinery
(:mod:`hb_utils.data.split`), 02 drops them from the pool before sampling (:func:`drop_leaking`) and 04
checks the run's train and validation pairs again.

Two layouts, detected from the file's content (:func:`detect_format`), any other file is a
:class:`~hb_utils.errors.DataError` naming both:

* **LiveQA XML** (TREC 2017 LiveQA medical test set): ``<NLM-QUESTION qid=…>`` elements holding
  ``<Original-Question><SUBJECT/><MESSAGE/></Original-Question>``, ``<NIST-PARAPHRASE>``, ``<NLM-Summary>`` and
  ``<ReferenceAnswers>`` with one or more ``<ANSWER>`` each. Which question text the model is asked is a choice
  (``liveqa_questions``; :data:`LIVEQA_QUESTIONS`): ``summary`` (the NLM summary: short and clean),
  ``paraphrase`` (the NIST paraphrase) and ``message`` (the subject and message as the consumer wrote them:
  long, misspelt, what a deployed bot receives). Each choice is its own set (``liveqa_summary`` …), scored
  against every reference answer of the question (best match per question, in 04). The leakage check always
  uses every question text of an item, whichever is asked.
* **MedLFQA JSONL** (OLAPH): one object per line with ``Question``, ``Free_form_answer`` and the
  ``Must_have`` / ``Nice_to_have`` statements a good answer contains (judged in 04,
  :mod:`hb_utils.evaluate.judge`).

Items without any reference answer are skipped and counted (``ExternalSet.skipped``).
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hb_utils import run_dir
from hb_utils.data import split
from hb_utils.errors import DataError

# Which LiveQA question text is asked, by name; each one asked makes its own set.
LIVEQA_QUESTIONS = {"summary": "the NLM summary (short, clean)", "paraphrase": "the NIST paraphrase",
                    "message": "the consumer's own subject and message"}
FORMATS = {
    "liveqa_xml": "LiveQA XML: <NLM-QUESTION qid=…> elements with <Original-Question><SUBJECT/><MESSAGE/>, "
                  "<NIST-PARAPHRASE>, <NLM-Summary> and <ReferenceAnswers> holding one or more <ANSWER>",
    "medlfqa_jsonl": "MedLFQA JSONL: one JSON object per line with \"Question\" and \"Free_form_answer\" "
                     "(text) and \"Must_have\" / \"Nice_to_have\" (lists of statements)",
}
EXPECTED = "Expected one of: " + "; ".join(FORMATS.values()) + "."
# Kinds of overlap between an external item and a MedQuAD pair (each kind includes the one above it where
# it is the stricter form: a same question is also a near-duplicate question).
SHARED_ANSWER_SHARE = 0.5
LEAK_KINDS = {
    "same_question": "same normalised question",
    "near_duplicate_question": f"near-duplicate question (word {split.SHINGLE_WORDS}-gram Jaccard >= "
                               f"{split.NEAR_DUPLICATE_JACCARD})",
    "same_answer": "reference answer equal to the pair's answer",
    "near_duplicate_answer": f"near-duplicate answer (word {split.SHINGLE_WORDS}-gram Jaccard >= "
                             f"{split.NEAR_DUPLICATE_JACCARD})",
    "shared_answer": f"answers sharing >= {SHARED_ANSWER_SHARE:.0%} of the shorter one's word "
                     f"{split.SHINGLE_WORDS}-grams (a reference inside a longer answer, or the reverse)",
}
# The same kinds in a few words, for tables and report lines (LEAK_KINDS says what each one means).
LEAK_SHORT = {"same_question": "same question", "near_duplicate_question": "near-duplicate question",
              "same_answer": "same answer", "near_duplicate_answer": "near-duplicate answer",
              "shared_answer": "answers sharing half their 5-grams"}
_SPACE = re.compile(r"\s+")
_CHUNK = 256  # external texts compared at a time (bounds the sparse product's memory)


@dataclass
class ExternalItem:
    """One question of an external set."""

    id: str
    question: str  # the text the model is asked
    references: list[str]  # reference answers (>= 1): 04 scores against the best match
    questions: list[str] = field(default_factory=list)  # every question text of the item (leakage check)
    must_have: list[str] = field(default_factory=list)
    nice_to_have: list[str] = field(default_factory=list)


@dataclass
class ExternalSet:
    """The items of one file, asked with one question text."""

    name: str
    path: str
    format: str
    question_text: str  # what the model is asked (LiveQA: summary / paraphrase / message; MedLFQA: question)
    items: list[ExternalItem]
    skipped: int = 0  # items without a reference answer
    file_name: str = ""  # the name of its file's items (liveqa for liveqa_summary …): leakage is per file

    @property
    def has_statements(self) -> bool:
        return any(item.must_have or item.nice_to_have for item in self.items)

    def info(self) -> dict[str, Any]:
        """What stats.json and eval.json record about the set."""
        return {"name": self.name, "path": self.path, "format": self.format, "question_text": self.question_text,
                "items": len(self.items), "skipped_without_reference": self.skipped,
                "references": sum(len(i.references) for i in self.items),
                "must_have": sum(len(i.must_have) for i in self.items),
                "nice_to_have": sum(len(i.nice_to_have) for i in self.items)}


def _clean(text: str | None) -> str:
    return _SPACE.sub(" ", text or "").strip()


# --------------------------------------------------------------------------- loading
def detect_format(path: Path) -> str:
    """``liveqa_xml`` or ``medlfqa_jsonl`` from the file's first non-blank character (``<`` or ``{``);
    DataError for anything else, naming the layouts expected."""
    if not path.is_file():
        raise DataError(f"External set {str(path)!r} does not exist (or is not a file). Set external_eval to "
                        f"LiveQA XML or MedLFQA JSONL files (paths relative to the repository root). {EXPECTED}")
    with path.open("rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"<"):
        return "liveqa_xml"
    if head.startswith(b"{"):
        return "medlfqa_jsonl"
    raise DataError(f"{path} is neither XML nor JSON lines (it starts with {head[:20]!r}). {EXPECTED}")


def _liveqa_questions(q: ET.Element) -> dict[str, str]:
    subject = _clean(q.findtext("Original-Question/SUBJECT"))
    message = _clean(q.findtext("Original-Question/MESSAGE"))
    # The consumer's own words: the subject line leads when the message does not already repeat it.
    original = message if not subject or subject.lower() in message.lower() else f"{subject}\n{message}".strip()
    return {"summary": _clean(q.findtext("NLM-Summary")), "paraphrase": _clean(q.findtext("NIST-PARAPHRASE")),
            "message": original}


def read_liveqa(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The questions of a LiveQA test file as dicts (``id``, ``texts`` by LIVEQA_QUESTIONS name, ``references``),
    and how many had no reference answer."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise DataError(f"{path} is not well-formed XML ({exc}). {EXPECTED}") from None
    questions = root.findall("NLM-QUESTION")
    if not questions:
        raise DataError(f"{path} holds no <NLM-QUESTION> elements under its root <{root.tag}>. {EXPECTED}")
    rows, skipped = [], 0
    for n, q in enumerate(questions):
        texts = _liveqa_questions(q)
        if not any(texts.values()):
            raise DataError(f"{path}: question {q.get('qid') or n + 1} has no <NLM-Summary>, <NIST-PARAPHRASE> or "
                            f"<Original-Question><MESSAGE>. {EXPECTED}")
        references = [t for t in (_clean("".join(a.itertext())) for a in q.findall("ReferenceAnswers/*/ANSWER")) if t]
        if not references:
            skipped += 1
            continue
        rows.append({"id": q.get("qid") or f"q{n + 1}", "texts": texts, "references": references})
    return rows, skipped


def _statements(value: Any, key: str, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise DataError(f"{where}: {key} must be a list of statements (strings). {EXPECTED}")
    return [t for t in map(_clean, value) if t]


def read_medlfqa(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The rows of a MedLFQA JSONL file as dicts (``id``, ``question``, ``references``, ``must_have``,
    ``nice_to_have``), and how many had no reference answer."""
    rows, skipped = [], 0
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where} is not a JSON object ({exc.msg}). {EXPECTED}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("Question"), str) \
                    or not isinstance(obj.get("Free_form_answer", ""), str):
                keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
                raise DataError(f"{where} has no text \"Question\" / \"Free_form_answer\" (found: {keys}). {EXPECTED}")
            answer = _clean(obj.get("Free_form_answer"))
            if not answer:
                skipped += 1
                continue
            rows.append({"id": f"{path.stem}:{n}", "question": _clean(obj["Question"]), "references": [answer],
                         "must_have": _statements(obj.get("Must_have"), "Must_have", where),
                         "nice_to_have": _statements(obj.get("Nice_to_have"), "Nice_to_have", where)})
    if not rows and not skipped:
        raise DataError(f"{path} holds no rows. {EXPECTED}")
    return rows, skipped


def set_name(path: Path, fmt: str) -> str:
    """The short name of a file's set(s): ``liveqa`` for the LiveQA XML (``liveqa_summary`` … per question
    text), ``medlfqa_<set>`` for ``<set>_test_MedLFQA.jsonl``."""
    if fmt == "liveqa_xml":
        return "liveqa"
    stem = re.sub(r"(_test)?_medlfqa$", "", path.stem.lower())
    return "medlfqa_" + re.sub(r"\W+", "_", stem).strip("_")


def load_file(path: str | Path, liveqa_questions: Sequence[str] = ("summary", "message")) -> list[ExternalSet]:
    """The set(s) of one file: one per LiveQA question text asked, one for a MedLFQA file."""
    resolved = run_dir.resolve(path)
    fmt = detect_format(resolved)
    name = set_name(resolved, fmt)
    if fmt == "medlfqa_jsonl":
        rows, skipped = read_medlfqa(resolved)
        items = [ExternalItem(r["id"], r["question"], r["references"], [r["question"]], r["must_have"],
                              r["nice_to_have"]) for r in rows]
        return [ExternalSet(name, str(path), fmt, "question", items, skipped, name)]
    unknown = [q for q in liveqa_questions if q not in LIVEQA_QUESTIONS]
    if unknown or not liveqa_questions:
        raise DataError(f"liveqa_questions must name one or more of {', '.join(LIVEQA_QUESTIONS)}; got "
                        f"{list(liveqa_questions)!r}.")
    rows, skipped = read_liveqa(resolved)
    sets = []
    for choice in liveqa_questions:
        items = [ExternalItem(r["id"], r["texts"][choice] or next(t for t in r["texts"].values() if t),
                              r["references"], [t for t in r["texts"].values() if t]) for r in rows]
        sets.append(ExternalSet(f"{name}_{choice}", str(path), fmt, choice, items, skipped, name))
    return sets


def load_sets(paths: Sequence[str], liveqa_questions: Sequence[str] = ("summary", "message")) -> list[ExternalSet]:
    """Every set of ``external_eval``, in order; DataError when two share a name (a file listed twice)."""
    sets = [s for p in paths for s in load_file(p, liveqa_questions)]
    names = [s.name for s in sets]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise DataError(f"external_eval gives the set(s) {', '.join(twice)} more than once (a file listed twice, or "
                        "two LiveQA XML files): list each set once.")
    return sets


# --------------------------------------------------------------------------- leakage
@dataclass
class Leaks:
    """Which MedQuAD pairs overlap which external items, per kind (LEAK_KINDS).

    ``pairs[kind]``: a bool per pair (it overlaps some item of the set this way); ``items[kind]``: a bool
    per item (some pair overlaps it this way)."""

    pairs: dict[str, np.ndarray]
    items: dict[str, np.ndarray]

    @property
    def any_pair(self) -> np.ndarray:
        return np.logical_or.reduce(list(self.pairs.values()))

    @property
    def any_item(self) -> np.ndarray:
        return np.logical_or.reduce(list(self.items.values()))

    def counts(self, of: str = "items") -> dict[str, int]:
        """``{kind: count}`` plus ``any``, of items (external questions) or pairs (MedQuAD pairs)."""
        flags = self.items if of == "items" else self.pairs
        return {**{k: int(v.sum()) for k, v in flags.items()},
                "any": int((self.any_item if of == "items" else self.any_pair).sum())}


def _overlaps(owners: np.ndarray, external: Sequence[str], pool: Sequence[str]
              ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(item index, pool index) pairs whose texts are equal, near-duplicates and (for answers) share half
    the shorter one's shingles; ``owners[k]``: the item of external text k. Exact: one sparse product of the
    shingle matrices (:func:`hb_utils.data.split.shingle_matrix`), built over both sides at once so that
    their columns are the same grams."""
    ext_norm = [split.normalize_text(t) for t in external]
    pool_codes, pool_distinct = pd.factorize(pd.Series(list(pool), dtype=object).map(split.normalize_text))
    matrix = split.shingle_matrix(ext_norm + list(pool_distinct))
    ext, distinct = matrix[:len(ext_norm)], matrix[len(ext_norm):]
    size_e, size_d = np.diff(ext.indptr), np.diff(distinct.indptr)
    # pool rows of each distinct text (a text may repeat in the pool)
    order = np.argsort(pool_codes, kind="stable")
    starts = np.searchsorted(pool_codes[order], np.arange(len(pool_distinct) + 1))
    found: dict[str, list[tuple[int, int]]] = {"same": [], "near": [], "shared": []}
    lookup = {t: i for i, t in enumerate(pool_distinct)}
    for k, text in enumerate(ext_norm):
        if text and text in lookup:
            found["same"].append((k, lookup[text]))
    distinct_t = distinct.T.tocsr()
    for lo in range(0, len(ext_norm), _CHUNK):
        inter = (ext[lo:lo + _CHUNK] @ distinct_t).tocoo()
        rows, cols, both = inter.row + lo, inter.col, inter.data
        union = size_e[rows] + size_d[cols] - both
        near = both >= split.NEAR_DUPLICATE_JACCARD * union
        shared = both >= SHARED_ANSWER_SHARE * np.minimum(size_e[rows], size_d[cols])
        found["near"].extend(zip(rows[near], cols[near], strict=True))
        found["shared"].extend(zip(rows[shared], cols[shared], strict=True))
    out = {}
    for kind, pairs in found.items():
        if not pairs:
            out[kind] = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
            continue
        ks, ds = (np.asarray(x, dtype=np.int64) for x in zip(*pairs, strict=True))
        # expand each distinct pool text to its pool rows
        reps = starts[ds + 1] - starts[ds]
        rows_of = np.concatenate([order[starts[d]:starts[d + 1]] for d in ds])
        out[kind] = (owners[np.repeat(ks, reps)], rows_of)
    return out


def _hits(items: Sequence[ExternalItem], questions: Sequence[str], answers: Sequence[str]
          ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{kind: (item indices, pair indices)}``: every overlap (LEAK_KINDS) of an item with a pair."""
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")  # a bug in the caller
    q_owner = np.array([i for i, it in enumerate(items) for _ in (it.questions or [it.question])], dtype=np.int64)
    q_texts = [t for it in items for t in (it.questions or [it.question])]
    a_owner = np.array([i for i, it in enumerate(items) for _ in it.references], dtype=np.int64)
    a_texts = [t for it in items for t in it.references]
    q_found = _overlaps(q_owner, q_texts, questions)
    a_found = _overlaps(a_owner, a_texts, answers)
    return {"same_question": q_found["same"], "near_duplicate_question": q_found["near"],
            "same_answer": a_found["same"], "near_duplicate_answer": a_found["near"],
            "shared_answer": a_found["shared"]}


def _leaks(hits: dict[str, tuple[np.ndarray, np.ndarray]], lo: int, hi: int, n_pairs: int) -> Leaks:
    """The Leaks of items ``lo:hi`` (indexed from 0 again) from the hits of a longer list of items."""
    pairs, flagged = {}, {}
    for kind, (item_idx, pair_idx) in hits.items():
        mine = (item_idx >= lo) & (item_idx < hi)
        pairs[kind] = np.zeros(n_pairs, dtype=bool)
        pairs[kind][pair_idx[mine]] = True
        flagged[kind] = np.zeros(hi - lo, dtype=bool)
        flagged[kind][item_idx[mine] - lo] = True
    return Leaks(pairs, flagged)


def find_leaks_each(item_lists: Sequence[Sequence[ExternalItem]], questions: Sequence[str],
                    answers: Sequence[str]) -> list[Leaks]:
    """:func:`find_leaks` for several sets at once: the pool's texts are normalised and shingled once."""
    bounds = np.cumsum([0, *map(len, item_lists)])
    hits = _hits([it for items in item_lists for it in items], questions, answers)
    return [_leaks(hits, int(bounds[k]), int(bounds[k + 1]), len(questions)) for k in range(len(item_lists))]


def find_leaks(items: Sequence[ExternalItem], questions: Sequence[str], answers: Sequence[str]) -> Leaks:
    """The overlaps (LEAK_KINDS) between external ``items`` and MedQuAD pairs given as parallel ``questions``
    and ``answers``: every question text of an item against the pairs' questions, every reference answer
    against their answers."""
    return find_leaks_each([items], questions, answers)[0]


def distinct_files(sets: Sequence[ExternalSet]) -> list[ExternalSet]:
    """The first set of each file: the sets of one file (LiveQA's question texts) hold the same items."""
    first: dict[str, ExternalSet] = {}
    for s in sets:
        first.setdefault(s.file_name, s)
    return list(first.values())


def drop_leaking(pool: pd.DataFrame, sets: Sequence[ExternalSet]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """``pool`` without the pairs that overlap any external set in any way (LEAK_KINDS), and the record for
    stats.json: per file (``ExternalSet.file_name``), the pairs dropped and the items they touch, by kind.
    Every question text of an item is checked, whichever one 04 asks."""
    files = distinct_files(sets)
    found = find_leaks_each([s.items for s in files], pool["question"].tolist(), pool["answer"].tolist())
    keep = ~np.logical_or.reduce([leaks.any_pair for leaks in found] + [np.zeros(len(pool), dtype=bool)])
    by_file = {s.file_name: {"path": s.path, "format": s.format, "items": len(s.items),
                             "skipped_without_reference": s.skipped, "pairs_dropped": leaks.counts("pairs"),
                             "items_touched": leaks.counts("items")} for s, leaks in zip(files, found, strict=True)}
    record = {"kinds": LEAK_KINDS, "pool": len(pool), "pairs_dropped": int((~keep).sum()), "by_file": by_file}
    return pool[keep].reset_index(drop=True), record


def drop_table(record: dict[str, Any]) -> pd.DataFrame:
    """stats.json's ``external`` record as the table 02 shows: one row per external file and kind of overlap,
    the MedQuAD pairs dropped and the external questions they touch."""
    rows = []
    for name, rec in record["by_file"].items():
        for kind in [*LEAK_KINDS, "any"]:
            rows.append({"set": name, "overlap": LEAK_SHORT.get(kind, "any of these"), "questions": rec["items"],
                         "questions touched": rec["items_touched"][kind],
                         "MedQuAD pairs dropped": rec["pairs_dropped"][kind]})
    return pd.DataFrame(rows).set_index(["set", "overlap"])


def overlap_with(items: Sequence[ExternalItem], records: Sequence[dict[str, Any]]) -> dict[str, int]:
    """How many of ``items`` overlap the split ``records`` (train and validation, in 04), by kind:
    ``{kind: items, ..., "any": items}``. 0 everywhere for a run whose 02 was given the set."""
    leaks = find_leaks(items, [r["question"] for r in records], [r["answer"] for r in records])
    return leaks.counts("items")
