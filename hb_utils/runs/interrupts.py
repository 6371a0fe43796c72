"""Ctrl-C while papermill executes a notebook: the kernel shut down, nothing printed, the interrupt raised.

Why: papermill runs each kernel start and each cell with ``run_until_complete`` on one event loop, through
nbclient, which starts three tasks per cell (wait for the reply, collect outputs, check the kernel is alive
every second). A ``KeyboardInterrupt`` leaves the loop with those tasks still pending; papermill then shuts the
kernel down on the same loop, the pending tasks wake up beside the shutdown, and whether the "alive" check
ticks while the kernel is already gone is a matter of timing: when it does, nbclient logs "Kernel died while
waiting for execute reply." and the cell's task ends in a ``DeadKernelError`` that asyncio reports at exit as
"Task exception was never retrieved" (seven lines of traceback under ``hb run``'s one line). An interrupt during
the kernel's start left the kernel to papermill's cleanup, which only covers a started one.

:class:`InterruptibleClient` runs every step on its own task and, on ``KeyboardInterrupt``, cancels the
step's tasks and waits for them (their outcome retrieved) *before* anything else runs on the loop, shuts a
kernel that was starting down, and re-raises. :func:`watch` lets the caller tell an outcome that follows an
interrupt (a dead kernel, a failed cell) from news. papermill uses the client through the engine
:data:`ENGINE` (:func:`register`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any

ENGINE = "hb_interruptible"
SETTLE_SECONDS = 5.0  # a cancelled nbclient task ends at its next await; this only bounds a stuck one


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _ignore_after_interrupt(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Loop exception handler once interrupted: a cancelled task or a kernel that died with the run is not news."""
    from nbclient.exceptions import DeadKernelError

    if isinstance(context.get("exception"), (DeadKernelError, asyncio.CancelledError)):
        return
    loop.default_exception_handler(context)


def settle(loop: asyncio.AbstractEventLoop, *tasks: asyncio.Task[Any]) -> None:
    """Cancel the loop's pending tasks, let them finish (at most :data:`SETTLE_SECONDS`) and retrieve every
    outcome, so nothing wakes up later beside the kernel's shutdown and asyncio has nothing to report."""
    loop.set_exception_handler(_ignore_after_interrupt)
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.wait(pending, timeout=SETTLE_SECONDS))
    for task in {*pending, *tasks}:
        if task.done() and not task.cancelled():
            task.exception()  # marks it retrieved


def _client_class() -> type:
    from jupyter_core.utils import ensure_event_loop, run_sync
    from papermill.clientwrap import PapermillNotebookClient

    class InterruptibleClient(PapermillNotebookClient):
        """papermill's client whose synchronous steps (kernel start, cells, replies, shutdown) leave no task
        behind when Ctrl-C stops them (see the module docstring)."""

        interrupted = False

        def _step(self, make: Callable[..., Coroutine[Any, Any, Any]], *args: Any, **kwargs: Any) -> Any:
            if _loop_running():  # papermill called from a running loop (a notebook): nbclient's own runner
                return run_sync(make)(*args, **kwargs)
            loop = ensure_event_loop()
            task = loop.create_task(make(*args, **kwargs))
            try:
                return loop.run_until_complete(task)
            except KeyboardInterrupt:
                self.interrupted = True
                settle(loop, task)
                raise

        async def _async_kill_starting_kernel(self) -> None:
            """papermill cleans a kernel up only once both its start steps returned, so an interrupted start is
            ours to end. Killed, not shut down: jupyter_client's shutdown first sends the kernel SIGINT, which a
            kernel still importing its modules prints as a KeyboardInterrupt traceback on our terminal."""
            from jupyter_core.utils import ensure_async

            km = self.km
            if km is None:
                return
            with contextlib.suppress(Exception):
                if km.has_kernel:
                    await ensure_async(km.signal_kernel(signal.SIGKILL if hasattr(signal, "SIGKILL")
                                                        else signal.SIGTERM))
                    await ensure_async(km.provisioner.wait())
            with contextlib.suppress(Exception):
                await ensure_async(km.cleanup_resources())
            if self.kc is not None:
                with contextlib.suppress(Exception):
                    await ensure_async(self.kc.stop_channels())
                self.kc = None
            self.km = None

        def _stop_starting_kernel(self) -> None:
            self._step(self._async_kill_starting_kernel)

        def start_new_kernel(self, **kwargs: Any) -> Any:
            try:
                return self._step(self.async_start_new_kernel, **kwargs)
            except KeyboardInterrupt:
                self._stop_starting_kernel()
                raise

        def start_new_kernel_client(self) -> Any:
            try:
                return self._step(self.async_start_new_kernel_client)
            except KeyboardInterrupt:
                self._stop_starting_kernel()
                raise

        def execute_cell(self, *args: Any, **kwargs: Any) -> Any:
            return self._step(self.async_execute_cell, *args, **kwargs)

        def wait_for_reply(self, *args: Any, **kwargs: Any) -> Any:
            return self._step(self.async_wait_for_reply, *args, **kwargs)

        def _cleanup_kernel(self) -> None:
            self._step(self._async_cleanup_kernel)

    return InterruptibleClient


@functools.cache
def client_class() -> type:
    """:class:`InterruptibleClient` (built on first use: papermill and nbclient load only when a notebook runs)."""
    return _client_class()


@functools.cache
def register() -> str:
    """Register the papermill engine that executes with :func:`client_class`; returns its name, :data:`ENGINE`."""
    from papermill.engines import NBClientEngine, papermill_engines
    from papermill.log import logger
    from papermill.utils import merge_kwargs, remove_args

    class InterruptibleEngine(NBClientEngine):
        """papermill's nbclient engine (same arguments, same behaviour) with the interruptible client."""

        @classmethod
        def execute_managed_notebook(cls, nb_man: Any, kernel_name: str, log_output: bool = False,
                                     stdout_file: Any = None, stderr_file: Any = None, start_timeout: int = 60,
                                     execution_timeout: int | None = None, **kwargs: Any) -> Any:
            kwargs = remove_args(["input_path"], **kwargs)
            safe_kwargs = remove_args(["timeout", "startup_timeout"], **kwargs)
            final_kwargs = merge_kwargs(safe_kwargs, timeout=execution_timeout or kwargs.get("timeout"),
                                        startup_timeout=start_timeout, kernel_name=kernel_name, log=logger,
                                        log_output=log_output, stdout_file=stdout_file, stderr_file=stderr_file)
            return client_class()(nb_man, **final_kwargs).execute()

    papermill_engines.register(ENGINE, InterruptibleEngine)
    return ENGINE


@dataclass
class Watch:
    """What :func:`watch` saw: ``seen`` is True once SIGINT arrived."""

    seen: bool = False


@contextlib.contextmanager
def watch() -> Iterator[Watch]:
    """Note Ctrl-C (SIGINT) inside the block; the first one raises ``KeyboardInterrupt`` as usual, later ones
    are ignored while the kernel shuts down (seconds), so the run ends with one line instead of a second
    traceback from the middle of the shutdown.

    Only where Ctrl-C would raise ``KeyboardInterrupt`` anyway (Python's default handler, main thread): a
    process started with SIGINT ignored (``nohup``, a background job of a script) stays uninterruptible.
    """
    state = Watch()
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield state
        return

    def on_sigint(signum: int, frame: Any) -> None:
        if not state.seen:
            state.seen = True
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous)
