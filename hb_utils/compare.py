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

from hb_utils import paths
from hb_utils.config import NON_RESULT_FIELDS
from hb_utils.errors import RunError
from hb_utils.plots import save

# (label, metric key in eval.json["generation"], scale) of the generation metrics shown.
GEN_METRICS = [("ROUGE-1", "rouge1", 100), ("ROUGE-2", "rouge2", 100), ("ROUGE-L", "rougeL", 100),
               ("BLEU", "bleu", 1), ("stopped %", "stopped", 100), ("disclaimer %", "disclaimer", 100),
               ("empty/loop %", "empty_or_loop", 100), ("answer words", "words", 1)]


@dataclass
class Run:
    """One finished run directory, as written by ``hb run``."""

    name: str
    root: Path
    config: dict[str, Any]
    train: dict[str, Any]
    eval: dict[str, Any]
    log_history: list[dict[str, Any]]


def load_run(run_dir: str | Path) -> Run:
    """Read a run directory; a missing piece raises RunError saying which stage to run."""
    root = paths.resolve(run_dir)
    needed = {"config.json": "hb run", "metrics/train.json": "03_train_qlora",
              "metrics/eval.json": "04_evaluate"}
    for rel, stage in needed.items():
        if not (root / rel).is_file():
            raise RunError(f"{root} has no {rel}: run {stage} for it first (e.g. `hb run params/<file>.yaml`).")
    history_path = root / "metrics" / "log_history.json"
    history = paths.read_json(history_path) if history_path.is_file() else []
    conf = paths.read_json(root / "config.json")
    return Run(root.name, root, conf.get("config", {}), paths.read_json(root / "metrics" / "train.json"),
               paths.read_json(root / "metrics" / "eval.json"), history)


def config_diff(runs: list[Run]) -> pd.DataFrame:
    """The parameters whose values differ between the runs (rows) per run (columns)."""
    names = [k for k in runs[0].config if k not in NON_RESULT_FIELDS]
    rows = {k: [_show(r.config.get(k)) for r in runs] for k in names
            if len({_show(r.config.get(k)) for r in runs}) > 1}
    return pd.DataFrame(rows, index=[r.name for r in runs]).T if rows else pd.DataFrame(
        {"(no difference)": ["" for _ in runs]}, index=[r.name for r in runs]).T


def _show(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def _ci(d: dict[str, Any] | None, scale: float = 1.0) -> str:
    if not d:
        return "-"
    return f"{d['value'] * scale:.2f} [{d['ci_low'] * scale:.2f}, {d['ci_high'] * scale:.2f}]"


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
        for label, key, scale in GEN_METRICS:
            row[label] = _ci(gen.get(key, {}).get("finetuned"), scale)
            if key in ("rougeL", "bleu"):
                row[f"{label} Δ vs base"] = _ci(_delta_as_ci(gen.get(key, {}).get("delta")), scale)
        row["ppl (answer tokens)"] = _ci(ppl.get("finetuned", {}).get("answer_token_weighted"))
        row["ppl base"] = _ci(ppl.get("base", {}).get("answer_token_weighted"))
        row["train s"] = _num(t.get("train_runtime_s"), 0)
        row["tokens/s"] = _num(t.get("tokens_per_second"), 1)
        row["peak mem GB"] = _num((t.get("peak_memory") or {}).get("gb"), 2)
        row["steps"] = t.get("global_step")
        rows.append(row)
    return pd.DataFrame(rows).set_index("run")


def _delta_as_ci(d: dict[str, Any] | None) -> dict[str, Any] | None:
    return {"value": d["delta"], "ci_low": d["ci_low"], "ci_high": d["ci_high"]} if d else None


def _num(v: Any, digits: int = 3) -> float | None:
    return None if v is None else round(float(v), digits)


def plot_loss_curves(runs: list[Run], path: Path | None = None) -> plt.Figure:
    """Training (solid) and validation (dashed, markers) loss of every run on one axis."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, r in enumerate(runs):
        color = f"C{i}"
        train = [(h["step"], h["loss"]) for h in r.log_history if "loss" in h]
        val = [(h["step"], h["eval_loss"]) for h in r.log_history if "eval_loss" in h]
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
            scale = 1 if m == "bleu" else 100
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
    results, diff = results_table(runs), config_diff(runs)
    results.to_csv(out_dir / "comparison.csv")
    diff.to_csv(out_dir / "config_diff.csv")
    md = ["# Experiment comparison", "", "Runs: " + ", ".join(f"`{r.root}`" for r in runs), "",
          "## Config differences", "", diff.to_markdown(), "", "## Results (fine-tuned; [95% bootstrap CI])", "",
          results.T.to_markdown(), ""]
    (out_dir / "comparison.md").write_text("\n".join(md))
    files = {"markdown": out_dir / "comparison.md", "csv": out_dir / "comparison.csv",
             "config_diff": out_dir / "config_diff.csv",
             "loss_plot": out_dir / "loss_curves.png", "metrics_plot": out_dir / "metrics.png"}
    plt.close(plot_loss_curves(runs, files["loss_plot"]))
    plt.close(plot_metric_bars(runs, files["metrics_plot"]))
    return files


def compare_runs(run_dirs: list[str], out_dir: str | None = None, *, report: bool = True,
                 kernel: str = "python3") -> dict[str, Path]:
    """Tables and plots for ``run_dirs``; with ``report`` also the executed 06_compare notebook + HTML."""
    if len(run_dirs) < 2:
        raise RunError("Give at least two run directories to compare, e.g. hb compare outputs/exp1 outputs/exp2.")
    runs = [load_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise RunError(f"Run names repeat ({', '.join(names)}): compare runs with different experiment names.")
    out = paths.resolve(out_dir or "outputs/compare")
    files = write_tables(runs, out)
    if report:
        import papermill as pm

        from hb_utils.report import to_html

        nb = out / "06_compare.ipynb"
        pm.execute_notebook(str(paths.repo_root() / "notebooks" / "06_compare.ipynb"), str(nb),
                            parameters={"run_dirs": [str(r.root) for r in runs], "out_dir": str(out)},
                            kernel_name=kernel, cwd=str(paths.repo_root()), progress_bar=False)
        files["report"] = nb
        files["html"] = to_html(nb)
    return files
