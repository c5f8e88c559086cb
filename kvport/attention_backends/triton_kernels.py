"""Triton kernels for paged attention over a [2, num_blocks, block_size, num_kv_heads, head_size]
KV cache: the KV write, a unified kernel for mixed prefill/decode batches, and a split-KV decode
kernel with its reduction. Shared by the CUDA and ROCm plugins; imported only by
`triton_paged`, which chooses the launch parameters.

Conventions:
* One program attends for ONE KV head and a tile of query rows; a row is a (query token,
  query head of that KV head's group) pair. Every KV tile is therefore read once for all G
  query heads of the group (GQA), and the scores are one `tl.dot` of [rows, D] x [D, keys].
* Softmax is online (running max and sum, base 2), accumulated in float32; probabilities are
  rounded to the cache dtype before the P.V product, as in FlashAttention.
* Keys of a tile are gathered through the block table one position at a time
  (block = table[pos // BLOCK_SIZE]), so a KV tile may span several cache blocks or a part of
  one. Offsets into the cache are computed in int64: a large cache has more than 2**31 elements.
* `DOT_MODE`: 0 uses the tensor cores in the input dtype (bf16/fp16); 1 forces IEEE float32
  (float32 caches, so results do not drop to tf32 accuracy); 2 upcasts both operands to
  float32 first, for Triton's CPU interpreter (3.6 multiplies bf16 operands as raw uint16).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, DOT_MODE: tl.constexpr):
    if DOT_MODE == 0:
        return tl.dot(a, b)
    elif DOT_MODE == 1:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


@triton.jit
def write_kv_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                    stride_kt, stride_vt,
                    ROW: tl.constexpr, BLOCK: tl.constexpr):
    """Program t copies key[t] and value[t] ([kvh * D] each) into slot slot_mapping[t].
    A negative slot (a padding token of a captured batch) writes nothing."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    # (offs < ROW) & (slot >= 0), written without a scalar bool: Triton's interpreter turns a
    # broadcast scalar bool into int32, which tl.load refuses as a mask.
    mask = offs < tl.where(slot >= 0, ROW, 0)
    dst = slot * ROW + offs
    k = tl.load(key_ptr + t.to(tl.int64) * stride_kt + offs, mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(value_ptr + t.to(tl.int64) * stride_vt + offs, mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attend_tile(acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr, table_row_ptr, kv_head,
                 kv_lo, kv_hi, q_pos, window, scale_log2,
                 stride_kb, stride_ks, stride_kh, offs_d, d_mask,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 DOT_MODE: tl.constexpr):
    """Online softmax of the rows of `q` over the keys at positions [kv_lo, kv_hi), causal
    against each row's position `q_pos` (and its sliding window). Returns (acc, m_i, l_i)."""
    for start in range(kv_lo, kv_hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        pos_ok = pos < kv_hi
        block = tl.load(table_row_ptr + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
        offs = block * stride_kb + (pos % BLOCK_SIZE).to(tl.int64) * stride_ks + kv_head * stride_kh
        kv_mask = pos_ok[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + offs[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), DOT_MODE) * scale_log2                  # [M, N] float32
        allowed = (pos[None, :] <= q_pos[:, None]) & pos_ok[None, :]
        if HAS_WINDOW:
            allowed = allowed & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)          # fully masked rows
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + offs[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_MODE)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def paged_attention_kernel(
        out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, seq_lens_ptr, qsl_ptr,
        tile_req_ptr, tile_q0_ptr, scale_log2, window,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_bt,
        G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_WINDOW: tl.constexpr, DOT_MODE: tl.constexpr):
    """Grid (tiles, kv_heads). Tile i covers query tokens tile_q0[i] .. + BLOCK_Q of request
    tile_req[i] (any mix of prefill chunks and single decode tokens) x the G heads of one
    KV head, attending causally over the request's whole context."""
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    req = tl.load(tile_req_ptr + tile)
    q0 = tl.load(tile_q0_ptr + tile)
    q_start = tl.load(qsl_ptr + req)
    q_len = tl.load(qsl_ptr + req + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + req)
    context = seq_len - q_len                       # positions before this step's tokens

    rows = tl.arange(0, BLOCK_M)
    q_idx = q0 + rows // G
    head = kv_head * G + rows % G
    row_ok = (rows < BLOCK_Q * G) & (q_idx < q_len)
    q_pos = context + q_idx
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    token = (q_start + q_idx).to(tl.int64)
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_mask[None, :], other=0.0)

    kv_hi = context + tl.minimum(q0 + BLOCK_Q, q_len)   # past the tile's last query position
    kv_lo = 0
    if HAS_WINDOW:
        kv_lo = tl.maximum(context + q0 - window + 1, 0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr,
                                 block_table_ptr + req.to(tl.int64) * stride_bt, kv_head,
                                 kv_lo, kv_hi, q_pos, window, scale_log2,
                                 stride_kb, stride_ks, stride_kh, offs_d, d_mask,
                                 BLOCK_SIZE, BLOCK_N, HAS_WINDOW, DOT_MODE)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])


@triton.jit
def paged_decode_kernel(
        out_ptr, part_out_ptr, part_lse_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr,
        seq_lens_ptr, scale_log2, window,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_kb, stride_ks, stride_kh, stride_bt,
        G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
        HAS_WINDOW: tl.constexpr, DOT_MODE: tl.constexpr):
    """Grid (requests, kv_heads, NUM_SPLITS) for a batch of single-token queries (token i is
    request i). Split s attends over the s-th of NUM_SPLITS equal runs of BLOCK_N-key tiles
    of the context. With one split the result goes straight to `out`; otherwise each split
    writes its normalised partial output and log-sum-exp (base 2) for `decode_reduce_kernel`.
    A request with seq_len 0 (padding of a captured batch) attends to nothing."""
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + req)
    q_pos_scalar = seq_len - 1

    kv_start = 0
    if HAS_WINDOW:
        kv_start = tl.maximum(q_pos_scalar - window + 1, 0)
    first_tile = kv_start // BLOCK_N
    num_tiles = tl.cdiv(seq_len, BLOCK_N) - first_tile
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    kv_lo = tl.maximum((first_tile + split * tiles_per_split) * BLOCK_N, kv_start)
    kv_hi = tl.minimum((first_tile + (split + 1) * tiles_per_split) * BLOCK_N, seq_len)

    rows = tl.arange(0, BLOCK_H)
    head = kv_head * G + rows
    row_ok = rows < G
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    token = req.to(tl.int64)
    q = tl.load(q_ptr + token * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_mask[None, :], other=0.0)
    q_pos = tl.full([BLOCK_H], 0, tl.int32) + q_pos_scalar
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, k_cache_ptr, v_cache_ptr,
                                 block_table_ptr + token * stride_bt, kv_head,
                                 kv_lo, kv_hi, q_pos, window, scale_log2,
                                 stride_kb, stride_ks, stride_kh, offs_d, d_mask,
                                 BLOCK_SIZE, BLOCK_N, HAS_WINDOW, DOT_MODE)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    io_mask = row_ok[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + token * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        # partials: [requests, heads, NUM_SPLITS, BLOCK_D] and [requests, heads, NUM_SPLITS]
        num_heads = tl.num_programs(1) * G
        part = (token * num_heads + head) * NUM_SPLITS + split
        tl.store(part_out_ptr + part[:, None] * BLOCK_D + offs_d[None, :], out, mask=io_mask)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(part_lse_ptr + part, lse, mask=row_ok)


@triton.jit
def decode_reduce_kernel(out_ptr, part_out_ptr, part_lse_ptr, stride_ot, stride_oh,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """Grid (requests, heads): combine the splits' partial outputs by their log-sum-exp."""
    req = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    part = (req * tl.num_programs(1) + head) * NUM_SPLITS + tl.arange(0, NUM_SPLITS)
    lse = tl.load(part_lse_ptr + part)                                     # [S]
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weight = tl.exp2(lse - lse_max)                                         # 0 for empty splits
    offs_d = tl.arange(0, BLOCK_D)
    parts = tl.load(part_out_ptr + part[:, None] * BLOCK_D + offs_d[None, :],
                    mask=(weight > 0.0)[:, None], other=0.0)                # [S, BLOCK_D]
    total = tl.sum(weight, axis=0)
    out = tl.sum(parts * weight[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + req * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < D)
