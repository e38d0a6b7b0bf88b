"""`mesh entry keys create|list|revoke`: manage the entry's API keys."""

from __future__ import annotations

import argparse
import json
import sqlite3
import time


def add_keys_parser(subparsers) -> None:
    p = subparsers.add_parser("keys", help="create, list or revoke API keys for the entry's API",
                              description="Manage API keys. Keys are stored hashed: the plaintext is printed once, at creation.")
    ks = p.add_subparsers(dest="entry_keys_cmd", required=True, metavar="COMMAND")

    def db_arg(sp) -> None:
        sp.add_argument("--db", help="key database (default: ~/.mesh/entry/keys.db, or $MESH_HOME/entry/keys.db)")

    c = ks.add_parser("create", help="create a key and print it once", description="Create an API key and print it (only this once).")
    c.add_argument("--name", required=True, help="what the key is for, e.g. who holds it")
    c.add_argument("--rpm", type=_positive_int, help="requests per minute allowed (default: the entry's default limit)")
    c.add_argument("--tpm", type=_positive_int, help="tokens per minute allowed, prompt + completion (default: the entry's default limit)")
    c.add_argument("--operator", action="store_true",
                   help="an operator key: may also start benchmarks (`mesh entry benchmark`), which refit routing for everyone")
    db_arg(c)
    c.set_defaults(func=cmd_create)

    ls = ks.add_parser("list", help="list keys (never their plaintext)", description="List API keys: id, name, first characters, limits, state.")
    ls.add_argument("--json", action="store_true", help="print JSON")
    db_arg(ls)
    ls.set_defaults(func=cmd_list)

    r = ks.add_parser("revoke", help="revoke a key by id", description="Revoke an API key; a running entry rejects it from the next request on.")
    r.add_argument("id", type=_positive_int, help="key id, as shown by `list`")
    db_arg(r)
    r.set_defaults(func=cmd_revoke)


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return v


def _open(args, create: bool):
    from entry.api.apikeys import ApiKeyError, ApiKeyStore, default_keys_path
    from runtime.errors import CliError

    path = args.db or default_keys_path()
    try:
        return ApiKeyStore(path, create=create)
    except ApiKeyError as e:
        raise CliError(f"{e} (create a key first, or pass --db)") from None
    except (OSError, sqlite3.Error) as e:
        raise CliError(f"cannot open key database {path}: {e}") from None


def _run(args, action, create: bool = False):
    from entry.api.apikeys import ApiKeyError
    from runtime.errors import CliError

    # Only `create` makes a database: a typo in --db for list/revoke must not look like "no keys".
    store = _open(args, create)
    try:
        return action(store)
    except ApiKeyError as e:
        raise CliError(str(e)) from None
    except sqlite3.Error as e:
        raise CliError(f"key database {store.path}: {e}") from None
    finally:
        store.close()


def _limit(v) -> str:
    return "default" if v is None else str(v)


def cmd_create(args: argparse.Namespace) -> int:
    def action(store):
        info, key = store.create(args.name, rpm=args.rpm, tpm=args.tpm, operator=args.operator)
        kind = "operator key" if info.operator else "key"
        print(f"created {kind} {info.id} ({info.name}); requests/min: {_limit(info.rpm)}, tokens/min: {_limit(info.tpm)}")
        print("store it now, it is not shown again:")
        print(key)
        return 0

    return _run(args, action, create=True)


def cmd_list(args: argparse.Namespace) -> int:
    def action(store):
        keys = store.list()
        if args.json:
            print(json.dumps([{"id": k.id, "name": k.name, "hint": k.hint, "rpm": k.rpm, "tpm": k.tpm,
                               "created": k.created, "revoked": k.revoked, "operator": k.operator} for k in keys], indent=2))
            return 0
        if not keys:
            print("no keys")
            return 0
        rows = [("ID", "NAME", "KEY", "ROLE", "RPM", "TPM", "CREATED", "STATE")]
        for k in keys:
            rows.append((str(k.id), k.name, k.hint + "…", "operator" if k.operator else "user", _limit(k.rpm), _limit(k.tpm),
                         time.strftime("%Y-%m-%d %H:%M", time.localtime(k.created)),
                         "active" if k.active else "revoked " + time.strftime("%Y-%m-%d %H:%M", time.localtime(k.revoked))))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        return 0

    return _run(args, action)


def cmd_revoke(args: argparse.Namespace) -> int:
    def action(store):
        info = store.revoke(args.id)
        print(f"revoked key {info.id} ({info.name})")
        return 0

    return _run(args, action)
