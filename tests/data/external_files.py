"""Small external sets in the LiveQA XML and MedLFQA JSONL layouts, written by the tests (never real text),
and where the real files live when present."""

from __future__ import annotations

import json
from pathlib import Path
from xml.sax.saxutils import escape

from tests.conftest import ROOT

EXTERNAL = (ROOT.parent / "shared" / "external").resolve()
LIVEQA_FILE = EXTERNAL / "liveqa_med_2017" / "TREC-2017-LiveQA-Medical-Test-Questions-w-summaries.xml"
MEDLFQA_LIVEQA = EXTERNAL / "medlfqa" / "live_qa_test_MedLFQA.jsonl"
MEDLFQA_MEDICATION = EXTERNAL / "medlfqa" / "medication_qa_test_MedLFQA.jsonl"


def liveqa_question(qid: str, subject: str, message: str, paraphrase: str, summary: str, answers: list[str],
                    ref_tag: str = "ReferenceAnswer") -> str:
    refs = "".join(f"<{ref_tag} aid=\"{qid}A{i}\"><ANSWER>{escape(a)}</ANSWER><AnswerURL>https://example.org/{i}"
                   f"</AnswerURL><COMMENT>c</COMMENT></{ref_tag}>" for i, a in enumerate(answers, start=1))
    return (f"<NLM-QUESTION qid=\"{qid}\"><Original-Question qfile=\"{qid}.txt\"><SUBJECT>{escape(subject)}</SUBJECT>"
            f"<MESSAGE>{escape(message)}</MESSAGE></Original-Question><NIST-PARAPHRASE>{escape(paraphrase)}"
            f"</NIST-PARAPHRASE><NLM-Summary>{escape(summary)}</NLM-Summary><ANNOTATIONS><FOCUS fid=\"F1\" "
            f"fcategory=\"Problem\">x</FOCUS></ANNOTATIONS><ReferenceAnswers>{refs}</ReferenceAnswers></NLM-QUESTION>")


def write_liveqa(path: Path, questions: list[str] | None = None) -> Path:
    """A LiveQA test file; by default three questions: two references (one in the <RefAnswer> spelling), one,
    and none (skipped)."""
    if questions is None:
        questions = [
            liveqa_question("TQ1", "zorbitis help", "my son has zorbitis what   should we eat\n thanks",
                            "What diet is recommended for zorbitis?", "What diet helps zorbitis?",
                            ["Zorbitis diets favour plenty of fluids and soft foods.",
                             "People with zorbitis should avoid spicy meals and eat small portions often."]),
            liveqa_question("TQ2", "", "Is quellax safe in pregnancy?", "Can quellax be taken while pregnant?",
                            "Is quellax safe during pregnancy?",
                            ["Quellax has not been studied in pregnancy; ask a doctor before using it."],
                            ref_tag="RefAnswer"),
            liveqa_question("TQ3", "nothing", "a question without an answer", "p", "s", []),
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<LiveQA2017-Medical-Test-Set-Full>"
                    + "".join(questions) + "</LiveQA2017-Medical-Test-Set-Full>\n")
    return path


def medlfqa_row(question: str, answer: str, must: list[str], nice: list[str]) -> dict:
    return {"Question": question, "Free_form_answer": answer, "Must_have": must, "Nice_to_have": nice}


def write_medlfqa(path: Path, rows: list[dict] | None = None) -> Path:
    """A MedLFQA file; by default two rows with statements and one without an answer (skipped)."""
    if rows is None:
        rows = [
            medlfqa_row("How should I store blorvane tablets?", "Store blorvane at room temperature, away from "
                        "moisture, in its original package.", ["Blorvane is stored at room temperature."],
                        ["Keep blorvane in its original package."]),
            medlfqa_row("What is the dose of tremacil for adults?", "Adults take 10 mg of tremacil once a day.",
                        ["The adult dose of tremacil is 10 mg daily.", "Tremacil is taken once a day."], []),
            medlfqa_row("Empty answer question?", "", ["s"], []),
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
