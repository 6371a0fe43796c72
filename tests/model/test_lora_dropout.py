"""hb_utils.model.lora_dropout: FastDropout is inverted dropout with the configured p, and install() swaps PEFT's."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from hb_utils.config import ExperimentConfig
from hb_utils.model.lora_dropout import FastDropout, install, lora_dropouts

N = 1 << 22  # 4M draws: the drop share's standard error is about 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_drops_p_of_the_elements_and_scales_the_rest(dtype):
    torch.manual_seed(0)
    out = FastDropout(0.05)(torch.ones(N, dtype=dtype))
    assert out.dtype == dtype and out.shape == (N,)
    dropped = out == 0
    assert abs(dropped.double().mean().item() - 0.05) < 6e-4
    for lane in range(4):  # each of the four 16-bit slices of a 64-bit random word is uniform
        assert abs(dropped[lane::4].double().mean().item() - 0.05) < 1.2e-3
    kept = out[~dropped].unique()
    assert kept.tolist() == [torch.tensor(1 / 0.95, dtype=dtype).item()]  # the scale, rounded once to dtype


@pytest.mark.parametrize("p", [0.01, 0.3, 0.9])
def test_other_probabilities_and_shapes(p):
    torch.manual_seed(1)
    x = torch.randn(64, 33, 127)  # numel not a multiple of 4
    out = FastDropout(p)(x)
    assert out.shape == x.shape
    dropped = out == 0
    assert abs(dropped.double().mean().item() - p) < 0.01
    torch.testing.assert_close(out[~dropped], x[~dropped] / (1 - p))


def test_eval_mode_and_p_zero_are_the_identity():
    x = torch.randn(8, 16)
    d = FastDropout(0.5).eval()
    assert d(x) is x
    assert FastDropout(0.0)(x) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        FastDropout(1.0)


def test_masks_follow_torch_manual_seed():
    x = torch.ones(1000, 50)
    torch.manual_seed(7)
    a = FastDropout(0.1)(x)
    torch.manual_seed(7)
    b = FastDropout(0.1)(x)
    c = FastDropout(0.1)(x)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_gradient_uses_the_forward_mask():
    torch.manual_seed(3)
    x = torch.randn(200, 64, dtype=torch.bfloat16, requires_grad=True)
    out = FastDropout(0.2)(x)
    out.float().pow(2).sum().backward()
    mask = (out != 0).to(torch.bfloat16) * torch.tensor(1 / 0.8, dtype=torch.bfloat16)
    torch.testing.assert_close(x.grad, (2 * out.float() * mask.float()).to(torch.bfloat16))


def test_other_devices_use_torch_dropout(monkeypatch):
    calls = []
    monkeypatch.setattr("hb_utils.model.lora_dropout.F.dropout",
                        lambda x, p, training: calls.append((p, training)) or x)
    x = torch.empty(4, 4, device="meta")
    assert FastDropout(0.05)(x) is x and calls == [(0.05, True)]


def _tiny_peft(dropout: float) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj", "down_proj"],
                      init_lora_weights=False, task_type="CAUSAL_LM")  # B != 0: the LoRA path shows
    return get_peft_model(LlamaForCausalLM(config), lora)


def test_install_replaces_every_lora_dropout_of_a_peft_model():
    model = _tiny_peft(0.3)
    state = set(model.state_dict())
    assert install(model) == 6  # 3 targets x 2 layers
    dropouts = lora_dropouts(model)
    assert len(dropouts) == 6 and all(type(d) is FastDropout and d.p == 0.3 for d in dropouts)
    assert set(model.state_dict()) == state  # no new state: saved adapters are the same files
    ids = torch.randint(0, 64, (2, 12))
    model.train()
    torch.manual_seed(0)
    a = model(ids).logits
    torch.manual_seed(1)
    assert not torch.equal(a, model(ids).logits)  # dropout acts in training ...
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)  # ... and not in eval
    assert install(_tiny_peft(0.0)) == 0  # PEFT's nn.Identity for p = 0 stays


def test_fast_lora_dropout_is_a_training_result_field():
    a, b = ExperimentConfig(fast_lora_dropout=True), ExperimentConfig(fast_lora_dropout=False)
    assert a.fingerprint("data") == b.fingerprint("data") and a.fingerprint("train") != b.fingerprint("train")
