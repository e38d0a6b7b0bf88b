#!/usr/bin/env bash
# Sets everything up, then starts a local mesh on loopback with the bundled model.
# Extra arguments go to the node. Ctrl-C drains and stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export MESH_HOME="${MESH_HOME:-$PWD/.mesh-demo}"
exec .venv/bin/mesh node start --port "${MESH_NODE_PORT:-4001}" "$@"
