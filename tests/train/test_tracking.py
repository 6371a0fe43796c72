"""report_to: trackio: the training arguments it sets (local storage, one project per series, one run per trial),
and a real two-step training whose logged losses are the ones metrics/ records."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import textwrap

import pytest
import torch

from hb_utils.errors import ConfigError
from hb_utils.run_dir import RunPaths, read_json
from hb_utils.train import trl_setup
from tests.train.test_training import small_cfg


def test_trackio_arguments_stay_local_and_name_project_and_run(tmp_path, monkeypatch):
    pytest.importorskip("trackio")
    monkeypatch.delenv("TRACKIO_DIR", raising=False)
    monkeypatch.setenv("HB_TRACKIO_PROJECT", "lora_rank")
    cfg = small_cfg(tmp_path, report_to="trackio", experiment="lora_r=16")
    args = trl_setup.build_sft_config(cfg, compute_dtype=torch.float32)
    assert args.report_to == ["trackio"] and args.project == "lora_rank" and args.run_name == "lora_r=16"
    assert args.trackio_space_id is None and args.trackio_static_space_id is False  # never the Hub
    assert os.environ["TRACKIO_DIR"] == str(tmp_path / "out" / "trackio")
    monkeypatch.delenv("HB_TRACKIO_PROJECT")
    assert trl_setup.build_sft_config(cfg, compute_dtype=torch.float32).project == "healthbot"
    monkeypatch.setattr(trl_setup, "is_trackio_available", lambda: False)
    with pytest.raises(ConfigError, match=r"trackio package.*\.\[tracking\].*report_to: none"):
        trl_setup.build_sft_config(cfg, compute_dtype=torch.float32)


CHILD = textwrap.dedent("""\
    import json, sys, torch
    torch.set_num_threads(1)
    from hb_utils.config import ExperimentConfig
    from hb_utils.train import training
    training.train(ExperimentConfig(**json.loads(sys.argv[1])))
""")


@pytest.mark.slow
def test_trackio_logs_the_losses_metrics_records(tmp_path):
    """Two optimizer steps of the packaged SmolLM2 with report_to: trackio, in a process of its own (trackio reads
    TRACKIO_DIR once, at import): the trackio run of the series' project holds the same losses, step by step, as
    metrics/log_history.json, and its last ones are train.json's."""
    pytest.importorskip("trackio")
    import json

    cfg = small_cfg(tmp_path, report_to="trackio", experiment="lora_r=8", eval_steps=1, save_steps=2)
    env = {**os.environ, "HB_TRACKIO_PROJECT": "series_x", "HB_HEADLESS": "1"}
    env.pop("TRACKIO_DIR", None)
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg.to_dict())], capture_output=True, text=True,
                          env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = RunPaths.for_config(cfg).metrics
    history = read_json(metrics / "log_history.json")
    train = read_json(metrics / "train.json")
    dbs = list((tmp_path / "out" / "trackio").glob("*.db"))
    assert [db.stem for db in dbs] == ["series_x"], dbs  # one project, in <output_root>/trackio
    logged = trackio_logs(dbs[0], run="lora_r=8")
    losses = {h["step"]: h["loss"] for h in history if "loss" in h}
    evals = {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}
    assert losses and evals
    tracked = {s: m["train/loss"] for s, m in logged.items() if "train/loss" in m}
    tracked_eval = {s: m["eval/loss"] for s, m in logged.items() if "eval/loss" in m}
    assert tracked == pytest.approx(losses) and tracked_eval == pytest.approx(evals)
    assert tracked[max(tracked)] == pytest.approx(train["final_train_loss"])
    assert tracked_eval[max(tracked_eval)] == pytest.approx(train["final_val_loss"])


def trackio_logs(db, run: str) -> dict[int, dict]:
    """{step: metrics} of one run, read from the project's SQLite file with the standard library."""
    import json

    with sqlite3.connect(db) as con:
        tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
        assert "metrics" in tables, tables
        cols = [r[1] for r in con.execute("pragma table_info(metrics)")]
        rows = con.execute(f"select {', '.join(cols)} from metrics").fetchall()
    out: dict[int, dict] = {}
    for row in rows:
        rec = dict(zip(cols, row, strict=True))
        if rec.get("run_name", run) != run:
            continue
        raw = rec["metrics"]
        values = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        step = values.get("train/global_step", rec.get("step"))
        out.setdefault(int(step), {}).update(values)
    return out
