"""Local control socket: how `mesh node status` and `mesh node stop` reach a running daemon.

A Unix socket in the node's state directory (mode 0600, so only the volunteer's own user can
stop their node), one JSON request line, one JSON answer line.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

MAX_LINE = 4096


class ControlError(Exception):
    pass


async def serve_control(path: Path, handler: Callable[[dict], Awaitable[dict]], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        if _is_live(path):
            raise ControlError(f"another node is already running with state directory {path.parent}")
        path.unlink()  # left behind by a node that crashed
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        task_status.started()

        async def serve_one(stream: trio.SocketStream) -> None:
            async with stream:
                with trio.move_on_after(10):
                    buf = b""
                    while b"\n" not in buf and len(buf) < MAX_LINE:
                        chunk = await stream.receive_some(MAX_LINE)
                        if not chunk:
                            return
                        buf += chunk
                    try:
                        request = json.loads(buf.split(b"\n", 1)[0])
                        if not isinstance(request, dict):
                            raise ValueError
                        answer = await handler(request)
                    except ValueError:
                        answer = {"ok": False, "error": "malformed control request"}
                    await stream.send_all(json.dumps(answer).encode() + b"\n")

        await trio.serve_listeners(serve_one, [listener])
    finally:
        sock.close()
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _is_live(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            s.connect(str(path))
        return True
    except OSError:
        return False


def call(path: Path, request: dict, timeout: float = 10.0) -> dict:
    """Blocking client used by the CLI."""
    if not path.exists():
        raise ControlError(f"no node is running with state directory {path.parent} (no {path.name})")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(json.dumps(request).encode() + b"\n")
            buf = b""
            while b"\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except (ConnectionRefusedError, FileNotFoundError):
        raise ControlError(f"no node is running with state directory {path.parent} (stale socket)") from None
    except OSError as e:
        raise ControlError(f"cannot reach the node's control socket {path}: {e}") from None
    try:
        return json.loads(buf.split(b"\n", 1)[0])
    except ValueError:
        raise ControlError("the node sent a malformed control answer") from None
