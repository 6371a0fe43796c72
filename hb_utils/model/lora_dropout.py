"""LoRA dropout whose masks cost a quarter of a random draw per element on CPU.

Why this module exists: PEFT applies ``nn.Dropout(p)`` to the *input* of every LoRA layer, so each
training step draws one random number per token and input feature of every adapted projection
(SmolLM2: 7 projections x 30 blocks, about 5,000 numbers per token). On CPU, PyTorch draws them one
by one from its Mersenne Twister and converts each to a float before comparing it with ``1 - p``, a
noticeable share of a CPU training step (``benchmarks/bench_train.py``; figures in ``benchmarks/README.md``).

:class:`FastDropout` computes the same thing, inverted dropout (zero each element with probability
``p``, scale the rest by ``1 / (1 - p)``, the identity in eval mode), but takes each element's
uniform number from 16 bits of a 64-bit random word, so one draw of the same generator serves four
elements and the comparison is an integer one. Its masks come from ``torch``'s default generator, so
``torch.manual_seed`` (the Trainer's ``seed``) makes them reproducible. The differences from
``nn.Dropout``, both documented in the config's ``fast_lora_dropout`` help:

* the drop probability is rounded to a multiple of 2**-16 (0.05 becomes 3277 / 65536 = 0.0500031);
* the random stream differs, so a run is a different (equally valid) draw of the same training.

On other devices (CUDA draws masks in parallel and fuses the multiply) it calls ``F.dropout``.
:func:`install` swaps the modules inside a PEFT model; adapters carry no dropout state, so saved
adapters are the same files either way.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

_BITS = 16
_LEVELS = 1 << _BITS
_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


class FastDropout(nn.Module):
    """Inverted dropout with drop probability ``p`` (rounded to 2**-16); see the module docstring."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        # keep an element when its 16-bit draw, read as a signed int16, is >= this threshold
        self.threshold = -(_LEVELS // 2) + round(p * _LEVELS)
        self.scale = 1.0 / (1.0 - p)

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or not x.is_floating_point():
            return F.dropout(x, self.p, training=True)
        return x * self.mask(x.shape, x.dtype)

    def mask(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A CPU tensor of ``shape`` and ``dtype``: 0 where dropped, ``1 / (1 - p)`` where kept.

        Built in integer arithmetic on the float's bit pattern (keep = 1 or 0, times the bits of the
        scale), which is exact and avoids a slow bool-to-float conversion.
        """
        n = math.prod(shape)
        words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(torch.iinfo(torch.int64).min, None)
        draws = words.view(torch.int16)[:n].view(shape)
        bits_dtype = _SAME_WIDTH_INT[dtype.itemsize]
        keep = torch.ge(draws, self.threshold, out=torch.empty(shape, dtype=bits_dtype))
        scale_bits = torch.tensor(self.scale, dtype=dtype).view(bits_dtype).item()
        return keep.mul_(scale_bits).view(dtype)


def _slots(model: nn.Module) -> Iterator[tuple[nn.ModuleDict, str]]:
    """(dict, adapter name) of every LoRA dropout: PEFT keeps them in each layer's ``lora_dropout``."""
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict):
            yield from ((dropouts, name) for name in list(dropouts))


def lora_dropouts(model: nn.Module) -> list[nn.Module]:
    """The dropout module of every LoRA layer and adapter in ``model``."""
    return [dropouts[name] for dropouts, name in _slots(model)]


def install(model: nn.Module) -> int:
    """Replace every PEFT LoRA ``nn.Dropout`` in ``model`` by a :class:`FastDropout` of the same ``p``.

    PEFT's ``nn.Identity`` (``lora_dropout`` 0) stays. Returns how many modules were replaced.
    """
    replaced = 0
    for dropouts, name in _slots(model):
        dropout = dropouts[name]
        if isinstance(dropout, nn.Dropout):
            fast = FastDropout(dropout.p)
            fast.train(dropout.training)
            dropouts[name] = fast
            replaced += 1
    return replaced
