#!/usr/bin/env bash
# kvport's GPU checks and benchmarks in one go, for a lent GPU machine (the device tool) or
# any CUDA machine. Stages run in this order; name some to run only those:
#   tests      tests/gpu + the Triton/CUDA/ROCm plugin tests, compiled on the GPU (pytest -n 8)
#   server     the OpenAI server suite against `kvport serve --device cuda`; its packages
#              (fastapi, pydantic, uvicorn, openai, ...) come as wheels from .whl when there
#   kit        the conformance kit (kvport.testing) against the cuda platform
#   bandwidth  decode attention bandwidth vs copy bandwidth; prefill attention rate
#   sweep      sweep decode launch settings at W1's decode shape (bandwidth_w1.log)
#   w1         W1 throughput (kvport), with the ceilings and the roofline ratio
#   peer       add transformers' continuous batching to w1, in the same run (~3 minutes)
#   profile    add a kernel-time profile of a short run to w1
#   compare    add a run of kvport without async scheduling to w1 (for the record)
#   jax        W1 through kvport-tpu's JAX worker (--device xla, jax with CUDA) on w1's model
#   tp         two or more GPUs: the fused-kernel tests, then tensor parallelism (tp_check.py:
#              TP=2 against TP=1 on a Llama-3.1-8B-shaped model, agreement and W1); extra
#              tp_check.py flags in $KVPORT_TP_ARGS, its deadline in $KVPORT_TP_DEADLINE
# Results go to $OUT (default /tmp/kvport-gpu-check): tests.log, gpu_report.json,
# bandwidth.json, w1.json and the logs. The W1 peer and roofline need copies of
# ../shared/tools/peers_gpu.py and roofline.py in $KVPORT_GPU_TOOLS (default .gpu_tools, a
# git-ignored folder the device tool carries).
#   bash scripts/gpu_check.sh                  # everything
#   bash scripts/gpu_check.sh tests bandwidth  # no W1
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/kvport-gpu-check}"
TOOLS="${KVPORT_GPU_TOOLS:-.gpu_tools}"
PY="${PYTHON:-python3}"
REPORT=/tmp/kvport-gpu-report
export PYTHONUNBUFFERED=1 KVPORT_GPU_REPORT_DIR="$REPORT"
mkdir -p "$OUT"
rm -rf "$REPORT"
stages=" ${*:-tests server kit bandwidth sweep w1 peer} "
has() { [[ "$stages" == *" $1 "* ]]; }
failed=""
run() {   # run NAME COMMAND...: log to $OUT/NAME.log, remember a failure, go on
    local name=$1; shift
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || failed="$failed $name($rc)"
}

# kvport and the two GPU plugins, editable and without dependencies (the GPU machine has no
# package index; everything they need is there). Their entry points make them discoverable.
$PY -m pip install -q --no-deps --no-build-isolation --no-index -e . -e plugins/kvport-cuda \
    -e plugins/kvport-rocm 2>&1 | grep -v "^WARNING: Running pip as" || true
if ! $PY -c "import kvport_cuda, kvport_rocm, importlib.metadata as m; \
        assert {'cuda', 'rocm'} <= {e.name for e in m.entry_points(group='kvport')}"; then
    # No editable install (e.g. no setuptools there): the sources on PYTHONPATH, and
    # hand-written dist-info folders so importlib.metadata finds the entry points.
    site=/tmp/kvport-site
    for dist in kvport:kvport.testing.pytest_plugin kvport_cuda:kvport_cuda.plugin \
                kvport_rocm:kvport_rocm.plugin; do
        name=${dist%%:*}; info="$site/$name-0.1.0.dist-info"
        mkdir -p "$info"
        printf 'Metadata-Version: 2.1\nName: %s\nVersion: 0.1.0\n' "${name//_/-}" > "$info/METADATA"
        case $name in
            kvport) printf '[pytest11]\nkvport = %s\n' "${dist#*:}" ;;
            *) printf '[kvport]\n%s = %s\n' "${name#kvport_}" "${dist#*:}" ;;
        esac > "$info/entry_points.txt"
    done
    export PYTHONPATH="$PWD:$PWD/plugins/kvport-cuda:$PWD/plugins/kvport-rocm:$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "editable install failed: running from the sources ($site holds the entry points)"
fi
$PY - <<'EOF'
import torch, triton, transformers
print(f"torch {torch.__version__}, triton {triton.__version__}, transformers "
      f"{transformers.__version__}, {torch.cuda.get_device_name()}")
from kvport.platforms.registry import PluginRegistry
registry = PluginRegistry()
for reg in registry.platforms():
    print(f"platform {reg.name}: {registry.availability(reg)}")
EOF

if has tests; then
    run tests $PY -m pytest -q -p no:cacheprovider -n 8 --dist load --durations=10 \
        tests/gpu tests/test_triton_paged.py tests/test_cuda_platform.py \
        tests/test_cuda_platform_runner.py tests/test_cuda_fused_elementwise.py \
        tests/test_fast_all_reduce.py tests/test_rocm_platform.py
    $PY - "$REPORT" "$OUT/gpu_report.json" <<'EOF'
import glob, json, os, sys
folder, target = sys.argv[1:]
cases, e2e = [], {}
for path in sorted(glob.glob(os.path.join(folder, "kernel_errors_*.json"))):
    cases += json.load(open(path))["cases"]
for path in sorted(glob.glob(os.path.join(folder, "e2e_*.json"))):
    e2e[os.path.basename(path)[4:-5]] = json.load(open(path))
json.dump({"kernel_cases": cases, "e2e": e2e}, open(target, "w"), indent=1)
for dtype in sorted({c["dtype"] for c in cases}):
    rows = [c for c in cases if c["dtype"] == dtype]
    worst = max(rows, key=lambda c: c["rel_err"])
    print(f"kernel grid {dtype}: {len(rows)} cases, worst relative error {worst['rel_err']:.2e}"
          f" ({worst['case']}, head {worst['head_size']}, GQA {worst['group']}, block "
          f"{worst['block_size']})")
for name, value in e2e.items():
    print(f"e2e {name}: {value}")
EOF
fi
if has server; then
    if [ -d .whl ]; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/kvport-wheels .whl/*.whl
        export PYTHONPATH="/tmp/kvport-wheels${PYTHONPATH:+:$PYTHONPATH}"
    fi
    run server $PY -m pytest -q -p no:cacheprovider -x tests/gpu/test_cuda_server_openai.py
fi
if has kit; then
    run kit timeout 300 $PY -m pytest -q -p no:cacheprovider --kvport-device cuda
fi
if has bandwidth; then
    sweep=(); has sweep && sweep=(--sweep)
    run bandwidth $PY plugins/kvport-cuda/bench/decode_bandwidth.py \
        --json "$OUT/bandwidth.json"
    # W1's decode shape (batch 256, head size 64, ragged contexts around 600), with the sweep
    run bandwidth_w1 $PY plugins/kvport-cuda/bench/decode_bandwidth.py "${sweep[@]}" \
        --batch 256 --context 600 --spread 0.8 --head-size 64 --no-prefill
fi
if has w1; then
    args=(--json "$OUT/w1.json")
    [ -f "$TOOLS/peers_gpu.py" ] && args+=(--tools "$TOOLS")
    has peer && args+=(--peer)
    has profile && args+=(--profile)
    has compare && args+=(--compare-sync)
    run w1 $PY plugins/kvport-cuda/bench/w1.py "${args[@]}"
fi
if has jax; then
    $PY -m pip install -q --no-deps --no-build-isolation --no-index -e plugins/kvport-tpu \
        2>&1 | grep -v "^WARNING: Running pip as" || true
    [ -d /tmp/kvport-w1-llama ] || $PY plugins/kvport-tpu/bench/gpu_check.py build \
        /tmp/kvport-w1-llama
    run jax_w1 $PY plugins/kvport-tpu/bench/gpu_check.py w1 /tmp/kvport-w1-llama \
        --deadline "${KVPORT_JAX_DEADLINE:-240}" --json "$OUT/jax_w1.json"
fi
if has tp; then
    run tp_kernels $PY -m pytest -q -p no:cacheprovider -x tests/test_cuda_fused_elementwise.py \
        tests/test_fast_all_reduce.py tests/test_cuda_fused_tp_layers.py
    # the fused all-reduce + norm on every GPU pair: checked (exit 1 if wrong; a hang ends
    # at the timeout) before any engine relies on it
    run tp_fused_norm timeout 300 $PY plugins/kvport-cuda/bench/all_reduce.py --fused-norm-only \
        --json "$OUT/fused_norm.json"
    if [[ "$failed" != *tp_kernels* && "$failed" != *tp_fused_norm* ]]; then
        # shellcheck disable=SC2086  # KVPORT_TP_ARGS is a list of flags
        run tp $PY plugins/kvport-cuda/bench/tp_check.py --json "$OUT/tp_check.json" \
            --deadline "${KVPORT_TP_DEADLINE:-420}" ${KVPORT_TP_ARGS:-}
    fi
fi
echo "=== done; failed stages:${failed:- none}"
[ -z "$failed" ]
