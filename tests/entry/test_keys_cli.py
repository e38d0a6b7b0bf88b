"""`mesh entry keys`: create, list, revoke from the command line."""

from __future__ import annotations

import argparse

import pytest

from entry.api.keys_cli import add_keys_parser
from runtime.errors import CliError


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mesh entry")
    add_keys_parser(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_keys_cli_create_list_revoke(tmp_path, capsys):
    db = str(tmp_path / "keys.db")
    assert run_cli(["keys", "create", "--name", "alice", "--rpm", "30", "--db", db]) == 0
    out = capsys.readouterr().out
    key = out.strip().splitlines()[-1]
    assert key.startswith("mesh-")
    assert "created key 1 (alice)" in out and "requests/min: 30" in out

    assert run_cli(["keys", "list", "--db", db]) == 0
    listing = capsys.readouterr().out
    assert "alice" in listing and "active" in listing and key not in listing

    assert run_cli(["keys", "revoke", "1", "--db", db]) == 0
    assert "revoked key 1" in capsys.readouterr().out
    assert run_cli(["keys", "list", "--json", "--db", db]) == 0
    assert '"revoked": null' not in capsys.readouterr().out

    with pytest.raises(CliError, match="no key with id 7"):
        run_cli(["keys", "revoke", "7", "--db", db])
    with pytest.raises(SystemExit):
        run_cli(["keys", "create", "--name", "x", "--rpm", "0", "--db", db])
    with pytest.raises(CliError, match="no key database at"):
        run_cli(["keys", "list", "--db", str(tmp_path / "typo.db")])
    assert not (tmp_path / "typo.db").exists()
    with pytest.raises(CliError, match="cannot open key database"):
        run_cli(["keys", "create", "--name", "x", "--db", str(tmp_path)])  # a directory


def test_keys_cli_default_path_follows_mesh_home(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MESH_HOME", str(tmp_path))
    assert run_cli(["keys", "create", "--name", "bob"]) == 0
    assert (tmp_path / "entry" / "keys.db").exists()
