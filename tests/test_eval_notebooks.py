"""Stages 04/05: the glue in hb_utils.evaluation (fast) and papermill runs of both notebooks on the
smoke run's adapter (slow), with ROUGE-L recomputed independently from predictions.jsonl."""

from __future__ import annotations

import json

import numpy as np
import pytest
from rouge_score import rouge_scorer

from hb_utils import evaluation
from hb_utils.config import load_config
from hb_utils.errors import ModelError
from hb_utils.generation import GenResult
from hb_utils.paths import RunPaths, read_json, read_jsonl
from tests.conftest import MEDQUAD, ROOT, write_release
from tests.test_notebooks import error_outputs, run_notebook

SMOKE = ROOT / "params" / "smoke.yaml"


# --------------------------------------------------------------------------- adapter checks, through the glue
def _fake_adapter(cfg, **meta_changes):
    adapter = RunPaths.for_config(cfg).adapter
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    meta = {"model_name": cfg.model_name, "train_fingerprint": cfg.fingerprint("train"), **meta_changes}
    (adapter / "hb_meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("stage", [evaluation.run_evaluation, evaluation.run_qualitative])
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
    with pytest.raises(ModelError, match="another config"):
        evaluation.run_evaluation(cfg.replace(lora_r=cfg.lora_r * 2))


# --------------------------------------------------------------------------- qualitative heuristics
def test_prompts_are_the_six_standard_plus_custom():
    cfg = load_config(SMOKE, prompts=["Is coffee bad for the kidneys?"])
    prompts = evaluation.qualitative_prompts(cfg)
    assert [k for k, _ in prompts] == ["in-domain"] * 4 + ["out-of-domain"] * 2 + ["custom"]
    assert prompts[0][1] == "What are the symptoms of Type 2 diabetes?"
    assert prompts[5][1] == "Help me write a Python function."


def test_on_topic_and_declined():
    assert evaluation.on_topic("What are the symptoms of Type 2 diabetes?", "Diabetic patients feel thirsty.")
    assert evaluation.on_topic("Can you explain what a BMI of 28 means?", "A BMI between 25 and 30 is overweight.")
    assert not evaluation.on_topic("How does hypertension affect the heart?", "Paris is the capital of France.")
    assert evaluation.declined("I'm sorry, but I can only help with health-related questions.")
    assert evaluation.declined("As a medical assistant, I cannot write code.")
    assert not evaluation.declined("The capital of France is Paris.")
    assert not evaluation.declined("def f(x):\n    return x")


def test_markdown_table_escapes_cells():
    rows = [{"kind": "out-of-domain", "prompt": "What is the capital of France?", "base": "Paris | France\nyes",
             "finetuned": "", "base_flags": evaluation.answer_flags("x", GenResult("Paris", 2, True)),
             "finetuned_flags": evaluation.answer_flags("x", GenResult("", 0, False))}]
    md = evaluation.qualitative_markdown(rows)
    lines = md.strip().splitlines()
    assert len(lines) == 3 and all(line.count(" | ") == 5 for line in lines if "---" not in line)
    assert "Paris \\| France<br>yes" in md and "*(empty)*" in md and "EMPTY/LOOP" in md
    assert "declined: no" in md
    rates = evaluation.flag_rates(rows)
    assert rates.loc[("out-of-domain", "base"), "stopped"] == 1.0
    assert rates.loc[("out-of-domain", "finetuned"), "empty_or_loop"] == 1.0


# --------------------------------------------------------------------------- papermill runs (slow)
@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The smoke experiment trained once (stage 03 through hb_utils.training) in a temp output root."""
    from hb_utils import training

    root = tmp_path_factory.mktemp("smoke")
    dataset = MEDQUAD if (MEDQUAD / "1_CancerGov_QA").is_dir() else write_release(root / "release")
    # shorter answers than smoke.yaml (eval-only fields: the adapter stays valid) keep the 4-bit CPU run short
    params = {"output_root": str(root / "outputs"), "dataset": str(dataset), "eval_max_new_tokens": 24,
              "qual_max_new_tokens": 24}
    cfg = load_config(SMOKE, **params)
    training.train(cfg)
    return cfg, params, root


@pytest.mark.slow
def test_04_and_05_run_and_rouge_matches_an_independent_recomputation(smoke_run):
    cfg, params, root = smoke_run
    run = RunPaths.for_config(cfg)
    proc, nb04 = run_notebook("04_evaluate", root, ROOT, params)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not error_outputs(nb04)
    proc, nb05 = run_notebook("05_qualitative", root, ROOT / "notebooks", params)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not error_outputs(nb05)

    result = read_json(run.metrics / "eval.json")
    assert result["fingerprints"] == cfg.fingerprints()
    rows = read_jsonl(run.metrics / "predictions.jsonl")
    assert len(rows) == result["settings"]["eval_examples"] == min(cfg.eval_size, result["settings"]["test_size"])
    assert {r["fingerprint"] for r in rows} == {cfg.fingerprint("all")}
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
    again = evaluation.run_qualitative(cfg)
    assert [(r["base"], r["finetuned"]) for r in again] == [(r["base"], r["finetuned"]) for r in qual]
