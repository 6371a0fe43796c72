"""hb_utils.model.loading: 4-bit, LoRA, base and adapter loading, adapter checks (tokenizer: test_tokenizer.py;
model sources: test_model_source.py; dtype policy: test_device.py).

Fast tests use a tiny randomly initialised Llama saved with the real SmolLM2 tokenizer; tests that
load the real SmolLM2 weights are marked slow. The fixtures here (smollm2_dir, smollm2_tokenizer,
tiny_model_dir) are shared with tests/model/test_generation.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hb_utils.config import ExperimentConfig
from hb_utils.errors import ConfigError, ModelError
from hb_utils.model import loading as M
from hb_utils.model import tokenizer as T
from hb_utils.model.source import SMOLLM2_ALIAS, load_tokenizer, resolve_model_path

HUB_ID = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"


# --------------------------------------------------------------------------- shared fixtures

@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2 directory in the user's cache (converted on first use, ~20 s once)."""
    try:
        return Path(resolve_model_path(SMOLLM2_ALIAS))
    except ModelError as exc:
        pytest.skip(f"offline model unavailable: {exc}")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir: Path):
    return load_tokenizer(SMOLLM2_ALIAS)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A tiny random Llama (2 layers, hidden 64) saved together with the real SmolLM2 tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_cfg(model_dir: Path, tmp_path: Path, **changes) -> ExperimentConfig:
    values = dict(model_name=str(model_dir), output_root=str(tmp_path), experiment="t", load_in_4bit=False,
                  compute_dtype="fp32", lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj"])
    values.update(changes)
    return ExperimentConfig(**values)


def test_attention_kernel_reaches_the_model_and_no_fingerprint(tiny_model_dir, tmp_path):
    for setting in ("sdpa", "eager"):
        model = M.load_base_model(tiny_cfg(tiny_model_dir, tmp_path, attn_implementation=setting), for_training=True)
        assert model.config._attn_implementation == setting
    auto = tiny_cfg(tiny_model_dir, tmp_path, attn_implementation="auto")
    assert M.load_base_model(auto, for_training=True).config._attn_implementation == "hb_auto"
    assert M.load_base_model(auto).config._attn_implementation == "sdpa"  # no gradients: SDPA throughout
    a, b = (ExperimentConfig(attn_implementation=v) for v in ("eager", "sdpa"))
    assert a.fingerprints() == b.fingerprints()  # a kernel choice: adapters stay usable across it
    with pytest.raises(ConfigError, match="attn_implementation"):
        ExperimentConfig(attn_implementation="flash")


def test_quantization_and_lora_config_follow_cfg():
    cfg = ExperimentConfig(compute_dtype="fp32", bnb_4bit_quant_type="fp4", bnb_4bit_double_quant=False,
                           lora_r=4, lora_alpha=32, lora_dropout=0.1, lora_target_modules=["q_proj"])
    q = M.quantization_config(cfg)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "fp4" and not q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype is torch.float32
    q = M.quantization_config(ExperimentConfig(compute_dtype="bf16"))  # Experiment 1: NF4 + double quant
    assert q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant and q.bnb_4bit_compute_dtype is torch.bfloat16
    assert M.quantization_config(ExperimentConfig(load_in_4bit=False)) is None
    lora = M.lora_config(cfg)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.bias) == (4, 32, 0.1, "none")
    assert set(lora.target_modules) == {"q_proj"} and lora.task_type == "CAUSAL_LM"


# --------------------------------------------------------------------------- base model / 4-bit / counts

def test_load_base_model_aligns_generation_config(tiny_model_dir, tmp_path):
    model = M.load_base_model(tiny_cfg(tiny_model_dir, tmp_path))
    tok = load_tokenizer(str(tiny_model_dir))
    assert model.dtype == torch.float32 and not model.training
    assert model.generation_config.eos_token_id == T.stop_token_ids(tok)
    assert model.generation_config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    counts = M.parameter_counts(model)
    assert counts["total"] == model.num_parameters() and counts["trainable"] == counts["total"]
    training = M.load_base_model(tiny_cfg(tiny_model_dir, tmp_path), for_training=True)
    assert training.config.use_cache is False


def test_tiny_4bit_load_on_cpu_counts_packed_params(tiny_model_dir, tmp_path):
    import bitsandbytes as bnb
    from peft import get_peft_model

    plain = M.load_base_model(tiny_cfg(tiny_model_dir, tmp_path))
    model = M.load_base_model(tiny_cfg(tiny_model_dir, tmp_path, load_in_4bit=True))
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    counts = M.parameter_counts(model)
    assert counts["total"] == plain.num_parameters()  # 2 values per packed byte, counted as values
    peft_model = get_peft_model(model, M.lora_config(tiny_cfg(tiny_model_dir, tmp_path)))
    counts = M.parameter_counts(peft_model)
    # LoRA on q_proj (64->64) and v_proj (64->32) in 2 layers, r=4: A is r x in, B is out x r.
    lora = 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4)
    assert counts["trainable"] == lora
    assert counts["total"] == plain.num_parameters() + lora
    assert counts["trainable_pct"] == pytest.approx(100 * lora / counts["total"], abs=1e-3)


def test_4bit_training_model_keeps_gradients_after_an_eval_pass(tiny_model_dir, tmp_path):
    """On AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights for a fused bf16 kernel without
    autograd at the first eval/no_grad forward; the loader must keep training models off that path."""
    import bitsandbytes as bnb
    from peft import get_peft_model

    cfg = tiny_cfg(tiny_model_dir, tmp_path, load_in_4bit=True, compute_dtype="bf16", lora_dropout=0.0)

    def lora_grads(eval_first: bool) -> list[torch.Tensor]:
        model = M.load_base_model(cfg, for_training=True)
        assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules()
                       if isinstance(m, bnb.nn.Linear4bit))
        torch.manual_seed(0)
        peft_model = get_peft_model(model, M.lora_config(cfg))
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
        x = torch.randint(5, 1000, (2, 12))
        if eval_first:  # what the Trainer's evaluation loop does between training steps
            peft_model.eval()
            with torch.no_grad():
                peft_model(input_ids=x)
        peft_model.train()
        peft_model(input_ids=x, labels=x).loss.backward()
        grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
        assert all(g is not None for g in grads)
        return grads

    for a, b in zip(lora_grads(False), lora_grads(True), strict=True):
        assert torch.equal(a, b)


def test_4bit_inference_on_cpu_uses_the_dequantize_path_in_every_dtype(tiny_model_dir, tmp_path):
    """bnb's fused CPU kernel is slower for batched work, not exact and not differentiable: no 4-bit CPU
    model may keep it, and an evaluation pass must not repack any weight for it."""
    import bitsandbytes as bnb

    from hb_utils.evaluate import perplexity

    def model(compute_dtype: str):
        return M.load_base_model(tiny_cfg(tiny_model_dir, tmp_path, load_in_4bit=True, compute_dtype=compute_dtype))

    for dtype in ("fp32", "bf16"):
        assert {m.support_avx512bf16_for_cpu for m in model(dtype).modules()
                if isinstance(m, bnb.nn.Linear4bit)} == {False}
    m = model("bf16")
    assert not any(getattr(mod.weight.quant_state, "packing_format_for_cpu", False)
                   for mod in m.modules() if isinstance(mod, bnb.nn.Linear4bit))
    tok = load_tokenizer(str(tiny_model_dir))
    convs = [[{"role": "user", "content": "q" * (i + 3)}, {"role": "assistant", "content": "a b c " * (i + 1)}]
             for i in range(4)]
    perplexity.token_nll(m, tok, convs, batch_size=4, progress=False)
    assert not any(getattr(mod.weight.quant_state, "packing_format_for_cpu", False)
                   for mod in m.modules() if isinstance(mod, bnb.nn.Linear4bit)), "an eval pass repacked a weight"


# --------------------------------------------------------------------------- adapters

def _train_free_adapter(cfg: ExperimentConfig, adapter_dir: Path):
    """A LoRA adapter with non-zero B (so it changes outputs), saved as training would save it."""
    from peft import get_peft_model

    model = get_peft_model(M.load_base_model(cfg), M.lora_config(cfg))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(adapter_dir)
    M.write_adapter_meta(cfg, adapter_dir)
    return model


def test_load_adapter_model_roundtrip(tiny_model_dir, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, tmp_path)
    adapter_dir = tmp_path / "adapter"
    trained = _train_free_adapter(cfg, adapter_dir).eval()
    meta = M.read_adapter_meta(adapter_dir)
    assert meta["model_name"] == cfg.model_name and meta["stamp"]["fingerprints"]["train"] == cfg.fingerprint("train")
    model, tok = M.load_adapter_model(cfg, adapter_dir)
    assert tok.padding_side == "right" and not model.training
    x = tok(["What is a fever?"], return_tensors="pt")
    with torch.no_grad():
        got, want = model(**x).logits, trained(**x).logits
        with model.disable_adapter():
            base = model(**x).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-3)  # the adapter is really applied


def test_load_adapter_model_refuses_missing_and_foreign_adapters(tiny_model_dir, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, tmp_path)
    with pytest.raises(ModelError, match="No trained LoRA adapter.*03_train_qlora"):
        M.load_adapter_model(cfg, tmp_path / "nowhere")
    adapter_dir = tmp_path / "adapter"
    _train_free_adapter(cfg, adapter_dir)

    other_model = cfg.replace(model_name=HUB_ID)
    with pytest.raises(ModelError) as err:
        M.load_adapter_model(other_model, adapter_dir)
    assert str(tiny_model_dir) in str(err.value) and HUB_ID in str(err.value) and "retrain" in str(err.value)

    other_cfg = cfg.replace(lora_r=8)
    with pytest.raises(ModelError, match=r"another train config \(lora_r: 4 -> 8\)") as err:
        M.load_adapter_model(other_cfg, adapter_dir)
    assert "lora_r: 4 -> 8" in str(err.value)  # names the differing parameter, old -> this config
    # Evaluation-only settings do not invalidate the adapter.
    M.check_adapter(cfg.replace(eval_size=3, gen_batch_size=2), adapter_dir)

    (adapter_dir / M.ADAPTER_META).unlink()
    with pytest.raises(ModelError, match="no hb_meta.json"):
        M.load_adapter_model(cfg, adapter_dir)


def test_adapter_config_base_model_is_checked_for_hub_ids(tmp_path):
    cfg = ExperimentConfig(model_name=HUB_ID, output_root=str(tmp_path))
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "meta-llama/Other"}))
    M.write_adapter_meta(cfg, adapter_dir)
    with pytest.raises(ModelError, match="meta-llama/Other"):
        M.check_adapter(cfg, adapter_dir)
    (adapter_dir / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": HUB_ID}))
    assert M.check_adapter(cfg, adapter_dir) == adapter_dir
    # A local path recorded by PEFT (the alias cache, another machine's folder) is not compared.
    (adapter_dir / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/home/x/model"}))
    assert M.check_adapter(cfg, adapter_dir) == adapter_dir


# --------------------------------------------------------------------------- slow: real SmolLM2

@pytest.mark.slow
def test_smollm2_4bit_on_cpu(smollm2_dir, tmp_path):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    cfg = ExperimentConfig(model_name=SMOLLM2_ALIAS, output_root=str(tmp_path), load_in_4bit=True,
                           compute_dtype="fp32")
    model = M.load_base_model(cfg)
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 30 * 7  # every attention and MLP projection of the 30 layers
    assert linears[0].weight.quant_state.quant_type == "nf4"
    n_plain = AutoModelForCausalLM.from_pretrained(smollm2_dir).num_parameters()
    assert M.parameter_counts(model)["total"] == n_plain
    tok = load_tokenizer(cfg.model_name)
    x = tok(["What is asthma?", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**x).logits
    assert logits.shape == (2, x["input_ids"].shape[1], len(tok)) and torch.isfinite(logits).all()
