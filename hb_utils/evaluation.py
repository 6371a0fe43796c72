"""Stages 04 (evaluate) and 05 (qualitative) as functions, so the notebooks stay thin and tested.

Why one load: the base model is loaded ONCE with the adapter on top, and the base answers come
from the same weights with the adapter switched off (``with model.disable_adapter():``). Base and
fine-tuned therefore share the 4-bit quantisation, dtype, tokenizer, chat template, prompts and
greedy settings; the only difference left is the adapter. A missing adapter, or one trained on
another model or config, is refused by :func:`hb_utils.modeling.load_adapter_model`.

Artifacts (``metrics/`` of the run, stamped with the config fingerprints): ``eval.json`` (metrics
with 95% bootstrap intervals and paired deltas, both perplexity variants, implementations and
settings), ``predictions.jsonl`` (one row per test question), ``qualitative.jsonl`` and
``qualitative.md`` (the six standard prompts plus ``cfg.prompts``).
"""

from __future__ import annotations

import contextlib
import re
import time
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from hb_utils import data, metrics, modeling, perplexity
from hb_utils.config import ExperimentConfig
from hb_utils.errors import RunError
from hb_utils.generation import GenResult, generate_answers
from hb_utils.paths import RunPaths, read_json, read_jsonl, utc_now, write_json, write_jsonl
from hb_utils.plots import save

IN_DOMAIN = (
    "What are the symptoms of Type 2 diabetes?",
    "How does hypertension affect the heart?",
    "What is the recommended treatment for asthma?",
    "Can you explain what a BMI of 28 means?",
)
OUT_OF_DOMAIN = ("What is the capital of France?", "Help me write a Python function.")

TEXT_METRICS = (*metrics.ROUGE_TYPES, "bleu")
RATE_METRICS = ("stopped", "disclaimer", "empty_or_loop")
LENGTH_METRICS = ("words", "tokens")
LABELS = {
    "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L", "rougeLsum": "ROUGE-Lsum", "bleu": "BLEU",
    "stopped": "stops by itself", "disclaimer": "advises a professional", "empty_or_loop": "empty or looping",
    "words": "answer words", "tokens": "answer tokens",
}


def _stamp(cfg: ExperimentConfig) -> dict[str, Any]:
    return {"experiment": cfg.experiment, "fingerprints": cfg.fingerprints(),
            "created": utc_now()}


def _generate(model: Any, tokenizer: Any, questions: list[str], cfg: ExperimentConfig, **kw: Any) -> list[GenResult]:
    return generate_answers(model, tokenizer, questions, cfg.system_prompt, batch_size=cfg.gen_batch_size,
                            progress=cfg.progress, **kw)


# --------------------------------------------------------------------------- 04 evaluate
def run_evaluation(cfg: ExperimentConfig) -> dict[str, Any]:
    """Greedy answers and perplexity of base and fine-tuned model on the test split; writes
    ``metrics/eval.json`` and ``metrics/predictions.jsonl`` and returns the eval.json payload."""
    run = RunPaths.for_config(cfg)
    model, tokenizer = modeling.load_adapter_model(cfg, run.adapter)  # refuses missing / foreign adapters
    test = data.ensure_splits(cfg)["test"]
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
            answers[system] = _generate(model, tokenizer, questions, cfg, **greedy)
            nll[system] = perplexity.token_nll(model, tokenizer, [r["messages"] for r in ppl_records],
                                               batch_size=cfg.ppl_batch_size, progress=cfg.progress)
        seconds[system] = round(time.perf_counter() - t0, 2)

    boot = {"samples": cfg.bootstrap_samples, "seed": cfg.seed}
    fns, per_example = {}, {}
    for system, res in answers.items():
        fns[system], per_example[system] = metrics.generation_statistics(
            [r.text for r in res], references, [r.n_new_tokens for r in res], [r.stopped for r in res])
    n = len(gen_records)
    result = {
        **_stamp(cfg),
        "adapter_meta": modeling.read_adapter_meta(run.adapter),
        "implementations": metrics.implementations(),
        "settings": {"model_name": cfg.model_name, "test_size": len(test), "eval_size": cfg.eval_size,
                     "eval_examples": n, "ppl_size": cfg.ppl_size, "ppl_examples": len(ppl_records),
                     "decoding": "greedy", "max_new_tokens": cfg.eval_max_new_tokens,
                     "batch_size": cfg.gen_batch_size, "ppl_batch_size": cfg.ppl_batch_size, "bootstrap": {**boot, "confidence": 0.95},
                     "base": "same loaded model with the adapter disabled"},
        "generation": metrics.compare_systems(fns["base"], fns["finetuned"], n, **boot),
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
    fp = cfg.fingerprint("all")
    rows = []
    for i, rec in enumerate(gen_records):
        row = {"id": rec["id"], "question": rec["question"], "reference": rec["answer"]}
        for system in ("base", "finetuned"):
            res = answers[system][i]
            row[system] = res.text
            row[f"{system}_scores"] = {k: float(v[i]) for k, v in per_example[system].items()}
        row["fingerprint"] = fp
        rows.append(row)
    write_jsonl(run.metrics / "predictions.jsonl", rows)
    write_json(run.metrics / "eval.json", result)
    return result


def load_predictions(cfg: ExperimentConfig) -> pd.DataFrame:
    """predictions.jsonl of this config as a frame (scores flattened to base_rougeL, finetuned_rougeL …)."""
    run = RunPaths.for_config(cfg)
    path = run.metrics / "predictions.jsonl"
    if not path.is_file():
        raise RunError(f"{path} does not exist: run 04_evaluate (or `hb run`) for this config first.")
    rows = read_jsonl(path)
    stale = {r["fingerprint"] for r in rows} - {cfg.fingerprint("all")}
    if stale:
        raise RunError(f"{path} was made by another config "
                                  f"({', '.join(sorted(stale))}); rerun 04_evaluate with this config.")
    flat = []
    for r in rows:
        out = {k: v for k, v in r.items() if not k.endswith("_scores")}
        for system in ("base", "finetuned"):
            out.update({f"{system}_{k}": v for k, v in r[f"{system}_scores"].items()})
        flat.append(out)
    return pd.DataFrame(flat)


def _fmt(d: dict[str, float], scale: float, digits: int) -> str:
    v, lo, hi = (d.get("value", d.get("delta")) * scale, d["ci_low"] * scale, d["ci_high"] * scale)
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def comparison_table(result: dict[str, Any]) -> pd.DataFrame:
    """Base, fine-tuned and paired difference, each with its 95% interval, one row per metric.
    ROUGE and rates are shown in percent, BLEU on its 0-100 scale, lengths as counts."""
    rows = []
    for name, m in result["generation"].items():
        scale = 1.0 if name in ("bleu", *LENGTH_METRICS) else 100.0
        rows.append({"metric": LABELS.get(name, name), "base": _fmt(m["base"], scale, 1),
                     "fine-tuned": _fmt(m["finetuned"], scale, 1), "difference": _fmt(m["delta"], scale, 1),
                     "P(not better)": round(m["delta"]["p_not_better"], 3) if "p_not_better" in m["delta"] else None})
    return pd.DataFrame(rows).set_index("metric")


def perplexity_table(result: dict[str, Any]) -> pd.DataFrame:
    """Both perplexity variants for base and fine-tuned, labelled."""
    p = result["perplexity"]
    rows = []
    for key in ("answer_token_weighted", "original_per_example_full_text"):
        row = {"variant": p["base"][key]["label"]}
        for system in ("base", "finetuned"):
            d = p[system][key]
            row[system] = _fmt(d, 1.0, 2) if "ci_low" in d else f"{d['ppl']:.2f}"
        row["tokens"] = p["finetuned"][key]["tokens"]
        rows.append(row)
    return pd.DataFrame(rows).set_index("variant")


def plot_comparison(result: dict[str, Any], path: Any = None) -> plt.Figure:
    """Bars of base vs fine-tuned with 95% bootstrap error bars: text overlap, behaviour rates,
    answer perplexity."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 4), gridspec_kw={"width_ratios": [5, 3, 1.3]})
    panels = [(TEXT_METRICS, "score (0-100; ROUGE x100)", axes[0]), (RATE_METRICS, "% of answers", axes[1])]
    for names, ylabel, ax in panels:
        x = np.arange(len(names))
        for j, system in enumerate(("base", "finetuned")):
            scale = [1.0 if n == "bleu" else 100.0 for n in names]
            d = [result["generation"][n][system] for n in names]
            v = np.array([m["value"] * s for m, s in zip(d, scale, strict=True)])
            err = np.array([[v[i] - d[i]["ci_low"] * scale[i], d[i]["ci_high"] * scale[i] - v[i]]
                            for i in range(len(d))]).T
            ax.bar(x + (j - 0.5) * 0.38, v, 0.38, yerr=err, capsize=3, label=system)
        ax.set_xticks(x, [LABELS[n] for n in names], rotation=20)
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


def extreme_examples(frame: pd.DataFrame, k: int = 3, *, best: bool = True, by: str = "finetuned_rougeL") -> pd.DataFrame:
    """The k best (or worst) test questions by a per-example score of the fine-tuned model."""
    cols = ["question", "reference", "base", "finetuned", "base_rougeL", "finetuned_rougeL"]
    return frame.sort_values(by, ascending=not best, kind="stable").head(k)[cols]


# --------------------------------------------------------------------------- 05 qualitative
_STOP = set("what are the is of how does do can you explain a an me to for in on and with my i it this that "
            "means mean recommended affect help write tell about".split())
_REFUSAL = re.compile(
    r"\b(?:i'?m sorry|i am sorry|i apologi[sz]e|i can(?:not|'t)|i'?m (?:not able|unable)|i am (?:not able|unable)"
    r"|outside (?:of )?(?:my|the) (?:scope|expertise|area)|not (?:within|in) my (?:scope|expertise)"
    r"|(?:only|specifically) (?:answer|help|provide|assist)\w*[^.]{0,40}\b(?:health|medical)"
    r"|as a (?:medical|health)\w* (?:assistant|bot|information))", re.IGNORECASE)


def _stems(text: str) -> set[str]:
    return {w[:5] for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) >= 3 and w not in _STOP}


def on_topic(prompt: str, answer: str) -> bool:
    """The answer mentions a content word of the prompt (words of 3+ letters outside a short stop
    list, compared on their first five letters: "diabetes" ~ "diabetic")."""
    return bool(_stems(prompt) & _stems(answer))


def declined(answer: str) -> bool:
    """The answer refuses or redirects ("I'm sorry", "I can't", "outside my scope", "I only answer
    health questions", "as a medical assistant" …)."""
    return bool(_REFUSAL.search(answer))


def qualitative_prompts(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """(kind, prompt): the four in-domain and two out-of-domain prompts, then cfg.prompts as 'custom'."""
    return ([("in-domain", p) for p in IN_DOMAIN] + [("out-of-domain", p) for p in OUT_OF_DOMAIN]
            + [("custom", p) for p in cfg.prompts])


def answer_flags(prompt: str, result: GenResult) -> dict[str, bool]:
    return {"stopped": result.stopped, "disclaimer": metrics.has_disclaimer(result.text),
            "on_topic": on_topic(prompt, result.text), "declined": declined(result.text),
            "empty_or_loop": not result.text.strip() or metrics.is_looping(result.text)}


def run_qualitative(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """Sampled answers (cfg.qual_*, seeded by cfg.qual_seed so a rerun gives the same text) of base
    and fine-tuned model to the standard prompts; writes qualitative.jsonl and qualitative.md."""
    run = RunPaths.for_config(cfg)
    model, tokenizer = modeling.load_adapter_model(cfg, run.adapter)
    prompts = qualitative_prompts(cfg)
    texts = [p for _, p in prompts]
    sampling = {"max_new_tokens": cfg.qual_max_new_tokens, "do_sample": True, "temperature": cfg.qual_temperature,
                "top_p": cfg.qual_top_p, "repetition_penalty": cfg.qual_repetition_penalty, "seed": cfg.qual_seed}
    finetuned = _generate(model, tokenizer, texts, cfg, **sampling)
    with model.disable_adapter():
        base = _generate(model, tokenizer, texts, cfg, **sampling)
    stamp = _stamp(cfg)
    rows = []
    for (kind, prompt), b, f in zip(prompts, base, finetuned, strict=True):
        rows.append({"kind": kind, "prompt": prompt, "base": b.text, "finetuned": f.text,
                     "base_flags": answer_flags(prompt, b), "finetuned_flags": answer_flags(prompt, f),
                     "base_tokens": b.n_new_tokens, "finetuned_tokens": f.n_new_tokens,
                     "sampling": sampling, "fingerprint": stamp["fingerprints"]["all"]})
    write_jsonl(run.metrics / "qualitative.jsonl", rows)
    (run.metrics / "qualitative.md").write_text(qualitative_markdown(rows, stamp))
    return rows


def _flag_text(kind: str, flags: dict[str, bool]) -> str:
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    topic = f"declined: {yes(flags['declined'])}" if kind == "out-of-domain" else f"on topic: {yes(flags['on_topic'])}"
    return (f"stopped: {yes(flags['stopped'])}; disclaimer: {yes(flags['disclaimer'])}; {topic}"
            + ("; EMPTY/LOOP" if flags["empty_or_loop"] else ""))


def qualitative_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per prompt: both answers side by side with their flags."""
    return pd.DataFrame([{
        "kind": r["kind"], "prompt": r["prompt"], "base answer": r["base"],
        "base flags": _flag_text(r["kind"], r["base_flags"]), "fine-tuned answer": r["finetuned"],
        "fine-tuned flags": _flag_text(r["kind"], r["finetuned_flags"]),
    } for r in rows])


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or "*(empty)*"


def qualitative_markdown(rows: list[dict[str, Any]], stamp: dict[str, Any] | None = None) -> str:
    """A markdown table of :func:`qualitative_frame` (pipes escaped, newlines as <br>)."""
    frame = qualitative_frame(rows)
    lines = []
    if stamp:
        lines.append(f"Experiment `{stamp['experiment']}`, config fingerprint `{stamp['fingerprints']['all']}`, "
                     f"{stamp['created']}.\n")
    lines += ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(_cell(str(v)) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def flag_rates(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Share of answers with each flag, per prompt kind and system."""
    out = []
    for system in ("base", "finetuned"):
        for kind in dict.fromkeys(r["kind"] for r in rows):
            sel = [r[f"{system}_flags"] for r in rows if r["kind"] == kind]
            out.append({"system": system, "kind": kind, "n": len(sel),
                        **{k: float(np.mean([f[k] for f in sel])) for k in sel[0]}})
    return pd.DataFrame(out).set_index(["kind", "system"]).sort_index()


def load_eval(cfg: ExperimentConfig) -> dict[str, Any]:
    """eval.json of this config (refusing one written by another config)."""
    path = RunPaths.for_config(cfg).metrics / "eval.json"
    if not path.is_file():
        raise RunError(f"{path} does not exist: run 04_evaluate (or `hb run`) for this config first.")
    result = read_json(path)
    if result["fingerprints"]["all"] != cfg.fingerprint("all"):
        raise RunError(f"{path} was made by another config; rerun 04_evaluate with this config.")
    return result
