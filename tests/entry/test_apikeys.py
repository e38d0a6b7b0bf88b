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


def test_operator_keys_and_a_file_from_before_they_existed(tmp_path):
    import sqlite3

    path = tmp_path / "keys.db"
    old = sqlite3.connect(path)  # the schema as it was before operator keys
    old.execute("CREATE TABLE api_keys (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, hash TEXT NOT NULL"
                " UNIQUE, hint TEXT NOT NULL, rpm INTEGER, tpm INTEGER, created REAL NOT NULL, revoked REAL)")
    old.execute("INSERT INTO api_keys (name, hash, hint, created) VALUES ('old', 'h', 'mesh-abcd', 1.0)")
    old.commit()
    old.close()
    with ApiKeyStore(path) as store:
        (legacy,) = store.list()
        assert legacy.name == "old" and not legacy.operator
        op, op_key = store.create("ops", operator=True)
        plain, plain_key = store.create("user")
        assert store.verify(op_key).operator and not store.verify(plain_key).operator
        assert store.revoke(op.id).operator
    with ApiKeyStore(path) as again:  # the column is added once, not again
        assert [k.operator for k in again.list()] == [False, True, False]
