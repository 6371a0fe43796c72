"""Multi-process stage 03 (hb_utils.train.distributed): checks before launching, the command, failures, multi-node
configs; and, marked slow, real 2-process DDP runs on CPU (gloo) with SmolLM2 on tiny synthetic data."""

from __future__ import annotations

import json
import math
import os
import re
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from hb_utils import run_dir
from hb_utils.config import FIELDS, load_config
from hb_utils.errors import ConfigError, RunError
from hb_utils.model import loading
from hb_utils.run_dir import RunPaths, read_json, write_json
from hb_utils.train import distributed, multinode, training
from tests.train.test_training import small_cfg


# --------------------------------------------------------------------------- fast
def test_num_processes_is_a_train_field_so_another_n_never_resumes(tmp_path):
    assert FIELDS["num_processes"].metadata["scope"] == "train"
    cfg = small_cfg(tmp_path, num_processes=2)
    assert cfg.fingerprint("train") != cfg.replace(num_processes=1).fingerprint("train")
    ckpts = RunPaths.for_config(cfg).checkpoints
    (ckpts / "checkpoint-2").mkdir(parents=True)
    write_json(ckpts / "checkpoint-2" / "trainer_state.json", {"global_step": 2})
    write_json(ckpts / training.CHECKPOINT_META, {"stamp": run_dir.stamp(cfg.replace(num_processes=1), "train", "t")})
    with pytest.raises(RunError, match=r"num_processes: 1 -> 2"):
        training.resolve_resume(cfg)
    assert training.resolve_resume(cfg.replace(num_processes=1)).endswith("checkpoint-2")
    with pytest.raises(ConfigError, match="num_processes must be >= 1"):
        cfg.replace(num_processes=0)


def test_too_many_processes_are_refused_before_launching(tmp_path, monkeypatch):
    cfg = small_cfg(tmp_path, num_processes=4)
    monkeypatch.delenv(distributed.ENV_OVERSUBSCRIBE, raising=False)
    monkeypatch.setattr(distributed, "available_devices", lambda: ("cpu", 2))
    monkeypatch.setattr(loading, "load_base_model", lambda *a, **k: pytest.fail("no model before the check"))
    with pytest.raises(ConfigError, match=r"needs 4 CPU cores.*has 2.*at most 2.*HB_ALLOW_CPU_OVERSUBSCRIBE=1"):
        training.prepare(cfg)
    monkeypatch.setenv(distributed.ENV_OVERSUBSCRIBE, "1")
    run = training.prepare(cfg)  # forced: accepted; the kernel loads no model, the ranks will
    assert run.launcher and run.trainer is None and "effective batch: 2 x 1 x 4 = 8" in training.describe(run)
    monkeypatch.setattr(distributed, "available_devices", lambda: ("gpu", 2))
    with pytest.raises(ConfigError, match=r"needs 4 GPU devices.*has 2\. Set num_processes to at most 2\.$"):
        distributed.check_num_processes(cfg)
    with pytest.raises(ConfigError, match="accelerate_config 'nope.yaml' does not exist"):
        distributed.check_num_processes(cfg.replace(num_processes=2, accelerate_config="nope.yaml"))


def test_launch_command_uses_accelerates_torchrun_path(tmp_path):
    cfg = small_cfg(tmp_path, num_processes=2)
    cmd = distributed.launch_command(cfg, tmp_path / "spec.json", kind="cpu", port=12345, threads_per_process=1)
    assert cmd[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    text = " ".join(cmd)
    assert "--multi_gpu" in cmd and "--cpu" not in cmd  # --cpu would pick accelerate's one-process launcher
    assert "--num_processes 2" in text and "--main_process_port 12345" in text
    assert "--num_cpu_threads_per_process 1" in text
    assert cmd[-3:] == ["-m", "hb_utils.train.worker", str(tmp_path / "spec.json")]
    fsdp = distributed.launch_command(cfg.replace(accelerate_config="accelerate/fsdp_qlora.yaml"),
                                      tmp_path / "spec.json", kind="gpu", port=1)
    assert "--config_file" in fsdp and "--multi_gpu" not in fsdp and "--num_cpu_threads_per_process" not in fsdp


def test_diagnose_names_the_failed_rank_and_its_tail(tmp_path):
    (tmp_path / "rank1.log").write_text("loading\nstep 3\n")
    stderr = textwrap.dedent("""\
        Root Cause (first observed failure):
        [0]:
          time      : 2025-01-01_00:00:00
          host      : box
          rank      : 1 (local_rank: 1)
          exitcode  : -9 (pid: 123)
    """)
    f = distributed.diagnose(tmp_path, 2, stderr)
    assert (f.rank, f.exit_code) == (1, -9) and "signal 9" in f.message and f.tail.endswith("step 3")
    # an exception reported by a rank wins, with its own type
    write_json(tmp_path / "rank0.error.json", {"rank": 0, "time": 1.0, "type": "RunError", "message": "diverged"})
    f = distributed.diagnose(tmp_path, 2, stderr.replace("-9", "1"), "rank 0 says hi")
    assert (f.rank, f.error_type, f.message, f.tail) == (0, "RunError", "diverged", "rank 0 says hi")


def test_a_rank_that_dies_before_the_worker_starts_shows_its_traceback(tmp_path):
    """A syntax or import error in the worker itself: no rank log, no error report; the traceback is in
    the launcher's stderr, before torchrun's summary."""
    stderr = textwrap.dedent("""\
          File "/tmp/worker.py", line 12
            fh.write("x
                     ^
        SyntaxError: unterminated string literal (detected at line 12)
        E1129 09:03:15 api.py:1002] failed (exitcode: 1) local_rank: 0 (pid: 7307) of binary: python
        Traceback (most recent call last):
          File "accelerate/commands/launch.py", line 1423, in <module>
        torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
        Root Cause (first observed failure):
        [0]:
          rank      : 0 (local_rank: 0)
          exitcode  : 1 (pid: 7307)
    """)
    f = distributed.diagnose(tmp_path, 2, stderr)
    assert (f.rank, f.exit_code) == (0, 1)
    assert f.tail.endswith("SyntaxError: unterminated string literal (detected at line 12)")
    assert "ChildFailedError" not in f.tail


def test_multinode_writes_one_accelerate_config_per_machine(tmp_path):
    cfg = small_cfg(tmp_path, num_processes=4)
    commands = multinode.write_multinode(cfg, num_machines=2, main_process_ip="10.0.0.1", main_process_port=29600,
                                           out_dir=tmp_path / "mn")
    assert len(commands) == 2
    for machine, command in enumerate(commands):
        conf = yaml.safe_load((tmp_path / "mn" / f"accelerate_machine{machine}.yaml").read_text())
        assert conf["machine_rank"] == machine and conf["num_machines"] == 2 and conf["num_processes"] == 4
        assert conf["main_process_ip"] == "10.0.0.1" and conf["main_process_port"] == 29600
        assert conf["distributed_type"] == "MULTI_GPU"
        assert f"accelerate_machine{machine}.yaml -m hb_utils.train.worker" in command
    assert read_json(tmp_path / "mn" / "spec.json")["config"]["num_processes"] == 4
    fsdp = cfg.replace(accelerate_config="accelerate/fsdp_qlora.yaml")
    multinode.write_multinode(fsdp, num_machines=2, main_process_ip="h0", out_dir=tmp_path / "f")
    conf = yaml.safe_load((tmp_path / "f" / "accelerate_machine1.yaml").read_text())
    assert conf["distributed_type"] == "FSDP" and conf["machine_rank"] == 1 and conf["fsdp_config"]
    with pytest.raises(ConfigError, match="multiple of num_machines"):
        multinode.write_multinode(cfg.replace(num_processes=3), num_machines=2, main_process_ip="h0")


def test_multinode_cli_prints_each_machines_command(tmp_path, capsys):
    params = tmp_path / "p.yaml"
    cfg = small_cfg(tmp_path, num_processes=2)
    params.write_text(yaml.safe_dump({k: v for k, v in cfg.to_dict().items()}))
    assert multinode.main([str(params), "--num-machines", "2", "--main-ip", "10.1.2.3"]) == 0
    out = capsys.readouterr().out
    assert out.count("accelerate launch --config_file") == 2 and "# machine 1" in out
    assert multinode.main([str(params), "--num-machines", "2", "--main-ip", "h", "-p", "num_processes", "3"]) == 2


def test_fsdp_example_keeps_the_4bit_storage_in_the_compute_dtype(monkeypatch, tmp_path):
    import torch

    conf = yaml.safe_load((Path(run_dir.repo_root()) / "accelerate" / "fsdp_qlora.yaml").read_text())
    assert conf["distributed_type"] == "FSDP" and conf["fsdp_config"]["fsdp_cpu_ram_efficient_loading"]
    cfg = small_cfg(tmp_path, compute_dtype="bf16")
    assert loading.quantization_config(cfg).bnb_4bit_quant_storage == torch.uint8  # bitsandbytes' default
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch sets for an FSDP config
    assert loading.quantization_config(cfg).bnb_4bit_quant_storage == torch.bfloat16
    example = load_config(Path(run_dir.repo_root()) / "params" / "exp1_fsdp_qlora.yaml")
    assert training.effective_batch(example) == 8 == training.effective_batch(load_config())  # Experiment 1's 8
    assert example.accelerate_config == "accelerate/fsdp_qlora.yaml" and example.num_processes == 2


# --------------------------------------------------------------------------- slow: 2 CPU processes, gloo
RECORDER = textwrap.dedent("""\
    # A rank that records the training examples it collates (test instrumentation around the real worker).
    import json, os, sys
    from hb_utils.train import worker
    from hb_utils.train import distributed

    def setup(run):
        out = os.environ["HB_TEST_SEEN"]
        trainer = run.trainer
        collate, train_loader = trainer.data_collator, trainer.get_train_dataloader

        def recording(examples):
            with open(os.path.join(out, f"seen{distributed.rank()}.jsonl"), "a") as fh:
                for ex in examples:
                    fh.write(json.dumps(ex["input_ids"]) + "\\n")
            return collate(examples)

        def recording_train_loader():  # only the training data loader records; evaluation collates as usual
            trainer.data_collator = recording
            try:
                return train_loader()
            finally:
                trainer.data_collator = collate
        trainer.get_train_dataloader = recording_train_loader

    worker.main(setup=setup)
""")

KILLER = textwrap.dedent("""\
    # Rank 1 dies (SIGKILL) at the end of step 3: after the allreduce of step 3, so rank 0 finished checkpoint-2.
    import os, signal
    from transformers import TrainerCallback
    from hb_utils.train import worker
    from hb_utils.train import distributed

    class Die(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3 and distributed.rank() == 1:
                print("rank 1 about to die", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    worker.main(callbacks=[Die()])
""")


@pytest.fixture
def two_cpu_processes(monkeypatch):
    monkeypatch.setenv("HB_HEADLESS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv(distributed.ENV_OVERSUBSCRIBE, "1")  # CI machines may have fewer free cores than ranks
    monkeypatch.setenv("PYTHONPATH", str(run_dir.repo_root()) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def exact_cfg(tmp_path, **overrides):
    """fp32, no 4-bit, no dropout, constant lr: two runs that see the same batches must agree to rounding."""
    values = dict(n=10, compute_dtype="fp32", load_in_4bit=False, lora_dropout=0.0, optim="adamw_torch",
                  lr_scheduler="constant", warmup_ratio=0.0, learning_rate=1e-3, gradient_checkpointing=True,
                  max_steps=-1, num_epochs=1.0, load_best_model=False, eval_steps=100, save_steps=100)
    values.update(overrides)
    tmp_path.mkdir(parents=True, exist_ok=True)
    return small_cfg(tmp_path, **values)


@pytest.mark.slow
def test_two_processes_see_each_example_once_match_one_process_and_only_rank0_writes(tmp_path, two_cpu_processes,
                                                                                     capsys, monkeypatch):
    seen = tmp_path / "seen"
    seen.mkdir()
    monkeypatch.setenv("HB_TEST_SEEN", str(seen))
    # one process, same effective batch (2 x 2 accumulation): the reference, and TRL's tokenized examples
    one_cfg = exact_cfg(tmp_path / "one", num_processes=1, grad_accum=2)
    one = training.prepare(one_cfg)
    train_ids = [json.dumps(list(ex["input_ids"])) for ex in one.trainer.train_dataset]
    single = training.fit(one)

    script = tmp_path / "recorder.py"
    script.write_text(RECORDER)
    # 8 training examples (10 pairs, 80/10/10), batch 2 per rank, 2 ranks: 2 optimizer steps of 4 examples
    ddp = exact_cfg(tmp_path / "ddp", num_processes=2, grad_accum=1)
    run = training.prepare(ddp)
    capsys.readouterr()  # drop the one-process run's lines
    metrics = distributed.launch(run.cfg, run.resume_from, worker=str(script))
    out = capsys.readouterr().out
    assert metrics["num_processes"] == 2 and metrics["effective_batch_size"] == 4 and metrics["global_step"] == 2
    assert re.findall(r"\[train\] step (\d)/2", out) == ["1", "2"]  # one compact line per log step, rank 0 only

    # every training example collated exactly once in the epoch, split between the ranks
    rank_rows = [(seen / f"seen{r}.jsonl").read_text().splitlines() for r in (0, 1)]
    assert len(rank_rows[0]) == len(rank_rows[1]) == 4
    assert sorted(rank_rows[0] + rank_rows[1]) == sorted(train_ids) and len(set(train_ids)) == 8

    # only rank 0 wrote the run directory: one adapter, metrics, plot, no stray per-rank files
    paths = RunPaths.for_config(ddp)
    assert (paths.adapter / "adapter_model.safetensors").is_file() and paths.plot("loss_curve").is_file()
    assert read_json(paths.metrics / "train.json")["stamp"]["fingerprints"]["train"] == ddp.fingerprint("train")
    assert not any("rank" in p.name for p in paths.root.rglob("*") if "checkpoint-" not in str(p))

    # the same batches per optimizer step as the one-process run: the same losses, up to rounding
    ddp_losses = [h["loss"] for h in read_json(paths.metrics / "log_history.json") if "loss" in h]
    one_history = read_json(RunPaths.for_config(one_cfg).metrics / "log_history.json")
    one_losses = [h["loss"] for h in one_history if "loss" in h]
    assert single["effective_batch_size"] == 4 and len(ddp_losses) == len(one_losses) == 2
    # fp32 sums in another order (gloo allreduce vs local accumulation): ~1e-6 relative per step; step 2 adds one
    # AdamW update computed from those gradients. 1e-3 relative leaves room for that, not for a wrong batch
    # (another batch changes this loss by >1%) or a missing gradient average (a 2x step).
    for a, b in zip(ddp_losses, one_losses, strict=True):
        assert math.isclose(a, b, rel_tol=1e-3), (ddp_losses, one_losses)


@pytest.mark.slow
def test_a_killed_rank_stops_the_run_clearly_and_the_rerun_resumes(tmp_path, two_cpu_processes, capsys):
    cfg = exact_cfg(tmp_path, num_processes=2, grad_accum=1, n=20, max_steps=4, save_steps=2, eval_steps=2,
                    gradient_checkpointing=False)
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    with pytest.raises(RunError) as info:
        run = training.prepare(cfg)
        distributed.launch(run.cfg, run.resume_from, worker=str(script))
    msg = str(info.value)
    assert "rank 1 of 2" in msg and "signal 9" in msg and "rank 1 about to die" in msg
    assert "rerun with the same config (num_processes=2)" in msg
    paths = RunPaths.for_config(cfg)
    assert (paths.checkpoints / "checkpoint-2" / "trainer_state.json").is_file() and not paths.adapter.exists()

    capsys.readouterr()
    metrics = training.fit(training.prepare(cfg))  # the notebook's path: prepare + fit
    out = capsys.readouterr().out
    assert "resuming from" in out and "checkpoint-2" in out
    assert re.findall(r"\[train\] step (\d)/4 \|", out) == ["3", "4"]
    assert metrics["resumed_from_step"] == 2 and metrics["global_step"] == 4
    with pytest.raises(RunError, match=r"num_processes: 2 -> 1"):  # another N never reuses this adapter
        training.check_adapter_slot(cfg.replace(num_processes=1))
