"""Compare finished runs: what differs in their configs, what that did to the results, and which setting wins.

Why: an experiment series (rank, epochs, learning rate) asks "is this setting better than that one?". Two runs'
own 95% intervals over 20 test questions overlap almost always, and overlapping intervals do not show that two
runs are equal; but runs of one data config answer **the same test questions**, so run − baseline can be
bootstrapped over those questions *paired* (the same resampled questions for both runs), which cancels how hard
each question is and gives a far tighter interval (:func:`compare_to_baseline`). Every run is compared with one
baseline on several metrics, so the verdicts use Bonferroni-adjusted intervals (m comparisons, each at
1 − 0.05/m): the chance that any verdict in the table is a false "better"/"worse" stays under 5%.

Each run directory already holds everything (``config.json``, ``metrics/train.json``, ``metrics/eval.json``,
``metrics/predictions.jsonl``, ``metrics/log_history.json``); this module reads them and writes markdown/CSV
tables, the verdicts, overlaid loss curves, metric bars and each metric against each swept parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from hb_utils import results, run_dir
from hb_utils.config import ExperimentConfig, fields_in
from hb_utils.errors import RunError
from hb_utils.evaluate import metrics as ev_metrics
from hb_utils.plots import save

# Everything hb compare writes into its --out folder.
COMPARE_FILES = {"comparison.md", "comparison.csv", "config_diff.csv", "verdicts.csv", "loss_curves.png",
                 "metrics.png", "metric_vs_param.png", "06_compare.ipynb", "06_compare.html"}
TABLE_FILES = {"markdown": "comparison.md", "csv": "comparison.csv", "config_diff": "config_diff.csv",
               "verdicts": "verdicts.csv", "loss_plot": "loss_curves.png", "metrics_plot": "metrics.png",
               "param_plot": "metric_vs_param.png"}
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
    cfg: ExperimentConfig | None = None


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
    return Run(root.name, root, conf.get("config", {}), train, evaluation, history, cfg)


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


# --------------------------------------------------------------------------- paired comparison with a baseline
# The metrics each run is compared on (labels, scales and directions: hb_utils.results, hb_utils.evaluate.metrics).
# Answer length has no "better", so it is shown in the results table but is no comparison here.
PAIRED_METRICS = ("rougeL", "bleu", "disclaimer", "stopped", "empty_or_loop")
SAMPLES = 10_000  # resamples: Bonferroni intervals sit far in the tails (0.25% and 99.75% for m = 10)
SEED = 0
FAMILY_ERROR = 0.05  # chance that any verdict of the table is a false "better" or "worse"


@dataclass
class QuestionScores:
    """Per test question: the fine-tuned model's score on each metric (from ``metrics/predictions.jsonl``), the
    corpus-BLEU statistics of its answer, and the key that finds the same question in another run."""

    keys: list[str]
    scores: dict[str, np.ndarray]
    bleu_stats: np.ndarray


def question_scores(run: Run) -> QuestionScores | None:
    """The run's per-question scores, or None when it has no ``metrics/predictions.jsonl`` (then it can only be
    compared unpaired, from eval.json's intervals). RunError when the file was made by another config."""
    path = run.root / "metrics" / "predictions.jsonl"
    if not path.is_file():
        return None
    rows = run_dir.read_jsonl(path)
    expected = run.cfg.fingerprint("eval") if run.cfg else None
    stale = {r.get("fingerprint") for r in rows} - {expected}
    if expected and stale:
        raise RunError(f"{path} was made by another config ({', '.join(map(str, sorted(stale, key=str)))}, "
                       f"config.json says {expected}); rerun 04_evaluate for {run.name} (hb run --only 04).")
    seen: dict[str, int] = {}
    keys = []
    for r in rows:  # a question asked twice in the test split stays two questions: text + occurrence
        seen[r["question"]] = seen.get(r["question"], 0) + 1
        keys.append(f"{r['question']}\u0000{seen[r['question']]}")
    names = {k for r in rows for k in r.get("finetuned_scores", {})}
    scores = {k: np.array([float(r["finetuned_scores"][k]) for r in rows]) for k in names}
    stats = ev_metrics.bleu_statistics([r["finetuned"] for r in rows], [r["reference"] for r in rows])
    return QuestionScores(keys, scores, stats)


def _statistic(metric: str, q: QuestionScores) -> Any:
    """Indices (one row per resample, or one 1-D index) -> the metric on those questions."""
    if metric == "bleu":
        def bleu(idx: np.ndarray) -> np.ndarray:
            summed = q.bleu_stats[np.atleast_2d(idx)].sum(axis=1)  # one corpus per resample
            return np.array([ev_metrics.bleu_from_statistics(row) for row in summed])
        return bleu
    values = q.scores[metric]
    return lambda idx: np.atleast_2d(values[idx]).mean(axis=1)


def bootstrap_difference(metric: str, base: QuestionScores, run: QuestionScores, *, paired: bool,
                         base_idx: np.ndarray, run_idx: np.ndarray, samples: int = SAMPLES, seed: int = SEED,
                         confidences: Sequence[float] = (0.95,)) -> dict[str, Any]:
    """run − baseline on ``metric`` with percentile bootstrap intervals at each of ``confidences``.

    Paired: ``base_idx[i]`` and ``run_idx[i]`` are the same question; each resample draws question positions
    ``numpy.random.default_rng(seed).integers(0, n, (samples, n))`` (``metrics.bootstrap_indices``) and takes
    both runs' scores on them. Unpaired (other test questions): each run's questions are resampled on
    their own (seeds ``seed`` and ``seed + 1``)."""
    stat_b, stat_r = _statistic(metric, base), _statistic(metric, run)
    if paired:
        idx = ev_metrics.bootstrap_indices(len(base_idx), samples, seed)
        diffs = stat_r(run_idx[idx]) - stat_b(base_idx[idx])
    else:
        ib = ev_metrics.bootstrap_indices(len(base_idx), samples, seed)
        ir = ev_metrics.bootstrap_indices(len(run_idx), samples, seed + 1)
        diffs = stat_r(run_idx[ir]) - stat_b(base_idx[ib])
    out: dict[str, Any] = {"delta": float(stat_r(run_idx)[0] - stat_b(base_idx)[0]), "samples": samples,
                           "seed": seed}
    for c in confidences:
        lo, hi = np.percentile(diffs, [50 * (1 - c), 50 * (1 + c)])
        out[c] = (float(lo), float(hi))
    return out


def pairing(base: Run, run: Run, qb: QuestionScores, qr: QuestionScores) -> tuple[bool, np.ndarray, np.ndarray, str]:
    """(paired, baseline positions, run positions, note). Paired when both runs' test sets are one split (the same
    data fingerprint): on the questions both answered, matched by their text. Otherwise unpaired, saying why."""
    fb, fr = (r.cfg.fingerprint("data") if r.cfg else None for r in (base, run))
    if fb != fr or fb is None:
        changed = [f"{k} {base.config.get(k)!r} -> {run.config.get(k)!r}" for k in fields_in("data")
                   if base.config.get(k) != run.config.get(k)]
        return (False, np.arange(len(qb.keys)), np.arange(len(qr.keys)),
                "unpaired: the test sets differ (data parameters " + ("; ".join(changed) or "unknown") + ")")
    where = {k: i for i, k in enumerate(qr.keys)}
    common = [(i, where[k]) for i, k in enumerate(qb.keys) if k in where]
    if not common:
        return (False, np.arange(len(qb.keys)), np.arange(len(qr.keys)),
                "unpaired: no test question in common (predictions.jsonl holds other questions)")
    bi, ri = (np.array(x) for x in zip(*common, strict=True))
    note = "" if len(common) == len(qb.keys) == len(qr.keys) else (
        f"paired on the {len(common)} questions both answered ({len(qb.keys)} and {len(qr.keys)} scored)")
    return True, bi, ri, note


def compare_to_baseline(runs: list[Run], baseline: str | None = None, metrics: Sequence[str] = PAIRED_METRICS, *,
                        samples: int = SAMPLES, seed: int = SEED, family_error: float = FAMILY_ERROR) -> pd.DataFrame:
    """One row per (run, metric): run − baseline with its 95% interval, the Bonferroni-adjusted interval, the
    verdict and whether it is paired. ``m`` (the number of comparisons) = other runs x metrics compared; each
    adjusted interval is at confidence 1 − family_error / m, so all verdicts together hold at 95%."""
    base = find_run(runs, baseline)
    scores = {r.name: question_scores(r) for r in runs}
    others = [r for r in runs if r is not base]
    m = max(1, sum(1 for r in others if scores[r.name] and scores[base.name]) * len(metrics))
    adjusted = 1 - family_error / m
    rows = []
    for r in others:
        qb, qr = scores[base.name], scores[r.name]
        for metric in metrics:
            row: dict[str, Any] = {"run": r.name, "metric": metric, "label": results.label(metric),
                                   "baseline": base.name, "comparisons": m, "adjusted_confidence": adjusted}
            if qb is None or qr is None:
                missing = ", ".join(x.name for x, q in ((base, qb), (r, qr)) if q is None)
                rows.append({**row, "paired": False, "n": 0, "verdict": "not compared",
                             "note": f"no metrics/predictions.jsonl for {missing} (rerun 04_evaluate)"})
                continue
            if metric != "bleu" and (metric not in qb.scores or metric not in qr.scores):
                rows.append({**row, "paired": False, "n": 0, "verdict": "not compared",
                             "note": f"{metric} is not in predictions.jsonl"})
                continue
            paired, bi, ri, note = pairing(base, r, qb, qr)
            d = bootstrap_difference(metric, qb, qr, paired=paired, base_idx=bi, run_idx=ri, samples=samples,
                                     seed=seed, confidences=(0.95, adjusted))
            (lo, hi), (alo, ahi) = d[0.95], d[adjusted]
            rows.append({**row, "paired": paired, "n": len(bi) if paired else f"{len(bi)} / {len(ri)}",
                         "delta": d["delta"], "ci_low": lo, "ci_high": hi, "adj_low": alo, "adj_high": ahi,
                         "verdict": verdict(metric, alo, ahi, len(bi) if paired else None), "note": note})
    return pd.DataFrame(rows)


def verdict(metric: str, adj_low: float, adj_high: float, n: int | None) -> str:
    """better / worse (the adjusted interval excludes 0, read with the metric's direction) or not distinguishable."""
    higher = ev_metrics.HIGHER_IS_BETTER.get(metric, True)
    if adj_low > 0 or adj_high < 0:
        if higher is None:
            return "higher" if adj_low > 0 else "lower"
        return "better" if (adj_low > 0) == higher else "worse"
    return f"not distinguishable on {n} questions" if n else "not distinguishable"


def find_run(runs: list[Run], name: str | None) -> Run:
    """The run called ``name`` (a run directory's name), or the first run when ``name`` is None or empty."""
    if not name:
        return runs[0]
    hits = [r for r in runs if r.name == name or str(r.root) == str(name)]
    if not hits:
        raise RunError(f"The baseline {name!r} is not among the runs compared ({', '.join(r.name for r in runs)}).")
    return hits[0]


def _signed(value: float, factor: float, digits: int = 1) -> str:
    return f"{value * factor:+.{digits}f}".replace("-", "\u2212")


def verdict_lines(table: pd.DataFrame) -> list[str]:
    """One sentence per run: ``lora_r=16: ROUGE-L +1.2 [−0.3, +2.7] vs lora_r=8: not distinguishable on 20
    questions; BLEU ...`` (95% intervals; the verdict from the adjusted ones)."""
    lines = []
    for run, group in table.groupby("run", sort=False):
        parts = []
        for _, row in group.iterrows():
            if row["verdict"] == "not compared":
                parts.append(f"{row['label']}: not compared ({row['note']})")
                continue
            f = results.scale(row["metric"])
            parts.append(f"{row['label']} {_signed(row['delta'], f)} [{_signed(row['ci_low'], f)}, "
                         f"{_signed(row['ci_high'], f)}]: {row['verdict']}")
        base = group["baseline"].iloc[0]
        note = next((n for n in group["note"] if n), "")
        lines.append(f"**{run}** vs {base}: " + "; ".join(parts) + (f" ({note})" if note else ""))
    return lines


def verdict_summary(table: pd.DataFrame) -> str:
    """What the verdict table is and how far to trust it, in two sentences."""
    if table.empty:
        return "Only the baseline: nothing to compare."
    m, conf = int(table["comparisons"].iloc[0]), float(table["adjusted_confidence"].iloc[0])
    paired = table["paired"].astype(bool)
    kind = ("paired bootstrap over the same test questions" if paired.all() else
            "bootstrap, paired where runs share the test set" if paired.any() else "unpaired bootstrap")
    return (f"Run − baseline ({table['baseline'].iloc[0]}), {kind} ({SAMPLES:,} resamples, seed {SEED}); "
            f"intervals shown are 95%. {m} comparisons, so each verdict uses a Bonferroni-adjusted "
            f"{conf:.2%} interval (family-wise error ≤ {FAMILY_ERROR:.0%}): \"better\"/\"worse\" only when it "
            "excludes 0. \"Not distinguishable\" is an answer: these questions cannot tell the runs apart.")


def verdict_table(table: pd.DataFrame) -> pd.DataFrame:
    """The verdicts for display: run x metric, difference with its 95% and adjusted intervals."""
    rows = []
    for _, r in table.iterrows():
        f = results.scale(r["metric"])
        done = r["verdict"] != "not compared"
        rows.append({"run": r["run"], "metric": r["label"],
                     "run − baseline [95%]": (f"{_signed(r['delta'], f)} [{_signed(r['ci_low'], f)}, "
                                              f"{_signed(r['ci_high'], f)}]") if done else "-",
                     f"adjusted [{r['adjusted_confidence']:.2%}]": (f"[{_signed(r['adj_low'], f)}, "
                                                                   f"{_signed(r['adj_high'], f)}]") if done else "-",
                     "verdict": r["verdict"], "questions": r["n"],
                     "paired": "yes" if r["paired"] else "no", "note": r["note"]})
    return pd.DataFrame(rows).set_index(["run", "metric"]) if rows else pd.DataFrame()


# --------------------------------------------------------------------------- metric against swept parameter
def swept_parameters(runs: list[Run], swept: Sequence[str] | None = None) -> list[str]:
    """The parameters to plot against: ``swept`` when given (a series knows them), else every result-shaping
    parameter whose value differs between the runs."""
    if swept:
        return [p for p in swept if p in runs[0].config]
    return [k for k in fields_in("data", "train", "eval") if len({_show(r.config.get(k)) for r in runs}) > 1]


def plot_metric_vs_param(runs: list[Run], params: Sequence[str], path: Path | None = None, *,
                         baseline: str | None = None, metrics: Sequence[str] = ("rougeL", "bleu")) -> plt.Figure:
    """Each metric (rows) against each swept parameter (columns): one point per run with its own 95% interval
    (fine-tuned model, eval.json), the baseline drawn hollow. Runs that share a value are spread sideways."""
    params = list(params) or ["run"]
    base = find_run(runs, baseline).name
    fig, axes = plt.subplots(len(metrics), len(params), figsize=(4.2 * len(params) + 1, 3.2 * len(metrics)),
                             squeeze=False)
    for j, param in enumerate(params):
        values = [r.name if param == "run" else _show(r.config.get(param)) for r in runs]
        order = sorted(set(values), key=lambda v: (_as_number(v) is None, _as_number(v) or 0, v))
        for i, metric in enumerate(metrics):
            ax = axes[i][j]
            f = results.scale(metric)
            placed: dict[str, int] = {}
            for k, (r, v) in enumerate(zip(runs, values, strict=True)):
                d = r.eval.get("generation", {}).get(metric, {}).get("finetuned")
                if not d:
                    continue
                x = order.index(v) + 0.08 * placed.get(v, 0)
                placed[v] = placed.get(v, 0) + 1
                ax.errorbar([x], [d["value"] * f], yerr=[[(d["value"] - d["ci_low"]) * f],
                                                           [(d["ci_high"] - d["value"]) * f]],
                            fmt="o", capsize=4, color=f"C{k}", mfc="white" if r.name == base else f"C{k}",
                            label=r.name + (" (baseline)" if r.name == base else ""))
            ax.set_xticks(range(len(order)), order, rotation=20 if param == "run" else 0)
            ax.set_xlim(-0.5, len(order) - 0.5 + 0.08 * max(placed.values(), default=1))
            ax.set_xlabel(param)
            ax.set_ylabel(results.label(metric) + (" (0-100)" if f == 100 else ""))
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.suptitle("Fine-tuned metric against each swept parameter (95% bootstrap intervals)", fontsize=10)
    fig.tight_layout()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    return fig


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


# --------------------------------------------------------------------------- external evaluation sets
def external_tables(runs: list[Run]) -> dict[str, pd.DataFrame]:
    """Per external evaluation set (``eval.json["external"][<set>]``, the test split's shape), one row per run:
    fine-tuned value and fine-tuned − base, each with its 95% interval. Across runs these are read side by side
    (unpaired): the per-question scores of external sets are not part of the paired comparison."""
    names = list(dict.fromkeys(s for r in runs for s in (r.eval.get("external") or {})))
    tables = {}
    for name in names:
        rows = []
        for r in runs:
            block = (r.eval.get("external") or {}).get(name)
            if not block:
                rows.append({"run": r.name, "note": "not evaluated on this set"})
                continue
            gen = block.get("generation", {})
            row: dict[str, Any] = {"run": r.name}
            for key in ("rougeL", "bleu", "disclaimer", "stopped", "empty_or_loop"):
                if key in gen:
                    f = results.scale(key)
                    row[results.label(key)] = results.format_ci(gen[key].get("finetuned"), f, 1)
                    row[f"{results.label(key)} Δ vs base"] = results.format_ci(gen[key].get("delta"), f, 1)
            statements = block.get("statements") or {}
            if statements.get("judged"):  # judged statement coverage, always beside the judge's reliability label
                met = statements.get("must_have") or {}
                row["must-have met %"] = results.format_ci(met.get("finetuned"), 100.0, 1)
                row["must-have met % Δ vs base"] = results.format_ci(met.get("delta"), 100.0, 1)
                row["judge"] = statements["judge"]["label"]
            settings = block.get("settings") or {}
            row["questions"] = settings.get("eval_examples", settings.get("examples"))
            rows.append(row)
        tables[name] = pd.DataFrame(rows).set_index("run")
    return tables


def write_tables(runs: list[Run], out_dir: Path, *, baseline: str | None = None,
                 swept: Sequence[str] | None = None, title: str | None = None,
                 verdicts: pd.DataFrame | None = None) -> dict[str, Path]:
    """comparison.md / .csv, config_diff.csv, verdicts.csv and the plots under ``out_dir``; comparison.md opens on
    the verdicts against the baseline (``verdicts``: :func:`compare_to_baseline`'s table when already made)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table, diff = results_table(runs), config_diff(runs)
    verdicts = compare_to_baseline(runs, baseline) if verdicts is None else verdicts
    table.to_csv(out_dir / "comparison.csv")
    diff.to_csv(out_dir / "config_diff.csv")
    verdicts.to_csv(out_dir / "verdicts.csv", index=False)
    md = [f"# {title or 'Experiment comparison'}", "", "Runs: " + ", ".join(f"`{r.root}`" for r in runs), "",
          f"## Against the baseline ({find_run(runs, baseline).name})", "", verdict_summary(verdicts), ""]
    md += [f"- {line}" for line in verdict_lines(verdicts)] + [""]
    if not verdicts.empty:
        md += [verdict_table(verdicts).reset_index().to_markdown(index=False), ""]
    md += ["![metric against parameter](metric_vs_param.png)", "", "## Config differences", "", diff.to_markdown(),
           "", "## Results (fine-tuned; [95% bootstrap CI])", "", table.T.to_markdown(), ""]
    for name, ext in external_tables(runs).items():
        md += [f"## External set {name} (fine-tuned; Δ vs its base model; [95% CI]; unpaired across runs)", "",
               ext.T.to_markdown(), ""]
    (out_dir / "comparison.md").write_text("\n".join(md))
    files = {key: out_dir / name for key, name in TABLE_FILES.items()}
    plt.close(plot_loss_curves(runs, files["loss_plot"]))
    plt.close(plot_metric_bars(runs, files["metrics_plot"]))
    plt.close(plot_metric_vs_param(runs, swept_parameters(runs, swept), files["param_plot"], baseline=baseline))
    return files


def claim_out(out_dir: str | Path, name: str = "--out") -> Path:
    """The comparison folder, held to the run directories' rule (:func:`hb_utils.run_dir.claim_dir`): never
    the filesystem root, the home directory, a file or a folder the kit did not make. A folder holding only
    what ``hb compare`` writes was made by it before folders were marked, and is marked now."""
    out = run_dir.check_output_root(out_dir, name, f"{name} outputs/compare")
    if out.is_dir() and not run_dir.is_kit_dir(out) and {p.name for p in out.iterdir()} <= COMPARE_FILES:
        run_dir.write_json(out / run_dir.MARKER, {"kit": "hb_utils", "what": "comparison folder (made before markers)"})
    return run_dir.claim_dir(out, made_by="hb compare", what="comparison folder")


def compare_runs(run_dirs: list[str], out_dir: str | None = None, *, report: bool = True, kernel: str = "python3",
                 baseline: str | None = None, swept: Sequence[str] | None = None,
                 title: str | None = None) -> dict[str, Path]:
    """Tables and plots for ``run_dirs`` (every run against ``baseline``, default the first); with ``report`` also
    the executed 06_compare notebook + HTML."""
    if len(run_dirs) < 2:
        raise RunError("Give at least two run directories to compare, e.g. hb compare outputs/exp1 outputs/exp2.")
    runs = [load_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise RunError(f"Run names repeat ({', '.join(names)}): compare runs with different experiment names.")
    baseline = find_run(runs, baseline).name
    out = claim_out(out_dir or "outputs/compare")
    from hb_utils.runs.report import execute, to_html  # here: it imports torch (the device line of run reports)

    if not report:
        return write_tables(runs, out, baseline=baseline, swept=swept, title=title)
    nb = out / "06_compare.ipynb"  # its last cell writes the tables and plots (write_tables)
    execute(run_dir.repo_root() / "notebooks" / "06_compare.ipynb", nb,
            {"run_dirs": [str(r.root) for r in runs], "out_dir": str(out), "baseline": baseline,
             "swept": list(swept or []), "title": title or ""}, cwd=run_dir.repo_root(), kernel=kernel)
    files = {key: out / name for key, name in TABLE_FILES.items()}
    files["report"] = nb
    files["html"] = to_html(nb)
    return files
