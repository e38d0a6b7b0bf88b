"""API keys for the entry, stored hashed in SQLite.

A key is 256 random bits, so a plain sha256 is enough to store it: there is nothing to
brute-force that a slow password hash would protect. The plaintext is shown once, at
creation. The CLI (`mesh entry keys ...`) and a running entry may share the file: the entry
reads it per request, so a revoked key stops working at once.

An operator key may also do what changes the entry for everyone (start a benchmark, which
spends mesh capacity and refits the router every `auto` request uses); a plain key may only
ask for completions and read.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sqlite3
import time
from dataclasses import dataclass, replace
from pathlib import Path

KEY_PREFIX = "mesh-"
MAX_KEY_LEN = 256  # longer bearer strings are rejected before hashing

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    hint TEXT NOT NULL,
    rpm INTEGER,
    tpm INTEGER,
    created REAL NOT NULL,
    revoked REAL,
    operator INTEGER NOT NULL DEFAULT 0
)
"""
_COLUMNS = "id, name, hint, rpm, tpm, created, revoked, operator"


class ApiKeyError(Exception):
    """A key operation that cannot be done (bad limits, no such key)."""


@dataclass(frozen=True)
class KeyInfo:
    id: int
    name: str
    hint: str  # the first characters of the key, to tell keys apart in listings
    rpm: int | None
    tpm: int | None
    created: float
    revoked: float | None = None
    operator: bool = False

    @property
    def active(self) -> bool:
        return self.revoked is None


def default_keys_path() -> Path:
    base = Path(os.environ.get("MESH_HOME", Path.home() / ".mesh"))
    return base / "entry" / "keys.db"


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class ApiKeyStore:
    def __init__(self, path: str | os.PathLike[str], *, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise ApiKeyError(f"no key database at {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            # Created 0600 before SQLite opens it, so it is never readable by others.
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        # One connection, used from the event-loop thread only; the timeout covers the CLI
        # writing while the entry reads.
        self._db = sqlite3.connect(self.path, timeout=2.0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        # Files made before operator keys existed gain the column; every old key stays a
        # plain key.
        if "operator" not in {row[1] for row in self._db.execute("PRAGMA table_info(api_keys)")}:
            self._db.execute("ALTER TABLE api_keys ADD COLUMN operator INTEGER NOT NULL DEFAULT 0")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ApiKeyStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def create(self, name: str, *, rpm: int | None = None, tpm: int | None = None,
               operator: bool = False) -> tuple[KeyInfo, str]:
        """A new key: (its record, the plaintext). The plaintext is not stored anywhere."""
        name = name.strip()
        if not name or len(name) > 100:
            raise ApiKeyError("a key needs a name of 1-100 characters")
        for label, v in (("requests per minute", rpm), ("tokens per minute", tpm)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ApiKeyError(f"{label} must be a positive integer")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        cur = self._db.execute(
            "INSERT INTO api_keys (name, hash, hint, rpm, tpm, created, operator) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (name, _hash(key), key[: len(KEY_PREFIX) + 4], rpm, tpm, now, int(operator)),
        )
        return KeyInfo(cur.lastrowid, name, key[: len(KEY_PREFIX) + 4], rpm, tpm, now, None, operator), key

    def list(self, *, include_revoked: bool = True) -> list[KeyInfo]:
        sql = f"SELECT {_COLUMNS} FROM api_keys"
        if not include_revoked:
            sql += " WHERE revoked IS NULL"
        return [_info(row) for row in self._db.execute(sql + " ORDER BY id")]

    def revoke(self, key_id: int) -> KeyInfo:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        if row is None:
            raise ApiKeyError(f"no key with id {key_id}")
        info = _info(row)
        if info.revoked is None:
            now = time.time()
            self._db.execute("UPDATE api_keys SET revoked = ? WHERE id = ?", (now, key_id))
            info = replace(info, revoked=now)
        return info

    def verify(self, presented: str) -> KeyInfo | None:
        """The active key matching `presented`, or None."""
        if not presented or len(presented) > MAX_KEY_LEN:
            return None
        digest = _hash(presented)
        row = self._db.execute(
            f"SELECT {_COLUMNS}, hash FROM api_keys WHERE hash = ?", (digest,)
        ).fetchone()
        # The lookup is by a hash of the secret, which leaks nothing through timing; the
        # constant-time compare guards against an index that matched loosely.
        if row is None or not hmac.compare_digest(row[8], digest) or row[6] is not None:
            return None
        return _info(row[:8])


def _info(row: tuple) -> KeyInfo:
    return KeyInfo(*row[:7], bool(row[7]))
