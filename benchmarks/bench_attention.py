"""Attention forward + backward per layer: SDPA against matmul attention, by sequence length.

    python benchmarks/bench_attention.py                     # SmolLM2's shapes, bf16, 1 thread
    python benchmarks/bench_attention.py --heads 32 --kv-heads 4 --lengths 128,256,512   # TinyLlama's heads

This is where ``hb_utils.model.attention.matmul_max_keys`` comes from: ``attn_implementation: auto`` uses
matmul attention for CPU training calls up to that many keys (per compute dtype, at the current thread count),
because PyTorch's fused CPU attention has a slow backward for short sequences. Both functions are the ones a
model calls (transformers' ``sdpa_attention_forward`` and ``hb_utils.model.attention.matmul_attention``) with
a right-padded boolean mask as the trainer's batches make it. Prints the median of ``--repeats`` timings and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="128,192,256,320,384,512", help="comma-separated sequence lengths")
    p.add_argument("--batch", type=int, default=2, help="micro-batch size (Experiment 1: 2)")
    p.add_argument("--heads", type=int, default=9, help="query heads (SmolLM2-135M: 9)")
    p.add_argument("--kv-heads", type=int, default=3, help="key/value heads (SmolLM2-135M: 3)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)

    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from hb_utils.model.attention import matmul_attention, matmul_max_keys

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    module = SimpleNamespace(num_key_value_groups=args.heads // args.kv_heads, training=True, is_causal=True)
    print(f"batch {args.batch}, {args.heads}/{args.kv_heads} heads x {args.head_dim}, {args.dtype}, "
          f"{args.threads} thread(s); auto uses matmul up to {matmul_max_keys(dtype)} keys")
    print(f"{'keys':>6} {'sdpa ms':>9} {'matmul ms':>10} {'sdpa/matmul':>12}")
    for t in (int(x) for x in args.lengths.split(",")):
        g = torch.Generator().manual_seed(t)
        q0 = torch.randn(args.batch, args.heads, t, args.head_dim, generator=g).to(dtype)
        k0, v0 = (torch.randn(args.batch, args.kv_heads, t, args.head_dim, generator=g).to(dtype) for _ in range(2))
        mask = torch.ones(t, t, dtype=torch.bool).tril()[None, None].repeat(args.batch, 1, 1, 1)
        mask[-1, :, :, t - t // 8:] = False  # the last row is right-padded
        ms = {}
        for name in ("sdpa", "matmul"):
            times = []
            for _ in range(args.repeats):
                q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
                start = time.perf_counter()
                if name == "sdpa":
                    out, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=args.head_dim ** -0.5)
                else:
                    out = matmul_attention(module, q, k, v, mask, scaling=args.head_dim ** -0.5)
                out.float().sum().backward()
                times.append(time.perf_counter() - start)
            ms[name] = statistics.median(times) * 1e3
        print(f"{t:>6} {ms['sdpa']:>9.2f} {ms['matmul']:>10.2f} {ms['sdpa'] / ms['matmul']:>11.2f}x")


if __name__ == "__main__":
    main()
