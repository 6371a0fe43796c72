"""``hb export outputs/<experiment>``: the trained adapter merged into a plain transformers model (+ GGUF).

Why: the run's adapter needs PEFT, bitsandbytes and the 4-bit base to run; people who want to *use*
HealthBot need one ordinary model directory (``AutoModelForCausalLM.from_pretrained``, no peft) or
one GGUF file for llama.cpp / Ollama. What matters is that the export behaves like the model that
was evaluated, so every export is measured against it (:mod:`hb_utils.export.agreement`).

**Which weights to merge into.** QLoRA trained the adapter against the 4-bit NF4 weights, i.e.
the base weights plus their quantisation error. Merging into the original 16/32-bit base weights
(``base``) removes that error, so the merged model is a slightly different model from the one
that was evaluated; merging into the dequantized NF4 weights (``dequantized``) keeps exactly the
weights the adapter saw. Both are measured on the run's test questions against the adapter on
the 4-bit base; ``auto`` (the default) saves the one that agrees better and records both numbers
in ``export/merge_measurement.json`` and the model card.

Layout: ``outputs/<exp>/export/merged/`` (safetensors in fp16/bf16, tokenizer, chat template,
generation_config stopping at the end-of-turn token, README.md model card),
``export/hb_export.json`` (which adapter made it), ``export/gguf/`` (see :mod:`hb_utils.export.gguf_file`).
An export folder that holds another adapter's export is refused unless ``overwrite``, which moves it
aside (``export.replaced-<time>``), never deleting it.

**Reuse.** Exporting the same adapter again (same dtype, same or ``auto`` merge mode) keeps the merged
weights, but everything that comes from the run's config is rewritten from the current one: the
generation settings in ``generation_config.json``, ``healthbot_config.json`` (what ``hb chat`` reads),
the model card and existing Ollama Modelfiles. An evaluation-only rerun (``qual_temperature``,
``qual_max_new_tokens``, ...) changes the config without changing the adapter, so a reused export
would otherwise keep sampling with the old settings.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hb_utils import run_dir
from hb_utils.config import ExperimentConfig
from hb_utils.data import medquad
from hb_utils.errors import ModelError, RunError
from hb_utils.evaluate import metrics
from hb_utils.export import gguf_file
from hb_utils.export.agreement import compare_models
from hb_utils.export.model_card import write_model_card
from hb_utils.export.paths import EXPORT_CONFIG, MARKER, ExportPaths
from hb_utils.model import loading, source
from hb_utils.model import tokenizer as tokenizer_policy
from hb_utils.run_dir import RunPaths, read_json, run_config, utc_now, write_json

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

MERGE_MODES = ("auto", "base", "dequantized")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def adapter_identity(adapter_dir: Path) -> dict[str, Any]:
    """Which adapter an export came from: its hb_meta fingerprints and the hash of its weights
    (a retrained adapter of the same config has the same fingerprint but other weights)."""
    meta = loading.read_adapter_meta(adapter_dir) or {}
    digest = hashlib.sha256()
    for f in sorted(adapter_dir.glob("adapter_model.*")):
        digest.update(f.read_bytes())
    fingerprints = (meta.get("stamp") or {}).get("fingerprints", {})
    return {"model_name": meta.get("model_name"), "fingerprint": fingerprints.get("train"),
            "train_fingerprint": fingerprints.get("train"), "weights_sha256": digest.hexdigest()}


def claim_export_dir(paths: ExportPaths, identity: dict[str, Any], *, overwrite: bool) -> dict[str, Any] | None:
    """Refuse (RunError) an export folder of another adapter unless ``overwrite`` (then it is moved
    aside). Returns the previous marker when the folder already holds this adapter's export."""
    if not paths.root.exists() or not any(paths.root.iterdir()):
        return None
    old = read_json(paths.marker) if paths.marker.is_file() else None
    if old is not None and old.get("adapter", {}).get("weights_sha256") == identity["weights_sha256"]:
        return old
    what = (f"an export of another adapter (fingerprint {old.get('adapter', {}).get('fingerprint')!r}, this "
            f"adapter: {identity['fingerprint']!r})" if old else f"files without {MARKER} (not made by `hb export`)")
    if not overwrite:
        raise RunError(f"{paths.root} holds {what}. Pass --overwrite to move it aside (it is renamed, not deleted).")
    aside = run_dir.aside_path(paths.root)
    os.rename(paths.root, aside)  # same folder: atomic, and never into an existing directory
    print(f"moved the previous export aside: {aside}")
    return None


def parameter_count(cfg: ExperimentConfig) -> int:
    """Parameters of the base model, counted on the meta device (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source.resolve_model_path(cfg.model_name))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # tied weights are one parameter


def check_disk_space(where: Path, need_bytes: int, what: str) -> None:
    """RunError unless the file system of ``where`` has ``need_bytes`` (+10% and 64 MiB) free."""
    probe = where
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = int(need_bytes * 1.1) + 64 * 2**20
    if free < need:
        raise RunError(f"Not enough disk space for {what}: it needs about {need / 2**30:.2f} GiB, but only "
                       f"{free / 2**30:.2f} GiB are free on the disk of {probe}. Free some space (old "
                       f"outputs/*.replaced-* folders, checkpoints/) and run `hb export` again.")


def dequantize_into(plain: torch.nn.Module, quantized: torch.nn.Module) -> int:
    """Copy the dequantized 4-bit weight of every bitsandbytes ``Linear4bit`` in ``quantized`` (a
    4-bit model, with or without PEFT wrappers) into the same-named layer of ``plain``."""
    import bitsandbytes as bnb

    targets = dict(plain.named_modules())
    copied = 0
    for name, module in quantized.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        key = name.removeprefix("base_model.model.").removesuffix(".base_layer")
        weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        dest = targets[key].weight
        dest.data.copy_(weight.to(dest.device, dest.dtype))
        copied += 1
    if not copied:
        raise ModelError("The reference model has no 4-bit layers to dequantize: merge_into=dequantized needs a "
                         "run trained with load_in_4bit: true (use --merge-into base).")
    return copied


def merge(cfg: ExperimentConfig, adapter_dir: Path, merge_into: str,
          quantized: torch.nn.Module | None = None) -> PreTrainedModel:
    """The adapter merged (PEFT ``merge_and_unload``) into fp32 base weights: the original ones
    (``base``) or the dequantized 4-bit ones of ``quantized`` (``dequantized``)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(source.resolve_model_path(cfg.model_name), dtype=torch.float32)
    if merge_into == "dequantized":
        if quantized is None:
            quantized = loading.load_base_model(cfg)
        dequantize_into(plain, quantized)
    elif merge_into != "base":
        raise ValueError(f"merge_into must be base or dequantized, got {merge_into!r}")
    with warnings.catch_warnings():  # PEFT 0.21 reads a property transformers 5 renamed
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        merged = PeftModel.from_pretrained(plain, str(adapter_dir)).merge_and_unload()
    return merged.eval()


def eval_questions(cfg: ExperimentConfig) -> list[str]:
    """The run's evaluation questions: the first ``eval_size`` of its test split (as 04 uses)."""
    test = medquad.ensure_splits(cfg)["test"]
    return [r["question"] for r in metrics.select_first(test, cfg.eval_size)]


def _better(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (a["greedy_token_agreement"], -a["mean_abs_dp"]) >= (b["greedy_token_agreement"], -b["mean_abs_dp"])


def set_sampling(gen: GenerationConfig, cfg: ExperimentConfig) -> GenerationConfig:
    """Put the run's qualitative sampling settings (as 05 samples) into ``gen`` and return it.

    ``do_sample`` is True and the repetition penalty is the run's, so a plain ``model.generate(ids)``
    samples like 05; 04's greedy answers need ``do_sample=False, repetition_penalty=1.0`` (the model
    card says so)."""
    gen.do_sample, gen.temperature, gen.top_p = True, cfg.qual_temperature, cfg.qual_top_p
    gen.repetition_penalty, gen.max_new_tokens = cfg.qual_repetition_penalty, cfg.qual_max_new_tokens
    return gen


def write_settings(cfg: ExperimentConfig, merged: Path) -> None:
    """Rewrite what a reused merged model takes from the run's config: the sampling settings of its
    ``generation_config.json`` and its ``healthbot_config.json`` (both atomically)."""
    from transformers import GenerationConfig

    gen = set_sampling(GenerationConfig.from_pretrained(merged), cfg)
    tmp = merged / ".generation_config.json.tmp"
    gen.to_json_file(tmp)
    tmp.replace(merged / "generation_config.json")
    write_json(merged / EXPORT_CONFIG, {"config": cfg.to_dict()})


def save_merged(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: ExperimentConfig, target: Path,
                dtype: str) -> Path:
    """Write the merged model (``dtype``), tokenizer and a generation_config that stops at the
    end-of-turn token and samples with the run's qualitative settings, atomically."""
    model = model.to(DTYPES[dtype])
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ModelError(f"{len(bad)} merged tensors overflow {dtype} (e.g. {bad[0]}); export with --dtype bf16.")
    stops = tokenizer_policy.stop_token_ids(tokenizer)
    eot = tokenizer.convert_tokens_to_ids(tokenizer_policy.end_of_turn_token(tokenizer))
    model.config.eos_token_id = eot
    model.config.pad_token_id = tokenizer.pad_token_id
    gen = model.generation_config
    gen.eos_token_id = stops if len(stops) > 1 else eot
    gen.pad_token_id, gen.bos_token_id = tokenizer.pad_token_id, tokenizer.bos_token_id
    set_sampling(gen, cfg)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # for batched generation by users; training set it to right

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / EXPORT_CONFIG, {"config": cfg.to_dict()})

    if target.exists():  # this adapter's previous export (claim_export_dir checked)
        shutil.rmtree(target)
    try:
        return run_dir.write_dir_atomically(target, write, marker="config.json")
    finally:
        tokenizer.padding_side = side


def export_run(run_dir: str | Path, *, merge_into: str = "auto", dtype: str = "fp16", gguf: str | None = None,
               overwrite: bool = False, log: Any = print) -> dict[str, Any]:
    """Merge (and optionally GGUF-export) the adapter of ``run_dir``; returns the export record.

    ``merge_into``: auto | base | dequantized (see the module docstring); both are always measured.
    ``gguf``: None, ``f16`` or ``q8_0``.
    """

    if merge_into not in MERGE_MODES or dtype not in DTYPES or gguf not in (None, *gguf_file.GGUF_TYPES):
        raise RunError(f"merge_into must be one of {MERGE_MODES}, dtype one of {tuple(DTYPES)}, gguf one of "
                       f"{gguf_file.GGUF_TYPES}; got {merge_into!r}, {dtype!r}, {gguf!r}.")
    cfg = run_config(run_dir)
    run = RunPaths.for_config(cfg)
    adapter_dir = loading.check_adapter(cfg, run.adapter)  # ModelError: missing or foreign adapter
    paths = ExportPaths.for_config(cfg)
    identity = adapter_identity(adapter_dir)
    old = claim_export_dir(paths, identity, overwrite=overwrite)
    n_params = parameter_count(cfg)
    need = n_params * 2 + (n_params * gguf_file.BYTES_PER_PARAM[gguf] if gguf else 0)
    check_disk_space(paths.root, need, f"the merged model{' and GGUF' if gguf else ''} ({n_params / 1e6:.0f}M params)")

    reuse = (old is not None and (paths.merged / "config.json").is_file() and old.get("dtype") == dtype
             and merge_into in ("auto", old.get("merge_into")))
    record: dict[str, Any] = old if reuse else {}
    questions = eval_questions(cfg)
    if not reuse:
        reference, tokenizer = loading.load_adapter_model(cfg, adapter_dir)
        measured: dict[str, dict[str, Any]] = {}
        best_mode, best, cache = None, None, {}
        for mode in ("dequantized", "base"):
            log(f"merging into the {mode} weights and measuring on {len(questions)} test questions ...")
            t0 = time.perf_counter()
            # Measured as saved: rounded to the export dtype, computed in fp32 (how the CPU chat runs it).
            candidate = merge(cfg, adapter_dir, mode, quantized=reference).to(DTYPES[dtype]).float()
            merge_s = time.perf_counter() - t0
            measured[mode] = compare_models(reference, candidate, tokenizer, questions, cfg.system_prompt,
                                            max_new_tokens=cfg.eval_max_new_tokens, reference_cache=cache)
            measured[mode].update(merge_seconds=round(merge_s, 1),
                                  measure_seconds=round(time.perf_counter() - t0 - merge_s, 1))
            wanted = mode == merge_into or (merge_into == "auto" and (best_mode is None
                                                                      or _better(measured[mode], measured[best_mode])))
            if wanted:
                best_mode, best = mode, candidate
            del candidate
        assert best is not None and best_mode is not None
        measurement = {"reference": "adapter on the 4-bit base (as evaluated)", "questions": "test split, first "
                       f"eval_size={cfg.eval_size}", "candidates": f"merged, rounded to {dtype}, computed in fp32",
                       "modes": measured, "chosen": best_mode,
                       "chosen_by": "measurement" if merge_into == "auto" else "--merge-into", "created": utc_now()}
        write_json(paths.measurement, measurement)
        t0 = time.perf_counter()
        shutil.rmtree(paths.gguf, ignore_errors=True)  # made from the merge being replaced (same adapter)
        save_merged(best, tokenizer, cfg, paths.merged, dtype)
        record = {"adapter": identity, "experiment": cfg.experiment, "merge_into": best_mode, "dtype": dtype,
                  "save_seconds": round(time.perf_counter() - t0, 1), "created": utc_now(), "gguf": {}}
        del reference, best
    else:
        write_settings(cfg, paths.merged)
        for qtype, g in record.get("gguf", {}).items():
            gguf_path = paths.gguf / Path(g["file"]).name
            if qtype != gguf and gguf_path.is_file():
                g["modelfile"] = str(gguf_file.write_modelfile(cfg, paths.merged, gguf_path, qtype))
        log(f"reusing the merged model of this adapter; its generation settings, {EXPORT_CONFIG}, model card and "
            "Modelfiles are rewritten from the run's config")
    record["merged_bytes"] = sum(f.stat().st_size for f in paths.merged.iterdir() if f.suffix == ".safetensors")
    write_json(paths.marker, record)
    if gguf:
        record["gguf"][gguf] = gguf_file.export_gguf(cfg, paths.merged, paths.gguf, gguf, questions, log=log)
        write_json(paths.marker, record)
    write_model_card(cfg, paths, record)
    log(f"merged model ({record['merge_into']}, {dtype}): {paths.merged}")
    return record
