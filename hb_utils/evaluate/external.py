"""Stage 04 on the external sets (``external_eval``): the test split's measures, per set, plus judged statements.

Why: MedQuAD's test split shares its agencies and templates with training, so it cannot say whether
fine-tuning helps with the questions people really ask. Each external set (:mod:`hb_utils.data.external`) gets
what the test split gets — ROUGE/BLEU, behaviour and length, base vs fine-tuned from the same loaded weights
(adapter on / off), 95% bootstrap intervals over questions and a paired bootstrap of the difference — and
its own block of ``metrics/eval.json`` (``eval.json["external"][<set name>]``, shaped like the test split's:
``settings``, ``generation``, ``references``, ``seconds``; plus ``set``, ``leakage`` and ``statements``).

* **Several reference answers** (LiveQA): each answer is scored against the reference it matches best
  (highest ROUGE-L F), chosen per question and per system; every measure then uses that reference.
* **Leakage**: the scored questions are compared with the run's train and validation pairs
  (:func:`hb_utils.data.external.overlap_with`); 0 for a run whose 02 was given the set, which dropped the
  pairs it found (its counts are reported next to it).
* **Statements** (sets with ``Must_have`` / ``Nice_to_have``): the judge (:mod:`hb_utils.evaluate.judge`)
  decides for each (answer, statement) whether it is met; a question's score is the share of its judged
  statements met; base vs fine-tuned on the questions both have a score for. The judge's accuracy on the
  labelled set is stored next to every judged score, and a judge under 80 % is labelled unreliable.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from rouge_score import rouge_scorer

from hb_utils import results
from hb_utils.config import ExperimentConfig
from hb_utils.data.external import LEAK_KINDS, LEAK_SHORT, ExternalItem, ExternalSet, load_sets, overlap_with
from hb_utils.evaluate import judge, metrics
from hb_utils.model.generation import GenResult, generate_answers

SYSTEMS = ("base", "finetuned")
KINDS = {"must_have": "must-have statements met %", "nice_to_have": "nice-to-have statements met %"}


@dataclass
class SetAnswers:
    """The answers of both systems to the scored questions of one set."""

    set: ExternalSet
    items: list[ExternalItem]  # the first external_size items
    answers: dict[str, list[GenResult]]
    seconds: dict[str, float]


def configured_sets(cfg: ExperimentConfig) -> list[ExternalSet]:
    """The sets 04 scores: every file of ``external_eval``, LiveQA once per ``liveqa_questions`` choice."""
    return load_sets(cfg.external_eval, cfg.liveqa_questions) if cfg.external_eval else []


def needs_judge(cfg: ExperimentConfig, sets: Sequence[ExternalSet]) -> bool:
    return bool(cfg.judge_model.strip()) and any(s.has_statements for s in sets)


def check_judge(cfg: ExperimentConfig, sets: Sequence[ExternalSet]) -> None:
    """Load the judge's tokenizer (seconds) so a judge that cannot load fails before minutes of generation."""
    if needs_judge(cfg, sets):
        from hb_utils.model.source import load_tokenizer

        load_tokenizer(cfg.judge_model)
        judge.load_labels()


def answer_sets(model: Any, tokenizer: Any, sets: Sequence[ExternalSet], cfg: ExperimentConfig) -> list[SetAnswers]:
    """Greedy answers of the fine-tuned model and of the base (the same weights, adapter disabled) to the first
    ``external_size`` questions of each set, batched as the test split's (``gen_batch_size``)."""
    out = []
    for s in sets:
        items = metrics.select_first(s.items, cfg.external_size)
        answers, seconds = {}, {}
        for system in ("finetuned", "base"):
            t0 = time.perf_counter()
            with model.disable_adapter() if system == "base" else contextlib.nullcontext():
                answers[system] = generate_answers(model, tokenizer, [it.question for it in items], cfg.system_prompt,
                                                   batch_size=cfg.gen_batch_size, progress=cfg.progress,
                                                   max_new_tokens=cfg.eval_max_new_tokens, do_sample=False)
            seconds[system] = round(time.perf_counter() - t0, 2)
        out.append(SetAnswers(s, items, answers, seconds))
    return out


def best_references(texts: Sequence[str], references: Sequence[Sequence[str]]) -> list[int]:
    """For each answer, the index of the reference it matches best (ROUGE-L F, the first on ties)."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    best = []
    for text, refs in zip(texts, references, strict=True):
        if len(refs) == 1:
            best.append(0)
            continue
        scores = [scorer.score(metrics.sentences_per_line(r), metrics.sentences_per_line(text))["rougeL"].fmeasure
                  for r in refs]
        best.append(int(np.argmax(scores)))
    return best


def free_memory() -> None:
    """Return a model's memory after its last reference is gone (the judge loads after the evaluated model)."""
    gc.collect()
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _statement_comparison(scores: dict[str, np.ndarray], counts: dict[str, tuple[int, int]],
                          boot: dict[str, int]) -> dict[str, Any]:
    """Base, fine-tuned and paired difference of a statement score on the questions both systems have one for."""
    both = np.flatnonzero(~np.isnan(scores["base"]) & ~np.isnan(scores["finetuned"]))
    out: dict[str, Any] = {"questions": int(len(both)), "questions_with_statements": int(len(scores["base"])),
                           "judgements": {s: counts[s][0] for s in SYSTEMS},
                           "not_judged": {s: counts[s][1] for s in SYSTEMS}}
    if len(both):
        fns = {s: metrics.mean_statistic(scores[s][both]) for s in SYSTEMS}
        out.update({s: metrics.bootstrap_ci(fns[s], len(both), **boot) for s in SYSTEMS})
        out["delta"] = metrics.paired_bootstrap(fns["base"], fns["finetuned"], len(both), **boot)
    return out


def judge_statements(cfg: ExperimentConfig, answered: Sequence[SetAnswers]) -> tuple[dict[str, Any] | None,
                                                                                      dict[str, Any]]:
    """Load the judge, measure it on the labelled set, and judge every (answer, statement) of the sets with
    statements in one batched pass. Returns the judge's summary (None when nothing is judged) and, per set,
    ``{system: {kind: [[verdict per statement] per question]}}`` with the raw replies."""
    todo = [a for a in answered if a.set.has_statements]
    if not todo or not cfg.judge_model.strip():
        return None, {}
    model, tokenizer = judge.load_judge(cfg)
    t0 = time.perf_counter()
    accuracy, _ = judge.measure(model, tokenizer, batch_size=cfg.judge_batch_size, progress=cfg.progress)
    seconds_labelled = time.perf_counter() - t0
    keys, pairs = [], []
    for a in todo:
        for system in SYSTEMS:
            for i, (item, res) in enumerate(zip(a.items, a.answers[system], strict=True)):
                for kind in KINDS:
                    for j, statement in enumerate(getattr(item, kind)):
                        keys.append((a.set.name, system, kind, i, j))
                        pairs.append((res.text, statement))
    t0 = time.perf_counter()
    verdicts = judge.judge(model, tokenizer, pairs, batch_size=cfg.judge_batch_size, progress=cfg.progress)
    seconds = time.perf_counter() - t0
    del model
    free_memory()
    per_set: dict[str, Any] = {a.set.name: {s: {k: [[None] * len(getattr(it, k)) for it in a.items] for k in KINDS}
                                            for s in SYSTEMS} for a in todo}
    for (name, system, kind, i, j), v in zip(keys, verdicts, strict=True):
        per_set[name][system][kind][i][j] = v
    summary = {"model": cfg.judge_model, "rubric": judge.rubric_id(), "rubric_text": judge.RUBRIC,
               "rubric_system": judge.RUBRIC_SYSTEM, "max_new_tokens": judge.MAX_NEW_TOKENS, "decoding": "greedy",
               "batch_size": cfg.judge_batch_size, "labels": str(judge.LABELS), "labels_sha256": judge.labels_digest(),
               "accuracy": accuracy, "reliable": accuracy["reliable"], "label": judge.reliability_label(accuracy),
               "judgements": len(pairs), "not_judged": sum(v.met is None for v in verdicts),
               "seconds": round(seconds, 2), "seconds_labelled": round(seconds_labelled, 2),
               "judgements_per_second": round(len(pairs) / seconds, 2) if seconds > 0 else None}
    return summary, per_set


def _statements_block(cfg: ExperimentConfig, a: SetAnswers, judged: dict[str, Any] | None,
                      summary: dict[str, Any] | None) -> dict[str, Any] | None:
    if not a.set.has_statements:
        return None
    if summary is None or judged is None:
        return {"judged": False, "reason": "judge_model is empty: statements were not graded"}
    boot = {"samples": cfg.bootstrap_samples, "seed": cfg.seed}
    block: dict[str, Any] = {"judged": True, "judge": {k: summary[k] for k in ("model", "rubric", "reliable", "label")},
                             "judge_accuracy": summary["accuracy"]["accuracy"]}
    for kind in KINDS:
        scores, counts = {}, {}
        for system in SYSTEMS:
            met = [[v.met for v in per_q] for per_q in judged[system][kind]]
            scores[system], total, unjudged = judge.coverage(met)
            counts[system] = (total, unjudged)
        block[kind] = _statement_comparison(scores, counts, boot)
    return block


def score_sets(cfg: ExperimentConfig, answered: Sequence[SetAnswers], train_val: Sequence[dict[str, Any]],
               data_record: dict[str, Any] | None
               ) -> tuple[dict[str, Any], dict[str, Any] | None, list[dict[str, Any]]]:
    """Per set, the eval.json block; the judge's summary; and the rows of ``external_predictions.jsonl``.
    ``train_val``: the run's train and validation records; ``data_record``: stats.json's ``external`` (what 02
    dropped)."""
    summary, judged = judge_statements(cfg, answered)
    boot = {"samples": cfg.bootstrap_samples, "seed": cfg.seed}
    blocks: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    fp = cfg.fingerprint("eval")
    for a in answered:
        n = len(a.items)
        refs = [it.references for it in a.items]
        chosen, fns, per_example = {}, {}, {}
        for system in SYSTEMS:
            res = a.answers[system]
            chosen[system] = best_references([r.text for r in res], refs)
            fns[system], per_example[system] = metrics.generation_statistics(
                [r.text for r in res], [refs[i][k] for i, k in enumerate(chosen[system])],
                [r.n_new_tokens for r in res], [r.stopped for r in res])
        advice = np.array([float(any(metrics.advises_professional(r) for r in rs)) for rs in refs])
        dropped = (data_record or {}).get("by_file", {}).get(a.set.file_name)
        blocks[a.set.name] = {
            "set": a.set.info(),
            "settings": {"model_name": cfg.model_name, "set_size": len(a.set.items), "external_size": cfg.external_size,
                         "eval_examples": n, "question_text": a.set.question_text,
                         "references_per_question": round(float(np.mean([len(r) for r in refs])), 2),
                         "reference_choice": "per answer, the reference with the highest ROUGE-L F",
                         "decoding": "greedy", "max_new_tokens": cfg.eval_max_new_tokens,
                         "batch_size": cfg.gen_batch_size, "bootstrap": {**boot, "confidence": 0.95},
                         "base": "same loaded model with the adapter disabled"},
            "generation": metrics.compare_systems(fns["base"], fns["finetuned"], n, **boot),
            "references": {"disclaimer": metrics.bootstrap_ci(metrics.mean_statistic(advice), n, **boot)},
            "leakage": {"kinds": LEAK_KINDS, "found_in_train_val": overlap_with(a.items, train_val),
                        "train_val_pairs": len(train_val),
                        "dropped_by_02": None if dropped is None else {k: dropped[k] for k in (
                            "pairs_dropped", "items_touched", "items")}},
            "statements": _statements_block(cfg, a, judged.get(a.set.name), summary),
            "seconds": a.seconds,
        }
        for i, item in enumerate(a.items):
            row: dict[str, Any] = {"set": a.set.name, "id": item.id, "question": item.question,
                                   "references": item.references}
            for system in SYSTEMS:
                row[system] = a.answers[system][i].text
                row[f"{system}_reference"] = chosen[system][i]
                row[f"{system}_scores"] = {k: float(v[i]) for k, v in per_example[system].items()}
                if a.set.name in judged:
                    row[f"{system}_statements"] = {
                        kind: [{"statement": st, "reply": v.reply, "met": v.met}
                               for st, v in zip(getattr(item, kind), judged[a.set.name][system][kind][i], strict=True)]
                        for kind in KINDS}
            row["fingerprint"] = fp
            rows.append(row)
    return blocks, summary, rows


# --------------------------------------------------------------------------- report
def section_markdown(name: str, block: dict[str, Any]) -> str:
    """The heading and the lines above a set's tables in 04's report: what was asked, how many questions,
    the leakage found and dropped, and the judge."""
    s, info, leak = block["settings"], block["set"], block["leakage"]
    found = leak["found_in_train_val"]
    lines = [f"## External set `{name}`", "",
             f"{s['eval_examples']} of {s['set_size']} questions of `{info['path']}` ({info['format']}), asked with "
             f"the {s['question_text']} text; {s['references_per_question']} reference answers per question "
             f"({s['reference_choice']}); greedy, max_new_tokens={s['max_new_tokens']}.", "",
             f"**Leakage**: {found['any']} of the {s['eval_examples']} scored questions overlap the run's "
             f"{leak['train_val_pairs']} train and validation pairs (" + ", ".join(
                 f"{LEAK_SHORT[k]}: {found[k]}" for k in LEAK_KINDS) + ")."]
    dropped = leak.get("dropped_by_02")
    if dropped:
        lines[-1] += (f" 02 dropped {dropped['pairs_dropped']['any']} MedQuAD pairs that overlapped "
                      f"{dropped['items_touched']['any']} of this file's {dropped['items']} questions.")
    st = block.get("statements")
    if st and st.get("judged"):
        lines += ["", f"**Statements** judged by `{st['judge']['model']}`: {st['judge']['label']}."]
    elif st:
        lines += ["", f"**Statements**: {st['reason']}."]
    return "\n".join(lines)


def statement_table(block: dict[str, Any]) -> pd.DataFrame | None:
    """Share of must-have / nice-to-have statements met, base vs fine-tuned and the paired difference (95%
    intervals), with the questions scored, the judgements not judged and the judge's accuracy beside them."""
    st = block.get("statements")
    if not st or not st.get("judged"):
        return None
    rows = []
    for kind, label in KINDS.items():
        d = st[kind]
        rows.append({"measure": label, "base": results.format_ci(d.get("base"), 100.0),
                     "fine-tuned": results.format_ci(d.get("finetuned"), 100.0),
                     "difference": results.format_ci(d.get("delta"), 100.0),
                     "questions": f"{d['questions']} of {d['questions_with_statements']}",
                     "not judged (base / fine-tuned)": " / ".join(
                         f"{d['not_judged'][s]} of {d['judgements'][s]}" for s in SYSTEMS),
                     "judge": short_label(st["judge"]["reliable"], st["judge_accuracy"])})
    return pd.DataFrame(rows).set_index("measure")


def short_label(reliable: bool, accuracy: float) -> str:
    """The judge's reliability in a table cell (pandas cuts cells at 50 characters; the full label is in the
    section's text): ``UNRELIABLE (accuracy 41%)`` or ``reliable (accuracy 92%)``."""
    return f"{'reliable' if reliable else 'UNRELIABLE'} (accuracy {accuracy:.0%})"


def judge_table(summary: dict[str, Any]) -> pd.DataFrame:
    """The judge's measured accuracy on the labelled set, in one table."""
    acc = summary["accuracy"]
    rows = {"judge": summary["model"], "labelled triples (met / not met)": f"{acc['labelled']} "
            f"({acc['met']} / {acc['not_met']})", "accuracy": f"{acc['accuracy']:.1%}",
            "recall on met": f"{acc['met_recall']:.1%}", "recall on not met": f"{acc['not_met_recall']:.1%}",
            "replies not judged": acc["not_judged"], "said yes / no": f"{acc['said_yes']} / {acc['said_no']}",
            "verdict": short_label(summary["reliable"], acc["accuracy"]),
            "judgements on the sets": summary["judgements"],
            "of them not judged": summary["not_judged"], "judgements/s": summary["judgements_per_second"]}
    return pd.DataFrame({"value": [str(v) for v in rows.values()]}, index=list(rows))
