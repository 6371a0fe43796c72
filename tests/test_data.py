import json

import pandas as pd
import pytest

from hb_utils import data, eda
from hb_utils.config import load_config
from hb_utils.errors import DataError, RunError
from hb_utils.run_dir import RunPaths


def cfg_for(source, tmp_path, **kw):
    base = dict(dataset=str(source), output_root=str(tmp_path / "out"), experiment="t", sample_size=20,
                min_question_chars=5, min_answer_chars=5)
    base.update(kw)
    return load_config(**base)


def test_xml_release_parses_all_columns(release):
    df, info = data.load_raw(str(release))
    assert list(df.columns) == data.COLUMNS
    assert info["kind"] == "xml_release" and info["rows"] == 48 and info["answered"] == 36
    row = df.iloc[0]
    assert row["document_source"] in ("FakeGov", "FakeGard") and row["umls_cui"].startswith("C000")
    assert row["question_type"] and row["question_id"].endswith("-1")


def test_cleaning_strips_html_and_counts_each_filter(release, tmp_path):
    df, _ = data.load_raw(str(release))
    cfg = cfg_for(release, tmp_path, max_answer_words=12)
    clean, funnel = data.clean_and_filter(df, cfg)
    assert not clean["answer"].str.contains("<b>").any() and not clean["answer"].str.contains("  ").any()
    steps = {s["step"]: s for s in funnel}
    assert steps["answer present"]["removed"] == 12
    assert steps["answer <= 12 words"]["removed"] > 0  # answers of 11..13 words + "Bold tail."
    assert funnel[-1]["remaining"] == len(clean)
    assert all(a["remaining"] - b["removed"] == b["remaining"] for a, b in zip(funnel, funnel[1:], strict=False))


@pytest.mark.parametrize("split_by", ["question", "focus"])
def test_grouped_split_has_no_leakage_and_is_deterministic(release, tmp_path, split_by):
    cfg = cfg_for(release, tmp_path, split_by=split_by, sample_size=36, train_frac=0.6, val_frac=0.2, test_frac=0.2)
    a = data.prepare_splits(cfg, write=False)
    b = data.prepare_splits(cfg, write=False)
    assert a.records == b.records
    assert a.stats["split"]["leakage"] == {"val_questions_in_train": 0, "test_questions_in_train": 0}
    keys = {n: set(data.group_keys(f, split_by)) for n, f in a.frames.items()}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["val"] and not keys["val"] & keys["test"]
    assert sum(a.stats["split"]["sizes"].values()) == 36


def test_row_split_reports_the_leakage_it_leaves(release, tmp_path):
    # Every 5th synthetic document repeats the previous one's questions: a row split leaks some of them.
    cfg = cfg_for(release, tmp_path, split_by="row", sample_size=36, train_frac=0.5, val_frac=0.25, test_frac=0.25)
    leaks = [data.prepare_splits(cfg.replace(split_seed=s), write=False).stats["split"]["leakage"] for s in range(8)]
    assert any(sum(leak.values()) > 0 for leak in leaks)
    st = data.prepare_splits(cfg, write=False).stats["split"]
    assert st["sizes"] == {"train": 18, "val": 9, "test": 9}
    assert st["leakage"] == st["leakage_if_split_by_row"]


def test_records_are_chat_messages(release, tmp_path):
    cfg = cfg_for(release, tmp_path)
    rec = data.prepare_splits(cfg, write=False).records["train"][0]
    roles = [m["role"] for m in rec["messages"]]
    assert roles == ["system", "user", "assistant"]
    assert rec["messages"][0]["content"] == cfg.system_prompt
    assert rec["messages"][1]["content"] == rec["question"] and rec["messages"][2]["content"] == rec["answer"]
    text = data.render_zephyr(rec["messages"])
    assert text.startswith("<|system|>\n") and f"<|assistant|>\n{rec['answer']}</s>\n" in text


def test_written_files_carry_the_fingerprint_and_are_reused(release, tmp_path):
    cfg = cfg_for(release, tmp_path)
    prepared = data.prepare_splits(cfg)
    run = RunPaths.for_config(cfg)
    stats = json.loads(run.data_stats.read_text())
    assert stats["stamp"]["fingerprints"] == {"data": cfg.fingerprint("data")}
    assert stats["stamp"]["params"]["sample_size"] == cfg.sample_size and stats["stamp"]["created"].endswith("+00:00")
    lines = run.split("train").read_text().splitlines()
    assert len(lines) == stats["split"]["sizes"]["train"] == len(prepared.records["train"])
    assert data.splits_are_current(cfg)
    assert data.ensure_splits(cfg) == prepared.records
    run.split("val").unlink()  # a missing cheap artifact is rebuilt
    assert data.load_split(cfg, "val") == prepared.records["val"]


def test_a_different_data_config_never_overwrites_silently(release, tmp_path):
    cfg = cfg_for(release, tmp_path)
    data.prepare_splits(cfg)
    before = RunPaths.for_config(cfg).split("train").read_text()
    other = cfg.replace(sample_seed=7)
    with pytest.raises(RunError, match=r"another data config \(sample_seed: 42 -> 7\).*new `experiment` name"):
        data.prepare_splits(other)
    assert RunPaths.for_config(cfg).split("train").read_text() == before
    data.prepare_splits(other.replace(overwrite=True))
    assert data.splits_are_current(other)


def test_jsonl_and_csv_sources(tmp_path):
    rows = [{"Question": f"What is item {i} really about?", "Answer": f"Item {i} is a long enough answer here."}
            for i in range(12)]
    pd.DataFrame(rows).to_json(tmp_path / "d.jsonl", orient="records", lines=True)
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    for name in ("d.jsonl", "d.csv"):
        df, info = data.load_raw(str(tmp_path / name))
        assert info["kind"] == "file" and len(df) == 12 and list(df.columns) == data.COLUMNS
        assert df["question_id"].is_unique


def test_bad_sources_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        data.load_raw(str(tmp_path / "missing_dir"))
    pd.DataFrame({"q": ["a"], "text": ["b"]}).to_csv(tmp_path / "x.csv", index=False)
    with pytest.raises(DataError, match="no question / answer column.*columns found: q, text"):
        data.load_raw(str(tmp_path / "x.csv"))
    (tmp_path / "rel" / "1_X_QA").mkdir(parents=True)
    (tmp_path / "rel" / "1_X_QA" / "0000001.xml").write_text("<Document><QAPairs><QAPair></Document>")
    with pytest.raises(DataError, match="not well-formed XML"):
        data.load_raw(str(tmp_path / "rel"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*/\\*.xml files"):
        data.load_raw(str(tmp_path / "empty"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="Unsupported data file"):
        data.load_raw(str(tmp_path / "x.txt"))


def test_hub_errors_are_wrapped(monkeypatch):
    import datasets

    def boom(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(DataError, match="Cannot load the Hub dataset 'some/dataset'.*Offline"):
        data.load_raw("some/dataset")


def test_filters_that_leave_too_little(release, tmp_path):
    cfg = cfg_for(release, tmp_path, min_answer_chars=10_000)
    with pytest.raises(DataError, match="Only 0 pairs are left after filtering.*min_answer_chars"):
        data.prepare_splits(cfg, write=False)
    big = cfg_for(release, tmp_path, sample_size=500)
    with pytest.warns(UserWarning, match="only 36 pairs pass the filters"):
        stats = data.prepare_splits(big, write=False).stats
    assert stats["sample"] == {"requested": 500, "drawn": 36, "reduced": True, "available": 36}


def test_eda_tables(release):
    df, _ = data.load_raw(str(release))
    src = eda.per_source(df)
    assert src["pairs"].sum() == 48 and src["answered"].sum() == 36
    dups = eda.duplicate_questions(df)
    assert dups["repeated_pairs"] == 6 and dups["questions_asked_more_than_once"] == 6
    assert eda.overview(df).loc["answer", "missing"] == 12


@pytest.mark.integration
def test_full_medquad_release(medquad):
    import time

    t = time.perf_counter()
    df, info = data.load_raw(str(medquad))
    elapsed = time.perf_counter() - t
    assert len(df) == 47_441 and info["answered"] == 16_407
    assert df["document_source"].nunique() == 12
    assert elapsed < 30, f"parsing took {elapsed:.1f}s"
    cfg = load_config(dataset=str(medquad))
    clean, funnel = data.clean_and_filter(df, cfg)
    assert 13_000 < len(clean) < 14_000
    for split_by in ("question", "focus"):
        st = data.prepare_splits(cfg.replace(split_by=split_by), write=False, raw=df, raw_info=info).stats
        assert st["split"]["leakage"] == {"val_questions_in_train": 0, "test_questions_in_train": 0}
        assert st["sample"]["drawn"] == 1500
