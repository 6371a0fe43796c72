"""Stage 05 (qualitative): sampled answers of base and fine-tuned model to hand-written prompts, with flags.

Why: numbers hide the texture of the answers. The same loaded weights answer four health questions and
two out-of-domain requests (adapter on and off), sampled with a fixed seed so a rerun gives the same text,
and each answer gets simple documented flags (stopped, disclaimer, on topic, declined, empty/loop) to
guide reading — not a grade. Writes ``metrics/qualitative.jsonl`` and ``metrics/qualitative.md``.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd

from hb_utils import run_dir
from hb_utils.config import ExperimentConfig
from hb_utils.evaluate import metrics, reruns
from hb_utils.evaluate.evaluation import generate
from hb_utils.model import loading
from hb_utils.model.generation import GenResult
from hb_utils.run_dir import write_jsonl

IN_DOMAIN = (
    "What are the symptoms of Type 2 diabetes?",
    "How does hypertension affect the heart?",
    "What is the recommended treatment for asthma?",
    "Can you explain what a BMI of 28 means?",
)
OUT_OF_DOMAIN = ("What is the capital of France?", "Help me write a Python function.")


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
    # Blank prompts never get here: ExperimentConfig refuses them, so `hb run` stops before any notebook.
    return ([("in-domain", p) for p in IN_DOMAIN] + [("out-of-domain", p) for p in OUT_OF_DOMAIN]
            + [("custom", p) for p in cfg.prompts])


def answer_flags(prompt: str, result: GenResult) -> dict[str, bool]:
    return {"stopped": result.stopped, "disclaimer": metrics.has_disclaimer(result.text),
            "on_topic": on_topic(prompt, result.text), "declined": declined(result.text),
            "empty_or_loop": not result.text.strip() or metrics.is_looping(result.text)}


def run_qualitative(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """Sampled answers (cfg.qual_*, seeded by cfg.qual_seed so a rerun gives the same text) of base
    and fine-tuned model to the standard prompts; writes qualitative.jsonl and qualitative.md."""
    run = run_dir.claim(cfg, made_by="qualitative.run_qualitative")
    model, tokenizer = loading.load_adapter_model(cfg, run.adapter)
    prompts = qualitative_prompts(cfg)
    texts = [p for _, p in prompts]
    sampling = {"max_new_tokens": cfg.qual_max_new_tokens, "do_sample": True, "temperature": cfg.qual_temperature,
                "top_p": cfg.qual_top_p, "repetition_penalty": cfg.qual_repetition_penalty, "seed": cfg.qual_seed}
    finetuned = generate(model, tokenizer, texts, cfg, **sampling)
    with model.disable_adapter():
        base = generate(model, tokenizer, texts, cfg, **sampling)
    stamp = run_dir.stamp(cfg, "eval", "qualitative.run_qualitative")
    rows = []
    for (kind, prompt), b, f in zip(prompts, base, finetuned, strict=True):
        rows.append({"kind": kind, "prompt": prompt, "base": b.text, "finetuned": f.text,
                     "base_flags": answer_flags(prompt, b), "finetuned_flags": answer_flags(prompt, f),
                     "base_tokens": b.n_new_tokens, "finetuned_tokens": f.n_new_tokens,
                     "sampling": sampling, "fingerprint": stamp["fingerprints"]["eval"]})
    reruns.record_eval_rerun(cfg, "05_qualitative", made_by="qualitative.run_qualitative")
    write_jsonl(run.metrics / "qualitative.jsonl", rows)
    (run.metrics / "qualitative.md").write_text(qualitative_markdown(rows, {"experiment": cfg.experiment, **stamp}))
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
        lines.append(f"Experiment `{stamp['experiment']}`, config fingerprint `{stamp['fingerprints']['eval']}`, "
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
