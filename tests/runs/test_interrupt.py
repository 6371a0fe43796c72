"""Ctrl-C during `hb run`: one line, exit 130, the stage marked interrupted, the kernel gone, at any moment.

papermill runs the kernel start and every cell on one event loop; an interrupt used to leave nbclient's tasks
pending there, and whether one of them noticed the kernel dying during the cleanup was a matter of timing
("Kernel died while waiting for execute reply." plus asyncio's "Task exception was never retrieved"). So the
interrupt lands at several moments here: while the kernel starts, in a busy cell, and between many short cells.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from hb_utils.config import load_config
from hb_utils.runs import runner
from tests.conftest import ROOT
from tests.runs.test_runner import fixture_notebook

DRIVER = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's Ctrl-C, even when started in the background
sys.path.insert(0, {root!r})
from pathlib import Path
import nbformat
from hb_utils import cli
from hb_utils.runs import runner
from tests.runs.test_runner import fixture_notebook
nbs = Path({nbs!r}); nbs.mkdir()
fixture_notebook(nbs / "01_eda.ipynb", "print('a')")
fixture_notebook(nbs / "02_format_split.ipynb", {body!r})
nb = nbformat.read(nbs / "02_format_split.ipynb", as_version=4)
nb.cells += [nbformat.v4.new_code_cell(source) for source in {more!r}]
nbformat.write(nb, nbs / "02_format_split.ipynb")
runner.STAGES = ["01_eda", "02_format_split"]
runner.notebook_path = lambda s: nbs / f"{{s}}.ipynb"
sys.exit(cli.main(sys.argv[1:]))
"""
# The stage's cell writes the kernel's pid to `started` (then sleeps, or the short cells follow).
STARTED = "import os, pathlib, time\npathlib.Path({marker!r}).write_text(str(os.getpid()))\n"
MOMENTS = {
    # SIGINT this long after the stage is marked running: papermill reads the notebook and starts the kernel,
    # which takes seconds to import ipykernel, so the signal lands in the kernel's start.
    "kernel-start": dict(after_running=0.3, body=STARTED + "time.sleep(120)", more=[]),
    "busy-cell": dict(after_started=1.0, body=STARTED + "time.sleep(120)", more=[]),
    # 300 cells of 10 ms: most of the time is papermill's own, saving the notebook between cells.
    "between-cells": dict(after_started=2.0, body=STARTED, more=["time.sleep(0.01)"] * 300),
}


def _wait(condition, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_ctrl_c_prints_one_line_and_marks_the_stage(tmp_path, moment):
    """SIGINT to the process group of `hb run` (what Ctrl-C in a terminal sends) while 02 runs."""
    spec = MOMENTS[moment]
    marker = tmp_path / "started"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT), nbs=str(tmp_path / "nbs"), more=spec["more"],
                                    body=spec["body"].format(marker=str(marker))))
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(driver), "run", str(ROOT / "params" / "smoke.yaml"), "-p",
                             "output_root", str(out), "-p", "dataset", str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "HB_HEADLESS": "1"})
    conf = out / "smoke" / "config.json"
    try:
        running = _wait(lambda: conf.is_file() and "02_format_split" in json.loads(conf.read_text())["stages"], 300)
        assert running, "02 never started"
        if "after_running" in spec:
            time.sleep(spec["after_running"])
            assert not marker.exists(), "the kernel started before the signal: not the moment this case tests"
        else:
            assert _wait(marker.is_file, 120), "the stage's first cell never ran"
            time.sleep(spec["after_started"])
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stdout + stderr
    assert stderr.strip().splitlines() == ["interrupted during 02_format_split; rerun the same command to resume."], \
        stderr
    assert "Traceback" not in stdout + stderr and "Kernel died" not in stdout + stderr
    assert json.loads(conf.read_text())["stages"]["02_format_split"]["status"] == "interrupted"
    if marker.is_file():  # the kernel was shut down, not left running
        pid = int(marker.read_text())
        assert _wait(lambda: not _alive(pid), 10), f"kernel {pid} still running"


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent to reap it is not)."""
    try:
        stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115 - one read
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


@pytest.mark.slow
def test_an_interrupted_cell_leaves_no_task_behind(tmp_path, monkeypatch, caplog):
    """The mechanism, in this process: after Ctrl-C in a busy cell, nothing of nbclient's is left on the event
    loop (no pending task that could wake up beside the kernel's shutdown, no task whose exception nobody
    retrieved) and nothing was logged about a dead kernel. Before, the cell's tasks were still pending after
    papermill's cleanup, or had logged "Kernel died" during it, depending on timing."""
    from jupyter_core.utils import ensure_event_loop

    marker = tmp_path / "started"
    fixture_notebook(tmp_path / "busy.ipynb", STARTED.format(marker=str(marker)) + "time.sleep(120)")
    monkeypatch.setattr(runner, "notebook_path", lambda stage: tmp_path / "busy.ipynb")
    cfg = load_config(output_root=str(tmp_path / "out"), experiment="e")

    def ctrl_c_when_busy() -> None:
        if _wait(marker.is_file, 120):
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c_when_busy, daemon=True).start()
    with caplog.at_level(logging.INFO, logger="papermill"), pytest.raises(KeyboardInterrupt):
        runner.execute_stage("02_format_split", cfg, tmp_path / "reports")
    loop = ensure_event_loop()
    assert [t for t in asyncio.all_tasks(loop) if not t.done()] == []
    reported: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    gc.collect()  # a finished task whose exception nobody retrieved reports it when collected
    assert reported == []
    assert "Kernel died" not in caplog.text
    assert _wait(lambda: not _alive(int(marker.read_text())), 10), "the kernel is still running"
