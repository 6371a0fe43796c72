"""A Hub model id without the Hub fails in seconds (hb_utils.model.source.check_hub_model), not after retries."""

from __future__ import annotations

import http.server
import os
import socket
import threading
import time

import pytest
from huggingface_hub import constants

from hb_utils.errors import ModelError
from hb_utils.model import source


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch):
    monkeypatch.setattr(source, "_hub_probe", {})
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "")  # recorded, so what a test sets is undone
    monkeypatch.delenv("HF_HUB_OFFLINE")


def test_probe_answers_for_a_server_and_a_closed_port(monkeypatch):
    """Any HTTP status is an answer (this server implements no HEAD: 501)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        assert source.hub_reachable(timeout=2)
        assert source.hub_reachable(timeout=0) is True  # the answer is reused for a while
    finally:
        server.shutdown()
        server.server_close()
    monkeypatch.setattr(source, "_hub_probe", {})
    assert not source.hub_reachable(timeout=2)  # the port is closed now


def test_probe_gives_up_after_its_timeout(monkeypatch):
    """A server that accepts the connection and never answers (what a sandbox or proxy does for any address):
    not reachable, after `timeout`, not the OS's connect timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        start = time.perf_counter()
        assert not source.hub_reachable(timeout=0.5)
        assert time.perf_counter() - start < 2


def test_without_the_hub_a_model_id_fails_naming_the_fix(monkeypatch):
    monkeypatch.setattr(source, "hub_reachable", lambda timeout=source.HUB_PROBE_SECONDS: False)
    start = time.perf_counter()
    with pytest.raises(ModelError, match=r"cannot be reached.*local model directory.*offline alias"):
        source.load_tokenizer("hb-tests/no-such-model")
    assert time.perf_counter() - start < 30


def test_offline_mode_without_the_model_in_the_cache(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(source, "hub_reachable", lambda timeout=0: pytest.fail("no probe in offline mode"))
    with pytest.raises(ModelError, match=r"HF_HUB_OFFLINE is set.*not in the local Hub cache"):
        source.check_hub_model("hb-tests/no-such-model")


def test_a_cached_model_without_the_hub_switches_to_offline_mode(monkeypatch):
    """So every later load reads the cache at once instead of retrying (kernels and ranks inherit the env)."""
    monkeypatch.setattr(source, "hub_reachable", lambda timeout=0: False)
    monkeypatch.setattr(source, "_in_hub_cache", lambda model_id: True)
    source.check_hub_model("hb-tests/cached-model")
    assert constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"


def test_a_reachable_hub_changes_nothing(monkeypatch):
    monkeypatch.setattr(source, "hub_reachable", lambda timeout=0: True)
    source.check_hub_model("hb-tests/any-model")
    assert not constants.HF_HUB_OFFLINE and "HF_HUB_OFFLINE" not in os.environ
