"""Ed25519 identities: one key signs our records and is the libp2p peer identity.

The key file holds the 32-byte seed in hex with a header line, mode 0600. The libp2p peer id
is derived from the same public key, so a record's signer and the peer that streams it are
provably the same party.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import nacl.exceptions
import nacl.signing

from protocol.errors import IdentityError

if TYPE_CHECKING:
    from libp2p.crypto.keys import KeyPair

_HEADER = "mesh-ed25519-seed-v1"


@dataclass(frozen=True)
class Identity:
    signing_key: nacl.signing.SigningKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        if len(seed) != 32:
            raise IdentityError("an Ed25519 seed is 32 bytes")
        return cls(nacl.signing.SigningKey(seed))

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def peer_id(self) -> str:
        """The libp2p peer id (base58) of this key: what other peers see us as."""
        return peer_id_from_public_key(self.public_key)

    def sign(self, message: bytes) -> bytes:
        return self.signing_key.sign(message).signature

    def libp2p_keypair(self) -> KeyPair:
        from libp2p.crypto.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
        from libp2p.crypto.keys import KeyPair

        return KeyPair(Ed25519PrivateKey(self.signing_key), Ed25519PublicKey(self.signing_key.verify_key))

    def save(self, path: str | os.PathLike[str]) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Create with 0600 from the start: a chmod after writing leaves a window where the
        # secret is readable by others.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{_HEADER}\n{bytes(self.signing_key).hex()}\n")
        os.chmod(path, 0o600)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        path = Path(path)
        try:
            st = path.stat()
            text = path.read_text()
        except OSError as e:
            raise IdentityError(f"cannot read identity file {path}: {e.strerror}") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise IdentityError(
                f"identity file {path} is readable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
                f"run: chmod 600 {path}"
            )
        lines = text.split()
        if len(lines) != 2 or lines[0] != _HEADER:
            raise IdentityError(f"identity file {path} is not a mesh identity file")
        try:
            seed = bytes.fromhex(lines[1])
        except ValueError:
            raise IdentityError(f"identity file {path} holds a malformed key") from None
        return cls.from_seed(seed)

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        if Path(path).exists():
            return cls.load(path)
        ident = cls.generate()
        ident.save(path)
        return ident


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, nacl.exceptions.TypeError, ValueError, TypeError):
        return False
    return True


def peer_id_from_public_key(public_key: bytes) -> str:
    from libp2p.crypto.ed25519 import Ed25519PublicKey
    from libp2p.peer.id import ID

    return ID.from_pubkey(Ed25519PublicKey.from_bytes(public_key)).to_base58()


def public_key_from_peer_id(peer_id: str) -> bytes:
    """Ed25519 peer ids embed the key (identity multihash): recover it to check signatures."""
    from libp2p.peer.id import ID

    try:
        key = ID.from_base58(peer_id).extract_public_key()
    except Exception:
        key = None
    if key is None or len(key.to_bytes()) != 32:
        raise IdentityError(f"peer id {peer_id!r} does not embed an Ed25519 key")
    return key.to_bytes()


def default_identity_path(role: str) -> Path:
    base = Path(os.environ.get("MESH_HOME", Path.home() / ".mesh"))
    return base / f"{role}.key"
