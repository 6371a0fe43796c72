"""The Jupyter kernel manager of every executed notebook: kernels listen on Unix sockets (ZeroMQ ``ipc``), not on
TCP ports.

Why: jupyter_client chooses a kernel's five TCP ports by binding port 0 and closing the socket again; the kernel
binds them about a second later. Two processes starting kernels at the same time (two trials of ``hb sweep``, two
``hb run`` commands, two test processes) can be handed the same free port in between, and one kernel dies with
"Address already in use" (papermill#511; jupyter_client's port cache only guards kernels of one process). Socket
files with a unique name per kernel cannot collide. Windows has no ``ipc`` transport, so kernels use TCP there;
``HB_KERNEL_TRANSPORT=tcp`` forces TCP elsewhere too.
"""

from __future__ import annotations

import functools
import os
import tempfile
import uuid
from typing import Any


def transport() -> str:
    """``ipc`` (the default on Linux and macOS) or ``tcp`` (Windows, or HB_KERNEL_TRANSPORT=tcp)."""
    if os.name == "nt" or os.environ.get("HB_KERNEL_TRANSPORT", "ipc").strip().lower() == "tcp":
        return "tcp"
    return "ipc"


def socket_prefix() -> str:
    """A fresh path prefix for one kernel's socket files (``<prefix>-1`` … ``-5``): in the temporary folder, short
    enough for a Unix socket path (about 100 bytes at most)."""
    folder = tempfile.gettempdir()
    if len(folder) > 70:
        folder = "/tmp"
    return os.path.join(folder, f"hbk-{uuid.uuid4().hex[:16]}")


@functools.cache
def manager_class() -> Any:
    """The kernel manager class to give papermill (``kernel_manager_class``)."""
    from jupyter_client import AsyncKernelManager

    if transport() == "tcp":
        return AsyncKernelManager
    from traitlets import default

    class IPCKernelManager(AsyncKernelManager):
        """AsyncKernelManager whose kernels listen on socket files with a unique name (removed at shutdown)."""

        @default("transport")
        def _default_transport(self) -> str:
            return "ipc"

        @default("ip")
        def _default_ip(self) -> str:
            return socket_prefix()

    return IPCKernelManager
