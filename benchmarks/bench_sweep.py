"""The smoke series (params/series_smoke.yaml) run one trial after another, then two at once, on this machine.

    python benchmarks/bench_sweep.py                       # the full smoke series twice (2 x 2 smoke trials)
    python benchmarks/bench_sweep.py --quick               # tiny sizes (2 steps, 2 test questions): the overhead
    python benchmarks/bench_sweep.py --parallel 1,2,4 --out /tmp/bench_sweep

Each round is ``hb sweep params/series_smoke.yaml --parallel N --no-report`` into a fresh output root (nothing is
skipped), timed as a whole (wall clock: what a user waits for), with the trials' own times from series.json.

What to expect: on a CPU, a trial's training and generation already use every core (torch threads), so two trials
at once share the same cores; with ``--parallel N`` each trial gets cores / N threads (hb_utils.runs.executors).
On 2 cores, running two at once may well not help: the kernels start and the data stages overlap, the arithmetic
does not. Parallel trials pay where each trial has its own device: one GPU per trial (the local pool on a machine
with N GPUs) or one node per trial (``--executor ray``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICK = {"max_steps": "2", "grad_accum": "1", "eval_size": "2", "ppl_size": "2", "eval_max_new_tokens": "8",
         "qual_max_new_tokens": "8", "bootstrap_samples": "20"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "params" / "series_smoke.yaml"))
    parser.add_argument("--parallel", default="1,2", help="trials at once, one round per value (default 1,2)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: measures the per-trial overhead")
    parser.add_argument("--out", default=None, help="output roots go here (default: a temporary folder, removed)")
    parser.add_argument("-p", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="a parameter for every trial (as hb sweep -p)")
    args = parser.parse_args(argv)
    args.rounds = [int(x) for x in args.parallel.split(",") if x.strip()]
    if not args.rounds or min(args.rounds) < 1:
        parser.error("--parallel takes positive integers, e.g. 1,2")
    return args


def sweep_command(spec: str, out: Path, parallel: int, params: dict[str, str]) -> list[str]:
    flags = [x for k, v in {**params, "output_root": str(out)}.items() for x in ("-p", k, v)]
    return [sys.executable, "-m", "hb_utils", "sweep", spec, "--parallel", str(parallel), "--no-report", *flags]


def run_round(spec: str, out: Path, parallel: int, params: dict[str, str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(sweep_command(spec, out, parallel, params), cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HB_HEADLESS": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"hb sweep --parallel {parallel} failed ({proc.returncode}):\n{proc.stdout[-3000:]}"
                         f"\n{proc.stderr[-2000:]}")
    series = next(out.glob("*/series.json"))
    trials = json.loads(series.read_text())["trials"]
    return {"parallel": parallel, "wall_s": wall, "trials": {t["name"]: t.get("seconds") for t in trials}}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_machine import cpu_line  # the benchmarks' shared CPU line

    params = {**(QUICK if args.quick else {}), **dict(args.p)}
    base = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_sweep-"))
    print(cpu_line())
    print(f"spec {args.spec}" + (f", overrides {params}" if params else "") + f"; outputs under {base}")
    rows = []
    try:
        for parallel in args.rounds:
            out = base / f"parallel{parallel}"
            if out.exists():
                shutil.rmtree(out)
            row = run_round(args.spec, out, parallel, params)
            rows.append(row)
            per = ", ".join(f"{k} {v:.0f}s" for k, v in row["trials"].items())
            print(f"--parallel {parallel}: {row['wall_s']:.0f} s wall ({per})", flush=True)
    finally:
        if not args.out:
            shutil.rmtree(base, ignore_errors=True)
    first = rows[0]["wall_s"]
    for row in rows[1:]:
        print(f"--parallel {row['parallel']} vs --parallel {rows[0]['parallel']}: {first / row['wall_s']:.2f}x "
              f"({'faster' if row['wall_s'] < first else 'not faster'}) on {os.cpu_count()} CPU(s)")
    print("On a CPU the trials share its cores: what overlaps is single-threaded start-up (kernels importing torch, "
          "model loads), not the arithmetic; parallel trials pay in full with one GPU (or node) per trial.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
