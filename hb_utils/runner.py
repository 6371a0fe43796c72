"""Run an experiment: notebooks 01→05 executed with papermill into ``outputs/<experiment>/reports/``.

Why a runner and not a shell loop over papermill: the config is validated once, before any notebook
starts, and the *same* resolved parameters go to every notebook; the run directory records which
config made it (``config.json``) so a second experiment never mixes into the first; finished stages
are remembered, so rerunning an interrupted run continues where it stopped (training itself resumes
from its newest checkpoint); each executed notebook is also rendered as a self-contained HTML report.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hb_utils import device, run_dir
from hb_utils.config import ExperimentConfig
from hb_utils.errors import RunError

STAGES = ["01_eda", "02_format_split", "03_train_qlora", "04_evaluate", "05_qualitative"]


def notebook_path(stage: str) -> Path:
    return run_dir.repo_root() / "notebooks" / f"{stage}.ipynb"


def select_stages(start: str | None = None, only: str | None = None) -> list[str]:
    """Stages to run: all, from ``start`` on (``--from 03``), or just ``only`` (``--only 04``)."""
    def find(prefix: str) -> int:
        hits = [i for i, s in enumerate(STAGES) if s == prefix or s.startswith(prefix.zfill(2))]
        if len(hits) != 1:
            raise RunError(f"Unknown stage {prefix!r}: use one of {', '.join(s[:2] for s in STAGES)} ({', '.join(STAGES)}).")
        return hits[0]

    if start and only:
        raise RunError("Use either --from or --only, not both.")
    if only:
        return [STAGES[find(only)]]
    return STAGES[find(start):] if start else list(STAGES)


# --------------------------------------------------------------------------- run directory
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


def open_run(cfg: ExperimentConfig, *, overwrite: bool = False) -> RunState:
    """Claim the run directory for ``cfg``: refuse one that holds another config's run.

    With ``overwrite`` the old directory is moved aside (``<experiment>.replaced-<time>``), never deleted.
    """
    run = run_dir.RunPaths.for_config(cfg)
    if run.config_json.is_file():
        old = run_dir.read_json(run.config_json)
        if old.get("fingerprints", {}).get("eval") != cfg.fingerprint("eval"):
            if not overwrite:
                changed = sorted(k for k, v in cfg.to_dict().items()
                                 if k in old.get("config", {}) and old["config"][k] != v)
                raise RunError(
                    f"{run.root} holds a run of a different config (changed: {', '.join(changed) or 'unknown'}). "
                    f"Choose a new experiment name (-p experiment {cfg.experiment}_2) or pass --overwrite "
                    "(the old directory is kept aside, renamed).")
            _move_aside(run.root)
        else:
            return RunState(run.config_json, old)
    elif run.root.is_dir() and any(run.root.iterdir()):
        if not overwrite:
            raise RunError(f"{run.root} exists but has no config.json (not made by `hb run`?). "
                           "Choose a new experiment name or pass --overwrite (it is kept aside, renamed).")
        _move_aside(run.root)
    payload = {
        "experiment": cfg.experiment, "config": cfg.to_dict(), "fingerprints": cfg.fingerprints(),
        "git_commit": device.git_commit(), "machine": device.summary(), "created": run_dir.utc_now(), "stages": {},
    }
    state = RunState(run.config_json, payload)
    state.save()
    return state


def _move_aside(root: Path) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = root.with_name(f"{root.name}.replaced-{stamp}")
    shutil.move(str(root), target)
    print(f"moved the previous run aside: {target}")
    return target


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
    """Execute one notebook with papermill; on failure keep the partial notebook and say where it failed."""
    from papermill.exceptions import PapermillExecutionError

    from hb_utils.report import execute, to_html

    out = reports / f"{stage}.ipynb"
    start = time.perf_counter()
    error = None
    try:
        execute(notebook_path(stage), out, cfg.to_dict(), cwd=run_dir.repo_root(), kernel=kernel)
    except PapermillExecutionError as exc:
        error = (f"{stage} failed in cell {exc.cell_index} (execution count {exc.exec_count}): "
                 f"{exc.ename}: {exc.evalue}")
    html = to_html(out) if out.is_file() else None
    return StageResult(stage, "failed" if error else "done", time.perf_counter() - start, out, html, error)


def run_experiment(cfg: ExperimentConfig, *, start: str | None = None, only: str | None = None,
                   overwrite: bool = False, kernel: str = "python3", echo: Any = print) -> list[StageResult]:
    """Run the selected stages in order; stop at the first failure. Returns one result per stage.

    Without ``--from``/``--only`` a stage that already finished for this config is skipped, so rerunning
    an interrupted run continues where it stopped.
    """
    explicit = bool(start or only)
    stages = select_stages(start, only)
    state = open_run(cfg, overwrite=overwrite)
    reports = run_dir.RunPaths.for_config(cfg).reports
    os.environ.setdefault("HB_HEADLESS", "1")  # quiet progress bars inside the executed notebooks
    results = []
    for stage in stages:
        if not explicit and state.done(stage):
            results.append(StageResult(stage, "skipped", 0.0, reports / f"{stage}.ipynb"))
            echo(f"{stage:17s} skipped (finished earlier; --from {stage[:2]} reruns it)")
            continue
        state.payload["stages"][stage] = {"status": "running", "started": run_dir.utc_now()}
        state.save()
        res = execute_stage(stage, cfg, reports, kernel)
        results.append(res)
        state.payload["stages"][stage] = {"status": res.status, "seconds": round(res.seconds, 1), "finished": run_dir.utc_now()}
        state.save()
        echo(f"{stage:17s} {res.status:6s} {res.seconds:7.1f}s  {res.html or res.report}")
        if res.error:
            echo(f"error: {res.error}\npartial report: {res.report}" + (f" (HTML: {res.html})" if res.html else ""))
            break
    return results

