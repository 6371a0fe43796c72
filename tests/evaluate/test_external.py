"""Stage 04 on external sets: each set's block shaped like the test split's, best-matching references, the
leakage 02 dropped and 04 finds, and judged statements with the judge's accuracy beside them (on the tiny
random Llama of tests/tiny_runs.py: seconds, no training)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from rouge_score import rouge_scorer

from hb_utils import run_dir
from hb_utils.config import load_config
from hb_utils.data.external import ExternalItem, ExternalSet
from hb_utils.evaluate import evaluation, judge, metrics
from hb_utils.evaluate import external as ext
from hb_utils.model.generation import GenResult
from hb_utils.run_dir import RunPaths, read_json, read_jsonl
from tests.conftest import ROOT
from tests.data.external_files import medlfqa_row, write_liveqa, write_medlfqa


def test_each_answer_is_scored_against_its_best_matching_reference():
    refs = [["Drink fluids and rest in bed.", "Zorbitis is treated with antibiotics for ten days."],
            ["Only one reference here."]]
    assert ext.best_references(["Antibiotics for ten days treat zorbitis.", "anything"], refs) == [1, 0]
    assert ext.best_references(["no overlap at all", "x"], refs) == [0, 0]  # ties: the first


def _answered(texts_base, texts_ft, items):
    s = ExternalSet("medlfqa_x", "x.jsonl", "medlfqa_jsonl", "question", items, 0, "medlfqa_x")
    return ext.SetAnswers(s, items, {"base": [GenResult(t, 5, True) for t in texts_base],
                                     "finetuned": [GenResult(t, 5, True) for t in texts_ft]},
                          {"base": 0.1, "finetuned": 0.1})


def test_statement_scores_are_shares_of_judged_statements_paired_over_questions():
    items = [ExternalItem(f"q{i}", f"question {i}?", [f"reference {i}"], must_have=["m1", "m2"], nice_to_have=["n1"])
             for i in range(4)]
    a = _answered(["b"] * 4, ["f"] * 4, items)
    V = judge.Verdict
    judged = {"base": {"must_have": [[V("no", False), V("no", False)], [V("yes", True), V("no", False)],
                                     [V("?", None), V("?", None)], [V("yes", True), V("?", None)]],
                       "nice_to_have": [[V("no", False)]] * 4},
              "finetuned": {"must_have": [[V("yes", True), V("yes", True)], [V("yes", True), V("no", False)],
                                          [V("yes", True), V("yes", True)], [V("yes", True), V("yes", True)]],
                            "nice_to_have": [[V("yes", True)]] * 4}}
    summary = {"model": "m", "rubric": "r", "reliable": False, "label": "UNRELIABLE: …", "accuracy": {"accuracy": 0.5}}
    cfg = load_config(bootstrap_samples=50)
    block = ext._statements_block(cfg, a, judged, summary)
    must = block["must_have"]
    # question 2 has no judged base statement: left out of the paired comparison, counted
    assert must["questions"] == 3 and must["questions_with_statements"] == 4
    assert must["base"]["value"] == pytest.approx(np.mean([0.0, 0.5, 1.0]))
    assert must["finetuned"]["value"] == pytest.approx(np.mean([1.0, 0.5, 1.0]))
    assert must["delta"]["delta"] == pytest.approx(1 / 3)
    assert must["not_judged"] == {"base": 3, "finetuned": 0} and must["judgements"] == {"base": 8, "finetuned": 8}
    assert block["nice_to_have"]["delta"]["delta"] == 1.0
    assert block["judge_accuracy"] == 0.5 and block["judge"]["label"].startswith("UNRELIABLE")
    table = ext.statement_table({"statements": block})
    assert list(table.index) == list(ext.KINDS.values()) and (table["judge"] == "UNRELIABLE (accuracy 50%)").all()
    assert table.loc[ext.KINDS["must_have"], "questions"] == "3 of 4"
    assert ext._statements_block(cfg, a, None, None) == {"judged": False,
                                                         "reason": "judge_model is empty: statements were not graded"}


def test_04_reports_a_leak_left_in_the_training_pairs():
    """A run whose 02 was not given the set: 04 finds the training pair equal to an external question/answer."""
    items = [ExternalItem("q0", "What is zorbitis ?", ["Zorbitis is a made-up rash of the elbows and knees."]),
             ExternalItem("q1", "Is quellax safe?", ["Ask a doctor before taking quellax."])]
    train_val = [{"question": "what is zorbitis?", "answer": "An unrelated answer about something else."},
                 {"question": "Another question?", "answer": "Ask a doctor before taking quellax."},
                 {"question": "A third question?", "answer": "A third answer, unrelated."}]
    a = _answered(["Zorbitis is a rash.", "Ask a doctor."], ["A rash of the elbows.", "No."], items)
    blocks, summary, rows = ext.score_sets(load_config(bootstrap_samples=20, judge_model=""), [a], train_val, None)
    leak = blocks["medlfqa_x"]["leakage"]
    assert leak["found_in_train_val"]["same_question"] == 1 and leak["found_in_train_val"]["same_answer"] == 1
    assert leak["found_in_train_val"]["any"] == 2 and leak["train_val_pairs"] == 3 and leak["dropped_by_02"] is None
    assert summary is None and [r["id"] for r in rows] == ["q0", "q1"]
    md = ext.section_markdown("medlfqa_x", blocks["medlfqa_x"])
    assert "**Leakage**: 2 of the 2 scored questions overlap the run's 3 train and validation pairs" in md
    assert "02 dropped" not in md


@pytest.fixture(scope="module")
def external_run(tmp_path_factory):
    """A tiny run whose 02 was given a LiveQA file and a MedLFQA file holding a copy of a training pair, with the
    tiny model as judge, evaluated by 04 (once for this module's tests)."""
    from tests.conftest import write_release

    tmp_path = tmp_path_factory.mktemp("external_run")
    from tests.tiny_runs import make_tiny_run

    release = write_release(tmp_path / "release")
    from hb_utils.data import medquad

    df, _ = medquad.load_raw(str(release))
    pair = df[df["answer"] != ""].iloc[0]
    planted = write_medlfqa(tmp_path / "ext" / "planted_test_MedLFQA.jsonl", [
        medlfqa_row(pair["question"], medquad.clean_text(pair["answer"]), ["It is word zero.", "Tail."], ["Bold."]),
        medlfqa_row("Is quellax safe in pregnancy?", "Ask a doctor before taking quellax.", ["See a doctor."], []),
        medlfqa_row("What is a third question?", "A third answer.", ["Third."], [])])
    liveqa = write_liveqa(tmp_path / "ext" / "liveqa.xml")
    with pytest.warns(UserWarning, match="sample_size"):
        cfg = make_tiny_run(tmp_path, external_eval=[str(liveqa), str(planted)], external_size=2,
                            judge_model=str(tmp_path / "tiny-llama"), judge_batch_size=8, bootstrap_samples=50)
    return cfg, pair, evaluation.run_evaluation(cfg)


@pytest.mark.slow  # the tiny run of external_run: about a minute on 2 cores, built once
def test_04_gives_each_external_set_a_block_shaped_like_the_test_split(external_run):
    cfg, pair, result = external_run
    assert list(result["external"]) == ["liveqa_summary", "liveqa_message", "medlfqa_planted"]
    on_disk = read_json(RunPaths.for_config(cfg).metrics / "eval.json")
    assert on_disk["external"] == result["external"] and on_disk["judge"] == result["judge"]
    for name, block in result["external"].items():
        assert set(block["generation"]) == set(result["generation"]), name
        for metric, m in block["generation"].items():
            assert set(m) == set(result["generation"][metric]) == {"base", "finetuned", "delta"}
            assert set(m["delta"]) == set(result["generation"][metric]["delta"])
        assert set(block["references"]) == set(result["references"])
        assert block["settings"]["eval_examples"] == 2 and set(block["seconds"]) == {"base", "finetuned"}
        table = evaluation.comparison_table(block)  # the test split's table renders a set's block unchanged
        assert list(table.index) == list(evaluation.comparison_table(result).index)
    assert result["external"]["liveqa_summary"]["settings"]["question_text"] == "summary"
    assert result["external"]["liveqa_message"]["settings"]["references_per_question"] == 1.5


@pytest.mark.slow
def test_04_scores_best_references_and_writes_every_answer(external_run):
    cfg, pair, result = external_run
    rows = read_jsonl(RunPaths.for_config(cfg).metrics / "external_predictions.jsonl")
    assert [r["set"] for r in rows] == ["liveqa_summary"] * 2 + ["liveqa_message"] * 2 + ["medlfqa_planted"] * 2
    assert {r["fingerprint"] for r in rows} == {cfg.fingerprint("eval")}
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for name in ("liveqa_summary", "medlfqa_planted"):
        mine = [r for r in rows if r["set"] == name]
        for system in ("base", "finetuned"):
            own = [max(scorer.score(metrics.sentences_per_line(ref), metrics.sentences_per_line(r[system]))["rougeL"]
                       .fmeasure for ref in r["references"]) for r in mine]
            assert [r[f"{system}_scores"]["rougeL"] for r in mine] == pytest.approx(own, abs=1e-12)
            assert result["external"][name]["generation"]["rougeL"][system]["value"] == pytest.approx(np.mean(own))


@pytest.mark.slow
def test_04_reports_the_leak_02_dropped_and_finds_none_left(external_run):
    cfg, pair, result = external_run
    planted = result["external"]["medlfqa_planted"]["leakage"]
    assert planted["dropped_by_02"]["pairs_dropped"]["any"] == 1 and planted["dropped_by_02"]["items"] == 3
    assert planted["found_in_train_val"]["any"] == 0 and planted["train_val_pairs"] > 0
    stats = read_json(RunPaths.for_config(cfg).data_stats)
    assert stats["external"]["by_file"]["medlfqa_planted"]["pairs_dropped"]["same_answer"] == 1
    assert all(pair["question"] != r["question"] for s in run_dir.SPLITS
               for r in read_jsonl(RunPaths.for_config(cfg).split(s)))
    md = ext.section_markdown("medlfqa_planted", result["external"]["medlfqa_planted"])
    assert md.startswith("## External set `medlfqa_planted`")
    assert "**Leakage**: 0 of the 2 scored questions" in md and "02 dropped 1 MedQuAD pairs" in md


@pytest.mark.slow
def test_04_judges_statements_and_shows_the_judges_accuracy_beside_them(external_run):
    cfg, pair, result = external_run
    summary = result["judge"]
    acc = summary["accuracy"]
    assert acc["labelled"] == len(judge.load_labels()) >= 60
    assert summary["judgements"] == 2 * (2 + 1 + 1)  # 2 systems x (must + nice) statements of the first 2 questions
    assert summary["labels_sha256"] == judge.labels_digest() and summary["rubric"] == judge.rubric_id()
    block = result["external"]["medlfqa_planted"]["statements"]
    assert block["judged"] and block["judge_accuracy"] == acc["accuracy"]
    assert block["judge"]["reliable"] is (acc["accuracy"] >= 0.8)
    assert block["must_have"]["judgements"] == {"base": 3, "finetuned": 3}
    assert result["external"]["liveqa_summary"]["statements"] is None  # LiveQA has no statements
    rows = [r for r in read_jsonl(RunPaths.for_config(cfg).metrics / "external_predictions.jsonl")
            if r["set"] == "medlfqa_planted"]
    replies = [s for r in rows for sys in ("base", "finetuned") for s in r[f"{sys}_statements"]["must_have"]]
    assert [s["met"] for s in replies] == [judge.parse_verdict(s["reply"]) for s in replies]
    assert sum(s["met"] is None for s in replies) == block["must_have"]["not_judged"]["base"] + \
        block["must_have"]["not_judged"]["finetuned"]
    assert isinstance(ext.judge_table(summary), pd.DataFrame)


def test_a_missing_external_file_fails_before_any_model_loads(tmp_path):
    cfg = load_config(ROOT / "params" / "smoke.yaml", output_root=str(tmp_path), external_eval=[str(tmp_path / "x")])
    from hb_utils.errors import DataError

    with pytest.raises(DataError, match="does not exist"):
        evaluation.run_evaluation(cfg)


@pytest.mark.slow
def test_bench_eval_times_the_external_sets_and_the_judge(monkeypatch, external_run, capsys):
    """``bench_eval.py --parts ext`` on the tiny run's sets and judge: answers/s per set and judgements/s."""
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as when it runs as a script: imports bench_machine
    spec = importlib.util.spec_from_file_location("bench_eval", ROOT / "benchmarks" / "bench_eval.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--parts", "ext", "--ext-n", "2"])
    assert args.parts == {"ext"} and args.ext_n == 2 and args.ext_params.endswith("smoke_external.yaml")
    cfg, _, _ = external_run
    bench.bench_external(cfg, 1, 1)
    out = capsys.readouterr().out
    assert out.count("answers/s") == 4  # three sets and the total
    assert f"labelled set: {len(judge.load_labels())} judgements" in out and "judgements/s" in out
    assert "statements of the answers above" in out
