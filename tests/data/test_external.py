"""External evaluation sets: LiveQA XML and MedLFQA JSONL loading, format detection, the leakage check, and
02 dropping the MedQuAD pairs that leak into a configured set. Synthetic fixtures here; the real files (and the
full MedQuAD release) in the integration tests, skipped when ../shared is absent."""

from __future__ import annotations

import json
import re
from collections import defaultdict

import numpy as np
import pandas as pd
import pytest

from hb_utils.config import ConfigError, load_config
from hb_utils.data import external, medquad
from hb_utils.errors import DataError
from tests.conftest import MEDQUAD
from tests.data.external_files import (
    LIVEQA_FILE,
    MEDLFQA_LIVEQA,
    MEDLFQA_MEDICATION,
    medlfqa_row,
    write_liveqa,
    write_medlfqa,
)


# --------------------------------------------------------------------------- loading
def test_liveqa_xml_gives_one_set_per_question_text_with_every_reference(tmp_path):
    path = write_liveqa(tmp_path / "liveqa.xml")
    sets = external.load_file(str(path), ["summary", "message", "paraphrase"])
    assert [s.name for s in sets] == ["liveqa_summary", "liveqa_message", "liveqa_paraphrase"]
    assert all(s.format == "liveqa_xml" and s.skipped == 1 and s.file_name == "liveqa" for s in sets)
    summary, message, paraphrase = sets
    assert [it.id for it in summary.items] == ["TQ1", "TQ2"]
    assert summary.items[0].question == "What diet helps zorbitis?"
    assert paraphrase.items[0].question == "What diet is recommended for zorbitis?"
    # the consumer's own words: subject line, then the message, whitespace collapsed
    assert message.items[0].question == "zorbitis help\nmy son has zorbitis what should we eat thanks"
    assert message.items[1].question == "Is quellax safe in pregnancy?"  # no subject
    assert len(summary.items[0].references) == 2 and summary.items[1].references[0].startswith("Quellax")
    # the leakage check sees every question text, whichever is asked
    assert set(summary.items[0].questions) == {summary.items[0].question, message.items[0].question,
                                               paraphrase.items[0].question}
    assert not summary.has_statements
    assert summary.info()["references"] == 3


def test_medlfqa_jsonl_keeps_statements_and_skips_rows_without_answer(tmp_path):
    path = write_medlfqa(tmp_path / "live_qa_test_MedLFQA.jsonl")
    (s,) = external.load_file(path)
    assert s.name == s.file_name == "medlfqa_live_qa" and s.format == "medlfqa_jsonl" and s.skipped == 1
    assert [len(it.must_have) for it in s.items] == [1, 2] and [len(it.nice_to_have) for it in s.items] == [1, 0]
    assert s.items[0].references == [s.items[0].references[0]] and s.items[0].question.startswith("How should")
    assert s.has_statements and s.info()["must_have"] == 3


def test_format_is_detected_from_the_content_not_the_suffix(tmp_path):
    xml = write_liveqa(tmp_path / "a.jsonl")  # XML with a misleading suffix
    lines = write_medlfqa(tmp_path / "b.xml")
    assert external.detect_format(xml) == "liveqa_xml" and external.detect_format(lines) == "medlfqa_jsonl"


@pytest.mark.parametrize(("name", "content", "pattern"), [
    ("x.csv", "Question,Answer\na,b\n", r"neither XML nor JSON lines"),
    ("medquad.xml", "<Document id='1'><QAPairs/></Document>", r"no <NLM-QUESTION> elements under its root <Document>"),
    ("broken.xml", "<LiveQA><NLM-QUESTION>", r"not well-formed XML"),
    ("rows.jsonl", json.dumps({"question": "q", "answer": "a"}) + "\n", r"line 1 has no text \"Question\".*found: "
                                                                         r"question, answer"),
    ("array.json", "[1, 2]", r"neither XML nor JSON lines"),
    ("bad.jsonl", '{"Question": "q", "Free_form_answer": "a"}\n{not json\n', r"line 2 is not a JSON object"),
    ("stmts.jsonl", json.dumps(medlfqa_row("q", "a", "not a list", [])) + "\n", r"Must_have must be a list"),
    ("empty.jsonl", "{}", r"has no text \"Question\""),
])
def test_a_wrong_file_names_the_expected_layouts(tmp_path, name, content, pattern):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=pattern) as info:
        external.load_file(path)
    if "JSON object" not in pattern:
        assert "LiveQA XML: <NLM-QUESTION" in str(info.value) or "MedLFQA JSONL" in str(info.value)


def test_missing_file_duplicate_sets_and_bad_question_choice(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*external_eval.*Expected one of: LiveQA XML"):
        external.load_sets([str(tmp_path / "nope.xml")])
    path = write_medlfqa(tmp_path / "live_qa_test_MedLFQA.jsonl")
    with pytest.raises(DataError, match="medlfqa_live_qa more than once"):
        external.load_sets([str(path), str(path)])
    with pytest.raises(DataError, match="liveqa_questions must name"):
        external.load_file(write_liveqa(tmp_path / "l.xml"), ["subject"])
    with pytest.raises(ConfigError, match="liveqa_questions must name one or more of summary, paraphrase, message"):
        load_config(liveqa_questions=["subject"])


def test_external_eval_is_data_scope_and_the_question_text_eval_scope():
    base = load_config()
    with_sets = base.replace(external_eval=["a.xml"])
    assert with_sets.fingerprint("data") != base.fingerprint("data")  # 02 drops pairs: the split changes
    asked = base.replace(liveqa_questions=["paraphrase"], external_size=5, judge_model="x", judge_batch_size=2)
    assert asked.fingerprint("train") == base.fingerprint("train") and asked.fingerprint("eval") != base.fingerprint(
        "eval")


# --------------------------------------------------------------------------- leakage
def _words(tag, n):
    return " ".join(f"{tag}w{i}" for i in range(n))


LONG = _words("long", 60)
ONE_WORD_CHANGED = " ".join(w if i != 30 else "changed" for i, w in enumerate(LONG.split()))  # Jaccard 0.82
INSIDE = " ".join(LONG.split()[10:40])  # a passage of LONG: all its 5-grams in LONG, Jaccard 26/56


def _own_grams(text):
    w = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    return {tuple(w[i:i + 5]) for i in range(max(1, len(w) - 4))}


def test_planted_overlaps_are_what_the_test_says():
    a, b, c = _own_grams(LONG), _own_grams(ONE_WORD_CHANGED), _own_grams(INSIDE)
    assert len(a & b) / len(a | b) >= 0.8
    assert c <= a and len(a & c) / len(a | c) < 0.8


def test_each_kind_of_leak_is_found():
    items = [
        external.ExternalItem("same_q", "What Is Zorbitis ?", ["an unrelated reference " + _words("r0", 20)]),
        external.ExternalItem("near_q", _words("question", 12), ["another reference " + _words("r1", 20)]),
        external.ExternalItem("same_a", "unrelated question one", ["Exactly This Answer, " + _words("same", 20)]),
        external.ExternalItem("near_a", "unrelated question two", [ONE_WORD_CHANGED]),
        external.ExternalItem("inside", "unrelated question three", ["no match here", INSIDE]),  # 2nd reference
        external.ExternalItem("clean", "a question nobody asked", [_words("clean", 30)]),
    ]
    questions = ["what is zorbitis", " ".join(_words("question", 12).split()[:11] + ["other"]), "q3", "q4",
                 "q5", "q6", "what is zorbitis?"]
    answers = ["a1 " + _words("a1", 10), "a2 " + _words("a2", 10), "exactly this answer " + _words("same", 20),
               LONG, LONG, _words("filler", 20), "a7 " + _words("a7", 10)]
    leaks = external.find_leaks(items, questions, answers)
    flagged = {k: [items[i].id for i in np.flatnonzero(v)] for k, v in leaks.items.items()}
    assert flagged == {"same_question": ["same_q"], "near_duplicate_question": ["same_q"],
                       "same_answer": ["same_a"], "near_duplicate_answer": ["same_a", "near_a"],
                       "shared_answer": ["same_a", "near_a", "inside"]}
    # 12-word questions differing in one word share 7 of 9 5-grams: Jaccard 0.64, not a near-duplicate
    assert not leaks.items["near_duplicate_question"][1]
    assert leaks.counts("items")["any"] == 4
    pairs = {k: list(np.flatnonzero(v)) for k, v in leaks.pairs.items()}
    assert pairs["same_question"] == [0, 6] and pairs["same_answer"] == [2] and pairs["shared_answer"] == [2, 3, 4]
    assert leaks.counts("pairs")["any"] == 5
    assert external.overlap_with(items, [{"question": q, "answer": a} for q, a in zip(questions, answers,
                                                                                       strict=True)])["any"] == 4


def test_a_near_duplicate_question_is_found():
    q = _words("question", 40)
    item = external.ExternalItem("x", "asked", ["ref " + _words("r", 10)], questions=["asked", q])
    leaks = external.find_leaks([item], [" ".join(q.split()[:39] + ["tail"]), "other"], ["a " + _words("a", 9),
                                                                                        "b " + _words("b", 9)])
    assert list(leaks.pairs["near_duplicate_question"]) == [True, False]
    assert not leaks.pairs["same_question"].any()


def _release_with_plant(tmp_path):
    from tests.conftest import write_release

    release = write_release(tmp_path / "release")
    df, _ = medquad.load_raw(str(release))
    pair = df[df["answer"] != ""].iloc[0]  # document 0, never re-asked by another document
    planted = write_medlfqa(tmp_path / "ext" / "planted_test_MedLFQA.jsonl", [
        medlfqa_row(pair["question"], medquad.clean_text(pair["answer"]), ["a statement"], []),
        medlfqa_row("A question nobody trained on?", "An answer nobody trained on, " + _words("fresh", 12), [], [])])
    return release, pair, planted


@pytest.mark.filterwarnings("ignore:sample_size=48 but only")  # every pair is drawn: the plant is in the sample
def test_02_drops_a_planted_leak_and_reports_it(tmp_path):
    release, pair, planted = _release_with_plant(tmp_path)
    cfg = load_config(dataset=str(release), output_root=str(tmp_path / "out"), experiment="t", sample_size=48,
                      min_question_chars=5, min_answer_chars=5, split_by="row")
    plain = medquad.prepare_splits(cfg, write=False)
    assert pair["question"] in {r["question"] for recs in plain.records.values() for r in recs}
    assert "external" not in plain.stats
    dropped = medquad.prepare_splits(cfg.replace(experiment="t2", external_eval=[str(planted)]))
    stats = json.loads((tmp_path / "out" / "t2" / "data" / "stats.json").read_text())
    assert stats["external"] == dropped.stats["external"]
    rec = stats["external"]["by_file"]["medlfqa_planted"]
    assert stats["external"]["pairs_dropped"] == 1 and rec["pairs_dropped"]["any"] == 1
    assert rec["pairs_dropped"]["same_question"] == rec["pairs_dropped"]["same_answer"] == 1
    assert rec["items_touched"]["any"] == 1 and rec["items"] == 2
    assert stats["funnel"][-1] == {"step": "leaks into an external set", "removed": 1,
                                   "remaining": plain.stats["funnel"][-1]["remaining"] - 1}
    assert pair["question"] not in {r["question"] for recs in dropped.records.values() for r in recs}
    sets = external.load_sets([str(planted)])
    for records, found in ((plain.records, 1), (dropped.records, 0)):  # what 04 checks, on train + val
        assert external.overlap_with(sets[0].items, records["train"] + records["val"] + records["test"])["any"] == found
    table = external.drop_table(stats["external"])
    assert table.loc[("medlfqa_planted", "any of these"), "MedQuAD pairs dropped"] == 1
    assert table.loc[("medlfqa_planted", "same answer"), "questions touched"] == 1


# --------------------------------------------------------------------------- the real files
@pytest.fixture
def external_files():
    if not (LIVEQA_FILE.is_file() and MEDLFQA_LIVEQA.is_file() and MEDLFQA_MEDICATION.is_file()):
        pytest.skip(f"external sets not found under {LIVEQA_FILE.parents[1]} (integration data, docs/evaluation.md)")
    return [str(LIVEQA_FILE), str(MEDLFQA_LIVEQA), str(MEDLFQA_MEDICATION)]


@pytest.mark.integration
def test_the_real_files_load(external_files):
    sets = {s.name: s for s in external.load_sets(external_files, ["summary", "message"])}
    assert list(sets) == ["liveqa_summary", "liveqa_message", "medlfqa_live_qa", "medlfqa_medication_qa"]
    assert len(sets["liveqa_summary"].items) == 104 and sets["liveqa_summary"].skipped == 0
    assert sum(len(it.references) for it in sets["liveqa_summary"].items) > 104  # several references per question
    assert len(sets["medlfqa_live_qa"].items) + sets["medlfqa_live_qa"].skipped == 100
    assert len(sets["medlfqa_medication_qa"].items) == 666
    assert all(it.must_have for it in sets["medlfqa_medication_qa"].items)
    assert sets["liveqa_message"].items[0].question != sets["liveqa_summary"].items[0].question


def _own_best_overlap(references, answers):
    """For each reference: (best word 5-gram Jaccard, best share of the shorter text's 5-grams) over ``answers``,
    computed here with this test's own normalisation and an inverted index (not hb_utils.data.split's shingles)."""
    grams = [_own_grams(a) for a in answers]
    index = defaultdict(list)
    for j, g in enumerate(grams):
        for gram in g:
            index[gram].append(j)
    out = []
    for ref in references:
        mine = _own_grams(ref)
        shared = defaultdict(int)
        for gram in mine:
            for j in index.get(gram, ()):
                shared[j] += 1
        out.append((max((k / (len(mine) + len(grams[j]) - k) for j, k in shared.items()), default=0.0),
                    max((k / min(len(mine), len(grams[j])) for j, k in shared.items()), default=0.0)))
    return out


@pytest.mark.integration
@pytest.mark.slow
def test_leakage_of_medlfqa_liveqa_into_the_full_medquad_release_matches_an_independent_count(external_files):
    if not (MEDQUAD / "1_CancerGov_QA").is_dir():
        pytest.skip(f"MedQuAD XML release not found at {MEDQUAD} (integration data; see README)")
    raw, _ = medquad.load_raw(str(MEDQUAD))
    df = raw[medquad.answered(raw)].reset_index(drop=True)
    questions, answers = df["question"].map(medquad.clean_text), df["answer"].map(medquad.clean_text)
    (lfqa,) = external.load_sets([str(MEDLFQA_LIVEQA)])
    leaks = external.find_leaks(lfqa.items, questions.tolist(), answers.tolist())
    own = _own_best_overlap([it.references[0] for it in lfqa.items], answers.tolist())
    own_near = sum(j >= 0.8 for j, _ in own)
    own_shared = sum(s >= 0.5 for _, s in own)
    counts = leaks.counts("items")
    assert counts["near_duplicate_answer"] == own_near >= 1
    assert counts["shared_answer"] == own_shared >= 5
    assert np.array_equal(leaks.items["near_duplicate_answer"], np.array([j >= 0.8 for j, _ in own]))
    # and 02 on Experiment 1's settings drops them: the pairs it keeps overlap none of the set's questions
    cfg = load_config(dataset=str(MEDQUAD), external_eval=[str(MEDLFQA_LIVEQA)])
    clean, _ = medquad.clean_and_filter(raw, cfg)
    kept, record = external.drop_leaking(clean, [lfqa])
    assert record["pairs_dropped"] > 0 and len(kept) == len(clean) - record["pairs_dropped"]
    again = external.find_leaks(lfqa.items, kept["question"].tolist(), kept["answer"].tolist())
    assert again.counts("items")["any"] == 0
    assert isinstance(pd.DataFrame(external.drop_table(record)), pd.DataFrame)
