"""The world a bad-input case runs in: a fresh tree, the tools to run `hb` or a library call in it as a
user would, and checksums of the tree before and after. Used by tests/runs/test_bad_input.py (the table) and
tests/evaluate/test_reruns.py."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hb_utils import cli, run_dir
from hb_utils.config import ExperimentConfig, load_config
from hb_utils.data import eda, medquad
from hb_utils.errors import HBError
from hb_utils.evaluate import reruns
from hb_utils.model import loading
from hb_utils.runs import runner
from tests.conftest import write_release

BASE = {"experiment": "smoke", "model_name": "smollm2-135m-instruct", "sample_size": 20, "min_question_chars": 5,
        "min_answer_chars": 5, "max_answer_words": 120, "max_length": 256, "max_steps": 4, "eval_steps": 2,
        "save_steps": 2, "eval_size": 8}


# --------------------------------------------------------------------------- the world a case runs in
@dataclass
class World:
    """tmp_path/world: outputs/ (the output root), decoy/ (a user's files next to it), home/ ($HOME, with
    Documents/), data/ (a synthetic release and small tables), params/base.yaml."""

    root: Path
    calls: list[str] = field(default_factory=list)  # stages fake_stage executed, in order

    @property
    def out(self) -> Path:
        return self.root / "outputs"

    @property
    def decoy(self) -> Path:
        return self.root / "decoy"

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def params(self) -> Path:
        return self.root / "params" / "base.yaml"

    def run(self, experiment: str = "smoke") -> Path:
        return self.out / experiment

    def cfg(self, **kw) -> ExperimentConfig:
        return load_config(self.params, **kw)

    def write(self, rel: str, text: str) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path


def make_world(tmp_path: Path) -> World:
    w = World(tmp_path / "world")
    w.write("decoy/notes.txt", "my notes")
    w.write("decoy/photos/cat.txt", "a cat")
    w.write("home/Documents/letter.txt", "dear ...")
    w.write("home/.bashrc", "export X=1")
    w.out.mkdir(parents=True)
    write_release(w.data / "release")
    base = {**BASE, "dataset": str(w.data / "release"), "output_root": str(w.out)}
    w.write("params/base.yaml", "\n".join(f"{k}: {json.dumps(v)}" for k, v in base.items()))
    return w


def fake_stage(world: World) -> Callable:
    """A stand-in for runner.execute_stage: what each notebook writes, through the same library calls
    (begin's claim, medquad.load_raw / eda.write_summary, medquad.prepare_splits, the adapter and metrics stamps,
    reruns.record_eval_rerun), without a kernel or a model. A kit error fails the stage as papermill would."""

    def execute(stage: str, cfg: ExperimentConfig, reports: Path, kernel: str = "python3") -> runner.StageResult:
        world.calls.append(stage)
        report = reports / f"{stage}.ipynb"
        try:
            paths = run_dir.claim(cfg, made_by="notebook")  # notebook.begin
            if stage == "01_eda":
                raw, info = medquad.load_raw(cfg.dataset, cfg.dataset_split)
                eda.write_summary(cfg, info, eda.duplicate_questions(raw))
            elif stage == "02_format_split":
                medquad.prepare_splits(cfg)
            elif stage == "03_train_qlora":
                paths.adapter.mkdir(parents=True, exist_ok=True)
                (paths.adapter / "adapter_config.json").write_text("{}")
                loading.write_adapter_meta(cfg, paths.adapter)
                run_dir.write_json(paths.metrics / "train.json", {"stamp": run_dir.stamp(cfg, "train", "fake")})
            elif stage == "04_evaluate":
                reruns.record_eval_rerun(cfg, stage, made_by="fake 04")
                run_dir.write_jsonl(paths.metrics / "predictions.jsonl", [{"fingerprint": cfg.fingerprint("eval")}])
                run_dir.write_json(paths.metrics / "eval.json", {"stamp": run_dir.stamp(cfg, "eval", "fake")})
            elif stage == "05_qualitative":
                reruns.record_eval_rerun(cfg, stage, made_by="fake 05")
                run_dir.write_jsonl(paths.metrics / "qualitative.jsonl", [{"fingerprint": cfg.fingerprint("eval")}])
        except HBError as exc:
            return runner.StageResult(stage, "failed", 0.0, None, None,
                                      f"{stage} failed in cell 5: {type(exc).__name__}: {exc}")
        reports.mkdir(parents=True, exist_ok=True)
        report.write_text("{}")
        return runner.StageResult(stage, "done", 0.0, report)

    return execute


def hb(*args: str | Path) -> tuple[int, str]:
    """``hb ARGS`` in this process: (exit status, stdout + stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as exc:  # argparse's usage errors
            code = int(exc.code or 0)
    return code, out.getvalue() + err.getvalue()


def call(fn: Callable[[], object]) -> tuple[int, str]:
    """A library call as a notebook makes it: (2 and the message for a kit error, else 0 and its output)."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            fn()
    except HBError as exc:
        return 2, out.getvalue() + f"{type(exc).__name__}: {exc}"
    return 0, out.getvalue()


def run_base(world: World, *args: str | Path) -> tuple[int, str]:
    return hb("run", world.params, *args)


def finished(world: World, *args: str | Path) -> None:
    """A finished (fake) run of the base config plus ``args``."""
    code, out = run_base(world, *args)
    assert code == 0, out
    world.calls.clear()


# --------------------------------------------------------------------------- tree checksums
def snapshot(root: Path) -> dict[str, str]:
    """``{relative path: sha256 of the content, or 'dir'}`` of everything under ``root`` (symlinks not followed)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            found[os.path.relpath(os.path.join(dirpath, name), root)] = "dir"
        for name in filenames:
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, root)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return found


def outside(paths: set[str], allowed: tuple[str, ...]) -> list[str]:
    return sorted(p for p in paths if not any(p == a or p.startswith(a + os.sep) for a in allowed))


