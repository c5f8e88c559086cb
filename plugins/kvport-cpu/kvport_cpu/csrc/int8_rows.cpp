// The int8 linear layer's ops (the arithmetic is in int8_linear.h):
//
//   quantize_rows(x [M, K] float32) -> (q [M, K] int8, scale [M, 1] float32)
//   rescale_rows(acc [M, N] int32, scale [M, 1] float32, weight_scale [N] float32,
//                bias [N] float32 or None) -> [M, N] float32
//   int8_linear(x [M, K] float32, qweight [N, K] int8, weight_scale [N], bias [N] or None)
//       -> [M, N] float32: all three steps (quantize, int8 product, rescale) in one call
//
// Each is bit-identical to the torch ops it replaces (kvport/models/quantization.py).
#include <torch/library.h>

#include <tuple>

#include "int8_linear.h"

namespace {

using namespace kvport_cpu;

std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
              "quantize_rows: x must be a 2-D float32 CPU tensor, got ", x.scalar_type(),
              " with ", x.dim(), " dims on ", x.device());
  const at::Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  at::Tensor q = at::empty({M, K}, xc.options().dtype(at::kChar));
  at::Tensor scale = at::empty({M, 1}, xc.options());
  quantize_rows_into(xc.data_ptr<float>(), M, K, q.data_ptr<int8_t>(), scale.data_ptr<float>());
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
  rescale_rows_into(a.data_ptr<int32_t>(), M, N, rs.data_ptr<float>(), cs.data_ptr<float>(),
                    has_bias ? b.data_ptr<float>() : nullptr, out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY(kvport_cpu_int8, m) {
  m.def("quantize_rows(Tensor x) -> (Tensor, Tensor)");
  m.def("rescale_rows(Tensor acc, Tensor scale, Tensor weight_scale, Tensor? bias) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor qweight, Tensor weight_scale, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(kvport_cpu_int8, CPU, m) {
  m.impl("quantize_rows", &quantize_rows);
  m.impl("rescale_rows", &rescale_rows);
  m.impl("int8_linear", &int8_linear);
}
