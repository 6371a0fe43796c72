"""Attention for training on CPU: plain matmul attention for short batches, SDPA for the rest.

Why: PyTorch's fused CPU attention (what ``sdpa`` runs on CPU) has a fast forward but a slow
backward for short sequences (SmolLM2's shapes, forward + backward per layer: the table by sequence
length and thread count is in ``benchmarks/README.md``, from ``python benchmarks/bench_attention.py``).

Matmul attention (two matmuls and a softmax, transformers' "eager" formula) wins for short bf16
sequences; beyond, materializing the score matrix costs more than SDPA's backward, and SDPA gains
more from extra threads. :func:`matmul_max_keys` is the measured crossover per compute dtype: in
bf16, 320 keys at 1 thread, divided by the thread count (160 at 2 threads; more threads favour SDPA
further, so the rule errs toward SDPA there). In fp32 (AVX2-class CPUs, where ``compute_dtype: auto``
picks fp32) SDPA was as fast or faster at every length from 32 to 512 keys on 1 and 2 threads, so
the limit is 0 there: ``auto`` is SDPA, the original method's default, and never slower than it.
With ``attn_implementation: auto`` :func:`auto_attention_forward` uses matmul attention for a CPU
forward that builds a graph (training) with at most that many keys, and transformers' own SDPA
function for everything else (GPU, evaluation, generation, long batches, fp32). Both compute the
same attention; only rounding differs, so the choice is in no fingerprint.

:func:`register` adds the function to transformers' ``AttentionInterface`` under :data:`NAME`
(with SDPA's boolean masks), the documented way to plug in an attention implementation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

NAME = "hb_auto"
# Crossover at 1 thread by compute dtype, from benchmarks/bench_attention.py (tables in benchmarks/README.md):
# bf16 measured on a CPU with native bf16 units; fp32 on an AVX2-only CPU (SDPA never slower: no matmul path).
MATMUL_MAX_KEYS_ONE_THREAD = {torch.bfloat16: 320, torch.float32: 0}


def matmul_max_keys(dtype: torch.dtype = torch.bfloat16) -> int:
    """Longest key sequence for which the matmul path is used for ``dtype`` at the current torch thread
    count (0 for dtypes without a measured win: always SDPA)."""
    return MATMUL_MAX_KEYS_ONE_THREAD.get(dtype, 0) // max(1, torch.get_num_threads())


def register() -> str:
    """Register :data:`NAME` with transformers (idempotent); returns the name for ``from_pretrained``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, auto_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def uses_matmul(module: nn.Module, query: torch.Tensor, key: torch.Tensor, **kwargs: Any) -> bool:
    """Whether :func:`auto_attention_forward` takes the matmul path for this call."""
    return (query.device.type == "cpu" and module.training and torch.is_grad_enabled()
            and key.shape[-2] <= matmul_max_keys(query.dtype)
            and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
            and not kwargs.get("output_attentions", False))


def auto_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0,
                           scaling: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: matmul attention or SDPA, see the module docstring."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if uses_matmul(module, query, key, **kwargs):
        is_causal = kwargs.get("is_causal")
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        return matmul_attention(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                is_causal=is_causal), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def matmul_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, *, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool = True) -> torch.Tensor:
    """softmax(q k^T * scaling + mask) v with SDPA's mask conventions, returned as (batch, query, heads, dim).

    ``attention_mask``: boolean (True = attend) or additive float, as SDPA takes it; ``None`` means
    causal when ``is_causal`` (SDPA's ``is_causal``, aligned to the last key), else no mask. Grouped
    key/value heads are repeated to the query heads, as transformers' eager attention does.
    """
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q_len, kv_len = query.shape[-2], key.shape[-2]
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is None and is_causal and q_len > 1:
        attention_mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    elif attention_mask is not None:
        scores = scores + attention_mask
    # softmax in at least fp32, as transformers' eager attention (bf16/fp16 scores would lose the tail)
    weights = F.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous()
