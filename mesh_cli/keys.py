"""`mesh keys`: create and show the Ed25519 identity a node or entry signs with."""

from __future__ import annotations

import argparse

from protocol.identity import Identity, default_identity_path


def add_parser(sub) -> None:
    p = sub.add_parser("keys", help="create or show an identity key (Ed25519, also the libp2p peer id)",
                       description="Manage the Ed25519 identity that signs adverts and receipts. Its public half is the libp2p peer id.")
    ks = p.add_subparsers(dest="keys_cmd", required=True, metavar="COMMAND")
    for name, help_text in (("show", "print the peer id and public key of an identity file"),
                            ("create", "create an identity file (mode 0600) unless it exists")):
        sp = ks.add_parser(name, help=help_text, description=help_text)
        sp.add_argument("--role", choices=("node", "entry"), default="node", help="which default identity file (~/.mesh/ROLE.key, or $MESH_HOME/ROLE.key)")
        sp.add_argument("--file", help="identity file path (overrides --role)")
        sp.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = args.file or default_identity_path(args.role)
    if args.keys_cmd == "create":
        existed = __import__("pathlib").Path(path).exists()
        ident = Identity.load_or_create(path)
        print(f"{'exists' if existed else 'created'}: {path}")
    else:
        ident = Identity.load(path)
    print(f"peer id:    {ident.peer_id}")
    print(f"public key: {ident.public_key.hex()}")
    return 0
