"""The API key store: hashed keys in SQLite, create/list/revoke."""

from __future__ import annotations

import os
import stat

import pytest

from entry.api.apikeys import ApiKeyError, ApiKeyStore


def test_keys_are_stored_hashed_and_verified(tmp_path):
    path = tmp_path / "sub" / "keys.db"
    with ApiKeyStore(path) as store:
        info, key = store.create("ops laptop", rpm=60, tpm=1000)
        assert key.startswith("mesh-") and len(key) > 40
        assert info.hint == key[:9] and (info.rpm, info.tpm) == (60, 1000)
        assert store.verify(key) == info
        assert store.verify(key + "x") is None
        assert store.verify("") is None
        assert store.verify("x" * 10_000) is None
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("sub/keys.db*"))
    assert key.encode() not in raw and key[9:].encode() not in raw


def test_keys_list_and_revoke_are_seen_by_another_connection(tmp_path):
    path = tmp_path / "keys.db"
    running = ApiKeyStore(path)  # as the entry holds it
    with ApiKeyStore(path) as cli:  # as `mesh entry keys` opens it
        a, key_a = cli.create("a")
        b, _ = cli.create("b")
        assert running.verify(key_a) is not None
        cli.revoke(a.id)
        assert cli.revoke(a.id).revoked is not None  # revoking twice is harmless
        with pytest.raises(ApiKeyError, match="no key with id 99"):
            cli.revoke(99)
        listed = cli.list()
    assert [k.name for k in listed] == ["a", "b"]
    assert not listed[0].active and listed[1].active
    assert running.verify(key_a) is None
    assert [k.id for k in running.list(include_revoked=False)] == [b.id]
    running.close()


@pytest.mark.parametrize(("name", "kw"), [("", {}), ("x" * 101, {}), ("ok", {"rpm": 0}), ("ok", {"tpm": -5})])
def test_key_create_rejects_bad_input(tmp_path, name, kw):
    with ApiKeyStore(tmp_path / "k.db") as store, pytest.raises(ApiKeyError):
        store.create(name, **kw)
