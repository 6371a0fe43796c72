"""Progress bars that help in Jupyter and stay quiet in headless (papermill / CI) runs.

Why: a text tqdm bar inside an executed notebook stores every redraw in the cell output, so a long
loop floods the saved report with thousands of lines. Headless runs (``HB_HEADLESS=1``, which
``hb run`` sets, or no interactive frontend) get a bar that redraws at most every 30 seconds.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm import tqdm as text_tqdm
from tqdm.auto import tqdm

T = TypeVar("T")


def is_headless() -> bool:
    """True for papermill/nbconvert/CI runs, where nobody watches the bar move."""
    if os.environ.get("HB_HEADLESS") is not None:
        return os.environ["HB_HEADLESS"] not in ("", "0", "false")
    if os.environ.get("CI") or "papermill" in sys.modules:
        return True
    return not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()) and "ipykernel" not in sys.modules


def pbar(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
         enabled: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar; in headless runs it updates rarely (every 30 s) instead of on every step."""
    if is_headless():  # plain text bar (no widget), redrawn rarely
        kwargs.setdefault("mininterval", 30.0)
        kwargs.setdefault("ascii", True)
        return text_tqdm(iterable, total=total, desc=desc, disable=not enabled, **kwargs)
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, **kwargs)
