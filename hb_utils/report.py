"""Executed notebook → self-contained HTML report with a "hide code" toggle.

Why nbconvert and a small toggle instead of a template of our own: nbconvert already embeds every
image as a data URI (the file can be mailed or opened from anywhere); readers of an experiment report
mostly want the prose, tables and plots, so one button hides all code cells at once.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbconvert import HTMLExporter

TOGGLE = """
<style>
  #hb-toggle { position: fixed; top: 12px; right: 12px; z-index: 1000; padding: 6px 12px;
               border: 1px solid #888; border-radius: 6px; background: #fff; cursor: pointer; font: 13px sans-serif; }
  body.hb-hide-code .jp-CodeCell .jp-Cell-inputWrapper,
  body.hb-hide-code .jp-CodeCell .jp-InputArea { display: none !important; }
</style>
<button id="hb-toggle" onclick="document.body.classList.toggle('hb-hide-code');
  this.textContent = document.body.classList.contains('hb-hide-code') ? 'Show code' : 'Hide code';">Hide code</button>
"""


def to_html(notebook: str | Path, output: str | Path | None = None) -> Path:
    """Render an executed notebook as one HTML file next to it (or at ``output``)."""
    notebook = Path(notebook)
    output = Path(output) if output else notebook.with_suffix(".html")
    nb = nbformat.read(notebook, as_version=4)
    exporter = HTMLExporter(template_name="lab")
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": notebook.stem}})
    idx = body.find(">", body.find("<body")) + 1
    html = body[:idx] + TOGGLE + body[idx:]
    tmp = output.with_suffix(".html.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(output)
    return output
