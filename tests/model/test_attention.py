"""hb_utils.model.attention: the matmul path computes SDPA's attention, and auto picks it only where it should."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hb_utils.config import ExperimentConfig
from hb_utils.model import attention

B, H, KV, D = 2, 6, 2, 16


def qkv(t: int, kv_len: int | None = None, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    kv_len = t if kv_len is None else kv_len
    shapes = [(B, H, t, D), (B, KV, kv_len, D), (B, KV, kv_len, D)]
    return [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]


def module(training: bool = True) -> SimpleNamespace:
    return SimpleNamespace(num_key_value_groups=H // KV, training=training, is_causal=True)


def padded_causal_mask(t: int, lengths: list[int]) -> torch.Tensor:
    """SDPA's boolean mask for right-padded rows: causal, and no key beyond a row's length."""
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    keys = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    return (causal[None] & keys[:, None, :])[:, None]


@pytest.fixture
def matmul_calls(monkeypatch):
    """The shapes of the queries that went through matmul attention (a spy on the module's function,
    which auto_attention_forward looks up at call time), with torch on one thread so that the matmul
    path's key limit (320 // threads) admits these short batches on any machine. The tests compute in
    float64 (exact comparisons), which gets bf16's limit here so that the matmul path is exercised."""
    calls = []
    real = attention.matmul_attention
    monkeypatch.setitem(attention.MATMUL_MAX_KEYS_ONE_THREAD, torch.float64,
                        attention.MATMUL_MAX_KEYS_ONE_THREAD[torch.bfloat16])
    monkeypatch.setattr(attention, "matmul_attention",
                        lambda *a, **kw: calls.append(tuple(a[1].shape)) or real(*a, **kw))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield calls
    torch.set_num_threads(before)


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_matmul_attention_equals_sdpa_values_and_gradients(mask_kind):
    t = 12
    mask = {"none": None, "bool": padded_causal_mask(t, [12, 7]),
            "float": torch.zeros(B, 1, t, t, dtype=torch.float64).masked_fill(~padded_causal_mask(t, [9, 12]),
                                                                              float("-inf"))}[mask_kind]
    q, k, v = qkv(t)
    got = attention.matmul_attention(module(), q, k, v, mask, scaling=0.3)
    (got * torch.linspace(-1, 1, D, dtype=torch.float64)).sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    q2, k2, v2 = qkv(t)
    want, _ = sdpa_attention_forward(module(), q2, k2, v2, mask, scaling=0.3)
    (want * torch.linspace(-1, 1, D, dtype=torch.float64)).sum().backward()
    assert got.shape == want.shape == (B, t, H, D)
    torch.testing.assert_close(got, want)
    for a, b in zip(grads, (q2.grad, k2.grad, v2.grad), strict=True):
        torch.testing.assert_close(a, b)


def test_causal_mask_is_aligned_to_the_last_key_like_sdpa():
    q, k, v = qkv(3, kv_len=7)  # 3 new queries after 4 cached keys
    got = attention.matmul_attention(module(), q, k, v, None)
    aligned = torch.ones(3, 7, dtype=torch.bool).tril(4)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=aligned)
    torch.testing.assert_close(got, want.transpose(1, 2))
    bidirectional = attention.matmul_attention(module(), q, k, v, None, is_causal=False)
    torch.testing.assert_close(bidirectional, F.scaled_dot_product_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)).transpose(1, 2))


def test_auto_takes_the_matmul_path_only_for_short_cpu_training_calls(matmul_calls):
    calls = matmul_calls
    short = qkv(8)
    long = qkv(attention.matmul_max_keys(torch.float64) + 1)
    attention.auto_attention_forward(module(), *short, None, scaling=0.25)
    assert calls == [(B, H, 8, D)]
    attention.auto_attention_forward(module(), *long, None, scaling=0.25)  # long batch: SDPA
    attention.auto_attention_forward(module(training=False), *short, None, scaling=0.25)  # eval: SDPA
    with torch.no_grad():
        attention.auto_attention_forward(module(), *short, None, scaling=0.25)  # no graph: SDPA
    with pytest.raises(ValueError, match="softcap"):  # not matmul attention's formula: SDPA's own error, as before
        attention.auto_attention_forward(module(), *short, None, scaling=0.25, softcap=30.0)
    assert calls == [(B, H, 8, D)]


def test_the_matmul_limit_shrinks_with_threads():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert attention.matmul_max_keys(torch.bfloat16) == attention.MATMUL_MAX_KEYS_ONE_THREAD[torch.bfloat16] == 320
        torch.set_num_threads(2)
        assert attention.matmul_max_keys(torch.bfloat16) == 160
    finally:
        torch.set_num_threads(before)


def test_fp32_training_takes_sdpa_at_every_length(monkeypatch):
    """fp32 (what ``auto`` computes in on AVX2-only CPUs): SDPA was as fast or faster at every length
    (benchmarks/README.md), so auto never takes the matmul path there, even for 8 keys on one thread."""
    calls = []
    monkeypatch.setattr(attention, "matmul_attention", lambda *a, **kw: calls.append(1))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert attention.matmul_max_keys(torch.float32) == 0
        q, k, v = (t.detach().float().requires_grad_() for t in qkv(8))
        out, _ = attention.auto_attention_forward(module(), q, k, v, None, scaling=0.25)
        assert calls == [] and out.dtype == torch.float32
        q, k, v = (t.detach().bfloat16().requires_grad_() for t in qkv(8))
        attention.auto_attention_forward(module(), q, k, v, None, scaling=0.25)
        assert calls == [1]  # the same short call in bf16 takes the matmul path
    finally:
        torch.set_num_threads(before)


def _tiny_llama(attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=50, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, attn_implementation=attn)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).double()


def test_a_registered_model_trains_as_with_sdpa(matmul_calls):
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding, as the trainer's collator makes it
    labels = ids.masked_fill(mask == 0, -100)
    results = []
    for attn in (attention.register(), "sdpa"):
        model = _tiny_llama(attn).train()
        assert model.config._attn_implementation == attn
        matmul_calls.clear()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        # the comparison means something only if the registered model really took the matmul path
        head_dim = model.config.hidden_size // model.config.num_attention_heads
        assert matmul_calls == ([(B, H, 10, head_dim)] * 2 if attn == attention.NAME else []), attn
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b)


def test_auto_is_the_default_and_no_fingerprint():
    assert ExperimentConfig().attn_implementation == "auto"
    fingerprints = {ExperimentConfig(attn_implementation=v).fingerprint("eval") for v in ("auto", "sdpa", "eager")}
    assert len(fingerprints) == 1
