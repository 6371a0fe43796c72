"""Tokenizer policy: one chat layout, one BOS rule, one way to turn a conversation into token ids.

Why this module exists:

* **pad = eos pitfall of the original notebook.** It set ``pad_token = eos_token``, so the
  collator masked every end-of-turn token in the labels and the model never learned to stop.
  :func:`configure_tokenizer` guarantees a chat template (Zephyr fallback, with a warning), makes
  ``eos_token`` the template's end-of-turn token (``<|im_end|>`` for SmolLM2's ChatML, ``</s>``
  for TinyLlama's Zephyr) and picks a pad token different from it; right padding for training.
* **BOS.** Llama-style tokenizers (TinyLlama) add ``<s>`` when plain text is tokenized
  (``tokenizer(text)``, what pretraining and the original notebook did), but their chat template
  does not render it, and chat tokenization never adds it: TRL tokenizes conversations with
  ``apply_chat_template(tokenize=True)``, which calls the tokenizer with
  ``add_special_tokens=False`` (trl/data_utils.py ``_tokenize``; transformers
  ``PreTrainedTokenizerBase.apply_chat_template``). Without a fix TinyLlama would be trained,
  evaluated and prompted without BOS. The policy, applied once here: when the tokenizer adds a BOS
  to plain text and the rendered chat does not start with it, the chat template itself renders
  it (:func:`apply_bos_policy`). Training (through TRL), generation and perplexity then all see
  exactly one BOS, and nothing else adds one (every tokenization of rendered chat text goes
  through :func:`encode_chat`, i.e. without the tokenizer's own special tokens). Tokenizers that
  add no BOS (SmolLM2) are left exactly as they are.
* **One tokenization.** Perplexity and generation tokenize a conversation exactly as TRL does in
  training (:func:`encode_chat`, :func:`encode_prompt_completion`): prompt and completion are
  tokenized *together* and the completion starts where the tokenized prompt stops matching. Tokenizing
  the answer on its own, as perplexity once did, gives a SentencePiece tokenizer a leading ``▁``
  token that the training sequence does not have, so a different sequence would be scored.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hb_utils.errors import ModelError

if TYPE_CHECKING:  # heavy imports stay lazy: importing hb_utils must not pull in transformers
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Used only when a tokenizer ships without a chat template (the layout TinyLlama-Chat uses).
# Rendering a conversation's prompt with add_generation_prompt=True gives a prefix of the full
# conversation, which TRL's prompt/completion training relies on.
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
# Preferred pad tokens, in order, when the tokenizer has none or pads with eos.
_PAD_CANDIDATES = ("<pad>", "<|pad|>", "<|finetune_right_pad_id|>", "<|endoftext|>")
# How the template may render BOS, tried in order (see apply_bos_policy): the first whose chat
# tokenization equals plain tokenization of the same text is kept.
_BOS_PREFIXES = ("{{ bos_token }}", "{{ bos_token + ' ' }}")
_PROBE = ({"role": "system", "content": "You are a helpful assistant."},
          {"role": "user", "content": "What is a fever?"},
          {"role": "assistant", "content": "A body temperature above 38 C."})

Messages = Sequence[dict[str, Any]]


# --------------------------------------------------------------------------- encoding (as TRL trains)

def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: Messages, *,
                add_generation_prompt: bool = False) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template, exactly as TRL's SFTTrainer makes them.

    TRL (trl/data_utils.py ``_tokenize``) calls ``apply_chat_template(messages, tokenize=True,
    return_dict=True, ...)``; transformers renders the template and tokenizes the text with
    ``add_special_tokens=False``, so every special token (BOS included) comes from the template.
    Generation and perplexity use this function, so they see the ids training saw.
    """
    return list(tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=True,
                                              add_generation_prompt=add_generation_prompt)["input_ids"])


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share (TRL's ``common_prefix_length``)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def encode_prompt_completion(tokenizer: PreTrainedTokenizerBase, prompt: Messages,
                             completion: Messages) -> tuple[list[int], int]:
    """Token ids of ``prompt + completion`` and where the completion starts, as TRL trains them.

    Mirrors TRL's prompt/completion tokenization (trl/trainer/sft_trainer.py ``tokenize_fn``): the
    prompt is tokenized with the generation prompt, prompt + completion is tokenized as one
    conversation, and the completion (the tokens that carry loss with ``completion_only_loss``)
    starts where the two stop agreeing. Tokenizing the completion separately would give
    SentencePiece tokenizers an extra leading ``▁`` token that training never sees.
    """
    prompt_ids = encode_chat(tokenizer, prompt, add_generation_prompt=True)
    ids = encode_chat(tokenizer, [*prompt, *completion])
    n_prompt = common_prefix_length(prompt_ids, ids)
    if n_prompt < len(prompt_ids):
        warnings.warn("The tokenized prompt is not a prefix of the tokenized conversation (the chat template "
                      "renders the prompt differently alone, or tokens merge across the boundary); like TRL, the "
                      "answer starts where they diverge.", UserWarning, stacklevel=2)
    return ids, n_prompt


# --------------------------------------------------------------------------- end of turn / stop

def _render(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> str:
    """``messages`` rendered by the chat template; "" when the template refuses them (a template that
    insists on a system turn, alternation rules, ...)."""
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False)
    except Exception:
        return ""


def end_of_turn_token(tokenizer: PreTrainedTokenizerBase) -> str:
    """The special token the chat template puts right after an assistant message.

    Found by rendering a one-turn conversation with a sentinel answer and reading the first added /
    special token after it (``<|im_end|>`` for ChatML, ``</s>`` for Zephyr). Falls back to eos.
    """
    sentinel = "HBSENTINEL7431"
    text = _render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": sentinel}])
    rest = text.split(sentinel, 1)[1].lstrip() if sentinel in text else ""
    specials = set(tokenizer.get_added_vocab()) | set(tokenizer.all_special_tokens)
    matches = [tok for tok in specials if tok and rest.startswith(tok)]
    if matches:
        return max(matches, key=len)
    if tokenizer.eos_token is None:
        raise ModelError("The tokenizer has neither an end-of-turn token in its chat template nor an eos token; "
                         "use a chat model (e.g. TinyLlama/TinyLlama-1.1B-Chat-v1.0 or smollm2-135m-instruct).")
    return tokenizer.eos_token


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end a generated answer: the template's end-of-turn token and eos."""
    ids = [tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer)), tokenizer.eos_token_id]
    return list(dict.fromkeys(i for i in ids if i is not None))


# --------------------------------------------------------------------------- BOS

def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when the tokenizer's own configuration puts BOS in front of plain text (``tokenizer(text)``).

    Read from what the tokenizer does, not from ``add_bos_token``: transformers 5 keeps that flag
    False for tokenizers whose ``tokenizer.json`` post-processor adds the BOS.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return bool(with_special) and with_special[0] == bos and (not plain or plain[0] != bos)


def _default_template(tokenizer: PreTrainedTokenizerBase) -> str:
    template = tokenizer.chat_template
    return template.get("default", "") if isinstance(template, dict) else template


def _set_default_template(tokenizer: PreTrainedTokenizerBase, template: str) -> None:
    if isinstance(tokenizer.chat_template, dict):  # named templates: the project only renders the default one
        tokenizer.chat_template = {**tokenizer.chat_template, "default": template}
    else:
        tokenizer.chat_template = template


def apply_bos_policy(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Make the chat template render BOS when the tokenizer adds one to plain text and the template
    does not; returns True when the template was changed.

    Chat tokenization never adds special tokens itself (module docstring), so the template is the one
    place where a BOS reaches training, generation and perplexity alike. How it is rendered is chosen
    by checking: the first of ``{{ bos_token }}`` and ``{{ bos_token + ' ' }}`` whose chat
    tokenization of a probe conversation equals plain ``tokenizer(text)`` of the same text without BOS
    (what pretraining and the original notebook fed the model). The second is what transformers 5's
    Llama tokenizer (Metaspace, ``prepend_scheme="first"``) needs: it gives only the very start of a
    text the ``▁`` word-start marker, not the text after a BOS written into it, so the first word would
    otherwise become a token pretraining never had at that place. When neither matches (another
    tokenizer design) the plain BOS is used, which still gives exactly one BOS.
    Idempotent: a template that already starts with BOS is left alone.
    """
    if not adds_bos(tokenizer):
        return False
    template = _default_template(tokenizer)
    probe = _PROBE
    text = _render(tokenizer, probe)
    if not text:
        probe = _PROBE[1:]
        text = _render(tokenizer, probe)
    if not template or not text or text.startswith(tokenizer.bos_token):
        return False
    want = [tokenizer.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    for prefix in _BOS_PREFIXES:
        _set_default_template(tokenizer, prefix + template)
        if encode_chat(tokenizer, probe) == want:
            break
    else:
        _set_default_template(tokenizer, _BOS_PREFIXES[0] + template)
        log.info("No BOS rendering reproduces plain tokenization for %r; the template renders a plain BOS",
                 tokenizer.name_or_path)
    log.info("The chat template of %r now renders BOS %r (the tokenizer adds it to plain text)",
             tokenizer.name_or_path, tokenizer.bos_token)
    return True


# --------------------------------------------------------------------------- configure / load

def _pick_pad_token(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """A pad token that is neither eos nor bos (so no real token gets masked), from the vocabulary."""
    taken = {tokenizer.eos_token, tokenizer.bos_token}
    vocab = tokenizer.get_vocab()
    for cand in (tokenizer.pad_token, tokenizer.unk_token, *_PAD_CANDIDATES):
        if cand and cand not in taken and cand in vocab:
            return cand
    return None


def configure_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Chat template (Zephyr fallback), BOS policy, eos = end-of-turn, pad != eos, right padding.

    Changes ``tokenizer`` in place and returns it; applying it twice changes nothing more.
    """
    if not tokenizer.chat_template:
        if tokenizer.eos_token is None:
            raise ModelError("The tokenizer has no chat template and no eos token, so no chat layout can be set. "
                             "Use a chat model (e.g. TinyLlama/TinyLlama-1.1B-Chat-v1.0 or smollm2-135m-instruct).")
        warnings.warn(f"Tokenizer {tokenizer.name_or_path!r} has no chat template; using the Zephyr layout "
                      "(<|system|>/<|user|>/<|assistant|> turns ending with eos). Prefer a chat model that ships "
                      "its own template.", UserWarning, stacklevel=3)
        tokenizer.chat_template = ZEPHYR_TEMPLATE
    apply_bos_policy(tokenizer)
    eot = end_of_turn_token(tokenizer)
    if eot != tokenizer.eos_token:
        # Generation stops at eos and TRL appends eos to completions: both must be the end-of-turn.
        log.info("Setting eos_token to the chat template's end-of-turn %r (was %r)", eot, tokenizer.eos_token)
        tokenizer.eos_token = eot
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        pad = _pick_pad_token(tokenizer)
        if pad is None:
            warnings.warn(f"No token other than eos can serve as pad for {tokenizer.name_or_path!r}; padding with "
                          "eos. Padding is masked by the attention mask, but a collator that masks labels by pad "
                          "id will also mask end-of-turn.", UserWarning, stacklevel=3)
            pad = tokenizer.eos_token
        tokenizer.pad_token = pad
    tokenizer.padding_side = "right"
    return tokenizer
