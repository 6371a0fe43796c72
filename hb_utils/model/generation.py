"""Batched chat generation: the model's chat template, left padding, new tokens only, stop at end-of-turn.

Why: the original notebook generated one question at a time, decoded the prompt together with the
answer and split the text on a marker; it also padded with eos, so the model never learned to stop
and answers ran to the token limit. Here every prompt is rendered with the tokenizer's own chat
template (``add_generation_prompt=True``) and tokenized exactly as training tokenizes it
(:func:`hb_utils.model.tokenizer.encode_chat`: one BOS where the tokenizer uses one, never two), prompts
are batched with LEFT padding (a decoder-only
model continues from the last position, so padding must not sit between prompt and answer), only
the new tokens are decoded, and generation stops at the template's end-of-turn token.

Batched greedy output equals one-at-a-time greedy output in fp32 (``tests/model/test_generation.py``
checks it on the real SmolLM2, plain and 4-bit). Why it holds: the attention mask hides the left
padding, and ``generate`` derives ``position_ids`` from the attention mask (cumsum - 1), so a padded
prompt sees the same positions as an unpadded one. What we measured on SmolLM2 (last-token logits
of a prompt alone vs the same prompt left-padded by 5 tokens, with correct position ids):
fp32 differs by <= 3e-5 (sdpa) or 0 (eager) and greedy text is identical; bf16 differs by up to
0.7 (sdpa) / 0.25 (eager) and greedy text can change after a few tokens where two tokens are nearly
tied. Batching *without* padding is bit-identical in both dtypes, and a hand-padded single prompt
shows the same bf16 difference, so masks and positions are right: it is rounding. With padding
the attention's reduction over key positions has another length and alignment, its sums round
differently, and bf16's 8-bit mantissa amplifies that through 30 layers. So exact batch
invariance needs fp32 (``compute_dtype: fp32``); in bf16/fp16 batched answers are equally valid
greedy answers of a numerically slightly different run. 4-bit models on CPU had the same bf16
effect even with compute_dtype fp32: on AVX512-BF16 CPUs bitsandbytes switches eval-mode 4-bit
layers to a fused kernel that computes in bf16; ``modeling.load_base_model`` turns that path off
(see ``modeling.use_dequantize_matmul_path``), and then 4-bit greedy decoding is batch-invariant too.
Prompts are sorted by length before batching (less padding: faster, and fewer such flips); results come
back in input order.
Sampling is made repeatable by seeding before every batch (``transformers.set_seed``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hb_utils.model.tokenizer import encode_chat, stop_token_ids
from hb_utils.progress import pbar

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class GenResult:
    """One generated answer."""

    text: str  # the answer only: new tokens, special tokens removed, stripped
    n_new_tokens: int  # tokens generated, including the end-of-turn token when there is one
    stopped: bool  # True when the model ended its turn (end-of-turn/eos) before max_new_tokens


def prompt_messages(question: str, system_prompt: str) -> list[dict[str, str]]:
    """The chat messages of one question: the system turn (left out when ``system_prompt`` is empty,
    so the template may add its default) and the user turn."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": question})
    return messages


def build_prompt(tokenizer: PreTrainedTokenizerBase, question: str, system_prompt: str) -> str:
    """The chat-template prompt text for ``question`` (with the assistant generation prompt appended),
    for display. Tokenize prompts with :func:`prompt_ids`, not by calling the tokenizer on this text
    (which may add a second BOS)."""
    return tokenizer.apply_chat_template(prompt_messages(question, system_prompt), tokenize=False,
                                         add_generation_prompt=True)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str, system_prompt: str) -> list[int]:
    """Token ids of the prompt for ``question``: exactly the prompt tokens training saw before an
    answer (:func:`hb_utils.model.tokenizer.encode_chat`, BOS per the tokenizer policy)."""
    return encode_chat(tokenizer, prompt_messages(question, system_prompt), add_generation_prompt=True)


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of ``rows`` padded on the LEFT to the longest row."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


def _model_device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


def _split_answer(row: list[int], stops: set[int]) -> tuple[list[int], int, bool]:
    """The answer ids before the first stop token, the number of generated tokens, and whether it stopped."""
    for i, tok in enumerate(row):
        if tok in stops:
            return row[:i], i + 1, True
    # No stop token: generate only pads rows that finished, so an unfinished row is all real tokens.
    return row, len(row), False


def generate_answers(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[str],
    system_prompt: str,
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    progress: bool = True,
) -> list[GenResult]:
    """Answer every question with the chat model, ``batch_size`` prompts at a time.

    Greedy by default. With ``do_sample=True``, ``temperature`` / ``top_p`` apply, and a ``seed``
    makes reruns give the same text (the RNG is reseeded before every batch, so a batch's output
    does not depend on what ran before). ``repetition_penalty`` applies to both modes. Prompts are
    left-padded here (:func:`left_pad`), so the tokenizer's ``padding_side`` (right, for training)
    is never touched; the model's train/eval mode is restored afterwards.
    """
    from transformers import set_seed

    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be >= 1")
    if not questions:
        return []
    stops = stop_token_ids(tokenizer)
    gen_kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens, "do_sample": do_sample, "eos_token_id": stops,
        "pad_token_id": tokenizer.pad_token_id, "use_cache": True,
    }
    if do_sample:
        if temperature is not None:
            gen_kwargs["temperature"] = temperature
        if top_p is not None:
            gen_kwargs["top_p"] = top_p
    else:  # explicit, so a model's generation_config (e.g. temperature=0.7) cannot turn greedy into sampling
        gen_kwargs.update(temperature=None, top_p=None, top_k=None)
    if repetition_penalty is not None:
        gen_kwargs["repetition_penalty"] = repetition_penalty

    prompts = [prompt_ids(tokenizer, q, system_prompt) for q in questions]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: memory errors show early
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    device = _model_device(model)
    results: list[GenResult | None] = [None] * len(prompts)
    stop_set = set(stops)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    was_training = model.training
    model.eval()
    try:
        for batch in pbar(batches, total=len(batches), desc="generate", enabled=progress):
            input_ids, attention_mask = left_pad([prompts[i] for i in batch], pad_id)
            enc = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
            if seed is not None:
                set_seed(seed)
            with torch.inference_mode():
                out = model.generate(**enc, **gen_kwargs)
            new_tokens = out[:, enc["input_ids"].shape[1]:].tolist()
            for i, row in zip(batch, new_tokens, strict=True):
                answer, n_new, stopped = _split_answer(row, stop_set)
                text = tokenizer.decode(answer, skip_special_tokens=True).strip()
                results[i] = GenResult(text=text, n_new_tokens=n_new, stopped=stopped)
    finally:
        model.train(was_training)
    return [r for r in results if r is not None]
