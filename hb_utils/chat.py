"""``hb chat outputs/<experiment>``: talk to HealthBot in the browser (gradio ChatInterface).

Why it looks the way it does:

* **Same model, same prompt as the evaluation.** A run directory loads the adapter on the 4-bit
  base exactly as stage 04 does (:func:`hb_utils.model.loading.load_adapter_model`, which refuses a
  missing adapter or one of another base model); an exported merged model
  (``outputs/<exp>/export/merged``) loads as a plain transformers model. Prompts use the run's system
  prompt and the tokenizer's own chat template, and stop at its end-of-turn token; temperature 0
  is 04's greedy decoding (no sampling, no repetition penalty: :func:`generation_kwargs`), so a
  temperature-0 chat answer equals :func:`hb_utils.model.generation.generate_answers` for the same question.
* **Fine-tuned / Base switch** = the adapter switched off on the *same* loaded model
  (``disable_adapter()``), so the two differ only by the adapter (as in 04).
* **Streaming** with transformers' ``TextIteratorStreamer``: ``generate`` runs in a thread and
  the chat function yields the growing text. **Stop** is gradio's stop button; gradio then closes
  the generator, whose ``finally`` sets a flag that a ``StoppingCriteria`` checks after every token,
  so the thread really stops instead of generating on unseen.
* **Context = the training length.** The model never saw more than ``max_length`` tokens, so the
  conversation (system prompt + turns + new message) is trimmed oldest-turn-first to
  ``max_length`` tokens, and a note says so; a message that alone does not fit is refused.
* **One request at a time** (``concurrency_limit=1``): the adapter switch is model state, so two
  tabs must not generate at once; gradio's queue answers them in turn.
* **Local and offline**: binds 127.0.0.1 by default, gradio analytics off, system fonts only.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hb_utils.config import ExperimentConfig
from hb_utils.errors import ModelError, RunError
from hb_utils.export.paths import EXPORT_CONFIG
from hb_utils.model import device, loading
from hb_utils.model import tokenizer as tokenizer_policy
from hb_utils.progress import is_headless
from hb_utils.run_dir import RunPaths, read_json, resolve, run_config

if TYPE_CHECKING:
    import gradio as gr

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported anywhere in this process
WARN = "⚠️ "  # replies that are messages about the input, not answers; they are kept out of the prompt
DISCLAIMER = ("**Research model, not medical advice.** HealthBot is a small model fine-tuned on MedQuAD; it can be "
              "wrong. Ask a qualified healthcare professional about your own health.")


@dataclass
class ChatModel:
    """A loaded model ready to chat: ``kind`` is ``adapter`` (adapter on the 4-bit base; Base
    available) or ``merged`` (an exported plain model; no Base)."""

    model: Any
    tokenizer: Any
    cfg: ExperimentConfig
    kind: str
    source: Path

    @property
    def has_base(self) -> bool:
        return self.kind == "adapter"


def load_chat_model(path: str | Path) -> ChatModel:
    """Load a run directory (its adapter) or an exported merged model directory.

    Raises RunError/ModelError with the fix for anything else: no such folder, a run without an
    adapter or of another base model, a folder that is neither.
    """
    root = resolve(path)
    if not (root / "config.json").is_file():
        raise RunError(f"{root} is neither a run directory nor an exported model (no config.json). Pass "
                       "outputs/<experiment> (after `hb run`) or outputs/<experiment>/export/merged "
                       "(after `hb export`).")
    if "config" in read_json(root / "config.json"):  # a run directory: config.json written by `hb run`
        cfg = run_config(root)
        model, tokenizer = loading.load_adapter_model(cfg, RunPaths.for_config(cfg).adapter)
        return ChatModel(model, tokenizer, cfg, "adapter", root)
    if not (root / EXPORT_CONFIG).is_file():
        raise ModelError(f"{root} holds a model but no {EXPORT_CONFIG}, so its system prompt and settings are "
                         "unknown. Export it with `hb export outputs/<experiment>` and chat with export/merged.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = ExperimentConfig(**read_json(root / EXPORT_CONFIG)["config"])
    dtype = device.resolve_compute_dtype(cfg.compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(root, dtype=dtype, attn_implementation="sdpa").eval()
    return ChatModel(model, AutoTokenizer.from_pretrained(root), cfg, "merged", root)


def check_port(host: str, port: int) -> None:
    """RunError naming the fix when ``host:port`` cannot be bound (in use, or not an address here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise RunError(f"Cannot listen on {host}:{port} ({exc.strerror}). Another program (an earlier "
                           f"`hb chat`?) uses it: pass another port, e.g. --port {port + 1}.") from None


def _text(content: Any) -> str:
    """A history message's text (gradio 6 stores content as a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "")
    if isinstance(content, list):
        return "".join(_text(part) for part in content)
    return ""


def conversation(history: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Complete user/assistant turns of the chat history, without replies that were input messages."""
    msgs = [{"role": m["role"], "content": _text(m.get("content"))}
            for m in history if m.get("role") in ("user", "assistant")]
    turns = []
    for i in range(len(msgs) - 1):
        user, reply = msgs[i], msgs[i + 1]
        if user["role"] == "user" and reply["role"] == "assistant" and not reply["content"].startswith(WARN):
            turns += [user, reply]
    return turns


def fit_prompt(tokenizer: Any, cfg: ExperimentConfig, turns: list[dict[str, str]],
               message: str) -> tuple[list[int], int]:
    """Prompt ids for ``turns`` + ``message`` within ``cfg.max_length`` tokens, dropping the oldest
    turns first; returns (ids, turns dropped). ValueError when the message alone does not fit."""
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    for start in range(0, len(turns) + 1, 2):
        msgs = system + turns[start:] + [{"role": "user", "content": message}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template holds the special tokens
        if len(ids) <= cfg.max_length:
            return ids, start // 2
    raise ValueError(len(ids))


class StopFlag:
    """A transformers StoppingCriteria that ends generation once ``event`` is set (the stop button)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def generation_kwargs(chat: ChatModel, temperature: float, top_p: float, repetition_penalty: float,
                      max_new_tokens: int) -> dict[str, Any]:
    """``generate`` settings. Temperature 0 is stage 04's greedy decoding exactly: no sampling and no
    repetition penalty (04 uses none), whatever ``top_p`` and ``repetition_penalty`` say, so a
    temperature-0 chat answer equals the evaluated one. Both are set explicitly because an exported
    model's generation_config samples with the run's penalty and would otherwise apply it."""
    kw: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "pad_token_id": chat.tokenizer.pad_token_id,
                          "eos_token_id": tokenizer_policy.stop_token_ids(chat.tokenizer)}
    if temperature and temperature > 0:
        kw.update(do_sample=True, temperature=float(temperature), top_p=float(top_p),
                  repetition_penalty=float(repetition_penalty))
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None, repetition_penalty=1.0)
    return kw


class ChatSession:
    """The chat function and its bookkeeping (``last`` holds the last generation's token count and
    whether it was stopped, for tests and the benchmark)."""

    def __init__(self, chat: ChatModel) -> None:
        self.chat = chat
        self.last: dict[str, Any] = {}

    def respond(self, message: str, history: list[dict[str, Any]], mode: str = "Fine-tuned",
                temperature: float | None = None, top_p: float | None = None, repetition_penalty: float | None = None,
                max_new_tokens: int | None = None) -> Iterator[tuple[str, str]]:
        """Yield (growing answer, note) pairs: gradio's streaming chat function."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        cfg, chat = self.chat.cfg, self.chat
        message = (message or "").strip()
        if not message:
            yield WARN + "Empty message: type a question first.", ""
            return
        try:
            ids, dropped = fit_prompt(chat.tokenizer, cfg, conversation(history), message)
        except ValueError as exc:
            yield (WARN + f"This message needs {exc.args[0]} tokens with the system prompt, but the model works "
                   f"with at most max_length={cfg.max_length} (its training length). Please shorten it."), ""
            return
        note = (f"ℹ️ {dropped} older exchange(s) left out: the model sees at most max_length={cfg.max_length} "
                "tokens (its training length).") if dropped else ""
        base = mode == "Base"
        if base and not chat.has_base:
            yield WARN + "Base is only available when chatting with a run directory (adapter on the base model).", note
            return
        kw = generation_kwargs(chat, cfg.qual_temperature if temperature is None else temperature,
                               cfg.qual_top_p if top_p is None else top_p,
                               cfg.qual_repetition_penalty if repetition_penalty is None else repetition_penalty,
                               cfg.qual_max_new_tokens if max_new_tokens is None else max_new_tokens)
        stop = threading.Event()
        streamer = TextIteratorStreamer(chat.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict[str, Any] = {}
        inputs = torch.tensor([ids], device=next(chat.model.parameters()).device)

        def work() -> None:
            try:
                with chat.model.disable_adapter() if base else contextlib.nullcontext(), torch.inference_mode():
                    out = chat.model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs),
                                              streamer=streamer,
                                              stopping_criteria=StoppingCriteriaList([StopFlag(stop)]), **kw)
                result["new_tokens"] = out.shape[1] - inputs.shape[1]
            except Exception as exc:  # shown in the chat; the streamer must still end
                result["error"] = exc
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        text, streamed_to_end = "", False
        try:
            for piece in streamer:
                text += piece
                yield text.lstrip(), note
            streamed_to_end = True
            if "error" in result:
                yield WARN + f"Generation failed: {result['error']}", note
                return
            yield text.strip(), note
        finally:  # also when gradio closes the generator (stop button, closed tab)
            stop.set()
            thread.join(timeout=60)
            self.last = {"new_tokens": result.get("new_tokens"), "stopped_by_user": not streamed_to_end,
                         "prompt_tokens": len(ids), "dropped_turns": dropped, "mode": mode,
                         "max_new_tokens": kw["max_new_tokens"], "text": text.strip()}


def build_app(chat: ChatModel) -> gr.Blocks:
    """The gradio app: disclaimer, Fine-tuned/Base switch, chat, an "Advanced" panel with the run's
    qualitative sampling settings (temperature 0 = greedy), and a note line for trimmed history."""
    import gradio as gr

    cfg = chat.cfg
    session = ChatSession(chat)
    what = "adapter on the 4-bit base" if chat.kind == "adapter" else "exported merged model"
    with gr.Blocks(title=f"HealthBot · {cfg.experiment}") as demo:
        gr.Markdown(f"## HealthBot · `{cfg.experiment}`\n{DISCLAIMER}\n\n<small>{cfg.model_name}, {what} "
                    f"({chat.source}).</small>")
        mode = gr.Radio(["Fine-tuned", "Base"], value="Fine-tuned", label="Model", interactive=chat.has_base,
                        info="Base = the same loaded model with the adapter switched off" if chat.has_base
                        else "An exported model has no Base: chat with the run directory to compare")
        note = gr.Markdown("", elem_id="hb-note")
        with gr.Accordion("Advanced", open=False):
            temperature = gr.Slider(0.0, 2.0, value=cfg.qual_temperature, step=0.05,
                                    label="temperature (0 = greedy as in 04, no penalty)")
            top_p = gr.Slider(0.05, 1.0, value=cfg.qual_top_p, step=0.05, label="top_p")
            rep = gr.Slider(1.0, 2.0, value=cfg.qual_repetition_penalty, step=0.05, label="repetition penalty")
            max_new = gr.Slider(1, 1024, value=cfg.qual_max_new_tokens, step=1, label="max new tokens")
        gr.ChatInterface(session.respond, additional_inputs=[mode, temperature, top_p, rep, max_new],
                         additional_outputs=[note], concurrency_limit=1, api_name="chat",
                         chatbot=gr.Chatbot(height=420, label="HealthBot", elem_id="hb-chatbot"),
                         textbox=gr.Textbox(placeholder="Ask a health question and press Enter", elem_id="hb-input",
                                            submit_btn=True, stop_btn=True, scale=7))
    demo.hb_session = session  # for tests and the benchmark
    return demo


def theme() -> gr.themes.Base:
    """gradio's default theme with system fonts, so the page fetches nothing from the internet."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, **kwargs: Any) -> str:
    """Start the app without blocking; returns its local URL."""
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, share=False,
                theme=theme(), ssr_mode=False, **kwargs)
    return demo.local_url


def serve(path: str | Path, host: str = "127.0.0.1", port: int = 7860, *, block: bool = True) -> gr.Blocks:
    """``hb chat``: check the port, load the model, start the app, print the URL, and serve until Ctrl+C."""
    check_port(host, port)  # before minutes of loading
    chat = load_chat_model(path)
    demo = build_app(chat)
    try:
        url = launch(demo, host, port)
    except OSError:  # taken while the model loaded
        check_port(host, port)
        raise
    print(f"HealthBot chat ({chat.kind}: {chat.source}) running on {url}  (Ctrl+C to stop)", flush=True)
    if block:
        try:
            demo.block_thread()
        except KeyboardInterrupt:
            demo.close()
    return demo


def show_in_notebook(run: ExperimentConfig | str | Path, *, enabled: bool | None = None,
                     height: int = 640) -> gr.Blocks | None:
    """Render the chat app inline at the end of ``05_qualitative`` when a person runs the notebook.

    Under papermill / ``hb run`` (headless, see :func:`hb_utils.progress.is_headless`) it loads
    nothing and returns None: an executed report has nobody to chat with, and a server would keep
    the kernel alive. ``enabled`` forces either way. Interactively it loads the run's adapter
    (a second copy next to the notebook's) and shows the app below the cell on a free local port.
    """
    if enabled is None:
        enabled = not is_headless()
    root = RunPaths.for_config(run).root if isinstance(run, ExperimentConfig) else resolve(run)
    if not enabled:
        print(f"Chat app skipped (headless run). Start it with: hb chat {root}")
        return None
    demo = build_app(load_chat_model(root))
    launch(demo, inline=True, height=height)
    return demo
