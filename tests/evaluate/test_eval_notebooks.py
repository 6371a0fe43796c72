"""Stages 04/05: the glue in hb_utils.evaluate.evaluation (fast) and papermill runs of both notebooks on the
smoke run's adapter (slow), with ROUGE-L recomputed independently from predictions.jsonl."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rouge_score import rouge_scorer

from hb_utils import run_dir
from hb_utils.config import load_config
from hb_utils.errors import ConfigError, ModelError
from hb_utils.evaluate import evaluation, qualitative
from hb_utils.model.generation import GenResult
from hb_utils.run_dir import RunPaths, read_json, read_jsonl
from tests.conftest import ROOT
from tests.runs.test_notebooks import error_outputs, run_notebook

SMOKE = ROOT / "params" / "smoke.yaml"


# --------------------------------------------------------------------------- adapter checks, through the glue
def _fake_adapter(cfg, **meta_changes):
    adapter = RunPaths.for_config(cfg).adapter
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    meta = {"model_name": cfg.model_name, "stamp": run_dir.stamp(cfg, "train", "test"), **meta_changes}
    (adapter / "hb_meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("stage", [evaluation.run_evaluation, qualitative.run_qualitative])
def test_missing_adapter_says_to_run_03(tmp_path, stage):
    cfg = load_config(SMOKE, output_root=str(tmp_path))
    with pytest.raises(ModelError, match=r"No trained LoRA adapter.*03_train_qlora.*hb run"):
        stage(cfg)
    assert not (tmp_path / "smoke" / "metrics").exists()


def test_adapter_of_another_model_is_refused(tmp_path):
    cfg = load_config(SMOKE, output_root=str(tmp_path))
    _fake_adapter(cfg, model_name="TinyLlama/TinyLlama-1.1B-Chat-v1.0")
    with pytest.raises(ModelError, match="trained on model_name='TinyLlama"):
        evaluation.run_evaluation(cfg)


def test_adapter_of_another_config_is_refused(tmp_path):
    cfg = load_config(SMOKE, output_root=str(tmp_path))
    _fake_adapter(cfg)
    with pytest.raises(ModelError, match=r"another train config \(lora_r: 8 -> 16\)"):
        evaluation.run_evaluation(cfg.replace(lora_r=cfg.lora_r * 2))


# --------------------------------------------------------------------------- qualitative heuristics
def test_prompts_are_the_six_standard_plus_custom():
    cfg = load_config(SMOKE, prompts=["Is coffee bad for the kidneys?"])
    prompts = qualitative.qualitative_prompts(cfg)
    assert [k for k, _ in prompts] == ["in-domain"] * 4 + ["out-of-domain"] * 2 + ["custom"]
    assert prompts[0][1] == "What are the symptoms of Type 2 diabetes?"
    assert prompts[5][1] == "Help me write a Python function."
    with pytest.raises(ConfigError, match="empty or blank prompt"):
        qualitative.qualitative_prompts(load_config(SMOKE, prompts=["ok?", "  "]))


def test_on_topic_and_declined():
    assert qualitative.on_topic("What are the symptoms of Type 2 diabetes?", "Diabetic patients feel thirsty.")
    assert qualitative.on_topic("Can you explain what a BMI of 28 means?", "A BMI between 25 and 30 is overweight.")
    assert not qualitative.on_topic("How does hypertension affect the heart?", "Paris is the capital of France.")
    assert qualitative.declined("I'm sorry, but I can only help with health-related questions.")
    assert qualitative.declined("As a medical assistant, I cannot write code.")
    assert not qualitative.declined("The capital of France is Paris.")
    assert not qualitative.declined("def f(x):\n    return x")


def test_markdown_table_escapes_cells():
    rows = [{"kind": "out-of-domain", "prompt": "What is the capital of France?", "base": "Paris | France\nyes",
             "finetuned": "", "base_flags": qualitative.answer_flags("x", GenResult("Paris", 2, True)),
             "finetuned_flags": qualitative.answer_flags("x", GenResult("", 0, False))}]
    md = qualitative.qualitative_markdown(rows)
    lines = md.strip().splitlines()
    assert len(lines) == 3 and all(line.count(" | ") == 5 for line in lines if "---" not in line)
    assert "Paris \\| France<br>yes" in md and "*(empty)*" in md and "EMPTY/LOOP" in md
    assert "declined: no" in md
    rates = qualitative.flag_rates(rows)
    assert rates.loc[("out-of-domain", "base"), "stopped"] == 1.0
    assert rates.loc[("out-of-domain", "finetuned"), "empty_or_loop"] == 1.0


# --------------------------------------------------------------------------- on the shared smoke series (slow)
@pytest.mark.slow
def test_04_and_05_ran_and_rouge_matches_an_independent_recomputation(smoke_series):
    cfg, run = smoke_series.cfg, smoke_series.run
    for stage in ("04_evaluate", "05_qualitative"):
        assert not error_outputs(run.reports / f"{stage}.ipynb")
    result = read_json(run.metrics / "eval.json")
    assert result["stamp"]["fingerprints"] == cfg.fingerprints()
    rows = read_jsonl(run.metrics / "predictions.jsonl")
    assert len(rows) == result["settings"]["eval_examples"] == min(cfg.eval_size, result["settings"]["test_size"])
    assert {r["fingerprint"] for r in rows} == {cfg.fingerprint("eval")}
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for system in ("base", "finetuned"):
        expected = np.mean([scorer.score(r["reference"], r[system])["rougeL"].fmeasure for r in rows])
        got = result["generation"]["rougeL"][system]
        assert got["value"] == pytest.approx(expected, abs=1e-9)
        assert got["ci_low"] <= got["value"] <= got["ci_high"]
    assert {"value", "ci_low", "ci_high"} <= set(result["generation"]["bleu"]["finetuned"])
    ppl = result["perplexity"]
    # the adapter was really switched off for the base: same weights otherwise, different answer NLL
    assert ppl["base"]["answer_token_weighted"]["value"] != ppl["finetuned"]["answer_token_weighted"]["value"]
    assert ppl["finetuned"]["original_per_example_full_text"]["label"] == "original (per-example mean, full text)"
    assert run.plot("eval_comparison").stat().st_size > 5000

    qual = read_jsonl(run.metrics / "qualitative.jsonl")
    assert len(qual) == 6 and qual[4]["kind"] == "out-of-domain"
    assert (run.metrics / "qualitative.md").read_text().count("\n|") >= 7
    # seeded sampling: a rerun in this process gives the same texts as the notebook's kernel did
    again = qualitative.run_qualitative(cfg)
    assert [(r["base"], r["finetuned"]) for r in again] == [(r["base"], r["finetuned"]) for r in qual]


@pytest.mark.slow
def test_04_runs_alone_from_notebooks_dir(smoke_series, tmp_path):
    """04 with papermill from notebooks/, on a copy of the smoke run (the shared run stays as it was)."""
    import shutil

    shutil.copytree(smoke_series.root / "outputs", tmp_path / "outputs")
    params = {**smoke_series.params, "output_root": str(tmp_path / "outputs"), "eval_size": 2, "ppl_size": 2}
    proc, nb04 = run_notebook("04_evaluate", tmp_path / "reports", ROOT / "notebooks", params)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not error_outputs(nb04)
    changed = f"eval parameters differ from config.json (eval_size: {smoke_series.cfg.eval_size} -> 2"
    assert changed in nb04.read_text()  # the notebook says what it does with the recorded metrics
    cfg = load_config(SMOKE, **params)
    result = read_json(RunPaths.for_config(cfg).metrics / "eval.json")
    assert result["settings"]["eval_examples"] == 2
    # Other eval parameters than config.json records: the recorded config's metrics are kept aside, not
    # silently replaced, and config.json now says what the metrics are.
    run = RunPaths.for_config(cfg)
    kept = run.metrics / "previous" / smoke_series.cfg.fingerprint("eval")
    assert read_json(kept / "eval.json")["stamp"]["params"]["eval_size"] == smoke_series.cfg.eval_size
    assert (kept / "qualitative.jsonl").is_file() and (kept / "moved.json").is_file()
    conf = read_json(run.config_json)
    assert conf["config"]["eval_size"] == 2 and conf["fingerprints"] == cfg.fingerprints()
    assert conf["stages"]["05_qualitative"]["status"] == "stale"
    assert "eval_size: 8 -> 2" in "; ".join(conf["eval_history"][-1]["changed"])
