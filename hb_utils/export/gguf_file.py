"""GGUF export of a merged HealthBot (f16 or q8_0) with an Ollama ``Modelfile``, verified by a round trip.

Why GGUF: llama.cpp and Ollama run a GGUF file on a laptop CPU without Python. The file is written
with the ``gguf`` package (llama.cpp's own Python writer): its ``GGUFWriter``, its tensor-name
mapping (``get_tensor_name_map``), its vocab readers (``BpeVocab`` / ``LlamaHfVocab``,
``SpecialVocab`` for merges, special ids and the chat template) and its Q8_0 quantiser. What we
add is what llama.cpp's converter script adds for the Llama architecture (SmolLM2 and TinyLlama):
the hyper-parameter keys, token types (special added tokens are CONTROL, so they are parsed
whole and never printed) and the Q/K row permutation llama.cpp's rotary embedding expects
(transformers undoes it when it loads a GGUF, see its ``TensorProcessor``).

**Tokenizer flags.** Two keys tell llama.cpp and Ollama how to tokenize a prompt, and both must
say what the kit's tokenizer does, because their defaults differ by runtime: Ollama's Llama runner
adds a BOS unless ``tokenizer.ggml.add_bos_token`` is false, and llama.cpp prepends a space to
SentencePiece text unless ``tokenizer.ggml.add_space_prefix`` is false. ``gguf.SpecialVocab`` takes
``add_bos_token`` from ``tokenizer_config.json``, where transformers 5 no longer writes it, so the
kit writes both itself (:func:`tokenizer_flags`): ``add_bos_token`` from the kit's BOS policy
(:func:`hb_utils.model.tokenizer.adds_bos`: false for SmolLM2, true where the tokenizer adds BOS to
plain text) and ``add_space_prefix`` from what the tokenizer does to the start of a text.

The **round trip** loads the file back with transformers (``gguf_file=``) and compares its
next-token distributions with the merged model on the run's evaluation prompts
(:func:`hb_utils.export.agreement.compare_models`). f16 stores the merged fp16 weights exactly, so it must
give the same greedy token at every position; q8_0 is lossy and its agreement and max |Δp| are
reported. The tokenizer transformers rebuilds from the file is checked to encode the prompts the
same way (transformers knows only some llama.cpp pre-tokenizers; a mismatch is reported).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hb_utils.config import ExperimentConfig
from hb_utils.errors import ModelError
from hb_utils.export.agreement import compare_models
from hb_utils.model import source
from hb_utils.model import tokenizer as tokenizer_policy
from hb_utils.run_dir import write_json

log_ = logging.getLogger(__name__)

GGUF_TYPES = ("f16", "q8_0")
BYTES_PER_PARAM = {"f16": 2.0, "q8_0": 34 / 32}  # Q8_0: 32 int8 values + one fp16 scale per block
SUPPORTED = ("llama",)  # SmolLM2, TinyLlama


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotary layout (halves) -> llama.cpp's (interleaved pairs), per head; as llama.cpp's converter."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _vocab(model_dir: Path) -> tuple[Any, str]:
    from gguf.vocab import BpeVocab, LlamaHfVocab

    try:
        return BpeVocab(model_dir), "gpt2"  # byte-level BPE (SmolLM2)
    except FileNotFoundError:
        return LlamaHfVocab(model_dir), "llama"  # SentencePiece-style BPE with byte fallback (TinyLlama)


def pre_tokenizer_name(cfg: ExperimentConfig) -> str:
    """llama.cpp's pre-tokenizer name: the packaged SmolLM2 GGUF states it (``smollm``); for other
    models the kit cannot identify it offline (llama.cpp's converter hashes a test string against its
    own table) and writes ``default``, with a warning."""
    if cfg.model_name.strip().lower() == source.SMOLLM2_ALIAS:
        from gguf import GGUFReader

        field = GGUFReader(source.packaged_gguf()).get_field("tokenizer.ggml.pre")
        if field is not None:
            return field.contents()
    log_.warning("Writing tokenizer.ggml.pre=default for %s: llama.cpp may split text slightly differently",
                 cfg.model_name)
    return "default"


def space_prefix(tokenizer: Any, tok_model: str) -> bool:
    """Whether llama.cpp must prepend a space to a text before tokenizing it (``add_space_prefix``).

    Only SentencePiece-style vocabularies (GGUF tokenizer model ``llama``) use the flag: SentencePiece's
    "dummy prefix" turns the start of a text into a word start (``"a"`` -> ``"▁a"``), which llama.cpp
    reproduces by prepending a space. Whether the tokenizer does it is read from what it does (a probe
    word tokenized without special tokens starts with the ``▁`` word marker), not from a config flag: the
    same behaviour is spelled as a ``Prepend`` normalizer, a ``Metaspace`` pre-tokenizer with
    ``prepend_scheme`` ``first``/``always``, or ``add_dummy_prefix`` in a ``.model`` file. Byte-level BPE
    (``gpt2``, SmolLM2) marks spaces with ``Ġ`` itself and llama.cpp ignores the flag for it: false.
    """
    if tok_model != "llama":
        return False
    ids = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bool(ids) and tokenizer.convert_ids_to_tokens(ids[0]).startswith("\u2581")


def tokenizer_flags(tokenizer: Any, tok_model: str) -> dict[str, bool]:
    """``tokenizer.ggml.add_bos_token`` and ``add_space_prefix`` for ``tokenizer`` (module docstring)."""
    return {"add_bos_token": tokenizer_policy.adds_bos(tokenizer),
            "add_space_prefix": space_prefix(tokenizer, tok_model)}


def write_gguf(model_dir: Path, out: Path, qtype: str, *, name: str, pre: str) -> Path:
    """Write the merged model in ``model_dir`` as a GGUF file ``out`` (``f16`` or ``q8_0``), atomically."""
    import gguf
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type not in SUPPORTED:
        raise ModelError(f"GGUF export supports the Llama architecture (SmolLM2, TinyLlama); {model_dir} is "
                         f"{config.model_type!r}. Use the merged transformers model instead.")
    arch = gguf.MODEL_ARCH.LLAMA
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
    w.add_name(name)
    w.add_description("HealthBot: LoRA fine-tune on MedQuAD (CC BY 4.0), merged. Research model, not medical advice.")
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    w.add_rope_dimension_count(head_dim)
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ModelError(f"GGUF export does not handle rope scaling {rope.get('rope_type')!r} yet.")
    w.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    w.add_vocab_size(config.vocab_size)
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    vocab, tok_model = _vocab(model_dir)
    tokens, scores, types = zip(*vocab.all_tokens(), strict=True)
    types = list(types)
    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    if tok_model == "gpt2":  # BpeVocab marks every token in the base vocab NORMAL; specials must be CONTROL
        for idx, added in hf_tok.added_tokens_decoder.items():
            types[idx] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    w.add_tokenizer_model(tok_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(list(tokens))
    w.add_token_scores(list(scores))
    w.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens))
    flags = tokenizer_flags(hf_tok, tok_model)
    special.add_special_token["bos"] = flags["add_bos_token"]  # replaces SpecialVocab's guess: one key, ours
    special.add_to_gguf(w, quiet=True)
    w.add_add_space_prefix(flags["add_space_prefix"])

    tmap = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(f))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when output.weight is absent
    for hf_name, tensor in state.items():
        new_name = tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ModelError(f"No GGUF name for tensor {hf_name!r} of {model_dir}.")
        data = tensor.float().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _permute(data, config.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = _permute(data, config.num_key_value_heads)
        if data.ndim == 1:  # norms stay f32, as llama.cpp keeps them
            w.add_tensor(new_name, data.astype(np.float32))
        elif qtype == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            w.add_tensor(new_name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(new_name, data.astype(np.float16))
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _go_literal(text: str) -> str:
    """Text for a Go template: the only special sequence is ``{{``."""
    return text.replace("{{", '{{ "{{" }}')


def role_wrappers(tokenizer: Any) -> dict[str, tuple[str, str]]:
    """Per role, the text the Jinja chat template puts before and after a message's content, found by
    rendering sentinels (a message ends after the end-of-turn token and its trailing newline)."""
    eot = tokenizer_policy.end_of_turn_token(tokenizer)
    s = {"system": "HBSYS1", "user": "HBUSR1", "assistant": "HBAST1", "user2": "HBUSR2"}
    msgs = [{"role": "system", "content": s["system"]}, {"role": "user", "content": s["user"]},
            {"role": "assistant", "content": s["assistant"]}, {"role": "user", "content": s["user2"]}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    pos = [text.index(s[k]) for k in ("system", "user", "assistant", "user2")]
    gaps = [text[pos[i] + len(s[k]):pos[i + 1]] for i, k in enumerate(("system", "user", "assistant"))]

    def split(gap: str) -> tuple[str, str]:
        cut = gap.index(eot) + len(eot)
        cut += len(gap[cut:]) - len(gap[cut:].lstrip("\n"))
        return gap[:cut], gap[cut:]

    (sys_end, usr_pre), (usr_end, ast_pre), (ast_end, _) = (split(g) for g in gaps)
    return {"system": (text[:pos[0]], sys_end), "user": (usr_pre, usr_end), "assistant": (ast_pre, ast_end)}


def modelfile_text(gguf_name: str, tokenizer: Any, cfg: ExperimentConfig) -> str:
    """An Ollama Modelfile: the model's chat template as a Go template over ``.Messages``, its stop
    tokens, the run's system prompt and qualitative sampling settings.

    * No ``SYSTEM`` line when the run's ``system_prompt`` is empty: an empty ``SYSTEM`` block would send an
      empty system turn and so remove the default one the chat template adds (SmolLM2's), while the kit's
      evaluation and chat leave the system turn out (:func:`hb_utils.model.generation.prompt_messages`) so
      that the template's default applies.
    * Where the tokenizer adds BOS (the GGUF says ``add_bos_token`` true, so Ollama adds it to every
      prompt), the BOS the kit's chat template renders is left out of the Go template: exactly one BOS,
      with or without a system message.
    """
    wrap = role_wrappers(tokenizer)
    if tokenizer_policy.adds_bos(tokenizer) and tokenizer.bos_token:
        pre, post = wrap["system"]
        wrap["system"] = (pre.removeprefix(tokenizer.bos_token), post)
    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{_go_literal(pre)}{{{{ .Content }}}}'
        f"{_go_literal(post)}" for i, (role, (pre, post)) in enumerate(wrap.items()))
    template = f"{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{_go_literal(wrap['assistant'][0])}"
    stops = [tokenizer.convert_ids_to_tokens(i) for i in tokenizer_policy.stop_token_ids(tokenizer)]
    lines = [f"# HealthBot ({cfg.experiment}): research model, not medical advice. "
             "`ollama create healthbot -f <this file>`", f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    if cfg.system_prompt:
        lines.append(f'SYSTEM """{cfg.system_prompt}"""')
    lines += [f'PARAMETER stop "{t}"' for t in stops]
    lines += [f"PARAMETER temperature {cfg.qual_temperature}", f"PARAMETER top_p {cfg.qual_top_p}",
              f"PARAMETER repeat_penalty {cfg.qual_repetition_penalty}",
              f"PARAMETER num_predict {cfg.qual_max_new_tokens}", f"PARAMETER num_ctx {cfg.max_length}"]
    return "\n".join(lines) + "\n"


def roundtrip(model_dir: Path, gguf_path: Path, cfg: ExperimentConfig, questions: list[str]) -> dict[str, Any]:
    """Load ``gguf_path`` with transformers and compare it with the merged model (fp32 compute both)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer


    merged = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    back = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    back_tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return compare_models(merged, back, tokenizer, questions, cfg.system_prompt,
                          max_new_tokens=cfg.eval_max_new_tokens, candidate_tokenizer=back_tok)


def write_modelfile(cfg: ExperimentConfig, model_dir: Path, gguf_path: Path, qtype: str) -> Path:
    """Write ``Modelfile.<qtype>`` next to ``gguf_path`` from the run's current config (atomically)."""
    from transformers import AutoTokenizer

    modelfile = gguf_path.parent / f"Modelfile.{qtype}"
    tmp = modelfile.with_name(f".{modelfile.name}.tmp-{os.getpid()}")
    tmp.write_text(modelfile_text(gguf_path.name, AutoTokenizer.from_pretrained(model_dir), cfg))
    tmp.replace(modelfile)
    return modelfile


def export_gguf(cfg: ExperimentConfig, model_dir: Path, out_dir: Path, qtype: str, questions: list[str],
                log: Any = print) -> dict[str, Any]:
    """GGUF file + Modelfile + round-trip measurement (``<qtype>_roundtrip.json``) in ``out_dir``."""
    t0 = time.perf_counter()
    out = out_dir / f"healthbot-{cfg.experiment}-{qtype}.gguf"
    write_gguf(model_dir, out, qtype, name=f"HealthBot {cfg.experiment}", pre=pre_tokenizer_name(cfg))
    seconds = round(time.perf_counter() - t0, 1)
    modelfile = write_modelfile(cfg, model_dir, out, qtype)
    log(f"GGUF {qtype}: {out} ({out.stat().st_size / 2**20:.1f} MiB, {seconds} s); checking the round trip ...")
    rt = roundtrip(model_dir, out, cfg, questions)
    write_json(out_dir / f"{qtype}_roundtrip.json", rt)
    if qtype == "f16" and rt["greedy_token_agreement"] < 1.0:
        raise ModelError(f"The f16 GGUF {out} does not reproduce the merged model (greedy-token agreement "
                         f"{rt['greedy_token_agreement']:.3f}); this is a bug in the export, please report it.")
    return {"file": str(out), "bytes": out.stat().st_size, "modelfile": str(modelfile), "seconds": seconds,
            "roundtrip": rt}
