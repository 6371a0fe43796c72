"""4-bit models on CPU: dequantize each frozen weight once, not in every forward.

Why: on CPU, bitsandbytes computes a 4-bit layer (the dequantize path this project keeps, see
``modeling.use_dequantize_matmul_path``) as ``dequantize_4bit(weight) -> F.linear``, every call, and its
backward dequantizes again. In generation that is every new token: on a 2-core AVX2 CPU decoding SmolLM2
spent about a third of each step rebuilding weights it had rebuilt the step before; in QLoRA training
(the base weights are frozen; only the LoRA weights learn) every forward, recomputation and backward
rebuilds them. :func:`install` runs the very same two operations -- the same bitsandbytes op with the
same arguments, then ``F.linear`` -- but keeps the dequantized tensor: outputs and input gradients are
bit-identical (tests compare them) and only time and memory change. The memory is the price (4 bytes
per parameter in fp32, 2 in bf16: it trades QLoRA's memory saving for time), so layers are only cached
while the total stays under :data:`MAX_SHARE` of the memory available when the model loads; beyond
that the rest keep dequantizing per call. ``HB_DEQUANT_CACHE=0`` turns it off.

A 4-bit weight never learns (integer storage; LoRA trains beside it); a layer that runs off the CPU
uses bitsandbytes' own forward. A kept weight is only reused while it still describes the layer: the
same parameter object (PEFT's merge and unmerge into a 4-bit model put a new one in place), the same
quantization state and storage, an unchanged version counter (in-place writes) and the same compute
dtype. Otherwise the layer is dequantized again. The parameter is recognised by a weak reference, not
by its storage address: a freed address is soon reused by the next weight of the same size, which
then looked like the old one. Writes through ``weight.data`` are invisible to the version counter (as
they are to autograd) and are only noticed when they move the storage.

The kept weight is always an ordinary tensor, even when it is first computed under
``torch.inference_mode`` (generation): an inference tensor cannot be saved for backward, so a sample
answer generated before training would otherwise break training's backward pass.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MAX_SHARE = 0.25  # of MemAvailable: caching may never be what pushes a machine into swap


def available_memory() -> int | None:
    """Bytes of MemAvailable (Linux), else None (then nothing is cached)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def dequantize(module: Any, dtype: torch.dtype) -> torch.Tensor:
    """The weight of a bitsandbytes ``Linear4bit`` exactly as its CPU forward computes it each call
    (``bitsandbytes.backends.default.ops._gemm_4bit_default_impl``: nested absmax first)."""
    state = module.weight.quant_state
    absmax = state.absmax
    if state.nested:
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
            state.absmax, state.state2.absmax, state.state2.code, 256, torch.float32) + state.offset
    return torch.ops.bitsandbytes.dequantize_4bit.default(
        module.weight.data.view(-1, 1), absmax, state.blocksize, state.quant_type, state.shape, dtype)


# Params4bit's Python __torch_function__ makes each tensor method call cost ~10 us; the checks below run in
# every forward of every 4-bit layer, so they call the C methods directly.
_PLAIN_TENSOR_CALLS = getattr(torch._C, "DisableTorchFunctionSubclass", contextlib.nullcontext)


def _storage_and_version(param: torch.Tensor) -> tuple[int, int | None]:
    """The parameter's storage address and in-place write counter (inference tensors keep none)."""
    with _PLAIN_TENSOR_CALLS():
        return param.data_ptr(), None if param.is_inference() else param._version


class _CachedForward:
    """Replaces one ``Linear4bit.forward``: the same casts as bitsandbytes, the kept weight."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.weight: torch.Tensor | None = None
        # What self.weight was computed from: weak references to the parameter and its quantization
        # state (a strong one would keep a replaced 4-bit weight alive), the dtype, and the parameter's
        # storage address and version.
        self.source: tuple[Any, ...] | None = None

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave the kept weight behind (weak references cannot be pickled, and a
        copy would double the memory); the first forward of the copy dequantizes again."""
        return {"module": self.module, "weight": None, "source": None}

    def _describes(self, param: Any, dtype: torch.dtype) -> bool:
        s = self.source
        return (s is not None and s[0]() is param and s[1]() is param.quant_state and s[2] == dtype
                and s[3] == _storage_and_version(param))

    def _refresh(self, param: Any, dtype: torch.dtype) -> None:
        # inference_mode(False) turns grad mode on, hence no_grad inside it: an ordinary tensor, no graph.
        with torch.inference_mode(False), torch.no_grad():
            self.weight = dequantize(self.module, dtype)
        self.source = (weakref.ref(param), weakref.ref(param.quant_state), dtype, _storage_and_version(param))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if x.device.type != "cpu":  # bitsandbytes' GPU kernels need no cache
            return type(m).forward(m, x)
        inp_dtype = x.dtype
        if m.compute_dtype is not None:
            x = x.to(m.compute_dtype)
        if not self._describes(m.weight, x.dtype):
            self._refresh(m.weight, x.dtype)
        bias = None if m.bias is None else m.bias.to(x.dtype)
        return F.linear(x, self.weight, bias).to(inp_dtype)


def install(model: torch.nn.Module, *, budget: int | None = None) -> int:
    """Cache the dequantized weights of ``model``'s 4-bit layers (see the module docstring); returns how
    many layers now use a cache. ``budget``: bytes allowed (default: MAX_SHARE of available memory;
    ``HB_DEQUANT_CACHE=0`` turns it off)."""
    import bitsandbytes as bnb

    if os.environ.get("HB_DEQUANT_CACHE", "1") == "0":
        return 0
    if budget is None:
        avail = available_memory()
        budget = int(avail * MAX_SHARE) if avail else 0
    used = installed = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit) or isinstance(module.forward, _CachedForward):
            continue
        dtype = module.compute_dtype or torch.float32
        need = module.weight.quant_state.shape.numel() * dtype.itemsize
        if used + need > budget:
            log.info("dequantized-weight cache full (%d MiB): later 4-bit layers dequantize per call",
                     used >> 20)
            break
        module.forward = _CachedForward(module)
        used += need
        installed += 1
    return installed
