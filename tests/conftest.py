"""Shared fixtures: synthetic MedQuAD data (never real MedQuAD text) and the real release when present."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from hb_utils.config import ExperimentConfig, load_config
from hb_utils.run_dir import RunPaths

# The tiny random-Llama run and the trained smoke adapter (fixtures `tiny_run`, `trained_smoke_run`) that the
# chat and export tests share: a plugin module, so no test imports fixtures by name.
pytest_plugins = ["tests.tiny_runs"]

ROOT = Path(__file__).resolve().parent.parent
MEDQUAD = (ROOT.parent / "shared" / "medquad").resolve()

XML_DOC = """<?xml version="1.0" encoding="UTF-8"?>
<Document id="{doc}" source="{source}" url="https://example.org/{doc}">
<Focus>{focus}</Focus>
<FocusAnnotations>
  <UMLS><CUIs><CUI>C000{doc}</CUI></CUIs><SemanticTypes><SemanticType>T047</SemanticType></SemanticTypes>
  <SemanticGroup>Disorders</SemanticGroup></UMLS>
</FocusAnnotations>
<QAPairs>
{pairs}
</QAPairs>
</Document>
"""
XML_PAIR = ("""<QAPair pid="{pid}"><Question qid="{doc}-{pid}" qtype="{qtype}">{question}</Question>"""
            """<Answer>{answer}</Answer></QAPair>""")


def write_release(root: Path, n_docs: int = 12, pairs_per_doc: int = 4, dup_every: int = 5) -> Path:
    """A small release in the official layout: <source folder>/<doc>.xml. Every `dup_every`-th document
    re-asks the questions of the previous one under another source (as MedQuAD does)."""
    sources = ["1_FakeGov_QA", "2_FakeGard_QA"]
    for d in range(n_docs):
        focus_id = d - 1 if dup_every and d % dup_every == dup_every - 1 else d
        folder = root / sources[d % 2]
        folder.mkdir(parents=True, exist_ok=True)
        pairs = []
        for p in range(1, pairs_per_doc + 1):
            answer = " ".join(f"word{d}x{p}y{k}" for k in range(8 + p)) + ". <b>Bold</b>   tail."
            pairs.append(XML_PAIR.format(pid=p, doc=f"{d:07d}", qtype=["information", "symptoms", "treatment",
                                                                        "causes"][p % 4],
                                         question=f"What is (are) condition number {focus_id} aspect {p} ?",
                                         answer=answer if p != pairs_per_doc else ""))
        (folder / f"{d:07d}.xml").write_text(XML_DOC.format(doc=f"{d:07d}", source=sources[d % 2].split("_")[1],
                                                            focus=f"Condition {focus_id}", pairs="\n".join(pairs)))
    return root


@pytest.fixture
def release(tmp_path: Path) -> Path:
    return write_release(tmp_path / "release")


@pytest.fixture
def medquad_dir() -> Path:
    if not (MEDQUAD / "1_CancerGov_QA").is_dir():
        pytest.skip(f"MedQuAD XML release not found at {MEDQUAD} (integration data; see README)")
    return MEDQUAD


# --------------------------------------------------------------------------- two test processes (pytest-xdist)
def xdist_group_of(item: pytest.Item) -> str:
    """Which pytest-xdist group a test runs in (CI: ``pytest -n 2 --dist loadgroup``, one group per process
    at a time). A group's tests run in one process, in order, so an expensive fixture is built once and
    never used by two processes at once: every test of the shared smoke series in one group (it is one
    run directory that some of them rerun stages in), every test of the trained smoke adapter (the chat
    and export tests) in another, and the rest by module, which keeps each module-scoped fixture in one
    process."""
    if "smoke_series" in item.fixturenames:
        return "smoke_series"
    if "trained_smoke_run" in item.fixturenames or item.module.__name__.startswith("tests.export."):
        return "smoke_adapter"
    return item.module.__name__


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, give each test process its share of the cores (OMP_NUM_THREADS, which the
    notebook kernels and `hb` commands it starts inherit): two processes of two torch threads each on
    2 cores made training ~10x slower (OpenMP threads spinning on a busy core), one thread each keeps
    both cores busy. A value the user set is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which turns the marks into the groups it schedules
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its group, and put the two long groups first: with ``--no-loadscope-reorder``
    xdist hands groups out in this order, so the smoke series starts at once in one process while the
    other process works through everything else."""
    first = {"smoke_series": 0, "smoke_adapter": 1}
    groups = {item.nodeid: xdist_group_of(item) for item in items}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(groups[item.nodeid]))
    items.sort(key=lambda item: first.get(groups[item.nodeid], 2))


# --------------------------------------------------------------------------- the smoke series, once per session
SMOKE = ROOT / "params" / "smoke.yaml"


def hb(*args: str, cwd: Path = ROOT, timeout: int = 1800) -> subprocess.CompletedProcess:
    """The `hb` command as a user runs it (`python -m hb_utils`), headless."""
    return subprocess.run([sys.executable, "-m", "hb_utils", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "HB_HEADLESS": "1"}, timeout=timeout)


def as_flags(params: dict) -> list[str]:
    return [x for k, v in params.items() for x in ("-p", k, str(v))]


@dataclass
class SmokeSeries:
    """One finished `hb run params/smoke.yaml` (01 -> 05) in a temporary output root."""

    cfg: ExperimentConfig
    params: dict
    proc: subprocess.CompletedProcess
    root: Path

    @property
    def run(self) -> RunPaths:
        return RunPaths.for_config(self.cfg)


@pytest.fixture(scope="session")
def smoke_series(tmp_path_factory: pytest.TempPathFactory) -> SmokeSeries:
    """The smoke experiment trained and evaluated ONCE per test session, shared by every test that needs a
    trained adapter or executed reports (end to end, notebooks, evaluation): training is the expensive part,
    and on a 2-core CPU without bf16 units one series takes minutes. Uses the MedQuAD release when present,
    else a synthetic one (never real MedQuAD text)."""
    root = tmp_path_factory.mktemp("smoke_series")
    dataset = MEDQUAD if (MEDQUAD / "1_CancerGov_QA").is_dir() else write_release(root / "release", n_docs=30)
    # the same code path as params/smoke.yaml with half the training and shorter answers: CI's time is
    # mostly this series (benchmarks/README.md times the file itself)
    params = {"output_root": str(root / "outputs"), "dataset": str(dataset), "max_steps": 2, "grad_accum": 2,
              "eval_max_new_tokens": 24, "qual_max_new_tokens": 32}
    proc = hb("run", str(SMOKE), *as_flags(params))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return SmokeSeries(load_config(SMOKE, **params), params, proc, root)
