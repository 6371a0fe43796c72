"""Loading models: tokenizer policy, 4-bit quantization, LoRA, the base model and a trained adapter.

Why this module exists:

* **Tokenizers** are configured in :mod:`hb_utils.model.tokenizer` (chat template, BOS, eos = end-of-turn,
  pad != eos: the original notebook's pitfalls).
* **One 4-bit path**: bitsandbytes >= 0.49 runs NF4 on CPU too, so CPU and GPU share the QLoRA code
  path (the dtype policy is :func:`hb_utils.model.device.resolve_compute_dtype`). On CPU every 4-bit layer
  stays on bitsandbytes' dequantize + matmul path (:func:`use_dequantize_matmul_path`: exact,
  differentiable, and faster for the batched work the project does than the fused kernel).
* **Attention kernel**: ``attn_implementation: auto`` loads training models with
  :mod:`hb_utils.model.attention`'s per-call choice (matmul attention for short CPU training calls) and
  everything else with SDPA.
* **Adapters never mix with another base/config**: :func:`load_adapter_model` checks the adapter's
  stamp (``hb_meta.json``, written by training through :func:`write_adapter_meta`).

Where the model files come from (Hub id, local directory, the packaged SmolLM2 GGUF) is
:mod:`hb_utils.model.source`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hb_utils import run_dir
from hb_utils.config import LORA_TARGETS, ExperimentConfig
from hb_utils.errors import ConfigError, ModelError, RunError
from hb_utils.model import attention, dequantized_weights
from hb_utils.model.device import default_device, resolve_compute_dtype
from hb_utils.model.source import SMOLLM2_ALIAS, load_tokenizer, looks_like_path, resolve_model_path
from hb_utils.model.tokenizer import encode_chat, stop_token_ids

if TYPE_CHECKING:  # heavy imports stay lazy: importing hb_utils must not pull in transformers/peft
    from peft import LoraConfig, PeftModel
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

ADAPTER_META = "hb_meta.json"





# --------------------------------------------------------------------------- dtype / quantization / LoRA

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

    extra = {}
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        # FSDP flattens parameters of one dtype: store the 4-bit weights in the compute dtype's container
        # (PEFT's FSDP + QLoRA recipe). Same values, other packing; set by accelerate launch's FSDP config.
        extra["bnb_4bit_quant_storage"] = resolve_compute_dtype(cfg.compute_dtype)
    return BitsAndBytesConfig(**extra,
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


# --------------------------------------------------------------------------- checks before a model loads
def module_names(cfg: ExperimentConfig) -> dict[str, str]:
    """``{module name: class name}`` of ``cfg``'s model architecture, built from its config on the meta
    device: no weights are read or allocated, so this takes a second where loading takes minutes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(cfg.model_name)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"Cannot read the config of model {cfg.model_name!r} ({exc}). Check the name, internet "
                         f"access for Hub ids, or use the offline alias {SMOLLM2_ALIAS!r}.") from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: type(module).__name__ for name, module in model.named_modules() if name}


def check_lora_targets(cfg: ExperimentConfig, names: dict[str, str] | None = None) -> None:
    """ConfigError unless every name in ``lora_target_modules`` is a layer of the model.

    Why: PEFT adapts the modules any name matches (a module named ``t`` or ending in ``.t``), so with
    ``q_proj,bogus_proj`` a misspelt name was silently dropped, and when none matched PEFT failed after
    the model load without naming the parameter.
    """
    names = module_names(cfg) if names is None else names
    linear = sorted({n.rsplit(".", 1)[-1] for n, kind in names.items() if kind in _ADAPTABLE})
    bad = []
    for target in cfg.lora_target_modules:
        hits = [kind for n, kind in names.items() if n == target or n.endswith("." + target)]
        if not any(kind in _ADAPTABLE for kind in hits):
            bad.append(target + (f" (a {hits[0]}, not a layer LoRA can adapt)" if hits else ""))
    if bad:
        raise ConfigError(f"lora_target_modules: {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not among the "
                          f"layers of {cfg.model_name}. Its layers LoRA can adapt: {', '.join(linear)} "
                          f"(e.g. -p lora_target_modules "
                          f"{','.join(n for n in LORA_TARGETS if n in linear) or linear[0]}).")


# Module classes PEFT's LoRA can wrap (peft.tuners.lora.layer: Linear, Embedding, Conv*, and bitsandbytes' Linear4bit
# once quantized); the meta-device model holds plain torch modules.
_ADAPTABLE = {"Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "Conv1D", "Linear4bit", "Linear8bitLt"}


def check_prompt_fits(cfg: ExperimentConfig, tokenizer: PreTrainedTokenizerBase,
                      questions: Sequence[str] = ("",)) -> int:
    """ConfigError unless the system prompt and the shortest question leave room for an answer token
    within ``max_length``; returns that prompt's token count.

    Why: TRL cuts every example to ``max_length`` and then drops the examples with no answer token left,
    so ``max_length 16`` (or a system prompt longer than ``max_length``) dropped every example and failed
    deep inside ``datasets`` (``IndexError: Invalid key: 0 is out of bounds for size 0``). Tokenizing one
    prompt is cheap and happens before the model loads. ``questions`` default: an empty question (what
    ``hb run`` checks before any data is loaded).
    """
    shortest = min(questions, key=len) if questions else ""
    def prompt_tokens(question: str) -> int:
        return len(encode_chat(tokenizer, [{"role": "system", "content": cfg.system_prompt},
                                           {"role": "user", "content": question}], add_generation_prompt=True))
    n = prompt_tokens(shortest)
    if n >= cfg.max_length:
        system_only = prompt_tokens("")
        raise ConfigError(
            f"max_length={cfg.max_length} leaves no room for an answer: the system_prompt and the shortest question "
            f"in the chat template take {n} tokens (the system_prompt with an empty question: {system_only}), so every "
            f"training example would be cut before its answer. Raise max_length above {n} (e.g. -p max_length "
            f"{max(256, 2 ** (n + 64).bit_length())}) or shorten system_prompt.")
    return n


# --------------------------------------------------------------------------- models

def align_generation_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make the model stop at the template's end-of-turn and pad with the tokenizer's pad token."""
    model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.eos_token_id = stop_token_ids(tokenizer)
        gen.pad_token_id = tokenizer.pad_token_id


def load_base_model(cfg: ExperimentConfig, *, for_training: bool = False,
                    tokenizer: PreTrainedTokenizerBase | None = None) -> PreTrainedModel:
    """The base model of ``cfg``: 4-bit NF4 when ``cfg.load_in_4bit`` (CPU and GPU alike), else in the
    compute dtype. ``for_training`` turns off the KV cache; gradient checkpointing and input grads
    are left to the trainer (TRL's SFTTrainer sets them from SFTConfig). Pass the ``tokenizer`` the
    caller already loaded (its stop and pad tokens go into the generation config), so one model load
    loads the tokenizer once."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(cfg.model_name)
    dtype = resolve_compute_dtype(cfg.compute_dtype)
    attn = cfg.attn_implementation
    if attn == "auto":  # the per-call choice only matters where gradients flow
        attn = attention.register() if for_training else "sdpa"
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": attn}
    qconf = quantization_config(cfg)
    if qconf is not None:
        kwargs["quantization_config"] = qconf
        kwargs["device_map"] = {"": default_device()}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ModelError(f"Cannot load model {cfg.model_name!r} ({exc}). Check the name, internet access for Hub "
                         f"ids, or use the offline alias {SMOLLM2_ALIAS!r}.") from exc
    if qconf is None and torch.cuda.is_available():
        model.to(default_device())
    if qconf is not None and default_device().type == "cpu":
        use_dequantize_matmul_path(model)
        dequantized_weights.install(model)  # frozen 4-bit weights: dequantized once (memory for time)
    align_generation_config(model, tokenizer if tokenizer is not None else load_tokenizer(cfg.model_name))
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
       faster (``benchmarks/bench_eval.py``; figures in ``benchmarks/README.md``). One prompt at a
       time the fused kernel is faster.

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
    """Stamp ``adapter_dir/hb_meta.json``: the base model and the train-scope stamp that made the adapter."""
    return run_dir.write_json(Path(adapter_dir) / ADAPTER_META, {
        "model_name": cfg.model_name, "stamp": run_dir.stamp(cfg, "train", "training.fit")})


def read_adapter_meta(adapter_dir: str | Path) -> dict[str, Any] | None:
    """The adapter's ``hb_meta.json``, or None when there is none."""
    path = Path(adapter_dir) / ADAPTER_META
    return run_dir.read_json(path) if path.is_file() else None


def check_adapter(cfg: ExperimentConfig, adapter_dir: str | Path) -> Path:
    """Raise ModelError unless ``adapter_dir`` holds an adapter trained from ``cfg``'s model and config."""
    adapter_dir = run_dir.resolve(adapter_dir)
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
    try:
        run_dir.require(meta.get("stamp"), cfg, "train", what=f"The adapter at {adapter_dir}",
                        fix=f"Use the parameters it was trained with, or retrain: {retrain}")
    except RunError as exc:
        raise ModelError(str(exc)) from None
    # For Hub ids, PEFT's own record of the base must agree too (for local dirs and the alias it is a
    # machine-specific path, so comparing it would only reject copies of the run directory).
    base = _read_base_model_name(adapter_dir)
    if base and not looks_like_path(base) and resolve_model_path(cfg.model_name) == cfg.model_name.strip() \
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
    tokenizer = load_tokenizer(cfg.model_name)
    base = load_base_model(cfg, tokenizer=tokenizer)
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
