"""One rank of a multi-process stage 03: ``accelerate launch … -m hb_utils.train.worker <spec.json>``.

Why a module of its own: :mod:`hb_utils.train.distributed` starts it once per rank; it only reads the
spec the launcher wrote (config + resume decision), runs the same
:func:`hb_utils.train.training.prepare_worker` / :func:`hb_utils.train.training.fit` as a one-process run, and
reports an exception as ``rank<r>.error.json`` so the launcher can show *which* rank failed and why.
Ranks > 0 write their output to ``rank<r>.log`` in the launcher's temporary folder, never into the run
directory or the cell.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hb_utils.config import ExperimentConfig
from hb_utils.train import distributed


def _redirect_output(log_dir: Path | None) -> None:
    """Ranks > 0: stdout and stderr (file descriptors, so C-level output too) into ``rank<r>.log``."""
    if log_dir is None or distributed.is_main_process():
        return
    log = open(log_dir / f"rank{distributed.rank()}.log", "a", buffering=1)  # noqa: SIM115 - lives as long as the rank
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)


def _report(log_dir: Path | None, exc: BaseException) -> None:
    if log_dir is None:
        return
    payload = {"rank": distributed.rank(), "time": time.time(), "type": type(exc).__name__, "message": str(exc),
               "traceback": traceback.format_exc()}
    tmp = log_dir / f".rank{distributed.rank()}.error.json"
    tmp.write_text(json.dumps(payload))
    tmp.replace(log_dir / f"rank{distributed.rank()}.error.json")


def main(argv: Sequence[str] | None = None, *, callbacks: Sequence[Any] = (),
         setup: Callable[[Any], None] | None = None) -> dict[str, Any]:
    """Run this rank. ``callbacks`` / ``setup(run)`` let a test or benchmark script observe the training
    (e.g. record which examples each rank collates) while keeping the one code path."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        raise SystemExit("usage: accelerate launch … -m hb_utils.train.worker <spec.json>")
    os.environ[distributed.ENV_WORKER] = "1"
    log_dir = Path(os.environ[distributed.ENV_LOG_DIR]) if os.environ.get(distributed.ENV_LOG_DIR) else None
    _redirect_output(log_dir)
    spec = json.loads(Path(args[0]).read_text())
    try:
        from hb_utils.train import training  # inside the try: an import failure is reported as this rank's error

        cfg = ExperimentConfig(**spec["config"])
        run = training.prepare_worker(cfg, resume_from=spec.get("resume_from"), callbacks=callbacks)
        if setup is not None:
            setup(run)
        return training.fit(run)
    except BaseException as exc:
        _report(log_dir, exc)
        raise


if __name__ == "__main__":
    main()
