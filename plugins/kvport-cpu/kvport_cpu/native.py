"""The CPU plugin's native kernels (csrc/*.cpp), compiled on first use.

`torch.utils.cpp_extension.load` builds them with the local C++ compiler and ninja into
torch's extension directory (~/.cache/torch_extensions unless TORCH_EXTENSIONS_DIR says
otherwise) and reuses that build while the source and flags are unchanged. Nothing is built
at import: the first `paged_decode_op()` call builds (tens of seconds) or loads (well under a
second) the library. It never raises; it returns the op or None with the reason, so a missing
compiler or a failed build leaves the caller on its pure-torch path with a message to show.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import shutil
import threading
from dataclasses import dataclass
from typing import Callable

logger = logging.getLogger(__name__)

_CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")


@dataclass(frozen=True)
class NativeOp:
    """A native op and its out= variant, or why there is none (`op` is None and `reason`
    says why)."""
    op: Callable | None
    out: Callable | None = None
    reason: str = ""


_lock = threading.Lock()
_built: dict[str, str | None] = {}   # source -> None (loaded) or why not, once per process


def paged_decode_op() -> NativeOp:
    """csrc/paged_decode.cpp, building it on the first call in this process:

    op:  torch.ops.kvport_cpu.paged_decode(q, kv_cache, block_table, seq_lens, scale,
         sliding_window=None) -> out
    out: torch.ops.kvport_cpu.paged_decode_out(out, q, kv_cache, block_table, seq_lens,
         scale, sliding_window=None), writing every element of `out`

    q and out [num_reqs, num_heads, head_size] float32; kv_cache [2, num_blocks, block_size,
    num_kv_heads, head_size] float32/bfloat16/float16; block_table [num_reqs, max_blocks] and
    seq_lens [num_reqs] integers. Request i's one query is at position seq_lens[i] - 1.
    """
    return _load("paged_decode", lambda torch: (torch.ops.kvport_cpu.paged_decode,
                                                torch.ops.kvport_cpu.paged_decode_out))


def int8_row_ops() -> NativeOp:
    """csrc/int8_rows.cpp, the element-wise halves of the W8A8 int8 linear layer:

    op:  torch.ops.kvport_cpu_int8.quantize_rows(x [M, K] float32) -> (q int8, scale [M, 1])
    out: torch.ops.kvport_cpu_int8.rescale_rows(acc [M, N] int32, scale [M, 1],
         weight_scale [N], bias [N] or None) -> [M, N] float32

    Both bit-identical to the torch ops they replace (kvport/models/quantization.py).
    """
    return _load("int8_rows", lambda torch: (torch.ops.kvport_cpu_int8.quantize_rows,
                                             torch.ops.kvport_cpu_int8.rescale_rows))


def int8_linear_op() -> NativeOp:
    """csrc/int8_rows.cpp's whole int8 linear layer in one call:

    op:  torch.ops.kvport_cpu_int8.int8_linear(x [M, K] float32, qweight [N, K] int8,
         weight_scale [N] float32, bias [N] or None) -> [M, N] float32

    bit-identical to Int8DynamicLinear's torch ops; a few rows (decode) stream the weights
    through csrc/int8_linear.h's VNNI kernel, more go through torch._int_mm.
    """
    return _load("int8_rows", lambda torch: (torch.ops.kvport_cpu_int8.int8_linear,))


def llama_decoder_class() -> NativeOp:
    """csrc/llama_decode.cpp: op = torch.classes.kvport_cpu_llama.LlamaDecoder, a whole
    decode step of a Llama-family model in one call (kvport_cpu/native_decoder.py builds it
    from a loaded model)."""
    return _load("llama_decode", lambda torch: (torch.classes.kvport_cpu_llama.LlamaDecoder,))


def _load(source: str, get_op) -> NativeOp:
    with _lock:               # threads of one process build once; _one_builder across processes
        if source not in _built:
            _built[source] = _build(source)
        failure = _built[source]
    if failure is not None:
        return NativeOp(None, reason=failure)
    import torch
    return NativeOp(*get_op(torch))


def _arch_flags() -> list[str]:
    """The host CPU's own instruction set: the build lives in a per-host cache directory,
    and its name carries the CPU's fingerprint (see _name)."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return ["-march=native"]
    if machine in ("aarch64", "arm64"):
        return ["-mcpu=native"]
    return []


def _openmp_flags() -> list[str]:
    """-fopenmp where torch's threads are OpenMP's (Linux wheels): at::parallel_for is
    inline, and compiled without it runs on one thread. The library then needs libgomp.so.1,
    which resolves to the copy torch already loaded (same soname): one OpenMP runtime."""
    import torch
    if platform.system() == "Linux" and "OpenMP" in torch.__config__.parallel_info():
        return ["-fopenmp"]
    return []


def _cflags() -> list[str]:
    # torch's JIT build passes no optimisation level; ISO -std=c++NN turns FMA contraction
    # off unless asked; -fopenmp-simd enables the kernels' `omp simd` reductions.
    return ["-O3", "-ffp-contract=fast", "-fopenmp-simd"] + _openmp_flags() + _arch_flags()


def _name(source: str) -> str:
    """Library name: one per csrc content, flags and CPU. torch rebuilds when the .cpp changes
    but not its headers; and a cache directory shared by hosts with different CPUs (an NFS
    home) must never load a build for another instruction set."""
    key = hashlib.sha256(" ".join(_cflags()).encode())
    for file in sorted(os.listdir(_CSRC)):
        with open(os.path.join(_CSRC, file), "rb") as f:
            key.update(file.encode() + f.read())
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            cpu += next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    key.update(cpu.encode())
    return f"kvport_cpu_{source}_{key.hexdigest()[:10]}"


def _build(source: str) -> str | None:
    """Build or load csrc/<source>.cpp into this process: None, or why it failed."""
    try:
        from torch.utils import cpp_extension
    except ImportError as exc:
        return f"torch C++ extensions unavailable ({exc})"
    compiler = os.environ.get("CXX", "c++")     # the compiler cpp_extension itself uses
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} not found)"
    if not cpp_extension.is_ninja_available():
        return "ninja not found (torch's JIT build needs it)"
    name = _name(source)
    try:
        with _one_builder(cpp_extension._get_build_directory(name, verbose=False)):
            cpp_extension.load(name=name, sources=[os.path.join(_CSRC, f"{source}.cpp")],
                               extra_cflags=_cflags(), extra_ldflags=_openmp_flags(),
                               is_python_module=False, verbose=False)
        return None
    except Exception as exc:   # noqa: BLE001 - any build/load failure means: no native op
        return _failure(name, exc)


@contextlib.contextmanager
def _one_builder(build_dir: str):
    """One kvport process at a time builds or loads in `build_dir`, under an flock.

    torch guards a build with a `lock` file of its own and waits for it to go away; a
    process killed mid-build (an engine whose start timed out, a Ctrl-C during the first
    `kvport serve`) leaves that file behind, and every later start would wait for it forever,
    silently. The kernel drops an flock when its holder dies, so whoever holds ours knows
    that a `lock` file still there is such a leftover, and removes it."""
    try:
        import fcntl
    except ImportError:          # not POSIX: torch's own lock only
        yield
        return
    with open(os.path.join(build_dir, "kvport.flock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        stale = os.path.join(build_dir, "lock")
        if os.path.exists(stale):
            logger.warning("removing %s, left by a native build that was killed", stale)
            os.remove(stale)
        yield


def _failure(name: str, exc: Exception) -> str:
    """One line naming the first compiler error, and a file with the whole log."""
    from torch.utils import cpp_extension
    text = f"{type(exc).__name__}: {exc}"
    try:
        log = os.path.join(cpp_extension._get_build_directory(name, verbose=False),
                           "build_error.log")
        with open(log, "w", encoding="utf-8") as f:
            f.write(text)
    except Exception:   # noqa: BLE001 - the message below still says what failed
        log = "(not written)"
    lines = text.splitlines() or [""]
    first = next((line.strip() for line in lines if "error:" in line), lines[0])   # gcc/clang
    logger.warning("building the native %s failed: %s (log: %s)", name, first, log)
    return f"build failed: {first[:300]} (full log: {log})"
