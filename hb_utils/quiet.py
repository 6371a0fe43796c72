"""Report hygiene in one place: which library output reaches an executed notebook, and which does not.

Why: an executed notebook is the report people read. Every warning, log line or progress-bar redraw a
library writes to stderr lands in it as a red block that the reader cannot act on (tqdm's "IProgress not
found", transformers' FutureWarnings about its own renames, bitsandbytes saying a paged optimizer runs
unpaged on CPU, 27 redraws of a GGUF conversion bar …). Before this module, five places each silenced
part of it. Now :func:`apply` is the one switch (``hb_utils.runs.notebook.begin`` calls it in every
notebook), :data:`KNOWN_WARNINGS` is the one list of warnings filtered (each with why), and
:func:`is_headless` the one test for "nobody watches this run" (papermill, ``hb run``, CI).

Real errors are never hidden: exceptions propagate, and warnings not in the list still show.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator

# (category, message regex, why it is filtered). Only warnings a user of the kit cannot act on.
KNOWN_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated",
     "PEFT 0.21 reads a property transformers 5 renamed; nothing to change on our side"),
    (UserWarning, r".*[Pp]aged.*(CPU|cpu|not supported|unpaged).*",
     "paged_adamw_8bit runs unpaged on CPU; the optim parameter's help says so"),
    (UserWarning, r"IProgress not found",
     "tqdm's notebook bar without ipywidgets; headless runs draw no bars at all"),
    (UserWarning, r"The given NumPy array is not writable",
     "datasets hands torch read-only arrays; the data is never written"),
    (FutureWarning, r".*`torch_dtype` is deprecated.*", "transformers' own deprecation of an argument it passes"),
)
# Library loggers that report progress or advice at INFO/WARNING level: errors only in reports.
QUIET_LOGGERS = ("transformers", "datasets", "huggingface_hub", "peft", "trl", "accelerate", "bitsandbytes",
                 "papermill", "traitlets")


def is_headless() -> bool:
    """True for papermill / ``hb run`` / CI runs, where nobody watches a progress bar move.

    ``HB_HEADLESS`` decides when set (``hb run`` sets it to 1); otherwise papermill's presence,
    ``CI``, or the absence of both a terminal and a Jupyter kernel.
    """
    if os.environ.get("HB_HEADLESS") is not None:
        return os.environ["HB_HEADLESS"] not in ("", "0", "false")
    if os.environ.get("CI") or "papermill" in sys.modules:
        return True
    return not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()) and "ipykernel" not in sys.modules


def filter_known_warnings() -> None:
    """Install the filters of :data:`KNOWN_WARNINGS` (idempotent)."""
    for category, message, _why in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def set_progress_bars(enabled: bool) -> None:
    """Turn the progress bars of transformers, datasets and huggingface_hub on or off."""
    from transformers.utils import logging as hf_logging

    with contextlib.suppress(ImportError):
        import datasets

        datasets.enable_progress_bars() if enabled else datasets.disable_progress_bars()
    hf_logging.enable_progress_bar() if enabled else hf_logging.disable_progress_bar()
    with contextlib.suppress(ImportError):
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        enable_progress_bars() if enabled else disable_progress_bars()


def apply(*, progress: bool = True) -> None:
    """The one switch: filter :data:`KNOWN_WARNINGS`, keep library loggers at ERROR, and draw library
    progress bars only where someone watches (interactive Jupyter with ``progress=True``)."""
    filter_known_warnings()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        set_progress_bars(progress and not is_headless())


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """Library progress bars off inside the block (a one-time conversion, a weight load), restored after."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    set_progress_bars(False)
    try:
        yield
    finally:
        if was:
            set_progress_bars(True)
