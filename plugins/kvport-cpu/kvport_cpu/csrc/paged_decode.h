// Paged decode attention for CPUs: one query token per request, its keys and values read in
// place through the block table (no gather into a workspace), float32 arithmetic whatever the
// cache dtype.
//
// Cache layout: [2, num_blocks, block_size, num_kv_heads, head_size] (keys, then values), the
// layout of kvport's cpu_paged and torch_reference backends. A work item is a request, or a
// slice of its KV heads when there are fewer requests than threads: all KV heads of a token
// are contiguous in the cache, so a whole request reads whole rows, and the G query heads
// sharing a KV head are attended together (each key/value row is read once for all G).
// Per item: pass 1 writes the scores to a per-thread buffer, a softmax turns them into
// probabilities, pass 2 accumulates the values (two passes over a small buffer instead of an
// online softmax: no rescaling of the accumulator per key).
//
// Only stable ATen APIs, so one source builds against torch 2.4+. Built with -O3,
// -fopenmp-simd, -ffp-contract=fast and the host's -march (kvport_cpu/native.py).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "row_ops.h"

namespace kvport_cpu {

struct Problem {
  const float* q;            // [n, H, D]
  const void* cache;         // [2, num_blocks, bs, KVH, D]
  const int64_t* blocks;     // [n, max_blocks]
  const int64_t* seq_lens;   // [n]
  float* out;                // [n, H, D]
  int64_t n, H, KVH, G, D, bs, max_blocks, num_cache_blocks;
  int64_t window;            // 0: none
  float scale;
};

// First key position request i attends (the sliding window's start, or 0).
inline int64_t first_key(const Problem& p, int64_t i) {
  return p.window > 0 ? std::max<int64_t>(p.seq_lens[i] - p.window, 0) : 0;
}

// Calls fn(span, count, index) for the tokens first..len-1 of request i, one block at a
// time: span points at the keys (or values) of KV heads h0.. of `count` consecutive tokens,
// index is the first one's position minus `first`. The request's next block is prefetched
// before a block is processed: blocks sit anywhere in the cache, so the hardware prefetcher
// would miss the start of each one.
template <typename scalar_t, typename Fn>
inline void for_each_span(const Problem& p, const scalar_t* base, int64_t i, int64_t h0,
                          int64_t nh, int64_t first, int64_t len, Fn&& fn) {
  constexpr int64_t kLine = 64 / sizeof(scalar_t);      // elements per cache line
  const int64_t row = p.KVH * p.D, width = nh * p.D;
  const int64_t* blocks = p.blocks + i * p.max_blocks;
  const int64_t last_block = (len - 1) / p.bs;
  for (int64_t t = first; t < len;) {
    const int64_t b = t / p.bs, off = t % p.bs;
    const int64_t count = std::min(p.bs - off, len - t);
    if (b < last_block) {
      const scalar_t* next = base + blocks[b + 1] * p.bs * row + h0 * p.D;
      const int64_t next_count = std::min(p.bs, len - (b + 1) * p.bs);
      for (int64_t j = 0; j < next_count; ++j)
        for (int64_t e = 0; e < width; e += kLine) __builtin_prefetch(next + j * row + e);
    }
    fn(base + (blocks[b] * p.bs + off) * row + h0 * p.D, count, t - first);
    t += count;
  }
}

// s[0..L) <- softmax(s[0..L)), L >= 1.
inline void softmax(float* s, int64_t L) {
  float m = s[0];
#pragma omp simd reduction(max : m)
  for (int64_t t = 0; t < L; ++t) m = s[t] > m ? s[t] : m;
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < L; ++t) {
    s[t] = exp_nonpositive(s[t] - m);
    sum += s[t];
  }
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int64_t t = 0; t < L; ++t) s[t] *= inv;
}

// Attention of request i's query heads over KV heads h0 .. h0+nh-1 (query heads h0*G ..
// (h0+nh)*G-1, contiguous in q and out). scores: nh * G * L floats; buf: D floats.
template <typename scalar_t, int kD>
void attend_item(const Problem& p, int64_t i, int64_t h0, int64_t nh, float* scores,
                 float* buf) {
  const int64_t D = kD > 0 ? kD : p.D, G = p.G;
  const int64_t len = p.seq_lens[i], first = first_key(p, i), L = len - first;
  const float* q = p.q + (i * p.H + h0 * G) * D;
  float* out = p.out + (i * p.H + h0 * G) * D;
  std::fill(out, out + nh * G * D, 0.0f);
  if (L <= 0) return;
  const auto* keys = static_cast<const scalar_t*>(p.cache);
  const auto* values = keys + p.num_cache_blocks * p.bs * p.KVH * D;

  const int64_t row = p.KVH * D;
  for_each_span(p, keys, i, h0, nh, first, len, [&](const scalar_t* span, int64_t n, int64_t t) {
    for (int64_t hh = 0; hh < nh; ++hh)
      score_span<scalar_t, kD>(q + hh * G * D, G, D, span + hh * D, row, n, p.scale,
                               scores + hh * G * L + t, L, buf);
  });
  for (int64_t g = 0; g < nh * G; ++g) softmax(scores + g * L, L);
  for_each_span(p, values, i, h0, nh, first, len, [&](const scalar_t* span, int64_t n, int64_t t) {
    for (int64_t hh = 0; hh < nh; ++hh)
      accumulate_span<scalar_t, kD>(out + hh * G * D, G, D, span + hh * D, row, n,
                                    scores + hh * G * L + t, L, buf);
  });
}

// Work items: (request, slice of its KV heads). Whole requests read whole cache rows (all KV
// heads of a token are contiguous); requests are cut into head slices only when there are
// too few of them to keep every thread busy.
struct Split {
  int64_t slices;                  // per request
  std::vector<int64_t> bounds;     // items of thread c: bounds[c] .. bounds[c+1]-1
};

inline void slice_heads(const Problem& p, int64_t slices, int64_t s, int64_t* h0, int64_t* nh) {
  *h0 = s * p.KVH / slices;
  *nh = (s + 1) * p.KVH / slices - *h0;
}

// One contiguous range of items per thread, of about equal cost (keys x heads):
// at::parallel_for cuts ranges by count, and contexts are ragged.
inline Split split_work(const Problem& p, int64_t threads) {
  Split split;
  split.slices = std::min<int64_t>(p.KVH, (2 * threads + p.n - 1) / std::max<int64_t>(p.n, 1));
  const int64_t items = p.n * split.slices;
  const int64_t parts = std::max<int64_t>(std::min(threads, items), 1);
  std::vector<int64_t> prefix(items + 1, 0);
  for (int64_t it = 0; it < items; ++it) {
    const int64_t i = it / split.slices;
    int64_t h0, nh;
    slice_heads(p, split.slices, it % split.slices, &h0, &nh);
    prefix[it + 1] = prefix[it] + (p.seq_lens[i] - first_key(p, i) + 16) * nh;
  }
  split.bounds.assign(parts + 1, items);
  for (int64_t c = 0; c < parts; ++c) {
    const int64_t target = prefix[items] * c / parts;
    split.bounds[c] = std::lower_bound(prefix.begin(), prefix.end(), target) - prefix.begin();
  }
  return split;
}

template <typename scalar_t, int kD>
void run(const Problem& p) {
  int64_t max_len = 0;
  for (int64_t i = 0; i < p.n; ++i) max_len = std::max(max_len, p.seq_lens[i] - first_key(p, i));
  const Split split = split_work(p, at::get_num_threads());
  const int64_t parts = static_cast<int64_t>(split.bounds.size()) - 1;
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(std::max<int64_t>(p.H * max_len, 1));
    std::vector<float> buf(p.D);          // one converted row (plain-loop path)
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t it = split.bounds[c]; it < split.bounds[c + 1]; ++it) {
        int64_t h0, nh;
        slice_heads(p, split.slices, it % split.slices, &h0, &nh);
        attend_item<scalar_t, kD>(p, it / split.slices, h0, nh, scores.data(), buf.data());
      }
    }
  });
}

template <typename scalar_t>
void run_head_size(const Problem& p) {
  switch (p.D) {   // compile-time head sizes unroll the inner loops
    case 64: return run<scalar_t, 64>(p);
    case 128: return run<scalar_t, 128>(p);
    default: return run<scalar_t, 0>(p);
  }
}

// Every block a request reads must exist: a bad block table would otherwise read outside
// the cache.
inline void check_blocks(const Problem& p) {
  for (int64_t i = 0; i < p.n; ++i) {
    const int64_t len = p.seq_lens[i];
    TORCH_CHECK(len >= 0 && len <= p.max_blocks * p.bs, "paged_decode: seq_lens[", i, "] = ",
                len, " does not fit the block table's ", p.max_blocks, " blocks of ", p.bs);
    if (len == 0) continue;
    for (int64_t b = first_key(p, i) / p.bs; b <= (len - 1) / p.bs; ++b) {
      const int64_t id = p.blocks[i * p.max_blocks + b];
      TORCH_CHECK(id >= 0 && id < p.num_cache_blocks, "paged_decode: block_table[", i, ", ",
                  b, "] = ", id, " is outside the cache's ", p.num_cache_blocks, " blocks");
    }
  }
}

// Writes every element of out [num_reqs, num_heads, head_size] (float32, contiguous).
inline void paged_decode_out(at::Tensor& out, const at::Tensor& q, const at::Tensor& kv_cache,
                      const at::Tensor& block_table, const at::Tensor& seq_lens, double scale,
                      std::optional<int64_t> sliding_window) {
  TORCH_CHECK(q.device().is_cpu() && kv_cache.device().is_cpu() &&
                  block_table.device().is_cpu() && seq_lens.device().is_cpu(),
              "paged_decode: all tensors must be on the CPU");
  TORCH_CHECK(q.dim() == 3, "paged_decode: q must be [num_reqs, num_heads, head_size], got ",
              q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat, "paged_decode: q must be float32, got ",
              q.scalar_type());
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2,
              "paged_decode: kv_cache must be [2, num_blocks, block_size, num_kv_heads, "
              "head_size], got ", kv_cache.sizes());
  const auto dtype = kv_cache.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "paged_decode: kv_cache must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(kv_cache.is_contiguous(), "paged_decode: kv_cache must be contiguous");
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2), KVH = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == D, "paged_decode: head size of q (", D,
              ") and kv_cache (", kv_cache.size(4), ") differ");
  TORCH_CHECK(KVH > 0 && H % KVH == 0, "paged_decode: num_heads ", H,
              " is not a multiple of num_kv_heads ", KVH);
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == n,
              "paged_decode: block_table must be [num_reqs=", n, ", max_blocks], got ",
              block_table.sizes());
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == n,
              "paged_decode: seq_lens must be [num_reqs=", n, "], got ", seq_lens.sizes());
  TORCH_CHECK(at::isIntegralType(block_table.scalar_type(), /*includeBool=*/false) &&
                  at::isIntegralType(seq_lens.scalar_type(), /*includeBool=*/false),
              "paged_decode: block_table and seq_lens must be integer tensors");
  TORCH_CHECK(!sliding_window.has_value() || *sliding_window > 0,
              "paged_decode: sliding_window must be positive");
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.is_contiguous() &&
                  out.sizes() == q.sizes(),
              "paged_decode: out must be a contiguous float32 CPU tensor shaped like q ",
              q.sizes(), ", got ", out.scalar_type(), " ", out.sizes());

  const at::Tensor qc = q.contiguous();
  const at::Tensor blocks = block_table.to(at::kLong).contiguous();   // no-op when int64
  const at::Tensor lens = seq_lens.to(at::kLong).contiguous();
  Problem p{qc.data_ptr<float>(), kv_cache.data_ptr(), blocks.data_ptr<int64_t>(),
            lens.data_ptr<int64_t>(), out.data_ptr<float>(),
            n, H, KVH, H / KVH, D, kv_cache.size(2), blocks.size(1), kv_cache.size(1),
            sliding_window.value_or(0), static_cast<float>(scale)};
  check_blocks(p);
  if (n == 0) return;
  switch (dtype) {
    case at::kFloat: run_head_size<float>(p); break;
    case at::kBFloat16: run_head_size<c10::BFloat16>(p); break;
    default: run_head_size<c10::Half>(p); break;
  }
}

}  // namespace kvport_cpu
