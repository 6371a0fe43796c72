"""hb_utils.model.tokenizer: chat template, BOS policy, eos = end-of-turn, pad != eos, tokenization as TRL trains.

Fast tests use the real SmolLM2 tokenizer (ChatML, adds no BOS; fixtures from test_modeling) and a
Llama-style SentencePiece tokenizer built offline here: transformers 5's own ``LlamaTokenizer``
(Metaspace pre-tokenizer, adds ``<s>``, TinyLlama's ``</s>`` pad) over a BPE vocabulary trained in
memory, with the Zephyr template (TinyLlama's layout). The ids are checked against batches that
TRL's SFTTrainer builds itself (its tokenization and collator) with a tiny random Llama.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from hb_utils.errors import ModelError
from hb_utils.evaluate.perplexity import tokenize_for_perplexity
from hb_utils.model import tokenizer as T
from hb_utils.model.generation import generate_answers
from hb_utils.model.source import load_tokenizer
from tests.model import test_loading

# Fixtures shared with tests/model/test_loading.py.
smollm2_dir = test_loading.smollm2_dir
smollm2_tokenizer = test_loading.smollm2_tokenizer

SYSTEM = "You are HealthBot."
QA = [("What is asthma?", "Asthma is a chronic disease of the airways."),
      ("Is a fever of 38 C high?", "It is a mild fever. Drink water and rest."),
      ("Hi", "Hello.")]


def conv(question: str, answer: str, system: str = SYSTEM) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question},
            {"role": "assistant", "content": answer}]


CONVS = [conv(q, a) for q, a in QA]
PROBE_WORDS = "You are a helpful assistant. What is a fever? A body temperature above 38 C."


def llama_tokenizer(*, legacy: bool = False):
    """An unconfigured TinyLlama-style tokenizer: transformers' LlamaTokenizer (BPE + Metaspace, byte
    fallback; ``legacy=False`` is TinyLlama's setting, prepend_scheme "first"), adds ``<s>``, pads with
    ``</s>`` (= eos, as TinyLlama ships), Zephyr template without BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    corpus = [f"<|system|>\n{c[0]['content']}</s>\n<|user|>\n{c[1]['content']}</s>\n<|assistant|>\n"
              f"{c[2]['content']}</s>\n" for c in CONVS] * 3 + [PROBE_WORDS] * 3
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    model = json.loads(bpe.to_str())["model"]
    tok = LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], legacy=legacy,
                         add_bos_token=True, pad_token="</s>")
    tok.chat_template = T.ZEPHYR_TEMPLATE
    return tok


@pytest.fixture
def llama():
    return T.configure_tokenizer(llama_tokenizer())


def trl_batch(tokenizer, convs: Sequence[list[dict[str, str]]], workdir: Path) -> dict[str, torch.Tensor]:
    """One training batch of ``convs`` made by TRL's SFTTrainer itself: the project's records
    (trl_setup.to_prompt_completion), SFTConfig (trl_setup.build_sft_config), TRL's tokenization and
    collator; the model is a tiny random Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTTrainer

    from hb_utils.config import ExperimentConfig
    from hb_utils.train import trl_setup

    cfg = ExperimentConfig(output_root=str(workdir), gradient_checkpointing=False)
    args = trl_setup.build_sft_config(cfg, output_dir=workdir / "trl", has_eval=False, compute_dtype=torch.float32)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=512))
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=trl_setup.to_prompt_completion([{"messages": c} for c in convs]))
    ds = trainer.train_dataset
    batch = trainer.data_collator([ds[i] for i in range(len(ds))])
    batch["model"] = trainer.model
    return batch


def real_rows(batch: dict[str, torch.Tensor]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) of each row without its padding."""
    return [(ids[mask.bool()].tolist(), labels[mask.bool()].tolist())
            for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True)]


# --------------------------------------------------------------------------- BOS policy

def test_the_problem_llama_adds_bos_to_text_but_chat_tokenization_does_not():
    raw = llama_tokenizer()
    assert T.adds_bos(raw)
    assert raw("Hi")["input_ids"][0] == raw.bos_token_id  # what the original notebook's tokenizer(text) did
    assert raw.bos_token_id not in T.encode_chat(raw, CONVS[0])  # what TRL's chat tokenization does by itself


def test_adds_bos_reads_what_the_tokenizer_does_not_its_flag():
    """A tokenizer.json post-processor that adds <s> leaves transformers 5's ``add_bos_token`` False."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace()
    bpe.train_from_iterator(["a fever"] * 3,
                            trainers.BpeTrainer(vocab_size=40, special_tokens=["<unk>", "<s>", "</s>"]))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    assert tok.add_bos_token is False and tok("a")["input_ids"][0] == tok.bos_token_id
    assert T.adds_bos(tok)
    bpe.post_processor = None
    assert not T.adds_bos(PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>"))
    assert not T.adds_bos(PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>"))  # no bos at all


@pytest.mark.parametrize("legacy, prefix", [(False, "{{ bos_token + ' ' }}"), (True, "{{ bos_token }}")],
                         ids=["prepend-first", "prepend-always"])
def test_bos_policy_gives_one_bos_and_the_ids_of_plain_tokenization(legacy, prefix):
    raw = llama_tokenizer(legacy=legacy)
    text = raw.apply_chat_template(CONVS[0], tokenize=False)
    original = raw(text)["input_ids"]  # the original notebook: tokenizer(text) of the rendered chat
    tok = T.configure_tokenizer(copy.deepcopy(raw))
    assert tok.chat_template == prefix + T.ZEPHYR_TEMPLATE
    for messages, gen in ((CONVS[0], False), (CONVS[0][:2], True)):
        ids = T.encode_chat(tok, messages, add_generation_prompt=gen)
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert T.encode_chat(tok, CONVS[0]) == original
    if not legacy:  # why the space: a bare <s> in the text loses the first word's "▁" with prepend_scheme "first"
        bare = raw.apply_chat_template(CONVS[0], tokenize=True, chat_template="{{ bos_token }}" + T.ZEPHYR_TEMPLATE)
        assert bare["input_ids"] != original


def test_bos_policy_is_idempotent_and_survives_save_and_load(llama, tmp_path):
    template = llama.chat_template
    assert not T.apply_bos_policy(llama)
    assert T.configure_tokenizer(llama).chat_template == template
    llama.save_pretrained(tmp_path / "tok")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a template is there: no Zephyr fallback warning
        loaded = load_tokenizer(str(tmp_path / "tok"))
    assert loaded.chat_template == template
    assert T.encode_chat(loaded, CONVS[1]) == T.encode_chat(llama, CONVS[1])
    assert (loaded.eos_token, loaded.pad_token, loaded.padding_side) == ("</s>", "<unk>", "right")


def test_named_templates_get_the_bos_in_the_default_one():
    raw = llama_tokenizer()
    raw.chat_template = {"default": T.ZEPHYR_TEMPLATE, "tool_use": T.ZEPHYR_TEMPLATE}
    tok = T.configure_tokenizer(raw)
    assert tok.chat_template["default"].startswith("{{ bos_token")
    assert tok.chat_template["tool_use"] == T.ZEPHYR_TEMPLATE  # never rendered by the project
    assert T.encode_chat(tok, CONVS[0])[0] == tok.bos_token_id


def test_exactly_one_bos_in_training_batch_generation_prompt_and_perplexity_input(llama, tmp_path):
    bos = llama.bos_token_id
    batch = trl_batch(llama, CONVS, tmp_path)
    rows = real_rows(batch)
    for (ids, _labels), c in zip(rows, CONVS, strict=True):
        assert ids[0] == bos and ids.count(bos) == 1  # training, through TRL
        ppl_ids, _ = tokenize_for_perplexity(llama, c)
        assert ppl_ids == ids  # perplexity: the training sequence itself

    seen: list[list[int]] = []
    model = batch["model"].eval()
    generate = model.generate

    def spy(**kwargs):
        seen.extend(ids[m.bool()].tolist() for ids, m in zip(kwargs["input_ids"], kwargs["attention_mask"],
                                                               strict=True))
        return generate(**kwargs)

    model.generate = spy
    generate_answers(model, llama, [q for q, _ in QA], SYSTEM, max_new_tokens=2, batch_size=2, progress=False)
    assert len(seen) == len(QA)
    by_question = {llama.decode(s): s for s in seen}
    for (ids, labels), (q, _) in zip(rows, QA, strict=True):
        prompt = ids[:labels.index(next(lab for lab in labels if lab != -100))]
        gen = next(s for text, s in by_question.items() if f"\n{q}</s>" in text)
        assert gen[0] == bos and gen.count(bos) == 1
        assert gen == prompt  # generation is prompted with exactly the tokens training put before an answer


# --------------------------------------------------------------------------- SmolLM2: no bos added, text and ids agree

def _by_rendered_text(tokenizer, messages):
    """Prompt and answer tokenized as separate rendered texts (add_special_tokens=False), which for SmolLM2
    is also what generation feeds the model: the message encoding must give the same ids."""
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return p + tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"], len(p)


def test_smollm2_gets_no_bos_and_encodes_as_its_rendered_text(smollm2_dir, smollm2_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(smollm2_dir)
    tok = smollm2_tokenizer
    assert not T.adds_bos(tok) and not T.apply_bos_policy(copy.deepcopy(raw))
    assert tok.chat_template == raw.chat_template
    convs = [*CONVS, conv("Q without system", "A.")[1:], conv("Ünïcode ✓ and <b>tags</b>?", "Yes: ✓.")]
    for c in convs:
        assert tokenize_for_perplexity(tok, c) == _by_rendered_text(tok, c)
        prompt_text = tok.apply_chat_template(c[:-1], tokenize=False, add_generation_prompt=True)
        assert T.encode_chat(tok, c[:-1], add_generation_prompt=True) == tok(prompt_text,
                                                                            add_special_tokens=False)["input_ids"]
    rows = real_rows(trl_batch(tok, CONVS, tmp_path))
    for (ids, labels), c in zip(rows, CONVS, strict=True):
        ppl_ids, n_prompt = tokenize_for_perplexity(tok, c)
        assert ids == ppl_ids and [t for t, lab in zip(ids, labels, strict=True) if lab != -100] == ppl_ids[n_prompt:]
        assert ids.count(tok.bos_token_id) == 3  # SmolLM2's bos <|im_start|> opens each of the 3 turns; no extra one


# --------------------------------------------------------------------------- prompt/completion split

def test_completion_starts_where_prompt_and_conversation_diverge_as_in_trl(tmp_path):
    """A template that renders the prompt alone differently (text after the generation prompt that the full
    conversation does not have, like an empty thought block): like TRL, the answer starts at the first
    differing token."""
    raw = llama_tokenizer()
    raw.chat_template = T.ZEPHYR_TEMPLATE.replace("{{ '<|assistant|>\n' }}", "{{ '<|assistant|>\nRest.' }}")
    assert raw.chat_template != T.ZEPHYR_TEMPLATE
    tok = T.configure_tokenizer(raw)
    with pytest.warns(UserWarning, match="not a prefix"):
        ids, n_prompt = T.encode_prompt_completion(tok, CONVS[0][:2], CONVS[0][2:])
    prompt = T.encode_chat(tok, CONVS[0][:2], add_generation_prompt=True)
    assert n_prompt < len(prompt) and ids[:n_prompt] == prompt[:n_prompt] and ids[n_prompt] != prompt[n_prompt]
    (trl_ids, labels), = real_rows(trl_batch(tok, CONVS[:1], tmp_path))
    assert trl_ids == ids and [t for t, lab in zip(ids, labels, strict=True) if lab != -100] == ids[n_prompt:]


def test_common_prefix_length():
    assert T.common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert T.common_prefix_length([1, 2], [1, 2, 3]) == 2
    assert T.common_prefix_length([], [1]) == 0


# --------------------------------------------------------------------------- chat template, eos, pad

def test_smollm2_tokenizer_pad_eos_and_template(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.eos_token == "<|im_end|>"  # the ChatML end-of-turn
    assert tok.pad_token == "<|endoftext|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "right"
    assert T.end_of_turn_token(tok) == "<|im_end|>"
    assert T.stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
    text = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                    {"role": "assistant", "content": "A"}], tokenize=False)
    assert text == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
                    "<|im_start|>assistant\nA<|im_end|>\n")
    assert tok.model_max_length == 8192


def test_zephyr_fallback_and_pad_fix_on_template_less_tokenizer(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(smollm2_dir)
    raw.chat_template = None
    raw.pad_token = raw.eos_token  # what the original notebook did
    raw.save_pretrained(tmp_path / "tok")
    with pytest.warns(UserWarning, match="no chat template; using the Zephyr layout"):
        tok = load_tokenizer(str(tmp_path / "tok"))
    eos = tok.eos_token
    text = tok.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                    {"role": "assistant", "content": "A"}], tokenize=False)
    assert text == f"<|system|>\nS{eos}\n<|user|>\nQ{eos}\n<|assistant|>\nA{eos}\n"
    prompt = tok.apply_chat_template([{"role": "user", "content": "Q"}], tokenize=False, add_generation_prompt=True)
    assert prompt == f"<|user|>\nQ{eos}\n<|assistant|>\n"
    assert T.end_of_turn_token(tok) == eos
    assert tok.pad_token != eos and tok.pad_token == raw.unk_token


def test_llama_stops_at_eos_and_pads_with_unk_not_eos(llama):
    assert T.end_of_turn_token(llama) == llama.eos_token == "</s>"
    assert T.stop_token_ids(llama) == [llama.eos_token_id]
    assert llama.pad_token == "<unk>" and llama.pad_token_id != llama.eos_token_id


def test_tokenizer_with_template_gives_no_warning(smollm2_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_tokenizer(str(smollm2_dir))


def test_eos_becomes_the_templates_end_of_turn(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(smollm2_dir)
    raw.eos_token = "<|endoftext|>"  # e.g. a base-model eos; the ChatML turn still ends with <|im_end|>
    raw.pad_token = None
    raw.save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok.eos_token == "<|im_end|>" and tok.pad_token not in (None, "<|im_end|>")


def test_unloadable_tokenizer_is_a_model_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="Cannot load the tokenizer"):
        load_tokenizer(str(tmp_path / "empty"))
