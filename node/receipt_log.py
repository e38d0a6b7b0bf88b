"""The receipts a node signed, kept by the node itself (STATE_DIR/receipts.log).

An entry's credit statement is only worth what the node can check it against: every receipt
it signed names the request, the entry and the exact token count. One receipt per line,
base64 of the signed blob, appended and flushed as the receipt is made, so a crash loses at
most the line being written (a torn last line is skipped when reading).
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from protocol.errors import RecordError
from protocol.records import WorkReceipt, _open, _typed

FILE_NAME = "receipts.log"


class ReceiptLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, blob: bytes) -> None:
        """NodeService's on_receipt hook."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, base64.b64encode(blob) + b"\n")
        finally:
            os.close(fd)

    def receipts(self) -> list[WorkReceipt]:
        """Every well-formed receipt signed by its node, oldest first."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_bytes().splitlines():
            try:
                blob = base64.b64decode(line, validate=True)
                out.append(WorkReceipt(**_typed(_open(blob, WorkReceipt.KIND), WorkReceipt._SPEC)))
            except (binascii.Error, ValueError, RecordError):
                continue  # a torn or foreign line
        return out
