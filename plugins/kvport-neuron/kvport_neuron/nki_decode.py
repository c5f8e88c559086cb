"""The prior part of the decode batch as an NKI kernel (AWS's Neuron Kernel Interface).

NEVER COMPILED, NEVER RUN ON NEURON HARDWARE. neuronxcc is not installable where kvport is
developed; this module is imported only when it is importable (attention.nki_kernel). What
is checked: the kernel's algorithm, by running this very function on the CPU against a numpy
emulation of the nki.language calls it makes, under the semantics its comments state
(tests/test_neuron_attention.py). Whether neuronxcc accepts it as written, and how fast it
runs, is unknown.

For each sequence and KV head, the R query rows of that KV head (head_size on the
partitions) stream over the prior context in 128-key tiles with a running softmax:

    s = q^T k + bias     (R x 128)        m' = max(m, rowmax s)      p = exp(s - m')
    a = exp(m - m')      l = l a + rowsum p                          acc = acc a + p v

and the kernel returns acc, m, l for attention.py to merge with the active part.
"""
from __future__ import annotations

import neuronxcc.nki as nki
import neuronxcc.nki.language as nl

from kvport_neuron.buckets import MASKED

TILE = 128      # keys per tile: the partition dimension of the p @ v contraction


@nki.jit
def prior_decode_kernel(q, k, v, bias):
    """q [S, kvh, R, d] (scaled); k, v [S, kvh, L, d] with L a multiple of 128; bias
    [S, 1, R, L] float32. Returns acc [S, kvh, R, d], m and l [S, kvh, R, 1], float32."""
    S, kvh, R, d = q.shape
    L = k.shape[2]
    acc = nl.ndarray((S, kvh, R, d), dtype=nl.float32, buffer=nl.shared_hbm)
    row_max = nl.ndarray((S, kvh, R, 1), dtype=nl.float32, buffer=nl.shared_hbm)
    row_sum = nl.ndarray((S, kvh, R, 1), dtype=nl.float32, buffer=nl.shared_hbm)
    for s in nl.affine_range(S):
        for h in nl.affine_range(kvh):
            q_t = nl.load_transpose2d(q[s, h])                      # [d, R]: d on partitions
            m = nl.full((R, 1), MASKED, dtype=nl.float32)
            l = nl.zeros((R, 1), dtype=nl.float32)
            o = nl.zeros((R, d), dtype=nl.float32)
            for t in nl.sequential_range(L // TILE):
                keys = nl.load_transpose2d(k[s, h, t * TILE:(t + 1) * TILE])     # [d, TILE]
                # transpose_x: q_t is [K=d, M=R], contracted over its partitions
                scores = nl.add(nl.matmul(q_t, keys, transpose_x=True),
                                nl.load(bias[s, 0, :, t * TILE:(t + 1) * TILE]))  # [R, TILE]
                m_new = nl.maximum(m, nl.max(scores, axis=[1], keepdims=True))
                p = nl.exp(nl.subtract(scores, m_new))
                alpha = nl.exp(nl.subtract(m, m_new))
                l[...] = nl.add(nl.multiply(l, alpha), nl.sum(p, axis=[1], keepdims=True))
                values = nl.load(v[s, h, t * TILE:(t + 1) * TILE])               # [TILE, d]
                # p^T is [K=TILE, M=R]: the 128 keys on the partitions
                pv = nl.matmul(nl.transpose(p), values, transpose_x=True)        # [R, d]
                o[...] = nl.add(nl.multiply(o, alpha), pv)
                m[...] = m_new
            nl.store(acc[s, h], o)
            nl.store(row_max[s, h], m)
            nl.store(row_sum[s, h], l)
    return acc, row_max, row_sum
