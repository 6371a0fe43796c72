"""Stage 04 (evaluate): base vs fine-tuned on held-out test questions, as functions the notebook calls.

Why one load: the base model is loaded ONCE with the adapter on top, and the base answers come
from the same weights with the adapter switched off (``with model.disable_adapter():``). Base and
fine-tuned therefore share the 4-bit quantisation, dtype, tokenizer, chat template, prompts and
greedy settings; the only difference left is the adapter. A missing adapter, or one trained on
another model or config, is refused by :func:`hb_utils.model.loading.load_adapter_model`.

Artifacts (``metrics/`` of the run, stamped with :func:`hb_utils.run_dir.stamp`): ``eval.json``
(metrics with 95% bootstrap intervals and paired deltas, both perplexity variants, implementations
and settings) and ``predictions.jsonl`` (one row per test question, with the eval fingerprint). With ``external_eval``,
each external set gets its own block ``eval.json["external"][<set>]`` (shaped like the test split's, plus leakage
and judged statements; :mod:`hb_utils.evaluate.external`), the judge's measured accuracy ``eval.json["judge"]``,
and its answers go to ``external_predictions.jsonl``.
Stage 05 is :mod:`hb_utils.evaluate.qualitative`.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from hb_utils import results, run_dir
from hb_utils.config import ExperimentConfig
from hb_utils.data import medquad
from hb_utils.errors import RunError
from hb_utils.evaluate import external as external_eval
from hb_utils.evaluate import metrics, perplexity, reruns
from hb_utils.model import loading
from hb_utils.model.generation import GenResult, generate_answers
from hb_utils.plots import save
from hb_utils.run_dir import RunPaths, read_jsonl, write_json, write_jsonl

NOT_BETTER = "share of resamples not better"


def generate(model: Any, tokenizer: Any, questions: list[str], cfg: ExperimentConfig, **kw: Any) -> list[GenResult]:
    """Answers to ``questions`` with the run's system prompt and batch size (04, 05 and the reload check)."""
    return generate_answers(model, tokenizer, questions, cfg.system_prompt, batch_size=cfg.gen_batch_size,
                            progress=cfg.progress, **kw)


# --------------------------------------------------------------------------- 04 evaluate
def run_evaluation(cfg: ExperimentConfig) -> dict[str, Any]:
    """Greedy answers and perplexity of base and fine-tuned model on the test split; writes
    ``metrics/eval.json`` and ``metrics/predictions.jsonl`` and returns the eval.json payload."""
    run = run_dir.claim(cfg, made_by="evaluation.run_evaluation")
    sets = external_eval.configured_sets(cfg)  # DataError for a missing or unknown file, before any model loads
    external_eval.check_judge(cfg, sets)
    model, tokenizer = loading.load_adapter_model(cfg, run.adapter)  # refuses missing / foreign adapters
    splits = medquad.ensure_splits(cfg)
    test = splits["test"]
    gen_records = metrics.select_first(test, cfg.eval_size)
    ppl_records = metrics.select_first(test, cfg.ppl_size)
    questions = [r["question"] for r in gen_records]
    references = [r["answer"] for r in gen_records]
    greedy = {"max_new_tokens": cfg.eval_max_new_tokens, "do_sample": False}

    answers: dict[str, list[GenResult]] = {}
    nll: dict[str, dict[str, np.ndarray]] = {}
    seconds: dict[str, float] = {}
    for system in ("finetuned", "base"):
        t0 = time.perf_counter()
        with model.disable_adapter() if system == "base" else contextlib.nullcontext():
            answers[system] = generate(model, tokenizer, questions, cfg, **greedy)
            nll[system] = perplexity.token_nll(model, tokenizer, [r["messages"] for r in ppl_records],
                                               batch_size=cfg.ppl_batch_size, progress=cfg.progress)
        seconds[system] = round(time.perf_counter() - t0, 2)
    answered = external_eval.answer_sets(model, tokenizer, sets, cfg)  # the external sets, same settings
    del model  # the judge (if any) loads next
    external_eval.free_memory()

    boot = {"samples": cfg.bootstrap_samples, "seed": cfg.seed}
    fns, per_example = {}, {}
    for system, res in answers.items():
        fns[system], per_example[system] = metrics.generation_statistics(
            [r.text for r in res], references, [r.n_new_tokens for r in res], [r.stopped for r in res])
    n = len(gen_records)
    result = {
        "stamp": run_dir.stamp(cfg, "eval", "evaluation.run_evaluation"),
        "experiment": cfg.experiment,
        "adapter_meta": loading.read_adapter_meta(run.adapter),
        "implementations": metrics.implementations(),
        "settings": {"model_name": cfg.model_name, "test_size": len(test), "eval_size": cfg.eval_size,
                     "eval_examples": n, "ppl_size": cfg.ppl_size, "ppl_examples": len(ppl_records),
                     "decoding": "greedy", "max_new_tokens": cfg.eval_max_new_tokens,
                     "batch_size": cfg.gen_batch_size, "ppl_batch_size": cfg.ppl_batch_size,
                     "bootstrap": {**boot, "confidence": 0.95},
                     "base": "same loaded model with the adapter disabled"},
        "generation": metrics.compare_systems(fns["base"], fns["finetuned"], n, **boot),
        # the baseline of the "advises a professional" rate: how often the reference answers themselves do
        "references": {"disclaimer": metrics.reference_advice_rate(references, **boot)},
        "perplexity": {
            "base": perplexity.perplexity_report(nll["base"], **boot),
            "finetuned": perplexity.perplexity_report(nll["finetuned"], **boot),
            "delta": metrics.paired_bootstrap(
                lambda idx: perplexity.answer_perplexity(nll["base"], idx),
                lambda idx: perplexity.answer_perplexity(nll["finetuned"], idx), len(ppl_records), **boot,
                higher_is_better=False),
        },
        "seconds": seconds,
    }
    ext_rows: list[dict[str, Any]] = []
    if sets:
        data_record = (run_dir.read_json(run.data_stats) if run.data_stats.is_file() else {}).get("external")
        result["external"], result["judge"], ext_rows = external_eval.score_sets(
            cfg, answered, splits["train"] + splits["val"], data_record)
    fp = cfg.fingerprint("eval")
    rows = []
    for i, rec in enumerate(gen_records):
        row = {"id": rec["id"], "question": rec["question"], "reference": rec["answer"]}
        for system in ("base", "finetuned"):
            res = answers[system][i]
            row[system] = res.text
            row[f"{system}_scores"] = {k: float(v[i]) for k, v in per_example[system].items()}
        row["fingerprint"] = fp
        rows.append(row)
    # other eval configs' metrics aside
    reruns.record_eval_rerun(cfg, "04_evaluate", made_by="evaluation.run_evaluation")
    write_jsonl(run.metrics / "predictions.jsonl", rows)
    if ext_rows:
        write_jsonl(run.metrics / "external_predictions.jsonl", ext_rows)
    write_json(run.metrics / "eval.json", result)
    return result


def load_predictions(cfg: ExperimentConfig) -> pd.DataFrame:
    """predictions.jsonl of this config as a frame (scores flattened to base_rougeL, finetuned_rougeL …)."""
    run = RunPaths.for_config(cfg)
    path = run.metrics / "predictions.jsonl"
    if not path.is_file():
        raise RunError(f"{path} does not exist: run 04_evaluate (or `hb run`) for this config first.")
    rows = read_jsonl(path)
    stale = {r["fingerprint"] for r in rows} - {cfg.fingerprint("eval")}
    if stale:
        found = run_dir.read_stamp(run.metrics / "eval.json")  # written with them: names the parameters
        if found and (found.get("fingerprints") or {}).get("eval") in stale:
            run_dir.require(found, cfg, "eval", what=path, fix="Rerun 04_evaluate with this config.")
        raise RunError(f"{path} was made by another config "
                                  f"({', '.join(sorted(stale))}); rerun 04_evaluate with this config.")
    flat = []
    for r in rows:
        out = {k: v for k, v in r.items() if not k.endswith("_scores")}
        for system in ("base", "finetuned"):
            out.update({f"{system}_{k}": v for k, v in r[f"{system}_scores"].items()})
        flat.append(out)
    return pd.DataFrame(flat)


def comparison_table(result: dict[str, Any]) -> pd.DataFrame:
    """Base, fine-tuned and paired difference, each with its 95% interval, one row per metric.
    ROUGE and rates are shown in percent, BLEU on its 0-100 scale, lengths as counts. *reference answers*
    gives the rate of the test set's own answers where one exists (the baseline of "advises a professional").
    The last column is the share of bootstrap resamples in which fine-tuned did not beat base: a resampling
    share, not a p-value."""
    rows = []
    refs = result.get("references", {})
    for name, m in result["generation"].items():
        f = results.scale(name)
        rows.append({"metric": results.label(name), "base": results.format_ci(m["base"], f),
                     "fine-tuned": results.format_ci(m["finetuned"], f),
                     "reference answers": results.format_ci(refs.get(name), f),
                     "difference": results.format_ci(m["delta"], f),
                     NOT_BETTER: round(m["delta"]["p_not_better"], 3) if "p_not_better" in m["delta"] else None})
    return pd.DataFrame(rows).set_index("metric")


def scored_note(result: dict[str, Any]) -> str:
    """One line on how many test questions were scored; says so when the test split had fewer than eval_size."""
    s = result["settings"]
    line = (f"{s['eval_examples']} of {s['test_size']} test questions, greedy, max_new_tokens={s['max_new_tokens']}; "
            f"perplexity on {s['ppl_examples']} answers")
    if isinstance(s["eval_size"], int) and s["eval_examples"] < s["eval_size"]:
        line += (f". Note: eval_size={s['eval_size']} asked for more, but the test split holds only "
                 f"{s['test_size']} questions, so {s['eval_examples']} were scored (raise sample_size or test_frac).")
    return line


def perplexity_table(result: dict[str, Any]) -> pd.DataFrame:
    """Both perplexity variants for base and fine-tuned, labelled; the paired difference (fine-tuned − base,
    95% interval) for the answer-token perplexity, the number to use."""
    p = result["perplexity"]
    rows = []
    for key in ("answer_token_weighted", "original_per_example_full_text"):
        row = {"variant": p["base"][key]["label"]}
        for system in ("base", "finetuned"):
            d = p[system][key]
            row[system] = results.format_ci(d, 1.0, 2) if "ci_low" in d else f"{d['ppl']:.2f}"
        row["difference"] = results.format_ci(p["delta"], 1.0, 2) if key == "answer_token_weighted" else "-"
        row["tokens"] = p["finetuned"][key]["tokens"]
        rows.append(row)
    return pd.DataFrame(rows).set_index("variant")


def plot_comparison(result: dict[str, Any], path: Any = None) -> plt.Figure:
    """Bars of base vs fine-tuned with 95% bootstrap error bars: text overlap, behaviour rates,
    answer perplexity."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), gridspec_kw={"width_ratios": [5, 3, 1.3]})
    panels = [(results.TEXT_METRICS, "score (0-100; ROUGE x100)", axes[0]),
              (results.RATE_METRICS, "% of answers", axes[1])]
    for names, ylabel, ax in panels:
        x = np.arange(len(names))
        for j, system in enumerate(("base", "finetuned")):
            scale = [results.scale(n) for n in names]
            d = [result["generation"][n][system] for n in names]
            v = np.array([m["value"] * s for m, s in zip(d, scale, strict=True)])
            err = np.array([[v[i] - d[i]["ci_low"] * scale[i], d[i]["ci_high"] * scale[i] - v[i]]
                            for i in range(len(d))]).T
            ax.bar(x + (j - 0.5) * 0.38, v, 0.38, yerr=err, capsize=3, label=system)
        ax.set_xticks(x, [results.label(n) for n in names], rotation=20)
        ax.set_ylabel(ylabel)
    axes[0].legend()
    ppl = [result["perplexity"][s]["answer_token_weighted"] for s in ("base", "finetuned")]
    v = np.array([p["value"] for p in ppl])
    err = np.array([[p["value"] - p["ci_low"], p["ci_high"] - p["value"]] for p in ppl]).T
    axes[2].bar([0, 1], v, yerr=err, capsize=3, color=["C0", "C1"])
    axes[2].set_xticks([0, 1], ["base", "fine-tuned"])
    axes[2].set_ylabel("answer perplexity (lower is better)")
    fig.suptitle(f"{result['experiment']}: base vs fine-tuned, {result['settings']['eval_examples']} test questions "
                 "(95% bootstrap intervals)")
    return save(fig, path)


def extreme_examples(frame: pd.DataFrame, k: int = 3, *, best: bool = True,
                     by: str = "finetuned_rougeL") -> pd.DataFrame:
    """The k best (or worst) test questions by a per-example score of the fine-tuned model."""
    cols = ["question", "reference", "base", "finetuned", "base_rougeL", "finetuned_rougeL"]
    return frame.sort_values(by, ascending=not best, kind="stable").head(k)[cols]


def load_eval(cfg: ExperimentConfig) -> dict[str, Any]:
    """``metrics/eval.json`` of this config (the model card and reports read it); refuses one made by
    another evaluation config and names the parameters that differ."""
    path = RunPaths.for_config(cfg).metrics / "eval.json"
    if not path.is_file():
        raise RunError(f"{path} does not exist: run 04_evaluate (or `hb run`) for this config first.")
    result = run_dir.read_json(path)
    run_dir.require(result.get("stamp"), cfg, "eval", what=path,
                    fix="Rerun 04_evaluate (or `hb run --only 04`) with this config.")
    return result
