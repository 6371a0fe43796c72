"""Where the trials of a sweep run: :class:`LocalPool` (this machine: one trial at a time on a CPU, one per GPU with
``CUDA_VISIBLE_DEVICES``) or :class:`RayCluster` (an existing Ray cluster: each trial a Ray task asking for its GPUs
and CPUs). Both run the same thing, ``hb run <trial params>`` as a subprocess writing an ordinary run directory, and
answer the same five calls (``has_room``, ``start``, ``poll``, ``stop_all``, ``close``); :mod:`hb_utils.runs.sweep`
decides what runs and records it.

Why no scheduler of our own beyond the local pool: Ray already places tasks by resources across nodes (and sets
``CUDA_VISIBLE_DEVICES`` per task from ``num_gpus``). What it does not do is fail fast: a task asking for a GPU the
cluster lacks stays pending forever, and a wrong address retries for minutes. So :class:`RayCluster` checks the
address, the resources and that every node sees the output folder before submitting anything.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from hb_utils.errors import ConfigError, RunError

PYTHON = "{python}"  # in a job's argv: the Python of the machine that runs it (a Ray node's may differ)


@dataclass
class Job:
    """One trial to run: the command, extra environment, the log file (stdout + stderr) and the folder to run in."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    cwd: str


@dataclass
class Outcome:
    """How a job ended: exit status (negative: killed by that signal), seconds, where it ran."""

    returncode: int | None
    seconds: float
    where: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False


class Executor(Protocol):
    kind: str

    def check(self, series_dir: Path) -> None: ...
    def describe(self) -> str: ...
    def has_room(self) -> bool: ...
    def start(self, job: Job) -> dict[str, Any]: ...
    def poll(self) -> list[tuple[Job, Outcome]]: ...
    def running(self) -> list[Job]: ...
    def stop_all(self, grace: float) -> None: ...
    def kill_all(self) -> None: ...
    def close(self) -> None: ...


def resolve_argv(argv: list[str]) -> list[str]:
    return [sys.executable if a == PYTHON else a for a in argv]


def stop_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGINT to the job's process group (what Ctrl-C in its terminal would send: `hb run` marks its stage
    interrupted and its kernel stops), then SIGKILL after ``grace`` seconds."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 10.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def spawn(job: Job, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``job`` in its own session (so the terminal's Ctrl-C reaches the sweep alone, which then stops each
    trial once), stdout and stderr appended to its log."""
    job.log.parent.mkdir(parents=True, exist_ok=True)
    # A child inherits the signal mask of the thread that starts it; Ray's workers block SIGINT, and a trial
    # started there would never see the Ctrl-C that stops it. Unblocked for the start, as it was after.
    masked = hasattr(signal, "pthread_sigmask") and signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    if masked:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        with job.log.open("ab") as log:
            return subprocess.Popen(resolve_argv(job.argv), cwd=job.cwd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    env={**os.environ, **job.env, **(extra_env or {})})
    finally:
        if masked:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


# --------------------------------------------------------------------------- this machine
def visible_gpus() -> list[str]:
    """The GPUs trials may use: $CUDA_VISIBLE_DEVICES when set (an empty value: none), else every GPU
    ``nvidia-smi -L`` lists (no torch import: ``hb sweep`` answers in a second)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return parse_gpus(env)
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return [str(i) for i, _ in enumerate(line for line in out.stdout.splitlines() if line.startswith("GPU "))]


def parse_gpus(text: str) -> list[str]:
    """``"0,1"`` -> ["0", "1"]; ``""``, ``"none"`` or ``"-1"`` -> [] (CPU only)."""
    items = [g.strip() for g in str(text).split(",") if g.strip()]
    return [] if items in ([], ["none"], ["-1"]) else items


@dataclass
class _Running:
    job: Job
    proc: subprocess.Popen
    slot: int
    started: float
    where: dict[str, Any]


class LocalPool:
    """Trials as subprocesses of this machine, one per slot. With GPUs a slot is ``gpus_per_trial`` of them,
    handed to the trial as ``CUDA_VISIBLE_DEVICES`` (so N GPUs run N trials at once, never two on one GPU); on a
    CPU one slot by default (``parallel`` for more: each trial gets ``cores / parallel`` OpenMP threads, since
    oversubscribed threads spin and slow every trial down)."""

    kind = "local"

    def __init__(self, slots: list[list[str] | None], threads: int | None = None) -> None:
        self.slots = slots
        self.threads = threads
        self.free = list(range(len(slots)))
        self.jobs: list[_Running] = []
        self.done: list[tuple[Job, Outcome]] = []
        self.host = socket.gethostname()

    @classmethod
    def create(cls, *, gpus: list[str], gpus_per_trial: int | None = None, parallel: int | None = None,
               min_gpus: int = 1) -> LocalPool:
        per_trial = gpus_per_trial if gpus_per_trial is not None else (max(1, min_gpus) if gpus else 0)
        if gpus and per_trial > 0:
            if per_trial < min_gpus:
                raise ConfigError(f"A trial trains with num_processes={min_gpus} but gpus_per_trial={per_trial}: "
                                  f"set gpus_per_trial: {min_gpus} (or --gpus-per-trial {min_gpus}).")
            if per_trial > len(gpus):
                raise ConfigError(f"gpus_per_trial={per_trial} but this machine shows {len(gpus)} GPU(s) "
                                  f"({','.join(gpus)}): lower gpus_per_trial or use --executor ray.")
            slots: list[list[str] | None] = [gpus[i * per_trial:(i + 1) * per_trial]
                                             for i in range(len(gpus) // per_trial)]
            if parallel:
                slots = slots[:parallel]
            return cls(slots)
        if per_trial > 0:
            raise ConfigError(f"gpus_per_trial={per_trial} but no GPU is visible here (nvidia-smi finds none, or "
                              "CUDA_VISIBLE_DEVICES is empty): set gpus_per_trial: 0 to run on the CPU.")
        n = parallel or 1
        # on a GPU machine, CPU trials (gpus_per_trial: 0) get CUDA_VISIBLE_DEVICES="" so none lands on a GPU
        return cls([[] if gpus else None for _ in range(n)], threads=max(1, _cores() // n) if n > 1 else None)

    def check(self, series_dir: Path) -> None:
        return None

    def describe(self) -> str:
        if self.slots and self.slots[0]:
            return (f"local, {len(self.slots)} trial(s) at once, GPUs "
                    + " | ".join(",".join(s or []) for s in self.slots))
        return (f"local CPU, {len(self.slots)} trial(s) at once"
                + (f", {self.threads} thread(s) each" if self.threads else ""))

    def has_room(self) -> bool:
        return bool(self.free)

    def start(self, job: Job) -> dict[str, Any]:
        slot = self.free.pop(0)
        gpus = self.slots[slot]
        env = {"CUDA_VISIBLE_DEVICES": ",".join(gpus)} if gpus is not None else {}
        if self.threads and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(self.threads)
        proc = spawn(job, env)
        where = {"executor": "local", "host": self.host, "gpus": ",".join(gpus) if gpus else "", "pid": proc.pid}
        self.jobs.append(_Running(job, proc, slot, time.monotonic(), where))
        return where

    def _reap(self) -> None:
        for r in list(self.jobs):
            if r.proc.poll() is not None:
                self.jobs.remove(r)
                self.free.append(r.slot)
                self.free.sort()
                self.done.append((r.job, Outcome(r.proc.returncode, time.monotonic() - r.started, r.where)))

    def poll(self) -> list[tuple[Job, Outcome]]:
        """The jobs that ended since the last call."""
        self._reap()
        done, self.done = self.done, []
        return done

    def running(self) -> list[Job]:
        return [r.job for r in self.jobs]

    def stop_all(self, grace: float) -> None:
        for r in self.jobs:  # every trial gets its SIGINT first, then they are waited for together
            try:
                os.killpg(r.proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for r in self.jobs:
            try:
                r.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_group(r.proc)
                r.proc.wait(10)
        self._reap()

    def kill_all(self) -> None:
        for r in self.jobs:
            _kill_group(r.proc)
        for r in self.jobs:
            r.proc.wait(10)
        self._reap()

    def close(self) -> None:
        if self.jobs:
            self.kill_all()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- a Ray cluster
def ray_trial(argv: list[str], env: dict[str, str], log: str, cwd: str | None, grace: float) -> dict[str, Any]:
    """The body of a trial's Ray task, on whichever node Ray picked: run the job, say where it ran.

    A cancelled task (the sweep's Ctrl-C: ``ray.cancel``) gets KeyboardInterrupt here and stops its ``hb run`` the
    way Ctrl-C would, so the run directory records the interrupted stage. ``where`` is also written next to the log
    before the trial starts, so a cancelled task's node is known too."""
    import ray

    from hb_utils.run_dir import repo_root, write_json

    ctx = ray.get_runtime_context()
    where = {"executor": "ray", "node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
             "host": socket.gethostname(), "gpus": ",".join(str(g) for g in ray.get_gpu_ids())}
    job = Job(name="", argv=argv, env=env, log=Path(log), cwd=cwd or str(repo_root()))
    t0 = time.monotonic()
    proc = spawn(job)
    where["pid"] = proc.pid
    write_json(Path(log).with_suffix(".where.json"), where)
    try:
        while proc.poll() is None:  # polling, not wait(): ray.cancel raises KeyboardInterrupt between bytecodes,
            time.sleep(0.5)  # which a thread blocked in waitpid() would never reach
        returncode, interrupted = proc.returncode, False
    except KeyboardInterrupt:
        stop_group(proc, grace)
        returncode, interrupted = proc.returncode, True
    return {"returncode": returncode, "seconds": time.monotonic() - t0, "where": where, "interrupted": interrupted}


def ray_probe(token_file: str, token: str) -> dict[str, Any]:
    """What one node sees: the series folder (by a token the driver wrote) and the kit's location there."""
    import ray

    from hb_utils.run_dir import repo_root

    try:
        seen = Path(token_file).read_text() == token
    except OSError:
        seen = False
    return {"node_ip": ray.util.get_node_ip_address(), "host": socket.gethostname(), "sees": seen,
            "repo": str(repo_root()), "python": sys.executable}


def check_address(address: str, timeout: float = 5.0) -> None:
    """RunError within seconds for a ``host:port`` / ``ray://host:port`` that nothing answers on (Ray itself
    retries a dead address for a minute or more)."""
    if address in ("auto", "local", ""):
        return
    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"Ray address {address!r} is not host:port, ray://host:port or auto. Start a cluster with "
                          "`ray start --head` and pass the address it prints (docs/sweeps.md).")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise RunError(f"No Ray cluster answers at {address} ({exc.strerror or exc}). Start one with `ray start "
                       "--head` on the head node (and `ray start --address <head>:6379` on the others), then pass "
                       "its address: --address <head ip>:6379, or --address auto on a node of the cluster.") from None


class RayCluster:
    """Trials as Ray tasks on an existing cluster (``--address auto``, ``host:port`` or ``ray://host:port``):
    each asks for ``gpus_per_trial`` GPUs (Ray then sets its ``CUDA_VISIBLE_DEVICES``) and ``cpus_per_trial`` CPUs,
    and runs ``hb run`` on whichever node Ray picks. Outputs go to the series folder, which every node must see at
    the same path (shared storage: :meth:`check` refuses one that a node cannot see)."""

    kind = "ray"

    def __init__(self, address: str, *, gpus_per_trial: int | None = None, cpus_per_trial: float = 1.0,
                 min_gpus: int = 1, grace: float = 60.0) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install -e \".[sweep]\" (ray[default]) on every node "
                              "of the cluster.") from None
        import logging

        check_address(address)
        self.address = address
        try:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RunError(f"Could not connect to a Ray cluster at {address!r}: {first}. Start one with `ray start "
                           "--head` (docs/sweeps.md) or pass --address <head ip>:6379.") from None
        self.ray = ray
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        self.nodes = nodes
        total_gpus = sum(n.get("Resources", {}).get("GPU", 0) for n in nodes)
        self.gpus = gpus_per_trial if gpus_per_trial is not None else (max(1, min_gpus) if total_gpus else 0)
        self.cpus = cpus_per_trial
        self.grace = grace
        if self.gpus and self.gpus < min_gpus:
            raise ConfigError(f"A trial trains with num_processes={min_gpus} but gpus_per_trial={self.gpus}: set "
                              f"gpus_per_trial: {min_gpus}.")
        fits = [n for n in nodes if n.get("Resources", {}).get("GPU", 0) >= self.gpus
                and n.get("Resources", {}).get("CPU", 0) >= self.cpus]
        if not fits:
            have = "; ".join(f"{n.get('NodeManagerAddress')}: {n.get('Resources', {}).get('CPU', 0):g} CPU, "
                             f"{n.get('Resources', {}).get('GPU', 0):g} GPU" for n in nodes) or "no live node"
            ray.shutdown()
            raise RunError(f"No node of the Ray cluster at {address} has what one trial asks for ({self.gpus} GPU, "
                           f"{self.cpus:g} CPU); a task would wait forever. Nodes: {have}. Lower gpus_per_trial / "
                           "cpus_per_trial (--gpus-per-trial, --cpus-per-trial) or add a node that has them.")
        self.task = ray.remote(ray_trial)
        self.refs: dict[Any, tuple[Job, float]] = {}
        self.done: list[tuple[Job, Outcome]] = []

    def check(self, series_dir: Path) -> None:
        """RunError unless every live node sees ``series_dir`` (a token file written here, read there) and can
        import the kit: outputs must land where the sweep and the report read them."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        token, token_file = uuid.uuid4().hex, series_dir / f".ray-probe-{uuid.uuid4().hex[:8]}"
        token_file.write_text(token)
        try:
            probe = self.ray.remote(ray_probe)
            refs = [probe.options(num_cpus=0, max_retries=0,
                                  scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                    .remote(str(token_file), token) for n in self.nodes]
            try:
                seen = self.ray.get(refs, timeout=120)
            except Exception as exc:  # noqa: BLE001 - a node that cannot even run the probe: say which error
                raise RunError(f"The Ray nodes could not run the kit's probe ({type(exc).__name__}: "
                               f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}). Install the kit "
                               "(pip install -e \".[sweep]\") at the same path on every node "
                               "(docs/sweeps.md).") from None
        finally:
            token_file.unlink(missing_ok=True)
        blind = [s for s in seen if not s["sees"]]
        if blind:
            raise RunError(f"output_root {series_dir.parent} is not visible from Ray node(s) "
                           + ", ".join(f"{s['node_ip']} ({s['host']})" for s in blind)
                           + ": trials would write where this machine and the report cannot read. Put output_root "
                           "on storage every node mounts at the same path (NFS, a cluster file system; "
                           "docs/sweeps.md) and pass it with -p output_root /shared/path.")

    def describe(self) -> str:
        return (f"ray at {self.address}, {len(self.nodes)} node(s), {self.gpus} GPU and {self.cpus:g} CPU per trial")

    def has_room(self) -> bool:
        return True  # Ray queues the tasks and places each where its resources are free

    def start(self, job: Job) -> dict[str, Any]:
        ref = self.task.options(num_gpus=self.gpus, num_cpus=self.cpus, max_retries=0,
                                name=f"hb-trial-{job.name}"[:100]).remote(job.argv, job.env, str(job.log), None,
                                                                          self.grace)
        self.refs[ref] = (job, time.monotonic())
        return {"executor": "ray", "submitted_to": self.address}

    def _reap(self) -> None:
        if self.refs:
            ready, _ = self.ray.wait(list(self.refs), num_returns=len(self.refs), timeout=0)
            for ref in ready:
                job, t0 = self.refs.pop(ref)
                self.done.append((job, self._outcome(ref, job, t0)))

    def poll(self) -> list[tuple[Job, Outcome]]:
        """The tasks that ended since the last call."""
        self._reap()
        done, self.done = self.done, []
        return done

    def _outcome(self, ref: Any, job: Job, t0: float) -> Outcome:
        try:
            r = self.ray.get(ref)
            return Outcome(r["returncode"], r["seconds"], r["where"], r["interrupted"])
        except Exception as exc:  # noqa: BLE001 - a cancelled or crashed task: what its node wrote, and the error
            where_file = job.log.with_suffix(".where.json")
            where = {}
            if where_file.is_file():
                import json

                where = json.loads(where_file.read_text())
            with job.log.open("a") as fh:
                fh.write(f"error: the Ray task of this trial ended with {type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}\n")
            return Outcome(None, time.monotonic() - t0, where, interrupted="Cancel" in type(exc).__name__)

    def running(self) -> list[Job]:
        return [job for job, _ in self.refs.values()]

    def stop_all(self, grace: float) -> None:
        for ref in self.refs:
            self.ray.cancel(ref, force=False)  # KeyboardInterrupt in ray_trial: it stops hb run like Ctrl-C
        if self.refs:
            self.ray.wait(list(self.refs), num_returns=len(self.refs), timeout=grace + 15)
        self._reap()
        for job, t0 in list(self.refs.values()):
            self.done.append((job, Outcome(None, time.monotonic() - t0, {}, interrupted=True)))
        self.refs.clear()

    def kill_all(self) -> None:
        for ref in self.refs:
            self.ray.cancel(ref, force=True)
        self.stop_all(0)

    def close(self) -> None:
        self.ray.shutdown()  # disconnects this driver; the cluster keeps running
