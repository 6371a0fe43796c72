"""The leakage-safe split: which pairs must stay together, which split each group goes to, what leaks.

Why this module exists: the original notebook split *rows* at random, but MedQuAD repeats the same
question under several sources, asks many questions about one focus, and reuses whole answers
(templated paragraphs) under different questions and foci, so test questions and test *answers* leaked
into training. Here pairs linked by the same question (or focus), the same answer or a near-duplicate
answer form one group (connected components), a group never spans two splits, and the leakage left is
measured independently of the grouping, for the chosen ``split_by`` and for a plain row split.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import pandas as pd

from hb_utils import run_dir
from hb_utils.config import ExperimentConfig
from hb_utils.errors import DataError

_NON_WORD = re.compile(r"[^\w\s]")
# Why groups are more than a question key: MedQuAD reuses whole answers across different questions
# (templated GHR paragraphs such as the inheritance one) and nearly identical answers across foci, so
# a split that only keeps each question in one place still puts test answers, word for word, in train.
SHINGLE_WORDS = 5  # near-duplicates are compared on word 5-gram sets of the normalized answer
NEAR_DUPLICATE_JACCARD = 0.8  # Jaccard of those sets at which two answers count as the same answer
# MinHash LSH (datasketch) only proposes candidate pairs; each is verified on the exact shingle sets.
# 16 bands of 4 rows (64 permutations) propose a pair at Jaccard 0.8 with probability
# 1 - (1 - 0.8**4)**16 = 0.9998; datasketch's own optimum for threshold=0.8 (9 bands of 13 rows of
# 128) proposes it with probability 0.40 and left 4,995 near-duplicate pairs of the release in
# different groups. Candidates whose MinHash estimate is below 0.6 are dropped unverified: that is
# 4 standard deviations (sqrt(0.8 * 0.2 / 64) = 0.05) below a true Jaccard of 0.8.
_LSH_NUM_PERM, _LSH_BANDS, _LSH_ROWS, _LSH_MIN_ESTIMATE = 64, 16, 4, 0.6
_VERIFY_CHUNK = 20_000  # candidate pairs verified between two updates of the groups
_GRAM_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier of the shingle hash
_OVERLAPS = {"questions": "same question", "answers": "same answer",
             "near_duplicate_answers": f"near-duplicate answer (word {SHINGLE_WORDS}-gram Jaccard >= "
                                       f"{NEAR_DUPLICATE_JACCARD}, same answer included)"}


def normalize_text(text: str) -> str:
    """Lowercase, punctuation → space, whitespace collapsed: the form in which two questions or two
    answers count as 'the same' (so "What is X?" and "what is X ?" are one question)."""
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def normalize_question(text: str) -> str:
    """The key that decides whether two questions are 'the same' (:func:`normalize_text`)."""
    return normalize_text(text)


def shingle_matrix(normalized: Sequence[str]) -> Any:
    """The (texts × distinct word ``SHINGLE_WORDS``-grams) 0/1 scipy CSR matrix of normalized texts.

    A text shorter than ``SHINGLE_WORDS`` words is one shingle; an empty text has none. Built with numpy
    (a 64-bit polynomial hash of each gram's word ids; a collision among the ~10^6 grams of MedQuAD has
    probability ~10^-7), because building sets of word tuples in Python dominated the split's time."""
    import scipy.sparse as sp  # a dependency of datasketch

    words = [w + [""] * (SHINGLE_WORDS - len(w)) if 0 < len(w) < SHINGLE_WORDS else w  # "" never is a word
             for w in (t.split() for t in normalized)]
    lengths = np.fromiter((len(w) for w in words), dtype=np.int64, count=len(words))
    ids = pd.factorize(np.array(list(chain.from_iterable(words)), dtype=object))[0].astype(np.uint64)
    text = np.repeat(np.arange(len(words)), lengths)
    starts = np.flatnonzero(text[:len(text) - SHINGLE_WORDS + 1] == text[SHINGLE_WORDS - 1:])
    gram = ids[starts]
    for k in range(1, SHINGLE_WORDS):
        gram = gram * _GRAM_BASE + ids[starts + k]  # wraps modulo 2**64
    cols, uniq = pd.factorize(gram)
    matrix = sp.csr_matrix((np.ones(len(cols), dtype=np.int32), (text[starts], cols)),
                           shape=(len(words), len(uniq)))
    matrix.data[:] = 1  # a gram repeated within a text counts once
    return matrix


@dataclass
class _Texts:
    """A frame's normalized questions and answers, and the shingles of its distinct answers: computed
    once per sample and shared by the grouping and the leakage report."""

    questions: np.ndarray  # normalized question of each pair
    answers: np.ndarray  # index of each pair's normalized answer among the distinct answers
    shingles: Any  # shingle_matrix of the distinct answers

    @classmethod
    def of(cls, df: pd.DataFrame) -> _Texts:
        codes, distinct = pd.factorize(df["answer"].map(normalize_text))
        return cls(df["question"].map(normalize_question).to_numpy(), codes, shingle_matrix(list(distinct)))


def _components(n: int, edges: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Connected-component label of each of n nodes (scipy.sparse.csgraph) for (heads, tails) edges."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    heads = np.concatenate([h for h, _ in edges] + [np.zeros(0, dtype=np.int64)])
    tails = np.concatenate([t for _, t in edges] + [np.zeros(0, dtype=np.int64)])
    graph = sp.coo_matrix((np.ones(len(heads), dtype=np.int8), (heads, tails)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _first_index(codes: np.ndarray) -> np.ndarray:
    """For each code 0..k-1, the first position where it occurs."""
    return np.unique(codes, return_index=True)[1]


def _key_edges(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges joining every row to the first row with the same key code."""
    return np.arange(len(codes)), _first_index(codes)[codes]


def _lsh_candidates(matrix: Any) -> tuple[np.ndarray, np.ndarray]:
    """Candidate near-duplicate rows (u < v) from datasketch MinHash LSH over each row's shingle ids,
    most similar first (by the MinHash estimate, so that the groups form early in the verification)."""
    from datasketch import MinHash, MinHashLSH  # imported here: only grouped splits need it

    ids = [row.tolist() for row in np.split(matrix.indices, matrix.indptr[1:-1])]
    minhashes = MinHash.bulk(ids, num_perm=_LSH_NUM_PERM, hashfunc=int)  # shingle ids are already distinct
    lsh = MinHashLSH(num_perm=_LSH_NUM_PERM, params=(_LSH_BANDS, _LSH_ROWS))
    present = [u for u in range(len(ids)) if ids[u]]
    with lsh.insertion_session() as session:
        for u in present:
            session.insert(u, minhashes[u])
    us: list[int] = []
    vs: list[int] = []
    for u in present:
        found = lsh.query(minhashes[u])
        us.extend([u] * len(found))
        vs.extend(found)
    u_arr, v_arr = np.asarray(us, dtype=np.int64), np.asarray(vs, dtype=np.int64)
    u_arr, v_arr = u_arr[u_arr < v_arr], v_arr[u_arr < v_arr]
    if not len(u_arr):
        return u_arr, v_arr
    signatures = np.vstack([m.hashvalues for m in minhashes])
    estimate = np.concatenate([  # MinHash.jaccard, vectorized
        (signatures[u_arr[i:i + _VERIFY_CHUNK]] == signatures[v_arr[i:i + _VERIFY_CHUNK]]).mean(1)
        for i in range(0, len(u_arr), _VERIFY_CHUNK)])
    order = np.argsort(-estimate, kind="stable")
    order = order[estimate[order] >= _LSH_MIN_ESTIMATE]
    return u_arr[order], v_arr[order]


def _may_have_near_duplicate(matrix: Any) -> np.ndarray:
    """Rows that can have a near-duplicate at all: if Jaccard(A, B) >= t then at least t |A| of A's
    shingles occur in B, hence in some other row. An exact filter, one sparse product; on MedQuAD it
    leaves ~2,000 of ~13,000 distinct answers for the (slow, per-row Python) MinHash LSH."""
    in_other_rows = (np.asarray(matrix.sum(axis=0)).ravel() >= 2).astype(np.int32)
    size = np.diff(matrix.indptr)
    return (size > 0) & (matrix @ in_other_rows >= NEAR_DUPLICATE_JACCARD * size)


def _jaccard_rows(matrix: Any, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Exact Jaccard of the shingle sets of rows u[i] and v[i]."""
    inter = np.asarray(matrix[u].multiply(matrix[v]).sum(axis=1)).ravel()
    size = np.diff(matrix.indptr)
    return inter / np.maximum(size[u] + size[v] - inter, 1)


def _near_duplicate_edges(texts: _Texts, edges: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """Append edges joining rows whose normalized answers are near-duplicates (Jaccard >= NEAR_DUPLICATE_JACCARD).

    LSH candidates are verified on the exact shingle sets chunk by chunk, most similar first, skipping
    pairs that the edges so far already connect: connectivity is all the split needs. Templated answers
    make the candidates many (the whole release: ~0.75 million, most with Jaccard 0.6-0.8, for ~28,000
    true pairs), so the verification is vectorized (sparse row products), not a loop over pairs."""
    first_row = _first_index(texts.answers)
    eligible = np.flatnonzero(_may_have_near_duplicate(texts.shingles))
    cand_u, cand_v = (eligible[c] for c in _lsh_candidates(texts.shingles[eligible]))
    labels = _components(len(texts.answers), edges)
    for start in range(0, len(cand_u), _VERIFY_CHUNK):
        u, v = cand_u[start:start + _VERIFY_CHUNK], cand_v[start:start + _VERIFY_CHUNK]
        open_pair = labels[first_row[u]] != labels[first_row[v]]
        u, v = u[open_pair], v[open_pair]
        if len(u):
            same = _jaccard_rows(texts.shingles, u, v) >= NEAR_DUPLICATE_JACCARD
            edges.append((first_row[u[same]], first_row[v[same]]))
            labels = _components(len(texts.answers), edges)


def plain_keys(df: pd.DataFrame, split_by: str) -> pd.Series:
    """The key a pair was grouped by before answers were compared: its normalized question, or its
    normalized focus (its question when it has none), or its row."""
    if split_by == "row":
        return pd.Series([f"row{i}" for i in range(len(df))], index=df.index)
    if split_by == "question":
        return df["question"].map(normalize_question)
    if split_by == "focus":
        focus = df["question_focus"].map(normalize_text)
        return focus.where(focus != "", "q:" + df["question"].map(normalize_question))
    raise DataError(f"split_by must be row, question or focus, got {split_by!r}.")


@dataclass
class Grouping:
    """The groups of a sample for one ``split_by`` (:func:`group_pairs`).

    ``keys``: each pair's group (a group never spans two splits), labelled by the plain key of its
    first pair. ``plain``: each pair's group from question / focus links alone (no answer links).
    """

    keys: pd.Series
    plain: pd.Series

    def summary(self) -> dict[str, int]:
        """Group counts and ``pairs_regrouped``: the pairs whose group joins two or more plain groups
        because some pair in it shares its answer, word for word or as a near-duplicate, with a pair
        of another question (focus). Those are the pairs whose split the answer links decided — they
        would otherwise have been placed independently of (and possibly apart from) each other."""
        plain_per_group = self.plain.groupby(self.keys).transform("nunique")
        return {"plain_groups": int(self.plain.nunique()), "groups": int(self.keys.nunique()),
                "largest_group": int(self.keys.value_counts().max()) if len(self.keys) else 0,
                "pairs_regrouped": int((plain_per_group > 1).sum())}


def group_pairs(df: pd.DataFrame, split_by: str, *, texts: _Texts | None = None) -> Grouping:
    """Group the pairs so that no answer crosses a split: connected components of the links *same
    normalized question*, *same focus* (``focus`` only), *same normalized answer* and *near-duplicate
    answer* (word 5-gram Jaccard >= NEAR_DUPLICATE_JACCARD). ``row`` keeps every pair alone (the
    original notebook's split, kept for comparison). A boilerplate answer shared by many questions
    thus puts all of them in one group, and so in one split."""
    plain_key = plain_keys(df, split_by)
    if split_by == "row":
        return Grouping(keys=plain_key, plain=plain_key)
    texts = _Texts.of(df) if texts is None else texts
    edges = [_key_edges(pd.factorize(texts.questions)[0])]
    if split_by == "focus":
        edges.append(_key_edges(pd.factorize(plain_key)[0]))
    plain = _components(len(df), edges)
    edges.append(_key_edges(texts.answers))
    _near_duplicate_edges(texts, edges)
    final = _components(len(df), edges)
    label = plain_key.to_numpy()  # each group is labelled by its first pair's plain key
    return Grouping(keys=pd.Series(label[_first_index(final)][final], index=df.index),
                    plain=pd.Series(label[_first_index(plain)][plain], index=df.index))


def group_keys(df: pd.DataFrame, split_by: str) -> pd.Series:
    """The group each pair belongs to (:func:`group_pairs`); a group never spans two splits."""
    return group_pairs(df, split_by).keys


def assign_splits(keys: pd.Series, cfg: ExperimentConfig) -> pd.Series:
    """Each pair's split name. Deterministic: shuffle the groups with ``split_seed``, then give each group
    to the first of test, val that it fits in without passing the split's target size, else to train.

    A group is never cut, so test and val can end a little below their targets; a group larger than
    what is left (a big cluster of templated answers) goes to train, where it can only teach the
    template instead of being scored on it. With ``row`` every group is one pair: exact sizes.
    """
    uniq = keys.drop_duplicates().to_numpy()
    order = np.random.default_rng(cfg.split_seed).permutation(len(uniq))
    sizes = keys.value_counts()
    room = {"test": round(cfg.test_frac * len(keys)), "val": round(cfg.val_frac * len(keys))}
    assign: dict[str, str] = {}
    for gi in order:
        g = uniq[gi]
        size = int(sizes[g])
        name = next((s for s in ("test", "val") if size <= room[s]), "train")
        if name != "train":
            room[name] -= size
        assign[g] = name
    return keys.map(assign)


def split_frame(df: pd.DataFrame, cfg: ExperimentConfig, split_by: str | None = None) -> dict[str, pd.DataFrame]:
    """The grouped split of ``df`` (:func:`group_keys`, :func:`assign_splits`) as one frame per split."""
    which = assign_splits(group_keys(df, split_by or cfg.split_by), cfg)
    return {name: df[which == name].reset_index(drop=True) for name in run_dir.SPLITS}


def _leakage_counts(texts: _Texts, which: np.ndarray) -> dict[str, int]:
    """:func:`leakage` of one assignment of the pairs of ``texts`` to splits (``which``: split names).

    The near-duplicate count is exact, from one sparse product of the shingle matrices of the held-out
    and the train answers — deliberately not the LSH of :func:`group_pairs`, so the report checks the
    grouping with a second method instead of repeating it."""
    train = which == "train"
    train_answers = np.unique(texts.answers[train])
    out = {}
    for name in ("val", "test"):
        held = which == name
        answers = np.unique(texts.answers[held])
        inter = (texts.shingles[answers] @ texts.shingles[train_answers].T).tocoo()
        size = np.diff(texts.shingles.indptr)
        union = size[answers][inter.row] + size[train_answers][inter.col] - inter.data
        near = answers[inter.row[inter.data >= NEAR_DUPLICATE_JACCARD * union]]
        same = np.isin(texts.answers[held], train_answers)
        counts = {"questions": np.isin(texts.questions[held], texts.questions[train]).sum(), "answers": same.sum(),
                  "near_duplicate_answers": (same | np.isin(texts.answers[held], near)).sum()}
        out.update({f"{name}_{kind}_in_train": int(counts[kind]) for kind in _OVERLAPS})
    return out


def leakage(splits: dict[str, pd.DataFrame]) -> dict[str, int]:
    """How many val/test pairs overlap train: the same question, the same answer, or a near-duplicate
    answer (word 5-gram Jaccard >= NEAR_DUPLICATE_JACCARD, identical answers included), all normalized.

    A flat ``{"<split>_<overlap>_in_train": count}`` dict so that stats.json stays a simple table."""
    frames = [splits[name] for name in run_dir.SPLITS]
    which = np.repeat(np.array(run_dir.SPLITS), [len(f) for f in frames])
    return _leakage_counts(_Texts.of(pd.concat(frames, ignore_index=True)), which)


def leakage_table(split_stats: dict[str, Any]) -> pd.DataFrame:
    """``stats["split"]`` as the table 02_format_split shows: one row per held-out split and kind of
    overlap, one column for the chosen ``split_by`` and one for a row split of the same sample."""
    columns = {f"split_by={split_stats['by']}": split_stats["leakage"],
               "split_by=row (original)": split_stats["leakage_if_split_by_row"]}
    rows = [(s, kind) for s in ("val", "test") for kind in _OVERLAPS]
    table = pd.DataFrame({col: [leak[f"{s}_{kind}_in_train"] for s, kind in rows] for col, leak in columns.items()},
                         index=pd.MultiIndex.from_tuples([(s, _OVERLAPS[k]) for s, k in rows],
                                                         names=["split", "pairs with … in train"]))
    table.insert(0, "pairs", [split_stats["sizes"][s] for s, _ in rows])
    return table


def split_sample(sample: pd.DataFrame, cfg: ExperimentConfig) -> tuple[dict[str, pd.DataFrame], dict[str, Any]]:
    """The sample as one frame per split, and the split's record for ``stats.json``: sizes, groups, how the
    grouping merged pairs, and the leakage left for the chosen ``split_by`` and for a plain row split."""
    texts = _Texts.of(sample)
    grouping = group_pairs(sample, cfg.split_by, texts=texts)
    which = assign_splits(grouping.keys, cfg)
    frames = {name: sample[which == name].reset_index(drop=True) for name in run_dir.SPLITS}
    summary = grouping.summary()
    for name, frame in frames.items():
        if len(frame) == 0 and getattr(cfg, f"{name}_frac") > 0:
            raise DataError(f"The {name} split is empty ({len(sample)} pairs in {summary['groups']} groups split by "
                            f"{cfg.split_by}, the largest has {summary['largest_group']} pairs; pairs that share a "
                            "question, focus or answer are never split up). Raise sample_size or change the split "
                            "fractions.")
    row_which = assign_splits(plain_keys(sample, "row"), cfg)
    return frames, {"by": cfg.split_by, "sizes": {k: len(v) for k, v in frames.items()},
                    "groups": {k: int(grouping.keys[which == k].nunique()) for k in frames}, "grouping": summary,
                    "leakage": _leakage_counts(texts, which.to_numpy()),
                    "leakage_if_split_by_row": _leakage_counts(texts, row_which.to_numpy())}
