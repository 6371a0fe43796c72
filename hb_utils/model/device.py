"""The machine a run ran on, in one record: device, dtype policy, CPU class, library versions, commit, memory.

Why: a figure means little without the machine under it. The same smoke series runs several times
slower on an AVX2-only CPU than on one with bf16 units (AMX / AVX-512-BF16; ``benchmarks/README.md``),
and ``compute_dtype: auto`` picks a different dtype on each. Run records (``config.json``), training metrics,
reports and benchmarks all take their facts from here, so they cannot disagree, and the package list is written once.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from hb_utils.errors import ConfigError
from hb_utils.run_dir import repo_root

# The libraries whose versions shape a run (recorded in config.json and metrics/train.json).
PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate", "papermill",
            "rouge-score", "sacrebleu", "pandas")
# CPU flags that decide which kernels are fast (Linux /proc/cpuinfo names).
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def default_device() -> torch.device:
    """The current CUDA device where there is one, else the CPU.

    In a multi-process run each rank uses the GPU of its ``LOCAL_RANK`` (set by torchrun): the model is
    loaded before the Trainer selects the rank's device, and TRL/PEFT's DDP recipe puts each rank's
    4-bit base on that rank's own GPU (``device_map={"": local_rank}``).
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cuda", torch.cuda.current_device())


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 instructions (AVX512-BF16 or AMX), where bf16 is fast, not emulated."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # private torch helpers; a failing probe means "no"
            continue
    return False


def resolve_compute_dtype(setting: str, device: torch.device | str | None = None) -> torch.dtype:
    """The compute dtype for ``setting`` (auto|bf16|fp16|fp32) on ``device`` (default: cuda if present).

    Policy for ``auto``: bf16 on GPUs that support it (Ampere+); fp16 on older GPUs such as the T4;
    on CPU bf16 only when the CPU has native bf16 instructions (AVX512-BF16/AMX), else fp32 —
    emulated bf16 on CPU is slower than fp32, and fp16 matmuls on CPU are slower still.
    """
    if setting in DTYPES:
        return DTYPES[setting]
    if setting != "auto":
        raise ConfigError(f"compute_dtype must be one of auto, bf16, fp16, fp32; got {setting!r}.")
    dev = torch.device(device) if device is not None else default_device()
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dev.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@cache
def cpu_info() -> dict[str, Any]:
    """CPU model name, the flags of :data:`CPU_FLAGS` it has, and its class: ``bf16`` (native bf16
    matmul units) or ``fp32`` (AVX2-class: ``auto`` computes in fp32 there)."""
    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    native = cpu_has_native_bf16()
    return {"model": model, "cores": os.cpu_count(), "flags": [f for f in CPU_FLAGS if f in flags],
            "native_bf16": native, "class": "bf16" if native else "fp32"}


def package_versions() -> dict[str, str | None]:
    """Python and the versions of :data:`PACKAGES` (None where one is not installed)."""
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit(root: Path | None = None) -> str | None:
    """The checked-out commit of the repository (``-dirty`` when tracked files changed), or None."""
    cwd = root or repo_root()
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() + ("-dirty" if dirty else "")) if out.returncode == 0 else None


def summary() -> dict[str, Any]:
    """Device, dtype policy, CPU, threads and library versions: the one record of the machine."""
    dev = default_device()
    info: dict[str, Any] = {
        "device": str(dev),
        "auto_compute_dtype": dtype_name(resolve_compute_dtype("auto", dev)),
        "dtype_policy": "auto: bf16 on GPUs with bf16 / fp16 on older GPUs (T4) / bf16 on CPUs with "
                        "AVX512-BF16 or AMX / else fp32",
        "cpu": cpu_info(),
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "cuda": torch.version.cuda,
        "versions": package_versions(),
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    cuda_bf16=torch.cuda.is_bf16_supported())
    return info


def peak_memory() -> dict[str, Any]:
    """Peak GPU memory allocated (CUDA) or the peak resident memory of this process (CPU)."""
    if torch.cuda.is_available():
        return {"kind": "cuda_max_allocated", "gb": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss = rss_kb if sys.platform == "darwin" else rss_kb * 1024
    return {"kind": "process_peak_rss", "gb": round(rss / 2**30, 3)}
