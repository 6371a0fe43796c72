"""What the first cell after the parameters does in every stage notebook: one call, ``begin(globals())``.

Why one call: every notebook needs the same three things before its story starts, and each used to do
them its own way — validate the parameters (unknown names fail with a did-you-mean, while the notebook's
own variables are never mistaken for parameters, so Run All twice or a rerun from the parameters cell
works), keep library noise out of the report (:func:`hb_utils.quiet.apply`), and show what this run
changed against Experiment 1 (:func:`hb_utils.report.header_markdown`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hb_utils import quiet
from hb_utils.config import ExperimentConfig, config_from_namespace


def begin(namespace: Mapping[str, Any], *, show: bool = True) -> ExperimentConfig:
    """Validate the notebook's parameters, quiet the libraries, display the run header; return the config."""
    cfg = config_from_namespace(namespace)
    quiet.apply(progress=cfg.progress)
    if show:
        from IPython.display import Markdown, display

        from hb_utils.report import header_markdown

        display(Markdown(header_markdown(cfg)))
    return cfg
