"""Report hygiene in one place: which library output reaches an executed notebook, and which does not.

Why: an executed notebook is the report people read. Every warning, log line or progress-bar redraw a
library writes to stderr lands in it as a red block that the reader cannot act on (tqdm's "IProgress not
found", transformers' FutureWarnings about its own renames, bitsandbytes saying a paged optimizer runs
unpaged on CPU, 27 redraws of a GGUF conversion bar …). Before this module, five places each silenced
part of it. Now :func:`apply` is the one switch (``hb_utils.runs.notebook.begin`` calls it in every
notebook), :func:`console` its counterpart for a terminal (every ``hb`` command runs inside it: one line per
step, no library warnings or bars), :data:`KNOWN_WARNINGS` is the one list of warnings filtered (each with
why), and :func:`is_headless` the one test for "nobody watches this run" (papermill, ``hb run``, CI).

Real errors are never hidden: exceptions propagate, and warnings not in the list still show.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence

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
# ("kernels": the Hub kernel loader bitsandbytes tries on CPUs with AVX512-BF16; it warns when offline.)
QUIET_LOGGERS = ("transformers", "datasets", "huggingface_hub", "peft", "trl", "accelerate", "bitsandbytes",
                 "kernels", "papermill", "traitlets")
# Environment defaults libraries read when they are first imported (their loggers reset to these levels).
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "DATASETS_VERBOSITY": "error"}

# The first line of the cell papermill injects (tagged ``injected-parameters``) when it is given parameters.
PAPERMILL_PARAMETERS_HEADER = "# Parameters"


def first_line(source: str) -> str:
    """A cell's first line, stripped (how a parameters cell is recognised in a kernel's input history)."""
    return source.lstrip().split("\n", 1)[0].strip() if source else ""


def injected_by_papermill(history: Sequence[str]) -> bool:
    """True when a kernel's input history (IPython's ``In``) holds the parameters cell papermill injects.

    Why the history: papermill drives the kernel from another process, so nothing of papermill is imported
    in the kernel; what the kernel does see is the cell papermill adds to the notebook and executes.
    """
    return any(first_line(source) == PAPERMILL_PARAMETERS_HEADER for source in history)


def _kernel_history() -> list[str] | None:
    """IPython's ``In`` list of the running kernel, or None outside IPython."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    history = getattr(shell, "user_ns", {}).get("In") if shell is not None else None
    return history if isinstance(history, list) else None


def is_headless() -> bool:
    """True for papermill / ``hb run`` / CI runs, where nobody watches a progress bar move.

    ``HB_HEADLESS`` decides when set (``hb run`` sets it to 1); otherwise ``CI``, a kernel that ran
    papermill's injected parameters cell (:func:`injected_by_papermill`: plain ``papermill nb.ipynb out.ipynb
    -f params/smoke.yaml``), or the absence of both a terminal and a Jupyter kernel. (A person who reruns an
    executed report, injected cell included, in Jupyter is taken for papermill too: no bars, no chat app.)
    """
    if os.environ.get("HB_HEADLESS") is not None:
        return os.environ["HB_HEADLESS"] not in ("", "0", "false")
    if os.environ.get("CI"):
        return True
    history = _kernel_history()
    if history is not None and injected_by_papermill(history):
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
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        set_progress_bars(progress and not is_headless())


def _gguf_reader() -> object | None:
    """transformers' GGUF loader module: it draws its "Converting and de-quantizing GGUF tensors" bar with
    plain ``tqdm.auto``, which ignores transformers' progress-bar switch."""
    try:
        import transformers.modeling_gguf_pytorch_utils as reader
    except ImportError:
        return None
    return reader if hasattr(reader, "tqdm") else None


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """Library progress bars off inside the block (a one-time conversion, a weight load, an export), restored
    after: transformers' "Loading weights" / "Writing model shards", datasets', the Hub's, and the GGUF
    reader's tensor bar (272 redraws for SmolLM2's conversion)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    set_progress_bars(False)
    reader = _gguf_reader()
    bar = getattr(reader, "tqdm", None)
    if reader is not None:
        reader.tqdm = functools.partial(bar, disable=True)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if reader is not None:
            reader.tqdm = bar  # type: ignore[attr-defined]
        if was:
            set_progress_bars(True)


class _NoteFormatter(logging.Formatter):
    """The kit's own log records as console lines: ``note: ...`` (warnings) or ``error: ...``."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = "error" if record.levelno >= logging.ERROR else "note"
        return f"{prefix}: {record.getMessage()}"


@contextlib.contextmanager
def console() -> Iterator[None]:
    """The quiet policy of every ``hb`` command, restored after: what :func:`apply` does for a report,
    for a terminal.

    Why: ``hb run`` prints one line per notebook; the other commands printed library output between their
    own lines (bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community", transformers'
    FutureWarnings, load bars). Inside the block the :data:`KNOWN_WARNINGS` are filtered, the
    :data:`QUIET_LOGGERS` (and the libraries imported later, through :data:`QUIET_ENV`) report errors
    only, and the kit's own warnings print as one ``note:`` line. Progress bars are turned off where a
    command loads models (:func:`no_progress_bars`: that needs transformers, which ``hb --help`` must not
    import). Exceptions still propagate; warnings not in the list still show.
    """
    saved_env = {name: os.environ.get(name) for name in QUIET_ENV}
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    transformers_level = None
    if "transformers" in sys.modules:  # already imported: its verbosity was fixed at import
        from transformers.utils import logging as hf_logging

        transformers_level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
    kit = logging.getLogger("hb_utils")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_NoteFormatter())
    kit_state = (kit.propagate, kit.level)
    kit.addHandler(handler)
    kit.propagate = False  # one line, whatever a library did to the root logger
    if kit.level == logging.NOTSET:
        kit.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            filter_known_warnings()
            yield
    finally:
        kit.removeHandler(handler)
        kit.propagate, kit_level = kit_state
        kit.setLevel(kit_level)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        if transformers_level is not None:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity(transformers_level)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
