"""The machine under a benchmark: its CPU class and its own matrix-multiply limit, measured in the same run.

Why: a ratio against the original method says nothing about how far the project is from what the
machine can do. Every benchmark prints the CPU (model, cores, class, and whether the class is emulated
with ``ATEN_CPU_CAPABILITY`` / ``ONEDNN_MAX_CPU_ISA``) and, next to each ratio, the achieved FLOP rate as
a share of this machine's GEMM rate measured by :func:`gemm_rate` at the same thread count.

FLOP counts are the usual dense estimates: a forward pass costs 2 FLOP per matmul weight per token
(:func:`matmul_params` counts the weights of every linear layer, 4-bit or not, and the LM head; the
LoRA matrices and attention scores are left out, so the shares are slight underestimates); training a
frozen base with LoRA adds 2 per weight for the input gradients (4N per token), and gradient
checkpointing recomputes the forward (+2N). Padding is not counted: it is waste, not work.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from hb_utils.model import device


def cpu_line() -> str:
    """One line: model, cores, class (and emulation), for every printed figure."""
    info = device.cpu_info()
    emulated = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if os.environ.get(k)}
    cls = "bf16 units" if info.get("native_bf16") else "no bf16 units (fp32 class)"
    extra = f"; EMULATED with {', '.join(f'{k}={v}' for k, v in emulated.items())}" if emulated else ""
    return (f"CPU: {info.get('model')}, {info.get('cores')} cores, flags {' '.join(info.get('flags', []))}, "
            f"{cls}; torch capability {torch.backends.cpu.get_cpu_capability()}{extra}")


def gemm_rate(dtype: torch.dtype = torch.float32, threads: int | None = None, seconds: float = 1.5) -> float:
    """This machine's dense matmul rate in GFLOP/s: the better of a 2048^3 GEMM and a SmolLM2-shaped
    one (512 x 576 x 1536), median of repeats within ``seconds`` each."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        best = 0.0
        for m, k, n in ((2048, 2048, 2048), (512, 576, 1536)):
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            a @ b  # warm-up
            times: list[float] = []
            start = time.perf_counter()
            while time.perf_counter() - start < seconds or len(times) < 3:
                t = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - t)
            best = max(best, 2 * m * k * n / statistics.median(times) / 1e9)
        return best
    finally:
        torch.set_num_threads(before)


def machine_rates(threads: int | None = None) -> dict[str, float]:
    """GEMM GFLOP/s in fp32, and in bf16 where the CPU has bf16 units (elsewhere bf16 is emulated)."""
    rates = {"fp32": round(gemm_rate(torch.float32, threads), 1)}
    if device.cpu_has_native_bf16():
        rates["bf16"] = round(gemm_rate(torch.bfloat16, threads), 1)
    return rates


def matmul_params(model: torch.nn.Module) -> int:
    """Weights that multiply every token: all linear layers (bitsandbytes 4-bit ones by their full shape)
    and the LM head; LoRA matrices excluded (a rank-8 adapter is ~2 % of them)."""
    total = 0
    for name, module in model.named_modules():
        if "lora_" in name or not hasattr(module, "in_features") or not hasattr(module, "out_features"):
            continue
        if hasattr(module, "base_layer"):  # a PEFT wrapper: its base layer is counted on its own
            continue
        total += int(module.in_features) * int(module.out_features)
    return total


def share(flops: float, seconds: float, rate_gflops: float) -> str:
    """``'41.2 GFLOP/s = 38 % of the fp32 GEMM rate'``."""
    achieved = flops / seconds / 1e9
    return f"{achieved:.1f} GFLOP/s = {achieved / rate_gflops:.0%} of GEMM"
