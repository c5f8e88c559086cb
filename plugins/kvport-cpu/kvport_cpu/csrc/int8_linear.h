// kvport's W8A8 dynamic int8 linear layer (kvport/models/quantization.py) in native code:
//
//   y = rescale(int8(x) @ W^T) (+ bias), W int8 [N, K] per output channel, x float32 [M, K]
//   quantized per row: scale = max(max |x_row|, 1e-12) / 127, q = round_half_even(x / scale)
//
// Every step computes exactly what the torch ops compute, in the same order and rounding (a
// division, not a multiply by the reciprocal; the bias added in its own pass so no
// multiply-add is contracted), and the int32 products are exact, so the output is
// bit-identical to the pure-torch layer.
//
// The product: for a few rows (decode) a weight-streaming kernel, `int8_gemv`, which reads
// each weight row once for all rows of x; `torch._int_mm` at one row measured ~10 GB/s where
// a plain read of the same weights reaches ~17 GB/s on two cores. For more rows, _int_mm
// (oneDNN), whose blocking wins once the weights are reused.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define KVPORT_VNNI 1
#ifndef KVPORT_PF
#define KVPORT_PF 8192
#endif
#else
#define KVPORT_VNNI 0
#endif

namespace kvport_cpu {

constexpr float kInt8Max = 127.0f;
constexpr int64_t kGemvMaxRows = 8;     // int8_gemv up to this many rows, _int_mm above

// q [M, K] int8 and scales [M] of x [M, K] float32 (see the header comment).
inline void quantize_rows_into(const float* x, int64_t M, int64_t K, int8_t* q, float* scales) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* row = x + m * K;
      float amax = 0.0f;
#pragma omp simd reduction(max : amax)
      for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(row[k]));
      const float s = std::max(amax, 1e-12f) / kInt8Max;
      scales[m] = s;
      int8_t* out = q + m * K;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) out[k] = static_cast<int8_t>(std::nearbyint(row[k] / s));
    }
  });
}

// out [M, N] = (float(acc) * row_scale[m]) * col_scale[n] (+ bias[n]).
inline void rescale_rows_into(const int32_t* acc, int64_t M, int64_t N, const float* row_scale,
                              const float* col_scale, const float* bias, float* out) {
  // Parallel over rows, and over columns too when there are few rows (decode, the LM head).
  const int64_t col_chunk = M >= at::get_num_threads() ? N : std::max<int64_t>(1024, N / 8);
  const int64_t chunks_per_row = (N + col_chunk - 1) / col_chunk;
  at::parallel_for(0, M * chunks_per_row, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t m = item / chunks_per_row;
      const int64_t n0 = (item % chunks_per_row) * col_chunk;
      const int64_t n1 = std::min(N, n0 + col_chunk);
      const float s = row_scale[m];
      const int32_t* in = acc + m * N;
      float* o = out + m * N;
#pragma omp simd
      for (int64_t n = n0; n < n1; ++n) o[n] = (static_cast<float>(in[n]) * s) * col_scale[n];
      if (bias != nullptr) {
        for (int64_t n = n0; n < n1; ++n) o[n] += bias[n];
      }
    }
  });
}

// ------------------------------------------------------------------ the int8 product
// acc[m * N + n] = sum_k q[m, k] * w[n, k] for output rows n0 <= n < n1, M <= kGemvMaxRows.
inline void gemv_rows_plain(const int8_t* q, int64_t M, int64_t K, const int8_t* w, int64_t N,
                            int64_t n0, int64_t n1, int32_t* acc) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wn = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* qm = q + m * K;
      int32_t s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < K; ++k) s += static_cast<int32_t>(qm[k]) * wn[k];
      acc[m * N + n] = s;
    }
  }
}

#if KVPORT_VNNI
// VPDPBUSD multiplies unsigned by signed bytes, so the activations go in shifted by 128
// (u = q + 128, stored in `u`) and 128 * sum(w) comes off at the end; sum(w) is one more
// VPDPBUSD against a vector of ones. All in int32, exact: |u * w| <= 255 * 127, so K up to
// 66,000 cannot overflow. kR weight rows at a time, each loaded once for the kM rows of x.
// Weight rows are consecutive, so the kernel streams one array; a software prefetch 4 KiB
// ahead took one core from ~5 to ~9 GB/s on the 28 MB LM head (1-8 KiB tried; the hardware
// prefetcher alone stops at page boundaries and ramps up too slowly).
constexpr int64_t kPrefetchBytes = 4096;

template <int kM, int kR>
inline void gemv_block_vnni(const uint8_t* u, int64_t K, const int8_t* w, int64_t N, int64_t n,
                            int32_t* acc) {
  __m512i sums[kR][kM], wsum[kR];
  for (int r = 0; r < kR; ++r) {
    wsum[r] = _mm512_setzero_si512();
    for (int m = 0; m < kM; ++m) sums[r][m] = _mm512_setzero_si512();
  }
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 mask = K - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (K - k)) - 1;
    __m512i x[kM];
    for (int m = 0; m < kM; ++m) x[m] = _mm512_maskz_loadu_epi8(mask, u + m * K + k);
    for (int r = 0; r < kR; ++r) {
      const int8_t* wp = w + (n + r) * K + k;
      _mm_prefetch(reinterpret_cast<const char*>(wp + kPrefetchBytes), _MM_HINT_T0);
      const __m512i wv = _mm512_maskz_loadu_epi8(mask, wp);
      wsum[r] = _mm512_dpbusd_epi32(wsum[r], ones, wv);
      for (int m = 0; m < kM; ++m) sums[r][m] = _mm512_dpbusd_epi32(sums[r][m], x[m], wv);
    }
  }
  for (int r = 0; r < kR; ++r) {
    const int32_t shift = 128 * _mm512_reduce_add_epi32(wsum[r]);
    for (int m = 0; m < kM; ++m) acc[m * N + n + r] = _mm512_reduce_add_epi32(sums[r][m]) - shift;
  }
}

template <int kM>
inline void gemv_rows_vnni(const uint8_t* u, int64_t K, const int8_t* w, int64_t N, int64_t n0,
                           int64_t n1, int32_t* acc) {
  constexpr int kR = kM <= 4 ? 4 : 2;     // accumulators kR * kM + kR + kM stay in registers
  int64_t n = n0;
  for (; n + kR <= n1; n += kR) gemv_block_vnni<kM, kR>(u, K, w, N, n, acc);
  for (; n < n1; ++n) gemv_block_vnni<kM, 1>(u, K, w, N, n, acc);
}

inline void gemv_rows_vnni_dispatch(int64_t M, const uint8_t* u, int64_t K, const int8_t* w,
                                    int64_t N, int64_t n0, int64_t n1, int32_t* acc) {
  switch (M) {
    case 1: return gemv_rows_vnni<1>(u, K, w, N, n0, n1, acc);
    case 2: return gemv_rows_vnni<2>(u, K, w, N, n0, n1, acc);
    case 3: return gemv_rows_vnni<3>(u, K, w, N, n0, n1, acc);
    case 4: return gemv_rows_vnni<4>(u, K, w, N, n0, n1, acc);
    case 5: return gemv_rows_vnni<5>(u, K, w, N, n0, n1, acc);
    case 6: return gemv_rows_vnni<6>(u, K, w, N, n0, n1, acc);
    case 7: return gemv_rows_vnni<7>(u, K, w, N, n0, n1, acc);
    default: return gemv_rows_vnni<8>(u, K, w, N, n0, n1, acc);
  }
}
#endif

// acc [M, N] int32 = q [M, K] int8 @ w [N, K]^T, M <= kGemvMaxRows, split over threads by
// output rows. `u` is scratch for M * K bytes (the shifted activations of the VNNI path).
inline void int8_gemv(const int8_t* q, int64_t M, int64_t K, const int8_t* w, int64_t N,
                      int32_t* acc, uint8_t* u) {
  // ~128 KiB of weights per task: enough to amortise a task, small enough to balance.
  const int64_t grain = std::max<int64_t>(4, (int64_t{1} << 17) / std::max<int64_t>(K, 1));
#if KVPORT_VNNI
  for (int64_t i = 0; i < M * K; ++i) u[i] = static_cast<uint8_t>(q[i] + 128);
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    gemv_rows_vnni_dispatch(M, u, K, w, N, n0, n1, acc);
  });
#else
  (void)u;
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    gemv_rows_plain(q, M, K, w, N, n0, n1, acc);
  });
#endif
}

// ------------------------------------------------------------------ the whole layer
// out [M, N] float32 = the int8 linear layer of x [M, K] float32 (contiguous). `workspace`
// is reused between calls (grown as needed): q, the activation scales, the int32 product.
struct Int8Workspace {
  at::Tensor bytes;
  template <typename T>
  T* take(int64_t& offset, int64_t count) {
    T* p = reinterpret_cast<T*>(bytes.data_ptr<uint8_t>() + offset);
    offset += (count * static_cast<int64_t>(sizeof(T)) + 63) / 64 * 64;
    return p;
  }
};

inline void int8_linear_into(const float* x, int64_t M, int64_t K, const at::Tensor& qweight,
                             const float* weight_scale, const float* bias, float* out,
                             Int8Workspace& ws) {
  const int64_t N = qweight.size(0);
  const int64_t need = 2 * M * K + 4 * M + 4 * M * N + 4 * 64;
  if (!ws.bytes.defined() || ws.bytes.numel() < need)
    ws.bytes = at::empty({need}, at::TensorOptions().dtype(at::kByte));
  int64_t offset = 0;
  int8_t* q = ws.take<int8_t>(offset, M * K);
  uint8_t* u = ws.take<uint8_t>(offset, M * K);
  float* scales = ws.take<float>(offset, M);
  int32_t* acc = ws.take<int32_t>(offset, M * N);
  quantize_rows_into(x, M, K, q, scales);
  if (M <= kGemvMaxRows) {
    int8_gemv(q, M, K, qweight.data_ptr<int8_t>(), N, acc, u);
  } else {
    const at::Tensor qt = at::from_blob(q, {M, K}, at::TensorOptions().dtype(at::kChar));
    at::Tensor acc_t = at::from_blob(acc, {M, N}, at::TensorOptions().dtype(at::kInt));
    acc_t.copy_(at::_int_mm(qt, qweight.t()));
  }
  rescale_rows_into(acc, M, N, scales, weight_scale, bias, out);
}

// Shapes and dtypes of the tensor-level op, checked once per call.
inline void check_int8_linear(const at::Tensor& x, const at::Tensor& qweight,
                              const at::Tensor& weight_scale,
                              const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "int8_linear: x must be a 2-D float32 CPU tensor, got ", x.scalar_type(), " with ",
              x.dim(), " dims on ", x.device());
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.dim() == 2 &&
                  qweight.is_contiguous() && qweight.size(1) == x.size(1),
              "int8_linear: qweight must be a contiguous int8 [N, K=", x.size(1), "], got ",
              qweight.scalar_type(), " ", qweight.sizes());
  const int64_t N = qweight.size(0);
  TORCH_CHECK(weight_scale.scalar_type() == at::kFloat && weight_scale.numel() == N &&
                  weight_scale.is_contiguous(),
              "int8_linear: weight_scale must hold one float32 per output row (", N, ")");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == N && bias->is_contiguous(),
                "int8_linear: bias must hold one float32 per output row (", N, ")");
  }
}

inline at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight,
                              const at::Tensor& weight_scale,
                              const std::optional<at::Tensor>& bias) {
  check_int8_linear(x, qweight, weight_scale, bias);
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = qweight.size(0);
  at::Tensor out = at::empty({M, N}, xc.options());
  if (M == 0) return out;
  Int8Workspace ws;
  const float* b = bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr;
  int8_linear_into(xc.data_ptr<float>(), M, K, qweight, weight_scale.data_ptr<float>(), b,
                   out.data_ptr<float>(), ws);
  return out;
}

}  // namespace kvport_cpu
