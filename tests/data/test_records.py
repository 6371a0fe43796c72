"""Training records ask the question exactly as generation, chat and the Modelfile do: the same turns before the
answer, with no system turn when the system prompt is empty (so the chat template's default applies everywhere)."""

from __future__ import annotations

import pytest

from hb_utils.config import load_config
from hb_utils.data import medquad
from hb_utils.model.generation import prompt_messages

ROW = {"document_source": "GHR", "question_id": "0001-1", "question_focus": "Zorbitis", "question_type": "symptoms",
       "question": "What are the symptoms of zorbitis ?", "answer": "Zorbitis causes a mild rash and a cough."}


@pytest.mark.parametrize("system_prompt", ["", "You are a careful assistant."])
def test_a_record_has_the_turns_generation_asks_with(system_prompt):
    rec = medquad.to_record(ROW, system_prompt)
    assert rec["messages"][:-1] == prompt_messages(ROW["question"], system_prompt)
    assert rec["messages"][-1] == {"role": "assistant", "content": ROW["answer"]}


def test_an_empty_system_prompt_writes_no_system_turn(release, tmp_path):
    cfg = load_config(dataset=str(release), output_root=str(tmp_path / "out"), experiment="t", sample_size=20,
                      min_question_chars=5, min_answer_chars=5, system_prompt="")
    records = medquad.prepare_splits(cfg, write=False).records
    assert all([m["role"] for m in r["messages"]] == ["user", "assistant"] for recs in records.values() for r in recs)
