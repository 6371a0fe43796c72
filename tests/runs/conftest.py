"""Fixtures of the run tests: a fresh world for each bad-input case."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hb_utils.model.source import model_cache_root
from hb_utils.runs import runner
from tests.runs.world import World, fake_stage, make_world


@pytest.fixture
def world(tmp_path, monkeypatch) -> World:
    """A fresh world, $HOME pointed into it (caches pinned where they were, so nothing else lands there)."""
    caches = {"HB_CACHE_DIR": str(model_cache_root()),
              "HF_HOME": os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface"),
              "MPLCONFIGDIR": os.environ.get("MPLCONFIGDIR") or str(Path.home() / ".config" / "matplotlib")}
    w = make_world(tmp_path)
    for key, value in caches.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HOME", str(w.home))
    monkeypatch.setenv("HB_HEADLESS", "1")
    monkeypatch.setattr(runner, "execute_stage", fake_stage(w))
    return w


