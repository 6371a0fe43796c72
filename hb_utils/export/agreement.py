"""How closely one causal LM reproduces another: next-token distributions on the same token path.

Why: an export is only useful if it behaves like the model that was evaluated. Comparing final
texts alone hides near-ties (one flipped token and the rest of the answer diverges) and hides
drift that has not flipped a token yet. So the *reference* model (e.g. the adapter on the 4-bit
base) answers each prompt greedily, both models are then run teacher-forced on exactly that token
path, and at every answer position we compare

* whether both pick the same greedy token (``greedy_token_agreement``), and
* the largest absolute difference of the two next-token probability vectors (``|Δp|``, the L∞
  distance; reported as its mean over positions and its maximum),

plus, per prompt, whether the candidate's own greedy answer is the same text and its ROUGE-L
against the reference's answer (what a reader would notice). One prompt at a time, no padding, so
padding rounding (see :mod:`hb_utils.model.generation`) cannot blur the comparison.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hb_utils.evaluate.metrics import rouge_per_example
from hb_utils.model.generation import prompt_ids  # the prompt tokens training and 04 use
from hb_utils.model.tokenizer import stop_token_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def greedy_ids(model: Any, tokenizer: PreTrainedTokenizerBase, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of ``ids`` (new tokens only, the stop token included when reached)."""
    inp = torch.tensor([ids], device=_device(model))
    out = model.generate(input_ids=inp, attention_mask=torch.ones_like(inp), max_new_tokens=max_new_tokens,
                         do_sample=False, temperature=None, top_p=None, top_k=None, repetition_penalty=1.0,
                         eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    return out[0, len(ids):].tolist()


@torch.inference_mode()
def next_token_probs(model: Any, ids: list[int], start: int) -> torch.Tensor:
    """Softmax of the logits at positions ``start-1 … len(ids)-2``: the distributions that predicted
    ``ids[start:]`` (float64, so comparing them adds no rounding of its own)."""
    logits = model(input_ids=torch.tensor([ids], device=_device(model))).logits[0, start - 1:len(ids) - 1]
    return torch.softmax(logits.double(), dim=-1).cpu()


def answer_text(tokenizer: PreTrainedTokenizerBase, new_ids: list[int]) -> str:
    """The answer as the chat shows it: up to the first stop token, special tokens removed, stripped."""
    stops = set(stop_token_ids(tokenizer))
    cut = next((i for i, t in enumerate(new_ids) if t in stops), len(new_ids))
    return tokenizer.decode(new_ids[:cut], skip_special_tokens=True).strip()


def compare_models(reference: Any, candidate: Any, tokenizer: PreTrainedTokenizerBase, questions: list[str],
                   system_prompt: str, *, max_new_tokens: int,
                   candidate_tokenizer: PreTrainedTokenizerBase | None = None,
                   reference_cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """Agreement of ``candidate`` with ``reference`` on ``questions`` (see the module docstring).

    ``candidate_tokenizer`` (e.g. the one transformers rebuilds from a GGUF file) is checked to
    encode every prompt to the same ids; the comparison itself uses ``tokenizer`` for both, so a
    tokenizer difference is reported, not mixed into the probabilities. Pass the same dict as
    ``reference_cache`` when comparing several candidates with one reference: its greedy paths and
    probabilities are then computed once (on CPU the 4-bit reference is the slow part).
    """

    if not questions:
        raise ValueError("compare_models needs at least one question")
    agree, dp, ref_texts, cand_texts, same_prompt_ids = [], [], [], [], []
    cache = reference_cache if reference_cache is not None else {}
    for q in questions:
        ids = prompt_ids(tokenizer, q, system_prompt)
        if candidate_tokenizer is not None:
            same_prompt_ids.append(prompt_ids(candidate_tokenizer, q, system_prompt) == ids)
        key = f"{max_new_tokens}:{q}"
        if key not in cache:
            ref_new = greedy_ids(reference, tokenizer, ids, max_new_tokens)
            cache[key] = (ref_new, next_token_probs(reference, ids + ref_new, len(ids)))
        ref_new, p_ref = cache[key]
        path = ids + ref_new
        p_cand = next_token_probs(candidate, path, len(ids))
        agree.extend((p_ref.argmax(-1) == p_cand.argmax(-1)).tolist())
        dp.extend((p_ref - p_cand).abs().amax(-1).tolist())
        ref_texts.append(answer_text(tokenizer, ref_new))
        cand_texts.append(answer_text(tokenizer, greedy_ids(candidate, tokenizer, ids, max_new_tokens)))
    same = [a == b for a, b in zip(ref_texts, cand_texts, strict=True)]
    # Identical answers overlap fully, also where ROUGE's tokenizer keeps no token (non-Latin text, "").
    rouge = np.where(same, 1.0, rouge_per_example(cand_texts, ref_texts)["rougeL"])
    out: dict[str, Any] = {
        "questions": len(questions),
        "positions": len(agree),
        "greedy_token_agreement": float(np.mean(agree)),
        "mean_abs_dp": float(np.mean(dp)),
        "max_abs_dp": float(np.max(dp)),
        "same_answer_text": float(np.mean(same)),
        "rougeL_vs_reference": float(np.mean(rouge)),
        "max_new_tokens": max_new_tokens,
    }
    if candidate_tokenizer is not None:
        out["same_prompt_token_ids"] = float(np.mean(same_prompt_ids))
    return out
