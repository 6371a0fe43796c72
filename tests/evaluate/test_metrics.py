"""Metrics on fixed strings with known values, the bootstrap and behaviour flags."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hb_utils.errors import DataError
from hb_utils.evaluate import metrics as M

# rouge-score README example: score(target, prediction)
TARGET = "The quick brown fox jumps over the lazy dog"
PRED = "The quick brown dog jumps on the log."


def test_rouge_known_values():
    r = M.rouge_per_example([PRED], [TARGET])
    # unigrams: 6 of 8 predicted, 6 of 9 reference -> F = 2*(6/8)*(6/9)/(6/8+6/9)
    assert r["rouge1"][0] == pytest.approx(2 * 0.75 * (6 / 9) / (0.75 + 6 / 9))
    assert r["rouge1"][0] == pytest.approx(0.70588, abs=1e-5)
    # bigrams: "the quick", "quick brown" -> P 2/7, R 2/8 -> F 4/15
    assert r["rouge2"][0] == pytest.approx(4 / 15)
    # LCS "the quick brown jumps the" = 5 -> P 5/8, R 5/9
    assert r["rougeL"][0] == pytest.approx(2 * (5 / 8) * (5 / 9) / (5 / 8 + 5 / 9))
    assert r["rougeL"][0] == pytest.approx(0.58824, abs=1e-5)


def test_rouge_identical_and_disjoint():
    r = M.rouge_per_example(["Insulin lowers blood sugar.", "alpha beta"],
                            ["Insulin lowers blood sugar.", "gamma delta"])
    for k in M.ROUGE_TYPES:
        assert r[k][0] == pytest.approx(1.0)
        assert r[k][1] == 0.0


def test_rouge_stemming():
    r = M.rouge_per_example(["running dogs"], ["run dog"])
    assert r["rouge1"][0] == pytest.approx(1.0)


def test_rouge_lsum_uses_sentences():
    ref, pred = "A b c. D e f.", "D e f. A b c."
    assert M.sentences_per_line(ref) == "A b c.\nD e f."
    r = M.rouge_per_example([pred], [ref])
    assert r["rougeL"][0] == pytest.approx(0.5)  # LCS over the whole text: 3 of 6 tokens
    assert r["rougeLsum"][0] == pytest.approx(1.0)  # union LCS sentence by sentence


def test_bleu_hand_computed():
    # 1-4 gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths -> BP = 1
    bleu = M.corpus_bleu(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert bleu == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-6)
    assert M.corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert M.corpus_bleu(["alpha beta gamma delta"], ["one two three four"]) == 0.0


def test_bleu_statistics_match_corpus_bleu_on_resamples():
    preds = ["the cat sat on the mat", "a dog barked loudly at night", "blood pressure is high", "take insulin daily"]
    refs = ["the cat sat on a mat", "the dog barked at night", "high blood pressure", "insulin is taken every day"]
    stats = M.bleu_statistics(preds, refs)
    assert M.bleu_from_statistics(stats) == pytest.approx(M.corpus_bleu(preds, refs))
    for idx in M.bootstrap_indices(4, 5, seed=1):
        expected = M.corpus_bleu([preds[i] for i in idx], [refs[i] for i in idx])
        assert M.bleu_from_statistics(stats[idx]) == pytest.approx(expected)


def test_bootstrap_is_seeded_and_brackets_value():
    values = np.linspace(0, 1, 50)
    stat = M.mean_statistic(values)
    a = M.bootstrap_ci(stat, 50, samples=300, seed=7)
    assert a == M.bootstrap_ci(stat, 50, samples=300, seed=7)
    assert a != M.bootstrap_ci(stat, 50, samples=300, seed=8)
    assert a["value"] == pytest.approx(0.5)
    assert a["ci_low"] < 0.5 < a["ci_high"]
    assert a["ci_high"] - a["ci_low"] < 0.4


def test_paired_bootstrap_uses_the_same_indices():
    rng = np.random.default_rng(0)
    base = rng.random(40)
    new = base + 0.1  # every example exactly 0.1 better: a paired resample sees exactly +0.1
    d = M.paired_bootstrap(M.mean_statistic(base), M.mean_statistic(new), 40, samples=200, seed=3)
    assert d["delta"] == pytest.approx(0.1)
    assert d["ci_low"] == pytest.approx(0.1) and d["ci_high"] == pytest.approx(0.1)
    assert d["p_not_better"] == 0.0
    same = M.paired_bootstrap(M.mean_statistic(base), M.mean_statistic(base), 40, samples=50, seed=3)
    assert same["delta"] == 0 and same["ci_low"] == 0 and same["ci_high"] == 0


def test_compare_systems_covers_every_metric():
    refs = ["insulin lowers blood sugar", "asthma narrows the airways", "see your doctor"]
    base, _ = M.generation_statistics(["sugar", "", "no"], refs, [1, 0, 1], [True, False, True])
    new, per = M.generation_statistics(refs, refs, [4, 4, 3], [True, True, True])
    out = M.compare_systems(base, new, 3, samples=50, seed=0)
    assert set(out) == {*M.ROUGE_TYPES, "bleu", "stopped", "words", "tokens", "disclaimer", "empty_or_loop"}
    assert out["rougeL"]["finetuned"]["value"] == pytest.approx(1.0)
    assert out["bleu"]["finetuned"]["value"] == pytest.approx(100.0)
    assert out["stopped"]["base"]["value"] == pytest.approx(2 / 3)
    assert out["empty_or_loop"]["base"]["value"] == pytest.approx(1 / 3)
    assert per["disclaimer"].tolist() == [0, 0, 1]
    assert out["rougeL"]["delta"]["delta"] > 0
    assert out["rougeL"]["delta"]["p_not_better"] == 0.0  # higher is better: never worse
    # lower is better for loops: not better only in resamples that miss the base's one empty answer (~(2/3)^3)
    assert 0.1 < out["empty_or_loop"]["delta"]["p_not_better"] < 0.5
    assert "p_not_better" not in out["words"]["delta"]  # length has no better direction


ADVICE_FILE = Path(__file__).parents[1] / "data" / "advice_sentences.txt"
ADVICE = M.read_labelled_advice(ADVICE_FILE)
# Sentences of the list the patterns get wrong, kept in the list so that the measured precision and recall count
# them: coordinated descriptions ("... grow normally and see a specialist"), a quantified subject ("Few people ...
# need to see"), and advice whose professional is only named earlier ("book an appointment there").
KNOWN_FALSE_POSITIVES = {
    "Most children with the condition grow normally and see a specialist once a year.",
    "Few people with mild asthma need to see a lung specialist.",
}
KNOWN_FALSE_NEGATIVES = {
    "If you are unsure which test you need, your GP can refer you, so start by booking an appointment there.",
}
# Floors under the patterns' measured precision (0.980) and recall (0.990) on the list.
PRECISION_FLOOR = RECALL_FLOOR = 0.95


def test_the_labelled_advice_list_is_big_and_balanced():
    advice = sum(label for _, label in ADVICE)
    assert len(ADVICE) >= 60
    assert abs(advice - (len(ADVICE) - advice)) <= 0.05 * len(ADVICE)  # as many advice sentences as others
    assert len({s for s, _ in ADVICE}) == len(ADVICE)
    assert KNOWN_FALSE_POSITIVES | KNOWN_FALSE_NEGATIVES <= {s for s, _ in ADVICE}


def _advice_case(text, advice):
    if text in KNOWN_FALSE_POSITIVES | KNOWN_FALSE_NEGATIVES:
        return pytest.param(text, advice, marks=pytest.mark.xfail(strict=True, reason="a known miss of the patterns"))
    return pytest.param(text, advice)


@pytest.mark.parametrize(("text", "advice"), [_advice_case(*row) for row in ADVICE], ids=[s[:40] for s, _ in ADVICE])
def test_advice_not_mentions(text, advice):
    assert M.advises_professional(text) is advice
    assert M.has_disclaimer(text) is advice  # the evaluation's per-example flag is the same thing
    assert M.advises_professional(f"Fever is common. {text} It passes.") is advice  # inside a longer answer


def test_advice_patterns_precision_and_recall_on_the_labelled_list():
    scores = M.advice_pattern_scores(ADVICE_FILE)
    assert scores["n"] == len(ADVICE) == scores["tp"] + scores["fp"] + scores["fn"] + scores["tn"]
    assert scores["precision"] >= PRECISION_FLOOR, scores["false_positives"]
    assert scores["recall"] >= RECALL_FLOOR, scores["false_negatives"]
    assert set(scores["false_positives"]) == KNOWN_FALSE_POSITIVES
    assert set(scores["false_negatives"]) == KNOWN_FALSE_NEGATIVES


def test_advice_pattern_scores_counts(tmp_path):
    path = tmp_path / "labelled.txt"
    path.write_text("# a comment\n1\tSee a doctor.\n1\tAsk a nurse.\n1\tCall a GP.\n\n0\tRest.\n0\tDrink water.\n")
    says_advice = {"See a doctor.", "Ask a nurse.", "Rest."}.__contains__  # one miss, one false alarm
    scores = M.advice_pattern_scores(path, says_advice)
    assert (scores["n"], scores["advice"], scores["not_advice"]) == (5, 3, 2)
    assert (scores["tp"], scores["fp"], scores["fn"], scores["tn"]) == (2, 1, 1, 1)
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["false_positives"] == ["Rest."] and scores["false_negatives"] == ["Call a GP."]


@pytest.mark.parametrize("line", ["2\tSee a doctor.", "See a doctor.", "1\t", "1\tSee a doctor.\tAsk a nurse."])
def test_a_malformed_labelled_line_is_an_error_that_names_it(tmp_path, line):
    path = tmp_path / "labelled.txt"
    path.write_text(f"1\tSee a doctor.\n{line}\n")
    with pytest.raises(DataError, match="line 2"):
        M.read_labelled_advice(path)


def test_reference_advice_rate_is_the_baseline_with_the_systems_resamples():
    refs = ["Talk to your doctor about it.", "Doctors diagnose it with a scan.", "Seek medical help now.", "Rest."]
    rate = M.reference_advice_rate(refs, samples=200, seed=5)
    assert rate["value"] == pytest.approx(0.5)
    assert rate == M.bootstrap_ci(M.mean_statistic(np.array([1.0, 0.0, 1.0, 0.0])), 4, samples=200, seed=5)
    assert 0.0 <= rate["ci_low"] < 0.5 < rate["ci_high"] <= 1.0


@pytest.mark.parametrize("text", [
    "I am sorry. I am sorry. I am sorry.",
    "The answer is the answer is the answer is the answer is",
    "no " * 12,
    "!!!!!!!!!!!!",
    " ".join(["Diabetes is a disease.", "It affects sugar.", "Diabetes is a disease.", "It affects sugar.",
              "It is common.", "Diabetes is a disease.", "It affects sugar.", "It is common."] * 2),
])
def test_loop_positive(text):
    assert M.is_looping(text)


@pytest.mark.parametrize("text", [
    "very very very good",
    "Type 2 diabetes is a chronic condition in which the body does not use insulin well. Symptoms include "
    "thirst, frequent urination, tiredness and blurred vision. Treatment includes diet, exercise and medicine.",
    "1. Eat well. 2. Sleep well. 3. Move more.",
    "",
])
def test_loop_negative(text):
    assert not M.is_looping(text)


def test_behaviour_per_example():
    b = M.behaviour_per_example(["  ", "Ask your doctor now.", "go go go go go go go go go go"],
                                [0, 5, 10], [False, True, False])
    assert b["empty_or_loop"].tolist() == [1, 0, 1]
    assert b["words"].tolist() == [0, 4, 10]
    assert b["tokens"].tolist() == [0, 5, 10]
    assert b["disclaimer"].tolist() == [0, 1, 0]
    assert b["stopped"].tolist() == [0, 1, 0]


def test_select_first():
    recs = [{"id": str(i)} for i in range(5)]
    assert [r["id"] for r in M.select_first(recs, 3)] == ["0", "1", "2"]
    assert M.select_first(recs, "all") == recs
    assert len(M.select_first(recs, 99)) == 5
    with pytest.raises(ValueError):
        M.select_first(recs, 0)


def test_implementations_name_versions():
    impl = M.implementations()
    assert "rouge-score 0.1.2" in impl["rouge"]
    assert "sacrebleu" in impl["bleu"] and "tok:13a" in impl["bleu"]
