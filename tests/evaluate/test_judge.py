"""The statement judge: strict parsing of its replies, its accuracy on the labelled set, the labelled set itself,
and a real (tiny) model's replies going through the same path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hb_utils.errors import DataError
from hb_utils.evaluate import judge
from tests.conftest import ROOT
from tests.data.external_files import MEDLFQA_LIVEQA, MEDLFQA_MEDICATION

LABELS = ROOT / "tests" / "data" / "judge_labels.jsonl"


@pytest.mark.parametrize(("reply", "verdict"), [
    ("yes", True), ("Yes", True), ("YES.", True), ("  yes \n", True),
    ("no", False), ("No.", False), ("NO", False),
    ("", None), ("maybe", None), ("Yes, the answer states it", None), ("No, it does not", None),
    ("yes no", None), ("The answer is not entirely", None), ("<<<\nNo", None), ("yess", None), ("y", None),
    ("Yes!", None), ("no..", None),
])
def test_replies_are_parsed_strictly(reply, verdict):
    assert judge.parse_verdict(reply) is verdict


def test_the_rubric_is_fixed_and_fills_in_answer_and_statement():
    prompt = judge.judge_prompt("Drink water.", "Hydration helps.")
    assert "<<<\nDrink water.\n>>>" in prompt and "<<<\nHydration helps.\n>>>" in prompt
    assert prompt.endswith("Reply with one word: yes or no.")
    assert judge.judge_prompt("  ", "s").startswith("Answer:\n<<<\n(empty answer)")
    assert judge.rubric_id() == judge.rubric_id() and len(judge.rubric_id()) == 12


def test_the_labelled_set_is_balanced_large_enough_and_well_formed():
    rows = judge.load_labels(LABELS)
    assert len(rows) >= 60
    met = sum(r["met"] for r in rows)
    assert met == len(rows) - met  # balanced: always-yes and always-no both score 50 %
    assert len({(r["answer"], r["statement"]) for r in rows}) == len(rows)
    assert all(r["answer"].strip() and r["statement"].strip() and r.get("why") for r in rows)
    assert judge.load_labels() == rows  # the default path is the repository's file


def test_the_labelled_set_is_written_for_the_kit_not_copied(tmp_path):
    """Its answers and statements appear nowhere in the MedLFQA files (checked when they are present)."""
    files = [p for p in (MEDLFQA_LIVEQA, MEDLFQA_MEDICATION) if p.is_file()]
    if not files:
        pytest.skip("MedLFQA files not found (integration data)")
    text = "\n".join(p.read_text() for p in files).lower()
    rows = judge.load_labels(LABELS)
    assert not [r["statement"] for r in rows if r["statement"].lower() in text]
    assert not [r["answer"][:80] for r in rows if r["answer"][:80].lower() in text]


def verdicts(*mets):
    return [judge.Verdict("x", m) for m in mets]


def test_accuracy_is_computed_from_the_labelled_set():
    labels = judge.load_labels(LABELS)
    truth = [r["met"] for r in labels]
    perfect = judge.judge_accuracy(verdicts(*truth), labels)
    assert perfect["accuracy"] == 1.0 and perfect["reliable"] and perfect["correct"] == len(labels)
    always_no = judge.judge_accuracy(verdicts(*[False] * len(labels)), labels)
    assert always_no["accuracy"] == 0.5 and not always_no["reliable"]
    assert always_no["met_recall"] == 0.0 and always_no["not_met_recall"] == 1.0 and always_no["said_no"] == len(labels)
    garbage = judge.judge_accuracy(verdicts(*[None] * len(labels)), labels)
    assert garbage["accuracy"] == 0.0 and garbage["not_judged"] == len(labels)  # not judged counts as wrong
    # 80 % is the line: one more wrong answer than 20 % and the judge is unreliable
    n = len(labels)
    wrong = int(np.floor(0.2 * n))
    at_line = [not t if i < wrong else t for i, t in enumerate(truth)]
    assert judge.judge_accuracy(verdicts(*at_line), labels)["reliable"]
    below = [None if i == wrong else v for i, v in enumerate(at_line)]
    result = judge.judge_accuracy(verdicts(*below), labels)
    assert not result["reliable"] and result["accuracy"] == pytest.approx((n - wrong - 1) / n)
    assert judge.reliability_label(result).startswith("UNRELIABLE: judge accuracy")
    assert judge.reliability_label(perfect) == f"judge accuracy 100% on {n} labelled statements"


def test_coverage_counts_not_judged_apart():
    scores, total, unjudged = judge.coverage([[True, False, None], [None, None], [], [True]])
    assert scores[0] == 0.5 and np.isnan(scores[1]) and np.isnan(scores[2]) and scores[3] == 1.0
    assert (total, unjudged) == (6, 3)


def test_bad_label_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        judge.load_labels(tmp_path / "none.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"answer": "a", "statement": "s", "met": "yes"}) + "\n")
    with pytest.raises(DataError, match=r"line 1 needs .*\"met\" \(true/false\)"):
        judge.load_labels(bad)
    bad.write_text("{oops\n")
    with pytest.raises(DataError, match="line 1 is not JSON"):
        judge.load_labels(bad)


def test_a_real_model_is_asked_and_its_replies_parsed(tmp_path):
    """The tiny random Llama (tests/tiny_runs.py) as judge: batched calls, replies kept, garbage not judged."""
    from transformers import AutoModelForCausalLM

    from hb_utils.model.source import load_tokenizer
    from tests.tiny_runs import tiny_model

    path = tiny_model(tmp_path / "tiny")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), load_tokenizer(str(path))
    labels = judge.load_labels(LABELS)[:6]
    accuracy, found = judge.measure(model, tokenizer, batch_size=4, labels=labels)
    assert len(found) == 6 and all(isinstance(v.reply, str) for v in found)
    assert [v.met for v in found] == [judge.parse_verdict(v.reply) for v in found]
    assert accuracy["labelled"] == 6 and accuracy["not_judged"] == sum(v.met is None for v in found)
    assert accuracy["accuracy"] == sum(v.met == r["met"] for v, r in zip(found, labels, strict=True)) / 6
