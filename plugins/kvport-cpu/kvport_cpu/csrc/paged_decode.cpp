// The paged decode ops (the kernel is in paged_decode.h, shared with llama_decode.cpp).
#include <torch/library.h>

#include "paged_decode.h"

namespace {

using kvport_cpu::paged_decode_out;

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& kv_cache,
                        const at::Tensor& block_table, const at::Tensor& seq_lens,
                        double scale, std::optional<int64_t> sliding_window) {
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  paged_decode_out(out, q, kv_cache, block_table, seq_lens, scale, sliding_window);
  return out;
}

}  // namespace

// paged_decode_out writes into a caller's buffer (the backend's own allocation, which its
// tests poison with NaN to catch unwritten elements).
TORCH_LIBRARY(kvport_cpu, m) {
  m.def("paged_decode(Tensor q, Tensor kv_cache, Tensor block_table, Tensor seq_lens, "
        "float scale, int? sliding_window=None) -> Tensor");
  m.def("paged_decode_out(Tensor(a!) out, Tensor q, Tensor kv_cache, Tensor block_table, "
        "Tensor seq_lens, float scale, int? sliding_window=None) -> ()");
}

TORCH_LIBRARY_IMPL(kvport_cpu, CPU, m) {
  m.impl("paged_decode", &paged_decode);
  m.impl("paged_decode_out", &paged_decode_out);
}
