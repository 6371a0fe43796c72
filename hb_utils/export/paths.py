"""Where one run's export lives: ``outputs/<experiment>/export/`` and the files in it.

Its own module because the merge, the GGUF writer, the model card and the chat app all need the
layout, and none of them should import another just to learn a path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hb_utils.config import ExperimentConfig
from hb_utils.run_dir import RunPaths

MARKER = "hb_export.json"
EXPORT_CONFIG = "healthbot_config.json"  # the run's config next to the merged weights: `hb chat` reads its prompt


@dataclass(frozen=True)
class ExportPaths:
    """Every file of one run's export."""

    root: Path

    @classmethod
    def for_config(cls, cfg: ExperimentConfig) -> ExportPaths:
        return cls(RunPaths.for_config(cfg).root / "export")

    merged = property(lambda self: self.root / "merged")
    marker = property(lambda self: self.root / MARKER)
    measurement = property(lambda self: self.root / "merge_measurement.json")
    gguf = property(lambda self: self.root / "gguf")
