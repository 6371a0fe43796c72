"""The one owner of ``outputs/<experiment>/``: its layout, atomic writes, and the stamp every artifact carries.

Why: every notebook reads what the previous one wrote. If each built its own paths they would drift
apart, and a notebook run from ``notebooks/`` would write somewhere else than one run from the repo
root (all relative paths here resolve against the repository root, never the cwd). And every artifact
(split, checkpoints, adapter, metrics) must say which config made it, in one shape
(:func:`stamp`: fingerprints of the config scopes that shaped it, the parameters themselves, UTC
time, what made it), checked by one guard (:func:`require`) whose message names the parameters that
differ and the fix — so a notebook never uses, or silently replaces, an artifact of another config.
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
from hb_utils.errors import RunError

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
