// The per-row arithmetic of paged_decode.cpp: scores of G query heads against one key row,
// values of one row added into G output rows, and a vectorisable exp. Rows are float32,
// bfloat16 or float16 (converted to float32 as they are loaded); math is float32.
//
// Two implementations of each: AVX-512 intrinsics for head sizes that are a multiple of 32
// (64 and 128 are instantiated), built where the compiler targets AVX-512 (-march=native on
// such a CPU), and plain loops for everything else. The plain dot product measured ~4x
// slower on a Cascade Lake core: gcc reduces each dot with one dependent FMA chain and a
// lane-by-lane scalar sum.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__)
#include <immintrin.h>
#define KVPORT_AVX512 1
#else
#define KVPORT_AVX512 0
#endif

namespace kvport_cpu {

// exp(x) for x <= 0 (a score minus its row's max), Cephes' expf polynomial (~1 ulp) written
// so that a loop of it vectorises: libm's expf does not, and a batch-32 step needs millions.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;          // keeps 2^n a normal float; exp(-87) ~ 1.6e-38 ~ 0
  const float shifter = 12582912.0f;    // 1.5 * 2^23: adding it rounds to an integer
  const float shifted = x * 1.44269504088896341f + shifter;
  const float n = shifted - shifter;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  const int32_t exponent = (bits - 0x4B400000 + 127) << 23;   // 2^n as float bits
  float two_n;
  std::memcpy(&two_n, &exponent, sizeof two_n);
  return y * two_n;
}

// ---------------------------------------------------------------------- plain loops
// A cache row as float32: the row itself for a float32 cache, else converted into `buf`.
template <typename scalar_t>
inline const float* row_as_float(const scalar_t* row, int64_t D, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row;
  } else {
    for (int64_t j = 0; j < D; ++j) buf[j] = static_cast<float>(row[j]);
    return buf;
  }
}

// s[g * stride] = scale * dot(q[g], k) for the G query rows q[g] = q + g * D.
template <typename scalar_t>
inline void score_row_plain(const float* q, int64_t G, int64_t D, const scalar_t* key,
                            float scale, float* s, int64_t stride, float* buf) {
  const float* k = row_as_float(key, D, buf);
  for (int64_t g = 0; g < G; ++g) {
    const float* qg = q + g * D;
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t j = 0; j < D; ++j) acc += qg[j] * k[j];
    s[g * stride] = acc * scale;
  }
}

// out[g] += w[g * stride] * v for the G output rows out[g] = out + g * D.
template <typename scalar_t>
inline void accumulate_row_plain(float* out, int64_t G, int64_t D, const scalar_t* value,
                                 const float* w, int64_t stride, float* buf) {
  const float* v = row_as_float(value, D, buf);
  for (int64_t g = 0; g < G; ++g) {
    const float wg = w[g * stride];
    float* o = out + g * D;
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) o[j] += wg * v[j];
  }
}

// Spans: `count` consecutive tokens of one block, rows `row` elements apart.
template <typename scalar_t>
inline void score_span_plain(const float* q, int64_t G, int64_t D, const scalar_t* keys,
                             int64_t row, int64_t count, float scale, float* s, int64_t stride,
                             float* buf) {
  for (int64_t j = 0; j < count; ++j)
    score_row_plain(q, G, D, keys + j * row, scale, s + j, stride, buf);
}

template <typename scalar_t>
inline void accumulate_span_plain(float* out, int64_t G, int64_t D, const scalar_t* values,
                                  int64_t row, int64_t count, const float* w, int64_t stride,
                                  float* buf) {
  for (int64_t j = 0; j < count; ++j)
    accumulate_row_plain(out, G, D, values + j * row, w + j, stride, buf);
}

// ------------------------------------------------------------------------- AVX-512
#if KVPORT_AVX512
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {    // bf16 = the high half of a float32
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Lane j of the result = the sum of a[j]'s 16 lanes: a 16x16 transpose folded into the adds
// (45 instructions for 16 dot products; one horizontal sum each costs ~10).
inline __m512 sum_lanes16(__m512 a[16]) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)      // per 128-bit lane: [a0 02, a1 02, a0 13, a1 13] partials
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                         _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {    // per 128-bit lane: keys 4i..4i+3, that lane's partial
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 d0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x44),
                                  _mm512_shuffle_f32x4(c[0], c[1], 0xEE));
  const __m512 d1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x44),
                                  _mm512_shuffle_f32x4(c[2], c[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, 0x88), _mm512_shuffle_f32x4(d0, d1, 0xDD));
}

// Up to 16 keys at a time per query row; the keys are re-read from L1 for each of the G
// query rows (16 accumulators plus the query fill the registers).
template <typename scalar_t, int kD>
inline void score_span_avx512(const float* q, int64_t G, const scalar_t* keys, int64_t row,
                              int64_t count, float scale, float* s, int64_t stride) {
  constexpr int kC = kD / 16;
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t j0 = 0; j0 < count; j0 += 16) {
    const int n = static_cast<int>(std::min<int64_t>(count - j0, 16));
    const __mmask16 mask = static_cast<__mmask16>(n == 16 ? 0xFFFF : (1u << n) - 1);
    const scalar_t* k0 = keys + j0 * row;
    for (int64_t g = 0; g < G; ++g) {
      __m512 qv[kC], a[16];
      for (int c = 0; c < kC; ++c) qv[c] = _mm512_loadu_ps(q + g * kD + 16 * c);
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) {
        a[j] = _mm512_setzero_ps();
        if (j < n)
          for (int c = 0; c < kC; ++c)
            a[j] = _mm512_fmadd_ps(qv[c], load16(k0 + j * row + 16 * c), a[j]);
      }
      _mm512_mask_storeu_ps(s + g * stride + j0, mask, _mm512_mul_ps(sum_lanes16(a), vscale));
    }
  }
}

// The output rows stay in registers over the span (two accumulator sets, even and odd
// tokens, halve the FMA dependency chains); the values are re-read from L1 per query row.
template <typename scalar_t, int kD>
inline void accumulate_span_avx512(float* out, int64_t G, const scalar_t* values, int64_t row,
                                   int64_t count, const float* w, int64_t stride) {
  constexpr int kC = kD / 16;
  for (int64_t g = 0; g < G; ++g) {
    const float* wg = w + g * stride;
    float* o = out + g * kD;
    __m512 even[kC], odd[kC];
    for (int c = 0; c < kC; ++c) {
      even[c] = _mm512_loadu_ps(o + 16 * c);
      odd[c] = _mm512_setzero_ps();
    }
    int64_t j = 0;
    for (; j + 1 < count; j += 2) {
      const __m512 w0 = _mm512_set1_ps(wg[j]), w1 = _mm512_set1_ps(wg[j + 1]);
      const scalar_t* v0 = values + j * row;
      for (int c = 0; c < kC; ++c) {
        even[c] = _mm512_fmadd_ps(w0, load16(v0 + 16 * c), even[c]);
        odd[c] = _mm512_fmadd_ps(w1, load16(v0 + row + 16 * c), odd[c]);
      }
    }
    if (j < count) {
      const __m512 w0 = _mm512_set1_ps(wg[j]);
      for (int c = 0; c < kC; ++c)
        even[c] = _mm512_fmadd_ps(w0, load16(values + j * row + 16 * c), even[c]);
    }
    for (int c = 0; c < kC; ++c) _mm512_storeu_ps(o + 16 * c, _mm512_add_ps(even[c], odd[c]));
  }
}
#endif

// ------------------------------------------------------------------------ dispatch
// kD: the head size when known at compile time (64, 128), else 0 and D says.
// s[g * stride + j] = scale * dot(q[g], key_j) for key_j = keys + j * row, j < count.
template <typename scalar_t, int kD>
inline void score_span(const float* q, int64_t G, int64_t D, const scalar_t* keys, int64_t row,
                       int64_t count, float scale, float* s, int64_t stride, float* buf) {
#if KVPORT_AVX512
  if constexpr (kD > 0 && kD % 16 == 0) {
    score_span_avx512<scalar_t, kD>(q, G, keys, row, count, scale, s, stride);
    return;
  }
#endif
  score_span_plain(q, G, kD > 0 ? kD : D, keys, row, count, scale, s, stride, buf);
}

// out[g] += sum_j w[g * stride + j] * value_j for value_j = values + j * row, j < count.
template <typename scalar_t, int kD>
inline void accumulate_span(float* out, int64_t G, int64_t D, const scalar_t* values,
                            int64_t row, int64_t count, const float* w, int64_t stride,
                            float* buf) {
#if KVPORT_AVX512
  if constexpr (kD > 0 && kD % 16 == 0) {
    accumulate_span_avx512<scalar_t, kD>(out, G, values, row, count, w, stride);
    return;
  }
#endif
  accumulate_span_plain(out, G, kD > 0 ? kD : D, values, row, count, w, stride, buf);
}

}  // namespace kvport_cpu
