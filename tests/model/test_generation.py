"""hb_utils.model.generation: chat prompts, left-padded batches, new tokens only, stopping, seeded sampling.

Fast tests run a tiny random Llama with the real SmolLM2 tokenizer (fixtures from test_modeling);
the slow test checks batched == one-at-a-time greedy decoding on the real SmolLM2.
"""

from __future__ import annotations

import pytest
import torch

from hb_utils.config import ExperimentConfig
from hb_utils.model import loading as M
from hb_utils.model.generation import GenResult, _split_answer, build_prompt, generate_answers
from hb_utils.model.source import load_tokenizer
from tests.model import test_loading

# Shared fixtures (the lead may move them into conftest.py).
smollm2_dir = test_loading.smollm2_dir
smollm2_tokenizer = test_loading.smollm2_tokenizer
tiny_model_dir = test_loading.tiny_model_dir

SYSTEM = "You are a concise medical assistant."
QUESTIONS = ["What is a fever?", "How can I lower high blood pressure without medicine?", "Is sugar bad?",
             "What are common symptoms of the flu in adults and children?", "What is asthma?"]


@pytest.fixture
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = load_tokenizer(str(tiny_model_dir))
    M.align_generation_config(model, tok)
    return model, tok


def test_build_prompt_uses_chat_template(smollm2_tokenizer):
    prompt = build_prompt(smollm2_tokenizer, "What is a cold?", SYSTEM)
    assert prompt == (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nWhat is a cold?<|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert build_prompt(smollm2_tokenizer, "Q", "").endswith("<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n")


def test_split_answer():
    assert _split_answer([5, 6, 2, 0, 0], {2}) == ([5, 6], 3, True)
    assert _split_answer([2, 0], {2, 9}) == ([], 1, True)
    assert _split_answer([5, 6, 7], {2}) == ([5, 6, 7], 3, False)


def test_batched_equals_single_and_restores_state(tiny):
    model, tok = tiny
    model.train()  # generation must not leave a training model in eval mode
    batched = generate_answers(model, tok, QUESTIONS, SYSTEM, max_new_tokens=8, batch_size=3, progress=False)
    single = [generate_answers(model, tok, [q], SYSTEM, max_new_tokens=8, progress=False)[0] for q in QUESTIONS]
    assert batched == single
    assert tok.padding_side == "right" and model.training
    assert all(isinstance(r, GenResult) and 1 <= r.n_new_tokens <= 8 for r in batched)
    assert all(r.stopped or r.n_new_tokens == 8 for r in batched)
    assert generate_answers(model, tok, [], SYSTEM, max_new_tokens=8) == []


def test_decodes_only_new_tokens_and_stops_at_end_of_turn(tiny):
    model, tok = tiny
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    word = tok.encode(" fever", add_special_tokens=False)
    assert len(word) == 1
    # Bias the random model: " fever" twice, then end of turn (a sequence bias on "fever fever <|im_end|>").
    model.generation_config.sequence_bias = {(word[0],): 50.0, (word[0], word[0], eot): 200.0}
    res = generate_answers(model, tok, QUESTIONS[:2], SYSTEM, max_new_tokens=10, progress=False)
    assert [r.text for r in res] == ["fever fever", "fever fever"]  # no prompt text, no <|im_end|>
    assert all(r.stopped and r.n_new_tokens == 3 for r in res)
    # Never ending a turn: the limit is hit and stopped is False.
    model.generation_config.sequence_bias = {(word[0],): 50.0}
    res = generate_answers(model, tok, QUESTIONS[:1], SYSTEM, max_new_tokens=4, progress=False)
    assert res == [GenResult(text="fever fever fever fever", n_new_tokens=4, stopped=False)]


def test_sampling_is_reproducible_with_a_seed(tiny):
    model, tok = tiny
    kw = dict(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=0.95, repetition_penalty=1.1,
              batch_size=2, progress=False)
    a = generate_answers(model, tok, QUESTIONS, SYSTEM, seed=7, **kw)
    b = generate_answers(model, tok, QUESTIONS, SYSTEM, seed=7, **kw)
    c = generate_answers(model, tok, QUESTIONS, SYSTEM, seed=8, **kw)
    greedy = generate_answers(model, tok, QUESTIONS, SYSTEM, max_new_tokens=8, progress=False)
    assert a == b
    assert a != c and a != greedy


def test_generation_through_a_peft_model(tiny, tmp_path):
    from peft import get_peft_model

    model, tok = tiny
    cfg = ExperimentConfig(lora_r=2, lora_alpha=4, lora_target_modules=["q_proj"])
    peft_model = get_peft_model(model, M.lora_config(cfg))
    res = generate_answers(peft_model, tok, QUESTIONS[:2], SYSTEM, max_new_tokens=4, progress=False)
    assert len(res) == 2 and all(r.n_new_tokens <= 4 for r in res)


@pytest.mark.slow
@pytest.mark.parametrize("load_in_4bit", [False, True], ids=["fp32", "nf4-fp32"])
def test_smollm2_batched_greedy_equals_one_at_a_time(smollm2_dir, tmp_path, load_in_4bit):
    cfg = ExperimentConfig(model_name=M.SMOLLM2_ALIAS, output_root=str(tmp_path), compute_dtype="fp32",
                           load_in_4bit=load_in_4bit)
    model = M.load_base_model(cfg)
    tok = load_tokenizer(cfg.model_name)
    questions = ["What is a fever?", "What causes high blood pressure?", "Is it safe to take ibuprofen daily?",
                 "What is 2+2? Answer with just the number."]
    # First the cause, directly: the next-token logits of a left-padded batch equal those of each prompt
    # alone up to fp32 rounding (bf16 arithmetic, e.g. a silent bf16 kernel, differs by ~0.1-1).
    prompts = [build_prompt(tok, q, SYSTEM) for q in questions]
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = "right"
    assert enc["attention_mask"].sum(-1).unique().numel() > 1  # really padded
    with torch.no_grad():
        position_ids = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # what generate() does
        padded = model(**enc, position_ids=position_ids).logits[:, -1]
        for i, prompt in enumerate(prompts):
            alone = model(**tok([prompt], return_tensors="pt", add_special_tokens=False)).logits[0, -1]
            assert (padded[i] - alone).abs().max().item() < 1e-3
    batched = generate_answers(model, tok, questions, SYSTEM, max_new_tokens=12, batch_size=4, progress=False)
    single = [generate_answers(model, tok, [q], SYSTEM, max_new_tokens=12, progress=False)[0] for q in questions]
    for b, s in zip(batched, single, strict=True):
        assert b == s
    assert all(r.text for r in batched)
    assert tok.padding_side == "right"
    assert not any("<|im_" in r.text or SYSTEM in r.text for r in batched)
    assert batched[-1].stopped and batched[-1].n_new_tokens < 12 and "4" in batched[-1].text, batched[-1]
