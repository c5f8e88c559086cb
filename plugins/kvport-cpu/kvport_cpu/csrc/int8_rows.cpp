// The two element-wise halves of kvport's W8A8 dynamic int8 linear layer
// (kvport/models/quantization.py), each one pass over its rows instead of five or six torch
// ops: at decode sizes the per-op dispatch cost more than the arithmetic.
//
//   quantize_rows(x [M, K] float32) -> (q [M, K] int8, scale [M, 1] float32)
//       scale = max(max |x_row|, 1e-12) / 127;  q = round_half_even(x / scale)
//   rescale_rows(acc [M, N] int32, scale [M, 1] float32, weight_scale [N] float32,
//                bias [N] float32 or None) -> [M, N] float32
//       (float(acc) * scale) * weight_scale (+ bias)
//
// Both compute exactly what the torch ops they replace compute, in the same order and
// rounding (a division, not a multiply by the reciprocal; the bias added in its own pass so
// no multiply-add is contracted), so outputs are bit-identical to the pure-torch path.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

namespace {

constexpr float kInt8Max = 127.0f;

std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "quantize_rows: x must be a 2-D float32 CPU tensor, got ", x.scalar_type(),
              " with ", x.dim(), " dims on ", x.device());
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  at::Tensor q = at::empty({M, K}, xc.options().dtype(at::kChar));
  at::Tensor scale = at::empty({M, 1}, xc.options());
  const float* src = xc.data_ptr<float>();
  int8_t* dst = q.data_ptr<int8_t>();
  float* scales = scale.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* row = src + m * K;
      float amax = 0.0f;
#pragma omp simd reduction(max : amax)
      for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(row[k]));
      const float s = std::max(amax, 1e-12f) / kInt8Max;
      scales[m] = s;
      int8_t* out = dst + m * K;
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) out[k] = static_cast<int8_t>(std::nearbyint(row[k] / s));
    }
  });
  return {q, scale};
}

at::Tensor rescale_rows(const at::Tensor& acc, const at::Tensor& scale,
                        const at::Tensor& weight_scale, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(acc.device().is_cpu() && acc.scalar_type() == at::kInt && acc.dim() == 2,
              "rescale_rows: acc must be a 2-D int32 CPU tensor, got ", acc.scalar_type());
  const int64_t M = acc.size(0), N = acc.size(1);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == M,
              "rescale_rows: scale must hold one float32 per row (", M, "), got ",
              scale.numel(), " ", scale.scalar_type());
  TORCH_CHECK(weight_scale.scalar_type() == at::kFloat && weight_scale.numel() == N,
              "rescale_rows: weight_scale must hold one float32 per column (", N, "), got ",
              weight_scale.numel(), " ", weight_scale.scalar_type());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == N,
                "rescale_rows: bias must hold one float32 per column (", N, ")");
  }
  const at::Tensor a = acc.contiguous(), rs = scale.contiguous(), cs = weight_scale.contiguous();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty({M, N}, acc.options().dtype(at::kFloat));
  const int32_t* src = a.data_ptr<int32_t>();
  const float* row_scale = rs.data_ptr<float>();
  const float* col_scale = cs.data_ptr<float>();
  const float* bias_ptr = has_bias ? b.data_ptr<float>() : nullptr;
  float* dst = out.data_ptr<float>();
  // Parallel over rows, and over columns too when there are few rows (decode, the LM head).
  const int64_t col_chunk = M >= at::get_num_threads() ? N : std::max<int64_t>(1024, N / 8);
  const int64_t chunks_per_row = (N + col_chunk - 1) / col_chunk;
  at::parallel_for(0, M * chunks_per_row, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t m = item / chunks_per_row;
      const int64_t n0 = (item % chunks_per_row) * col_chunk;
      const int64_t n1 = std::min(N, n0 + col_chunk);
      const float s = row_scale[m];
      const int32_t* in = src + m * N;
      float* o = dst + m * N;
#pragma omp simd
      for (int64_t n = n0; n < n1; ++n) o[n] = (static_cast<float>(in[n]) * s) * col_scale[n];
      if (bias_ptr != nullptr) {
        for (int64_t n = n0; n < n1; ++n) o[n] += bias_ptr[n];
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(kvport_cpu_int8, m) {
  m.def("quantize_rows(Tensor x) -> (Tensor, Tensor)");
  m.def("rescale_rows(Tensor acc, Tensor scale, Tensor weight_scale, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvport_cpu_int8, CPU, m) {
  m.impl("quantize_rows", &quantize_rows);
  m.impl("rescale_rows", &rescale_rows);
}
