"""hb_utils.export.merge / gguf_export / model_card: merged model, both merge modes measured, GGUF round trip, refusals.

Fast tests run the whole export on a tiny random Llama with a random adapter (tests/tiny_runs.py);
the slow ones export the session's trained smoke adapter on the real SmolLM2.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from hb_utils import run_dir
from hb_utils.errors import ModelError, RunError
from hb_utils.export import gguf_file, merge
from hb_utils.model import loading
from hb_utils.run_dir import RunPaths, read_json, write_json
from tests.tiny_runs import make_tiny_run


@pytest.fixture(scope="module")
def tiny_export(tiny_run: Path) -> dict:  # noqa: F811
    """The tiny run exported once (merged + GGUF f16) for the fast tests of this module."""
    return merge.export_run(tiny_run, gguf="f16", log=lambda *_: None)


def _merged(run: Path) -> Path:
    return run / "export" / "merged"


def _render_go(modelfile: str, msgs: list[dict[str, str]]) -> str:
    """The Modelfile's Go template evaluated for ``msgs`` (this simple shape: a range over the messages
    with one branch per role, then the generation prompt)."""
    template = re.search(r'TEMPLATE """(.*?)"""', modelfile, re.S).group(1)
    body, tail = re.fullmatch(r"\{\{ range \.Messages \}\}(.*)\{\{ end \}\}\{\{ end \}\}(.*)", template, re.S).groups()
    branches = dict(re.findall(r'\{\{ (?:else )?if eq \.Role "(\w+)" \}\}(.*?)(?=\{\{ else if|\Z)', body, re.S))
    return "".join(branches[m["role"]].replace("{{ .Content }}", m["content"]) for m in msgs) + tail


def _gguf_field(path: str | Path, key: str):
    from gguf import GGUFReader

    field = GGUFReader(path).get_field(key)
    return None if field is None else field.contents()


def _sentencepiece_model(out: Path, *, prepend_scheme: str, adds_bos: bool) -> Path:
    """A tiny Llama with a SentencePiece-style tokenizer (BPE with byte fallback and the ``▁`` word
    marker, as TinyLlama's) that marks the start of a text as a word start (``prepend_scheme`` first)
    or not (never), and adds ``<s>`` to plain text or not."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    from hb_utils.model import tokenizer as tokenizer_policy

    mark = "\u2581"
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}}
    for piece in (mark, "a", "b", mark + "a", mark + "b"):
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(mark, "a"), (mark, "b")], unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=mark, prepend_scheme=prepend_scheme, split=False)
    tok.decoder = decoders.Sequence([decoders.Replace(mark, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", 1)])
    hf_tok = TokenizersBackend(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    hf_tok.chat_template = tokenizer_policy.ZEPHYR_TEMPLATE
    hf_tok.save_pretrained(out)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


# --------------------------------------------------------------------------- fast: tiny model
def test_merged_export_is_a_plain_transformers_model(tiny_run: Path, tiny_export: dict):  # noqa: F811
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = _merged(tiny_run)
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n for n, _ in model.named_parameters())  # merged, not wrapped: no peft needed
    with safe_open(str(merged / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    tok = AutoTokenizer.from_pretrained(merged)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.chat_template and model.generation_config.eos_token_id == eot and model.config.eos_token_id == eot
    assert tok.pad_token_id != eot
    assert read_json(merged / merge.EXPORT_CONFIG)["config"]["experiment"] == "tiny"


def test_both_merge_modes_are_measured_and_the_closer_one_is_saved(tiny_run: Path, tiny_export: dict):  # noqa: F811
    m = read_json(tiny_run / "export" / "merge_measurement.json")
    deq, base = m["modes"]["dequantized"], m["modes"]["base"]
    for v in (deq, base):
        assert v["questions"] == 3 and v["positions"] > 0 and 0 <= v["greedy_token_agreement"] <= 1
    # The adapter was put on the NF4 weights: merging into their dequantized values reproduces it up to
    # fp16 rounding, merging into the original weights adds the quantisation error back.
    assert deq["max_abs_dp"] < base["max_abs_dp"]
    assert m["chosen"] == tiny_export["merge_into"] == "dequantized" and m["chosen_by"] == "measurement"


def test_merged_model_reproduces_the_adapter_on_4bit(tiny_run: Path, tiny_export: dict):  # noqa: F811
    """Independent of the recorded numbers: reload both from disk and compare greedy answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hb_utils.model.generation import generate_answers

    cfg = merge.run_config(tiny_run)
    ref, tok = loading.load_adapter_model(cfg, RunPaths.for_config(cfg).adapter)
    merged = AutoModelForCausalLM.from_pretrained(_merged(tiny_run), dtype=torch.float32)
    qs = merge.eval_questions(cfg)
    kw = dict(max_new_tokens=8, progress=False, repetition_penalty=1.0)
    a = [r.text for r in generate_answers(ref, tok, qs, cfg.system_prompt, **kw)]
    b = [r.text for r in generate_answers(merged, AutoTokenizer.from_pretrained(_merged(tiny_run)), qs,
                                          cfg.system_prompt, **kw)]
    assert a == b


def test_model_card_has_licence_citation_caveat_config_and_measurement(tiny_run: Path, tiny_export: dict):  # noqa: F811
    card = (_merged(tiny_run) / "README.md").read_text()
    for needle in ("CC BY 4.0", "Ben Abacha", "BMC Bioinformatics 20, 511 (2019)", "not medical advice",
                   "Merged into the **dequantized** weights", "greedy-token agreement", '"lora_r": 4',
                   "healthbot-tiny-f16.gguf", "No `metrics/eval.json`"):
        assert needle in card, needle


def test_model_card_shows_eval_results_with_intervals(tiny_run: Path, tiny_export: dict, monkeypatch):  # noqa: F811
    from hb_utils.evaluate import evaluation
    from hb_utils.export import model_card

    cfg = merge.run_config(tiny_run)
    ci = {"value": 0.2, "ci_low": 0.1, "ci_high": 0.3}
    fake = {"stamp": run_dir.stamp(cfg, "eval", "test"), "settings": {"eval_examples": 3},
            "generation": {"rougeL": {"base": ci, "finetuned": ci, "delta": {"delta": 0.0, "ci_low": -0.1,
                                                                               "ci_high": 0.1}}},
            "perplexity": {s: {k: {"label": k, "ppl": 9.5, "value": 9.5, "ci_low": 9.0, "ci_high": 10.0, "tokens": 5}
                               for k in ("answer_token_weighted", "original_per_example_full_text")}
                           for s in ("base", "finetuned")}}
    fake["perplexity"]["delta"] = {"delta": -0.5, "ci_low": -1.0, "ci_high": 0.0}
    monkeypatch.setattr(evaluation, "load_eval", lambda c: fake)
    eval_path = RunPaths.for_config(cfg).metrics / "eval.json"
    write_json(eval_path, fake)
    try:
        record = read_json(tiny_run / "export" / merge.MARKER)
        card = model_card.write_model_card(cfg, merge.ExportPaths.for_config(cfg), record).read_text()
    finally:
        eval_path.unlink()
    assert "ROUGE-L" in card and "20.0 [10.0, 30.0]" in card and "9.50 [9.00, 10.00]" in card


def test_gguf_f16_round_trip_is_exact_and_has_a_modelfile(tiny_run: Path, tiny_export: dict):  # noqa: F811
    g = tiny_export["gguf"]["f16"]
    rt = g["roundtrip"]
    assert rt["greedy_token_agreement"] == 1.0 and rt["max_abs_dp"] < 1e-6 and rt["same_prompt_token_ids"] == 1.0
    from gguf import GGUFReader

    reader = GGUFReader(g["file"])
    names = {t.name for t in reader.tensors}
    assert "output.weight" in names and "blk.0.attn_q.weight" in names  # untied head, llama.cpp names
    assert reader.get_field("tokenizer.ggml.eos_token_id").contents() == 2
    assert "<|im_start|>" in reader.get_field("tokenizer.chat_template").contents()
    modelfile = Path(g["modelfile"]).read_text()
    assert "FROM ./healthbot-tiny-f16.gguf" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "You are HealthBot" in modelfile


def test_modelfile_template_renders_like_the_jinja_template(tiny_run: Path, tiny_export: dict):  # noqa: F811
    """The Go template, evaluated for this simple shape, gives the same prompt as the chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_merged(tiny_run))
    text = Path(tiny_export["gguf"]["f16"]["modelfile"]).read_text()
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    assert _render_go(text, msgs) == tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_gguf_states_the_kits_bos_policy_and_no_space_prefix(tiny_run: Path, tiny_export: dict):  # noqa: F811
    """SmolLM2's tokenizer adds no BOS and is byte-level BPE: both flags false in the file itself, so
    Ollama (which adds BOS when the key is missing) does not put an extra ``<|im_start|>`` first."""
    path = tiny_export["gguf"]["f16"]["file"]
    assert _gguf_field(path, "tokenizer.ggml.add_bos_token") is False
    assert _gguf_field(path, "tokenizer.ggml.add_space_prefix") is False


@pytest.mark.parametrize(("prepend_scheme", "adds_bos"), [("first", True), ("never", False)])
def test_gguf_flags_of_a_sentencepiece_tokenizer_follow_the_tokenizer(tmp_path: Path, prepend_scheme: str,
                                                                     adds_bos: bool):
    from transformers import AutoTokenizer

    from hb_utils.model import tokenizer as tokenizer_policy

    model_dir = _sentencepiece_model(tmp_path / "sp", prepend_scheme=prepend_scheme, adds_bos=adds_bos)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer_policy.adds_bos(tok) is adds_bos  # the fixture is what it says
    out = gguf_file.write_gguf(model_dir, tmp_path / "sp.gguf", "f16", name="sp", pre="default")
    assert _gguf_field(out, "tokenizer.ggml.model") == "llama"
    assert _gguf_field(out, "tokenizer.ggml.add_bos_token") is adds_bos
    assert _gguf_field(out, "tokenizer.ggml.add_space_prefix") is (prepend_scheme == "first")


def test_a_tokenizer_that_adds_bos_gets_exactly_one_bos_under_ollama(tiny_run: Path, tiny_export: dict,  # noqa: F811
                                                                      tmp_path: Path):
    """A byte-level tokenizer that adds BOS (the kit's chat template then renders it): the GGUF says
    add_bos_token true, so Ollama adds the BOS, and the Modelfile's template must not add a second one."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    from hb_utils.model import tokenizer as tokenizer_policy

    model_dir = tmp_path / "merged"
    shutil.copytree(_merged(tiny_run), model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    bos = "<repo_name>"
    tok.bos_token = bos
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.convert_tokens_to_ids(bos))])
    assert tokenizer_policy.apply_bos_policy(tok)  # the chat template now renders the BOS
    tok.save_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = gguf_file.write_gguf(model_dir, tmp_path / "bos.gguf", "f16", name="bos", pre="smollm")
    assert _gguf_field(out, "tokenizer.ggml.add_bos_token") is True
    assert _gguf_field(out, "tokenizer.ggml.add_space_prefix") is False
    modelfile = gguf_file.modelfile_text(out.name, tok, merge.run_config(tiny_run))
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}]
    jinja = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert jinja.startswith(bos) and bos + _render_go(modelfile, msgs) == jinja
    assert bos not in modelfile


def test_modelfile_without_a_system_prompt_has_no_system_line(tiny_run: Path, tiny_export: dict):  # noqa: F811
    """An empty SYSTEM would replace the template's default system turn with an empty one."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_merged(tiny_run))
    cfg = merge.run_config(tiny_run)
    assert 'SYSTEM """You are HealthBot' in gguf_file.modelfile_text("x.gguf", tok, cfg)
    text = gguf_file.modelfile_text("x.gguf", tok, dataclasses.replace(cfg, system_prompt=""))
    assert "SYSTEM" not in text and "TEMPLATE" in text and "PARAMETER temperature" in text


def test_gguf_q8_0_is_smaller_and_close(tiny_run: Path, tiny_export: dict):  # noqa: F811
    cfg = merge.run_config(tiny_run)
    out = gguf_file.export_gguf(cfg, _merged(tiny_run), tiny_run / "export" / "gguf", "q8_0",
                                  merge.eval_questions(cfg), log=lambda *_: None)
    assert out["bytes"] < 0.65 * tiny_export["gguf"]["f16"]["bytes"]
    assert out["roundtrip"]["greedy_token_agreement"] > 0.5 and out["roundtrip"]["max_abs_dp"] < 0.5


def test_reexport_of_the_same_adapter_reuses_the_merged_model(tiny_run: Path, tiny_export: dict):  # noqa: F811
    before = (_merged(tiny_run) / "model.safetensors").stat().st_mtime_ns
    again = merge.export_run(tiny_run, log=lambda *_: None)
    assert (_merged(tiny_run) / "model.safetensors").stat().st_mtime_ns == before
    assert again["merge_into"] == "dequantized"


def test_reexport_after_an_eval_only_change_rewrites_the_settings(tiny_run: Path, tiny_export: dict,  # noqa: F811
                                                                    tmp_path: Path):
    """05 rerun with other sampling settings (config.json records them, the adapter is the same): the
    merged weights are reused, and everything that carries the settings says the new ones."""
    from hb_utils import chat
    from hb_utils.evaluate import reruns

    run = tmp_path / "out" / "tiny"
    shutil.copytree(tiny_run, run)  # the exported run, so the session's tiny run keeps its settings
    cfg = merge.run_config(run)
    assert (cfg.qual_temperature, cfg.qual_max_new_tokens) == (0.3, 16)
    new = dataclasses.replace(cfg, qual_temperature=0.7, qual_max_new_tokens=200)
    reruns.record_eval_rerun(new, "05_qualitative", made_by="test")
    assert read_json(run / "config.json")["config"]["qual_temperature"] == 0.7
    weights = _merged(run) / "model.safetensors"
    before = weights.stat().st_mtime_ns

    merge.export_run(run, log=lambda *_: None)

    assert weights.stat().st_mtime_ns == before  # reused, not merged again
    gen = read_json(_merged(run) / "generation_config.json")
    assert gen["temperature"] == 0.7 and gen["max_new_tokens"] == 200 and gen["do_sample"] is True
    assert gen["top_p"] == 0.9 and gen["repetition_penalty"] == 1.15 and gen["eos_token_id"] == 2
    saved = read_json(_merged(run) / merge.EXPORT_CONFIG)["config"]
    assert (saved["qual_temperature"], saved["qual_max_new_tokens"]) == (0.7, 200)
    modelfile = (run / "export" / "gguf" / "Modelfile.f16").read_text()
    assert "PARAMETER temperature 0.7" in modelfile and "PARAMETER num_predict 200" in modelfile
    assert "FROM ./healthbot-tiny-f16.gguf" in modelfile
    assert "temperature 0.7" in (_merged(run) / "README.md").read_text()
    cm = chat.load_chat_model(_merged(run))  # what `hb chat outputs/<run>/export/merged` samples with
    assert (cm.cfg.qual_temperature, cm.cfg.qual_max_new_tokens) == (0.7, 200)
    assert cm.model.generation_config.temperature == 0.7


def test_model_card_says_how_to_get_the_greedy_answers_of_04(tiny_run: Path, tiny_export: dict):  # noqa: F811
    """The merged model samples by default (do_sample true, repetition penalty 1.15): the card says so,
    and the generate call it shows reproduces 04's greedy answer (same call as evaluation.run_evaluation)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hb_utils.evaluate import evaluation

    card = (_merged(tiny_run) / "README.md").read_text()
    assert "`do_sample: true`" in card and "`repetition_penalty: 1.15`" in card
    gen = read_json(_merged(tiny_run) / "generation_config.json")
    assert gen["do_sample"] is True and gen["repetition_penalty"] == 1.15
    shown = re.search(r"model\.generate\(\*\*ids, (do_sample=False[^\n]*)\)\n", card)
    assert shown and "repetition_penalty=1.0" in shown.group(1), card
    kwargs = eval(f"dict({shown.group(1)})")  # the card's own arguments, as a reader would paste them

    cfg = merge.run_config(tiny_run)
    questions = merge.eval_questions(cfg)
    ref, ref_tok = loading.load_adapter_model(cfg, RunPaths.for_config(cfg).adapter)
    want = [r.text for r in evaluation.generate(ref, ref_tok, questions, cfg, max_new_tokens=cfg.eval_max_new_tokens,
                                                do_sample=False)]
    tok = AutoTokenizer.from_pretrained(_merged(tiny_run))
    model = AutoModelForCausalLM.from_pretrained(_merged(tiny_run), dtype=torch.float32).eval()
    card_answers, plain_greedy = [], []
    for question in questions:
        messages = [{"role": "system", "content": cfg.system_prompt}, {"role": "user", "content": question}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        n = ids["input_ids"].shape[1]
        card_answers.append(tok.decode(model.generate(**ids, **kwargs)[0, n:], skip_special_tokens=True).strip())
        plain = model.generate(**ids, do_sample=False, temperature=None, top_p=None,
                               max_new_tokens=cfg.eval_max_new_tokens)  # greedy, but with the config's penalty
        plain_greedy.append(tok.decode(plain[0, n:], skip_special_tokens=True).strip())
    assert card_answers == want and all(want)
    assert plain_greedy != want  # do_sample=False alone is not 04's decoding (why the card says more)


def test_compare_models_identity_and_reference_cache(tiny_run: Path):  # noqa: F811
    from hb_utils.export.agreement import compare_models

    cfg = merge.run_config(tiny_run)
    model, tok = loading.load_adapter_model(cfg, RunPaths.for_config(cfg).adapter)
    qs = merge.eval_questions(cfg)[:2]
    cache: dict = {}
    same = compare_models(model, model, tok, qs, cfg.system_prompt, max_new_tokens=6, reference_cache=cache)
    assert same["greedy_token_agreement"] == 1.0 and same["max_abs_dp"] == 0.0 and same["same_answer_text"] == 1.0
    assert same["positions"] == 12 and len(cache) == 2
    with model.disable_adapter():  # the reference is not run again: None would fail if it were
        other = compare_models(None, model, tok, qs, cfg.system_prompt, max_new_tokens=6, reference_cache=cache)
    assert other["max_abs_dp"] > 0.01


# --------------------------------------------------------------------------- refusals (no model load)
def test_export_refuses_a_run_without_adapter(tmp_path: Path):
    cfg = make_tiny_run(tmp_path)
    shutil.rmtree(RunPaths.for_config(cfg).adapter)
    with pytest.raises(ModelError, match="No trained LoRA adapter"):
        merge.export_run(RunPaths.for_config(cfg).root)


def test_export_refuses_a_folder_that_is_no_run(tmp_path: Path):
    with pytest.raises(RunError, match="not a run directory"):
        merge.export_run(tmp_path)


def test_export_of_another_adapter_is_refused_then_moved_aside(tmp_path: Path):
    cfg = make_tiny_run(tmp_path)
    paths = merge.ExportPaths.for_config(cfg)
    paths.merged.mkdir(parents=True)
    (paths.merged / "model.safetensors").write_text("old")
    write_json(paths.marker, {"adapter": {"weights_sha256": "0" * 64, "fingerprint": "other"}})
    identity = merge.adapter_identity(RunPaths.for_config(cfg).adapter)
    with pytest.raises(RunError, match="another adapter.*--overwrite"):
        merge.claim_export_dir(paths, identity, overwrite=False)
    assert merge.claim_export_dir(paths, identity, overwrite=True) is None
    kept = list(paths.root.parent.glob("export.replaced-*"))
    assert len(kept) == 1 and (kept[0] / "merged" / "model.safetensors").read_text() == "old"
    assert not paths.root.exists()


def test_export_refuses_when_the_disk_is_too_full(tmp_path: Path, monkeypatch):
    cfg = make_tiny_run(tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(merge.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(RunError, match="Not enough disk space"):
        merge.export_run(RunPaths.for_config(cfg).root, log=lambda *_: None)
    assert not (RunPaths.for_config(cfg).root / "export" / "merged").exists()


def test_cli_export_reports_errors_without_traceback(tmp_path: Path, capsys):
    from hb_utils.cli import main

    assert main(["export", str(tmp_path)]) == 2
    assert "error:" in capsys.readouterr().err


# --------------------------------------------------------------------------- slow: trained SmolLM2 smoke adapter
@pytest.mark.slow
def test_smoke_export_merged_and_gguf_on_smollm2(trained_smoke_run: Path):  # noqa: F811
    from transformers import AutoModelForCausalLM

    # the README's command, `hb export outputs/smoke --gguf q8_0` (f16's bit-exact round trip: the tiny-model test)
    record = merge.export_run(trained_smoke_run, gguf="q8_0", log=print)
    m = read_json(trained_smoke_run / "export" / "merge_measurement.json")
    q8 = record["gguf"]["q8_0"]["roundtrip"]
    print(json.dumps(m["modes"], indent=1), json.dumps(q8, indent=1))
    assert m["modes"][record["merge_into"]]["greedy_token_agreement"] >= 0.95
    # a wrong tensor mapping answers garbage (agreement near 0); 8-bit rounding flips a few near-tied tokens
    assert q8["greedy_token_agreement"] >= 0.9 and q8["same_prompt_token_ids"] == 1.0
    model = AutoModelForCausalLM.from_pretrained(_merged(trained_smoke_run))
    assert model.config.tie_word_embeddings  # SmolLM2: no separate output matrix in the GGUF either
    card = (_merged(trained_smoke_run) / "README.md").read_text()
    assert "license: apache-2.0" in card
    assert (trained_smoke_run / "export" / "gguf" / "Modelfile.q8_0").is_file()
    gguf_path = record["gguf"]["q8_0"]["file"]  # SmolLM2 adds no BOS (Ollama would add one by default)
    assert _gguf_field(gguf_path, "tokenizer.ggml.add_bos_token") is False
    assert _gguf_field(gguf_path, "tokenizer.ggml.add_space_prefix") is False
