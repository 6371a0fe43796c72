"""Bad input never does harm: one table of bad and tricky inputs, each run as a user would
(``hb run`` / ``hb compare`` through ``cli.main``, or the library call a notebook makes), with

* the exit code,
* a message that names the parameter or file and the fix,
* a checksum of the whole tree before and after (the output root, a decoy folder of user files next to
  it, a fake $HOME, the data and parameter files): nothing outside the run directory is written, and
  nothing that existed is changed or moved, except what ``--overwrite`` documents.

Speed: the notebooks are replaced by :func:`fake_stage`, which makes the same library calls that write
(claim, load/clean/split, stamps, the eval-metrics rotation) without a kernel or a model, so the table
runs in seconds; a few cases load a tokenizer and a model's config (no weights). What needs a kernel, a
real signal or a trained adapter is in slow tests elsewhere (tests/test_cli.py: papermill's real ``-p``;
tests/runs/test_interrupt.py: Ctrl-C; tests/evaluate/test_reruns.py: 04 on a finished run)."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from hb_utils import run_dir
from hb_utils.config import ExperimentConfig
from hb_utils.data import medquad
from hb_utils.evaluate import reruns
from hb_utils.model import loading
from hb_utils.runs import runner
from tests.conftest import ROOT, write_release
from tests.runs.world import World, call, finished, hb, outside, run_base, snapshot


# --------------------------------------------------------------------------- the table
@dataclass
class Case:
    """One bad (or tricky) input. ``act`` runs it and returns (exit status, output); ``says``: regexes the
    output must match (the parameter or file, and the fix); ``may_change``: the world-relative folders
    that may gain, change or lose files (default none: the world stays exactly as it was); ``concern``:
    the part of the kit the input tests (one of :data:`CONCERNS`)."""

    id: str
    act: Callable[[World], tuple[int, str]]
    code: int
    says: tuple[str, ...]
    setup: Callable[[World], object] | None = None
    may_change: Callable[[World], tuple[str, ...]] | tuple[str, ...] = ()
    check: Callable[[World], object] | None = None
    files: dict[str, str] = field(default_factory=dict)  # world-relative files written before the snapshot
    concern: str = field(kw_only=True)  # what the input puts at risk: one of CONCERNS


# What a bad input can put at risk; every one has cases in the table.
CONCERNS = ("output-root", "overwrite", "compare", "params", "config", "rerun", "max-length", "interrupt", "model",
            "data")


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
    assert conf["stages"]["05_qualitative"]["status"] == "stale"
    assert conf["stages"]["03_train_qlora"]["status"] == "done"
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
    name = f"hb-root-{uuid.uuid4().hex[:8]}"
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
    eval_stamp = run_dir.stamp(cfg.replace(**eval_changes), "eval", "t")
    run_dir.write_json(root / "metrics" / "eval.json", {"stamp": eval_stamp, "generation": {}, "perplexity": {}})
    return root


LONG_PROMPT = " ".join(["Always answer with great care and cite the relevant guideline."] * 6)

CASES = [
    # ---- output_root, the run directory and --overwrite
    Case("output_root-is-filesystem-root", root_case, 2,
         (r"output_root '/' is the filesystem root", r"-p output_root outputs"), concern="output-root"),
    Case("output_root-dotdot-reaches-root", lambda w: run_base(w, *p("output_root", "../" * len(ROOT.parts))), 2,
         (r"output_root '(\.\./)+' is the filesystem root",), concern="output-root"),
    Case("output_root-home-with-overwrite", lambda w: run_base(w, *p("output_root", "~", "experiment", "Documents"),
                                                              "--overwrite"), 2,
         (r"output_root '~' is your home directory", r"never written there"), concern="overwrite"),
    Case("output_root-parent-of-home", lambda w: run_base(w, *p("output_root", w.root)), 2,
         (r"a parent of your home directory",), concern="output-root"),
    Case("output_root-is-a-file", lambda w: run_base(w, *p("output_root", w.decoy / "notes.txt")), 2,
         (r"output_root '.*notes.txt' is not a directory: .*notes.txt is a file",), concern="output-root"),
    Case("output_root-under-a-file", lambda w: run_base(w, *p("output_root", w.decoy / "notes.txt" / "sub")), 2,
         (r"is not a directory: .*notes.txt is a file",), concern="output-root"),
    Case("user-folder-refused-even-with-overwrite",
         lambda w: run_base(w, *p("output_root", w.decoy, "experiment", "photos"), "--overwrite"), 2,
         (r"decoy/photos exists and was not made by this kit", r"even with --overwrite", r"-p experiment"),
         concern="overwrite"),
    Case("user-folder-refused", lambda w: run_base(w, *p("output_root", w.decoy, "experiment", "photos")), 2,
         (r"was not made by this kit",), concern="output-root"),
    Case("run-name-is-a-user-file", lambda w: run_base(w, *p("output_root", w.decoy, "experiment", "notes.txt")), 2,
         (r"notes.txt is a file, not a run directory", r"another experiment name"), concern="output-root"),
    Case("overwrite-picks-a-free-name-and-reports-it", overwrite_with_name_taken, 0,
         (rf"moved the previous run aside: .*{re.escape(REPLACED)}-2\n",), setup=setup_taken_name,
         may_change=("outputs/smoke", f"outputs/{REPLACED}-2"), check=check_overwrite_moved, concern="overwrite"),
    Case("notebook-alone-claims-only-its-run-dir",
         lambda w: call(lambda: medquad.prepare_splits(w.cfg(output_root=str(w.decoy), experiment="photos"))), 2,
         (r"photos exists and was not made by this kit",), concern="output-root"),
    Case("notebook-alone-writes-splits-into-a-marked-run-dir",
         lambda w: call(lambda: medquad.prepare_splits(w.cfg())), 0, (), may_change=RUN,
         check=lambda w: (w.run() / run_dir.MARKER).is_file() and (w.run() / "data" / "train.jsonl").is_file(),
         concern="output-root"),
    Case("compare-out-is-home", lambda w: hb("compare", w.out / "a", w.out / "b", "--out", "~"), 2,
         (r"--out '~' is your home directory", r"--out outputs/compare"),
         setup=lambda w: (compare_run(w, "a"), compare_run(w, "b")), concern="compare"),
    Case("compare-out-is-a-user-folder", lambda w: hb("compare", w.out / "a", w.out / "b", "--out", w.decoy), 2,
         (r"decoy exists and was not made by this kit",), setup=lambda w: (compare_run(w, "a"), compare_run(w, "b")),
         concern="compare"),
    Case("compare-into-its-own-old-folder", lambda w: hb("compare", w.out / "a", w.out / "b", "--no-report", "--out",
                                                         w.out / "cmp"), 0, (r"markdown .*cmp/comparison.md",),
         setup=lambda w: (compare_run(w, "a"), compare_run(w, "b"), w.write("outputs/cmp/comparison.md", "old")),
         may_change=("outputs/cmp",), check=lambda w: (w.out / "cmp" / run_dir.MARKER).is_file(), concern="compare"),
    # ---- -p values read as papermill reads them
    Case("p-value-with-hash-kept", lambda w: run_base(w, *p("experiment", "lr_test #2"), "--only", "01"), 0, (),
         may_change=("outputs/lr_test #2",),
         check=lambda w: json.loads((w.out / "lr_test #2" / "config.json").read_text())["config"][
             "experiment"] == "lr_test #2",
         concern="params"),
    Case("p-value-with-colon-hash-newline-kept",
         lambda w: run_base(w, *p("system_prompt", "Answer briefly. #1 rule: be kind.\nQ: what? A: this"),
                            "--only", "01"),
         0, (), may_change=RUN, check=lambda w: json.loads((w.run() / "config.json").read_text())["config"][
             "system_prompt"] == "Answer briefly. #1 rule: be kind.\nQ: what? A: this", concern="params"),
    Case("p-int-for-text-field-becomes-text", lambda w: run_base(w, *p("experiment", 2024), "--only", "01"), 0, (),
         may_change=("outputs/2024",), check=lambda w: (w.out / "2024" / "config.json").is_file(), concern="params"),
    Case("p-text-papermill-would-renumber", lambda w: run_base(w, *p("experiment", "007")), 2,
         (r"-p experiment '007' reads as the number 7", r"-r experiment 007"), concern="params"),
    Case("r-keeps-raw-text", lambda w: run_base(w, "-r", "experiment", "007", "--only", "01"), 0, (),
         may_change=("outputs/007",), check=lambda w: (w.out / "007" / "config.json").is_file(), concern="params"),
    Case("p-float-for-text-field", lambda w: run_base(w, *p("experiment", "1.5")), 2,
         (r"experiment must be text, got 1.5 \(float\)", r"-r experiment VALUE"), concern="params"),
    Case("y-yaml-mapping", lambda w: run_base(w, "-y", "prompts: ['What is #2?', 'a: b']", "--only", "01"), 0, (),
         may_change=RUN, check=lambda w: json.loads((w.run() / "config.json").read_text())["config"]["prompts"] == [
             "What is #2?", "a: b"], concern="params"),
    Case("y-duplicate-key", lambda w: run_base(w, "-y", "{lora_r: 4, lora_r: 8}"), 2,
         (r"parameter 'lora_r' is given twice", r"Delete one"), concern="params"),
    # ---- scope-aware reruns
    Case("eval-change-reruns-04-on-the-same-adapter",
         lambda w: run_base(w, *p("eval_size", "all"), "--only", "04"), 0,
         (r"evaluation parameters changed \(eval_size: 8 -> 'all'\): the adapter is reused",
          r"previous metrics kept in .*metrics/previous/"), setup=finished, may_change=RUN, check=check_eval_rerun,
         concern="rerun"),
    Case("run-scope-change-continues", lambda w: run_base(w, *p("logging_steps", 5)), 0, (r"skipped",),
         setup=finished, may_change=RUN,
         check=lambda w: json.loads((w.run() / "config.json").read_text())["config"]["logging_steps"] == 5
         and not w.calls,
         concern="rerun"),
    Case("data-change-refused", lambda w: run_base(w, *p("sample_size", 15)), 2,
         (r"holds a run of a different config \(changed: sample_size: 20 -> 15\)", r"-p experiment smoke_2",
          r"--overwrite"), setup=finished, concern="rerun"),
    Case("train-change-refused", lambda w: run_base(w, *p("lora_r", 16), "--only", "04"), 2,
         (r"changed: lora_r: 8 -> 16",), setup=finished, concern="rerun"),
    Case("04-run-directly-keeps-old-metrics-aside",
         lambda w: call(lambda: reruns.record_eval_rerun(w.cfg(eval_size=3), "04_evaluate", made_by="04 directly")), 0,
         (r"\[04_evaluate\] eval parameters differ from config.json \(eval_size: 8 -> 3\)",
          r"kept in metrics/previous/", r"config.json now records this config"),
         setup=finished, may_change=RUN, check=check_direct_04, concern="rerun"),
    # ---- max_length and data errors named before deep tracebacks
    Case("max-length-16", lambda w: run_base(w, *p("max_length", 16)), 2,
         (r"max_length=16 leaves no room for an answer", r"system_prompt", r"take \d+ tokens",
          r"Raise max_length above \d+"), concern="max-length"),
    Case("system-prompt-longer-than-max-length",
         lambda w: run_base(w, *p("max_length", 64, "system_prompt", LONG_PROMPT)), 2,
         (r"max_length=64 leaves no room", r"shorten system_prompt"), concern="max-length"),
    Case("shortest-question-too-long", lambda w: tokenizer_check(w, w.cfg(max_length=70), ["What " * 40, "Why " * 30]),
         2, (r"max_length=70 .* the system_prompt and the shortest question in the chat template take \d+ tokens",),
         concern="max-length"),
    Case("header-only-csv", lambda w: run_base(w, *p("dataset", w.data / "empty.csv"), "--only", "01"),
         1, (r"01_eda failed", r"DataError: The data source '.*empty.csv' has no rows", r"Point dataset at"),
         may_change=RUN, concern="data", files={"data/empty.csv": "question,answer\n"}),
    # ---- lora_target_modules
    Case("lora-target-misspelt-next-to-a-good-one",
         lambda w: run_base(w, *p("lora_target_modules", "q_proj,bogus_proj")), 2,
         (r"lora_target_modules: bogus_proj is not among the layers", r"q_proj, up_proj, v_proj"), concern="model"),
    Case("lora-target-none-matches", lambda w: run_base(w, *p("lora_target_modules", "bogus")), 2,
         (r"lora_target_modules: bogus is not", r"e\.g\. -p lora_target_modules q_proj,k_proj"), concern="model"),
    Case("lora-target-is-a-container", lambda w: run_base(w, *p("lora_target_modules", "mlp")), 2,
         (r"mlp \(a LlamaMLP, not a layer LoRA can adapt\)",), concern="model"),
    # ---- Ctrl-C
    Case("ctrl-c-in-03", interrupt_in_03, 130,
         (r"interrupted during 03_train_qlora; last checkpoint .*checkpoint-2; rerun the same command to resume",),
         may_change=RUN, check=check_interrupted, concern="interrupt"),
    # ---- duplicate keys in a file, literal NaN answers, small data, blank prompts, foreign adapters, failed attempts
    Case("duplicate-key-in-params-file", lambda w: hb("run", w.root / "params" / "dup.yaml"), 2,
         (r"dup.yaml': parameter 'lora_r' is given twice \(lines 1 and 3\)",), concern="params",
         files={"params/dup.yaml": "lora_r: 4\nexperiment: x\nlora_r: 8\n"}),
    Case("nan-none-null-answers-counted",
         lambda w: run_base(w, *p("dataset", w.data / "qa.csv", "sample_size", 10), "--only", "02"), 0,
         (r"note: 3 answers were a literal NaN/None/null and count as missing",), may_change=RUN, files=ANSWERS_CSV,
         check=lambda w: {s["step"]: s["removed"] for s in json.loads((w.run() / "data" / "stats.json").read_text())[
             "funnel"]}["answer not NaN/None/null"] == 3, concern="data"),
    Case("sample-size-larger-than-data", lambda w: run_base(w, *p("sample_size", 500), "--only", "02"), 0,
         (r"note: sample_size=500 but only \d+ pairs pass the filters",), may_change=RUN, concern="data"),
    Case("blank-prompt", lambda w: run_base(w, "-y", "prompts: ['ok?', '  ']"), 2,
         (r"prompts holds 1 empty or blank prompt", r"positions \[1\]"), concern="config"),
    Case("adapter-of-another-config-names-parameters",
         lambda w: call(lambda: loading.check_adapter(w.cfg(), adapter_with(w, lora_r=16))), 2,
         (r"another train config \(lora_r: 16 -> 8\)", r"retrain"), may_change=("foreign_adapter",), concern="model"),
    Case("compare-missing-folder", lambda w: hb("compare", w.out / "nope", w.out / "nope2"), 2,
         (r"nope does not exist", r"hb run"), concern="compare"),
    Case("failed-first-attempt-does-not-block-the-name",
         lambda w: run_base(w), 0,
         (r"held an attempt of another config that finished no stage; this config takes it over",),
         setup=lambda w: run_base(w, *p("dataset", write_release(w.data / "bad").joinpath("1_FakeGov_QA"))),
         may_change=RUN, concern="rerun"),
    # ---- config validation and command-line flags
    Case("unknown-parameter-did-you-mean", lambda w: run_base(w, *p("lora_rr", 4)), 2,
         (r"Unknown parameter 'lora_rr'", r"Did you mean 'lora_r'"), concern="config"),
    Case("lora_r-zero", lambda w: run_base(w, *p("lora_r", 0)), 2, (r"lora_r must be >= 1",), concern="config"),
    Case("lora_r-word", lambda w: run_base(w, *p("lora_r", "eight")), 2, (r"lora_r must be an integer, got 'eight'",),
         concern="config"),
    Case("lora_r-fraction", lambda w: run_base(w, *p("lora_r", 2.5)), 2, (r"lora_r must be an integer",),
         concern="config"),
    Case("learning_rate-word", lambda w: run_base(w, *p("learning_rate", "fast")), 2,
         (r"learning_rate must be a number",), concern="config"),
    Case("learning_rate-zero", lambda w: run_base(w, *p("learning_rate", 0)), 2, (r"learning_rate must be > 0",),
         concern="config"),
    Case("learning_rate-nan", lambda w: run_base(w, *p("learning_rate", "nan")), 2,
         (r"learning_rate must be a finite",), concern="config"),
    Case("lora_dropout-one", lambda w: run_base(w, *p("lora_dropout", 1.0)), 2, (r"lora_dropout must be < 1",),
         concern="config"),
    Case("fractions-do-not-sum", lambda w: run_base(w, *p("train_frac", 0.7)), 2, (r"must sum to 1",),
         concern="config"),
    Case("nothing-to-train-on", lambda w: run_base(w, *p("train_frac", 0, "val_frac", 0.5, "test_frac", 0.5)), 2,
         (r"train_frac must be > 0",), concern="config"),
    Case("split_by-choice", lambda w: run_base(w, *p("split_by", "doc")), 2,
         (r"split_by must be one of row, question, focus",), concern="config"),
    Case("compute_dtype-choice", lambda w: run_base(w, *p("compute_dtype", "fp8")), 2,
         (r"compute_dtype must be one of",), concern="config"),
    Case("report_to-choice", lambda w: run_base(w, *p("report_to", "wandb")), 2,
         (r"report_to must be one of none, tensorboard",), concern="config"),
    Case("bool-yes", lambda w: run_base(w, *p("load_in_4bit", "yes")), 2, (r"load_in_4bit must be true or false",),
         concern="config"),
    Case("eval_size-zero", lambda w: run_base(w, *p("eval_size", 0)), 2, (r"eval_size must be >= 1 or 'all'",),
         concern="config"),
    Case("max_steps-below-minus-one", lambda w: run_base(w, *p("max_steps", -2)), 2, (r"max_steps must be >= -1",),
         concern="config"),
    Case("sample_size-negative", lambda w: run_base(w, *p("sample_size", -5)), 2, (r"sample_size must be >= 1",),
         concern="config"),
    Case("no-target-modules", lambda w: run_base(w, "-r", "lora_target_modules", ""), 2, (r"at least one module",),
         concern="config"),
    Case("text-field-none", lambda w: run_base(w, *p("system_prompt", "None")), 2,
         (r"system_prompt must be text, got None", r"-r system_prompt"), concern="config"),
    Case("experiment-path-traversal", lambda w: run_base(w, *p("experiment", "../escape")), 2,
         (r"experiment must be a plain directory name",), concern="config"),
    Case("experiment-hidden", lambda w: run_base(w, *p("experiment", ".hidden")), 2, (r"plain directory name",),
         concern="config"),
    Case("experiment-with-slash", lambda w: run_base(w, *p("experiment", "a/b")), 2, (r"plain directory name",),
         concern="config"),
    Case("experiment-empty", lambda w: run_base(w, "-r", "experiment", ""), 2, (r"plain directory name",),
         concern="config"),
    Case("experiment-control-char", lambda w: run_base(w, *p("experiment", "a\nb")), 2, (r"control characters",),
         concern="config"),
    Case("params-file-missing", lambda w: hb("run", w.root / "params" / "nope.yaml"), 2,
         (r"nope.yaml' does not exist", r"params/smoke.yaml"), concern="params"),
    Case("params-file-not-a-mapping", lambda w: hb("run", w.root / "params" / "list.yaml"), 2,
         (r"must be a flat mapping",), files={"params/list.yaml": "- a\n- b\n"}, concern="params"),
    Case("params-file-yaml-object-tag", lambda w: hb("run", w.root / "params" / "tag.yaml"), 2,
         (r"tag.yaml' is not valid YAML", r"could not determine a constructor"),
         files={"params/tag.yaml": "experiment: !!python/object/apply:os.system [echo hi]\n"}, concern="params"),
    Case("params-file-broken-yaml", lambda w: hb("run", w.root / "params" / "broken.yaml"), 2,
         (r"broken.yaml' is not valid YAML",), files={"params/broken.yaml": "lora_r: [4\n"}, concern="params"),
    Case("y-not-a-mapping", lambda w: run_base(w, "-y", "[a, b]"), 2, (r"-y '\[a, b\]' must be a flat mapping",),
         concern="params"),
    Case("unknown-stage", lambda w: run_base(w, "--only", "09"), 2, (r"Unknown stage '09'",), concern="params"),
    Case("from-and-only", lambda w: run_base(w, "--from", "03", "--only", "04"), 2, (r"not allowed with argument",),
         concern="params"),
    # ---- data
    Case("missing-data-path", lambda w: run_base(w, *p("dataset", w.data / "nope")), 2,
         (r"Data source '.*nope' does not exist", r"Set dataset to a MedQuAD XML release folder"), concern="data"),
    Case("corrupt-xml-named", lambda w: call(lambda: medquad.load_raw(str(w.data / "release"))), 2,
         (r"0000003.xml is not well-formed XML", r"Fix or remove the file"),
         setup=lambda w: (w.data / "release" / "2_FakeGard_QA" / "0000003.xml").write_text("<Document><QAPairs>"),
         concern="data"),
    Case("folder-without-xml", lambda w: call(lambda: medquad.load_raw(str(w.decoy))), 2,
         (r"decoy holds no \*/\*.xml files", r"Point `dataset` at the MedQuAD release folder"), concern="data"),
    Case("table-without-answer-column", lambda w: call(lambda: medquad.load_raw(str(w.data / "q.csv"))), 2,
         (r"q.csv has no answer column", r"needs 'question' and 'answer' columns"),
         files={"data/q.csv": "question\nWhat?\n"}, concern="data"),
    Case("unsupported-file-type", lambda w: call(lambda: medquad.load_raw(str(w.decoy / "notes.txt"))), 2,
         (r"Unsupported data file 'notes.txt'",), concern="data"),
    Case("empty-after-filtering", lambda w: run_base(w, *p("min_answer_chars", 100000), "--only", "02"), 1,
         (r"Only 0 pairs are left after filtering", r"Loosen min_question_chars"), may_change=RUN, concern="data"),
    Case("splits-of-another-data-config",
         lambda w: call(lambda: medquad.prepare_splits(w.cfg(sample_size=15))), 2,
         (r"was made by another data config \(sample_size: 20 -> 15\)", r"new `experiment` name"),
         setup=lambda w: medquad.prepare_splits(w.cfg()), concern="data"),
    # ---- models and adapters
    Case("model-dir-missing", lambda w: run_base(w, *p("model_name", w.root / "no_model")), 2,
         (r"model_name='.*no_model' looks like a local path", r"offline alias 'smollm2-135m-instruct'"),
         concern="model"),
    Case("adapter-missing", lambda w: call(lambda: loading.check_adapter(w.cfg(), w.root / "no_adapter")), 2,
         (r"No trained LoRA adapter at .*no_adapter", r"03_train_qlora"), concern="model"),
    Case("adapter-of-another-model", lambda w: call(lambda: loading.check_adapter(
        w.cfg(), adapter_with(w, model_name="TinyLlama/TinyLlama-1.1B-Chat-v1.0"))), 2,
         (r"trained on model_name='TinyLlama/TinyLlama-1.1B-Chat-v1.0'", r"Set model_name to"),
         may_change=("foreign_adapter",), concern="model"),
    # ---- compare
    Case("compare-one-run", lambda w: hb("compare", w.out / "a"), 2, (r"at least two run directories",),
         setup=lambda w: compare_run(w, "a"), concern="compare"),
    Case("compare-folder-without-run", lambda w: hb("compare", w.decoy, w.decoy / "photos"), 2,
         (r"decoy has no config.json: run hb run",), concern="compare"),
    Case("compare-metrics-of-another-config", lambda w: hb("compare", w.out / "a", w.out / "b", "--no-report",
                                                           "--out", w.out / "cmp"), 2,
         (r"eval.json was made by another eval config \(eval_size: 3 -> 8\)", r"Rerun that stage"),
         setup=lambda w: (compare_run(w, "a", eval_size=3), compare_run(w, "b")), concern="compare"),
]


def test_the_table_covers_every_concern_and_enough_inputs():
    assert {c.concern for c in CASES} == set(CONCERNS)
    assert sum(c.concern == "config" for c in CASES) >= 20 and len(CASES) >= 40
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


