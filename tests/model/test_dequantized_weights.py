"""hb_utils.model.dequantized_weights: a kept dequantized weight gives bit-identical outputs and input gradients,
and only while frozen."""

from __future__ import annotations

import pytest
import torch

from hb_utils.model import dequantized_weights as D

bnb = pytest.importorskip("bitsandbytes")


def layer4bit(dtype: torch.dtype = torch.float32, bias: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    dense = torch.nn.Linear(128, 96, bias=bias)
    q = bnb.nn.Linear4bit(128, 96, bias=bias, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True)
    if bias:
        q.bias = torch.nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    q = q.to("cpu")  # quantizes
    q.support_avx512bf16_for_cpu = False  # the project's dequantize path (modeling.use_dequantize_matmul_path)
    return q.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_cached_forward_is_bit_identical(dtype, bias):
    q = layer4bit(dtype, bias)
    x = torch.randn(3, 5, 128)
    with torch.no_grad():
        expected = q(x)
        assert D.install(torch.nn.Sequential(q), budget=1 << 30) == 1
        got = q(x)
        again = q(x)  # from the kept weight
    assert isinstance(q.forward, D._CachedForward) and q.forward.weight is not None
    assert got.dtype == expected.dtype and torch.equal(got, expected) and torch.equal(again, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_through_the_kept_weight_gives_the_same_input_gradients(dtype):
    """QLoRA training: the 4-bit weight is frozen, gradients flow to the input (and so to the LoRA
    weights of earlier layers). bitsandbytes' backward dequantizes again; the kept weight gives the
    same output and the same input gradient, bit for bit."""
    q = layer4bit(dtype).train()
    x0 = torch.randn(2, 7, 128, dtype=dtype)
    x1, x2 = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    want = q(x1)
    (want.float() * torch.linspace(-1, 1, 96)).sum().backward()
    D.install(torch.nn.Sequential(q), budget=1 << 30)
    got = q(x2)
    (got.float() * torch.linspace(-1, 1, 96)).sum().backward()
    assert q.forward.weight is not None  # the gradient path used the kept weight
    assert torch.equal(got, want) and torch.equal(x2.grad, x1.grad)


def test_a_replaced_weight_is_dequantized_again():
    q, other = layer4bit(), layer4bit()
    with torch.no_grad():
        other.weight = bnb.nn.Params4bit(torch.randn(96, 128), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True).to("cpu")
        D.install(torch.nn.Sequential(q), budget=1 << 30)
        x = torch.randn(4, 128)
        q(x)
        q.weight = other.weight  # e.g. a merge that requantizes the layer
        assert torch.equal(q(x), type(q).forward(q, x))


def test_budget_limits_how_many_layers_are_cached(monkeypatch):
    layers = torch.nn.Sequential(layer4bit(), layer4bit(), layer4bit())
    per_layer = 96 * 128 * 4
    assert D.install(layers, budget=2 * per_layer) == 2
    monkeypatch.setenv("HB_DEQUANT_CACHE", "0")
    assert D.install(torch.nn.Sequential(layer4bit()), budget=1 << 30) == 0
