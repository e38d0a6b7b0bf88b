"""`mesh` starts fast: building its parser (every command does) must not import the heavy
libraries only some commands need. scikit-learn alone took 25-45 s to import on a loaded
2-core machine, which made `mesh node status` time out."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("sklearn", "scipy", "llama_cpp", "libp2p", "starlette", "hypercorn")


def test_building_the_cli_parser_imports_no_heavy_library():
    code = ("import sys; from mesh_cli.main import build_parser; build_parser(); "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "", f"imported while building the parser: {out.stdout.strip()}"
