"""The run-directory layout under ``outputs/<experiment>/``, in one place.

Why: every notebook reads what the previous one wrote; if each built its own paths they would
drift apart, and a notebook run from ``notebooks/`` would write somewhere else than one run from
the repo root. All relative paths here resolve against the repository root, never the cwd.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hb_utils.config import ExperimentConfig

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
