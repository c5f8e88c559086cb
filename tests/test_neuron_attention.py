"""neuron_paged's formulation on the CPU: its padded plan, buckets that never change a
result, the prior/active merge, padded tokens, and the NKI decode kernel's algorithm run
against a numpy emulation of the nki.language calls it makes. (tests/test_neuron_kit.py runs
the conformance kit on the torch path; nothing here ran on Neuron hardware, and the NKI
kernel has never been compiled.)"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import textwrap

import numpy as np
import pytest

if importlib.util.find_spec("kvport_neuron") is None:
    pytest.skip("kvport-neuron is not installed (scripts/install.sh --test installs it)",
                allow_module_level=True)

import torch  # noqa: E402
from kvport_neuron.attention import NeuronPagedBackend  # noqa: E402
from kvport_neuron.buckets import NeuronBuckets  # noqa: E402
from kvport_neuron.plan import plan_batch  # noqa: E402

from paged_cases import MAX_REL_ERR, compare_with_reference, random_step  # noqa: E402

MIXED = [(0, 1), (15, 1), (16, 1), (70, 1), (200, 1), (0, 9), (13, 40), (33, 16), (5, 2)]
COARSE = NeuronBuckets(min_tokens=128, min_seqs=16, min_query=64, min_blocks=32)


def run(step, buckets, cache=None):
    backend = NeuronPagedBackend(step.spec, buckets)
    cache = step.cache.clone() if cache is None else cache
    return backend.forward(step.query, step.key, step.value, cache,
                           backend.build_metadata(step.common, "cpu")), cache


@pytest.mark.parametrize("group, window, dtype", [
    (1, None, "float32"), (4, None, "float32"), (2, 24, "float32"), (2, 1, "float32"),
    (4, None, "bfloat16"), (2, None, "float16")])
def test_buckets_never_change_the_result(group, window, dtype):
    """Exact shapes, default buckets and coarse buckets agree; paged_cases poisons block 0
    (nobody's) with NaN, so a padding read of a foreign block shows."""
    step = random_step(MIXED, num_heads=2 * group, num_kv_heads=2, head_size=32,
                       block_size=16, sliding_window=window, dtype=dtype, seed=7 + group)
    exact, _ = run(step, NeuronBuckets.exact())
    tol = 1e-6 if dtype == "float32" else 1e-2
    for buckets in (NeuronBuckets(), COARSE):
        out, _ = run(step, buckets)
        torch.testing.assert_close(out, exact, rtol=tol, atol=tol, msg=f"buckets {buckets}")
    err, _ = compare_with_reference(NeuronPagedBackend(step.spec, COARSE), step)
    assert err < MAX_REL_ERR[dtype], err


def test_padded_shapes_come_from_the_buckets():
    step = random_step(MIXED, num_heads=4, num_kv_heads=2, head_size=32, block_size=16, seed=1)
    backend = NeuronPagedBackend(step.spec)
    backend.enable_token_padding(pad_slot=0)
    # tokens 72 -> 128; decodes: 5 -> 8 sequences, 1 row, 13 prior blocks -> 16;
    # prefills: 4 -> 4 sequences, 40 rows -> 64, 3 prior blocks -> floor 8
    assert backend.build_metadata(step.common, "cpu").shape_key() == (128, 8, 1, 16, 4, 64, 8)


def test_plan_splits_prior_and_active():
    # one chunk of 3 new tokens after 5 cached ones, block size 4: prior = positions 0..4
    table = np.array([[6, 2, 9, 0]], dtype=np.int32)
    plan = plan_batch(np.array([0]), np.array([0, 3]), np.array([8], dtype=np.int32), table,
                      4, None, NeuronBuckets(min_seqs=2, min_query=4, min_blocks=4),
                      dummy_row=3)
    assert (plan.num_seqs, plan.query_len, plan.num_blocks) == (2, 4, 4)
    assert plan.block_ids.tolist() == [6, 2, 2, 2, 2, 2, 2, 2]    # padding: the last block (2)
    assert plan.prior_mask[0, 0, :8].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert not plan.prior_mask[0, 3].any() and not plan.prior_mask[1].any()
    assert plan.active_mask[0].astype(int).tolist() == [[1, 0, 0, 0], [1, 1, 0, 0],
                                                        [1, 1, 1, 0], [1, 0, 0, 0]]
    assert plan.out_rows.tolist() == [0, 1, 2, 3, 3, 3, 3, 3]


def test_token_padding_writes_padding_into_its_own_slot_and_returns_zeros():
    step = random_step(MIXED, num_heads=4, num_kv_heads=2, head_size=32, block_size=16, seed=2)
    pad_block = step.cache.shape[1]            # one block more, as the Neuron worker allocates
    step.cache = torch.cat([step.cache, torch.randn(2, 1, *step.cache.shape[2:])], dim=1)
    exact, exact_cache = run(step, NeuronBuckets.exact())
    backend = NeuronPagedBackend(step.spec)
    backend.enable_token_padding(pad_slot=pad_block * 16)
    metadata = backend.build_metadata(step.common, "cpu")
    T, padded = 72, metadata.num_padded_tokens
    extra = padded - T

    def pad(x):
        return torch.cat([x, torch.randn(extra, *x.shape[1:])])

    cache = step.cache.clone()
    out = backend.forward(pad(step.query), pad(step.key), pad(step.value), cache, metadata)
    torch.testing.assert_close(out[:T], exact, rtol=1e-6, atol=1e-6)
    assert not out[T:].any()
    changed = (cache.nan_to_num(7.0) != exact_cache.nan_to_num(7.0))
    assert changed.flatten(2).any(-1).any(0).nonzero().flatten().tolist() == [pad_block]


def test_without_neuronxcc_the_torch_path_runs():
    assert importlib.util.find_spec("neuronxcc") is None
    step = random_step([(40, 1)], num_heads=2, num_kv_heads=1, head_size=16, block_size=16)
    assert NeuronPagedBackend(step.spec).nki is None


# ------------------------------------------------------------------ the NKI kernel, emulated

# nki.jit: run the kernel on float32 numpy copies of the tensors, return torch tensors.
FAKE_NKI = '''
import numpy as np
import torch

CALLS = []


def jit(kernel):
    def launch(*tensors):
        CALLS.append(tuple(tuple(t.shape) for t in tensors))
        outs = kernel(*[t.detach().float().cpu().numpy() for t in tensors])
        return tuple(torch.from_numpy(np.ascontiguousarray(o)) for o in outs)
    return launch
'''

# nki.language under the semantics the kernel's comments state: tiles are 2-D arrays whose
# first axis is the partition axis; matmul(x, y, transpose_x=True) is x.T @ y (contraction
# over x's partitions); load/store copy; reductions take a list of axes.
FAKE_LANGUAGE = '''
import builtins

import numpy as np

float32 = np.float32
shared_hbm = sbuf = "memory"
affine_range = sequential_range = range


def ndarray(shape, dtype, buffer=None):
    return np.full(shape, np.nan, dtype=dtype)


def full(shape, value, dtype):
    return np.full(shape, value, dtype=dtype)


def zeros(shape, dtype):
    return np.zeros(shape, dtype=dtype)


def load(tile):
    assert tile.ndim == 2 and tile.shape[0] <= 128, f"not a 2-D tile of <= 128 partitions: {tile.shape}"
    return np.array(tile, dtype=np.float32)


def load_transpose2d(tile):
    assert tile.ndim == 2 and tile.shape[1] <= 128, tile.shape
    return np.array(tile, dtype=np.float32).T


def store(dst, value):
    dst[...] = value


def matmul(x, y, transpose_x=False):
    x = x.T if transpose_x else x
    assert x.shape[1] == y.shape[0] <= 128, f"contraction over {x.shape[1]} partitions"
    return x @ y


def transpose(x):
    assert builtins.max(x.shape) <= 128, x.shape
    return x.T


def max(x, axis, keepdims=False):
    return np.max(x, axis=tuple(axis), keepdims=keepdims)


def sum(x, axis, keepdims=False):
    return np.sum(x, axis=tuple(axis), keepdims=keepdims)


add, subtract, multiply, maximum, exp = np.add, np.subtract, np.multiply, np.maximum, np.exp
'''


@pytest.fixture
def emulated_neuronxcc(tmp_path, monkeypatch):
    package = tmp_path / "neuronxcc" / "nki"
    package.mkdir(parents=True)
    (tmp_path / "neuronxcc" / "__init__.py").write_text("")
    (package / "__init__.py").write_text(textwrap.dedent(FAKE_NKI))
    (package / "language.py").write_text(textwrap.dedent(FAKE_LANGUAGE))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield sys.modules.setdefault("neuronxcc.nki", importlib.import_module("neuronxcc.nki"))
    for name in [m for m in sys.modules if m.split(".")[0] == "neuronxcc"
                 or m == "kvport_neuron.nki_decode"]:
        del sys.modules[name]


@pytest.mark.parametrize("group, window", [(1, None), (4, None), (2, 40)])
def test_nki_decode_kernel_algorithm_matches_the_reference(emulated_neuronxcc, group, window):
    requests = [(0, 1), (15, 1), (16, 1), (70, 1), (200, 1), (300, 1), (13, 40)]
    step = random_step(requests, num_heads=2 * group, num_kv_heads=2, head_size=32,
                       block_size=16, sliding_window=window, seed=group)
    backend = NeuronPagedBackend(step.spec)
    assert backend.nki is not None
    err, out = compare_with_reference(backend, step)
    assert err < MAX_REL_ERR["float32"], err
    # decodes: 6 -> 8 sequences; 19 prior blocks -> 32, so 512 keys (four 128-key tiles);
    # with the 40-token window at most 4 blocks -> 8, so 128 keys
    L = 512 if window is None else 128
    assert emulated_neuronxcc.CALLS == [((8, 2, group, 32), (8, 2, L, 32), (8, 2, L, 32),
                                         (8, 1, group, L))]
    torch_path = NeuronPagedBackend(step.spec)
    torch_path.nki = None
    cache = step.cache.clone()
    expected = torch_path.forward(step.query, step.key, step.value, cache,
                                  torch_path.build_metadata(step.common, "cpu"))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_nki_path_is_skipped_where_its_tiles_do_not_fit(emulated_neuronxcc):
    step = random_step([(20, 1), (5, 1)], num_heads=2, num_kv_heads=1, head_size=16,
                       block_size=4, seed=4)
    backend = NeuronPagedBackend(step.spec, NeuronBuckets(min_blocks=2))   # 8 blocks x 4 keys
    err, _ = compare_with_reference(backend, step)
    assert err < MAX_REL_ERR["float32"] and emulated_neuronxcc.CALLS == []
