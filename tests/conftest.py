"""Shared fixtures: synthetic MedQuAD data (never real MedQuAD text) and the real release when present."""

from __future__ import annotations

from pathlib import Path

import pytest

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
XML_PAIR = """<QAPair pid="{pid}"><Question qid="{doc}-{pid}" qtype="{qtype}">{question}</Question><Answer>{answer}</Answer></QAPair>"""


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
def medquad() -> Path:
    if not (MEDQUAD / "1_CancerGov_QA").is_dir():
        pytest.skip(f"MedQuAD XML release not found at {MEDQUAD} (integration data; see README)")
    return MEDQUAD
