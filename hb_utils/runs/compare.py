"""Compare finished runs: what differs in their configs, and what that did to the results.

Why: an experiment series (rank, epochs, learning rate) is only readable side by side. Each run
directory already holds everything (``config.json``, ``metrics/train.json``, ``metrics/eval.json``,
``metrics/log_history.json``); this module reads them, never recomputes, and writes one markdown/CSV
table, overlaid loss curves and metric bars with their 95% bootstrap intervals.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from hb_utils import results, run_dir
from hb_utils.config import ExperimentConfig, fields_in
from hb_utils.errors import RunError
from hb_utils.plots import save
from hb_utils.runs.report import execute, to_html

# Everything hb compare writes into its --out folder.
COMPARE_FILES = {"comparison.md", "comparison.csv", "config_diff.csv", "loss_curves.png", "metrics.png",
                 "06_compare.ipynb", "06_compare.html"}
# The generation metrics of eval.json["generation"] shown per run (labels and scales: hb_utils.results).
GEN_METRICS = ("rouge1", "rouge2", "rougeL", "bleu", "stopped", "disclaimer", "empty_or_loop", "words")


@dataclass
class Run:
    """One finished run directory, as written by ``hb run``."""

    name: str
    root: Path
    config: dict[str, Any]
    train: dict[str, Any]
    eval: dict[str, Any]
    log_history: list[dict[str, Any]]


def load_run(path: str | Path) -> Run:
    """Read a run directory; a missing piece raises RunError saying which stage to run, and metrics made
    by another config than the one ``config.json`` records are refused (the table would mislabel them)."""
    root = run_dir.resolve(path)
    if not root.is_dir():
        raise RunError(f"{root} does not exist. Pass run directories made by `hb run`, e.g. outputs/smoke.")
    needed = {"config.json": "hb run", "metrics/train.json": "03_train_qlora",
              "metrics/eval.json": "04_evaluate"}
    for rel, stage in needed.items():
        if not (root / rel).is_file():
            raise RunError(f"{root} has no {rel}: run {stage} for it first (e.g. `hb run params/<file>.yaml`).")
    conf = run_dir.read_json(root / "config.json")
    cfg = ExperimentConfig(**conf.get("config", {}))
    train, evaluation = (run_dir.read_json(root / "metrics" / f) for f in ("train.json", "eval.json"))
    for name, payload, scope in (("metrics/train.json", train, "train"), ("metrics/eval.json", evaluation, "eval")):
        run_dir.require(payload.get("stamp"), cfg, scope, what=root / name,
                        fix=f"Rerun that stage with `hb run` for {root.name} so the metrics match its config.json.")
    history_path = root / "metrics" / "log_history.json"
    history = run_dir.read_json(history_path) if history_path.is_file() else []
    return Run(root.name, root, conf.get("config", {}), train, evaluation, history)


def config_diff(runs: list[Run]) -> pd.DataFrame:
    """The parameters whose values differ between the runs (rows) per run (columns)."""
    names = [k for k in runs[0].config if k in fields_in("data", "train", "eval")]
    rows = {k: [_show(r.config.get(k)) for r in runs] for k in names
            if len({_show(r.config.get(k)) for r in runs}) > 1}
    return pd.DataFrame(rows, index=[r.name for r in runs]).T if rows else pd.DataFrame(
        {"(no difference)": ["" for _ in runs]}, index=[r.name for r in runs]).T


def _show(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def results_table(runs: list[Run]) -> pd.DataFrame:
    """One row per run: losses, fine-tuned generation metrics with 95% CIs, perplexity, cost."""
    rows = []
    for r in runs:
        gen, ppl, t = r.eval.get("generation", {}), r.eval.get("perplexity", {}), r.train
        row: dict[str, Any] = {
            "run": r.name,
            "train loss": _num(t.get("final_train_loss")),
            "best val loss": _num(t.get("best_val_loss")),
            "final val loss": _num(t.get("final_val_loss")),
        }
        for key in GEN_METRICS:
            label, factor = results.label(key), results.scale(key)
            row[label] = results.format_ci(gen.get(key, {}).get("finetuned"), factor, 2)
            if key in ("rougeL", "bleu"):
                row[f"{label} Δ vs base"] = results.format_ci(gen.get(key, {}).get("delta"), factor, 2)
        row["ppl (answer tokens)"] = results.format_ci(ppl.get("finetuned", {}).get("answer_token_weighted"), 1, 2)
        row["ppl base"] = results.format_ci(ppl.get("base", {}).get("answer_token_weighted"), 1, 2)
        row["train s"] = _num(t.get("train_runtime_s"), 0)
        row["tokens/s"] = _num(t.get("tokens_per_second"), 1)
        row["peak mem GB"] = _num((t.get("peak_memory") or {}).get("gb"), 2)
        row["steps"] = t.get("global_step")
        rows.append(row)
    return pd.DataFrame(rows).set_index("run")


def _num(v: Any, digits: int = 3) -> float | None:
    return None if v is None else round(float(v), digits)


def plot_loss_curves(runs: list[Run], path: Path | None = None) -> plt.Figure:
    """Training (solid) and validation (dashed, markers) loss of every run on one axis."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, r in enumerate(runs):
        color = f"C{i}"
        train, val = results.loss_points(r.log_history)
        if train:
            ax.plot(*zip(*train, strict=True), color=color, label=f"{r.name} train")
        if val:
            ax.plot(*zip(*val, strict=True), color=color, ls="--", marker="o", label=f"{r.name} val")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("Loss curves")
    ax.legend(fontsize=8)
    return save(fig, path)


def plot_metric_bars(runs: list[Run], path: Path | None = None,
                     metrics: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "bleu")) -> plt.Figure:
    """Fine-tuned ROUGE/BLEU of each run with 95% bootstrap error bars (base of the first run for reference)."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / (len(runs) + 1)
    x = np.arange(len(metrics))
    systems = [("base (" + runs[0].name + ")", runs[0], "base")] + [(r.name, r, "finetuned") for r in runs]
    for j, (label, r, system) in enumerate(systems):
        vals, lo, hi = [], [], []
        for m in metrics:
            d = r.eval.get("generation", {}).get(m, {}).get(system)
            scale = results.scale(m)
            v = d["value"] * scale if d else np.nan
            vals.append(v)
            lo.append(v - d["ci_low"] * scale if d else 0)
            hi.append(d["ci_high"] * scale - v if d else 0)
        ax.bar(x + j * width, vals, width, yerr=[lo, hi], capsize=3, label=label,
               color="#bbbbbb" if system == "base" else f"C{j - 1}")
    ax.set_xticks(x + width * len(runs) / 2, [m.upper() if m == "bleu" else m for m in metrics])
    ax.set_ylabel("score (0-100)")
    ax.set_title("Generation metrics, 95% bootstrap CIs")
    ax.legend(fontsize=8)
    return save(fig, path)


def write_tables(runs: list[Run], out_dir: Path) -> dict[str, Path]:
    """comparison.md / .csv, config_diff.csv and the two plots under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table, diff = results_table(runs), config_diff(runs)
    table.to_csv(out_dir / "comparison.csv")
    diff.to_csv(out_dir / "config_diff.csv")
    md = ["# Experiment comparison", "", "Runs: " + ", ".join(f"`{r.root}`" for r in runs), "",
          "## Config differences", "", diff.to_markdown(), "", "## Results (fine-tuned; [95% bootstrap CI])", "",
          table.T.to_markdown(), ""]
    (out_dir / "comparison.md").write_text("\n".join(md))
    files = {"markdown": out_dir / "comparison.md", "csv": out_dir / "comparison.csv",
             "config_diff": out_dir / "config_diff.csv",
             "loss_plot": out_dir / "loss_curves.png", "metrics_plot": out_dir / "metrics.png"}
    plt.close(plot_loss_curves(runs, files["loss_plot"]))
    plt.close(plot_metric_bars(runs, files["metrics_plot"]))
    return files


def claim_out(out_dir: str | Path, name: str = "--out") -> Path:
    """The comparison folder, held to the run directories' rule (:func:`hb_utils.run_dir.claim_dir`): never
    the filesystem root, the home directory, a file or a folder the kit did not make. A folder holding only
    what ``hb compare`` writes was made by it before folders were marked, and is marked now."""
    out = run_dir.check_output_root(out_dir, name, f"{name} outputs/compare")
    if out.is_dir() and not run_dir.is_kit_dir(out) and {p.name for p in out.iterdir()} <= COMPARE_FILES:
        run_dir.write_json(out / run_dir.MARKER, {"kit": "hb_utils", "what": "comparison folder (made before markers)"})
    return run_dir.claim_dir(out, made_by="hb compare", what="comparison folder")


def compare_runs(run_dirs: list[str], out_dir: str | None = None, *, report: bool = True,
                 kernel: str = "python3") -> dict[str, Path]:
    """Tables and plots for ``run_dirs``; with ``report`` also the executed 06_compare notebook + HTML."""
    if len(run_dirs) < 2:
        raise RunError("Give at least two run directories to compare, e.g. hb compare outputs/exp1 outputs/exp2.")
    runs = [load_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise RunError(f"Run names repeat ({', '.join(names)}): compare runs with different experiment names.")
    out = claim_out(out_dir or "outputs/compare")
    files = write_tables(runs, out)
    if report:
        nb = out / "06_compare.ipynb"
        execute(run_dir.repo_root() / "notebooks" / "06_compare.ipynb", nb,
                {"run_dirs": [str(r.root) for r in runs], "out_dir": str(out)}, cwd=run_dir.repo_root(), kernel=kernel)
        files["report"] = nb
        files["html"] = to_html(nb)
    return files
