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


@pytest.mark.slow
def test_hb_compare_writes_an_executed_report(tmp_path, capsys):
    a = make_run(tmp_path, "r8", 8, 0.20, 1.9)
    b = make_run(tmp_path, "r16", 16, 0.25, 1.8)
    assert cli.main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    html = (tmp_path / "cmp" / "06_compare.html").read_text()
    assert "data:image/png;base64" in html and "lora_r" in html
    assert "06_compare.html" in capsys.readouterr().out
