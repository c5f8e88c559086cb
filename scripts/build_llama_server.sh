#!/usr/bin/env bash
# Build llama.cpp's llama-server, the CPU peer for the W2 serving benchmark
# (see /work/shared/benchmarks.md). The binary lives OUTSIDE the repo, in a cache
# directory, so it is never committed; this script is idempotent: it does nothing
# when the binary is already there.
#
# Why the llama-cpp-python sdist: it vendors a pinned llama.cpp (including
# tools/server) and is reachable through PyPI, the only source registry we can use.
#
# Usage: scripts/build_llama_server.sh            -> prints the binary's path
# Env:   KVPORT_PEERS_DIR (default ~/.cache/kvport-peers), JOBS (default 2)
set -euo pipefail

DEST_DIR="${KVPORT_PEERS_DIR:-$HOME/.cache/kvport-peers}"
BIN="$DEST_DIR/llama-server"
JOBS="${JOBS:-2}"   # the machines are shared: keep the build at -j2

if [[ -x "$BIN" ]]; then
    echo "$BIN"
    exit 0
fi

mkdir -p "$DEST_DIR"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/llama-server-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

cd "$WORK"
python -m pip download --no-deps --no-binary :all: llama-cpp-python -d . >&2
tar xzf llama_cpp_python-*.tar.gz
cd llama_cpp_python-*/vendor/llama.cpp

# LLAMA_CURL=OFF: no libcurl needed (we never download models from the server);
# GGML_NATIVE=ON: use this CPU's full ISA (AVX512 etc.), as a fair peer should;
# BUILD_SHARED_LIBS=OFF: one self-contained binary that still runs once the temp
# build tree is gone (a shared build's rpath would point into it).
cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
      -DBUILD_SHARED_LIBS=OFF >&2
cmake --build build --target llama-server -j"$JOBS" >&2

cp build/bin/llama-server "$BIN.tmp"
mv "$BIN.tmp" "$BIN"   # atomic: a half-copied binary never looks "built"
echo "$BIN"
