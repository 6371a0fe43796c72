"""Ctrl-C during `hb run`: one line, exit 130, the stage marked interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT

DRIVER = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's Ctrl-C, even when started in the background
sys.path.insert(0, {root!r})
from pathlib import Path
from hb_utils import cli
from hb_utils.config import stage_fields
from hb_utils.runs import runner
from tests.runs.test_runner import fixture_notebook
nbs = Path({nbs!r}); nbs.mkdir()
fixture_notebook(nbs / "01_a.ipynb", "print('a')")
fixture_notebook(nbs / "02_b.ipynb", "import time\\nprint('sleeping', flush=True)\\ntime.sleep(120)")
runner.STAGES = ["01_a", "02_b"]
runner.stage_fields = lambda s: stage_fields(None)  # the fixture stages read every field
runner.notebook_path = lambda s: nbs / f"{{s}}.ipynb"
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_ctrl_c_prints_one_line_and_marks_the_stage(tmp_path):
    """SIGINT to the process group of `hb run` (what Ctrl-C in a terminal sends) while a notebook runs."""
    import time

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT), nbs=str(tmp_path / "nbs")))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(driver), "run", str(ROOT / "params" / "smoke.yaml"),
                             "-p", "output_root",
                             str(out), "-p", "dataset", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, "HB_HEADLESS": "1"})
    conf = out / "smoke" / "config.json"
    deadline = time.time() + 300
    while time.time() < deadline and not (conf.is_file() and "02_b" in json.loads(conf.read_text())["stages"]):
        time.sleep(0.5)
    time.sleep(5)  # the kernel of 02_b is busy in its cell
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stdout + stderr
    assert stderr.strip().splitlines() == ["interrupted during 02_b; rerun the same command to resume."], stderr
    assert "Traceback" not in stdout + stderr
    assert json.loads(conf.read_text())["stages"]["02_b"]["status"] == "interrupted"


