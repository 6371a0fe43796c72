"""Finished run directories without a model: the metrics files 03/04 write (train.json, eval.json,
predictions.jsonl, log_history.json), in their real shapes, for synthetic answers of a chosen quality.

The scores are computed by the kit's own metric code from the synthetic texts, so a comparison test reads numbers
that mean what real ones mean. Questions depend only on the data parameters: two configs with one data
fingerprint answer the same test questions (pairable), others do not. Used by the compare tests and by the
fixture notebooks of the sweep tests (imported inside their kernels)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hb_utils import run_dir
from hb_utils.config import ExperimentConfig, load_config
from hb_utils.evaluate import metrics

WORDS = ("fever", "rash", "dose", "joint", "nerve", "blood", "sleep", "liver", "cough", "gene", "skin", "bone")


def questions(cfg: ExperimentConfig, n: int) -> tuple[list[str], list[str]]:
    """n test questions and their reference answers, fixed by the data parameters."""
    rng = np.random.default_rng([cfg.sample_size, cfg.sample_seed, cfg.split_seed])
    qs, refs = [], []
    for k in range(n):
        words = rng.choice(WORDS, size=14)
        qs.append(f"What is condition {k} of sample {cfg.sample_size}?")
        refs.append(f"Condition {k} causes " + " ".join(words) + ". Talk to your doctor about it.")
    return qs, refs


def answer(reference: str, keep: float, rng: np.random.Generator) -> str:
    """A fine-tuned answer that repeats about ``keep`` of the reference's words, padded with other words."""
    words = reference.split()
    kept = [w for w in words if rng.random() < keep]
    return " ".join(kept + ["maybe"] * (len(words) - len(kept)))


def write_metrics(cfg: ExperimentConfig, quality: float, n: int = 12, seed: int = 0) -> Path:
    """metrics/{train,eval}.json, predictions.jsonl and log_history.json of ``cfg``'s run directory, stamped with
    ``cfg``; ``quality`` (0-1) is the share of reference words the fine-tuned answers keep."""
    run = run_dir.RunPaths.for_config(cfg)
    qs, refs = questions(cfg, n)
    rng = np.random.default_rng([seed, int(quality * 1000), cfg.lora_r])
    tuned = [answer(r, quality, rng) for r in refs]
    base = [answer(r, 0.2, rng) for r in refs]
    fns, per = {}, {}
    for system, texts in (("base", base), ("finetuned", tuned)):
        fns[system], per[system] = metrics.generation_statistics(texts, refs, [len(t.split()) for t in texts],
                                                                 [True] * n)
    boot = {"samples": cfg.bootstrap_samples, "seed": cfg.seed}
    ppl = {"value": 12.0 - quality, "ci_low": 11.0 - quality, "ci_high": 13.0 - quality}
    evaluation = {"stamp": run_dir.stamp(cfg, "eval", "synthetic"), "experiment": cfg.experiment,
                  "settings": {"eval_examples": n, "test_size": n, "eval_size": n},
                  "generation": metrics.compare_systems(fns["base"], fns["finetuned"], n, **boot),
                  "perplexity": {s: {"answer_token_weighted": ppl} for s in ("base", "finetuned")}}
    rows = [{"id": f"q{k}", "question": qs[k], "reference": refs[k], "base": base[k], "finetuned": tuned[k],
             "base_scores": {m: float(v[k]) for m, v in per["base"].items()},
             "finetuned_scores": {m: float(v[k]) for m, v in per["finetuned"].items()},
             "fingerprint": cfg.fingerprint("eval")} for k in range(n)]
    loss = 2.0 - quality
    train = {"stamp": run_dir.stamp(cfg, "train", "synthetic"), "final_train_loss": loss + 0.1,
             "best_val_loss": loss, "final_val_loss": loss + 0.01, "train_runtime_s": 1.0, "tokens_per_second": 100.0,
             "peak_memory": {"gb": 0.5}, "global_step": 2}
    run_dir.write_json(run.metrics / "train.json", train)
    run_dir.write_json(run.metrics / "eval.json", evaluation)
    run_dir.write_jsonl(run.metrics / "predictions.jsonl", rows)
    run_dir.write_json(run.metrics / "log_history.json", [{"step": 1, "loss": loss + 0.3}, {"step": 2, "loss": loss},
                                                         {"step": 2, "eval_loss": loss}])
    return run.root


def make_run(output_root: Path, name: str, quality: float, n: int = 12, **params: object) -> Path:
    """A finished run directory ``output_root/name`` (config.json as `hb run` writes it, plus the metrics).
    Each run's own intervals use 100 resamples unless ``bootstrap_samples`` is given (the default 1000 cost
    seconds per run and no test reads them closely)."""
    params.setdefault("bootstrap_samples", 100)
    cfg = load_config(experiment=name, output_root=str(output_root), **params)
    root = run_dir.claim(cfg, made_by="test").root
    (root / "config.json").write_text(json.dumps({"experiment": name, "config": cfg.to_dict(),
                                                  "fingerprints": cfg.fingerprints(), "stages": {}}))
    write_metrics(cfg, quality, n)
    return root
