import json
import re

import numpy as np
import pandas as pd
import pytest

from hb_utils.config import load_config
from hb_utils.data import eda, medquad, split
from hb_utils.errors import DataError, RunError
from hb_utils.run_dir import RunPaths
from tests.conftest import ROOT


def cfg_for(source, tmp_path, **kw):
    base = dict(dataset=str(source), output_root=str(tmp_path / "out"), experiment="t", sample_size=20,
                min_question_chars=5, min_answer_chars=5)
    base.update(kw)
    return load_config(**base)


def test_xml_release_parses_all_columns(release):
    df, info = medquad.load_raw(str(release))
    assert list(df.columns) == medquad.COLUMNS
    assert info["kind"] == "xml_release" and info["rows"] == 48 and info["answered"] == 36
    row = df.iloc[0]
    assert row["document_source"] in ("FakeGov", "FakeGard") and row["umls_cui"].startswith("C000")
    assert row["question_type"] and row["question_id"].endswith("-1")


def test_cleaning_strips_html_and_counts_each_filter(release, tmp_path):
    df, _ = medquad.load_raw(str(release))
    cfg = cfg_for(release, tmp_path, max_answer_words=12)
    clean, funnel = medquad.clean_and_filter(df, cfg)
    assert not clean["answer"].str.contains("<b>").any() and not clean["answer"].str.contains("  ").any()
    steps = {s["step"]: s for s in funnel}
    assert steps["answer present"]["removed"] == 12
    assert steps["answer <= 12 words"]["removed"] > 0  # answers of 11..13 words + "Bold tail."
    assert funnel[-1]["remaining"] == len(clean)
    assert all(a["remaining"] - b["removed"] == b["remaining"] for a, b in zip(funnel, funnel[1:], strict=False))


@pytest.mark.parametrize("split_by", ["question", "focus"])
def test_grouped_split_has_no_leakage_and_is_deterministic(release, tmp_path, split_by):
    cfg = cfg_for(release, tmp_path, split_by=split_by, sample_size=36, train_frac=0.6, val_frac=0.2, test_frac=0.2)
    a = medquad.prepare_splits(cfg, write=False)
    b = medquad.prepare_splits(cfg, write=False)
    assert a.records == b.records
    leak = a.stats["split"]["leakage"]
    assert set(leak) == {f"{s}_{k}_in_train" for s in ("val", "test")
                         for k in ("questions", "answers", "near_duplicate_answers")}
    assert not any(leak.values())
    assert_groups_in_one_split(a.frames, split_by)
    assert sum(a.stats["split"]["sizes"].values()) == 36


def assert_groups_in_one_split(frames, split_by):
    """Every group of the whole sample (computed on all splits together) lies in exactly one split."""
    sample = pd.concat([f.assign(_split=name) for name, f in frames.items()], ignore_index=True)
    splits_per_group = sample.groupby(split.group_keys(sample, split_by))["_split"].nunique()
    assert (splits_per_group == 1).all(), splits_per_group[splits_per_group > 1]


# --------------------------------------------------------------------------- planted answer duplicates
def words(tag, n):
    """n distinct made-up words: texts built from them share no shingle by accident."""
    return [f"{tag}w{i}" for i in range(n)]


def jaccard5(a, b):
    """Word 5-gram Jaccard, written out here (independently of hb_utils.data.medquad) to document the plants."""
    grams = [{tuple(t.lower().split()[i:i + 5]) for i in range(len(t.split()) - 4)} for t in (a, b)]
    return len(grams[0] & grams[1]) / len(grams[0] | grams[1])


BOILER = " ".join(words("boiler", 40)) + "."
NEAR = words("near", 60)
NEAR_1 = " ".join(NEAR)  # NEAR_2 changes one word of 60: Jaccard (51 - 5) / (51 + 5) = 0.82
NEAR_2 = " ".join(NEAR[:30] + ["changed"] + NEAR[31:])
NEAR_3 = " ".join(NEAR[:30] + ["changed"] + NEAR[31:50] + ["again"] + NEAR[51:])  # 0.82 to NEAR_2, 0.67 to NEAR_1
FAR = " ".join(w if i % 7 else "other" for i, w in enumerate(NEAR))  # 9 words changed: not a duplicate
PLANTED = [  # (question, focus, answer)
    ("What is alpha disease?", "Alpha", "Shared answer " + " ".join(words("shared", 30)) + "."),
    ("How is beta syndrome treated?", "Beta", "shared ANSWER, " + " ".join(words("shared", 30)) + " !"),
    ("What causes gamma?", "Gamma", NEAR_1),
    ("Is delta inherited?", "Delta", NEAR_2),
    ("What are the outlooks for epsilon?", "Epsilon", NEAR_3),
    ("Who gets zeta?", "Zeta", FAR),
    *[(f"How many people have condition {i}?", f"Condition {i}", BOILER) for i in range(8)],
]
PLANTED_GROUPS = [[0, 1], [2, 3, 4], list(range(6, 14))]  # FAR (row 5) stays alone


def planted_frame(n_filler=60):
    rows = [{"question": q, "question_focus": f, "answer": a} for q, f, a in PLANTED]
    rows += [{"question": f"What is filler topic {i} about?", "question_focus": f"Filler {i}",
              "answer": " ".join(words(f"f{i}", 25)) + "."} for i in range(n_filler)]
    df = pd.DataFrame(rows)
    df["question_id"] = [f"q{i}" for i in range(len(df))]
    return df


def test_planted_texts_are_what_the_tests_say():
    assert jaccard5(NEAR_1, NEAR_2) >= 0.8 and jaccard5(NEAR_2, NEAR_3) >= 0.8
    assert jaccard5(NEAR_1, NEAR_3) < 0.8 and jaccard5(NEAR_1, FAR) < 0.8


@pytest.mark.parametrize("split_by", ["question", "focus"])
def test_shared_and_near_duplicate_answers_join_one_group(split_by):
    df = planted_frame()
    grouping = split.group_pairs(df, split_by)
    keys = grouping.keys
    for rows in PLANTED_GROUPS:  # same answer / one word changed (and a chain of two) / boilerplate
        assert keys[rows].nunique() == 1, rows
    assert keys[[g[0] for g in PLANTED_GROUPS] + [5]].nunique() == len(PLANTED_GROUPS) + 1
    assert keys[len(PLANTED):].is_unique  # fillers share nothing
    summary = grouping.summary()
    assert summary["pairs_regrouped"] == sum(len(g) for g in PLANTED_GROUPS) == 13
    assert summary["plain_groups"] == len(df) and summary["groups"] == len(df) - 13 + 3
    assert summary["largest_group"] == 8
    row = split.group_pairs(df, "row").summary()
    assert row["groups"] == len(df) and row["pairs_regrouped"] == 0


def test_near_duplicate_groups_equal_brute_force_components_at_the_threshold():
    # 25 answers of 200 random words, each with 4 variants that change 3..6 words: Jaccards around 0.75-0.86,
    # many right at 0.8, where LSH is least sure. The groups must be exactly the components of J >= 0.8.
    rng = np.random.default_rng(0)
    answers = []
    for base in range(25):
        text = [f"v{x}" for x in rng.integers(0, 5000, 200)]
        answers.append(text)
        for changed in rng.integers(3, 7, 4):
            variant = list(text)
            for pos in rng.choice(200, changed, replace=False):
                variant[pos] = f"new{base}x{pos}"
            answers.append(variant)
    grams = [{tuple(a[i:i + 5]) for i in range(len(a) - 4)} for a in answers]  # written out here, as jaccard5
    jac = {(i, j): len(grams[i] & grams[j]) / len(grams[i] | grams[j])
           for i in range(len(answers)) for j in range(i + 1, len(answers))}
    assert sum(0.8 <= v < 0.82 for v in jac.values()) >= 10 and sum(0.78 <= v < 0.8 for v in jac.values()) >= 5
    parent = list(range(len(answers)))  # brute-force components

    def root(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for (i, j), v in jac.items():
        if v >= 0.8:
            parent[root(i)] = root(j)
    df = pd.DataFrame({"question": [f"What is item {i}?" for i in range(len(answers))],
                       "answer": [" ".join(a) for a in answers]})
    keys = split.group_keys(df, "question")
    expected = pd.Series([root(i) for i in range(len(answers))])
    assert keys.groupby(expected).nunique().eq(1).all() and expected.groupby(keys).nunique().eq(1).all()


def test_a_question_asked_twice_is_one_plain_group():
    df = planted_frame(4)
    df.loc[len(df)] = {"question": "what is ALPHA disease", "question_focus": "Alpha", "answer": "Another answer.",
                       "question_id": "again"}
    summary = split.group_pairs(df, "question").summary()
    assert summary["plain_groups"] == len(df) - 1
    assert summary["pairs_regrouped"] == 14  # the repeated question joins the shared-answer group


@pytest.mark.parametrize("split_by", ["question", "focus"])
def test_planted_duplicates_never_cross_splits(tmp_path, split_by):
    df = planted_frame()
    df.to_json(tmp_path / "planted.jsonl", orient="records", lines=True)
    base = cfg_for(tmp_path / "planted.jsonl", tmp_path, split_by=split_by, sample_size=len(df),
                   train_frac=0.6, val_frac=0.2, test_frac=0.2)
    row_leaks = 0
    for seed in range(6):
        cfg = base.replace(split_seed=seed, sample_seed=seed)
        prepared = medquad.prepare_splits(cfg, write=False)
        where = {q: name for name, frame in prepared.frames.items() for q in frame["question_id"]}
        for rows in PLANTED_GROUPS:
            assert len({where[f"q{i}"] for i in rows}) == 1, (seed, rows)
        st = prepared.stats["split"]
        assert not any(st["leakage"].values()), st["leakage"]
        assert st["grouping"]["pairs_regrouped"] == 13
        row_leaks += st["leakage_if_split_by_row"]["test_near_duplicate_answers_in_train"]
    assert row_leaks > 0  # the same sample split by row does leak the planted answers


def test_leakage_counts_each_kind_of_overlap():
    def frame(pairs):
        return pd.DataFrame(pairs, columns=["question", "answer"])

    shared = PLANTED[0][2]
    splits = {"train": frame([("What is alpha disease?", shared), ("Q gamma?", NEAR_1)]),
              "val": frame([("what is alpha disease", "A new answer here."), ("Q other?", shared.upper())]),
              "test": frame([("Q delta?", NEAR_2), ("Q zeta?", FAR), ("Q epsilon?", NEAR_3)])}
    assert split.leakage(splits) == {
        "val_questions_in_train": 1, "val_answers_in_train": 1, "val_near_duplicate_answers_in_train": 1,
        "test_questions_in_train": 0, "test_answers_in_train": 0, "test_near_duplicate_answers_in_train": 1}
    table = split.leakage_table({"by": "question", "sizes": {"train": 2, "val": 2, "test": 3},
                                "leakage": split.leakage(splits), "leakage_if_split_by_row": split.leakage(splits)})
    assert list(table.columns) == ["pairs", "split_by=question", "split_by=row (original)"]
    assert table.shape == (6, 3) and table.loc[("test", "same answer"), "pairs"] == 3
    assert table.xs("val")["split_by=question"].tolist() == [1, 1, 1]


def test_one_boilerplate_group_too_big_for_any_split_says_so(tmp_path):
    df = pd.DataFrame({"question": [f"How common is condition {i}?" for i in range(10)], "answer": BOILER})
    df.to_json(tmp_path / "boiler.jsonl", orient="records", lines=True)
    cfg = cfg_for(tmp_path / "boiler.jsonl", tmp_path, sample_size=10)
    with pytest.raises(DataError, match="val split is empty.*1 groups.*largest has 10 pairs.*Raise sample_size"):
        medquad.prepare_splits(cfg, write=False)
    assert medquad.prepare_splits(cfg.replace(split_by="row"), write=False).stats["split"]["sizes"]["test"] == 1


def test_row_split_reports_the_leakage_it_leaves(release, tmp_path):
    # Every 5th synthetic document repeats the previous one's questions: a row split leaks some of them.
    cfg = cfg_for(release, tmp_path, split_by="row", sample_size=36, train_frac=0.5, val_frac=0.25, test_frac=0.25)
    leaks = [medquad.prepare_splits(cfg.replace(split_seed=s), write=False).stats["split"]["leakage"] for s in range(8)]
    assert any(sum(leak.values()) > 0 for leak in leaks)
    st = medquad.prepare_splits(cfg, write=False).stats["split"]
    assert st["sizes"] == {"train": 18, "val": 9, "test": 9}
    assert st["leakage"] == st["leakage_if_split_by_row"]


def test_records_are_chat_messages(release, tmp_path):
    cfg = cfg_for(release, tmp_path)
    rec = medquad.prepare_splits(cfg, write=False).records["train"][0]
    roles = [m["role"] for m in rec["messages"]]
    assert roles == ["system", "user", "assistant"]
    assert rec["messages"][0]["content"] == cfg.system_prompt
    assert rec["messages"][1]["content"] == rec["question"] and rec["messages"][2]["content"] == rec["answer"]
    text = medquad.render_zephyr(rec["messages"])
    assert text.startswith("<|system|>\n") and f"<|assistant|>\n{rec['answer']}</s>\n" in text


def test_written_files_carry_the_fingerprint_and_are_reused(release, tmp_path):
    cfg = cfg_for(release, tmp_path)
    prepared = medquad.prepare_splits(cfg)
    run = RunPaths.for_config(cfg)
    stats = json.loads(run.data_stats.read_text())
    assert stats["stamp"]["fingerprints"] == {"data": cfg.fingerprint("data")}
    assert stats["stamp"]["params"]["sample_size"] == cfg.sample_size and stats["stamp"]["created"].endswith("+00:00")
    lines = run.split("train").read_text().splitlines()
    assert len(lines) == stats["split"]["sizes"]["train"] == len(prepared.records["train"])
    assert medquad.splits_are_current(cfg)
    assert medquad.ensure_splits(cfg) == prepared.records
    run.split("val").unlink()  # a missing cheap artifact is rebuilt
    assert medquad.load_split(cfg, "val") == prepared.records["val"]


def test_a_different_data_config_never_overwrites_silently(release, tmp_path):
    cfg = cfg_for(release, tmp_path)
    medquad.prepare_splits(cfg)
    before = RunPaths.for_config(cfg).split("train").read_text()
    other = cfg.replace(sample_seed=7)
    with pytest.raises(RunError, match=r"another data config \(sample_seed: 42 -> 7\).*new `experiment` name"):
        medquad.prepare_splits(other)
    assert RunPaths.for_config(cfg).split("train").read_text() == before
    medquad.prepare_splits(other.replace(overwrite=True))
    assert medquad.splits_are_current(other)


def test_jsonl_and_csv_sources(tmp_path):
    rows = [{"Question": f"What is item {i} really about?", "Answer": f"Item {i} is a long enough answer here."}
            for i in range(12)]
    pd.DataFrame(rows).to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    for name in ("d.jsonl", "d.csv"):
        df, info = medquad.load_raw(str(tmp_path / name))
        assert info["kind"] == "file" and len(df) == 12 and list(df.columns) == medquad.COLUMNS
        assert df["question_id"].is_unique


def test_bad_sources_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        medquad.load_raw(str(tmp_path / "missing_dir"))
    pd.DataFrame({"q": ["a"], "text": ["b"]}).to_csv(tmp_path / "x.csv", index=False)
    with pytest.raises(DataError, match="no question / answer column.*columns found: q, text"):
        medquad.load_raw(str(tmp_path / "x.csv"))
    (tmp_path / "rel" / "1_X_QA").mkdir(parents=True)
    (tmp_path / "rel" / "1_X_QA" / "0000001.xml").write_text("<Document><QAPairs><QAPair></Document>")
    with pytest.raises(DataError, match="not well-formed XML"):
        medquad.load_raw(str(tmp_path / "rel"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*/\\*.xml files"):
        medquad.load_raw(str(tmp_path / "empty"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="Unsupported data file"):
        medquad.load_raw(str(tmp_path / "x.txt"))


def test_hub_errors_are_wrapped(monkeypatch):
    import datasets

    def boom(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(DataError, match="Cannot load the Hub dataset 'some/dataset'.*Offline"):
        medquad.load_raw("some/dataset")


def test_filters_that_leave_too_little(release, tmp_path):
    cfg = cfg_for(release, tmp_path, min_answer_chars=10_000)
    with pytest.raises(DataError, match="Only 0 pairs are left after filtering.*min_answer_chars"):
        medquad.prepare_splits(cfg, write=False)
    big = cfg_for(release, tmp_path, sample_size=500)
    with pytest.warns(UserWarning, match="only 36 pairs pass the filters"):
        stats = medquad.prepare_splits(big, write=False).stats
    assert stats["sample"] == {"requested": 500, "drawn": 36, "reduced": True, "available": 36}


def test_eda_tables(release):
    df, _ = medquad.load_raw(str(release))
    src = eda.per_source(df)
    assert src["pairs"].sum() == 48 and src["answered"].sum() == 36
    dups = eda.duplicate_questions(df)
    assert dups["repeated_pairs"] == 6 and dups["questions_asked_more_than_once"] == 6
    assert eda.overview(df).loc["answer", "missing"] == 12


@pytest.mark.integration
def test_full_medquad_release(medquad_dir):
    import time

    t = time.perf_counter()
    df, info = medquad.load_raw(str(medquad_dir))
    elapsed = time.perf_counter() - t
    assert len(df) == 47_441 and info["answered"] == 16_407
    assert df["document_source"].nunique() == 12
    assert elapsed < 30, f"parsing took {elapsed:.1f}s"
    cfg = load_config(dataset=str(medquad_dir))
    clean, funnel = medquad.clean_and_filter(df, cfg)
    assert 13_000 < len(clean) < 14_000
    for split_by in ("question", "focus"):
        st = medquad.prepare_splits(cfg.replace(split_by=split_by), write=False, raw=df, raw_info=info).stats
        assert not any(st["split"]["leakage"].values()), st["split"]["leakage"]
        assert st["sample"]["drawn"] == 1500


def _own_words(text):
    """This test's own normalisation (not hb_utils.data.medquad's): lowercase, runs of non-alphanumerics → one space."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _own_overlap(held_out, train):
    """(exact, near-duplicate) answer overlap of held_out with train, brute force over every pair."""
    train_words = [_own_words(a) for a in train]
    exact_train = {" ".join(w) for w in train_words}
    grams = [{tuple(w[i:i + 5]) for i in range(max(1, len(w) - 4))} for w in train_words]
    exact = near = 0
    for answer in held_out:
        w = _own_words(answer)
        exact += " ".join(w) in exact_train
        mine = {tuple(w[i:i + 5]) for i in range(max(1, len(w) - 4))}
        # Jaccard >= 0.8 <=> |A & B| >= 0.8 |A | B| = 0.8 (|A| + |B| - |A & B|); it needs 0.8 |B| <= |A| <= |B| / 0.8
        near += any(0.8 * len(g) <= len(mine) <= len(g) / 0.8
                    and (i := len(mine & g)) >= 0.8 * (len(mine) + len(g) - i) for g in grams)
    return exact, near


@pytest.mark.integration
@pytest.mark.slow
def test_experiment1_split_leaks_no_answer_by_an_independent_check(medquad_dir):
    df, info = medquad.load_raw(str(medquad_dir))
    cfg = load_config(ROOT / "params" / "exp1.yaml", dataset=str(medquad_dir))
    for split_by in ("question", "focus", "row"):
        frames = medquad.prepare_splits(cfg.replace(split_by=split_by), write=False, raw=df, raw_info=info).frames
        assert {k: len(v) for k, v in frames.items()} == {"train": 1200, "val": 150, "test": 150}
        overlap = {name: _own_overlap(frames[name]["answer"], frames["train"]["answer"]) for name in ("val", "test")}
        if split_by == "row":  # the check can see leakage: the original split has some
            assert overlap["test"][0] > 0 and overlap["test"][1] > overlap["test"][0], overlap
        else:
            assert overlap == {"val": (0, 0), "test": (0, 0)}, (split_by, overlap)
