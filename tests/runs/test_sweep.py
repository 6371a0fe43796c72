"""`hb sweep`: the spec, its validation and trial names (fast), the local pool's slots, and whole sweeps of small
fixture notebooks run as a user runs them (a subprocess per sweep, `hb run` per trial): two trials at once, a
failing trial, Ctrl-C, a trial killed mid-stage and resumed alone, the series report and the all-skipped rerun in
one series; the Ray executor against a real local cluster in another. The real smoke series is not run here (one
real trial trains for minutes on 2 CPU cores): its spec is validated and listed (`--dry-run`), and docs/sweeps.md
times a real run."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from hb_utils import cli, run_dir
from hb_utils.config import load_config
from hb_utils.errors import ConfigError, RunError
from hb_utils.params_file import read_params_file
from hb_utils.runs import executors, sweep
from tests.conftest import ROOT, write_release

# --------------------------------------------------------------------------- specs and trials


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def base_file(tmp_path) -> Path:
    return write(tmp_path / "base.yaml", f"""
        experiment: ignored
        output_root: {tmp_path / 'out'}
        sample_size: 40
        lora_r: 8
        lora_alpha: 16
        """)


def test_stages_are_the_runners():
    from hb_utils.runs import runner

    assert sweep.STAGES == runner.STAGES


def test_grid_together_files_and_mappings_expand_in_order(tmp_path, base_file):
    write(tmp_path / "exp_long.yaml", "experiment: long\nmax_answer_words: 400\nlearning_rate: 1e-4\n")
    spec_path = write(tmp_path / "s.yaml", f"""
        series: demo
        base: {base_file}
        set: {{eval_size: 4, learning_rate: 3e-4}}
        grid:
          lora_dropout: [0.05, 0.1]
        together:
          - {{lora_r: 8, lora_alpha: 16}}
          - {{lora_r: 16, lora_alpha: 32}}
        trials:
          - {tmp_path / 'exp_long.yaml'}
          - {{name: seeded, seed: 7}}
        """)
    spec = sweep.load_spec(spec_path, {"ppl_size": 3})
    trials, base_cfg, baseline = sweep.expand(spec)
    names = [t.name for t in trials]
    assert names[:2] == ["long,lora_dropout=0.05,lora_r=8,lora_alpha=16",
                         "long,lora_dropout=0.05,lora_r=16,lora_alpha=32"]
    assert len(names) == 8 and "seeded,lora_dropout=0.1,lora_r=16,lora_alpha=32" in names
    by = {t.name: t.cfg for t in trials}
    long = by["long,lora_dropout=0.1,lora_r=8,lora_alpha=16"]
    # base < params file < set < grid/together: the file's max_answer_words stays, set overrides its learning rate
    assert (long.max_answer_words, long.learning_rate, long.eval_size, long.ppl_size, long.sample_size) == (
        400, 3e-4, 4, 3, 40)
    assert by["seeded,lora_dropout=0.05,lora_r=8,lora_alpha=16"].seed == 7
    root = tmp_path / "out" / "demo"
    assert all(t.cfg.output_root == str(root) and t.cfg.experiment == t.name for t in trials)
    assert base_cfg.lora_r == 8 and base_cfg.eval_size == 4
    # nothing differs from the base in no trial here, so the first trial is the baseline
    assert baseline == names[0]


def test_baseline_defaults_to_the_base_configs_trial(tmp_path, base_file):
    spec = sweep.load_spec(write(tmp_path / "s.yaml", f"base: {base_file}\ngrid: {{lora_r: [4, 8, 16]}}\n"))
    trials, _, baseline = sweep.expand(spec)
    assert [t.name for t in trials] == ["lora_r=4", "lora_r=8", "lora_r=16"]
    assert baseline == "lora_r=8" and trials[1].values == {} and trials[0].values == {"lora_r": 4}
    assert sweep.series_dir(spec) == tmp_path / "out" / "s"


def test_every_bad_trial_is_listed_in_one_error(tmp_path, base_file):
    spec = sweep.load_spec(write(tmp_path / "s.yaml", f"""
        base: {base_file}
        grid:
          lora_r: [8, 8]
          lora_dropout: [0.05, 1.5]
          lora_rr: [1]
        trials:
          - {{name: a, learning_rate: 0}}
          - {{name: b}}
        baseline: nope
        """))
    with pytest.raises(ConfigError) as err:
        sweep.expand(spec)
    text = str(err.value)
    assert "nothing was started" in text
    assert "grid: unknown parameter 'lora_rr' (did you mean 'lora_r'?)" in text
    assert "lora_dropout must be < 1.0, got 1.5" in text
    assert "learning_rate must be > 0.0" in text  # trial a, every grid point
    assert "two trials named 'b,lora_r=8,lora_dropout=0.05,lora_rr=1'" in text
    assert "baseline: 'nope' is not a trial" in text


def test_spec_shape_errors_are_listed_together(tmp_path):
    spec = write(tmp_path / "s.yaml", """
        base: params/nope.yaml
        sets: {a: 1}
        grid: {lora_r: [], seed: 3}
        together: [{lora_r: 8}, {lora_alpha: 16}]
        set: {experiment: x}
        executor: slurm
        gpus_per_trial: -1
        """)
    with pytest.raises(ConfigError) as err:
        sweep.load_spec(spec)
    text = str(err.value)
    for part in ("unknown key 'sets'", "base: 'params/nope.yaml' does not exist", "grid.lora_r: the list is empty",
                 "grid.seed: must be a list", "every setting must name the same parameters",
                 "set.experiment", "executor: must be one of local, ray", "gpus_per_trial: must be an integer >= 0"):
        assert part in text, part
    assert cli.main(["sweep", str(spec)]) == 2


def test_same_config_twice_and_reserved_names_are_refused(tmp_path, base_file):
    spec = sweep.load_spec(write(tmp_path / "s.yaml", f"""
        base: {base_file}
        trials:
          - {{name: logs, seed: 1}}
          - {{name: one, seed: 2}}
          - {{name: two, seed: 2}}
        """))
    with pytest.raises(ConfigError, match=r"(?s)used by the series directory.*trials one, two have the same config"):
        sweep.expand(spec)


@pytest.mark.parametrize(("value", "text"), [(16, "16"), (1e-4, "1e-4"), (2.5e-5, "2.5e-5"), (0.05, "0.05"),
                                             (3.0, "3"), (True, "true"), (["q_proj", "v_proj"], "q_proj+v_proj"),
                                             ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "TinyLlama-1.1B-Chat-v1.0"),
                                             (".hidden", "hidden")])
def test_values_in_trial_names(value, text):
    assert sweep.format_value(value) == text


def test_yaml_text_and_numbers_name_a_trial_alike():
    assert sweep.trial_name({"learning_rate": "1e-4", "lora_r": 16}) == "learning_rate=1e-4,lora_r=16"
    assert sweep.trial_name({"learning_rate": 0.0001}) == "learning_rate=1e-4"


def test_the_seed_series_spec_reproduces_the_experiment_files():
    spec = sweep.load_spec(ROOT / "params" / "series_exp1-4.yaml", {"output_root": "/tmp/x"})
    trials, _, baseline = sweep.expand(spec)
    assert [t.name for t in trials] == ["exp1", "exp2_rank16", "exp3_epochs3", "exp4_lr1e-4"] and baseline == "exp1"
    for t in trials:  # each file's changes on top of Experiment 1 ("everything else = Experiment 1")
        changes = read_params_file(ROOT / "params" / f"{t.name}.yaml")
        expected = load_config(ROOT / "params" / "exp1.yaml", **changes)
        assert t.cfg.fingerprints() == expected.fingerprints(), t.name
        assert {k: getattr(t.cfg, k) for k in changes if k != "experiment"} == {
            k: getattr(load_config(**{k: v}), k) for k, v in changes.items() if k != "experiment"}


def test_smoke_series_spec_is_valid(tmp_path, capsys):
    spec = ROOT / "params" / "series_smoke.yaml"
    trials, _, baseline = sweep.expand(sweep.load_spec(spec))
    assert len(trials) in (2, 3) and baseline == trials[0].name == "lora_r=8,lora_alpha=16"
    assert all(t.cfg.model_name == "smollm2-135m-instruct" for t in trials)
    smoke = load_config(ROOT / "params" / "smoke.yaml")  # the baseline trial is the smoke run itself
    assert trials[0].cfg.fingerprints() == smoke.fingerprints()
    assert cli.main(["sweep", str(spec), "--dry-run", "-p", "output_root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"series series_smoke: 2 trial(s) in {tmp_path / 'series_smoke'}; baseline lora_r=8,lora_alpha=16" in out
    assert "lora_r=16,lora_alpha=32" in out and not (tmp_path / "series_smoke").exists()  # nothing ran


def test_params_file_reproduces_the_trial(tmp_path, base_file):
    spec = sweep.load_spec(write(tmp_path / "s.yaml", f"base: {base_file}\ngrid: {{learning_rate: [1e-4]}}\n"))
    (trial,), _, _ = sweep.expand(spec)
    path = sweep.write_params_file(trial, tmp_path / "t.yaml", spec)
    assert load_config(path).fingerprints() == trial.cfg.fingerprints()
    assert load_config(path).experiment == "learning_rate=1e-4"


def test_trial_state_reads_the_run_directory(tmp_path, base_file):
    spec = sweep.load_spec(write(tmp_path / "s.yaml", f"base: {base_file}\ngrid: {{seed: [1]}}\n"))
    (trial,), _, _ = sweep.expand(spec)
    assert sweep.trial_state(trial) == "new"
    conf = trial.run_dir / "config.json"
    stages = {s: {"status": "done"} for s in sweep.STAGES}
    payload = {"config": trial.cfg.to_dict(), "fingerprints": trial.cfg.fingerprints(), "stages": stages}
    write(conf, json.dumps(payload))
    assert sweep.trial_state(trial) == "done"
    stages["03_train_qlora"] = {"status": "interrupted"}
    write(conf, json.dumps(payload))
    assert sweep.trial_state(trial) == "partial"
    other = trial.cfg.replace(lora_r=4)
    write(conf, json.dumps({**payload, "fingerprints": other.fingerprints()}))
    assert sweep.trial_state(trial) == "other"
    with pytest.raises(RunError, match="--overwrite"):
        sweep.check_existing([trial], overwrite=False)
    write(conf, json.dumps({**payload, "fingerprints": trial.cfg.replace(eval_size=3).fingerprints()}))
    assert sweep.trial_state(trial) == "eval-changed"


def test_end_table_and_the_line_that_says_why(tmp_path, base_file):
    log = write(tmp_path / "t.log", "experiment x\n01_eda done\nerror: 04_evaluate failed in cell 3: boom\n"
                "partial report: r.ipynb\n")
    assert sweep.last_error(log) == "error: 04_evaluate failed in cell 3: boom"
    assert sweep.last_error(write(tmp_path / "u.log", "Traceback\nRuntimeError: Kernel died\n")) == (
        "RuntimeError: Kernel died")
    spec = sweep.load_spec(write(tmp_path / "s.yaml", f"base: {base_file}\ngrid: {{lora_r: [8, 16]}}\n"))
    trials, _, baseline = sweep.expand(spec)
    series = sweep.Series(spec, trials, baseline, sweep.series_dir(spec))
    series.entry("lora_r=8").update(status="skipped")
    series.entry("lora_r=16").update(status="failed", seconds=75.2, where={"executor": "local", "host": "h",
                                                                          "gpus": "1"})
    lines = sweep.end_table(series).splitlines()
    assert lines[0].split() == ["trial", "status", "time", "where"]
    assert lines[1].split() == ["lora_r=8", "(baseline)", "skipped", "-", "-"]
    assert lines[2].split() == ["lora_r=16", "failed", "1m15s", "h,", "gpu", "1"]
    assert sweep.where_text({"executor": "ray", "node_ip": "10.0.0.2", "host": "n2", "gpus": "0"}) == (
        "ray node 10.0.0.2 (n2), gpu 0")


# --------------------------------------------------------------------------- the local pool
def test_local_pool_gives_each_trial_its_own_gpus(tmp_path):
    """Three GPUs, one per trial: three trials at once, each sees one GPU; two per trial: one at a time."""
    pool = executors.LocalPool.create(gpus=["0", "1", "2"], gpus_per_trial=1)
    assert pool.describe() == "local, 3 trial(s) at once, GPUs 0 | 1 | 2"
    two = executors.LocalPool.create(gpus=["0", "1", "2"], gpus_per_trial=2)
    assert [s for s in two.slots] == [["0", "1"]]
    assert executors.LocalPool.create(gpus=["0", "1"], min_gpus=2).slots == [["0", "1"]]  # num_processes 2
    with pytest.raises(ConfigError, match="num_processes=2 but gpus_per_trial=1"):
        executors.LocalPool.create(gpus=["0", "1"], gpus_per_trial=1, min_gpus=2)
    with pytest.raises(ConfigError, match="no GPU is visible"):
        executors.LocalPool.create(gpus=[], gpus_per_trial=1)
    cpu = executors.LocalPool.create(gpus=[], parallel=2)
    assert cpu.slots == [None, None] and cpu.threads >= 1
    assert executors.LocalPool.create(gpus=["0"], gpus_per_trial=0).slots == [[]]  # CPU trials hide the GPU

    code = "import os, time; print(os.environ.get('CUDA_VISIBLE_DEVICES')); time.sleep(1.5)"
    jobs = [executors.Job(f"t{i}", [executors.PYTHON, "-c", code], {}, tmp_path / f"t{i}.log", str(tmp_path))
            for i in range(4)]
    started = [pool.start(j) for j in jobs[:3]]
    assert not pool.has_room() and [w["gpus"] for w in started] == ["0", "1", "2"]
    finished = []
    while len(finished) < 3:
        finished += pool.poll()
        time.sleep(0.1)
    assert pool.has_room() and pool.start(jobs[3])["gpus"] == "0"
    while len(finished) < 4:
        finished += pool.poll()
        time.sleep(0.1)
    assert all(o.returncode == 0 for _, o in finished)
    assert [(tmp_path / f"t{i}.log").read_text().strip() for i in range(4)] == ["0", "1", "2", "0"]


def test_gpus_come_from_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert executors.visible_gpus() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert executors.visible_gpus() == []


def test_a_bad_ray_address_fails_within_seconds():
    pytest.importorskip("ray")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    t0 = time.monotonic()
    with pytest.raises(RunError, match=rf"No Ray cluster answers at 127.0.0.1:{port}.*ray start --head"):
        executors.RayCluster(f"127.0.0.1:{port}")
    with pytest.raises(ConfigError, match="not host:port"):
        executors.RayCluster("somewhere")
    assert time.monotonic() - t0 < 15


def test_ray_refuses_an_output_root_a_node_cannot_see(tmp_path):
    """RayCluster.check with Ray's calls answered here, no cluster: the kit's real probe runs once per node, and on
    the second node the series folder is not mounted (its probe finds no token file). Refused, naming that node;
    the token file is removed. (The sweep on a real cluster below passes the same check.)"""
    pytest.importorskip("ray")
    nodes = {"a" * 56: "10.0.0.1", "b" * 56: "10.0.0.2"}

    class Remote:
        def __init__(self, fn):
            self.fn, self.node = fn, None

        def options(self, scheduling_strategy, **_):
            self.node = scheduling_strategy.node_id
            return self

        def remote(self, token_file: str, token: str) -> dict:
            if self.node == "b" * 56:  # where the share is not mounted, the path leads nowhere
                token_file = str(tmp_path / "not-mounted" / Path(token_file).name)
            return {**self.fn(token_file, token), "node_ip": nodes[self.node]}

    class StandIn:
        remote = Remote

        @staticmethod
        def get(refs, timeout):
            return refs

    cluster = object.__new__(executors.RayCluster)
    cluster.ray, cluster.nodes = StandIn(), [{"NodeID": n} for n in nodes]
    series = run_dir.claim_dir(tmp_path / "out" / "fx", made_by="test", what="series directory")
    with pytest.raises(RunError, match=r"output_root .*/out is not visible from Ray node\(s\) 10.0.0.2 \(") as err:
        cluster.check(series)
    assert "10.0.0.1" not in str(err.value) and "-p output_root /shared/path" in str(err.value)
    assert not list(series.glob(".ray-probe-*"))
    cluster.nodes = cluster.nodes[:1]
    cluster.check(series)  # every node sees it: no error


# --------------------------------------------------------------------------- whole sweeps of fixture notebooks
DRIVER = """
import os, sys
sys.path.insert(0, {root!r})
from pathlib import Path
from hb_utils import cli
from hb_utils.runs import sweep
nbs = Path({nbs!r})
sweep.STAGES = ["01_eda", "04_evaluate"]  # fixture notebooks under real stage names
if sys.argv[1] == "run":  # a trial (the runner imports torch: not in the sweep's own process)
    from hb_utils.runs import runner
    runner.STAGES = sweep.STAGES
    runner.notebook_path = lambda s: nbs / f"{{s}}.ipynb"
sweep.HB_COMMAND = [sweep.PYTHON, __file__]
sweep.POLL_S = 0.2
if os.environ.get("HB_TEST_FIXED_PORTS"):  # every kernel of every process is handed the same TCP ports
    from jupyter_client.connect import LocalPortCache
    ports = iter(range(int(os.environ["HB_TEST_FIXED_PORTS"]), 65000))
    LocalPortCache.find_available_port = lambda self, ip: next(ports)
sys.exit(cli.main(sys.argv[1:]))
"""
STAGE_01 = """
from pathlib import Path
run = Path(cfg.output_root) / cfg.experiment
(run / 'count').mkdir(parents=True, exist_ok=True)
with open(run / 'count' / '01', 'a') as fh:
    fh.write('run\\n')
"""
# The last stage stands in for training and evaluation: it counts its runs, waits while <series>/hold-<trial> exists,
# fails while fail-<trial> does, then puts the trial's metrics files in place (written beforehand by prepare_metrics).
STAGE_04 = """
import shutil, time
from pathlib import Path
run, series = Path(cfg.output_root) / cfg.experiment, Path(cfg.output_root)
(run / 'count').mkdir(parents=True, exist_ok=True)
with open(run / 'count' / '04', 'a') as fh:
    fh.write('run\\n')
while (series / ('hold-' + cfg.experiment)).exists():
    time.sleep(0.2)
if (series / ('fail-' + cfg.experiment)).exists():
    raise RuntimeError('failing on purpose')
if (Path(PREPARED) / cfg.experiment).is_dir():  # the tests that make a report prepare them
    shutil.copytree(Path(PREPARED) / cfg.experiment / 'metrics', run / 'metrics', dirs_exist_ok=True)
"""


def stage_notebook(path: Path, stage: str, body: str) -> None:
    """A fixture notebook under a real stage's name: that stage's parameters cell, the config built from it with
    hb_utils.config alone (its kernel starts in a second, without torch), then ``body``."""
    import nbformat

    from hb_utils.runs.notebook import parameters_cell_source

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(parameters_cell_source(stage))
    params.metadata["tags"] = ["parameters"]
    setup = ("from hb_utils.config import ExperimentConfig, stage_fields\n"
             f"cfg = ExperimentConfig(**{{k: v for k, v in dict(globals()).items() if k in stage_fields({stage!r})}})")
    nb.cells = [params, nbformat.v4.new_code_cell(setup), nbformat.v4.new_code_cell(body)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@dataclass
class Fixture:
    """A series of two fixture trials (lora_r=8, the baseline, and lora_r=16) and the driver that runs `hb` with
    the fixture notebooks."""

    tmp: Path
    driver: Path
    spec: Path

    @property
    def series(self) -> Path:
        return self.tmp / "out" / "fx"


@pytest.fixture
def fx(tmp_path) -> Fixture:
    nbs, prepared = tmp_path / "nbs", tmp_path / "prepared"
    nbs.mkdir()
    stage_notebook(nbs / "01_eda.ipynb", "01_eda", STAGE_01)
    stage_notebook(nbs / "04_evaluate.ipynb", "04_evaluate", STAGE_04.replace("PREPARED", repr(str(prepared))))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT), nbs=str(nbs)))
    data = write_release(tmp_path / "release", n_docs=4)
    spec = write(tmp_path / "series.yaml", f"""
        series: fx
        set: {{dataset: {data}, output_root: {tmp_path / 'out'}, sample_size: 20, bootstrap_samples: 100}}
        grid:
          lora_r: [8, 16]
        """)
    return Fixture(tmp_path, driver, spec)


def prepare_metrics(fx: Fixture) -> None:
    """The metrics files 03/04 would write for each trial's config, made with the kit's own metric code (quality
    from lora_r, so the trials differ); the fixture's last stage copies them into the trial's run directory."""
    from tests.runs.synthetic_runs import write_metrics

    for trial in sweep.expand(sweep.load_spec(fx.spec))[0]:
        write_metrics(trial.cfg.replace(output_root=str(fx.tmp / "prepared")), quality=0.3 + trial.cfg.lora_r / 40)


def sweep_argv(fx: Fixture, *args: str) -> list[str]:
    return [sys.executable, str(fx.driver), "sweep", str(fx.spec), *args]


def hb_sweep(fx: Fixture, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(sweep_argv(fx, *args), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "HB_HEADLESS": "1"})


def start_sweep(fx: Fixture, *args: str, env: dict | None = None) -> subprocess.Popen:
    """`hb sweep` in a session of its own, as in a terminal: os.killpg(proc.pid, SIGINT) is the terminal's Ctrl-C."""
    return subprocess.Popen(sweep_argv(fx, *args), cwd=ROOT, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "HB_HEADLESS": "1", **(env or {})})


def trials(fx: Fixture) -> dict[str, dict]:
    path = fx.series / "series.json"
    return {t["name"]: t for t in json.loads(path.read_text())["trials"]} if path.is_file() else {}


def status(fx: Fixture, trial: str) -> str | None:
    return trials(fx).get(trial, {}).get("status")


def count(fx: Fixture, trial: str, stage: str) -> int:
    path = fx.series / trial / "count" / stage
    return len(path.read_text().splitlines()) if path.is_file() else 0


def wait_for(fx: Fixture, what: str, condition, proc: subprocess.Popen, timeout: float = 300,
             unless=None) -> None:
    """Poll ``condition`` until true; fail with the sweep's output when the sweep ends, ``unless()`` holds or time
    runs out first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline or (unless and unless()):
            out, err = kill_sweep(fx, proc)
            pytest.fail(f"never got to: {what}\n{out[-3000:]}\n{err[-3000:]}")
        time.sleep(0.2)


def kill_sweep(fx: Fixture, proc: subprocess.Popen) -> tuple[str, str]:
    """SIGKILL to a sweep that a test gives up on, and to its trials (sessions of their own); its output."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    for t in trials(fx).values():
        with contextlib.suppress(ProcessLookupError, KeyError, TypeError):
            os.killpg(t["where"]["pid"], signal.SIGKILL)
    return out, err


def gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow
def test_a_series_at_once_survives_a_failure_ctrl_c_and_a_killed_trial_and_resumes_each_alone(fx):
    """One series through everything `hb sweep` promises, with fixture stages (the sweep's machinery, not the
    model, is under test): two trials at once whose kernels are handed the same TCP ports; a failing trial that
    does not stop the other; Ctrl-C; a trial killed (-9) in its last stage; each rerun continuing only what did
    not finish; the series report; and a last rerun that skips everything in seconds."""
    prepare_metrics(fx)
    series = run_dir.claim_dir(fx.series, made_by="test", what="series directory")
    for name in ("hold-lora_r=8", "hold-lora_r=16", "fail-lora_r=8"):
        (series / name).write_text("")

    # 1. Two trials at once. jupyter_client hands every kernel of both processes the same TCP ports (patched):
    #    with TCP kernels the second of two live kernels dies with "Address already in use" (papermill#511);
    #    kernels on socket files cannot collide (hb_utils/runs/kernels.py).
    proc = start_sweep(fx, "--parallel", "2", "--no-report", env={"HB_TEST_FIXED_PORTS": "47123"})
    wait_for(fx, "both trials in their last stage",
             lambda: count(fx, "lora_r=8", "04") and count(fx, "lora_r=16", "04"), proc,
             unless=lambda: "failed" in {t.get("status") for t in trials(fx).values()})
    (series / "hold-lora_r=8").unlink()  # both last-stage kernels were alive at once; lora_r=8 now fails
    wait_for(fx, "lora_r=8 failed", lambda: status(fx, "lora_r=8") == "failed", proc)
    running = trials(fx)["lora_r=16"]
    assert running["status"] == "running" and not gone(running["where"]["pid"])  # the failure stopped nothing else
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, stdout + stderr
    assert "failed   lora_r=8 in" in stdout and "04_evaluate failed in cell" in stdout
    assert "failing on purpose" in stdout
    assert stderr.strip().splitlines() == [  # one line: who was stopped, and how to resume
        "interrupted; stopped lora_r=16 (each run keeps what it finished); resume with: "
        f"hb sweep {fx.spec} --parallel 2 --no-report"], stderr
    info = trials(fx)
    assert info["lora_r=16"]["status"] == "interrupted" and gone(info["lora_r=16"]["where"]["pid"])
    assert all(t["where"]["executor"] == "local" and t["seconds"] > 0 for t in info.values())
    conf = json.loads((series / "lora_r=16" / "config.json").read_text())
    assert conf["experiment"] == "lora_r=16" and conf["stages"]["01_eda"]["status"] == "done"
    assert conf["stages"]["04_evaluate"]["status"] == "interrupted"  # hb run marked its stage

    # 2. Rerun: the failed trial is retried (its last stage only) and finishes; lora_r=16 continues, and is
    #    killed (-9) in its last stage, as a crash or an OOM kill would.
    (series / "fail-lora_r=8").unlink()
    proc = start_sweep(fx, "--parallel", "2")
    wait_for(fx, "lora_r=8 done and lora_r=16 back in its last stage",
             lambda: status(fx, "lora_r=8") == "done" and count(fx, "lora_r=16", "04") == 2, proc)
    os.killpg(trials(fx)["lora_r=16"]["where"]["pid"], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 1, stdout + stderr
    table = stdout[stdout.index("trial "):]
    assert re.search(r"lora_r=8 \(baseline\)\s+done\s+\d+s\s+\S+, cpu", table), table
    assert re.search(r"lora_r=16\s+failed\s+\d+s", table), table
    assert "1 trial(s) failed (lora_r=16)" in stdout and f"their logs are in {series / 'logs'}" in stdout
    assert "series report not made: it needs the baseline trial (lora_r=8) and at least one other" in stdout
    assert trials(fx)["lora_r=16"]["returncode"] == -9
    assert (count(fx, "lora_r=8", "01"), count(fx, "lora_r=8", "04")) == (1, 2)  # 01 finished before: not rerun

    # 3. Rerun: only the killed trial runs (its unfinished stage), then the series report is made.
    (series / "hold-lora_r=16").unlink()
    proc = hb_sweep(fx)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 finished earlier, 1 to run" in proc.stdout and "started  lora_r=16" in proc.stdout
    assert "started  lora_r=8" not in proc.stdout
    assert [count(fx, t, s) for t in ("lora_r=8", "lora_r=16") for s in ("01", "04")] == [1, 2, 1, 3]
    for name in ("lora_r=8", "lora_r=16"):  # ordinary run directories, made by hb run, with their reports
        run = series / name
        assert all(v["status"] == "done" for v in json.loads((run / "config.json").read_text())["stages"].values())
        assert (run / "reports" / "04_evaluate.html").is_file() and (series / "trials" / f"{name}.yaml").is_file()
    info = json.loads((series / "series.json").read_text())
    assert info["baseline"] == "lora_r=8" and info["swept"] == ["lora_r"] and len(info["sweeps"]) == 3
    html = (series / "06_compare.html").read_text()  # opens on the verdicts, then the metric-vs-parameter plot
    verdict = html.index("lora_r=16</strong> vs lora_r=8: ROUGE-L")
    assert verdict < html.index("<img") < html.index("What differs between the configs")
    assert "Bonferroni" in html and "10,000 resamples" in html
    from tests.test_e2e import report_problems

    assert report_problems(series / "06_compare.ipynb") == []

    # 4. Rerun: everything finished, nothing runs, the report is up to date: seconds.
    t0 = time.monotonic()
    again = hb_sweep(fx)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 finished earlier, 0 to run" in again.stdout and "series report up to date" in again.stdout
    assert again.stdout.count("skipped") == 2 and time.monotonic() - t0 < 30


# --------------------------------------------------------------------------- Ray
def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_ray_head(log: Path, temp: Path) -> tuple[subprocess.Popen, str] | None:
    """`ray start --head --block` with 2 CPUs and no GPU; (process, address) once it says it started, else None.
    The agents' ports are given (fewer files the raylet waits for)."""
    port, export, grpc, listen, runtime = free_ports(5)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_agent_register_timeout_ms": "300000",
           "RAY_raylet_start_wait_time_s": "300"}
    with log.open("w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                                 "--num-cpus", "2", "--num-gpus", "0", f"--port={port}", "--include-dashboard=false",
                                 "--disable-usage-stats", f"--temp-dir={temp}", "--object-store-memory=100000000",
                                 f"--metrics-export-port={export}", f"--dashboard-agent-grpc-port={grpc}",
                                 f"--dashboard-agent-listen-port={listen}", f"--runtime-env-agent-port={runtime}"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    deadline, announced = time.time() + 300, False
    while "Ray runtime started" not in log.read_text():
        if proc.poll() is not None or time.time() > deadline:
            stop_group(proc)
            return None
        announced = announced or announce_agent_port(temp, listen)
        time.sleep(0.2)
    return proc, f"127.0.0.1:{port}"


def announce_agent_port(temp: Path, port: int) -> bool:
    """Write the dashboard agent's HTTP port file for it, once the raylet has a node id. The raylet waits a fixed
    15 s for that file and then aborts the node (ray-project/ray#65983); on a loaded 2-core machine the agent's
    imports alone take longer. The port was fixed on the command line, so the file says what the agent writes
    itself when it is up."""
    from ray._raylet import DASHBOARD_AGENT_LISTEN_PORT_NAME, persist_port

    session = temp / "session_latest"
    raylet_log = session / "logs" / "raylet.out"
    found = re.search(r"node_id=([0-9a-f]{56})", raylet_log.read_text()) if raylet_log.is_file() else None
    if found:
        persist_port(str(session.resolve()), found.group(1), DASHBOARD_AGENT_LISTEN_PORT_NAME, port)
    return bool(found)


def stop_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM to the cluster's process group (`ray start --block` then stops its processes one by one, which
    takes half a minute on a busy machine), SIGKILL to what is left of the group after ``grace`` seconds."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


@pytest.fixture
def ray_cluster(tmp_path):
    """A real one-node Ray cluster, started for the test and stopped after it (only its own processes). Up to three
    starts: the raylet gives the dashboard agent a fixed 15 s to report its port, which a loaded 2-core machine can
    miss (ray-project/ray#65983); a later start finds its imports cached."""
    pytest.importorskip("ray")
    temps = [Path(f"/tmp/ray-hb-{os.getpid()}-{attempt}") for attempt in range(3)]
    for attempt, temp in enumerate(temps):
        started = start_ray_head(tmp_path / f"ray-start-{attempt}.log", temp)
        if started:
            break
    else:
        pytest.fail("ray start --head failed three times: " + (tmp_path / "ray-start-2.log").read_text()[-2000:])
    proc, address = started
    yield address
    stop_group(proc)
    for temp in temps:
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_ray_runs_trials_as_tasks_records_their_node_and_fails_fast(fx, ray_cluster):
    """A real one-node Ray cluster (2 CPUs, no GPU): a trial asking for a GPU is refused in seconds, before anything
    is submitted (a task would otherwise pend forever); then the series runs as Ray tasks (every node probed for
    the series folder first), series.json records each trial's node, and Ctrl-C stops a running task's `hb run` as
    Ctrl-C would (Ray's workers block SIGINT; the trial must not). Resuming is the executor's business no more than
    it is the local pool's: the local series test covers it."""
    series = run_dir.claim_dir(fx.series, made_by="test", what="series directory")
    (series / "hold-lora_r=16").write_text("")
    proc = start_sweep(fx, "--executor", "ray", "--address", ray_cluster, "--no-report")
    try:  # meanwhile, another driver on the same cluster: a trial asking for a GPU is refused before any task
        t0 = time.monotonic()
        with pytest.raises(RunError, match=r"No node of the Ray cluster.*\(1 GPU, 1 CPU\); a task would wait for"):
            executors.RayCluster(ray_cluster, gpus_per_trial=1)
        assert time.monotonic() - t0 < 60  # seconds on an idle machine: never a task pending for ever
    except BaseException:
        kill_sweep(fx, proc)
        raise
    wait_for(fx, "lora_r=8 done and lora_r=16 in its last stage",
             lambda: status(fx, "lora_r=8") == "done" and count(fx, "lora_r=16", "04") == 1, proc)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, stdout + stderr
    assert "executor: ray at" in stdout
    assert stderr.strip().splitlines() == [  # one line
        f"interrupted; stopped lora_r=16 (each run keeps what it finished); resume with: hb sweep {fx.spec} "
        f"--executor ray --address {ray_cluster} --no-report"], stderr
    info = trials(fx)
    assert info["lora_r=8"]["status"] == "done" and info["lora_r=16"]["status"] == "interrupted"
    for t in info.values():  # the node of each, the interrupted task's too
        assert t["where"]["executor"] == "ray" and t["where"]["node_id"] and t["where"]["node_ip"], t
        assert t["where"]["host"] == socket.gethostname()
    conf = json.loads((series / "lora_r=16" / "config.json").read_text())
    assert conf["stages"]["04_evaluate"]["status"] == "interrupted"  # the trial's hb run saw the Ctrl-C


def test_benchmark_runs_the_smoke_series_at_each_parallelism(tmp_path):
    from tests.test_benchmarks import load_bench

    bench = load_bench("bench_sweep")
    args = bench.parse_args(["--parallel", "1,2", "--quick", "-p", "sample_size", "30"])
    assert args.rounds == [1, 2] and args.quick and args.p == [["sample_size", "30"]]
    cmd = bench.sweep_command(args.spec, tmp_path, 2, {"max_steps": "2"})
    assert cmd[2:5] == ["hb_utils", "sweep", str(ROOT / "params" / "series_smoke.yaml")]
    assert cmd[5:] == ["--parallel", "2", "--no-report", "-p", "max_steps", "2", "-p", "output_root", str(tmp_path)]
    with pytest.raises(SystemExit):
        bench.parse_args(["--parallel", "0"])
