// A whole decode step of a Llama-family decoder (kvport/models/llama.py) in one native call.
//
// At one token per step the model's Python and per-op dispatch cost more than its
// arithmetic: ~190 torch ops per layer, ~34 ms of a 48 ms token on two cores
// (docs/benchmarks.md). This runs every layer of a step whose requests all have exactly one
// new token: residual add + RMSNorm, the fused qkv projection, Qwen3's per-head q/k norms,
// rotary embedding, the KV write, paged attention (paged_decode.h, reading blocks in place),
// the output projection, the gated SiLU MLP and the final norm. The embedding lookup and the
// LM head stay in the model.
//
// Linear layers are float32 (ATen's matmul) or kvport's W8A8 int8 (int8_linear.h,
// bit-identical to Int8DynamicLinear). Element-wise math follows the torch modules' order of
// operations in float32; it differs from them only in the rounding of sums and of exp.
//
// Python builds a `LlamaDecoder` once from the loaded model (kvport_cpu/native_decoder.py)
// and calls `forward` per step; the class holds references to the model's own tensors.
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "int8_linear.h"
#include "paged_decode.h"

namespace {

using namespace kvport_cpu;

// A projection: float32 `weight` [N, K], or int8 `weight` with `scale` [N]; `bias` optional.
struct Linear {
  at::Tensor weight, scale, bias;
  int64_t N = 0, K = 0;

  bool int8() const { return scale.defined(); }

  void operator()(const float* x, int64_t M, float* out, Int8Workspace& ws) const {
    if (int8()) {
      int8_linear_into(x, M, K, weight, scale.data_ptr<float>(),
                       bias.defined() ? bias.data_ptr<float>() : nullptr, out, ws);
      return;
    }
    const auto f32 = at::TensorOptions().dtype(at::kFloat);
    const at::Tensor in = at::from_blob(const_cast<float*>(x), {M, K}, f32);
    at::Tensor y = at::from_blob(out, {M, N}, f32);
    if (bias.defined()) {
      at::addmm_out(y, bias, in, weight.t());      // F.linear's own call with a bias
    } else {
      at::mm_out(y, in, weight.t());
    }
  }
};

// An absent optional tensor arrives as an empty one (TorchScript lists hold no None).
at::Tensor optional_tensor(const at::Tensor& t) { return t.numel() == 0 ? at::Tensor() : t; }

Linear make_linear(const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& bias,
                   int64_t in_features, const char* name) {
  Linear l{weight, optional_tensor(scale), optional_tensor(bias), weight.size(0), weight.size(1)};
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && l.K == in_features,
              "LlamaDecoder: ", name, " weight must be a contiguous [N, ", in_features,
              "] matrix, got ", weight.sizes());
  if (l.int8()) {
    TORCH_CHECK(weight.scalar_type() == at::kChar && l.scale.scalar_type() == at::kFloat &&
                    l.scale.numel() == l.N && l.scale.is_contiguous(),
                "LlamaDecoder: ", name, " int8 weight needs one float32 scale per row");
  } else {
    TORCH_CHECK(weight.scalar_type() == at::kFloat, "LlamaDecoder: ", name,
                " weight must be float32 or int8 with scales, got ", weight.scalar_type());
  }
  if (l.bias.defined()) {
    TORCH_CHECK(l.bias.scalar_type() == at::kFloat && l.bias.numel() == l.N &&
                    l.bias.is_contiguous(),
                "LlamaDecoder: ", name, " bias must be float32 [", l.N, "]");
  }
  return l;
}

struct Layer {
  at::Tensor input_norm, post_norm, q_norm, k_norm;   // q_norm/k_norm: Qwen3, else undefined
  Linear qkv, o, gate_up, down;
};

// out = norm(residual) * w, where residual += added first (when given): RMSNorm.forward's
// (x + residual) then x * rsqrt(mean(x^2) + eps), then weight * x.
void add_rms_norm(const float* added, float* residual, const float* w, int64_t M, int64_t C,
                  float eps, float* out) {
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      float* r = residual + m * C;
      if (added != nullptr) {
        const float* a = added + m * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) r[c] = a[c] + r[c];
      }
      float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
      for (int64_t c = 0; c < C; ++c) ss += r[c] * r[c];
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(C) + eps);
      float* o = out + m * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) o[c] = w[c] * (r[c] * inv);
    }
  });
}

// The same norm over each of `heads` rows of D in place (Qwen3's q_norm / k_norm).
void head_rms_norm(float* x, int64_t heads, int64_t D, const float* w, float eps) {
  for (int64_t h = 0; h < heads; ++h) {
    float* r = x + h * D;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t d = 0; d < D; ++d) ss += r[d] * r[d];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + eps);
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) r[d] = w[d] * (r[d] * inv);
  }
}

// dst = the "rotate_half" rotation of src (one head of D); cos_sin: [D/2 cos, D/2 sin].
void rotate(const float* src, const float* cos_sin, int64_t D, float* dst) {
  const int64_t half = D / 2;
  const float* cs = cos_sin;
  const float* sn = cos_sin + half;
#pragma omp simd
  for (int64_t j = 0; j < half; ++j) {
    const float x1 = src[j], x2 = src[j + half];
    dst[j] = x1 * cs[j] - x2 * sn[j];
    dst[j + half] = x2 * cs[j] + x1 * sn[j];
  }
}

// out[m, i] = silu(gu[m, i]) * gu[m, I + i]; silu(x) = x * sigmoid(x), sigmoid from
// exp(-|x|) so the vectorisable exp of row_ops.h applies.
void silu_mul(const float* gu, int64_t M, int64_t I, float* out) {
  at::parallel_for(0, M, 4, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* gate = gu + m * 2 * I;
      const float* up = gate + I;
      float* o = out + m * I;
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) {
        const float x = gate[i];
        const float e = exp_nonpositive(-std::fabs(x));
        const float sigmoid = x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
        o[i] = x * sigmoid * up[i];
      }
    }
  });
}

class LlamaDecoder : public torch::CustomClassHolder {
 public:
  LlamaDecoder(int64_t hidden, int64_t num_heads, int64_t num_kv_heads, int64_t head_size,
               double eps, double scale, int64_t sliding_window, at::Tensor final_norm,
               at::Tensor cos_sin_cache)
      : C_(hidden), H_(num_heads), KVH_(num_kv_heads), D_(head_size), eps_(eps),
        scale_(scale), window_(sliding_window), final_norm_(final_norm),
        cos_sin_(cos_sin_cache) {
    TORCH_CHECK(H_ > 0 && KVH_ > 0 && H_ % KVH_ == 0 && D_ % 2 == 0,
                "LlamaDecoder: bad head layout ", H_, " heads, ", KVH_, " KV heads, size ", D_);
    check_vector(final_norm_, C_, "final norm");
    TORCH_CHECK(cos_sin_.scalar_type() == at::kFloat && cos_sin_.dim() == 2 &&
                    cos_sin_.size(1) == D_ && cos_sin_.is_contiguous(),
                "LlamaDecoder: cos_sin_cache must be float32 [max_positions, ", D_, "]");
  }

  // tensors: input_norm, post_norm, q_norm, k_norm, then weight, scale, bias of qkv_proj,
  // o_proj, gate_up_proj and down_proj (16 in all; empty tensors for absent ones).
  void add_layer(std::vector<at::Tensor> t) {
    TORCH_CHECK(t.size() == 16, "LlamaDecoder.add_layer takes 16 tensors, got ", t.size());
    Layer l;
    l.input_norm = t[0];
    l.post_norm = t[1];
    l.q_norm = optional_tensor(t[2]);
    l.k_norm = optional_tensor(t[3]);
    check_vector(l.input_norm, C_, "input norm");
    check_vector(l.post_norm, C_, "post-attention norm");
    if (l.q_norm.defined() || l.k_norm.defined()) {
      check_vector(l.q_norm, D_, "q norm");
      check_vector(l.k_norm, D_, "k norm");
    }
    l.qkv = make_linear(t[4], t[5], t[6], C_, "qkv_proj");
    l.o = make_linear(t[7], t[8], t[9], H_ * D_, "o_proj");
    l.gate_up = make_linear(t[10], t[11], t[12], C_, "gate_up_proj");
    TORCH_CHECK(l.gate_up.N % 2 == 0, "LlamaDecoder: gate_up_proj has an odd row count");
    l.down = make_linear(t[13], t[14], t[15], l.gate_up.N / 2, "down_proj");
    TORCH_CHECK(l.qkv.N == (H_ + 2 * KVH_) * D_ && l.o.N == C_ && l.down.N == C_,
                "LlamaDecoder: projection shapes do not fit the head layout");
    layers_.push_back(std::move(l));
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // x [M, hidden] float32 (the embeddings of the step's M tokens, one per request, request
  // i's token at position positions[i]); kv_caches: one [2, blocks, block_size, KV heads,
  // head size] float32 cache per layer; block_table [M, max_blocks], seq_lens [M] (after
  // this token), slot_mapping [M]. Writes each layer's new key and value into its cache and
  // returns the final-norm hidden states [M, hidden].
  at::Tensor forward(at::Tensor x, at::Tensor positions, std::vector<at::Tensor> kv_caches,
                     at::Tensor block_table, at::Tensor seq_lens, at::Tensor slot_mapping) {
    check_step(x, positions, kv_caches, slot_mapping);
    const int64_t M = x.size(0);
    const auto f32 = x.options();
    const int64_t inter = layers_.empty() ? 0 : layers_[0].gate_up.N / 2;
    at::Tensor residual = x.clone();
    at::Tensor h = at::empty({M, C_}, f32), mlp = at::empty({M, C_}, f32);
    at::Tensor qkv = at::empty({M, (H_ + 2 * KVH_) * D_}, f32);
    at::Tensor q = at::empty({M, H_, D_}, f32), attn = at::empty({M, H_, D_}, f32);
    at::Tensor gu = at::empty({M, 2 * inter}, f32), act = at::empty({M, inter}, f32);
    const at::Tensor blocks = block_table.to(at::kLong).contiguous();
    const at::Tensor lens = seq_lens.to(at::kLong).contiguous();
    const int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t* slots = slot_mapping.data_ptr<int64_t>();
    std::optional<int64_t> window;
    if (window_ > 0) window = window_;
    Int8Workspace& ws = workspace_;

    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& l = layers_[i];
      add_rms_norm(i == 0 ? nullptr : mlp.data_ptr<float>(), residual.data_ptr<float>(),
                   l.input_norm.data_ptr<float>(), M, C_, eps_, h.data_ptr<float>());
      l.qkv(h.data_ptr<float>(), M, qkv.data_ptr<float>(), ws);
      write_qkv(l, qkv, M, pos, slots, kv_caches[i], q);
      paged_decode_out(attn, q, kv_caches[i], blocks, lens, scale_, window);
      l.o(attn.data_ptr<float>(), M, mlp.data_ptr<float>(), ws);
      add_rms_norm(mlp.data_ptr<float>(), residual.data_ptr<float>(),
                   l.post_norm.data_ptr<float>(), M, C_, eps_, h.data_ptr<float>());
      l.gate_up(h.data_ptr<float>(), M, gu.data_ptr<float>(), ws);
      silu_mul(gu.data_ptr<float>(), M, inter, act.data_ptr<float>());
      l.down(act.data_ptr<float>(), M, mlp.data_ptr<float>(), ws);
    }
    at::Tensor out = at::empty({M, C_}, f32);
    add_rms_norm(layers_.empty() ? nullptr : mlp.data_ptr<float>(), residual.data_ptr<float>(),
                 final_norm_.data_ptr<float>(), M, C_, eps_, out.data_ptr<float>());
    return out;
  }

 private:
  // q (rotated) into `q`; k (rotated) and v into the cache at each token's slot.
  void write_qkv(const Layer& l, at::Tensor& qkv, int64_t M, const int64_t* pos,
                 const int64_t* slots, at::Tensor& cache, at::Tensor& q) const {
    const int64_t row = (H_ + 2 * KVH_) * D_, kv_row = KVH_ * D_;
    float* keys = cache.data_ptr<float>();
    float* values = keys + cache.size(1) * cache.size(2) * kv_row;
    const float* table = cos_sin_.data_ptr<float>();
    float* qkv_p = qkv.data_ptr<float>();
    float* q_p = q.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) {
      float* src = qkv_p + m * row;
      if (l.q_norm.defined()) {
        head_rms_norm(src, H_, D_, l.q_norm.data_ptr<float>(), eps_);
        head_rms_norm(src + H_ * D_, KVH_, D_, l.k_norm.data_ptr<float>(), eps_);
      }
      const float* cos_sin = table + pos[m] * D_;
      for (int64_t h = 0; h < H_; ++h) rotate(src + h * D_, cos_sin, D_, q_p + (m * H_ + h) * D_);
      float* key = keys + slots[m] * kv_row;
      for (int64_t h = 0; h < KVH_; ++h) rotate(src + (H_ + h) * D_, cos_sin, D_, key + h * D_);
      std::copy(src + (H_ + KVH_) * D_, src + row, values + slots[m] * kv_row);
    }
  }

  void check_vector(const at::Tensor& t, int64_t n, const char* name) const {
    TORCH_CHECK(t.defined() && t.scalar_type() == at::kFloat && t.numel() == n &&
                    t.is_contiguous(),
                "LlamaDecoder: ", name, " must be float32 [", n, "]");
  }

  void check_step(const at::Tensor& x, const at::Tensor& positions,
                  const std::vector<at::Tensor>& kv_caches, const at::Tensor& slot_mapping) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == C_ &&
                    x.is_contiguous(),
                "LlamaDecoder.forward: x must be contiguous float32 [M, ", C_, "], got ",
                x.scalar_type(), " ", x.sizes());
    const int64_t M = x.size(0);
    TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == M &&
                    slot_mapping.scalar_type() == at::kLong && slot_mapping.numel() == M &&
                    positions.is_contiguous() && slot_mapping.is_contiguous(),
                "LlamaDecoder.forward: positions and slot_mapping must be int64 [", M, "]");
    TORCH_CHECK(static_cast<int64_t>(kv_caches.size()) == num_layers(),
                "LlamaDecoder.forward: got ", kv_caches.size(), " KV caches for ", num_layers(),
                " layers");
    const int64_t* pos = positions.data_ptr<int64_t>();
    for (int64_t m = 0; m < M; ++m)
      TORCH_CHECK(pos[m] >= 0 && pos[m] < cos_sin_.size(0), "LlamaDecoder.forward: position ",
                  pos[m], " is outside the rotary table's ", cos_sin_.size(0), " positions");
    if (kv_caches.empty()) return;
    const at::Tensor& first = kv_caches[0];
    for (const at::Tensor& cache : kv_caches) {
      TORCH_CHECK(cache.scalar_type() == at::kFloat && cache.dim() == 5 && cache.size(0) == 2 &&
                      cache.size(3) == KVH_ && cache.size(4) == D_ && cache.is_contiguous() &&
                      cache.sizes() == first.sizes(),
                  "LlamaDecoder.forward: KV caches must be contiguous float32 [2, blocks, "
                  "block_size, ", KVH_, ", ", D_, "], all of one shape, got ",
                  cache.scalar_type(), " ", cache.sizes());
    }
    const int64_t capacity = first.size(1) * first.size(2);   // every layer's, checked above
    const int64_t* slots = slot_mapping.data_ptr<int64_t>();
    for (int64_t m = 0; m < M; ++m)
      TORCH_CHECK(slots[m] >= 0 && slots[m] < capacity, "LlamaDecoder.forward: slot ",
                  slots[m], " is outside the cache's ", capacity, " slots");
  }

  int64_t C_, H_, KVH_, D_;
  float eps_;
  double scale_;
  int64_t window_;              // 0: none
  at::Tensor final_norm_, cos_sin_;
  std::vector<Layer> layers_;
  // Reused across steps: a batch's int32 products pass 128 KiB, where malloc maps fresh
  // pages (a page fault each) on every call. One decoder serves one worker thread.
  Int8Workspace workspace_;
};

}  // namespace

TORCH_LIBRARY(kvport_cpu_llama, m) {
  m.class_<LlamaDecoder>("LlamaDecoder")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, double, double, int64_t, at::Tensor,
                       at::Tensor>())
      .def("add_layer", &LlamaDecoder::add_layer)
      .def("num_layers", &LlamaDecoder::num_layers)
      .def("forward", &LlamaDecoder::forward);
}
