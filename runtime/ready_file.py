"""The ready file: a daemon (node or entry) writes `ready.json` into its state directory once
it serves, and removes it when it stops. Whoever started the daemon (the demo, benchmarks,
tests) waits for it: that is how they learn the daemon's addresses and that start-up is over.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FILE_NAME = "ready.json"


def path_in(state_dir: Path) -> Path:
    return Path(state_dir) / FILE_NAME


def write(path: Path, info: dict[str, Any]) -> None:
    """Atomically: readers never see half a file. `pid` is added."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**info, "pid": os.getpid()}))
    tmp.replace(path)


def clear(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def read(path: Path) -> dict[str, Any] | None:
    """The daemon's ready info, or None while it is not (yet) ready."""
    try:
        info: dict[str, Any] = json.loads(path.read_text())
        return info
    except (FileNotFoundError, ValueError):  # ValueError: being replaced
        return None


class _Waiter:
    """One bounded wait for a started daemon: ready, exited, or out of time."""

    def __init__(self, path: Path, proc: subprocess.Popen[Any], limit: float, name: str, log_tail: Callable[[], str]):
        self.path, self.proc, self.name, self.log_tail = path, proc, name, log_tail
        self.limit = limit
        self.deadline = time.monotonic() + limit

    def check(self) -> dict[str, Any] | None:
        info = read(self.path)
        if info is not None:
            return info
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with status {self.proc.returncode}; last log lines:\n{self.log_tail()}")
        if time.monotonic() >= self.deadline:
            raise RuntimeError(f"{self.name} was not ready within {self.limit:.0f} s; last log lines:\n{self.log_tail()}")
        return None


def wait(path: Path, proc: subprocess.Popen[Any], limit: float, *, name: str, log_tail: Callable[[], str],
         poll: float = 0.05) -> dict[str, Any]:
    """Block until the daemon `proc` has written its ready file at `path`; RuntimeError (with
    the end of its log) if it exits first or is not ready within `limit` seconds."""
    w = _Waiter(path, proc, limit, name, log_tail)
    while (info := w.check()) is None:
        time.sleep(poll)
    return info


async def wait_async(path: Path, proc: subprocess.Popen[Any], limit: float, *, name: str, log_tail: Callable[[], str],
                     poll: float = 0.05) -> dict[str, Any]:
    """`wait` for a trio program."""
    import trio

    w = _Waiter(path, proc, limit, name, log_tail)
    while (info := w.check()) is None:
        await trio.sleep(poll)
    return info
