"""`hb compare` on run directories written by the tests (the shapes train/eval code writes)."""

from __future__ import annotations

import json

import pytest

from hb_utils import cli, run_dir
from hb_utils.config import load_config
from hb_utils.errors import RunError
from hb_utils.runs import compare


def ci(v, w=0.05):
    return {"value": v, "ci_low": v - w, "ci_high": v + w}


def make_run(root, name, lora_r, rouge, val_loss):
    cfg = load_config(experiment=name, lora_r=lora_r)
    run = root / name
    (run / "metrics").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"config": cfg.to_dict(), "fingerprints": cfg.fingerprints()}))
    (run / "metrics" / "train.json").write_text(json.dumps({
        "stamp": run_dir.stamp(cfg, "train", "test"), "final_train_loss": val_loss + 0.1, "best_val_loss": val_loss,
        "final_val_loss": val_loss + 0.01,
        "train_runtime_s": 12.5, "tokens_per_second": 321.0, "peak_memory": {"gb": 1.5}, "global_step": 4}))
    gen = {m: {"base": ci(0.1), "finetuned": ci(rouge), "delta": {"delta": rouge - 0.1, "ci_low": 0.0,
                                                                   "ci_high": 0.2, "p_not_better": 0.1}}
           for m in ("rouge1", "rouge2", "rougeL", "rougeLsum", "stopped", "disclaimer", "empty_or_loop", "words")}
    gen["bleu"] = {"base": ci(3.0, 1), "finetuned": ci(5.0, 1), "delta": {"delta": 2, "ci_low": 1, "ci_high": 3}}
    ppl = {s: {"answer_token_weighted": ci(12.0, 1)} for s in ("base", "finetuned")}
    (run / "metrics" / "eval.json").write_text(json.dumps({"stamp": run_dir.stamp(cfg, "eval", "test"),
                                                           "generation": gen, "perplexity": ppl}))
    (run / "metrics" / "log_history.json").write_text(json.dumps(
        [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, }, {"step": 2, "eval_loss": val_loss}]))
    return run


def test_tables_and_plots(tmp_path):
    a = make_run(tmp_path, "r8", 8, 0.20, 1.9)
    b = make_run(tmp_path, "r16", 16, 0.25, 1.8)
    runs = [compare.load_run(a), compare.load_run(b)]
    diff = compare.config_diff(runs)
    assert list(diff.index) == ["lora_r"] and list(diff.loc["lora_r"]) == ["8", "16"]
    table = compare.results_table(runs)
    assert table.loc["r16", "ROUGE-L"] == "25.00 [20.00, 30.00]"
    assert table.loc["r8", "best val loss"] == 1.9 and table.loc["r8", "peak mem GB"] == 1.5
    files = compare.write_tables(runs, tmp_path / "cmp")
    assert "| lora_r" in files["markdown"].read_text()
    assert files["loss_plot"].stat().st_size > 1000 and files["metrics_plot"].stat().st_size > 1000


def test_missing_pieces_name_the_stage(tmp_path):
    a = make_run(tmp_path, "r8", 8, 0.2, 1.9)
    (a / "metrics" / "eval.json").unlink()
    with pytest.raises(RunError, match="no metrics/eval.json: run 04_evaluate"):
        compare.load_run(a)
    with pytest.raises(RunError, match="at least two"):
        compare.compare_runs([str(a)])
    with pytest.raises(RunError, match="does not exist"):
        compare.load_run(tmp_path / "no_such_run")


def test_metrics_of_another_config_than_config_json_are_refused(tmp_path):
    """04 rerun by hand with another eval_size must not be shown next to the eval_size config.json records."""
    a = make_run(tmp_path, "r8", 8, 0.2, 1.9)
    other = load_config(experiment="r8", lora_r=8, eval_size=3)
    payload = json.loads((a / "metrics" / "eval.json").read_text())
    (a / "metrics" / "eval.json").write_text(json.dumps({**payload, "stamp": run_dir.stamp(other, "eval", "test")}))
    with pytest.raises(RunError, match=r"eval.json was made by another eval config \(eval_size: 3 -> 20\)"):
        compare.load_run(a)


def test_hb_compare_against_a_baseline(tmp_path, capsys):
    """`hb compare --baseline` writes the tables, verdicts and plots (the executed 06 report: the sweep test runs
    it into a series folder; here --no-report keeps this test fast)."""
    a = make_run(tmp_path, "r8", 8, 0.20, 1.9)
    b = make_run(tmp_path, "r16", 16, 0.25, 1.8)
    assert cli.main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp"), "--baseline", "r16",
                     "--no-report"]) == 0
    assert "verdicts" in capsys.readouterr().out
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert md.index("## Against the baseline (r16)") < md.index("metric_vs_param.png") < md.index("## Config")
    # runs without predictions.jsonl (made before 04 wrote it) are shown, their comparison says why it is missing
    assert "**r8** vs r16: ROUGE-L: not compared (no metrics/predictions.jsonl for r16, r8" in md
    assert (tmp_path / "cmp" / "metric_vs_param.png").is_file() and (tmp_path / "cmp" / "verdicts.csv").is_file()
    assert not (tmp_path / "cmp" / "06_compare.ipynb").exists()


# --------------------------------------------------------------------------- paired comparison with a baseline
def test_paired_interval_equals_an_independent_recomputation(tmp_path):
    """Two runs of one test set (one data fingerprint), read back from their predictions.jsonl only: matching the
    questions by text and drawing the same resamples gives the same interval, for a mean (ROUGE-L) and for
    corpus BLEU (recomputed with sacrebleu itself on each resampled corpus)."""
    import numpy as np
    from sacrebleu.metrics import BLEU

    from tests.runs.synthetic_runs import make_run

    base = make_run(tmp_path, "base", 0.4, n=15)
    run = make_run(tmp_path, "r16", 0.6, n=15, lora_r=16)
    rows = {name: run_dir.read_jsonl(path / "metrics" / "predictions.jsonl")
            for name, path in (("b", base), ("r", run))}
    rows["r"] = rows["r"][::-1]  # another order: pairing goes by the question, not the line
    by_q = {r["question"]: r for r in rows["r"]}
    pairs = [(b, by_q[b["question"]]) for b in rows["b"]]
    samples, seed, n = 200, 3, len(pairs)
    idx = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    rb = np.array([b["finetuned_scores"]["rougeL"] for b, _ in pairs])
    rr = np.array([r["finetuned_scores"]["rougeL"] for _, r in pairs])
    diffs = rr[idx].mean(axis=1) - rb[idx].mean(axis=1)
    bleu = BLEU()

    def corpus(side: int, row: np.ndarray) -> float:
        return bleu.corpus_score([pairs[i][side]["finetuned"] for i in row],
                                 [[pairs[i][side]["reference"] for i in row]]).score

    bleu_diffs = np.array([corpus(1, row) - corpus(0, row) for row in idx])
    table = compare.compare_to_baseline([compare.load_run(base), compare.load_run(run)], "base",
                                        metrics=("rougeL", "bleu"), samples=samples, seed=seed)
    assert list(table["comparisons"]) == [2, 2] and table["paired"].all() and list(table["n"]) == [n, n]
    for metric, d in (("rougeL", diffs), ("bleu", bleu_diffs)):
        row = table.set_index("metric").loc[metric]
        assert (row["ci_low"], row["ci_high"]) == pytest.approx(tuple(np.percentile(d, [2.5, 97.5])), abs=1e-9)
        adjusted = 1 - 0.05 / 2  # Bonferroni over the two comparisons
        lo, hi = np.percentile(d, [50 * (1 - adjusted), 50 * (1 + adjusted)])
        assert (row["adj_low"], row["adj_high"]) == pytest.approx((lo, hi), abs=1e-9)
    full_bleu = corpus(1, np.arange(n)) - corpus(0, np.arange(n))
    assert table.set_index("metric").loc["bleu", "delta"] == pytest.approx(full_bleu)
    assert table.set_index("metric").loc["rougeL", "delta"] == pytest.approx(rr.mean() - rb.mean())


def test_verdicts_read_the_adjusted_interval_and_say_when_unpaired(tmp_path):
    from tests.runs.synthetic_runs import make_run

    runs = [compare.load_run(make_run(tmp_path, "base", 0.3)), compare.load_run(make_run(tmp_path, "good", 0.9)),
            compare.load_run(make_run(tmp_path, "same", 0.3, seed=7)),
            compare.load_run(make_run(tmp_path, "other_data", 0.9, sample_size=99))]
    table = compare.compare_to_baseline(runs, "base", samples=2000)
    assert set(table["comparisons"]) == {3 * len(compare.PAIRED_METRICS)}
    get = table.set_index(["run", "metric"])
    assert get.loc[("good", "rougeL"), "verdict"] == "better" and get.loc[("good", "rougeL"), "paired"]
    assert get.loc[("same", "rougeL"), "verdict"] == "not distinguishable on 12 questions"
    unpaired = get.loc[("other_data", "rougeL")]
    assert not unpaired["paired"] and unpaired["note"] == ("unpaired: the test sets differ (data parameters "
                                                           "sample_size 1500 -> 99)")
    assert get.loc[("good", "empty_or_loop"), "verdict"] in ("better", "not distinguishable on 12 questions")
    lines = compare.verdict_lines(table)
    assert lines[0].startswith("**good** vs base: ROUGE-L +") and ": better;" in lines[0]
    assert "Bonferroni-adjusted 99.67% interval" in compare.verdict_summary(table)
    assert compare.verdict("empty_or_loop", -0.3, -0.1, 20) == "better"  # fewer looping answers is better
    assert compare.verdict("rougeL", -0.3, -0.1, 20) == "worse"
    assert compare.verdict("words", 0.1, 0.3, 20) == "higher"
    with pytest.raises(RunError, match="baseline 'nope' is not among"):
        compare.compare_to_baseline(runs, "nope")


def test_a_run_without_predictions_is_not_compared_and_says_why(tmp_path):
    from tests.runs.synthetic_runs import make_run

    a, b = make_run(tmp_path, "a", 0.3), make_run(tmp_path, "b", 0.5)
    (b / "metrics" / "predictions.jsonl").unlink()
    table = compare.compare_to_baseline([compare.load_run(a), compare.load_run(b)], "a")
    assert set(table["verdict"]) == {"not compared"}
    assert "no metrics/predictions.jsonl for b (rerun 04_evaluate)" in table["note"].iloc[0]


def test_external_sets_are_shown_when_present(tmp_path):
    from tests.runs.synthetic_runs import make_run

    a, b = make_run(tmp_path, "a", 0.3), make_run(tmp_path, "b", 0.5)
    payload = json.loads((b / "metrics" / "eval.json").read_text())
    block = {"settings": {"eval_examples": 7}, "generation": {k: payload["generation"][k] for k in ("rougeL", "bleu")}}
    met = {"finetuned": {"value": 0.4, "ci_low": 0.2, "ci_high": 0.6}, "delta": {"delta": 0.1, "ci_low": -0.1,
                                                                                "ci_high": 0.3}}
    judged = {**block, "statements": {"judged": True, "must_have": met, "judge": {"label": "UNRELIABLE: judge x"}}}
    payload["external"] = {"liveqa": block, "medlfqa": judged}
    (b / "metrics" / "eval.json").write_text(json.dumps(payload))
    runs = [compare.load_run(a), compare.load_run(b)]
    tables = compare.external_tables(runs)
    assert list(tables) == ["liveqa", "medlfqa"]
    lfqa = tables["medlfqa"].loc["b"]  # judged statement coverage, with the judge's label beside it
    assert lfqa["must-have met %"] == "40.0 [20.0, 60.0]" and lfqa["must-have met % Δ vs base"] == "10.0 [-10.0, 30.0]"
    assert lfqa["judge"] == "UNRELIABLE: judge x" and "judge" not in tables["liveqa"]
    t = tables["liveqa"]
    assert t.loc["a", "note"] == "not evaluated on this set" and t.loc["b", "questions"] == 7
    assert t.loc["b", "ROUGE-L"] == compare.results.format_ci(block["generation"]["rougeL"]["finetuned"], 100, 1)
    md = compare.write_tables(runs, tmp_path / "cmp", baseline="a")["markdown"].read_text()
    assert "## External set liveqa" in md and md.index("## Against the baseline (a)") < md.index("## Config")
    assert compare.external_tables(runs[:1]) == {}


def test_metric_against_parameter_plot(tmp_path):
    from tests.runs.synthetic_runs import make_run

    runs = [compare.load_run(make_run(tmp_path, f"r{r}", 0.2 + r / 40, lora_r=r)) for r in (8, 16, 32)]
    assert compare.swept_parameters(runs) == ["lora_r"]
    assert compare.swept_parameters(runs, ["lora_r", "not_a_field"]) == ["lora_r"]
    fig = compare.plot_metric_vs_param(runs, ["lora_r"], tmp_path / "p.png", baseline="r8")
    assert [ax.get_xlabel() for ax in fig.axes] == ["lora_r", "lora_r"]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["8", "16", "32"]
    assert (tmp_path / "p.png").stat().st_size > 1000
