"""Figures of the data notebooks (01, 02), each shown inline and saved as PNG under ``plots/``.

Why here and not in the notebooks: a figure built in a notebook cell cannot be tested and drifts
between notebooks; these functions take plain frames/dicts, return the figure, and save it so the
HTML report can reuse the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd

from hb_utils.data.medquad import answered
from hb_utils.plots import save


def answered_by_source(df: pd.DataFrame, path: Path | None = None) -> plt.Figure:
    """Stacked bars: answered vs unanswered pairs per source (3 sources had answers removed)."""
    mask = answered(df)
    table = pd.crosstab(df["document_source"], mask.map({True: "answered", False: "no answer"}))
    table = table.reindex(columns=["answered", "no answer"], fill_value=0).sort_values("answered")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    table.plot.barh(stacked=True, ax=ax, color=["#3b7dd8", "#c9c9c9"])
    ax.set_xlabel("QA pairs")
    ax.set_ylabel("source")
    ax.set_title("MedQuAD pairs per source")
    return save(fig, path)


def question_types(df: pd.DataFrame, path: Path | None = None, top: int = 20) -> plt.Figure:
    """Horizontal bars of the most common question types among answered pairs."""
    counts = df.loc[answered(df), "question_type"].value_counts().head(top)[::-1]
    fig, ax = plt.subplots(figsize=(8, 5))
    counts.plot.barh(ax=ax, color="#3b7dd8")
    ax.set_xlabel("answered pairs")
    ax.set_title(f"Top {len(counts)} question types (answered pairs)")
    return save(fig, path)


def length_distributions(df: pd.DataFrame, max_answer_words: int | None = None,
                         path: Path | None = None) -> plt.Figure:
    """Histograms of question and answer lengths in words (answered pairs), with the filter cut-off."""
    kept = df[answered(df)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, col in zip(axes, ("question", "answer"), strict=True):
        words = kept[col].str.split().str.len()
        clip = words.quantile(0.99)
        ax.hist(words.clip(upper=clip), bins=50, color="#3b7dd8")
        ax.set_title(f"{col} length (words, clipped at p99 = {clip:.0f})")
        ax.set_xlabel("words")
        ax.axvline(words.median(), color="k", ls="--", lw=1, label=f"median {words.median():.0f}")
        if col == "answer" and max_answer_words:
            ax.axvline(max_answer_words, color="#d83b3b", lw=1.5, label=f"filter: <= {max_answer_words}")
        ax.legend()
    return save(fig, path)


def funnel(steps: list[dict[str, Any]], path: Path | None = None) -> plt.Figure:
    """The filter funnel: pairs remaining after each cleaning step."""
    fig, ax = plt.subplots(figsize=(8, 3.5))
    names = [s["step"] for s in steps][::-1]
    ax.barh(names, [s["remaining"] for s in steps][::-1], color="#3b7dd8")
    for i, s in enumerate(steps[::-1]):
        ax.text(s["remaining"], i, f" {s['remaining']:,}" + (f" (-{s['removed']:,})" if s["removed"] else ""),
                va="center", fontsize=9)
    ax.set_xlabel("pairs remaining")
    ax.set_title("Cleaning and filtering funnel")
    ax.margins(x=0.25)
    return save(fig, path)


def split_lengths(frames: dict[str, pd.DataFrame], path: Path | None = None) -> plt.Figure:
    """Answer-length boxplots per split: the splits should look alike."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    data = [f["answer"].str.split().str.len() for f in frames.values()]
    ax.boxplot(data, tick_labels=[f"{k} (n={len(v)})" for k, v in frames.items()], vert=False)
    ax.set_xlabel("answer words")
    ax.set_title("Answer length per split")
    return save(fig, path)
