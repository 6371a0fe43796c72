"""Bad input never does harm (issue 13): one table of bad and tricky inputs, each run as a user would
(``hb run`` / ``hb compare`` through ``cli.main``, or the library call a notebook makes), with

* the exit code,
* a message that names the parameter or file and the fix,
* a checksum of the whole tree before and after (the output root, a decoy folder of user files next to
  it, a fake $HOME, the data and parameter files): nothing outside the run directory is written, and
  nothing that existed is changed or moved, except what ``--overwrite`` documents.

Speed: the notebooks are replaced by :func:`fake_stage`, which makes the same library calls that write
(claim, load/clean/split, stamps, the eval-metrics rotation) without a kernel or a model, so the table
runs in seconds; a few cases load a tokenizer and a model's config (no weights). What needs a kernel, a
real signal or a trained adapter is in the ``slow`` tests at the end (papermill's real ``-p``, Ctrl-C,
04 run directly on a finished run).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import nbformat
import pytest

from hb_utils import cli, run_dir
from hb_utils.config import ExperimentConfig, load_config
from hb_utils.data import eda, medquad
from hb_utils.errors import ConfigError, HBError
from hb_utils.evaluate import reruns
from hb_utils.model import loading
from hb_utils.model.source import model_cache_root
from hb_utils.runs import runner
from hb_utils.runs.notebook import config_from_namespace
from tests.conftest import ROOT, SMOKE, as_flags, write_release
from tests.conftest import hb as hb_process
from tests.test_runner import fixture_notebook

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
    w.write("params/base.yaml", "\n".join(f"{k}: {json.dumps(v)}" for k, v in
                                          {**BASE, "dataset": str(w.data / "release"), "output_root": str(w.out)}.items()))
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


@pytest.fixture
def world(tmp_path, monkeypatch) -> World:
    """A fresh world, $HOME pointed into it (caches pinned where they were, so nothing else lands there)."""
    caches = {"HB_CACHE_DIR": str(model_cache_root()), "HF_HOME": os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface"),
              "MPLCONFIGDIR": os.environ.get("MPLCONFIGDIR") or str(Path.home() / ".config" / "matplotlib")}
    w = make_world(tmp_path)
    for key, value in caches.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HOME", str(w.home))
    monkeypatch.setenv("HB_HEADLESS", "1")
    monkeypatch.setattr(runner, "execute_stage", fake_stage(w))
    return w


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


# --------------------------------------------------------------------------- the table
@dataclass
class Case:
    """One bad (or tricky) input. ``act`` runs it and returns (exit status, output); ``says``: regexes the
    output must match (the parameter or file, and the fix); ``may_change``: the world-relative folders
    that may gain, change or lose files (default none: the world stays exactly as it was)."""

    id: str
    act: Callable[[World], tuple[int, str]]
    code: int
    says: tuple[str, ...]
    setup: Callable[[World], object] | None = None
    may_change: Callable[[World], tuple[str, ...]] | tuple[str, ...] = ()
    check: Callable[[World], object] | None = None
    item: str = "behaves"  # the issue item it covers, or "behaves" (already behaved before issue 13)
    files: dict[str, str] = field(default_factory=dict)  # world-relative files written before the snapshot


def p(*pairs: str | Path) -> list[str]:
    """-p flags from NAME VALUE pairs."""
    return [x for i in range(0, len(pairs), 2) for x in ("-p", str(pairs[i]), str(pairs[i + 1]))]


RUN = ("outputs/smoke",)


def fixed_clock(monkeypatch_target: object, when: datetime) -> Callable[[], None]:
    class Fixed(datetime):
        @classmethod
        def now(cls, tz=None):  # noqa: ANN001, ANN206 - datetime's signature
            return when

    monkeypatch_target.datetime = Fixed  # type: ignore[attr-defined]
    return lambda: setattr(monkeypatch_target, "datetime", datetime)


WHEN = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
REPLACED = "smoke.replaced-20300102T030405Z"


def overwrite_with_name_taken(w: World) -> tuple[int, str]:
    restore = fixed_clock(run_dir, WHEN)
    try:
        return run_base(w, *p("sample_size", 15), "--overwrite")
    finally:
        restore()


def setup_taken_name(w: World) -> None:
    finished(w)
    taken = w.out / REPLACED
    taken.mkdir()
    (taken / run_dir.MARKER).write_text("{}")
    (taken / "older.txt").write_text("an older replaced run")


def check_overwrite_moved(w: World) -> None:
    moved = w.out / f"{REPLACED}-2"
    assert json.loads((moved / "config.json").read_text())["config"]["sample_size"] == 20
    assert (w.out / REPLACED / "older.txt").read_text() == "an older replaced run"
    assert json.loads((w.run() / "config.json").read_text())["config"]["sample_size"] == 15


def check_eval_rerun(w: World) -> None:
    conf = json.loads((w.run() / "config.json").read_text())
    old, new = w.cfg(), w.cfg(eval_size="all")
    assert conf["config"]["eval_size"] == "all" and conf["fingerprints"] == new.fingerprints()
    assert w.calls == ["04_evaluate"]  # no retraining, 01-03 kept
    prev = w.run() / "metrics" / "previous" / old.fingerprint("eval")
    assert json.loads((prev / "eval.json").read_text())["stamp"]["params"]["eval_size"] == 8
    assert (prev / "qualitative.jsonl").is_file() and (prev / "04_evaluate.ipynb").is_file()
    assert json.loads((w.run() / "metrics" / "eval.json").read_text())["stamp"]["params"]["eval_size"] == "all"
    assert conf["stages"]["05_qualitative"]["status"] == "stale" and conf["stages"]["03_train_qlora"]["status"] == "done"
    assert conf["eval_history"][-1]["changed"] == ["eval_size: 8 -> 'all'"]


def check_direct_04(w: World) -> None:
    conf = json.loads((w.run() / "config.json").read_text())
    assert conf["config"]["eval_size"] == 3 and conf["stages"]["05_qualitative"]["status"] == "stale"
    prev = w.run() / "metrics" / "previous" / w.cfg().fingerprint("eval")
    assert (prev / "eval.json").is_file() and (prev / "predictions.jsonl").is_file()
    assert not (w.run() / "metrics" / "eval.json").exists()  # the caller (04) writes its own next


def interrupt_in_03(w: World) -> tuple[int, str]:
    real = runner.execute_stage

    def stage(name: str, cfg: ExperimentConfig, reports: Path, kernel: str = "python3") -> runner.StageResult:
        if name == "03_train_qlora":
            ckpt = run_dir.RunPaths.for_config(cfg).checkpoints / "checkpoint-2"
            ckpt.mkdir(parents=True)
            (ckpt / "trainer_state.json").write_text("{}")
            raise KeyboardInterrupt
        return real(name, cfg, reports, kernel)

    runner.execute_stage = stage
    try:
        return run_base(w)
    finally:
        runner.execute_stage = real


def check_interrupted(w: World) -> None:
    stage = json.loads((w.run() / "config.json").read_text())["stages"]["03_train_qlora"]
    assert stage["status"] == "interrupted" and stage["last_checkpoint"].endswith("checkpoint-2")


ANSWERS_CSV = {"data/qa.csv": "question,answer\n" + "".join(
    f"What is condition {i} about?,Answer words here for item {i} long enough.\n" for i in range(12))
    + "What is placeholder one?,NaN\nWhat is placeholder two?,None\nWhat is placeholder three?,null\n"}


def root_case(w: World) -> tuple[int, str]:
    name = f"hb13-{uuid.uuid4().hex[:8]}"
    try:
        return run_base(w, *p("output_root", "/", "experiment", name))
    finally:
        assert not Path("/", name).exists(), "wrote at the filesystem root"


def adapter_with(w: World, **changes: object) -> Path:
    other = w.cfg(**changes)
    adapter = w.root / "foreign_adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    loading.write_adapter_meta(other, adapter)
    return adapter


def tokenizer_check(w: World, cfg: ExperimentConfig, questions: list[str]) -> tuple[int, str]:
    from hb_utils.model.source import load_tokenizer

    return call(lambda: loading.check_prompt_fits(cfg, load_tokenizer(cfg.model_name), questions))


def compare_run(w: World, name: str, **eval_changes: object) -> Path:
    """A finished run as `hb compare` reads it; ``eval_changes``: eval.json made by other eval parameters."""
    cfg = w.cfg(experiment=name)
    root = w.out / name
    (root / "metrics").mkdir(parents=True)
    run_dir.write_json(root / "config.json", {"config": cfg.to_dict(), "fingerprints": cfg.fingerprints()})
    run_dir.write_json(root / "metrics" / "train.json", {"stamp": run_dir.stamp(cfg, "train", "t")})
    run_dir.write_json(root / "metrics" / "eval.json", {"stamp": run_dir.stamp(cfg.replace(**eval_changes), "eval", "t"),
                                                        "generation": {}, "perplexity": {}})
    return root


LONG_PROMPT = " ".join(["Always answer with great care and cite the relevant guideline."] * 6)

CASES = [
    # ---- item 1: output_root and the run directory
    Case("output_root-is-filesystem-root", root_case, 2, (r"output_root '/' is the filesystem root", r"-p output_root outputs"),
         item="1"),
    Case("output_root-dotdot-reaches-root", lambda w: run_base(w, *p("output_root", "../" * len(ROOT.parts))), 2,
         (r"output_root '(\.\./)+' is the filesystem root",), item="1"),
    Case("output_root-home-with-overwrite", lambda w: run_base(w, *p("output_root", "~", "experiment", "Documents"),
                                                              "--overwrite"), 2,
         (r"output_root '~' is your home directory", r"never written there"), item="1"),
    Case("output_root-parent-of-home", lambda w: run_base(w, *p("output_root", w.root)), 2,
         (r"a parent of your home directory",), item="1"),
    Case("output_root-is-a-file", lambda w: run_base(w, *p("output_root", w.decoy / "notes.txt")), 2,
         (r"output_root '.*notes.txt' is not a directory: .*notes.txt is a file",), item="1"),
    Case("output_root-under-a-file", lambda w: run_base(w, *p("output_root", w.decoy / "notes.txt" / "sub")), 2,
         (r"is not a directory: .*notes.txt is a file",), item="1"),
    Case("user-folder-refused-even-with-overwrite",
         lambda w: run_base(w, *p("output_root", w.decoy, "experiment", "photos"), "--overwrite"), 2,
         (r"decoy/photos exists and was not made by this kit", r"even with --overwrite", r"-p experiment"), item="1"),
    Case("user-folder-refused", lambda w: run_base(w, *p("output_root", w.decoy, "experiment", "photos")), 2,
         (r"was not made by this kit",), item="1"),
    Case("run-name-is-a-user-file", lambda w: run_base(w, *p("output_root", w.decoy, "experiment", "notes.txt")), 2,
         (r"notes.txt is a file, not a run directory", r"another experiment name"), item="1"),
    Case("overwrite-picks-a-free-name-and-reports-it", overwrite_with_name_taken, 0,
         (rf"moved the previous run aside: .*{re.escape(REPLACED)}-2\n",), setup=setup_taken_name,
         may_change=("outputs/smoke", f"outputs/{REPLACED}-2"), check=check_overwrite_moved, item="1"),
    Case("notebook-alone-claims-only-its-run-dir",
         lambda w: call(lambda: medquad.prepare_splits(w.cfg(output_root=str(w.decoy), experiment="photos"))), 2,
         (r"photos exists and was not made by this kit",), item="1"),
    Case("notebook-alone-writes-splits-into-a-marked-run-dir",
         lambda w: call(lambda: medquad.prepare_splits(w.cfg())), 0, (), may_change=RUN,
         check=lambda w: (w.run() / run_dir.MARKER).is_file() and (w.run() / "data" / "train.jsonl").is_file(), item="1"),
    Case("compare-out-is-home", lambda w: hb("compare", w.out / "a", w.out / "b", "--out", "~"), 2,
         (r"--out '~' is your home directory", r"--out outputs/compare"),
         setup=lambda w: (compare_run(w, "a"), compare_run(w, "b")), item="1"),
    Case("compare-out-is-a-user-folder", lambda w: hb("compare", w.out / "a", w.out / "b", "--out", w.decoy), 2,
         (r"decoy exists and was not made by this kit",), setup=lambda w: (compare_run(w, "a"), compare_run(w, "b")),
         item="1"),
    Case("compare-into-its-own-old-folder", lambda w: hb("compare", w.out / "a", w.out / "b", "--no-report", "--out",
                                                         w.out / "cmp"), 0, (r"markdown .*cmp/comparison.md",),
         setup=lambda w: (compare_run(w, "a"), compare_run(w, "b"), w.write("outputs/cmp/comparison.md", "old")),
         may_change=("outputs/cmp",), check=lambda w: (w.out / "cmp" / run_dir.MARKER).is_file(), item="1"),
    # ---- item 2: -p values read as papermill reads them
    Case("p-value-with-hash-kept", lambda w: run_base(w, *p("experiment", "lr_test #2"), "--only", "01"), 0, (),
         may_change=("outputs/lr_test #2",),
         check=lambda w: json.loads((w.out / "lr_test #2" / "config.json").read_text())["config"]["experiment"] == "lr_test #2",
         item="2"),
    Case("p-value-with-colon-hash-newline-kept",
         lambda w: run_base(w, *p("system_prompt", "Answer briefly. #1 rule: be kind.\nQ: what? A: this"), "--only", "01"),
         0, (), may_change=RUN, check=lambda w: json.loads((w.run() / "config.json").read_text())["config"][
             "system_prompt"] == "Answer briefly. #1 rule: be kind.\nQ: what? A: this", item="2"),
    Case("p-int-for-text-field-becomes-text", lambda w: run_base(w, *p("experiment", 2024), "--only", "01"), 0, (),
         may_change=("outputs/2024",), check=lambda w: (w.out / "2024" / "config.json").is_file(), item="2"),
    Case("p-text-papermill-would-renumber", lambda w: run_base(w, *p("experiment", "007")), 2,
         (r"-p experiment '007' reads as the number 7", r"-r experiment 007"), item="2"),
    Case("r-keeps-raw-text", lambda w: run_base(w, "-r", "experiment", "007", "--only", "01"), 0, (),
         may_change=("outputs/007",), check=lambda w: (w.out / "007" / "config.json").is_file(), item="2"),
    Case("p-float-for-text-field", lambda w: run_base(w, *p("experiment", "1.5")), 2,
         (r"experiment must be text, got 1.5 \(float\)", r"-r experiment VALUE"), item="2"),
    Case("y-yaml-mapping", lambda w: run_base(w, "-y", "prompts: ['What is #2?', 'a: b']", "--only", "01"), 0, (),
         may_change=RUN, check=lambda w: json.loads((w.run() / "config.json").read_text())["config"]["prompts"] == [
             "What is #2?", "a: b"], item="2"),
    Case("y-duplicate-key", lambda w: run_base(w, "-y", "{lora_r: 4, lora_r: 8}"), 2,
         (r"parameter 'lora_r' is given twice", r"Delete one"), item="2"),
    # ---- item 3: scope-aware reruns
    Case("eval-change-reruns-04-on-the-same-adapter",
         lambda w: run_base(w, *p("eval_size", "all"), "--only", "04"), 0,
         (r"evaluation parameters changed \(eval_size: 8 -> 'all'\): the adapter is reused",
          r"previous metrics kept in .*metrics/previous/"), setup=finished, may_change=RUN, check=check_eval_rerun,
         item="3"),
    Case("run-scope-change-continues", lambda w: run_base(w, *p("logging_steps", 5)), 0, (r"skipped",),
         setup=finished, may_change=RUN,
         check=lambda w: json.loads((w.run() / "config.json").read_text())["config"]["logging_steps"] == 5 and not w.calls,
         item="3"),
    Case("data-change-refused", lambda w: run_base(w, *p("sample_size", 15)), 2,
         (r"holds a run of a different config \(changed: sample_size: 20 -> 15\)", r"-p experiment smoke_2",
          r"--overwrite"), setup=finished, item="3"),
    Case("train-change-refused", lambda w: run_base(w, *p("lora_r", 16), "--only", "04"), 2,
         (r"changed: lora_r: 8 -> 16",), setup=finished, item="3"),
    Case("04-run-directly-keeps-old-metrics-aside",
         lambda w: call(lambda: reruns.record_eval_rerun(w.cfg(eval_size=3), "04_evaluate", made_by="04 directly")), 0,
         (r"\[04_evaluate\] eval parameters differ from config.json \(eval_size: 8 -> 3\)",
          r"kept in metrics/previous/", r"config.json now records this config"),
         setup=finished, may_change=RUN, check=check_direct_04, item="3"),
    # ---- item 4: errors before deep tracebacks
    Case("max-length-16", lambda w: run_base(w, *p("max_length", 16)), 2,
         (r"max_length=16 leaves no room for an answer", r"system_prompt", r"take \d+ tokens",
          r"Raise max_length above \d+"), item="4"),
    Case("system-prompt-longer-than-max-length", lambda w: run_base(w, *p("max_length", 64, "system_prompt", LONG_PROMPT)),
         2, (r"max_length=64 leaves no room", r"shorten system_prompt"), item="4"),
    Case("shortest-question-too-long", lambda w: tokenizer_check(w, w.cfg(max_length=70), ["What " * 40, "Why " * 30]),
         2, (r"max_length=70 .* the system_prompt and the shortest question in the chat template take \d+ tokens",),
         item="4"),
    Case("header-only-csv", lambda w: run_base(w, *p("dataset", w.data / "empty.csv"), "--only", "01"),
         1, (r"01_eda failed", r"DataError: The data source '.*empty.csv' has no rows", r"Point dataset at"),
         may_change=RUN, item="4", files={"data/empty.csv": "question,answer\n"}),
    # ---- item 5: lora_target_modules
    Case("lora-target-misspelt-next-to-a-good-one", lambda w: run_base(w, *p("lora_target_modules", "q_proj,bogus_proj")),
         2, (r"lora_target_modules: bogus_proj is not among the layers", r"q_proj, up_proj, v_proj"), item="5"),
    Case("lora-target-none-matches", lambda w: run_base(w, *p("lora_target_modules", "bogus")), 2,
         (r"lora_target_modules: bogus is not", r"e\.g\. -p lora_target_modules q_proj,k_proj"), item="5"),
    Case("lora-target-is-a-container", lambda w: run_base(w, *p("lora_target_modules", "mlp")), 2,
         (r"mlp \(a LlamaMLP, not a layer LoRA can adapt\)",), item="5"),
    # ---- item 6: Ctrl-C
    Case("ctrl-c-in-03", interrupt_in_03, 130,
         (r"interrupted during 03_train_qlora; last checkpoint .*checkpoint-2; rerun the same command to resume",),
         may_change=RUN, check=check_interrupted, item="6"),
    # ---- should-fix
    Case("duplicate-key-in-params-file", lambda w: hb("run", w.root / "params" / "dup.yaml"), 2,
         (r"dup.yaml': parameter 'lora_r' is given twice \(lines 1 and 3\)",), item="should",
         files={"params/dup.yaml": "lora_r: 4\nexperiment: x\nlora_r: 8\n"}),
    Case("nan-none-null-answers-counted",
         lambda w: run_base(w, *p("dataset", w.data / "qa.csv", "sample_size", 10), "--only", "02"), 0,
         (r"note: 3 answers were a literal NaN/None/null and count as missing",), may_change=RUN, files=ANSWERS_CSV,
         check=lambda w: {s["step"]: s["removed"] for s in json.loads((w.run() / "data" / "stats.json").read_text())[
             "funnel"]}["answer not NaN/None/null"] == 3, item="should"),
    Case("sample-size-larger-than-data", lambda w: run_base(w, *p("sample_size", 500), "--only", "02"), 0,
         (r"note: sample_size=500 but only \d+ pairs pass the filters",), may_change=RUN, item="should"),
    Case("blank-prompt", lambda w: run_base(w, "-y", "prompts: ['ok?', '  ']"), 2,
         (r"prompts holds 1 empty or blank prompt", r"positions \[1\]"), item="should"),
    Case("adapter-of-another-config-names-parameters",
         lambda w: call(lambda: loading.check_adapter(w.cfg(), adapter_with(w, lora_r=16))), 2,
         (r"another train config \(lora_r: 16 -> 8\)", r"retrain"), may_change=("foreign_adapter",), item="should"),
    Case("compare-missing-folder", lambda w: hb("compare", w.out / "nope", w.out / "nope2"), 2,
         (r"nope does not exist", r"hb run"), item="should"),
    Case("failed-first-attempt-does-not-block-the-name",
         lambda w: run_base(w), 0, (r"held an attempt of another config that finished no stage; this config takes it over",),
         setup=lambda w: run_base(w, *p("dataset", write_release(w.data / "bad").joinpath("1_FakeGov_QA"))),
         may_change=RUN, item="should"),
    # ---- inputs that already behaved: config validation
    Case("unknown-parameter-did-you-mean", lambda w: run_base(w, *p("lora_rr", 4)), 2,
         (r"Unknown parameter 'lora_rr'", r"Did you mean 'lora_r'")),
    Case("lora_r-zero", lambda w: run_base(w, *p("lora_r", 0)), 2, (r"lora_r must be >= 1",)),
    Case("lora_r-word", lambda w: run_base(w, *p("lora_r", "eight")), 2, (r"lora_r must be an integer, got 'eight'",)),
    Case("lora_r-fraction", lambda w: run_base(w, *p("lora_r", 2.5)), 2, (r"lora_r must be an integer",)),
    Case("learning_rate-word", lambda w: run_base(w, *p("learning_rate", "fast")), 2, (r"learning_rate must be a number",)),
    Case("learning_rate-zero", lambda w: run_base(w, *p("learning_rate", 0)), 2, (r"learning_rate must be > 0",)),
    Case("learning_rate-nan", lambda w: run_base(w, *p("learning_rate", "nan")), 2, (r"learning_rate must be a finite",)),
    Case("lora_dropout-one", lambda w: run_base(w, *p("lora_dropout", 1.0)), 2, (r"lora_dropout must be < 1",)),
    Case("fractions-do-not-sum", lambda w: run_base(w, *p("train_frac", 0.7)), 2, (r"must sum to 1",)),
    Case("nothing-to-train-on", lambda w: run_base(w, *p("train_frac", 0, "val_frac", 0.5, "test_frac", 0.5)), 2,
         (r"train_frac must be > 0",)),
    Case("split_by-choice", lambda w: run_base(w, *p("split_by", "doc")), 2, (r"split_by must be one of row, question, focus",)),
    Case("compute_dtype-choice", lambda w: run_base(w, *p("compute_dtype", "fp8")), 2, (r"compute_dtype must be one of",)),
    Case("report_to-choice", lambda w: run_base(w, *p("report_to", "wandb")), 2, (r"report_to must be one of none, tensorboard",)),
    Case("bool-yes", lambda w: run_base(w, *p("load_in_4bit", "yes")), 2, (r"load_in_4bit must be true or false",)),
    Case("eval_size-zero", lambda w: run_base(w, *p("eval_size", 0)), 2, (r"eval_size must be >= 1 or 'all'",)),
    Case("max_steps-below-minus-one", lambda w: run_base(w, *p("max_steps", -2)), 2, (r"max_steps must be >= -1",)),
    Case("sample_size-negative", lambda w: run_base(w, *p("sample_size", -5)), 2, (r"sample_size must be >= 1",)),
    Case("no-target-modules", lambda w: run_base(w, "-r", "lora_target_modules", ""), 2, (r"at least one module",)),
    Case("text-field-none", lambda w: run_base(w, *p("system_prompt", "None")), 2,
         (r"system_prompt must be text, got None", r"-r system_prompt")),
    Case("experiment-path-traversal", lambda w: run_base(w, *p("experiment", "../escape")), 2,
         (r"experiment must be a plain directory name",)),
    Case("experiment-hidden", lambda w: run_base(w, *p("experiment", ".hidden")), 2, (r"plain directory name",)),
    Case("experiment-with-slash", lambda w: run_base(w, *p("experiment", "a/b")), 2, (r"plain directory name",)),
    Case("experiment-empty", lambda w: run_base(w, "-r", "experiment", ""), 2, (r"plain directory name",)),
    Case("experiment-control-char", lambda w: run_base(w, *p("experiment", "a\nb")), 2, (r"control characters",)),
    Case("params-file-missing", lambda w: hb("run", w.root / "params" / "nope.yaml"), 2,
         (r"nope.yaml' does not exist", r"params/smoke.yaml")),
    Case("params-file-not-a-mapping", lambda w: hb("run", w.root / "params" / "list.yaml"), 2,
         (r"must be a flat mapping",), files={"params/list.yaml": "- a\n- b\n"}),
    Case("params-file-yaml-object-tag", lambda w: hb("run", w.root / "params" / "tag.yaml"), 2,
         (r"tag.yaml' is not valid YAML", r"could not determine a constructor"),
         files={"params/tag.yaml": "experiment: !!python/object/apply:os.system [echo hi]\n"}),
    Case("params-file-broken-yaml", lambda w: hb("run", w.root / "params" / "broken.yaml"), 2,
         (r"broken.yaml' is not valid YAML",), files={"params/broken.yaml": "lora_r: [4\n"}),
    Case("y-not-a-mapping", lambda w: run_base(w, "-y", "[a, b]"), 2, (r"-y '\[a, b\]' must be a flat mapping",)),
    Case("unknown-stage", lambda w: run_base(w, "--only", "09"), 2, (r"Unknown stage '09'",)),
    Case("from-and-only", lambda w: run_base(w, "--from", "03", "--only", "04"), 2, (r"not allowed with argument",)),
    # ---- already behaved: data
    Case("missing-data-path", lambda w: run_base(w, *p("dataset", w.data / "nope")), 2,
         (r"Data source '.*nope' does not exist", r"Set dataset to a MedQuAD XML release folder")),
    Case("corrupt-xml-named", lambda w: call(lambda: medquad.load_raw(str(w.data / "release"))), 2,
         (r"0000003.xml is not well-formed XML", r"Fix or remove the file"),
         setup=lambda w: (w.data / "release" / "2_FakeGard_QA" / "0000003.xml").write_text("<Document><QAPairs>")),
    Case("folder-without-xml", lambda w: call(lambda: medquad.load_raw(str(w.decoy))), 2,
         (r"decoy holds no \*/\*.xml files", r"Point `dataset` at the MedQuAD release folder")),
    Case("table-without-answer-column", lambda w: call(lambda: medquad.load_raw(str(w.data / "q.csv"))), 2,
         (r"q.csv has no answer column", r"needs 'question' and 'answer' columns"), files={"data/q.csv": "question\nWhat?\n"}),
    Case("unsupported-file-type", lambda w: call(lambda: medquad.load_raw(str(w.decoy / "notes.txt"))), 2,
         (r"Unsupported data file 'notes.txt'",)),
    Case("empty-after-filtering", lambda w: run_base(w, *p("min_answer_chars", 100000), "--only", "02"), 1,
         (r"Only 0 pairs are left after filtering", r"Loosen min_question_chars"), may_change=RUN),
    Case("splits-of-another-data-config",
         lambda w: call(lambda: medquad.prepare_splits(w.cfg(sample_size=15))), 2,
         (r"was made by another data config \(sample_size: 20 -> 15\)", r"new `experiment` name"),
         setup=lambda w: medquad.prepare_splits(w.cfg())),
    # ---- already behaved: models and adapters
    Case("model-dir-missing", lambda w: run_base(w, *p("model_name", w.root / "no_model")), 2,
         (r"model_name='.*no_model' looks like a local path", r"offline alias 'smollm2-135m-instruct'")),
    Case("adapter-missing", lambda w: call(lambda: loading.check_adapter(w.cfg(), w.root / "no_adapter")), 2,
         (r"No trained LoRA adapter at .*no_adapter", r"03_train_qlora")),
    Case("adapter-of-another-model", lambda w: call(lambda: loading.check_adapter(
        w.cfg(), adapter_with(w, model_name="TinyLlama/TinyLlama-1.1B-Chat-v1.0"))), 2,
         (r"trained on model_name='TinyLlama/TinyLlama-1.1B-Chat-v1.0'", r"Set model_name to"),
         may_change=("foreign_adapter",)),
    # ---- already behaved: compare
    Case("compare-one-run", lambda w: hb("compare", w.out / "a"), 2, (r"at least two run directories",),
         setup=lambda w: compare_run(w, "a")),
    Case("compare-folder-without-run", lambda w: hb("compare", w.decoy, w.decoy / "photos"), 2,
         (r"decoy has no config.json: run hb run",)),
    Case("compare-metrics-of-another-config", lambda w: hb("compare", w.out / "a", w.out / "b", "--no-report",
                                                           "--out", w.out / "cmp"), 2,
         (r"eval.json was made by another eval config \(eval_size: 3 -> 8\)", r"Rerun that stage"),
         setup=lambda w: (compare_run(w, "a", eval_size=3), compare_run(w, "b"))),
]


def test_the_table_covers_every_item_and_enough_inputs():
    items = {c.item for c in CASES}
    assert {"1", "2", "3", "4", "5", "6", "should"} <= items
    assert sum(c.item == "behaves" for c in CASES) >= 34 and len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world: World):
    for rel, text in case.files.items():
        world.write(rel, text)
    if case.setup:
        case.setup(world)
    before = snapshot(world.root)
    code, output = case.act(world)
    after = snapshot(world.root)
    assert code == case.code, output
    for pattern in case.says:
        assert re.search(pattern, output), f"{pattern!r} not in:\n{output}"
    allowed = case.may_change(world) if callable(case.may_change) else case.may_change
    changed = {path for path, digest in before.items() if after.get(path) != digest}
    added = set(after) - set(before)
    assert not outside(changed, allowed), f"changed or moved outside {allowed}: {outside(changed, allowed)}"
    assert not outside(added, allowed), f"written outside {allowed}: {outside(added, allowed)}"
    if case.check:
        assert case.check(world) is not False


# --------------------------------------------------------------------------- item 2: hb run -p == papermill -p
TRICKY = [
    ("experiment", "lr_test #2"), ("system_prompt", "Answer briefly. #1 rule: be kind."),
    ("system_prompt", "Q: what? A: this"), ("system_prompt", "line one\nline two"), ("experiment", "2024"),
    ("experiment", "yes"), ("dataset_split", "no"), ("lr_scheduler", "null"), ("learning_rate", "2e-4"),
    ("num_epochs", "2"), ("lora_r", "16"), ("load_in_4bit", "False"), ("eval_size", "all"),
    ("lora_target_modules", "[q_proj, v_proj]"), ("lora_target_modules", "q_proj,v_proj"),
    ("prompts", '["What is #2?", "a: b"]'), ("prompts", "Hi, what is a fever?"),
]
REFUSED = [("experiment", "1.5"), ("system_prompt", "None"), ("strip_html", "yes"), ("lora_r", "2.5")]


def papermill_config(tmp_path: Path, flags: list[str]) -> dict:
    """The config a notebook builds from papermill's own CLI: ``papermill --prepare-only IN OUT FLAGS`` parses
    and injects the parameters exactly as a run does; the parameters cells are then executed in order, as the
    kernel would, and the notebook's :func:`config_from_namespace` reads them (with the kernel's ``In``)."""
    from click.testing import CliRunner
    from papermill.cli import papermill as papermill_cli

    src, out = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    fixture_notebook(src, "pass")
    result = CliRunner().invoke(papermill_cli, [str(src), str(out), "--prepare-only", *flags], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    nb = nbformat.read(out, as_version=4)
    cells = [c.source for c in nb.cells if {"parameters", "injected-parameters"} & set(c.metadata.get("tags", []))]
    assert len(cells) == 2
    namespace: dict = {"In": ["", *cells]}
    for source in cells:
        exec(source, namespace)  # noqa: S102 - the notebook's own parameters cells
    return config_from_namespace(namespace).to_dict()


@pytest.mark.parametrize(("name", "value"), TRICKY, ids=[f"{n}={v!r}" for n, v in TRICKY])
def test_hb_run_and_papermill_read_p_alike(tmp_path, name, value):
    hb_cfg = load_config(**cli.parse_overrides([(name, value)])).to_dict()
    assert hb_cfg == papermill_config(tmp_path, ["-p", name, value])
    text_fields = ("experiment", "system_prompt", "dataset_split", "lr_scheduler")
    if name in text_fields:
        assert hb_cfg[name] == value  # faithful: the text as typed


@pytest.mark.parametrize(("name", "value"), REFUSED, ids=[f"{n}={v!r}" for n, v in REFUSED])
def test_hb_run_and_papermill_refuse_alike(tmp_path, name, value):
    with pytest.raises(ConfigError, match=name):
        load_config(**cli.parse_overrides([(name, value)]))
    with pytest.raises(ConfigError, match=name):
        papermill_config(tmp_path, ["-p", name, value])


@pytest.mark.parametrize("text", ["prompts: [a, 'b: c']", "dataset_split: 2024-01-01", "{experiment: 'x #1', lora_r: 4}"])
def test_hb_run_and_papermill_read_y_alike(tmp_path, text):
    assert load_config(**cli.parse_overrides(yamls=[text])).to_dict() == papermill_config(tmp_path, ["-y", text])


# --------------------------------------------------------------------------- slow: real kernels, real signals
@pytest.mark.slow
def test_papermill_kernel_and_hb_run_give_the_same_config(tmp_path):
    """The real path end to end: papermill executes a notebook (a kernel) that dumps its config."""
    values = [("experiment", "lr_test #2"), ("system_prompt", "Answer briefly. #1 rule: be kind.\nQ: what? A: this"),
              ("dataset_split", "2024"), ("lr_scheduler", "yes"), ("learning_rate", "2e-4"),
              ("lora_target_modules", "[q_proj, v_proj]"), ("prompts", '["What is #2?", "a: b"]')]
    dump = tmp_path / "cfg.json"
    fixture_notebook(tmp_path / "dump.ipynb", f"import json\nopen({str(dump)!r}, 'w').write(json.dumps(cfg.to_dict()))")
    flags = [x for n, v in values for x in ("-p", n, v)]
    proc = subprocess.run([sys.executable, "-m", "papermill", str(tmp_path / "dump.ipynb"), str(tmp_path / "o.ipynb"),
                           *flags], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(dump.read_text()) == load_config(**cli.parse_overrides(values)).to_dict()


DRIVER = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's Ctrl-C, even when started in the background
sys.path.insert(0, {root!r})
from pathlib import Path
from hb_utils import cli
from hb_utils.runs import runner
from tests.test_runner import fixture_notebook
nbs = Path({nbs!r}); nbs.mkdir()
fixture_notebook(nbs / "01_a.ipynb", "print('a')")
fixture_notebook(nbs / "02_b.ipynb", "import time\\nprint('sleeping', flush=True)\\ntime.sleep(120)")
runner.STAGES = ["01_a", "02_b"]
runner.notebook_path = lambda s: nbs / f"{{s}}.ipynb"
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_ctrl_c_prints_one_line_and_marks_the_stage(tmp_path):
    """SIGINT to the process group of `hb run` (what Ctrl-C in a terminal sends) while a notebook runs."""
    import time

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT), nbs=str(tmp_path / "nbs")))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(driver), "run", str(ROOT / "params" / "smoke.yaml"), "-p", "output_root",
                             str(out), "-p", "dataset", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, "HB_HEADLESS": "1"})
    conf = out / "smoke" / "config.json"
    deadline = time.time() + 300
    while time.time() < deadline and not (conf.is_file() and "02_b" in json.loads(conf.read_text())["stages"]):
        time.sleep(0.5)
    time.sleep(5)  # the kernel of 02_b is busy in its cell
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    assert stderr.strip().splitlines() == ["interrupted during 02_b; rerun the same command to resume."], stderr
    assert "Traceback" not in stdout + stderr
    assert json.loads(conf.read_text())["stages"]["02_b"]["status"] == "interrupted"


@pytest.fixture(scope="module")
def evaluable_run(tmp_path_factory) -> tuple[Path, dict]:
    """A run whose stages 01-03 are done, with a real (untrained: LoRA B = 0) adapter of the offline SmolLM2
    and metrics of its config from an earlier 04/05 (stamped stand-ins): enough for real 04 runs, without the
    minutes of training."""
    from peft import get_peft_model

    from hb_utils.model.source import load_tokenizer

    root = tmp_path_factory.mktemp("evaluable")
    params = {**BASE, "dataset": str(write_release(root / "release", n_docs=30)), "output_root": str(root / "outputs"),
              "sample_size": 40, "eval_size": 2, "ppl_size": 2, "eval_max_new_tokens": 8, "gen_batch_size": 2,
              "bootstrap_samples": 20}
    cfg = load_config(SMOKE, **params)  # the file and flags `hb run` gets below
    world = World(root)
    state = runner.open_run(cfg)
    for stage in ("01_eda", "02_format_split", "04_evaluate", "05_qualitative"):
        fake_stage(world)(stage, cfg, run_dir.RunPaths.for_config(cfg).reports)
    paths = run_dir.RunPaths.for_config(cfg)
    model = get_peft_model(loading.load_base_model(cfg, for_training=True), loading.lora_config(cfg))
    model.save_pretrained(paths.adapter)
    load_tokenizer(cfg.model_name).save_pretrained(paths.adapter)
    loading.write_adapter_meta(cfg, paths.adapter)
    run_dir.write_json(paths.metrics / "train.json", {"stamp": run_dir.stamp(cfg, "train", "test")})
    for stage in runner.STAGES:
        state.set_stage(stage, {"status": "done"})
    return root, params


@pytest.mark.slow
def test_eval_reruns_on_a_finished_run_keep_the_recorded_metrics(evaluable_run):
    """Issue 13, item 3, with real kernels: `hb run -p eval_size 3 --only 04` on a finished run reruns 04 on the
    same adapter (03's files untouched) and keeps the previous metrics and report aside. (04 run directly with
    papermill and other eval parameters: tests/test_eval_notebooks.py::test_04_runs_alone_from_notebooks_dir.)"""
    root, params = evaluable_run
    first = load_config(SMOKE, **params)
    run = run_dir.RunPaths.for_config(first)
    adapter_before, train_before = snapshot(run.adapter), (run.metrics / "train.json").read_bytes()
    proc = hb_process("run", str(SMOKE), *as_flags({**params, "eval_size": 3}), "--only", "04")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "evaluation parameters changed (eval_size: 2 -> 3): the adapter is reused and 04/05 rerun" in proc.stdout
    assert snapshot(run.adapter) == adapter_before and (run.metrics / "train.json").read_bytes() == train_before
    kept = run.metrics / "previous" / first.fingerprint("eval")
    assert json.loads((kept / "eval.json").read_text())["stamp"]["params"]["eval_size"] == 2
    assert (kept / "04_evaluate.ipynb").is_file() and (kept / "qualitative.jsonl").is_file()
    conf = json.loads(run.config_json.read_text())
    assert conf["config"]["eval_size"] == 3 and conf["stages"]["04_evaluate"]["status"] == "done"
    assert conf["stages"]["05_qualitative"]["status"] == "stale"
    assert json.loads((run.metrics / "eval.json").read_text())["settings"]["eval_examples"] == 3
