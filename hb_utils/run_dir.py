"""The one owner of ``outputs/<experiment>/``: its layout, who may write there, atomic writes, and the stamp
every artifact carries.

Why: every notebook reads what the previous one wrote. If each built its own paths they would drift
apart, and a notebook run from ``notebooks/`` would write somewhere else than one run from the repo
root (all relative paths here resolve against the repository root, never the cwd). And every artifact
(split, checkpoints, adapter, metrics) must say which config made it, in one shape
(:func:`stamp`: fingerprints of the config scopes that shaped it, the parameters themselves, UTC
time, what made it), checked by one guard (:func:`require`) whose message names the parameters that
differ and the fix — so a notebook never uses, or silently replaces, an artifact of another config.

Bad input must never do harm outside the kit's own folders. ``output_root`` and ``experiment`` are
user input: ``-p output_root /`` or ``~`` with ``-p experiment Documents --overwrite`` once wrote at the
filesystem root or renamed a home folder aside. So the kit writes only into directories it created and
marked as its own (:data:`MARKER`, written by :func:`claim`, which every writer calls first: ``hb run``,
each notebook's first cell, the library functions that write a run's artifacts, ``hb compare``), and
``--overwrite`` moves aside (:func:`move_aside`) only a marked directory. :func:`check_output_root`
refuses the filesystem root, the home directory (and its parents) and files.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hb_utils.config import FINGERPRINT_SCOPES, ExperimentConfig, fields_in
from hb_utils.errors import ConfigError, RunError

SPLITS = ("train", "val", "test")


def repo_root() -> Path:
    """The repository root: $HB_ROOT, else the folder above the installed ``hb_utils`` package
    when it holds ``pyproject.toml`` (editable/source install), else the current directory."""
    env = os.environ.get("HB_ROOT")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve().parent.parent
    if (here / "pyproject.toml").is_file():
        return here
    return Path.cwd().resolve()


def resolve(path: str | os.PathLike[str]) -> Path:
    """An absolute path: absolute paths unchanged, relative ones against the repo root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (repo_root() / p).resolve()


# --------------------------------------------------------------------------- whose folder is it?
MARKER = ".hb_run"  # in every directory the kit created: a run directory or an `hb compare` output folder


def check_output_root(output_root: str | os.PathLike[str], name: str = "output_root",
                      example: str = "-p output_root outputs") -> Path:
    """``output_root`` resolved, or ConfigError when the kit must not create run directories there.

    Any writable directory is fine (Colab users point it at Drive; it is created when missing), except
    the filesystem root, the home directory itself or one of its parents, and a file.
    """
    root = resolve(output_root)
    home = Path.home().resolve()
    fix = f"Set {name} to a folder of its own, e.g. {example} (relative paths: to the repository root)."
    if root == Path(root.anchor):
        raise ConfigError(f"{name} {str(output_root)!r} is the filesystem root ({root}); runs are never written "
                          f"there. {fix}")
    if root == home or root in home.parents:
        raise ConfigError(f"{name} {str(output_root)!r} is "
                          f"{'your home directory' if root == home else 'a parent of your home directory'} "
                          f"({root}); runs are never written there, beside your own folders. {fix}")
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{name} {str(output_root)!r} is not a directory: {probe} is a file. {fix}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{name} {str(output_root)!r} is not writable ({probe} is read-only for you). {fix}")
    return root


def is_kit_dir(path: Path) -> bool:
    """True when ``path`` is a directory the kit created: it holds :data:`MARKER`, or (runs made before the
    marker existed) a ``config.json`` written by ``hb run`` or a stamped split or adapter."""
    if (path / MARKER).is_file():
        return True
    for rel, shape in (("config.json", ("config", "fingerprints")), ("data/stats.json", ("stamp",)),
                       ("adapter/hb_meta.json", ("stamp",))):
        try:
            legacy = read_json(path / rel)
        except (OSError, ValueError):
            continue
        if isinstance(legacy, dict) and all(isinstance(legacy.get(k), dict) for k in shape):
            return True
    return False


def check_claimable(path: Path, what: str = "run directory") -> None:
    """RunError unless ``path`` is free, an empty folder, or a folder the kit made (reads only)."""
    if path.exists() and not path.is_dir():
        raise RunError(f"{path} is a file, not a {what}; it is left alone. Choose another experiment name.")
    if path.is_dir() and any(path.iterdir()) and not is_kit_dir(path):
        raise RunError(f"{path} exists and was not made by this kit (it has no {MARKER}), so nothing is written "
                       "into it, moved or replaced, even with --overwrite. Choose another experiment name "
                       "(-p experiment NAME) or output_root.")


def claim_dir(path: Path, *, made_by: str, what: str = "run directory") -> Path:
    """Create ``path`` and mark it as the kit's, or accept it when the kit made it; RunError for anything
    else that exists (a user's folder, a file): it is never written into."""
    check_claimable(path, what)
    path.mkdir(parents=True, exist_ok=True)
    if not (path / MARKER).is_file():
        write_json(path / MARKER, {"kit": "hb_utils", "what": what, "created": utc_now(), "made_by": made_by})
    return path


def claim(cfg: ExperimentConfig, *, made_by: str) -> RunPaths:
    """The run directory of ``cfg``, checked (:func:`check_output_root`, :func:`claim_dir`) and created.

    Every writer of a run's artifacts calls this first, so a notebook run on its own (papermill, Jupyter)
    is held to the same rule as ``hb run``.
    """
    paths = RunPaths(check_output_root(cfg.output_root) / cfg.experiment)
    claim_dir(paths.root, made_by=made_by)
    return paths


def unique_sibling(path: Path) -> Path:
    """``path`` itself when free, else ``path-2``, ``path-3`` … (the first that does not exist)."""
    candidate, n = path, 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def move_aside(root: Path) -> Path:
    """Rename the kit's directory ``root`` to ``<name>.replaced-<UTC time>`` (a free name) and return where it
    went. Refuses (RunError) a directory without the kit's marker: --overwrite never moves a user's folder."""
    if not is_kit_dir(root):
        raise RunError(f"{root} was not made by this kit (no {MARKER}); it is not moved, even with --overwrite. "
                       "Choose another experiment name or output_root.")
    target = aside_path(root)
    os.rename(root, target)  # same folder: atomic; never into an existing directory (shutil.move would)
    return target


def aside_path(root: Path) -> Path:
    """A free sibling name ``<name>.replaced-<UTC time>`` for a folder being replaced (never overwritten)."""
    stamp_ = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return unique_sibling(root.with_name(f"{root.name}.replaced-{stamp_}"))


@dataclass(frozen=True)
class RunPaths:
    """Every file and folder of one run."""

    root: Path

    @classmethod
    def for_config(cls, cfg: ExperimentConfig) -> RunPaths:
        return cls(resolve(cfg.output_root) / cfg.experiment)

    @property
    def config_json(self) -> Path:
        return self.root / "config.json"

    @property
    def data(self) -> Path:
        return self.root / "data"

    def split(self, name: str) -> Path:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return self.data / f"{name}.jsonl"

    @property
    def data_stats(self) -> Path:
        return self.data / "stats.json"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def plot(self, name: str) -> Path:
        return self.plots / f"{name}.png"

    @property
    def export(self) -> Path:
        return self.root / "export"


def utc_now() -> str:
    """The timestamp every artifact records (UTC, seconds)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_json(path: Path, payload: Any) -> Path:
    """Write JSON atomically (temp file + rename), so a killed kernel never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)
    return path


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write JSON lines atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with Path(path).open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_dir_atomically(target: Path, write: Callable[[Path], None], *, marker: str) -> Path:
    """Let ``write`` fill a temporary sibling of ``target``, then rename it into place.

    A crash or kill inside ``write`` leaves no ``target`` (the temporary folder is removed when Python
    still can); when another process renamed a complete ``target`` (holding ``marker``) first, that one
    is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        write(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / marker).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------- stamps
def stamp(cfg: ExperimentConfig, scope: str, made_by: str) -> dict[str, Any]:
    """What every artifact records about its origin: the fingerprints of the config scopes that shaped
    it (``data`` ⊂ ``train`` ⊂ ``eval``), those parameters' values (so a mismatch can name them), the
    UTC time and the stage or function that made it."""
    scopes = FINGERPRINT_SCOPES[scope]
    return {"fingerprints": {s: cfg.fingerprint(s) for s in scopes},
            "scope": scope, "params": {n: getattr(cfg, n) for n in fields_in(*scopes)},
            "created": utc_now(), "made_by": made_by}


def stamp_matches(found: dict[str, Any] | None, cfg: ExperimentConfig, scope: str) -> bool:
    """True when ``found`` (a stamp) was made by ``cfg``'s parameters of ``scope``."""
    return bool(found) and found.get("fingerprints", {}).get(scope) == cfg.fingerprint(scope)


def differing(found: dict[str, Any] | None, cfg: ExperimentConfig, scope: str) -> list[str]:
    """``name: old -> new`` for each parameter of ``scope`` that differs between a stamp and ``cfg``."""
    params = (found or {}).get("params") or {}
    return [f"{name}: {params[name]!r} -> {value!r}" for name, (_, value) in cfg.differences(params, scope).items()
            if name in params]


def require(found: dict[str, Any] | None, cfg: ExperimentConfig, scope: str, *, what: str | Path,
            fix: str) -> None:
    """Raise RunError unless ``found`` (the stamp of ``what``) was made by ``cfg``'s ``scope`` parameters.

    One message shape everywhere: what holds the artifact, which parameters differ (old -> this
    config), and the fix.
    """
    if stamp_matches(found, cfg, scope):
        return
    if not found:
        raise RunError(f"{what} carries no stamp, so it cannot be matched to this config. {fix}")
    changed = differing(found, cfg, scope)
    detail = "; ".join(changed) if changed else f"fingerprint {found.get('fingerprints', {}).get(scope)} -> " \
                                                 f"{cfg.fingerprint(scope)}"
    raise RunError(f"{what} was made by another {scope} config ({detail}). {fix}")


def read_stamp(path: Path, key: str = "stamp") -> dict[str, Any] | None:
    """The stamp stored under ``key`` in the JSON file ``path`` (None when the file or key is missing)."""
    path = Path(path)
    if not path.is_file():
        return None
    payload = read_json(path)
    return payload.get(key) if isinstance(payload, dict) else None


# --------------------------------------------------------------------------- checkpoints
def checkpoint_dirs(folder: Path) -> list[Path]:
    """Complete Trainer checkpoints in ``folder`` (trainer_state.json is written last), oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(p.name.split("-", 1)[1]), p) for p in folder.iterdir()
             if p.is_dir() and p.name.startswith("checkpoint-") and p.name.split("-", 1)[1].isdigit()
             and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


def run_config(run_dir: str | os.PathLike[str]) -> ExperimentConfig:
    """The config of a finished run directory (its ``config.json``), pointed at that directory.

    ``output_root``/``experiment`` are set from ``run_dir`` itself (they are bookkeeping, outside
    every fingerprint), so a run directory that was copied or moved still finds its own files.
    """
    root = resolve(run_dir)
    path = root / "config.json"
    if not path.is_file():
        raise RunError(f"{root} is not a run directory (no config.json). Pass outputs/<experiment> of a run made "
                       "by `hb run params/<file>.yaml`.")
    try:
        values = dict(read_json(path)["config"])
        values.update(output_root=str(root.parent), experiment=root.name)
        return ExperimentConfig(**values)
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise RunError(f"{path} does not hold a config this kit can read ({exc}). Rerun the experiment with "
                       "`hb run` to rewrite it.") from None
