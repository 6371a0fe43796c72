"""What the first cell after the parameters does in every stage notebook: one call, ``begin(globals())``.

Why one call: every notebook needs the same three things before its story starts, and each used to do
them its own way — validate the parameters (unknown names fail with a did-you-mean, while the notebook's
own variables are never mistaken for parameters, so Run All twice or a rerun from the parameters cell
works), keep library noise out of the report (:func:`hb_utils.quiet.apply`), and show what this run
changed against Experiment 1 (:func:`hb_utils.runs.report.header_markdown`).
"""

from __future__ import annotations

import ast
import base64
import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from hb_utils import quiet, run_dir
from hb_utils.config import FIELDS, ExperimentConfig, check_names, stage_fields, type_name
from hb_utils.runs.report import header_markdown


def begin(namespace: Mapping[str, Any], *, stage: str | None = None, show: bool = True) -> ExperimentConfig:
    """Validate the notebook's parameters, claim the run directory (a notebook run on its own, by papermill
    or in Jupyter, writes only where ``hb run`` would: :func:`hb_utils.run_dir.claim` refuses the filesystem
    root, the home directory and folders the kit did not make), quiet the libraries, display the run header;
    return the config. ``stage`` (``"01_eda"`` …) limits the parameters to the ones that stage reads."""
    cfg = config_from_namespace(namespace, stage=stage)
    run_dir.claim(cfg, made_by="notebook")
    quiet.apply(progress=cfg.progress)
    if show:
        from IPython.display import Markdown, display

        display(Markdown(header_markdown(cfg)))
    return cfg


# The first line of a parameters cell: ours (generated, see parameters_cell_source) and papermill's injected one.
PARAMETERS_HEADER = "# Parameters (papermill: -f params/<name>.yaml, -p name value). Defaults = Experiment 1."
_INJECTED_HEADER = quiet.PAPERMILL_PARAMETERS_HEADER  # also how quiet.is_headless() knows papermill ran the kernel


def _assigned_names(source: str) -> list[str]:
    """Top-level names a cell assigns (``name = ...`` or ``name: type = ...``)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    names = []
    for node in tree.body:
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) else [])
        names += [t.id for t in targets if isinstance(t, ast.Name)]
    return names


def parameter_names_from_history(history: Sequence[str]) -> list[str] | None:
    """Names assigned by the parameters cells that ran last in a kernel (IPython's ``In`` list).

    Walks back from the newest input: papermill's injected cell (first line ``# Parameters``) and our
    generated parameters cell (first line :data:`PARAMETERS_HEADER`) count; the walk stops at ours.
    None when no parameters cell ran in this kernel.
    """
    found: list[str] = []
    seen = False
    for source in reversed(list(history)):
        first = quiet.first_line(source)
        if first == PARAMETERS_HEADER or first == _INJECTED_HEADER:
            found += _assigned_names(source)
            seen = True
            if first == PARAMETERS_HEADER:
                break
    return found if seen else None


def config_from_namespace(namespace: Mapping[str, Any], stage: str | None = None) -> ExperimentConfig:
    """Build the config from a notebook's globals after the parameters cell.

    Papermill injects parameters as plain assignments and only warns about names the notebook does
    not declare, so an unknown name (``-p lora_rr 8``) must fail here, with a did-you-mean. But the
    notebook's own variables (``rows``, ``keys`` …) live in the same globals, and a second *Run All*
    or a rerun from the parameters cell must not mistake them for parameters. So in a kernel the
    candidates are the names the parameters cells that just ran assigned (read from IPython's input
    history, ``In``); the values of every known field come from the namespace. Without a history
    (a plain dict, e.g. in tests) every plain value counts as a parameter.

    With ``stage``, a parameter that stage does not read is refused (naming the stages that read it),
    except one that came only from a parameters file given to the papermill command (``-f params/x.yaml``
    describes the whole experiment; its later stages' fields are left to them, see :func:`file_only_names`).
    The config holds the stage's own fields; the others keep their defaults and play no part here.
    """
    history = namespace.get("In")
    names = parameter_names_from_history(history) if isinstance(history, list) else None
    if names is None:
        names = [k for k, v in namespace.items() if not k.startswith("_") and k not in _NOTEBOOK_NAMES
                 and isinstance(v, (str, int, float, bool, list, tuple, type(None)))]
    own = stage_fields(stage)
    foreign = [n for n in names if n in FIELDS and n not in own]
    if foreign:
        from_file = file_only_names(*_parent_command_line())
        names = [n for n in names if n not in foreign or n not in from_file]
    check_names(dict.fromkeys(names), stage)
    return ExperimentConfig(**{k: namespace[k] for k in own if k in namespace})


def _parent_command_line() -> tuple[list[str], str | None]:
    """The command line and working directory of the process that started this kernel (papermill, under
    papermill), or ``([], None)``."""
    try:
        import psutil  # an ipykernel dependency

        parent = psutil.Process(os.getppid())
        return parent.cmdline(), parent.cwd()
    except Exception:  # noqa: BLE001 - no parent to read: treat every parameter as given explicitly
        return [], None


def file_only_names(argv: Sequence[str], cwd: str | None = None) -> set[str]:
    """Names that a papermill command line takes only from its ``-f`` parameters files.

    Under papermill the kernel sees one injected cell, whatever the source of each value, so the kernel
    reads papermill's command line (its parent process): names given with ``-p``, ``-r``, ``-y`` or ``-b``
    are the user's explicit choice and must belong to the stage; names only in a ``-f`` file are the rest
    of the experiment. Empty when ``argv`` is not a papermill command (``hb run``, a Python call, Jupyter).
    Relative ``-f`` paths are read from ``cwd``, papermill's working directory.
    """
    args = list(argv)
    starts = [i for i, a in enumerate(args) if Path(a).name == "papermill" or (a == "papermill" and i
              and args[i - 1] == "-m")]
    if not starts:
        return set()
    files: set[str] = set()
    explicit: set[str] = set()
    i = starts[0] + 1
    while i < len(args):
        a = args[i]
        if a in ("-p", "--parameters", "-r", "--parameters_raw") and i + 1 < len(args):
            explicit.add(args[i + 1])
            i += 3
        elif a in ("-f", "--parameters_file", "-y", "--parameters_yaml", "-b", "--parameters_base64") \
                and i + 1 < len(args):
            try:
                text = args[i + 1]
                if a in ("-b", "--parameters_base64"):
                    text = base64.b64decode(text).decode()
                elif a in ("-f", "--parameters_file"):
                    text = (Path(cwd or ".") / text).read_text()
                mapping = yaml.safe_load(text) or {}
            except (OSError, ValueError, yaml.YAMLError):
                mapping = {}
            (files if a in ("-f", "--parameters_file") else explicit).update(
                mapping if isinstance(mapping, dict) else {})
            i += 2
        else:
            i += 1
    return files - explicit


# Names IPython/Jupyter put into a notebook's namespace that are not parameters.
_NOTEBOOK_NAMES = {"In", "Out", "exit", "quit", "get_ipython", "open"}


def parameters_cell_source(stage: str | None = None) -> str:
    """The canonical parameters cell of ``stage``: under a heading per scope, one ``name: type = default  # help``
    line per field the stage reads (the form ``papermill --help-notebook`` documents), under
    :data:`PARAMETERS_HEADER`. ``python scripts/nbtools.py params`` writes it into every notebook; a test
    fails on drift."""
    lines = [PARAMETERS_HEADER,
             "# Generated from hb_utils/config.py (`python scripts/nbtools.py params`); the next cell validates them."]
    own = set(stage_fields(stage))
    for scope in ("run", "data", "train", "eval"):
        scoped = [f for f in fields(ExperimentConfig) if f.name in own and f.metadata["scope"] == scope]
        if scoped:
            lines.append(f"# --- {scope}: {SCOPE_TITLES[scope]} ---")
        for f in scoped:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            typ = type_name(f)
            # papermill's parser accepts no "|" in annotations; a quoted annotation is never evaluated.
            typ = '"Union[int, str]"' if typ == "int | str" else typ
            lines.append(f"{f.name}: {typ} = {default!r}  # {f.metadata['help']}")
    return "\n".join(lines)


SCOPE_TITLES = {"run": "bookkeeping and kernels (same results)", "data": "the split (02)",
                "train": "the adapter (03)", "eval": "evaluation (04, 05)"}
