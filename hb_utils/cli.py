"""The ``hb`` command (also ``python -m hb_utils``).

    hb run params/smoke.yaml [-p lora_r 16 ...] [-r name text] [-y 'yaml'] [--from 03 | --only 04] [--overwrite]
    hb sweep params/series_smoke.yaml [-p name value ...] [--executor local|ray] [--address auto] [--dry-run]
    hb compare outputs/smoke outputs/smoke_r16 [--out outputs/compare] [--baseline smoke]
    hb export outputs/smoke [--merge-into auto|base|dequantized] [--gguf f16|q8_0] [--overwrite]
    hb chat outputs/smoke [--host 127.0.0.1] [--port 7860]      (or: hb chat outputs/smoke/export/merged)

Why: papermill only warns on unknown parameters; ``hb run`` validates the whole config before any
notebook starts and exits with status 2 naming the bad parameter, status 1 when a notebook fails (its
partial report is kept), 130 on Ctrl-C (one line: the stage, the last checkpoint, how to resume), 0 when
every stage finished. ``-p``/``-r``/``-y`` read values exactly as papermill's options of the same names,
so a value means the same to ``hb run`` and to ``papermill``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

from hb_utils import quiet
from hb_utils.config import FIELDS, type_name
from hb_utils.errors import ConfigError, HBError
from hb_utils.params_file import parse_params_yaml

# Each command imports its stage inside its function: `hb --help` or a bad flag answers in a fraction of a
# second instead of importing torch and transformers first. That is the only reason; the graph is one-way.


def parse_overrides(parameters: Sequence[Sequence[str]] = (), yamls: Sequence[str] = (),
                    raws: Sequence[Sequence[str]] = ()) -> dict[str, Any]:
    """``-y``, ``-p`` and ``-r`` values exactly as ``papermill`` reads them, in papermill's order.

    Why papermill's rule and not YAML: YAML turned ordinary text into something else (``lr_test #2`` lost
    its comment, ``a: b`` became a dict, a newline a space), and the same ``-p`` given to ``papermill``
    gave another value. ``-p`` goes through papermill's own ``_resolve_type`` (True/False/None, int, float,
    else the text as typed); ``-y`` is a YAML mapping (papermill's loader); ``-r`` is always the raw text.
    The config then coerces by field type; where papermill's rule would change typed text (``-p experiment
    007`` reads as the number 7), this refuses and names ``-r``.
    """
    from papermill.cli import _resolve_type  # the function behind `papermill -p`

    values: dict[str, Any] = {}
    for text in yamls:
        values.update(parse_params_yaml(text, f"-y {text!r}"))
    for name, text in parameters:
        value = _resolve_type(text)
        if (name in FIELDS and type_name(FIELDS[name]) == "str" and isinstance(value, int)
                and not isinstance(value, bool) and str(value) != text):
            raise ConfigError(f"-p {name} {text!r} reads as the number {value} (papermill's -p rule), which would "
                              f"become {str(value)!r}. Pass -r {name} {shlex.quote(text)} to keep the text as typed.")
        values[name] = value
    for name, text in raws:
        values[name] = text
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hb", description="HealthBot experiment kit")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute notebooks 01-05 for one experiment")
    run.add_argument("params", help="parameter file, e.g. params/smoke.yaml")
    run.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                     help="override one parameter (repeatable), read as papermill -p reads it: True/False/None, "
                          "a number, else the text as typed; e.g. -p lora_r 16 -p experiment 'lr_test #2'")
    run.add_argument("-r", "--parameter-raw", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                     help="override one parameter with the raw text (as papermill -r), e.g. -r experiment 007")
    run.add_argument("-y", "--parameters-yaml", action="append", default=[], metavar="YAML",
                     help="parameters as a YAML mapping (as papermill -y), e.g. -y 'prompts: [Is tea healthy?]'")
    group = run.add_mutually_exclusive_group()
    group.add_argument("--from", dest="start", metavar="NN", help="(re)run from this stage on, e.g. --from 03")
    group.add_argument("--only", metavar="NN", help="(re)run just this stage, e.g. --only 04")
    run.add_argument("--overwrite", action="store_true",
                     help="replace a run whose data or training parameters differ (the old run directory is "
                          "renamed aside, never deleted; a folder the kit did not make is never moved)")
    run.add_argument("--kernel", default="python3", help="Jupyter kernel to execute with (default: python3)")
    cmp = sub.add_parser("compare", help="compare finished runs")
    cmp.add_argument("runs", nargs="+", help="run directories, e.g. outputs/exp1 outputs/exp2")
    cmp.add_argument("--out", default=None, help="output directory (default: outputs/compare)")
    cmp.add_argument("--no-report", action="store_true",
                     help="write the tables and plots only, no executed 06 notebook")
    cmp.add_argument("--kernel", default="python3", help="Jupyter kernel for the 06_compare report")
    cmp.add_argument("--baseline", default=None, metavar="RUN",
                     help="run (directory name) every other run is compared with, paired on the same test questions "
                          "(default: the first run given)")
    swp = sub.add_parser("sweep", help="run an experiment series (grid, values that change together, params files)")
    swp.add_argument("spec", help="sweep spec, e.g. params/series_smoke.yaml (docs/sweeps.md)")
    for flag, long, meta, text in (("-p", "--parameter", ("NAME", "VALUE"), "set one parameter for every trial"),
                                   ("-r", "--parameter-raw", ("NAME", "VALUE"), "the same, raw text (as hb run -r)")):
        swp.add_argument(flag, long, nargs=2, action="append", default=[], metavar=meta, help=text)
    swp.add_argument("-y", "--parameters-yaml", action="append", default=[], metavar="YAML",
                     help="parameters for every trial as a YAML mapping (as hb run -y)")
    swp.add_argument("--executor", choices=("local", "ray"), default=None,
                     help="local (default: this machine, one trial per GPU or one at a time on a CPU) or ray")
    swp.add_argument("--address", default=None, help="Ray cluster: auto (default), <head ip>:6379 or ray://host:10001")
    swp.add_argument("--parallel", type=int, default=None, help="trials at once on this machine (default: one per GPU, "
                     "or 1 on a CPU)")
    swp.add_argument("--gpus", default=None, help="GPUs the local pool uses, e.g. 0,1 (default: every visible GPU)")
    swp.add_argument("--gpus-per-trial", type=int, default=None, help="GPUs per trial (default: the trials' "
                     "num_processes on a GPU machine, 0 on a CPU)")
    swp.add_argument("--cpus-per-trial", type=float, default=None, help="CPUs a Ray task asks for (default 1)")
    swp.add_argument("--overwrite", action="store_true", help="as hb run --overwrite, for every trial")
    swp.add_argument("--dry-run", action="store_true", help="validate the spec and list the trials; run nothing")
    swp.add_argument("--no-report", action="store_true", help="no series report (06_compare) at the end")
    swp.add_argument("--kernel", default="python3", help="Jupyter kernel to execute with (default: python3)")
    exp = sub.add_parser("export", help="merge the adapter into a plain model (+ GGUF) under <run>/export/")
    exp.add_argument("run_dir", help="run directory, e.g. outputs/smoke")
    exp.add_argument("--merge-into", choices=("auto", "base", "dequantized"), default="auto",
                     help="weights to merge into: the original base, the dequantized 4-bit ones the adapter was "
                          "trained against, or auto (both are measured; the one closer to the evaluated model wins)")
    exp.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16", help="dtype of the merged weights")
    exp.add_argument("--gguf", choices=("f16", "q8_0"), default=None, help="also write a GGUF file + Ollama Modelfile")
    exp.add_argument("--overwrite", action="store_true",
                     help="replace an export of another adapter (the old folder is kept aside, renamed)")
    chat = sub.add_parser("chat", help="chat with a trained run (or an exported merged model) in the browser")
    chat.add_argument("model", help="run directory (outputs/smoke) or exported model (outputs/smoke/export/merged)")
    chat.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    chat.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    return parser


def cmd_export(args: argparse.Namespace) -> int:
    from hb_utils.export.merge import export_run

    with quiet.no_progress_bars():  # one line per step: no load, shard-writing or GGUF tensor bars
        export_run(args.run_dir, merge_into=args.merge_into, dtype=args.dtype, gguf=args.gguf,
                   overwrite=args.overwrite)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from hb_utils.chat import serve

    with quiet.no_progress_bars():  # the model loads without a bar; the app prints its address
        serve(args.model, host=args.host, port=args.port)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from hb_utils.config import load_config
    from hb_utils.runs.runner import run_experiment

    overrides = parse_overrides(args.parameter, args.parameters_yaml, args.parameter_raw)
    cfg = load_config(args.params, **overrides)  # ConfigError before any notebook starts
    print(f"experiment {cfg.experiment}: model {cfg.model_name}, data {cfg.dataset}, fingerprint {cfg.fingerprint()}")
    t0 = time.perf_counter()
    results = run_experiment(cfg, start=args.start, only=args.only, overwrite=args.overwrite, kernel=args.kernel)
    failed = [r for r in results if r.status == "failed"]
    print(f"{'failed' if failed else 'finished'} in {time.perf_counter() - t0:.0f}s; reports in "
          f"{results[0].report.parent if results and results[0].report else '-'}")
    return 1 if failed else 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from hb_utils.runs.sweep import load_spec, run_sweep

    spec = load_spec(args.spec, parse_overrides(args.parameter, args.parameters_yaml, args.parameter_raw))
    again = ["hb", "sweep", args.spec]  # the command that resumes this sweep, as typed
    again += [x for flag, pairs in (("-p", args.parameter), ("-r", args.parameter_raw)) for pair in pairs
              for x in (flag, *pair)]
    again += [x for y in args.parameters_yaml for x in ("-y", y)]
    again += [x for k in ("executor", "address", "parallel", "gpus", "gpus_per_trial", "cpus_per_trial")
              if getattr(args, k) is not None for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    again += [f"--{k.replace('_', '-')}" for k in ("overwrite", "no_report") if getattr(args, k)]
    result = run_sweep(spec, executor=args.executor, address=args.address, parallel=args.parallel, gpus=args.gpus,
                       gpus_per_trial=args.gpus_per_trial, cpus_per_trial=args.cpus_per_trial,
                       overwrite=args.overwrite, report=not args.no_report, kernel=args.kernel, dry_run=args.dry_run,
                       resume_command=shlex.join(again))
    return 1 if result.failed or result.report_error else 0


def cmd_compare(args: argparse.Namespace) -> int:
    from hb_utils.runs.compare import compare_runs

    out = compare_runs(args.runs, out_dir=args.out, report=not args.no_report, kernel=args.kernel,
                       baseline=args.baseline)
    for name, path in out.items():
        print(f"{name:10s} {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = {"run": cmd_run, "sweep": cmd_sweep, "compare": cmd_compare, "export": cmd_export,
               "chat": cmd_chat}[args.command]
    try:
        with quiet.console():  # every command: its own lines only (no library warnings, logs or bars)
            return command(args)
    except HBError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # one line, not papermill's and asyncio's tracebacks
        print(str(exc) if str(exc) else "interrupted; rerun the same command to continue.", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
