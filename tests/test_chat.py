"""hb_utils.chat: the gradio app, launched in-process and driven by gradio_client (and a real browser).

Fast tests use the tiny random Llama run of tests/tiny_runs.py (its random LoRA changes the
answers, so Fine-tuned and Base differ); the slow ones the trained smoke adapter on SmolLM2.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hb_utils import chat
from hb_utils.errors import ModelError, RunError
from hb_utils.export import merge
from hb_utils.model.generation import generate_answers
from hb_utils.run_dir import RunPaths, read_json, write_json
from tests.tiny_runs import make_tiny_run

QUESTION = "What are the symptoms of asthma?"


@contextlib.contextmanager
def running(path: Path) -> Iterator[tuple[object, object]]:
    """The chat app of ``path`` on a free local port, and a gradio_client connected to it."""
    from gradio_client import Client

    demo = chat.build_app(chat.load_chat_model(path))
    url = chat.launch(demo)
    try:
        yield demo, Client(url, verbose=False)
    finally:
        demo.close()


def ask(client, message: str, mode: str = "Fine-tuned", temperature: float = 0.0, top_p: float = 0.9,
        repetition_penalty: float = 1.0, max_new_tokens: int = 12) -> tuple[list[str], str, str]:
    """Send one message; returns (every streamed text, final text, note). ``client`` is a Client (its
    session keeps the chat history, as a browser tab does) or a URL (a new session: no history)."""
    from gradio_client import Client

    if isinstance(client, str):
        client = Client(client, verbose=False)
    job = client.submit(message, mode, temperature, top_p, repetition_penalty, max_new_tokens, api_name="/chat")
    final, note = job.result(timeout=300)
    return [out[0] for out in job.outputs()], final, note


def expected(cm: chat.ChatModel, question: str, max_new_tokens: int, base: bool = False) -> str:
    """The evaluation's greedy answer (generation.generate_answers) for one question."""
    with cm.model.disable_adapter() if base else contextlib.nullcontext():
        return generate_answers(cm.model, cm.tokenizer, [question], cm.cfg.system_prompt,
                                max_new_tokens=max_new_tokens, repetition_penalty=1.0, progress=False)[0].text


@pytest.fixture(scope="module")
def app(tiny_run: Path):  # noqa: F811
    """The tiny run's app and its URL (each `ask(url, ...)` is a new session, so without history)."""
    with running(tiny_run) as (demo, _):
        yield demo, demo.local_url


# --------------------------------------------------------------------------- fast: tiny model through gradio_client
def test_streaming_yields_growing_texts_and_greedy_equals_generate_answers(app):
    demo, url = app
    partials, final, note = ask(url, QUESTION, max_new_tokens=12)
    texts = [p for p in partials if p]
    assert len(set(texts)) >= 3, partials  # streamed piece by piece, not in one go
    assert all(len(a) <= len(b) for a, b in zip(texts, texts[1:], strict=False))
    assert all(final.startswith(p.rstrip()) for p in texts)
    assert final == expected(demo.hb_session.chat, QUESTION, 12) and final
    assert note == "" and demo.hb_session.last["new_tokens"] == 12


def test_base_switch_answers_with_the_adapter_disabled(app):
    demo, url = app
    _, base, _ = ask(url, QUESTION, mode="Base", max_new_tokens=10)
    _, tuned, _ = ask(url, QUESTION, mode="Fine-tuned", max_new_tokens=10)
    assert base == expected(demo.hb_session.chat, QUESTION, 10, base=True)
    assert base != tuned


def test_history_is_trimmed_oldest_first_with_a_note(tiny_run: Path):  # noqa: F811
    from gradio_client import Client

    with running(tiny_run) as (demo, _):
        client = Client(demo.local_url, verbose=False)  # one session: the server keeps its history
        notes, dropped = [], []
        for i in range(6):
            _, answer, note = ask(client, f"Question number {i}: what helps against a cough?", max_new_tokens=16)
            assert answer
            notes.append(note)
            dropped.append(demo.hb_session.last["dropped_turns"])
            assert demo.hb_session.last["prompt_tokens"] <= demo.hb_session.chat.cfg.max_length
    assert dropped[0] == 0 and notes[0] == ""
    assert dropped[-1] >= 1 and "left out" in notes[-1] and "max_length=160" in notes[-1]
    assert dropped == sorted(dropped)


def test_bad_messages_get_a_clear_reply(app):
    _, url = app
    _, empty, _ = ask(url, "   ")
    assert empty.startswith(chat.WARN) and "Empty message" in empty
    _, long, _ = ask(url, "cough " * 400)
    assert long.startswith(chat.WARN) and "max_length=160" in long and "shorten" in long


def test_two_tabs_at_once_are_queued_and_both_answered(app):
    from gradio_client import Client

    demo, url = app
    tabs = [Client(url, verbose=False) for _ in range(2)]
    jobs = [c.submit(QUESTION, "Fine-tuned", 0.0, 0.9, 1.0, 12, api_name="/chat") for c in tabs]
    answers = [j.result(timeout=300)[0] for j in jobs]
    assert answers[0] == answers[1] == expected(demo.hb_session.chat, QUESTION, 12)


def test_stop_really_stops_generation(app):
    from gradio_client import Client

    demo, url = app
    demo.hb_session.last = {}
    job = Client(url, verbose=False).submit(QUESTION, "Fine-tuned", 0.0, 0.9, 1.0, 1000, api_name="/chat")
    deadline = time.time() + 120
    while not any(out[0] for out in job.outputs()) and time.time() < deadline:
        time.sleep(0.05)
    job.cancel()
    while not demo.hb_session.last and time.time() < deadline:
        time.sleep(0.05)
    last = demo.hb_session.last
    assert last["stopped_by_user"] and last["new_tokens"] < 1000


def test_sampling_settings_come_from_the_run(tiny_run: Path):  # noqa: F811
    cm = chat.load_chat_model(tiny_run)
    kw = chat.generation_kwargs(cm, cm.cfg.qual_temperature, cm.cfg.qual_top_p, cm.cfg.qual_repetition_penalty,
                                cm.cfg.qual_max_new_tokens)
    assert kw["do_sample"] and kw["temperature"] == 0.3 and kw["top_p"] == 0.9 and kw["repetition_penalty"] == 1.15
    assert kw["max_new_tokens"] == 16 and kw["eos_token_id"] == [2]
    assert chat.generation_kwargs(cm, 0.0, 0.9, 1.0, 5)["do_sample"] is False


def test_temperature_0_chat_is_04s_greedy_decoding(tiny_run: Path):  # noqa: F811
    """Only the temperature moved to 0, the other settings the run's (repetition penalty 1.15; the exported
    model's generation_config samples with it too): the chat answers exactly as 04 evaluated."""
    from hb_utils.evaluate import evaluation

    merge.export_run(tiny_run, log=lambda *_: None)  # reused when another test made it already
    adapter = chat.load_chat_model(tiny_run)
    cfg = adapter.cfg
    assert cfg.qual_repetition_penalty == 1.15
    n = cfg.qual_max_new_tokens
    want = evaluation.generate(adapter.model, adapter.tokenizer, [QUESTION], cfg, max_new_tokens=n,
                               do_sample=False)[0].text  # 04's call (evaluation.run_evaluation)
    penalised = evaluation.generate(adapter.model, adapter.tokenizer, [QUESTION], cfg, max_new_tokens=n,
                                    do_sample=False, repetition_penalty=cfg.qual_repetition_penalty)[0].text
    assert want and penalised != want  # the penalty would change this answer
    assert chat.generation_kwargs(adapter, 0.0, 0.9, 1.15, n)["repetition_penalty"] == 1.0
    for cm in (adapter, chat.load_chat_model(tiny_run / "export" / "merged")):
        *_, (answer, note) = chat.ChatSession(cm).respond(QUESTION, [], temperature=0.0)
        assert answer == want, cm.kind


def test_chat_with_the_exported_merged_model(tiny_run: Path):  # noqa: F811
    merge.export_run(tiny_run, log=lambda *_: None)  # reused when test_export made it already
    merged = tiny_run / "export" / "merged"
    cm = chat.load_chat_model(merged)
    assert cm.kind == "merged" and not cm.has_base
    adapter = chat.load_chat_model(tiny_run)
    with running(merged) as (demo, _):
        _, answer, _ = ask(demo.local_url, QUESTION, max_new_tokens=8)
        _, base, _ = ask(demo.local_url, QUESTION, mode="Base", max_new_tokens=8)
    assert answer == expected(adapter, QUESTION, 8)
    assert base.startswith(chat.WARN) and "run directory" in base


# --------------------------------------------------------------------------- start-up errors, CLI
def test_run_without_adapter_or_of_another_model_is_refused(tmp_path: Path):
    cfg = make_tiny_run(tmp_path)
    run = RunPaths.for_config(cfg)
    meta = read_json(run.adapter / "hb_meta.json")
    write_json(run.adapter / "hb_meta.json", {**meta, "model_name": "TinyLlama/TinyLlama-1.1B-Chat-v1.0"})
    with pytest.raises(ModelError, match="trained on model_name='TinyLlama"):
        chat.load_chat_model(run.root)
    (run.adapter / "adapter_config.json").unlink()
    with pytest.raises(ModelError, match="No trained LoRA adapter"):
        chat.load_chat_model(run.root)
    with pytest.raises(RunError, match="neither a run directory nor an exported model"):
        chat.load_chat_model(tmp_path)


def test_cli_chat_errors_are_one_line(tmp_path: Path, capsys):
    from hb_utils.cli import main

    assert main(["chat", str(tmp_path), "--port", str(_free_port())]) == 2
    assert "neither a run directory" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["chat", str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"Cannot listen on 127.0.0.1:{port}" in err and f"--port {port + 1}" in err


def test_serve_prints_the_url_and_binds_localhost(tiny_run: Path, capsys):  # noqa: F811
    import urllib.request

    port = _free_port()
    demo = chat.serve(tiny_run, port=port, block=False)
    try:
        out = capsys.readouterr().out
        assert f"running on http://127.0.0.1:{port}/" in out
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30).status == 200
        import os

        assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    finally:
        demo.close()


def test_port_taken_while_the_model_loads_is_a_clear_error(tiny_run: Path, monkeypatch):  # noqa: F811
    port, real_load = _free_port(), chat.load_chat_model
    with socket.socket() as busy:
        def load_then_take(path):
            cm = real_load(path)
            busy.bind(("127.0.0.1", port))  # another program grabs the port during the load
            busy.listen()
            return cm

        monkeypatch.setattr(chat, "load_chat_model", load_then_take)
        with pytest.raises(RunError, match=f"Cannot listen on 127.0.0.1:{port}"):
            chat.serve(tiny_run, port=port, block=False)


def test_notebook_helper_skips_headless_runs(tiny_run: Path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("HB_HEADLESS", "1")
    assert chat.show_in_notebook(tiny_run) is None
    assert "skipped" in capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- slow: trained smoke adapter, real browser
@pytest.mark.slow
def test_smoke_chat_greedy_and_base_match_the_evaluation_path(trained_smoke_run: Path):  # noqa: F811
    with running(trained_smoke_run) as (demo, _):
        cm = demo.hb_session.chat
        partials, final, _ = ask(demo.local_url, QUESTION, max_new_tokens=24)
        _, base, _ = ask(demo.local_url, QUESTION, mode="Base", max_new_tokens=24)
    assert len({p for p in partials if p}) >= 3
    assert final == expected(cm, QUESTION, 24) and final
    assert base == expected(cm, QUESTION, 24, base=True)


@pytest.mark.slow
def test_browser_chat_streams_an_answer(trained_smoke_run: Path):  # noqa: F811
    """Chromium (Debian's, via Playwright) opens the page, asks, presses Enter, waits for the answer."""
    sync_api = pytest.importorskip("playwright.sync_api")
    exe = Path("/usr/bin/chromium")
    if not exe.is_file():
        pytest.skip("chromium not installed (.ci/run installs it: apt-get install -y chromium)")
    shot = trained_smoke_run / "reports" / "chat_browser.png"
    with running(trained_smoke_run) as (demo, _), sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(exe), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(demo.local_url, wait_until="load", timeout=120_000)  # gradio keeps a stream open: no networkidle
            box = page.locator("#hb-input textarea")
            box.wait_for(timeout=120_000)
            assert "not medical advice" in page.inner_text("body")
            box.fill(QUESTION)
            box.press("Enter")
            bot = page.locator("#hb-chatbot .message.bot, #hb-chatbot [data-testid='bot']").last
            bot.wait_for(timeout=120_000)
            seen: list[str] = []
            deadline = time.time() + 300
            while time.time() < deadline:  # streamed: the text grows, then the textbox is enabled again
                seen.append(bot.inner_text())
                if box.is_enabled() and len(seen[-1].strip()) > 0 and demo.hb_session.last:
                    break
                time.sleep(0.2)
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    answer = demo.hb_session.last["text"]
    assert answer and answer[:20] in seen[-1]
    assert len({s for s in seen if s.strip()}) >= 2  # it grew while we watched
    assert shot.stat().st_size > 10_000
