"""Tables for 01_eda: what the raw MedQuAD release holds before any cleaning.

Why a module: the EDA numbers (answered share per source, duplicate questions) justify the cleaning
and the leakage-safe split; computing them here keeps the notebook to one call per table and lets
the tests check them on synthetic data.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from hb_utils import run_dir
from hb_utils.config import ExperimentConfig
from hb_utils.data.medquad import answered
from hb_utils.data.split import normalize_question


def overview(df: pd.DataFrame) -> pd.DataFrame:
    """One row per column: dtype, missing (null or empty string) and distinct values."""
    empty = df.apply(lambda c: c.isna() | (c.astype(str).str.strip() == ""))
    return pd.DataFrame({"dtype": df.dtypes.astype(str), "missing": empty.sum(),
                         "missing_%": (100 * empty.mean()).round(1), "distinct": df.nunique()})


def per_source(df: pd.DataFrame) -> pd.DataFrame:
    """Pairs, answered pairs and answered share per source, largest first."""
    mask = answered(df)
    out = pd.DataFrame({"pairs": df.groupby("document_source").size(),
                        "answered": mask.groupby(df["document_source"]).sum()})
    out["answered_%"] = (100 * out["answered"] / out["pairs"]).round(1)
    return out.sort_values("pairs", ascending=False)


def per_question_type(df: pd.DataFrame) -> pd.DataFrame:
    """Pairs and answered pairs per question type."""
    mask = answered(df)
    out = pd.DataFrame({"pairs": df.groupby("question_type").size(),
                        "answered": mask.groupby(df["question_type"]).sum()})
    return out.sort_values("pairs", ascending=False)


def duplicate_questions(df: pd.DataFrame) -> dict[str, int]:
    """How often the same normalized question recurs among answered pairs (the split's leakage risk)."""
    kept = df[answered(df)]
    key = kept["question"].map(normalize_question)
    counts = key.value_counts()
    focus = kept["question_focus"].map(normalize_question)
    return {
        "answered_pairs": len(kept),
        "distinct_questions": int(counts.size),
        "repeated_pairs": int(key.duplicated().sum()),
        "questions_asked_more_than_once": int((counts > 1).sum()),
        "max_repeats": int(counts.max()) if len(counts) else 0,
        "distinct_focuses": int(focus.nunique()),
        "pairs_per_focus_median": float(focus.value_counts().median()) if len(focus) else 0.0,
    }


def length_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Word-length statistics of questions and answers (answered pairs)."""
    kept = df[answered(df)]
    return pd.DataFrame({c: kept[c].str.split().str.len().describe(percentiles=[0.5, 0.9, 0.99])
                         for c in ("question", "answer")}).T.round(1)


def write_summary(cfg: ExperimentConfig, source: dict[str, Any], duplicates: dict[str, Any]) -> None:
    """``data/eda.json``: where the raw data came from and its duplicate counts, stamped like every artifact."""
    run_dir.write_json(run_dir.claim(cfg, made_by="eda.write_summary").data / "eda.json",
                       {"stamp": run_dir.stamp(cfg, "data", "01_eda"), "source": source, "duplicates": duplicates})
