"""Perplexity of chat answers: token-weighted over the test set, and the original notebook's variant.

Why it is computed this way:

* Token-weighted over the whole test set (total NLL / total tokens) on the *answer* tokens only:
  the prompt is masked. Each record is tokenized exactly as TRL tokenizes it for training (prompt
  and answer together, BOS per the tokenizer policy; :mod:`hb_utils.model.tokenizer`), so the scored
  tokens are the supervised ones. The original
  notebook's number is kept for comparison, clearly labelled: it computed the loss of each
  example's *full* text one at a time and averaged those losses over examples
  (ppl = exp(mean_i loss_i)), which weights a 20-token answer like a 300-token one and scores the
  prompt too. Both come from the same forward passes.
* Fast without changing a number: examples are sorted by length and right-padded in batches (with
  an attention mask), and the prefix that every example shares (the chat template's system turn:
  the system prompt is the same in every record, about 40% of a short example's tokens) is run
  once; its key/value cache is copied into every batch. A causal model's states of a prefix do
  not depend on what follows, so this is the same computation; the tests check it against the
  model's own loss one example at a time. Set ``share_prefix=False`` to switch it off.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hb_utils.evaluate.metrics import bootstrap_ci
from hb_utils.model.tokenizer import encode_prompt_completion
from hb_utils.progress import pbar

KEYS = ("answer_nll", "answer_tokens", "full_nll", "full_tokens")


def tokenize_for_perplexity(tokenizer: Any, messages: Sequence[dict[str, str]]) -> tuple[list[int], int]:
    """Token ids of one chat record and the prompt length, exactly as training tokenizes it.

    The prompt is everything up to the assistant turn (system + user + generation prompt); the
    rest (answer and end-of-turn) is what the answer perplexity scores: the tokens that carry loss
    in completion-only training. Prompt and answer are tokenized together, the way TRL does
    (:func:`hb_utils.model.tokenizer.encode_prompt_completion`), so the scored ids are the trained ids
    (tokenized alone, a SentencePiece answer would start with an extra ``▁`` token)."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("perplexity needs chat messages that end with the assistant answer")
    return encode_prompt_completion(tokenizer, messages[:-1], messages[-1:])


def shared_prefix_length(encoded: Sequence[tuple[list[int], int]]) -> int:
    """How many leading tokens every sequence shares, capped so that the prefix stays inside every
    prompt and each sequence keeps at least one token after it."""
    if not encoded:
        return 0
    first = encoded[0][0]
    limit = min(min(n_prompt for _, n_prompt in encoded), min(len(ids) for ids, _ in encoded) - 1)
    k = 0
    while k < limit and all(ids[k] == first[k] for ids, _ in encoded):
        k += 1
    return k


def _run_prefix(model: Any, prefix: list[int], device: torch.device) -> tuple[Any, float, torch.Tensor] | None:
    """The prefix once: its KV cache, the NLL of its own tokens 1..P-1, and its last position's logits.
    None when the model's cache cannot simply be copied per batch (sliding-window or recurrent layers)."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:  # another cache API: run every example whole
        return None
    ids = torch.tensor([prefix], device=device)
    out = model(input_ids=ids, use_cache=True)
    cache = out.cache
    if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    logits = out.logits[0].float()
    nll = F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum").item()
    return cache, nll, logits[-1]


@torch.no_grad()
def token_nll(model: Any, tokenizer: Any, conversations: Sequence[Sequence[dict[str, str]]], *,
              batch_size: int = 8, progress: bool = True, share_prefix: bool = True) -> dict[str, np.ndarray]:
    """Per-example sums of token NLLs (nats) and token counts, for the answer and the full text.

    Batches are right-padded with an attention mask, examples sorted by length to waste less
    padding, and the shared prefix runs once (module docstring); the result is in input order and
    does not depend on ``batch_size`` or ``share_prefix``."""
    encoded = [tokenize_for_perplexity(tokenizer, conv) for conv in conversations]
    n = len(encoded)
    out = {k: np.zeros(n) for k in KEYS}
    if n == 0:
        return out
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    p = shared_prefix_length(encoded) if share_prefix else 0
    prefix = _run_prefix(model, encoded[0][0][:p], device) if p >= 2 else None
    if prefix is None:
        p = 0
    cache, prefix_nll, last_logits = prefix if prefix is not None else (None, 0.0, None)
    order = sorted(range(n), key=lambda i: len(encoded[i][0]))
    for start in pbar(range(0, n, batch_size), desc="perplexity", enabled=progress):
        batch = order[start:start + batch_size]
        rows = len(batch)
        width = max(len(encoded[i][0]) for i in batch) - p
        ids = torch.full((rows, width), pad_id, dtype=torch.long)
        mask = torch.zeros((rows, width), dtype=torch.long)
        answer = torch.zeros((rows, width), dtype=torch.bool)  # token j of the batch (position p + j) is answer
        for row, i in enumerate(batch):
            seq, n_prompt = encoded[i]
            ids[row, :len(seq) - p] = torch.tensor(seq[p:])
            mask[row, :len(seq) - p] = 1
            answer[row, max(n_prompt - p, 0):len(seq) - p] = True
        # nll[:, j] is the NLL of batch token j; token 0 is predicted by the prefix's last position
        nll = torch.zeros((rows, width), dtype=torch.float64)
        scored = mask.bool()
        if cache is None:
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            scored[:, 0] = False  # the first token of a sequence has no prediction
        else:
            batch_cache = copy.deepcopy(cache)
            batch_cache.batch_repeat_interleave(rows)
            full_mask = torch.cat([torch.ones((rows, p), dtype=torch.long), mask], dim=1)
            logits = model(input_ids=ids.to(device), attention_mask=full_mask.to(device),
                           cache=batch_cache, use_cache=True).logits
            nll[:, 0] = F.cross_entropy(last_logits.expand(rows, -1), ids[:, 0].to(device), reduction="none").cpu()
        valid = scored[:, 1:].to(device)  # position t predicts token t + 1; only real tokens, in fp32
        nll[:, 1:][scored[:, 1:]] = F.cross_entropy(logits[:, :-1][valid].float(), ids[:, 1:].to(device)[valid],
                                                    reduction="none").cpu().double()
        for row, i in enumerate(batch):
            out["full_nll"][i] = nll[row][scored[row]].sum().item() + prefix_nll
            out["full_tokens"][i] = scored[row].sum().item() + max(p - 1, 0)
            out["answer_nll"][i] = nll[row][answer[row] & scored[row]].sum().item()
            out["answer_tokens"][i] = (answer[row] & scored[row]).sum().item()
    model.train(was_training)
    return out


def answer_perplexity(nll: dict[str, np.ndarray], idx: np.ndarray | None = None) -> float:
    """Token-weighted answer perplexity: exp(total answer NLL / total answer tokens)."""
    idx = np.arange(len(nll["answer_nll"])) if idx is None else idx
    return math.exp(nll["answer_nll"][idx].sum() / nll["answer_tokens"][idx].sum())


def original_perplexity(nll: dict[str, np.ndarray]) -> dict[str, float]:
    """The original notebook's variant: each example's mean loss over its FULL text (prompt and
    answer), averaged over examples, then exponentiated; ``mean_example_ppl`` (the mean of the
    per-example perplexities) is given alongside for reference."""
    losses = nll["full_nll"] / nll["full_tokens"]
    return {"ppl": float(math.exp(losses.mean())), "mean_example_ppl": float(np.exp(losses).mean())}


def perplexity_report(nll: dict[str, np.ndarray], *, samples: int, seed: int) -> dict[str, Any]:
    """Both perplexity variants, labelled; the answer-token one with a bootstrap interval."""
    n = len(nll["answer_nll"])
    return {
        "answer_token_weighted": {
            "label": "answer tokens only, token-weighted (total NLL / total tokens)",
            **bootstrap_ci(lambda idx: answer_perplexity(nll, idx), n, samples=samples, seed=seed),
            "tokens": int(nll["answer_tokens"].sum()), "examples": n,
        },
        "original_per_example_full_text": {
            "label": "original (per-example mean, full text)", **original_perplexity(nll),
            "tokens": int(nll["full_tokens"].sum()), "examples": n,
        },
    }
