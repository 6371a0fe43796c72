"""Run directories for the chat and export tests (imported by tests/test_chat.py and tests/export/test_export.py).

* ``tiny_run``: a run of a tiny random Llama (2 layers, hidden 64, the real SmolLM2 tokenizer) with a
  LoRA adapter whose B matrices are random (so it changes the output) and the adapter meta training
  writes. Seconds to build: the fast tests exercise the whole export and chat paths on it.
* ``trained_smoke_run``: params/smoke.yaml trained for 2 optimizer steps on synthetic MedQuAD-layout
  data (tests/conftest.write_release), short generation limits; 1-3 minutes, built once per session.

Both are memoised in this module, because importing one fixture into two test modules makes pytest
register it twice (its session cache is per registration).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hb_utils.config import ExperimentConfig, load_config
from hb_utils.data import medquad
from hb_utils.errors import ModelError
from hb_utils.model import loading, source
from hb_utils.run_dir import RunPaths
from hb_utils.runs import runner
from hb_utils.train import training
from tests.conftest import ROOT, write_release

_MEMO: dict[str, Path] = {}


def _smollm2_dir() -> Path:
    try:
        return Path(source.resolve_model_path(source.SMOLLM2_ALIAS))
    except ModelError as exc:
        pytest.skip(f"offline model unavailable: {exc}")


def tiny_model(out: Path) -> Path:
    """A tiny random Llama (untied, sharpened head) saved with the real SmolLM2 tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(_smollm2_dir())
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # Random init gives nearly flat next-token distributions (top-2 gaps ~1e-6), where greedy decoding
    # flips with the summation order of a matmul; a sharper head makes greedy answers well defined.
    model.lm_head.weight.data *= 50
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_tiny_run(root: Path, name: str = "tiny", **changes) -> ExperimentConfig:
    """A run directory (config.json, splits, adapter) of the tiny model; no training, random LoRA B."""
    from peft import get_peft_model

    model_dir = root / "tiny-llama"
    if not (model_dir / "config.json").is_file():
        tiny_model(model_dir)
    values = dict(model_name=str(model_dir), output_root=str(root / "out"), experiment=name,
                  dataset=str(write_release(root / "release")), split_by="row", sample_size=40, max_length=160,
                  compute_dtype="fp32", lora_r=4, lora_alpha=8, lora_target_modules=["q_proj", "v_proj", "down_proj"],
                  eval_size=3, eval_max_new_tokens=12, qual_max_new_tokens=16)
    values.update(changes)
    cfg = load_config(ROOT / "params" / "smoke.yaml", **values)
    runner.open_run(cfg)
    medquad.prepare_splits(cfg)
    torch.manual_seed(1)
    base = loading.load_base_model(cfg)
    peft_model = get_peft_model(base, loading.lora_config(cfg))
    for name_, param in peft_model.named_parameters():
        if "lora_B" in name_:
            torch.nn.init.normal_(param, std=0.2)
    peft_model.save_pretrained(RunPaths.for_config(cfg).adapter)
    loading.write_adapter_meta(cfg, RunPaths.for_config(cfg).adapter)
    return cfg


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if "tiny" not in _MEMO:
        cfg = make_tiny_run(tmp_path_factory.mktemp("tiny_run"))
        _MEMO["tiny"] = RunPaths.for_config(cfg).root
    return _MEMO["tiny"]


@pytest.fixture(scope="session")
def trained_smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """params/smoke.yaml, 2 optimizer steps of 2 examples (grad_accum 1) on synthetic data; config.json
    written as `hb run` does."""
    if "smoke" not in _MEMO:
        _smollm2_dir()
        tmp = tmp_path_factory.mktemp("trained_smoke")
        cfg = load_config(ROOT / "params" / "smoke.yaml", output_root=str(tmp / "out"),
                          dataset=str(write_release(tmp / "release")), max_steps=2, grad_accum=1, eval_size=3,
                          eval_max_new_tokens=16, qual_max_new_tokens=24)
        runner.open_run(cfg)
        training.train(cfg)
        _MEMO["smoke"] = RunPaths.for_config(cfg).root
    return _MEMO["smoke"]
