"""The committed notebooks: parameters cell in step with the config, no outputs, and real papermill runs."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys

import jupytext
import jupytext.config
import nbformat
import papermill as pm
import pytest

from hb_utils import run_dir
from hb_utils.config import FIELDS, ExperimentConfig, stage_fields
from hb_utils.run_dir import RunPaths
from hb_utils.runs.notebook import parameters_cell_source
from hb_utils.runs.report import to_html
from tests.conftest import ROOT, write_release

EXPECTED = ["01_eda", "02_format_split", "03_train_qlora", "04_evaluate", "05_qualitative"]
ALL_NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
NOTEBOOKS = [p for p in ALL_NOTEBOOKS if p.stem in EXPECTED]  # the stages share the experiment config


def test_the_series_is_there():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED
    assert "06_compare" in [p.stem for p in ALL_NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_matches_the_config(path):
    """Each notebook lists the fields of the scopes its stage reads (01/02: run + data, 03: + train, 04/05:
    all), under a heading per scope, as `papermill --help-notebook` reads them."""
    params = pm.inspect_notebook(str(path))
    stage = path.stem
    expected = {"01_eda": {"run", "data"}, "02_format_split": {"run", "data"},
                "03_train_qlora": {"run", "data", "train"}}.get(stage, {"run", "data", "train", "eval"})
    assert set(params) == {n for n, f in FIELDS.items() if f.metadata["scope"] in expected}, \
        "run `python scripts/nbtools.py params`"
    headings = [line for line in parameters_cell_source(stage).splitlines() if line.startswith("# --- ")]
    assert [h.split()[2].rstrip(":") for h in headings] == [s for s in ("run", "data", "train", "eval")
                                                             if s in expected]
    defaults = ExperimentConfig()
    for name, info in params.items():
        assert eval(info["default"]) == getattr(defaults, name), name  # noqa: S307 - our own literal
        assert info["help"], name
    nb = nbformat.read(path, as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert nb.cells[tagged[0]].source == parameters_cell_source(stage), "run `python scripts/nbtools.py params`"
    after = nb.cells[tagged[0] + 1]
    assert f'begin(globals(), stage="{stage}")' in after.source and after.metadata.get("tags") == ["hide-input"]
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")  # opens on its title


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_is_a_synced_jupytext_pair(path):
    """notebooks/NN_name.py (reviewed, linted) and NN_name.ipynb (opened, executed) hold the same cells."""
    script = path.with_suffix(".py")
    assert script.is_file(), f"{script.name} is missing: run `jupytext --sync {path}`"
    cells = [[(c.cell_type, c.source.strip(), c.metadata.get("tags", [])) for c in jupytext.read(p).cells]
             for p in (path, script)]
    assert cells[0] == cells[1], f"{path.name} and {script.name} differ: run `jupytext --sync notebooks/*.py`"
    config = jupytext.config.load_jupytext_configuration_file(str(ROOT / "jupytext.toml"))
    assert "py:percent" in str(config.formats) and "ipynb" in str(config.formats)


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebooks_carry_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name}: run `nbstripout {path}`"


def _assigned(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_code_never_reuses_a_parameter_name(path):
    """A notebook variable named like a parameter would be read back as that parameter on a rerun."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" not in cell.metadata.get("tags", []):
            clash = _assigned(ast.parse(cell.source)) & set(FIELDS)
            assert not clash, f"{path.name}: cell assigns parameter name(s) {clash}"


def test_html_report_leaves_out_parameters_cells_and_hidden_inputs(tmp_path):
    nb = nbformat.v4.new_notebook()
    cells = [("markdown", "# Title", []), ("code", "SECRET_PARAMS = 1", ["parameters"]),
             ("code", "INJECTED = 2", ["injected-parameters"]), ("code", "HIDDEN_SETUP = 3", ["hide-cell"]),
             ("code", "HIDDEN_INPUT = 4", ["hide-input"]), ("code", "VISIBLE = 5", [])]
    for kind, src, tags in cells:
        cell = nbformat.v4.new_markdown_cell(src) if kind == "markdown" else nbformat.v4.new_code_cell(src)
        cell.metadata["tags"] = tags
        nb.cells.append(cell)
    nb.cells[4].outputs = [nbformat.v4.new_output("stream", name="stdout", text="the header table")]
    nbformat.write(nb, tmp_path / "r.ipynb")
    html = to_html(tmp_path / "r.ipynb").read_text()
    for hidden in ("SECRET_PARAMS", "INJECTED", "HIDDEN_SETUP", "HIDDEN_INPUT"):
        assert hidden not in html
    assert "VISIBLE" in html and "the header table" in html and "hb-toggle" in html
    assert html.index("Title") < html.index("the header table")


def run_notebook(name: str, out_dir, cwd, params: dict, params_file=ROOT / "params" / "smoke.yaml"):
    """Run one notebook with the papermill CLI as a user would, from `cwd`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{name}.ipynb"
    cmd = [sys.executable, "-m", "papermill", str(ROOT / "notebooks" / f"{name}.ipynb"), str(out),
           "-f", str(params_file), "--log-level", "WARNING"]
    for k, v in params.items():
        cmd += ["-p", k, str(v)]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "HB_HEADLESS": "1"})
    return proc, out


def error_outputs(path):
    nb = nbformat.read(path, as_version=4)
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]


@pytest.mark.slow
@pytest.mark.integration
def test_01_and_02_on_the_medquad_release(medquad_dir, smoke_series):
    """01 and 02 as the shared smoke series ran them (headless, from the repository root; notebooks run from
    notebooks/ in the 03/04 tests) on the official release: the counts, the split, no leakage, the plots."""
    cfg, run = smoke_series.cfg, smoke_series.run
    assert run_dir.resolve(cfg.dataset) == medquad_dir
    stats = json.loads(run.data_stats.read_text())
    assert stats["stamp"]["fingerprints"]["data"] == cfg.fingerprint("data")
    assert stats["raw"]["rows"] == 47_441
    sizes = stats["split"]["sizes"]
    assert sum(sizes.values()) == cfg.sample_size and sizes["train"] >= 0.7 * cfg.sample_size
    assert stats["split"]["leakage"] and not any(stats["split"]["leakage"].values()), stats["split"]["leakage"]
    for split, n in sizes.items():
        assert len(run.split(split).read_text().splitlines()) == n
    for plot in ("eda_sources", "eda_lengths", "split_funnel"):
        assert run.plot(plot).stat().st_size > 1000
    assert json.loads((run.data / "eda.json").read_text())["duplicates"]["answered_pairs"] == 16_407
    assert not error_outputs(run.reports / "01_eda.ipynb") and not error_outputs(run.reports / "02_format_split.ipynb")
    # The executed copies went to outputs, the committed notebook stayed clean.
    assert not nbformat.read(ROOT / "notebooks" / "02_format_split.ipynb", as_version=4).cells[4].outputs


@pytest.mark.slow
def test_unknown_parameter_stops_the_notebook(tmp_path, release):
    proc, out = run_notebook("02_format_split", tmp_path, ROOT,
                             {"output_root": str(tmp_path / "o"), "dataset": str(release), "lora_rr": 4})
    assert proc.returncode != 0
    assert "Unknown parameter 'lora_rr'" in proc.stderr and "Did you mean 'lora_r'" in proc.stderr
    assert not (tmp_path / "o").exists()  # nothing was written


def stream_text(path) -> str:
    nb = nbformat.read(path, as_version=4)
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                   if o.output_type == "stream")


@pytest.mark.slow
def test_03_from_notebooks_dir_with_papermill_p_reuses_the_smoke_adapter(smoke_series, tmp_path):
    """`papermill notebooks/03_train_qlora.ipynb OUT -f params/smoke.yaml -p lora_r 8`, run from notebooks/
    on the finished smoke series (lora_r 8 is its value): the adapter is reused, not retrained, and the
    adapter reloaded from disk answers two validation questions."""
    before = json.loads((smoke_series.run.metrics / "train.json").read_text())
    own = {k: v for k, v in smoke_series.params.items() if k in stage_fields("03_train_qlora")}  # -p: its own only
    proc, out = run_notebook("03_train_qlora", tmp_path, ROOT / "notebooks", {**own, "lora_r": 8})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not error_outputs(out)
    text = stream_text(out)
    assert "already holds this config's adapter" in text
    assert json.loads((smoke_series.run.metrics / "train.json").read_text()) == before  # reused, not retrained
    answers = re.findall(r"\nA: (.*?)\n\((\d+) tokens, stopped: (?:True|False)\)", text, flags=re.S)
    assert len(answers) == 2 and all(a.strip() and int(n) > 0 for a, n in answers)


# --------------------------------------------------------------------------- interactive reruns (nbclient)
def set_parameters(source: str, values: dict) -> str:
    """The parameters cell as a user edits it in Jupyter: each given name's default replaced by a value."""
    lines = source.splitlines()
    for name, value in values.items():
        idx = next((i for i, line in enumerate(lines) if line.startswith(f"{name}:")), None)
        if idx is None:  # not a parameter of this notebook's stage
            continue
        head, _, help_ = lines[idx].partition("  # ")
        lines[idx] = f"{head.split('=')[0].rstrip()} = {value!r}  # {help_}"
    return "\n".join(lines)


def execute_interactively(name: str, values: dict, edit: dict, workdir, run_all: int = 2) -> list:
    """In ONE kernel, as a Jupyter user: Run All (``run_all`` times), then edit the parameters cell and run
    from it to the end. Returns the notebook after each pass (their code cells' outputs)."""
    from nbclient import NotebookClient

    nb = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
    pidx = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells[pidx].source = set_parameters(nb.cells[pidx].source, values)
    client = NotebookClient(nb, kernel_name="python3", timeout=1200,
                            resources={"metadata": {"path": str(ROOT / "notebooks")}})
    passes = []
    with client.setup_kernel():
        for _ in range(run_all):
            for i, cell in enumerate(nb.cells):
                client.execute_cell(cell, i)  # raises CellExecutionError on any error
            passes.append(nbformat.from_dict(json.loads(json.dumps(nb))))
        nb.cells[pidx].source = set_parameters(nb.cells[pidx].source, {**values, **edit})
        for i in range(pidx, len(nb.cells)):
            client.execute_cell(nb.cells[i], i)
        passes.append(nb)
    return passes


@pytest.mark.slow
def test_01_and_02_run_all_twice_then_rerun_from_an_edited_parameters_cell(tmp_path, monkeypatch):
    monkeypatch.setenv("HB_HEADLESS", "1")
    release = write_release(tmp_path / "release", n_docs=30)
    values = {"output_root": str(tmp_path / "out"), "dataset": str(release), "experiment": "live",
              "sample_size": 60, "max_answer_words": 120}
    for name in ("01_eda", "02_format_split"):
        execute_interactively(name, values, {"sample_size": 40, "overwrite": True}, tmp_path)
    stats = json.loads((tmp_path / "out" / "live" / "data" / "stats.json").read_text())
    assert stats["sample"]["requested"] == 40  # the edited value took effect in the same kernel


@pytest.mark.slow
def test_03_and_05_run_all_twice_then_rerun_from_an_edited_parameters_cell(smoke_series, tmp_path, monkeypatch):
    """The notebooks with variables of their own (`keys` in 03, `rows` in 05) that must not be read back as
    parameters."""
    monkeypatch.setenv("HB_HEADLESS", "1")
    shutil.copytree(smoke_series.root / "outputs", tmp_path / "outputs")  # leave the shared run untouched
    cfg = smoke_series.cfg.replace(output_root=str(tmp_path / "outputs"))
    values = {k: getattr(cfg, k) for k in FIELDS if getattr(cfg, k) != getattr(ExperimentConfig(), k)}
    # short answers: three passes of each notebook generate (03's reload check, 05's prompts), and only the
    # edited value matters here
    values.update(eval_max_new_tokens=8, qual_max_new_tokens=8)
    # Run All once, then the edited rerun from the parameters cell (the failing case; Run All twice: 01/02 above)
    passes = execute_interactively("03_train_qlora", values, {"eval_max_new_tokens": 4}, tmp_path, run_all=1)
    assert "already holds this config's adapter" in "".join(
        o.get("text", "") for c in passes[-1].cells if c.cell_type == "code" for o in c.outputs)
    passes = execute_interactively("05_qualitative", values, {"qual_max_new_tokens": 6}, tmp_path, run_all=1)
    rows = [json.loads(line) for line in (RunPaths.for_config(cfg).metrics / "qualitative.jsonl").open()]
    assert max(r["finetuned_tokens"] for r in rows) <= 6  # the edited parameter was used


# --------------------------------------------------------------------------- plain papermill, nobody watching
REPORT_NOISE = ("it/s]", "s/it]", "%|", "\r", "Loading weights", "application/vnd.jupyter.widget-view+json", "iframe")


def report_text(path) -> str:
    """Every output of an executed notebook as text (streams, rich data with their mime types, errors)."""
    nb = nbformat.read(path, as_version=4)
    parts = []
    for cell in (c for c in nb.cells if c.cell_type == "code"):
        for out in cell.outputs:
            parts += [out.get("text", ""), *out.get("traceback", []), str(out.get("ename", ""))]
            parts += [f"{mime}: {value}" for mime, value in out.get("data", {}).items()]
    return "\n".join(parts)


@pytest.mark.slow
def test_05_under_plain_papermill_is_headless_without_ci_or_hb_headless(trained_smoke_run, tmp_path):
    """`papermill notebooks/05_qualitative.ipynb out.ipynb -f <params>` on a trained run, with CI and HB_HEADLESS
    removed from the environment: the kernel knows papermill runs it (its injected parameters cell), so the
    report holds no progress bar, no "Loading weights" and no chat app (its last cell used to load a second copy
    of the model and store an iframe of a server that is gone when the report is read)."""
    import yaml

    out_root = tmp_path / "outputs"
    shutil.copytree(trained_smoke_run, out_root / trained_smoke_run.name)  # leave the shared run untouched
    config = json.loads((trained_smoke_run / "config.json").read_text())["config"]
    params = tmp_path / "params.yaml"
    # short answers: what is tested is what the report holds, not the answers
    params.write_text(yaml.safe_dump({**config, "output_root": str(out_root), "qual_max_new_tokens": 8}))
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "HB_HEADLESS")}
    out = tmp_path / "05_qualitative.ipynb"
    proc = subprocess.run([sys.executable, "-m", "papermill", str(ROOT / "notebooks" / "05_qualitative.ipynb"),
                           str(out), "-f", str(params)], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = report_text(out)
    assert "Chat app skipped (headless run)" in text, text[-3000:]
    for noise in REPORT_NOISE:
        assert noise not in text, f"{noise!r} in the report"
    assert not error_outputs(out)
