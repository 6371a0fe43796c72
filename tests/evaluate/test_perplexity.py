"""Perplexity on a tiny randomly initialised Llama: batched == one at a time == the model's own loss,
with and without the shared-prefix cache."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hb_utils.evaluate import perplexity as P

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _conv(q: str, a: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You are HealthBot."}, {"role": "user", "content": q},
            {"role": "assistant", "content": a}]


CONVS = [
    _conv("What is asthma?", "Asthma is a chronic disease of the airways."),
    _conv("What are the symptoms of type 2 diabetes?", "Thirst, frequent urination and tiredness. See a doctor."),
    _conv("Is BMI 28 high?", "It is overweight."),
    _conv("How does hypertension affect the heart?", "High blood pressure makes the heart work harder and can "
          "thicken its muscle over many years, raising the risk of heart failure."),
    _conv("Hi", "Hello."),
]


@pytest.fixture(scope="module")
def tiny():
    corpus = [m["content"] for c in CONVS for m in c] * 3
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0))
    return model.eval(), tokenizer


def test_prompt_is_masked(tiny):
    _, tokenizer = tiny
    ids, n_prompt = P.tokenize_for_perplexity(tokenizer, CONVS[0])
    assert tokenizer.decode(ids[:n_prompt]).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(ids[n_prompt:]) == "Asthma is a chronic disease of the airways.<|im_end|>\n"


def _reference(model, tokenizer, conv) -> tuple[float, float, int, int]:
    """The model's own mean losses (full text, answer only) and token counts, one example at a time."""
    ids, n_prompt = P.tokenize_for_perplexity(tokenizer, conv)
    x = torch.tensor([ids])
    with torch.no_grad():
        full = model(input_ids=x, labels=x).loss.item()
        labels = x.clone()
        labels[0, :n_prompt] = -100
        ans = model(input_ids=x, labels=labels).loss.item()
    return full, ans, len(ids) - 1, len(ids) - n_prompt


def test_batched_equals_one_at_a_time_and_model_loss(tiny):
    model, tokenizer = tiny
    batched = P.token_nll(model, tokenizer, CONVS, batch_size=4, progress=False)
    single = P.token_nll(model, tokenizer, CONVS, batch_size=1, progress=False)
    for k in batched:
        np.testing.assert_allclose(batched[k], single[k], rtol=1e-5)
    # independent check against the model's own loss, one example at a time
    for i, conv in enumerate(CONVS):
        full, ans, n_full, n_ans = _reference(model, tokenizer, conv)
        assert batched["full_nll"][i] / batched["full_tokens"][i] == pytest.approx(full, rel=1e-5)
        assert batched["answer_nll"][i] / batched["answer_tokens"][i] == pytest.approx(ans, rel=1e-5)
        assert batched["answer_tokens"][i] == n_ans
        assert batched["full_tokens"][i] == n_full


def test_perplexity_variants(tiny):
    model, tokenizer = tiny
    nll = P.token_nll(model, tokenizer, CONVS, batch_size=2, progress=False)
    rep = P.perplexity_report(nll, samples=100, seed=0)
    weighted = rep["answer_token_weighted"]
    assert weighted["value"] == pytest.approx(math.exp(nll["answer_nll"].sum() / nll["answer_tokens"].sum()))
    assert weighted["ci_low"] <= weighted["value"] <= weighted["ci_high"]
    orig = rep["original_per_example_full_text"]
    assert orig["label"] == "original (per-example mean, full text)"
    losses = nll["full_nll"] / nll["full_tokens"]
    assert orig["ppl"] == pytest.approx(math.exp(np.mean(losses)))
    assert orig["mean_example_ppl"] == pytest.approx(np.mean(np.exp(losses)))
    # a random model over a ~400-token vocabulary: perplexity in the hundreds, not ~1
    assert 50 < weighted["value"] < 2000


def test_shared_prefix_is_the_system_turn(tiny):
    model, tokenizer = tiny
    encoded = [P.tokenize_for_perplexity(tokenizer, c) for c in CONVS]
    p = P.shared_prefix_length(encoded)
    assert tokenizer.decode(encoded[0][0][:p]).startswith("<|im_start|>system\nYou are HealthBot.<|im_end|>")
    assert p <= min(n for _, n in encoded)
    assert P._run_prefix(model, encoded[0][0][:p], torch.device("cpu")) is not None  # the cache path is taken
    assert P.shared_prefix_length(encoded[:1]) == encoded[0][1]  # capped at the prompt
    assert P.shared_prefix_length([]) == 0


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_shared_prefix_gives_the_same_numbers(tiny, batch_size):
    model, tokenizer = tiny
    shared = P.token_nll(model, tokenizer, CONVS, batch_size=batch_size, progress=False)
    whole = P.token_nll(model, tokenizer, CONVS, batch_size=batch_size, progress=False, share_prefix=False)
    for k in P.KEYS:
        np.testing.assert_allclose(shared[k], whole[k], rtol=1e-5, err_msg=k)


def test_prefix_reaching_the_answer(tiny):
    """Identical prompts: the prefix is the whole prompt, so the first answer token is predicted by the
    prefix's last position and must still count as an answer token."""
    model, tokenizer = tiny
    convs = [_conv("What is asthma?", "Asthma is a chronic disease."), _conv("What is asthma?", "A lung disease.")]
    encoded = [P.tokenize_for_perplexity(tokenizer, c) for c in convs]
    assert P.shared_prefix_length(encoded) == encoded[0][1]
    nll = P.token_nll(model, tokenizer, convs, batch_size=2, progress=False)
    for i, conv in enumerate(convs):
        full, ans, n_full, n_ans = _reference(model, tokenizer, conv)
        assert nll["answer_tokens"][i] == n_ans and nll["full_tokens"][i] == n_full
        assert nll["answer_nll"][i] / n_ans == pytest.approx(ans, rel=1e-5)
        assert nll["full_nll"][i] / n_full == pytest.approx(full, rel=1e-5)


def test_no_examples():
    out = P.token_nll(None, None, [], progress=False)
    assert all(len(v) == 0 for v in out.values())


def test_shared_prefix_through_a_peft_model_and_with_the_adapter_disabled(tiny):
    """04 scores a PeftModel, and the base model through ``disable_adapter()``: the prefix cache must be
    built under the same adapter state as the rest (it is: token_nll runs the prefix itself)."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny
    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                 init_lora_weights=False)).eval()
    adapted = P.token_nll(peft_model, tokenizer, CONVS, batch_size=2, progress=False)
    whole = P.token_nll(peft_model, tokenizer, CONVS, batch_size=2, progress=False, share_prefix=False)
    np.testing.assert_allclose(adapted["full_nll"], whole["full_nll"], rtol=1e-5)
    with peft_model.disable_adapter():
        base = P.token_nll(peft_model, tokenizer, CONVS, batch_size=2, progress=False)
    np.testing.assert_allclose(base["full_nll"], P.token_nll(model, tokenizer, CONVS, progress=False)["full_nll"],
                               rtol=1e-5)
    assert not np.allclose(adapted["full_nll"], base["full_nll"])  # the adapter does change the scores


# --------------------------------------------------------------------------- the trained tokens

def test_scored_tokens_are_the_tokens_trl_trains_on_sentencepiece(tmp_path):
    """TinyLlama-style SentencePiece tokenizer (built offline, tests/model/test_tokenizer.py): the answer tokens
    perplexity scores are exactly the supervised tokens of TRL's own training batch, and their NLL is the
    loss the trainer's model computes on that batch."""
    from hb_utils.model.tokenizer import configure_tokenizer
    from tests.model.test_tokenizer import llama_tokenizer, real_rows, trl_batch

    tok = configure_tokenizer(llama_tokenizer())
    convs = [_conv("What is asthma?", "Asthma is a chronic disease of the airways."), _conv("Hi", "Hello.")]
    batch = trl_batch(tok, convs, tmp_path)
    model = batch["model"].eval()
    nll = P.token_nll(model, tok, convs, batch_size=2, progress=False)
    for i, ((ids, labels), c) in enumerate(zip(real_rows(batch), convs, strict=True)):
        scored_ids, n_prompt = P.tokenize_for_perplexity(tok, c)
        supervised = [t for t, lab in zip(ids, labels, strict=True) if lab != -100]
        assert scored_ids == ids and scored_ids[n_prompt:] == supervised
        # the old way (answer text tokenized on its own) gets a word-start "▁" that training never sees
        prompt = tok.apply_chat_template(c[:-1], tokenize=False, add_generation_prompt=True)
        alone = tok(tok.apply_chat_template(c, tokenize=False)[len(prompt):], add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens(alone[0]).startswith("▁") and alone != supervised
        with torch.no_grad():
            x = torch.tensor([ids])
            loss = model(input_ids=x, labels=torch.tensor([labels])).loss.item()
        assert nll["answer_tokens"][i] == len(supervised)
        assert nll["answer_nll"][i] / len(supervised) == pytest.approx(loss, rel=1e-5)
