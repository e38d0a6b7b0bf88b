"""The seed a node sees is not the user's.

A user-chosen `seed` sent verbatim would let nodes link requests: a user who always sends
seed=31337 is recognisable across requests, and across entries. So the entry replaces it with
HMAC-SHA256(entry secret, subject || seed) truncated to 63 bits, where subject is the API key's
id (or the one shared open-mode subject). The same user with the same seed still gets the same
node-side seed (same output on a greedy-equal mesh), while two users' seeds, or the same user's
seeds at two entries, are unrelated for a node that does not know the secret.

The secret is kept in the entry's state directory (`seed.key`, mode 0600) so that a restart
keeps users' seeded requests reproducible.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Callable
from pathlib import Path

SECRET_BYTES = 32
_SEED_BITS = 63  # SamplingParams.seed is in [0, 2**63)


class SeedMixer:
    def __init__(self, secret: bytes):
        if len(secret) != SECRET_BYTES:
            raise ValueError(f"a seed secret has {SECRET_BYTES} bytes")
        self._secret = secret

    @classmethod
    def random(cls) -> SeedMixer:
        """A secret for this process only (tests, or an entry without a state directory)."""
        return cls(secrets.token_bytes(SECRET_BYTES))

    @classmethod
    def load_or_create(cls, path: str | os.PathLike) -> SeedMixer:
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = _create(path)
        if len(data) != SECRET_BYTES:
            # OSError: the daemon reports it as one line, like an unreadable identity file.
            raise OSError(f"{path} is not a seed secret ({len(data)} bytes, expected {SECRET_BYTES}); "
                          "delete it to make a new one (seeded requests then give other outputs)")
        return cls(data)

    def mix(self, subject: str, seed: int) -> int:
        mac = hmac.new(self._secret, subject.encode() + b"\x00" + str(seed).encode(), hashlib.sha256).digest()
        return int.from_bytes(mac[:8], "big") >> (64 - _SEED_BITS)

    def for_subject(self, subject: str) -> Callable[[int], int]:
        return lambda seed: self.mix(subject, seed)


def _create(path: Path) -> bytes:
    """Write a fresh secret at `path` atomically: a crash leaves no partial file, and of two
    entries starting on one state directory the second reads the first one's secret."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = secrets.token_bytes(SECRET_BYTES)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(fresh)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if it exists, unlike a rename
        except FileExistsError:
            return path.read_bytes()
    finally:
        tmp.unlink(missing_ok=True)
    return fresh
