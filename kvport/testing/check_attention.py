"""Every torch attention backend registered for the device against the torch reference.

torch is imported inside the tests, so a JAX-only environment can import this module.
"""
from __future__ import annotations

import zlib

import pytest

__all__ = ["test_attention_backend_matches_reference", "test_attention_backend_cache_layout"]


def _backend_class(target, name: str):
    return target.registry.attention_backend_class(name, target.registration.device_type)


def test_attention_backend_matches_reference(kit_torch_target, kit_attention_case, kit_seed):
    from kvport.attention_backends.interface import UnsupportedAttentionConfig
    from kvport.testing.attention_cases import fit_case
    from kvport.testing.attention_check import run_case

    name, case = kit_attention_case
    backend_class = _backend_class(kit_torch_target, name)
    case = fit_case(case, backend_class)
    try:
        backend_class.validate_spec(case.spec())
    except UnsupportedAttentionConfig as exc:
        pytest.skip(f"{name} does not support this case: {exc}")
    seed = (kit_seed + zlib.crc32(case.id.encode())) % 2**31
    try:
        run_case(backend_class, case, kit_torch_target.torch_device(), seed)
        failure = None
    except AssertionError as exc:   # the message is the report; the kit's frames are noise
        failure = f"{exc}\n  (kit seed {kit_seed}: rerun with --kvport-seed {kit_seed})"
    if failure is not None:
        pytest.fail(failure, pytrace=False)


def test_attention_backend_cache_layout(kit_torch_target, kit_backend):
    """kv_cache_shape grows by whole blocks, and page_bytes agrees with it: the engine sizes
    the cache from page_bytes and allocates kv_cache_shape."""
    from kvport.attention_backends.interface import (AttentionBackend, AttentionSpec,
                                                     UnsupportedAttentionConfig)

    backend_class = _backend_class(kit_torch_target, kit_backend)
    assert issubclass(backend_class, AttentionBackend)
    bs = (backend_class.supported_block_sizes or (16,))[0]
    head = (backend_class.supported_head_sizes or (64,))[0]
    one = _numel(backend_class.kv_cache_shape(1, bs, 2, head))
    for blocks in (2, 7, 64):
        shape = backend_class.kv_cache_shape(blocks, bs, 2, head)
        assert _numel(shape) == blocks * one, (
            f"{kit_backend}.kv_cache_shape({blocks}, {bs}, 2, {head}) = {shape} holds "
            f"{_numel(shape)} elements, not {blocks} x {one} (one block's): the cache must "
            "grow by whole blocks")
    for dtype_bytes in (2, 4):
        page = backend_class.page_bytes(bs, 2, head, dtype_bytes)
        assert page == one * dtype_bytes, (
            f"{kit_backend}.page_bytes({bs}, 2, {head}, {dtype_bytes}) = {page}, but one block "
            f"of kv_cache_shape holds {one} elements = {one * dtype_bytes} bytes")
    bad = AttentionSpec(num_heads=6, num_kv_heads=4, head_size=head, block_size=bs,
                        dtype=backend_class.supported_dtypes[0], scale=1.0)
    with pytest.raises(UnsupportedAttentionConfig):
        backend_class.validate_spec(bad)   # 6 query heads cannot share 4 KV heads


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count
