#!/usr/bin/env bash
# Sets everything up, then runs a local mesh on loopback: an entry (web chat + OpenAI API on
# http://127.0.0.1:8000) and one node per bundled model (SmolLM2-135M-Instruct, Gemma 3 270M).
# Extra arguments go to `mesh demo` (e.g. --port 8080). Ctrl-C drains the nodes and stops
# everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MESH_HOME="${MESH_HOME:-$PWD/.mesh-demo}"
exec .venv/bin/mesh demo "$@"
