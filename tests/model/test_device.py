"""The machine record and the dtype policy (hb_utils.model.device)."""

from __future__ import annotations

import pytest
import torch

from hb_utils.errors import ConfigError
from hb_utils.model import device as M


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
    with pytest.raises(ConfigError, match="compute_dtype"):
        M.resolve_compute_dtype("float8")


def test_summary_reports_policy_cpu_class_and_versions():
    info = M.summary()
    assert info["device"] in ("cpu",) or info["device"].startswith("cuda")
    assert info["auto_compute_dtype"] in ("bfloat16", "float16", "float32")
    assert info["versions"]["torch"] == torch.__version__ and info["versions"]["transformers"]
    cpu = info["cpu"]
    assert cpu["class"] in ("bf16", "fp32") and cpu["model"] and cpu["cores"] >= 1
    assert (cpu["class"] == "bf16") == M.cpu_has_native_bf16()
    assert set(cpu["flags"]) <= set(M.CPU_FLAGS)


def test_peak_memory_is_positive():
    mem = M.peak_memory()
    assert mem["gb"] > 0 and mem["kind"] in ("process_peak_rss", "cuda_max_allocated")
