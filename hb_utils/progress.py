"""Progress bars that help in Jupyter and stay out of headless reports.

Why: a tqdm bar writes to stderr, and inside an executed notebook every redraw is stored in the
report as red text. Headless runs (papermill, ``hb run``, CI: :func:`hb_utils.quiet.is_headless`)
draw no bar at all (their loops print their own one-line summaries); interactive Jupyter gets the
widget bar (ipywidgets is a dependency), a terminal the text bar.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

from hb_utils.quiet import is_headless

T = TypeVar("T")

__all__ = ["is_headless", "pbar"]


def pbar(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
         enabled: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar, disabled in headless runs or when ``enabled`` is False."""
    return tqdm(iterable, total=total, desc=desc, disable=not enabled or is_headless(), **kwargs)
