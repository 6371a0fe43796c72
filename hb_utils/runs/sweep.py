"""``hb sweep SPEC.yaml``: an experiment series. Each trial is an ordinary run directory made by ``hb run``, on this
machine (:class:`hb_utils.runs.executors.LocalPool`) or a Ray cluster (:class:`~hb_utils.runs.executors.RayCluster`);
the series directory holds ``series.json`` and one report comparing every trial with a baseline on the same test
questions (:mod:`hb_utils.runs.compare`).

Why a command and not a shell loop over ``hb run``: a loop starts trial 1 before trial 4's typo is found, runs one
trial at a time on a machine with four GPUs, loses track of what finished when it is stopped, and leaves the
comparison to the reader. Here every trial's config is built and validated before anything starts (one error lists
every bad trial), trials are named from what differs (each its own folder: Axolotl's users lost runs to a shared
one), a rerun skips finished trials and continues the others where ``hb run`` left them (training from its newest
checkpoint), one failed trial never stops the rest, and Ctrl-C stops them all with one line.

The spec (a YAML mapping; paths are relative to the repository root, as in parameter files)::

    series: lora_rank          # the series directory: <output_root>/<series>/ (default: the spec file's name)
    base: params/smoke.yaml    # every trial starts from these parameters
    set: {eval_size: 8}        # then these, for every trial (like `hb run -p`); `hb sweep -p` adds to them
    grid:                      # every combination ...
      lora_r: [8, 16]
    together:                  # ... times one of these settings (values that change together)
      - {learning_rate: 2.0e-4, warmup_ratio: 0.05}
      - {learning_rate: 1.0e-4, warmup_ratio: 0.1}
    trials:                    # and/or an explicit list: params files (applied over base) or mappings
      - params/exp2_rank16.yaml
      - {name: long_answers, max_answer_words: 400}
    baseline: lora_r=8         # the trial every other is compared with (default: the base config's trial)
    executor: local            # or ray (--executor); address: auto; gpus_per_trial; cpus_per_trial; parallel

Order of precedence for one trial: base < its params file < ``set`` < its grid / together / mapping values.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shlex
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hb_utils import run_dir
from hb_utils.config import FIELDS, STAGE_SCOPES, ExperimentConfig, fields_in
from hb_utils.errors import ConfigError, HBError, RunError
from hb_utils.params_file import params_loader, read_params_file
from hb_utils.runs import executors

# The stages `hb run` records in config.json (= hb_utils.runs.runner.STAGES; a test keeps them equal). Read from the
# config rather than the runner so that `hb sweep` answers in a second: the runner imports torch.
STAGES = list(STAGE_SCOPES)
PYTHON = executors.PYTHON
# The command a trial runs, before `run <params file>`: the kit's own CLI with the Python of whoever runs it.
HB_COMMAND = [PYTHON, "-m", "hb_utils"]
SPEC_KEYS = ("series", "base", "set", "grid", "together", "trials", "baseline", "executor", "address",
             "gpus_per_trial", "cpus_per_trial", "parallel")
EXECUTORS = ("local", "ray")
# Names inside a series directory that are not trials.
RESERVED = {"trials", "logs", "trackio", "series.json"}
POLL_S = 0.5
STOP_GRACE_S = 60.0


# --------------------------------------------------------------------------- the spec
@dataclass
class Spec:
    """A parsed sweep spec (see the module docstring); ``raw`` is the mapping as written, for series.json."""

    path: Path
    name: str
    base: Path | None = None
    set: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    together: list[dict[str, Any]] = field(default_factory=list)
    trials: list[str | dict[str, Any]] = field(default_factory=list)
    baseline: str | None = None
    executor: str = "local"
    address: str = "auto"
    gpus_per_trial: int | None = None
    cpus_per_trial: float = 1.0
    parallel: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)


def spec_file(path: str | Path) -> Path:
    """A spec or parameter file named in a spec or on the command line: as given (relative to the current
    directory) when it exists there, else relative to the repository root, like every path in a parameter file."""
    p = Path(path).expanduser()
    return p if p.is_absolute() or p.exists() else run_dir.repo_root() / p


def load_spec(path: str | Path, overrides: Mapping[str, Any] | None = None) -> Spec:
    """Read and shape-check a spec; ``overrides`` (``hb sweep -p``) join its ``set``. ConfigError lists every
    problem of the file's shape at once (the trials themselves are checked by :func:`expand`)."""
    path = spec_file(path)
    if not path.is_file():
        raise ConfigError(f"Sweep spec {str(path)!r} does not exist. Pass a file such as params/series_smoke.yaml.")
    try:
        raw = yaml.load(path.read_text(), Loader=params_loader()) or {}  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"Sweep spec {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"Sweep spec {str(path)!r} must be a mapping (series:, base:, grid: ...).")
    problems = [f"unknown key {k!r} (a spec has {', '.join(SPEC_KEYS)}; parameters go under set:, grid:, "
                "together: or trials:)" for k in raw if k not in SPEC_KEYS]
    spec = Spec(path=path, name=str(raw.get("series") or path.stem), raw=dict(raw))

    def mapping(key: str) -> dict[str, Any]:
        value = raw.get(key) or {}
        if not isinstance(value, dict):
            problems.append(f"{key}: must be a mapping of name: value, got {value!r}")
            return {}
        return dict(value)

    if raw.get("base") is not None:
        spec.base = spec_file(str(raw["base"]))
        if not spec.base.is_file():
            problems.append(f"base: {raw['base']!r} does not exist (paths are relative to the repository root)")
    spec.set = {**mapping("set"), **dict(overrides or {})}
    for name, values in mapping("grid").items():
        if not isinstance(values, list):
            problems.append(f"grid.{name}: must be a list of values, e.g. {name}: [{values!r}, ...]; got {values!r}")
        elif not values:
            problems.append(f"grid.{name}: the list is empty, so the grid has no trials; give at least one value")
        else:
            spec.grid[name] = values
    together = raw.get("together") or []
    if not isinstance(together, list) or not all(isinstance(t, dict) and t for t in together):
        problems.append("together: must be a list of mappings, one per setting, e.g. "
                        "[{lora_r: 8, lora_alpha: 16}, {lora_r: 16, lora_alpha: 32}]")
    else:
        spec.together = [dict(t) for t in together]
        if spec.together and len({tuple(sorted(t)) for t in spec.together}) > 1:
            problems.append("together: every setting must name the same parameters, got "
                            + "; ".join(", ".join(sorted(t)) for t in spec.together))
        if "together" in raw and not together:
            problems.append("together: the list is empty, so there are no trials; give at least one setting")
    trials = raw.get("trials") or []
    if not isinstance(trials, list) or not all(isinstance(t, (str, dict)) for t in trials):
        problems.append("trials: must be a list of params files or mappings of parameters")
    else:
        spec.trials = list(trials)
        if "trials" in raw and not trials:
            problems.append("trials: the list is empty; give params files or mappings, or leave the key out")
    swept = set(spec.grid) | {k for t in spec.together for k in t}
    both = sorted(set(spec.grid) & {k for t in spec.together for k in t})
    if both:
        problems.append(f"{', '.join(both)}: both in grid and together; name each parameter in one of them")
    for name in sorted(set(spec.set) & swept):
        problems.append(f"set.{name}: also swept (grid/together); a series-wide value would erase what the trials vary")
    for key in ("experiment", "output_root"):
        if key in swept:
            problems.append(f"{key} cannot be swept: hb sweep names each trial from what differs and puts it in "
                            "<output_root>/<series>/")
    if "experiment" in spec.set:
        problems.append("set.experiment: hb sweep names each trial from what differs; name the series with series:")
    spec.baseline = None if raw.get("baseline") is None else str(raw["baseline"])
    spec.executor = str(raw.get("executor") or "local")
    if spec.executor not in EXECUTORS:
        problems.append(f"executor: must be one of {', '.join(EXECUTORS)}, got {spec.executor!r}")
    spec.address = str(raw.get("address") or "auto")
    for key, kind, low in (("gpus_per_trial", int, 0), ("cpus_per_trial", float, 0), ("parallel", int, 1)):
        if raw.get(key) is None:
            continue
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low or (
                kind is int and not float(value).is_integer()):
            problems.append(f"{key}: must be {'an integer' if kind is int else 'a number'} >= {low}, got {value!r}")
        else:
            setattr(spec, key, kind(value))
    if not spec.name.strip() or any(c in spec.name for c in "/\\") or spec.name.startswith("."):
        problems.append(f"series: must be a plain directory name, got {spec.name!r}")
    if problems:
        raise ConfigError(f"Sweep spec {str(path)!r}: {len(problems)} problem(s), nothing was started:\n  - "
                          + "\n  - ".join(problems))
    return spec


# --------------------------------------------------------------------------- trials
@dataclass
class Trial:
    """One run of the series: its config (experiment = its name, output_root = the series directory), what it
    sets on top of the base config (``values``: its name and the x-axes of the report's plot) and where it came
    from (``origin``, for error messages)."""

    name: str
    cfg: ExperimentConfig
    values: dict[str, Any]
    origin: str

    @property
    def run_dir(self) -> Path:
        return run_dir.RunPaths.for_config(self.cfg).root


def format_value(value: Any) -> str:
    """A parameter value as it reads in a trial name: ``16``, ``1e-4``, ``0.05``, ``q_proj+v_proj``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value != 0 and abs(value) < 1e-2:
            mantissa, exponent = f"{value:e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(format_value(v) for v in value)
    text = str(value).strip().rstrip("/").split("/")[-1] or str(value)
    return "".join(c if c.isprintable() and c not in "\\" else "-" for c in text).lstrip(".") or "-"


def trial_name(values: Mapping[str, Any]) -> str:
    """``lora_r=16,learning_rate=1e-4``: readable, and a valid ``experiment`` (no slash, no leading dot). Values
    as typed are read through the config's types first (YAML's ``1e-4`` is text; the name says ``1e-4`` either way)."""
    parts = []
    for name, value in values.items():
        if name in FIELDS:
            with contextlib.suppress(ConfigError, TypeError, ValueError):  # the trial's validation names a bad value
                value = getattr(ExperimentConfig().replace(**{name: value}), name)
        parts.append(f"{name}={format_value(value)}")
    return ",".join(parts)


def _check_names(source: str, values: Mapping[str, Any], problems: list[str]) -> None:
    import difflib

    for name in values:
        if name not in FIELDS:
            close = difflib.get_close_matches(str(name), FIELDS, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{source}: unknown parameter {name!r}{hint}")


def series_dir(spec: Spec) -> Path:
    """``<output_root>/<series>``: output_root from ``set`` (or ``hb sweep -p``), else the base file's, else outputs."""
    base = read_params_file(spec.base) if spec.base else {}
    root = spec.set.get("output_root", base.get("output_root", "outputs"))
    return run_dir.check_output_root(str(root)) / spec.name


def expand(spec: Spec) -> tuple[list[Trial], ExperimentConfig, str]:
    """Every trial of ``spec`` with its validated config, the base config and the baseline trial's name.

    ConfigError lists every problem at once (unknown parameters, bad values, two trials with one name or one
    config, an unknown baseline), so a series never starts with trial 4 broken.
    """
    problems: list[str] = []
    base_values = read_params_file(spec.base) if spec.base else {}
    _check_names(f"base {spec.base}", base_values, problems)
    _check_names("set", spec.set, problems)
    _check_names("grid", spec.grid, problems)
    _check_names("together", {k: v for t in spec.together for k, v in t.items()}, problems)
    root = series_dir(spec)
    common = {**base_values, **spec.set, "output_root": str(root)}
    common.pop("experiment", None)
    base_cfg = None
    try:
        base_cfg = ExperimentConfig(**{k: v for k, v in common.items() if k in FIELDS})
    except ConfigError as exc:
        problems.append(f"base + set: {exc}")

    entries: list[tuple[str | None, dict[str, Any], dict[str, Any], str]] = []  # label, file values, own, origin
    for i, entry in enumerate(spec.trials or [None]):
        if entry is None:
            entries.append((None, {}, {}, "grid"))
        elif isinstance(entry, str):
            path = spec_file(entry)
            try:
                values = read_params_file(path)
            except ConfigError as exc:
                problems.append(f"trials[{i}]: {exc}")
                continue
            _check_names(f"trials[{i}] {entry}", values, problems)
            label = str(values.pop("experiment", None) or path.stem)
            values.pop("output_root", None)
            entries.append((label, values, {}, entry))
        else:
            own = dict(entry)
            label = own.pop("name", None)
            _check_names(f"trials[{i}]", own, problems)
            for key in ("experiment", "output_root"):
                if key in own:
                    problems.append(f"trials[{i}]: {key} is set by hb sweep (use name: for the trial's name)")
                    own.pop(key)
            for key in sorted(set(own) & set(spec.set)):
                problems.append(f"trials[{i}]: {key} is also in set:, which would apply to every trial; keep it in one")
            entries.append((None if label is None else str(label), {}, own, f"trials[{i}]"))

    grid_points = [dict(zip(spec.grid, combo, strict=True)) for combo in itertools.product(*spec.grid.values())]
    points = [{**g, **t} for g in grid_points for t in (spec.together or [{}])]
    trials: list[Trial] = []
    for (label, file_values, own, origin), point in itertools.product(entries, points):
        varied = {**own, **point}
        parts = [label or (trial_name(own) if own else None), trial_name(point) if point else None]
        name = ",".join(p for p in parts if p)
        if not name:
            problems.append("the spec defines no trials: give grid:, together: or trials:")
            continue
        values = {**base_values, **file_values, **spec.set, **varied, "experiment": name, "output_root": str(root)}
        try:
            cfg = ExperimentConfig(**{k: v for k, v in values.items() if k in FIELDS})
        except ConfigError as exc:
            problems.append(f"trial {name} ({origin}): {exc}")
            continue
        differs = {n: getattr(cfg, n) for n in fields_in("data", "train", "eval")
                   if base_cfg is None or getattr(cfg, n) != getattr(base_cfg, n)}
        trials.append(Trial(name, cfg, differs, origin if origin != "grid" else f"grid {name}"))
    if not problems and not trials:
        problems.append("the spec defines no trials: give grid:, together: or trials:")
    _check_unique(trials, problems)
    baseline = choose_baseline(spec, trials, problems) if trials else ""
    if problems:
        unique = list(dict.fromkeys(problems))
        raise ConfigError(f"Sweep spec {str(spec.path)!r}: {len(unique)} problem(s), nothing was started:\n  - "
                          + "\n  - ".join(unique))
    assert base_cfg is not None
    return trials, base_cfg, baseline


def _check_unique(trials: list[Trial], problems: list[str]) -> None:
    by_name: dict[str, list[str]] = {}
    by_config: dict[str, list[str]] = {}
    first: dict[str, str] = {}
    for t in trials:
        by_name.setdefault(t.name.lower(), []).append(t.origin)  # case-insensitive file systems exist
        first.setdefault(t.name.lower(), t.name)
        by_config.setdefault(t.cfg.fingerprint("eval"), []).append(t.name)
        if t.name in RESERVED or t.name.startswith("06_compare") or t.name.startswith("comparison"):
            problems.append(f"trial {t.name}: the name is used by the series directory itself; name it otherwise")
    problems += [f"two trials named {first[name]!r} ({' and '.join(origins)}): give one a name: (trials:) or change "
                 "a value" for name, origins in by_name.items() if len(origins) > 1]
    problems += [f"trials {', '.join(names)} have the same config (every result-shaping parameter equal): one run "
                 "would answer both; remove the repeats" for names in by_config.values() if len(names) > 1]


def choose_baseline(spec: Spec, trials: list[Trial], problems: list[str]) -> str:
    """The trial the others are compared with: ``baseline:`` of the spec, else the trial whose config is the base
    config (nothing differs), else the first trial."""
    names = [t.name for t in trials]
    if spec.baseline is not None:
        if spec.baseline not in names:
            problems.append(f"baseline: {spec.baseline!r} is not a trial of this series (trials: {', '.join(names)})")
        return spec.baseline
    same = [t.name for t in trials if not t.values]
    return same[0] if same else names[0]


# --------------------------------------------------------------------------- state of a trial
def trial_state(trial: Trial) -> str:
    """What the trial's run directory says, read-only: ``done`` (every stage finished for this config), ``new``
    (nothing there), ``partial`` (started, interrupted or failed: `hb run` continues it), ``eval-changed`` (the
    same adapter, other evaluation parameters: 04/05 rerun), ``other`` (a run of another data/train config)."""
    path = run_dir.RunPaths(trial.run_dir).config_json
    if not path.is_file():
        return "new"
    try:
        payload = run_dir.read_json(path)
    except (OSError, ValueError):
        return "partial"
    prints = payload.get("fingerprints") or {}
    stages = payload.get("stages") or {}
    if prints.get("eval") == trial.cfg.fingerprint("eval"):
        return "done" if all((stages.get(s) or {}).get("status") == "done" for s in STAGES) else "partial"
    if prints.get("train") == trial.cfg.fingerprint("train"):
        return "eval-changed"
    finished = any((v or {}).get("status") == "done" for v in stages.values())
    return "other" if finished else "partial"


def last_error(log: Path) -> str:
    """The line of a trial's log that says why it failed (`hb run` prints ``error: ...``), else its last line."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [""])[-1][:300]


# --------------------------------------------------------------------------- series.json
class Series:
    """The series directory and its ``series.json``: spec, trials, their status, where and how long each ran.

    Only the ``hb sweep`` process writes it (atomically, at every change), so a crash loses at most the
    running trials' end times; their run directories say what they finished."""

    def __init__(self, spec: Spec, trials: list[Trial], baseline: str, root: Path) -> None:
        self.root, self.spec, self.trials, self.baseline = root, spec, trials, baseline
        self.path = root / "series.json"
        old = run_dir.read_json(self.path) if self.path.is_file() else {}
        before = {t["name"]: t for t in old.get("trials", [])}
        swept = list(dict.fromkeys(k for t in trials for k in t.values))
        self.payload: dict[str, Any] = {
            "series": spec.name, "spec_file": str(spec.path), "spec": spec.raw, "set": spec.set,
            "created": old.get("created", run_dir.utc_now()), "updated": run_dir.utc_now(),
            "baseline": baseline, "swept": swept, "sweeps": old.get("sweeps", []),
            "report": old.get("report"),
            "trials": [{**before.get(t.name, {}), "name": t.name, "origin": t.origin, "values": t.values,
                        "run_dir": str(t.run_dir), "params_file": str(self.params_file(t)),
                        "fingerprints": t.cfg.fingerprints()} for t in trials],
        }

    def params_file(self, trial: Trial) -> Path:
        return self.root / "trials" / f"{trial.name}.yaml"

    def log(self, trial: Trial) -> Path:
        return self.root / "logs" / f"{trial.name}.log"

    def entry(self, name: str) -> dict[str, Any]:
        return next(t for t in self.payload["trials"] if t["name"] == name)

    def update(self, name: str, **values: Any) -> None:
        self.entry(name).update(values)
        self.save()

    def save(self) -> None:
        self.payload["updated"] = run_dir.utc_now()
        run_dir.write_json(self.path, self.payload)


def write_params_file(trial: Trial, path: Path, spec: Spec) -> Path:
    """The trial's parameters as a flat file ``hb run`` reads (the values that differ from the defaults, plus
    experiment and output_root): ``hb run <series>/trials/<trial>.yaml`` reruns one trial by hand."""
    defaults = ExperimentConfig()
    values = {k: v for k, v in trial.cfg.to_dict().items()
              if k in ("experiment", "output_root") or v != getattr(defaults, k)}
    text = (f"# Trial {trial.name} of the series {spec.name} ({spec.path}), written by hb sweep: every parameter that "
            "differs from the defaults.\n" + yaml.safe_dump(values, sort_keys=False, allow_unicode=True, width=1000))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    if read_params_file(path) and ExperimentConfig(**read_params_file(path)).fingerprint() != trial.cfg.fingerprint():
        raise RuntimeError(f"{path} does not reproduce trial {trial.name}")  # a bug in this function
    return path


# --------------------------------------------------------------------------- running the series
class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during a sweep; ``str()`` is the one line ``hb sweep`` prints."""


@dataclass
class SweepResult:
    series_dir: Path
    statuses: dict[str, str]
    report: Path | None = None
    report_error: str | None = None

    @property
    def failed(self) -> list[str]:
        return [n for n, s in self.statuses.items() if s == "failed"]


def _seconds(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def where_text(where: Mapping[str, Any] | None) -> str:
    if not where:
        return "-"
    if where.get("executor") == "ray":
        if not where.get("node_ip"):
            return f"ray task queued at {where.get('submitted_to', '?')}"
        return f"ray node {where['node_ip']} ({where.get('host', '?')}), gpu {where.get('gpus') or 'none'}"
    return f"{where.get('host', '?')}, {'gpu ' + where['gpus'] if where.get('gpus') else 'cpu'}"


def end_table(series: Series) -> str:
    """trial | status | time | where, one line each (the last thing ``hb sweep`` prints)."""
    rows = [("trial", "status", "time", "where")]
    for t in series.payload["trials"]:
        status = t.get("status", "pending")
        rows.append((t["name"] + (" (baseline)" if t["name"] == series.baseline else ""), status,
                     _seconds(t.get("seconds")), where_text(t.get("where"))))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:{widths[0]}}  {r[1]:{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows)


def check_existing(trials: list[Trial], overwrite: bool) -> None:
    """RunError naming every trial whose folder holds a finished run of another data/train config (a changed
    ``set:`` keeps the names): ``hb run`` would refuse each one after the others had started."""
    clash = [t for t in trials if trial_state(t) == "other"]
    if clash and not overwrite:
        raise RunError("These trials' folders hold finished runs of another data/train config (the spec's values "
                       "changed since): " + ", ".join(str(t.run_dir) for t in clash) + ". Pass --overwrite to keep "
                       "them aside (renamed, never deleted) and run the new configs, or name the series otherwise "
                       "(series: in the spec).")


def check_data(trials: list[Trial]) -> None:
    """DataError for a trial whose dataset is a local path that does not exist (seconds, before any trial)."""
    from hb_utils.data.medquad import locate_source  # pandas: only when a trial will run

    for dataset in dict.fromkeys(t.cfg.dataset for t in trials):
        locate_source(dataset)


def make_pool(spec: Spec, trials: list[Trial], *, executor: str, address: str | None, parallel: int | None,
              gpus: str | None, gpus_per_trial: int | None, cpus_per_trial: float | None) -> executors.Executor:
    """The executor for ``trials``: flags win over the spec."""
    need = max(t.cfg.num_processes for t in trials)
    per_trial = gpus_per_trial if gpus_per_trial is not None else spec.gpus_per_trial
    cpus = cpus_per_trial if cpus_per_trial is not None else spec.cpus_per_trial
    if executor == "ray":
        return executors.RayCluster(address or spec.address, gpus_per_trial=per_trial, cpus_per_trial=cpus,
                                    min_gpus=need)
    return executors.LocalPool.create(gpus=executors.visible_gpus() if gpus is None else executors.parse_gpus(gpus),
                                      gpus_per_trial=per_trial, parallel=parallel or spec.parallel, min_gpus=need)


def run_sweep(spec: Spec, *, executor: str | None = None, address: str | None = None, parallel: int | None = None,
              gpus: str | None = None, gpus_per_trial: int | None = None, cpus_per_trial: float | None = None,
              overwrite: bool = False, report: bool = True, kernel: str = "python3", dry_run: bool = False,
              resume_command: str | None = None, echo: Callable[[str], None] = print) -> SweepResult:
    """Validate every trial, skip the finished ones, run the rest (a failure never stops the others), record
    everything in series.json, print the end table and make the series report. Ctrl-C / SIGTERM stop every
    running trial (each `hb run` marks its stage interrupted) and raise :class:`SweepInterrupted`."""
    trials, _, baseline = expand(spec)
    kind = executor or spec.executor
    if kind not in EXECUTORS:
        raise ConfigError(f"--executor must be one of {', '.join(EXECUTORS)}, got {kind!r}.")
    root = series_dir(spec)
    states = {t.name: trial_state(t) for t in trials}
    todo = [t for t in trials if states[t.name] != "done"]
    echo(f"series {spec.name}: {len(trials)} trial(s) in {root}; baseline {baseline}; "
         f"{len(trials) - len(todo)} finished earlier, {len(todo)} to run")
    if dry_run:
        for t in trials:
            echo(f"  {t.name:40s} {states[t.name]:12s} {t.origin}")
        return SweepResult(root, {t.name: "dry-run" for t in trials})
    check_existing(todo, overwrite)
    if todo:
        check_data(todo)
    run_dir.claim_dir(root, made_by="hb sweep", what="series directory")
    pool = None
    if todo:  # a wrong address, missing resources or storage the workers cannot see fail here, in seconds
        pool = make_pool(spec, todo, executor=kind, address=address, parallel=parallel, gpus=gpus,
                         gpus_per_trial=gpus_per_trial, cpus_per_trial=cpus_per_trial)
    command = resume_command or f"hb sweep {shlex.quote(str(spec.path))}"
    try:
        if pool is not None:
            pool.check(root)
        series = Series(spec, trials, baseline, root)
        for t in trials:
            write_params_file(t, series.params_file(t), spec)
            if states[t.name] == "done":
                series.entry(t.name)["status"] = "skipped"
            elif series.entry(t.name).get("status") in (None, "running", "skipped", "done"):
                series.entry(t.name)["status"] = "pending"
        record = {"started": run_dir.utc_now(), "executor": kind, "command": command, "host": socket.gethostname()}
        series.payload["sweeps"].append(record)
        series.save()
        if pool is not None:
            echo(f"executor: {pool.describe()}")
            _execute(series, todo, pool, spec, overwrite=overwrite, kernel=kernel, command=command, echo=echo)
    finally:
        if pool is not None:
            pool.close()
    record["finished"] = run_dir.utc_now()
    series.save()
    statuses = {t["name"]: t.get("status", "pending") for t in series.payload["trials"]}
    echo(end_table(series))
    result = SweepResult(root, statuses)
    if report:
        try:
            result.report = make_report(series, kernel=kernel, echo=echo)
        except Exception as exc:  # a failing report must not hide the trials' table printed above
            result.report_error = f"{type(exc).__name__}: {exc}" if not isinstance(exc, HBError) else str(exc)
            echo(f"series report not made: {result.report_error}")
    failed = result.failed
    if failed:
        echo(f"{len(failed)} trial(s) failed ({', '.join(failed)}): their logs are in {root / 'logs'}; rerun "
             f"`{command}` to retry them (finished trials are skipped).")
    return result


def _job(series: Series, trial: Trial, spec: Spec, kind: str, *, overwrite: bool, kernel: str) -> executors.Job:
    argv = [*HB_COMMAND, "run", str(series.params_file(trial)), "--kernel", kernel]
    if overwrite:
        argv.append("--overwrite")
    env = {"HB_HEADLESS": "1", "PYTHONUNBUFFERED": "1", "HB_TRACKIO_PROJECT": spec.name}  # trackio: one project
    return executors.Job(name=trial.name, argv=argv, env=env, log=series.log(trial), cwd=str(run_dir.repo_root()))


def _execute(series: Series, todo: list[Trial], pool: executors.Executor, spec: Spec, *, overwrite: bool,
             kernel: str, command: str, echo: Callable[[str], None]) -> None:
    queue = list(todo)
    by_name = {t.name: t for t in todo}
    handlers = _install_signal_handlers()
    try:
        while queue or pool.running():
            while queue and pool.has_room():
                trial = queue.pop(0)
                job = _job(series, trial, spec, pool.kind, overwrite=overwrite, kernel=kernel)
                job.log.parent.mkdir(parents=True, exist_ok=True)
                with job.log.open("a") as fh:
                    fh.write(f"\n===== {run_dir.utc_now()} hb sweep starts trial {trial.name}: "
                             f"{shlex.join(['python' if a == PYTHON else a for a in job.argv])}\n")
                where = pool.start(job)
                series.update(trial.name, status="running", started=run_dir.utc_now(), where=where,
                              log=str(job.log), finished=None, seconds=None, error=None)
                echo(f"started  {trial.name} ({where_text(where)})")
            for job, outcome in pool.poll():
                _record(series, by_name[job.name], job, outcome, echo)
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        stopping = [j.name for j in pool.running()]
        try:
            pool.stop_all(STOP_GRACE_S)
        except KeyboardInterrupt:  # a second Ctrl-C: no more waiting
            pool.kill_all()
        for job, outcome in pool.poll():
            outcome.interrupted = True
            _record(series, by_name[job.name], job, outcome, lambda _: None)
        for trial in queue:
            series.update(trial.name, status="pending")
        raise SweepInterrupted(
            ("interrupted; stopped " + ", ".join(stopping) + " (each run keeps what it finished)" if stopping
             else "interrupted") + f"; resume with: {command}") from None
    finally:
        _restore_signal_handlers(handlers)


def _record(series: Series, trial: Trial, job: executors.Job, outcome: executors.Outcome,
            echo: Callable[[str], None]) -> None:
    state = trial_state(trial)
    if outcome.returncode == 0 and state == "done":
        status = "done"
    elif outcome.interrupted or outcome.returncode in (130, -signal.SIGINT):
        status = "interrupted"
    else:
        status = "failed"
    error = None if status == "done" else (last_error(job.log) or f"exit status {outcome.returncode}")
    series.update(trial.name, status=status, finished=run_dir.utc_now(), seconds=round(outcome.seconds, 1),
                  where=outcome.where or series.entry(trial.name).get("where"), returncode=outcome.returncode,
                  error=error)
    echo(f"{status:8s} {trial.name} in {_seconds(outcome.seconds)}" + (f": {error} (log {job.log})" if error else ""))


def _install_signal_handlers() -> dict[int, Any]:
    """Ctrl-C raises KeyboardInterrupt here even when the sweep was started where SIGINT is ignored (a
    background job), and SIGTERM (a scheduler, `kill`) stops the trials the same way instead of orphaning them."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = {signal.SIGINT: signal.getsignal(signal.SIGINT), signal.SIGTERM: signal.getsignal(signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_term)
    return old


def _restore_signal_handlers(old: dict[int, Any]) -> None:
    for signum, handler in old.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


# --------------------------------------------------------------------------- the series report
def make_report(series: Series, *, kernel: str = "python3", echo: Callable[[str], None] = print) -> Path | None:
    """06_compare executed into the series directory: every finished trial against the baseline. Skipped (with
    a line saying why) when the baseline or every other trial has not finished, and when the report is newer
    than every trial's metrics (a rerun where everything was skipped answers in seconds)."""
    finished = [t for t in series.trials
                if series.entry(t.name).get("status") in ("done", "skipped") and trial_state(t) == "done"]
    names = [t.name for t in finished]
    if series.baseline not in names or len(finished) < 2:
        echo("series report not made: it needs the baseline trial "
             f"({series.baseline}) and at least one other finished trial")
        return None
    inputs = {t.name: _mtime(t.run_dir / "metrics" / "eval.json") for t in finished}
    old = series.payload.get("report") or {}
    html = series.root / "06_compare.html"
    if old.get("inputs") == inputs and old.get("baseline") == series.baseline and html.is_file():
        echo(f"series report up to date: {html}")
        return html
    from hb_utils.runs.compare import compare_runs  # pandas, matplotlib: only when a report is made

    files = compare_runs([str(t.run_dir) for t in finished], out_dir=str(series.root), report=True, kernel=kernel,
                         baseline=series.baseline, swept=series.payload["swept"],
                         title=f"Series {series.spec.name}")
    series.payload["report"] = {"inputs": inputs, "baseline": series.baseline, "made": run_dir.utc_now(),
                                "html": str(files.get("html"))}
    series.save()
    echo(f"series report: {files.get('html')}")
    return files.get("html")


def _mtime(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.is_file() else None


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


