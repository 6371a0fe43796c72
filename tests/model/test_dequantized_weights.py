"""hb_utils.model.dequantized_weights: a kept dequantized weight gives bit-identical outputs and input gradients,
and only while it still describes the layer (PEFT merge/unmerge, in-place writes); one kept under inference_mode
still trains."""

from __future__ import annotations

import contextlib
import copy
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path

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


def test_an_in_place_write_to_the_weight_is_dequantized_again():
    """Same parameter, same storage, new content: the version counter tells."""
    q = layer4bit()
    D.install(torch.nn.Sequential(q), budget=1 << 30)
    x = torch.randn(4, 128)
    with torch.no_grad():
        before = q(x)
        q.weight.bitwise_xor_(0x11)  # every 4-bit code moves to another one
        after = q(x)
        assert not torch.equal(after, before) and torch.equal(after, type(q).forward(q, x))


def test_budget_limits_how_many_layers_are_cached(monkeypatch):
    layers = torch.nn.Sequential(layer4bit(), layer4bit(), layer4bit())
    per_layer = 96 * 128 * 4
    assert D.install(layers, budget=2 * per_layer) == 2
    monkeypatch.setenv("HB_DEQUANT_CACHE", "0")
    assert D.install(torch.nn.Sequential(layer4bit()), budget=1 << 30) == 0


def test_repeated_forwards_dequantize_once(monkeypatch):
    """The point of the cache: an unchanged layer is not dequantized again, in any grad mode."""
    q = layer4bit()
    calls = []
    real = D.dequantize
    monkeypatch.setattr(D, "dequantize", lambda *a: calls.append(1) or real(*a))
    D.install(torch.nn.Sequential(q), budget=1 << 30)
    x = torch.randn(2, 128)
    q(x)
    with torch.no_grad():
        q(x)
    with torch.inference_mode():
        q(x)
    q(x.requires_grad_()).sum().backward()
    assert len(calls) == 1


def test_a_copied_or_pickled_model_dequantizes_its_own_weights():
    """A copy must not share (or duplicate) the original's kept weight, and pickling must work."""
    q = layer4bit()
    D.install(torch.nn.Sequential(q), budget=1 << 30)
    x = torch.randn(2, 128)
    with torch.no_grad():
        want = q(x)
        for clone in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
            assert isinstance(clone.forward, D._CachedForward) and clone.forward.module is clone
            assert clone.forward.weight is None
            assert torch.equal(clone(x), want) and clone.forward.weight is not None


# --------------------------------------------------------------------------- with PEFT

peft = pytest.importorskip("peft")


@contextlib.contextmanager
def bitsandbytes_path(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model``'s 4-bit layers on bitsandbytes' own forward (as with HB_DEQUANT_CACHE=0) for the block."""
    kept = {m: m.__dict__.pop("forward") for m in model.modules()
            if isinstance(m, bnb.nn.Linear4bit) and isinstance(m.__dict__.get("forward"), D._CachedForward)}
    assert kept, "no kept weights installed"
    try:
        yield
    finally:
        for m, forward in kept.items():
            m.forward = forward


class Stack(torch.nn.Module):
    """Two 4-bit layers: the second one's input depends on the first one's LoRA weights, so its weight is
    saved for backward, as in a transformer block."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.up, self.down = layer4bit_sized(width, width, seed=0), layer4bit_sized(width, width, seed=1)
        self.is_loaded_in_4bit = True  # what transformers sets: PEFT then wraps the layers with its bnb LoRA

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


def layer4bit_sized(n_in: int, n_out: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    dense = torch.nn.Linear(n_in, n_out)
    q = bnb.nn.Linear4bit(n_in, n_out, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True)
    q.bias = torch.nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    q = q.to("cpu")
    q.support_avx512bf16_for_cpu = False
    return q


def lora_stack(width: int = 128, targets: tuple[str, ...] = ("up", "down")) -> torch.nn.Module:
    """A 4-bit model with a LoRA adapter whose B weights are not zero (a trained adapter), kept weights installed."""
    model = peft.get_peft_model(Stack(width), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                              target_modules=list(targets)))
    torch.manual_seed(2)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    assert D.install(model, budget=1 << 30) == 2  # both 4-bit layers, LoRA-wrapped or not
    return model


def test_merge_then_unmerge_never_returns_a_stale_weight():
    """PEFT's merge and unmerge into a 4-bit layer each put a new, requantized parameter in place and free
    the old one; the next parameter of the same size is often allocated at the freed address. A cache keyed
    by the address then handed back the weight from before the merge (here in 5 to 50 of 100 rounds)."""
    model = lora_stack(targets=("up",))
    x = torch.randn(3, 128)
    stale = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(Un)?[mM]erge lora module to 4-bit linear")
        for round_ in range(100):
            model(x)
            model.merge_adapter()
            model.unmerge_adapter()
            got = model(x)
            with bitsandbytes_path(model):
                want = model(x)
            if not torch.equal(got, want):
                stale.append((round_, (got - want).abs().max().item()))
    assert not stale, f"stale kept weights (round, max |difference|): {stale}"


def test_a_forward_under_inference_mode_then_training_gives_bitsandbytes_gradients():
    """A sample answer before training (generation runs under inference_mode) must not leave an inference
    tensor as the kept weight: autograd cannot save one for backward."""
    model = lora_stack()
    x = torch.randn(4, 128)
    with torch.inference_mode():
        model(x)
    weights = lambda: {n: p for n, p in model.named_parameters() if p.requires_grad}  # noqa: E731
    model.train()
    loss = model(x).square().mean()
    loss.backward()
    got = {n: p.grad.clone() for n, p in weights().items()}
    model.zero_grad()
    with bitsandbytes_path(model):
        want_loss = model(x).square().mean()
        want_loss.backward()
    assert len(got) == 4 and torch.equal(loss, want_loss)
    assert all(torch.equal(got[n], p.grad) for n, p in weights().items())


def test_generate_under_inference_mode_then_train_a_4bit_llama(tmp_path: Path):
    """The notebook order on a real (tiny) 4-bit causal LM: generate a sample answer, then train the adapter."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from hb_utils.model.loading import use_dequantize_matmul_path

    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map={"": "cpu"},
                                                dtype=torch.float32)
    use_dequantize_matmul_path(base)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                      target_modules=["q_proj", "v_proj"]))
    assert D.install(model, budget=1 << 30) == 14  # every 4-bit layer, LoRA-wrapped or not
    ids = torch.randint(3, 96, (2, 12))
    with torch.inference_mode():
        model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    got = {n: p.grad.clone() for n, p in trained.items()}
    model.zero_grad()
    with bitsandbytes_path(model):
        want = model(input_ids=ids, labels=ids).loss
        want.backward()
    assert got and torch.equal(loss, want)
    assert all(torch.equal(got[n], p.grad) for n, p in trained.items())
