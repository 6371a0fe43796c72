"""Chat speed: the adapter on the 4-bit base vs the exported merged model; export time and sizes.

    .venv/bin/python benchmarks/bench_chat.py outputs/smoke            # exports first if needed
    .venv/bin/python benchmarks/bench_chat.py outputs/smoke --reexport --gguf f16,q8_0

Each model runs in its own subprocess (so its peak RSS is its own) through the chat app's own
prompt and generation settings (``hb_utils.chat.fit_prompt`` / ``generation_kwargs``, greedy): a
~100-token prompt (system prompt + question), ``--new-tokens`` new tokens, ``--repeats`` times. A
streamer records the time of every generated token: time to first token = prefill + first decode
step; decode tokens/s = (n - 1) / (last - first). Medians are reported. Both paths must give the
same greedy text (the merged model is the measured export of the same adapter).

Why merged should be faster on CPU: bitsandbytes' 4-bit layers dequantize every weight on every
forward and PEFT adds two small matmuls per adapted layer; the merged model is one plain fp32 matmul
per layer (fp16 on disk, upcast on load). ``hb chat`` keeps the dequantized weights of a
frozen 4-bit model (``hb_utils.model.dequantized_weights``), which removes most of the first cost,
so three rows are timed: the adapter as ``hb chat`` runs it, the merged model, and the adapter on
bitsandbytes' own uncached 4-bit path (``HB_DEQUANT_CACHE=0``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUESTION = ("My father is 67, has had type 2 diabetes for ten years and now his feet often feel numb and tingle "
            "at night. What causes this, and what should he do?")


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries that over from the
    parent through fork + exec, so every worker would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(path: str, new_tokens: int, repeats: int) -> dict[str, object]:
    """Load one model the way `hb chat` does and time greedy generation of a ~100-token prompt."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    from hb_utils import chat

    t0 = time.perf_counter()
    cm = chat.load_chat_model(path)
    load_s = time.perf_counter() - t0
    ids, _ = chat.fit_prompt(cm.tokenizer, cm.cfg, [], QUESTION)
    kw = chat.generation_kwargs(cm, 0.0, 1.0, 1.0, new_tokens)
    kw["min_new_tokens"] = new_tokens  # time exactly `new_tokens` steps, also where the model would stop earlier

    class Times(BaseStreamer):
        def __init__(self) -> None:
            self.t: list[float] = []

        def put(self, value: torch.Tensor) -> None:
            self.t.append(time.perf_counter())

        def end(self) -> None:
            pass

    runs, text = [], None
    inp = torch.tensor([ids])
    for _ in range(repeats + 1):  # the first is a warm-up
        st = Times()
        start = time.perf_counter()
        with torch.inference_mode():
            out = cm.model.generate(input_ids=inp, attention_mask=torch.ones_like(inp), streamer=st, **kw)
        new = out[0, len(ids):].tolist()
        tt = st.t[1:]  # the first put is the prompt
        runs.append({"ttft_s": tt[0] - start, "decode_tok_s": (len(tt) - 1) / (tt[-1] - tt[0])})
        text = cm.tokenizer.decode(new, skip_special_tokens=True)
    runs = runs[1:]
    return {"path": path, "kind": cm.kind, "prompt_tokens": len(ids), "new_tokens": new_tokens,
            "load_s": round(load_s, 1),
            "ttft_s": statistics.median(r["ttft_s"] for r in runs),
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
            "peak_rss_mib": peak_rss_mib(), "threads": torch.get_num_threads(),
            "text": text}


def sizes(run: Path) -> dict[str, float]:
    def mib(paths) -> float:
        return round(sum(p.stat().st_size for p in paths) / 2**20, 1)

    exp = run / "export"
    out = {"adapter (safetensors)": mib((run / "adapter").glob("*.safetensors")),
           "merged (safetensors)": mib((exp / "merged").glob("*.safetensors"))}
    out.update({f"GGUF {g.stem.rsplit('-', 1)[-1]}": mib([g]) for g in sorted((exp / "gguf").glob("*.gguf"))})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a trained run directory, e.g. outputs/smoke")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--reexport", action="store_true", help="export again (timed) even when an export exists")
    p.add_argument("--gguf", default="f16,q8_0", help="GGUF types to export and time ('' for none)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.new_tokens, args.repeats)))
        return 0

    from hb_utils.export.merge import export_run

    run = Path(args.run).resolve()
    import bench_machine as machine  # benchmarks/ is on sys.path when this file runs as a script

    from hb_utils.model import device

    cpu = device.cpu_info()
    print(machine.cpu_line(), flush=True)
    timings: dict[str, float] = {}
    merged = run / "export" / "merged"
    if args.reexport or not (merged / "config.json").is_file():
        shutil.rmtree(merged, ignore_errors=True)  # this script's own product: makes export_run merge again
        t0 = time.perf_counter()
        export_run(run)
        timings["merge, measure both modes, save (s)"] = round(time.perf_counter() - t0, 1)
    for g in [g for g in args.gguf.split(",") if g]:
        t0 = time.perf_counter()
        rec = export_run(run, gguf=g)
        timings[f"GGUF {g} incl. round trip (s)"] = round(time.perf_counter() - t0, 1)
        timings[f"GGUF {g} write only (s)"] = rec["gguf"][g]["seconds"]
    results = {}
    rows = [("adapter on 4-bit base", run, {}),
            ("merged (fp16 on disk, fp32 compute)", merged, {}),
            # bitsandbytes' own 4-bit path (dequantize every weight on every forward), what `hb chat` ran
            # before hb_utils.model.dequantized_weights; the ratio against it is the 4-bit format's own cost
            ("adapter, 4-bit path uncached", run, {"HB_DEQUANT_CACHE": "0"})]
    for name, path, env in rows:
        cmd = [sys.executable, __file__, "--worker", str(path), "--new-tokens", str(args.new_tokens),
               "--repeats", str(args.repeats), str(run)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, **env})
        results[name] = json.loads(res.stdout.strip().splitlines()[-1])
        r = results[name]
        print(f"{name:38s} TTFT {r['ttft_s']:.3f} s  decode {r['decode_tok_s']:.1f} tok/s  peak RSS "
              f"{r['peak_rss_mib']:.0f} MiB  load {r['load_s']} s  ({r['prompt_tokens']}-token prompt, "
              f"{r['new_tokens']} new, {r['threads']} threads)", flush=True)
    a, m, u = results.values()
    print(f"merged / adapter decode speed: {m['decode_tok_s'] / a['decode_tok_s']:.2f}x; TTFT "
          f"{a['ttft_s'] / m['ttft_s']:.2f}x; same greedy text: {a['text'] == m['text']}")
    print(f"merged / uncached 4-bit adapter decode speed: {m['decode_tok_s'] / u['decode_tok_s']:.2f}x; TTFT "
          f"{u['ttft_s'] / m['ttft_s']:.2f}x; same greedy text: {u['text'] == m['text']}")
    for k, v in {**timings, **sizes(run)}.items():
        print(f"{k:38s} {v}")
    print(json.dumps({"cpu": cpu, "results": results, "timings": timings, "sizes_mib": sizes(run),
                      "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
