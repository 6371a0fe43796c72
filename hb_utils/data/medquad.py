"""MedQuAD: load → clean → filter → dedupe → drop leaks into external sets → sample → leakage-safe split → records.

Why this module exists: the original notebook split *rows* at random, but MedQuAD repeats the same
question under several sources and asks many questions about one focus, so test questions leaked
into training; it also reuses whole answers (templated paragraphs) under different questions and foci,
so test *answers* leaked too. Here the split keeps every group in one split — pairs linked by the same
question (or focus), the same answer or a near-duplicate answer — and reports the leakage it leaves,
measured independently of the grouping. Every step counts what it removes, so the report can show the funnel,
and every artifact is stamped with the config's data fingerprint.

Sources (``cfg.dataset``): a Hub dataset id (``datasets.load_dataset``, never remote code), a
directory holding the official MedQuAD XML release, or a local .parquet / .jsonl / .csv file.
"""

from __future__ import annotations

import re
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hb_utils import run_dir
from hb_utils.config import ExperimentConfig
from hb_utils.data import external, split
from hb_utils.errors import DataError

# The columns of lavita/MedQuAD (the Hub conversion of the XML release), in its order.
COLUMNS = [
    "document_id", "document_source", "document_url", "category", "umls_cui", "umls_semantic_types",
    "umls_semantic_group", "synonyms", "question_id", "question_focus", "question_type", "question", "answer",
]
_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")


# --------------------------------------------------------------------------- loading
def _text(el: ET.Element | None) -> str:
    return "" if el is None else "".join(el.itertext()).strip()


def _joined(root: ET.Element, path: str) -> str:
    return "|".join(t for t in (_text(e) for e in root.findall(path)) if t)


def parse_medquad_xml(path: Path) -> list[dict[str, str]]:
    """The QA pairs of one release file (``<Document>`` or ``<DiseaseFile>`` root)."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise DataError(f"{path} is not well-formed XML ({exc}). Fix or remove the file, or re-download the "
                        "release.") from None
    umls = root.find("FocusAnnotations/UMLS")
    if umls is None:
        umls = root.find("UMLS")
    doc = {
        "document_id": root.get("id") or root.get("fid") or "",
        "document_source": root.get("source", ""),
        "document_url": root.get("url", ""),
        "category": _text(root.find("FocusAnnotations/Category")),
        "umls_cui": _joined(umls, "CUIs/CUI") or _joined(umls, "CUI") if umls is not None else "",
        "umls_semantic_types": (_joined(umls, "SemanticTypes/SemanticType") or _joined(umls, "SemanticType"))
        if umls is not None else "",
        "umls_semantic_group": _text(umls.find("SemanticGroup")) if umls is not None else "",
        "synonyms": _joined(root, "FocusAnnotations/Synonyms/Synonym"),
        "question_focus": _text(root.find("Focus")),
    }
    rows = []
    for pair in root.iter("QAPair"):
        q = pair.find("Question")
        rows.append({**doc, "question_id": q.get("qid", "") if q is not None else "",
                     "question_type": q.get("qtype", "") if q is not None else "",
                     "question": _text(q), "answer": _text(pair.find("Answer"))})
    return rows


def load_xml_release(directory: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Every QA pair of the release. Files in the old lowercase ``<doc>`` schema (4 NINDS files,
    16 pairs, left out of lavita/MedQuAD too) are skipped and counted, so both sources agree."""
    files = sorted(directory.glob("*/*.xml"))
    if not files:
        raise DataError(f"{directory} holds no */*.xml files. Point `dataset` at the MedQuAD release folder "
                        "(the one with 1_CancerGov_QA/, 2_GARD_QA/ …).")
    rows: list[dict[str, str]] = []
    skipped = []
    for f in files:
        pairs = parse_medquad_xml(f)
        if not pairs:
            skipped.append(f"{f.parent.name}/{f.name}")
        rows.extend(pairs)
    info = {"kind": "xml_release", "files": len(files), "skipped_files": skipped}
    return pd.DataFrame(rows, columns=COLUMNS), info


def _load_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix in (".jsonl", ".json"):
            return pd.read_json(path, lines=suffix == ".jsonl")
        if suffix == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"Cannot read {path}: {exc}") from None
    raise DataError(f"Unsupported data file {path.name!r}: use .parquet, .jsonl or .csv, or a MedQuAD XML release "
                    "folder.")


def _normalize_columns(df: pd.DataFrame, origin: str) -> pd.DataFrame:
    """Map a table onto COLUMNS; it must at least have question and answer columns."""
    lower = {c.lower().strip(): c for c in df.columns}
    missing = [c for c in ("question", "answer") if c not in lower]
    if missing:
        found = ", ".join(map(str, df.columns))
        raise DataError(f"{origin} has no {' / '.join(missing)} column (columns found: {found}). "
                        "A data file needs 'question' and 'answer' columns.")
    out = pd.DataFrame({c: df[lower[c]] if c in lower else "" for c in COLUMNS})
    out = out.fillna("").astype(str)
    if (out["question_id"] == "").all():
        out["question_id"] = [f"row{i}" for i in range(len(out))]
    return out


def locate_source(source: str) -> tuple[str, Path | str]:
    """Where ``dataset`` points, without reading it: ("dir", path), ("file", path) or ("hub", id).

    DataError for a local path that does not exist, so ``hb run`` can say so before any notebook starts.
    """
    looks_local = (source.startswith((".", "/", "~"))
                   or Path(source).suffix.lower() in (".parquet", ".jsonl", ".json", ".csv"))
    path = run_dir.resolve(source)
    if path.is_dir():
        return "dir", path
    if path.is_file():
        return "file", path
    if looks_local or source.count("/") != 1:
        raise DataError(f"Data source {source!r} does not exist (looked at {path}). Set dataset to a MedQuAD XML "
                        "release folder, a .parquet/.jsonl/.csv file, or a Hub dataset id such as lavita/MedQuAD.")
    return "hub", source


def load_raw(source: str, split: str = "train") -> tuple[pd.DataFrame, dict[str, Any]]:
    """Load MedQuAD from a release folder, a data file, or a Hub id → (frame with COLUMNS, info)."""
    kind, where = locate_source(source)
    if kind == "dir":
        df, info = load_xml_release(Path(where))
    elif kind == "file":
        df, info = _normalize_columns(_load_table(Path(where)), str(where)), {"kind": "file"}
    else:
        df, info = _load_hub(source, split), {"kind": "hub", "split": split}
    if df.empty:  # later steps would fail deep inside pandas (a mean of an empty string column)
        raise DataError(f"The data source {str(where)!r} has no rows (a header only, or no QAPair elements). "
                        "Point dataset at a file or release that holds question/answer pairs.")
    info["source"] = str(where)
    info["rows"] = len(df)
    info["answered"] = int(answered(df).sum())
    info["placeholder_answers"] = int(placeholder_answers(df).sum())
    return df, info


def _load_hub(dataset_id: str, split: str) -> pd.DataFrame:
    import datasets  # heavy import, only for Hub sources

    try:
        ds = datasets.load_dataset(dataset_id, split=split)  # data files only: no remote code
    except Exception as exc:  # noqa: BLE001 - offline, missing, gated: all the same fix
        raise DataError(f"Cannot load the Hub dataset {dataset_id!r} (split {split!r}): {type(exc).__name__}: {exc}. "
                        "Offline? Set dataset to a local MedQuAD XML release folder or a .parquet/.jsonl/.csv "
                        "file.") from None
    return _normalize_columns(ds.to_pandas(), f"Hub dataset {dataset_id}")


# --------------------------------------------------------------------------- cleaning
# Answers that are a missing-value placeholder written out as text (a CSV/JSON export of a frame with
# missing answers), not an answer. Compared after stripping, case-insensitively.
PLACEHOLDERS = ("nan", "none", "null")


def placeholder_answers(df: pd.DataFrame) -> pd.Series:
    """The rows whose answer is a literal NaN / None / null: missing, though they hold text."""
    return df["answer"].astype(str).str.strip().str.lower().isin(PLACEHOLDERS)


def answered(df: pd.DataFrame) -> pd.Series:
    """The rows whose answer holds text: the one definition of "answered" (EDA, plots, filters).

    The XML release has empty ``<Answer/>`` elements where answers were removed for copyright; exported
    tables may write a missing answer as ``NaN``, ``None`` or ``null`` (:func:`placeholder_answers`).
    """
    return (df["answer"].astype(str).str.strip() != "") & ~placeholder_answers(df)


def clean_text(text: str, strip_html: bool = True) -> str:
    """Strip HTML tags (optional) and collapse whitespace, as the original notebook did."""
    if strip_html:
        text = _TAG.sub(" ", text)
    return _SPACE.sub(" ", text).strip()


def clean_and_filter(df: pd.DataFrame, cfg: ExperimentConfig) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """Clean text, apply the config's filters and drop exact duplicates; count every step."""
    funnel = [{"step": "loaded", "removed": 0, "remaining": len(df)}]

    def step(name: str, keep: pd.Series | np.ndarray) -> None:
        nonlocal df
        before = len(df)
        df = df[keep]
        funnel.append({"step": name, "removed": before - len(df), "remaining": len(df)})

    df = df.copy()
    df["question"] = df["question"].map(lambda t: clean_text(t, cfg.strip_html))
    df["answer"] = df["answer"].map(lambda t: clean_text(t, cfg.strip_html))
    step("answer present", df["answer"] != "")
    step("answer not NaN/None/null", ~placeholder_answers(df))  # with the step above: answered(df)
    step(f"question > {cfg.min_question_chars} chars", df["question"].str.len() > cfg.min_question_chars)
    step(f"answer > {cfg.min_answer_chars} chars", df["answer"].str.len() > cfg.min_answer_chars)
    step(f"answer <= {cfg.max_answer_words} words", df["answer"].str.split().str.len() <= cfg.max_answer_words)
    step("exact duplicate pairs", ~df.duplicated(subset=["question", "answer"]))
    return df.reset_index(drop=True), funnel


def to_record(row: Mapping[str, Any], system_prompt: str) -> dict[str, Any]:
    """A model-agnostic chat record; rendering to text happens later with the tokenizer's template.

    An empty ``system_prompt`` writes no system turn, so the chat template's own default applies in training
    as it does in generation, chat and the Modelfile (which omit an empty system message too): an empty
    system message is not "no system prompt" to every template (some print an empty system block)."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return {
        "id": f"{row['document_source']}:{row['question_id']}",
        "source": row["document_source"], "focus": row["question_focus"], "question_type": row["question_type"],
        "question": row["question"], "answer": row["answer"],
        "messages": [*system, {"role": "user", "content": row["question"]},
                     {"role": "assistant", "content": row["answer"]}],
    }


def render_zephyr(messages: list[dict[str, str]]) -> str:
    """Offline display of a record in the TinyLlama/Zephyr layout of the original notebook."""
    return "".join(f"<|{m['role']}|>\n{m['content']}</s>\n" for m in messages)


def _length_summary(frame: pd.DataFrame) -> dict[str, dict[str, float]]:
    out = {}
    for col in ("question", "answer"):
        words = frame[col].str.split().str.len()
        out[f"{col}_words"] = {k: round(float(v), 1) for k, v in words.describe(percentiles=[0.5, 0.9]).items()
                               if k != "count"} if len(frame) else {}
    return out


@dataclass
class Prepared:
    """What 02_format_split shows: the splits as records and frames, and the stats written."""

    records: dict[str, list[dict[str, Any]]]
    frames: dict[str, pd.DataFrame]
    stats: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)


def prepare_splits(cfg: ExperimentConfig, *, write: bool = True, raw: pd.DataFrame | None = None,
                   raw_info: dict[str, Any] | None = None) -> Prepared:
    """Run the whole pipeline and (by default) write data/{train,val,test}.jsonl + data/stats.json."""
    if raw is None:
        raw, raw_info = load_raw(cfg.dataset, cfg.dataset_split)
    clean, funnel = clean_and_filter(raw, cfg)
    external_record = None
    if cfg.external_eval:  # pairs that leak into an external set never reach the sample (hb_utils.data.external)
        sets = external.load_sets(cfg.external_eval, liveqa_questions=("summary",))  # every question text is checked
        clean, external_record = external.drop_leaking(clean, sets)
        funnel.append({"step": "leaks into an external set", "removed": external_record["pairs_dropped"],
                       "remaining": len(clean)})
    if len(clean) < 3:
        raise DataError(f"Only {len(clean)} pairs are left after filtering (funnel: "
                        + ", ".join(f"{s['step']}: -{s['removed']}" for s in funnel[1:])
                        + "). Loosen min_question_chars / min_answer_chars / max_answer_words or check the data "
                        "source.")
    drawn = min(cfg.sample_size, len(clean))
    if drawn < cfg.sample_size:
        warnings.warn(f"sample_size={cfg.sample_size} but only {len(clean)} pairs pass the filters: using all {drawn}.",
                      stacklevel=2)
    sample = clean.sample(n=drawn, random_state=cfg.sample_seed).reset_index(drop=True)
    frames, split_stats = split.split_sample(sample, cfg)
    stats = {
        "stamp": run_dir.stamp(cfg, "data", "data.prepare_splits"),
        "raw": raw_info or {},
        "funnel": funnel,
        "sample": {"requested": cfg.sample_size, "drawn": drawn, "reduced": drawn < cfg.sample_size,
                   "available": len(clean)},
        "split": split_stats,
        **({"external": external_record} if external_record is not None else {}),
        "lengths": {k: _length_summary(v) for k, v in frames.items()},
    }
    # to_dict, not iterrows: building a Series per row took seconds on the whole release.
    records = {k: [to_record(r, cfg.system_prompt) for r in v.to_dict("records")] for k, v in frames.items()}
    prepared = Prepared(records=records, frames=frames, stats=stats)
    if write:
        run = run_dir.claim(cfg, made_by="data.prepare_splits")
        _check_run_data(cfg)
        for name, recs in records.items():
            prepared.files[name] = str(run_dir.write_jsonl(run.split(name), recs))
        prepared.files["stats"] = str(run_dir.write_json(run.data_stats, stats))
    return prepared


def _check_run_data(cfg: ExperimentConfig) -> None:
    """Refuse to replace split files that a different data config made (unless cfg.overwrite)."""
    run = run_dir.RunPaths.for_config(cfg)
    if run.data_stats.is_file() and not cfg.overwrite:
        run_dir.require(run_dir.read_stamp(run.data_stats), cfg, "data", what=run.data,
                        fix="Use a new `experiment` name, or set overwrite=True to replace the splits.")


def splits_are_current(cfg: ExperimentConfig) -> bool:
    """True when the run directory holds all three splits, stamped with this config's data fingerprint."""
    run = run_dir.RunPaths.for_config(cfg)
    if not all(run.split(s).is_file() for s in run_dir.SPLITS):
        return False
    return run_dir.stamp_matches(run_dir.read_stamp(run.data_stats), cfg, "data")


def ensure_splits(cfg: ExperimentConfig) -> dict[str, list[dict[str, Any]]]:
    """The split records of this config: read from the run directory, or rebuilt (cheap) when missing."""
    if not splits_are_current(cfg):
        return prepare_splits(cfg).records
    run = run_dir.RunPaths.for_config(cfg)
    return {s: run_dir.read_jsonl(run.split(s)) for s in run_dir.SPLITS}


def load_split(cfg: ExperimentConfig, name: str) -> list[dict[str, Any]]:
    """One split's records (rebuilding the splits first when they are missing)."""
    return ensure_splits(cfg)[name]
