"""TRL's SFTTrainer with a leaner loss for completion-only training.

Why: TRL computes its loss with a fused, tiled LM head (a Triton kernel on GPU; elsewhere a Python
loop over vocabulary tiles with fp32 accumulation), which takes a third of a training step on CPU.
:class:`SupervisedLogitsSFTTrainer` overrides ``compute_loss`` (TRL's documented extension point)
and asks the model itself for the logits of exactly the positions that predict a supervised token
(transformers' ``logits_to_keep`` boolean mask). The loss equals TRL's ``nll``: the summed token NLL
divided by the supervised tokens of the whole accumulated batch (``num_items_in_batch``). It logs
what TRL logs from the same batch, ``mean_token_accuracy`` (argmax of the kept logits = the target)
and ``num_tokens`` (running total of attention-mask tokens), so training curves and the tokens/s
figures stay comparable with TRL's; TRL's ``entropy`` log is left out, as it would take a second
softmax over the vocabulary for every supervised token. Any other TRL loss setting falls back to TRL.

Tried and dropped: running the system turn that all rows of a micro-batch share once and repeating
its KV cache (as :mod:`hb_utils.evaluate.perplexity` does). At Experiment 1's batch of 2 the second forward
call (bitsandbytes dequantizes every weight per call) and the cache copies cost more than the ~20%
of tokens saved: 0.94 vs 1.07-1.14 examples/s in ``benchmarks/bench_train.py``.
"""

from __future__ import annotations

from typing import Any

import torch
from trl import SFTTrainer


class SupervisedLogitsSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss projects only the positions predicting a supervised token (module doc)."""

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if (return_outputs or self.compute_loss_func is not None or self.label_smoother is not None
                or self.args.loss_type != "nll" or self.aux_loss_enabled or "labels" not in inputs
                or "attention_mask" not in inputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        targets = inputs["labels"][:, 1:]  # position p predicts token p + 1
        keep = torch.zeros_like(inputs["labels"], dtype=torch.bool)
        keep[:, :-1] = targets != -100
        forward = {k: v for k, v in inputs.items() if k != "labels"}
        logits = model(**forward, use_cache=False, logits_to_keep=keep).logits  # [supervised tokens, vocab]
        wanted = targets[keep[:, :-1]]
        nll = torch.nn.functional.cross_entropy(logits.float(), wanted, reduction="sum")
        count = num_items_in_batch if num_items_in_batch is not None else wanted.numel()
        loss = nll / torch.as_tensor(count, device=nll.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        self._log_token_metrics(inputs, logits, wanted)
        return loss

    def _log_token_metrics(self, inputs: dict[str, Any], logits: torch.Tensor, wanted: torch.Tensor) -> None:
        """TRL's ``mean_token_accuracy`` and ``num_tokens`` logs, as ``SFTTrainer.compute_loss`` keeps them
        (gathered over processes; ``num_tokens`` counts attention-mask tokens of training batches only)."""
        mode = "train" if self.model.training else "eval"
        with torch.no_grad():
            correct = (logits.argmax(dim=-1) == wanted).sum()
            valid = torch.as_tensor(wanted.numel(), device=correct.device)
        num_valid = self.accelerator.gather_for_metrics(valid).sum()
        num_correct = self.accelerator.gather_for_metrics(correct).sum()
        self._metrics[mode]["mean_token_accuracy"].append((num_correct / num_valid).item() if num_valid > 0 else 0.0)
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
