"""Stage 03 on more than one process: data-parallel (DDP) or FSDP training through ``accelerate launch``.

Why a subprocess: a notebook kernel cannot become N training processes. accelerate's
``notebook_launcher`` forks the kernel, which it refuses once CUDA is initialised or bitsandbytes
imported (and which cannot span machines). So with ``num_processes > 1`` the kernel only checks the
run directory (:func:`hb_utils.train.training.prepare`: stamps, resume point, splits), then :func:`launch`
starts ``python -m accelerate.commands.launch … -m hb_utils.train.worker <spec.json>``. Every rank runs
the *same* :func:`hb_utils.train.training.prepare_worker` / :func:`hb_utils.train.training.fit` code a one-process run
runs; gradient synchronisation, sampler sharding and the process group are accelerate's and the
Trainer's, not ours. Rank 0 alone writes into the run directory; its compact log lines stream into
the cell; every other rank writes to a log file in a temporary folder, whose tail is shown when that
rank fails.

On CPUs accelerate's ``--cpu`` flag selects its *single-process* launcher (several CPU processes need
MPI there), so CPU runs use the torchrun path (``--multi_gpu``): with ``use_cpu`` in the training
arguments each rank then joins a gloo process group on the CPU.

Multi-node runs cannot start from a notebook (one command per machine): :mod:`hb_utils.train.multinode`
writes one accelerate config per machine and the spec, and prints the command each machine runs.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hb_utils import errors, run_dir
from hb_utils.config import ExperimentConfig
from hb_utils.errors import ConfigError, RunError

ENV_WORKER = "HB_DDP_WORKER"  # "1" inside launched ranks: prepare/fit train instead of launching again
ENV_LOG_DIR = "HB_DDP_LOG_DIR"  # where ranks > 0 write rank<r>.log and every rank its rank<r>.error.json
ENV_OVERSUBSCRIBE = "HB_ALLOW_CPU_OVERSUBSCRIBE"  # "1": allow more CPU processes than cores (slow; for tests)
WORKER_MODULE = "hb_utils.train.worker"
TAIL_LINES = 40


# --------------------------------------------------------------------------- rank helpers (inside a worker)
def in_worker() -> bool:
    """True inside a process started by :func:`launch` (or a multi-node command)."""
    return os.environ.get(ENV_WORKER) == "1"


def rank() -> int:
    """This process's global rank (0 outside a distributed run); set by torchrun before Python starts."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Only rank 0 writes into the run directory (adapter, metrics, plots, stamps)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# --------------------------------------------------------------------------- checks before launching
def available_devices() -> tuple[str, int]:
    """("gpu", number of CUDA devices) where CUDA is present, else ("cpu", usable cores).

    ``torch.cuda.device_count`` asks the driver for a count without creating a CUDA context in this
    process, so the kernel stays free of CUDA state.
    """
    import torch

    n_gpu = torch.cuda.device_count() if torch.backends.cuda.is_built() else 0
    if n_gpu:
        return "gpu", n_gpu
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return "cpu", cores


def check_num_processes(cfg: ExperimentConfig, *, num_machines: int = 1) -> str:
    """Refuse, before anything starts, more processes per machine than this machine has devices.

    GPUs: one process per GPU (two ranks on one GPU would each hold a copy of the model). CPUs: at
    most one process per core, because more only time-slice the same cores; set
    ``HB_ALLOW_CPU_OVERSUBSCRIBE=1`` to force it (tests of the mechanics on a small machine).
    Returns the kind of device ("gpu" or "cpu").
    """
    kind, count = available_devices()
    per_machine = -(-cfg.num_processes // num_machines)
    if cfg.num_processes % num_machines:
        raise ConfigError(f"num_processes ({cfg.num_processes}) must be a multiple of the number of machines "
                          f"({num_machines}): every machine runs the same number of processes.")
    if per_machine > count:
        if kind == "cpu" and os.environ.get(ENV_OVERSUBSCRIBE) == "1":
            return kind
        fix = (f"Set num_processes to at most {count * num_machines}" + (
            f", or set {ENV_OVERSUBSCRIBE}=1 to run more CPU processes than cores (slower, for testing)."
            if kind == "cpu" else "."))
        raise ConfigError(f"num_processes={cfg.num_processes} needs {per_machine} {kind.upper()} "
                          f"{'devices' if kind == 'gpu' else 'cores'} per machine, but this machine has {count}. {fix}")
    if cfg.accelerate_config and not run_dir.resolve(cfg.accelerate_config).is_file():
        raise ConfigError(f"accelerate_config {cfg.accelerate_config!r} does not exist. Use e.g. "
                          "accelerate/fsdp_qlora.yaml, or leave it empty for DDP.")
    return kind


def free_port() -> int:
    """A free TCP port for the rendezvous, so two runs (or tests) on one machine do not collide on 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- the command
def write_spec(cfg: ExperimentConfig, resume_from: str | None, path: Path) -> Path:
    """What every rank needs: the validated config and the kernel's resume decision (decided once, so
    no rank deletes or picks checkpoints on its own)."""
    return run_dir.write_json(path, {"config": cfg.to_dict(), "resume_from": resume_from})


def launch_command(cfg: ExperimentConfig, spec: Path, *, kind: str, port: int | None = None,
                   threads_per_process: int | None = None, worker: str = WORKER_MODULE) -> list[str]:
    """The ``accelerate launch`` command line of a one-machine run (``worker``: a module, or a .py script)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if cfg.accelerate_config:
        cmd += ["--config_file", str(run_dir.resolve(cfg.accelerate_config))]
    else:  # torchrun path on GPUs and CPUs alike (see the module docstring); precision comes from SFTConfig
        cmd += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--num_processes", str(cfg.num_processes), "--main_process_port", str(port or free_port())]
    if kind == "cpu":
        cmd += ["--num_cpu_threads_per_process", str(threads_per_process or 1)]
    cmd += ([worker] if worker.endswith(".py") else ["-m", worker]) + [str(spec)]
    return cmd


def _cpu_threads(num_processes: int) -> int:
    """OMP_NUM_THREADS when set (the user's choice), else the cores shared out evenly."""
    env = os.environ.get("OMP_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, available_devices()[1] // num_processes)


# --------------------------------------------------------------------------- launching and failures
@dataclass
class RankFailure:
    rank: int | None
    exit_code: int | None
    error_type: str | None
    message: str
    tail: str


def launch(cfg: ExperimentConfig, resume_from: str | None, *, worker: str = WORKER_MODULE,
           echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``cfg`` (from checkpoint ``resume_from``, or from scratch) on ``cfg.num_processes`` processes;
    stream rank 0's lines; return train.json's metrics.

    A failing rank stops the run (torchrun ends the others) and raises the rank's own error type
    (RunError for a crash or a kill) with the tail of its output. Checkpoints stay as written, so the
    next run with the same config resumes from the newest complete one.
    """
    kind = check_num_processes(cfg)
    paths = run_dir.RunPaths.for_config(cfg)
    log_dir = Path(tempfile.mkdtemp(prefix=f"hb-ddp-{cfg.experiment}-"))
    spec = write_spec(cfg, resume_from, log_dir / "spec.json")
    cmd = launch_command(cfg, spec, kind=kind, threads_per_process=_cpu_threads(cfg.num_processes), worker=worker)
    env = {**os.environ, ENV_WORKER: "1", ENV_LOG_DIR: str(log_dir), "PYTHONUNBUFFERED": "1",
           "HB_HEADLESS": "1",  # one compact line per log step instead of a tqdm bar from another process
           "HB_ROOT": str(run_dir.repo_root())}
    if kind == "cpu":
        env["OMP_NUM_THREADS"] = str(_cpu_threads(cfg.num_processes))
    echo(f"[ddp] {cfg.num_processes} {kind.upper()} processes via accelerate launch; effective batch "
         f"{cfg.batch_size} x {cfg.grad_accum} x {cfg.num_processes} = "
         f"{cfg.batch_size * cfg.grad_accum * cfg.num_processes}; logs of ranks > 0: {log_dir}")
    stderr_path = log_dir / "launcher.stderr.log"
    rank0_tail: deque[str] = deque(maxlen=TAIL_LINES)
    with stderr_path.open("w") as err, (log_dir / "rank0.log").open("w") as out_log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, text=True, bufsize=1,
                                cwd=str(run_dir.repo_root()), start_new_session=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:  # rank 0's stdout (ranks > 0 write to their own files)
                out_log.write(line)
                rank0_tail.append(line.rstrip("\n"))
                echo(line.rstrip("\n"))
            code = proc.wait()
        except BaseException:  # KeyboardInterrupt (kernel interrupt) included: end every rank
            _terminate(proc)
            raise
    if code != 0:
        failure = diagnose(log_dir, cfg.num_processes, stderr_path.read_text(errors="replace"), "\n".join(rank0_tail))
        raise _as_error(failure, cfg, paths.checkpoints)
    metrics_path = paths.metrics / "train.json"
    if not metrics_path.is_file():
        raise RunError(f"The training processes ended without writing {metrics_path}; see the logs in {log_dir}.")
    return run_dir.read_json(metrics_path)


def _terminate(proc: subprocess.Popen) -> None:
    """End the launcher and every rank (they share its new session)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


_ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)


def diagnose(log_dir: Path, num_processes: int, launcher_stderr: str, rank0_output: str = "") -> RankFailure:
    """Which rank failed first and why: the earliest ``rank<r>.error.json`` a worker wrote on an exception,
    else the root cause torchrun reports (a rank killed by a signal leaves no traceback)."""
    reports = sorted(log_dir.glob("rank*.error.json"), key=lambda p: run_dir.read_json(p).get("time", 0))
    match = _ROOT_CAUSE.search(launcher_stderr)
    killed_rank = int(match.group(1)) if match else None
    exit_code = int(match.group(2)) if match else None
    if reports and (killed_rank is None or exit_code is None or exit_code > 0):
        first = run_dir.read_json(reports[0])
        r = int(first["rank"])
        return RankFailure(r, exit_code, first.get("type"), first.get("message", ""),
                           _rank_tail(log_dir, r, rank0_output))
    if killed_rank is not None:
        how = f"killed by signal {-exit_code}" if exit_code is not None and exit_code < 0 else f"exit code {exit_code}"
        tail = _rank_tail(log_dir, killed_rank, rank0_output) or _early_stderr(launcher_stderr)
        return RankFailure(killed_rank, exit_code, None, f"the process {how}", tail)
    tail = "\n".join(launcher_stderr.strip().splitlines()[-TAIL_LINES:])
    return RankFailure(None, None, None, "accelerate launch failed before the ranks reported", tail)


def _early_stderr(launcher_stderr: str) -> str:
    """What a rank printed to stderr before the worker redirected its output (an import or syntax error
    of the worker itself): the launcher's stderr up to torchrun's own failure report."""
    lines = launcher_stderr.splitlines()
    end = next((i for i, line in enumerate(lines) if "failed (exitcode" in line or "ChildFailedError" in line),
               len(lines))
    kept = [line for line in lines[:end] if "warnings.warn(" not in line and "Warning:" not in line]
    return "\n".join(kept[-TAIL_LINES:]).strip()


def _rank_tail(log_dir: Path, r: int, rank0_output: str) -> str:
    path = log_dir / f"rank{r}.log"
    text = path.read_text(errors="replace") if path.is_file() else (rank0_output if r == 0 else "")
    return "\n".join(text.strip().splitlines()[-TAIL_LINES:])


def _as_error(f: RankFailure, cfg: ExperimentConfig, checkpoints: Path) -> errors.HBError:
    """The failing rank's own user-error type (e.g. the NaN guard's RunError) or a RunError, with its tail."""
    who = f"rank {f.rank} of {cfg.num_processes}" if f.rank is not None else "the launcher"
    cls = getattr(errors, f.error_type or "", None)
    cls = cls if isinstance(cls, type) and issubclass(cls, errors.HBError) else RunError
    kind = f"{f.error_type}: " if f.error_type and cls is RunError else ""
    return cls(f"Training failed on {who}: {kind}{f.message}\n"
               f"Checkpoints written so far stay in {checkpoints}: rerun with the same config "
               f"(num_processes={cfg.num_processes}) to resume from the newest one.\n"
               f"--- last lines of {who} ---\n{f.tail}")
