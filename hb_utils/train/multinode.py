"""Multi-node training: one accelerate config per machine and the command each machine runs.

A multi-node run cannot start from a notebook (each machine runs its own command), so this module
writes the configs and prints the commands: ``python -m hb_utils.train.multinode params/x.yaml
--num-machines 2 --main-ip 10.0.0.1``. It checks the run directory as stage 03 would first
(:func:`hb_utils.train.training.prepare`), so a finished adapter or a foreign one is caught here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from hb_utils import errors, run_dir
from hb_utils.config import ExperimentConfig, load_config
from hb_utils.errors import ConfigError
from hb_utils.train.distributed import ENV_WORKER, WORKER_MODULE, write_spec
from hb_utils.train.training import prepare


def write_multinode(cfg: ExperimentConfig, *, num_machines: int, main_process_ip: str, main_process_port: int = 29500,
                    resume_from: str | None = None, out_dir: Path | None = None) -> list[str]:
    """One accelerate config per machine plus the spec; returns the ``accelerate launch`` command of each machine.

    ``cfg.num_processes`` is the total over all machines. Every machine must see the repository and
    the run directory at the same path (a shared filesystem): all ranks read the split, rank 0 writes
    the adapter and metrics. With ``cfg.accelerate_config`` (e.g. FSDP) its settings are kept and
    the machine fields replaced.
    """
    if num_machines < 2:
        raise ConfigError("write_multinode is for 2 or more machines; one machine needs no config (num_processes).")
    if cfg.num_processes % num_machines:
        raise ConfigError(f"num_processes ({cfg.num_processes}) is the total over all machines and must be a "
                          f"multiple of num_machines ({num_machines}).")
    out = out_dir or run_dir.RunPaths.for_config(cfg).root / "distributed"
    spec = write_spec(cfg, resume_from, out / "spec.json")
    base: dict[str, Any] = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU",
                            "mixed_precision": "no", "use_cpu": False, "same_network": True,
                            "rdzv_backend": "static", "dynamo_config": {}}
    if cfg.accelerate_config:
        base.update(yaml.safe_load(run_dir.resolve(cfg.accelerate_config).read_text()) or {})
    commands = []
    for machine in range(num_machines):
        conf = {**base, "num_machines": num_machines, "num_processes": cfg.num_processes, "machine_rank": machine,
                "main_process_ip": main_process_ip, "main_process_port": main_process_port}
        path = out / f"accelerate_machine{machine}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(conf, sort_keys=True))
        commands.append(f"{ENV_WORKER}=1 HB_HEADLESS=1 accelerate launch --config_file {path} "
                        f"-m {WORKER_MODULE} {spec}")
    return commands


def main(argv: list[str] | None = None) -> int:
    """``python -m hb_utils.train.distributed params/x.yaml --num-machines 2 --main-ip 10.0.0.1 [-p name value]``:
    check the run directory as stage 03 would, write the per-machine configs, print each machine's command."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hb_utils.train.distributed", description=main.__doc__)
    parser.add_argument("params")
    parser.add_argument("--num-machines", type=int, required=True)
    parser.add_argument("--main-ip", required=True, help="address of machine 0, reachable from every machine")
    parser.add_argument("--main-port", type=int, default=29500)
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.params, **{k: yaml.safe_load(v) for k, v in args.parameter})
        run = prepare(cfg, check_devices=False)  # the run directory, as stage 03 checks it; devices are per machine
        if run.already_trained:
            print(f"{run.paths.adapter} already holds this config's adapter; nothing to launch.")
            return 0
        commands = write_multinode(cfg, num_machines=args.num_machines, main_process_ip=args.main_ip,
                                   main_process_port=args.main_port, resume_from=run.resume_from)
    except errors.HBError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for machine, command in enumerate(commands):
        print(f"# machine {machine} (run in the repository root, same paths on every machine):\n{command}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

