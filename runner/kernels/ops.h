// The torch ops (torch.ops.runner.*), one declaration each for ops.cpp's registrations, and the
// checks and shapes every op shares. Each op's file says what its operands are.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace runner {

// linear.cpp
at::Tensor linear(const at::Tensor& x, const at::Tensor& w);
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, bool int8_x = false);
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& zeros,
                       int64_t groupsize, bool int8_x);
at::Tensor expert_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& ids);
at::Tensor int8_expert_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                              const at::Tensor& ids);
at::Tensor int4_expert_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                              const at::Tensor& zeros, int64_t groupsize, const at::Tensor& ids);

// dequantize.cpp
at::Tensor dequantize_int8(const at::Tensor& w, const at::Tensor& scales);
at::Tensor dequantize_int4(const at::Tensor& w, const at::Tensor& scales, const at::Tensor& zeros, int64_t groupsize);

// gguf.cpp
at::Tensor gguf_linear(const at::Tensor& x, const at::Tensor& blocks, int64_t type, bool int8_x);
at::Tensor dequantize_gguf(const at::Tensor& blocks, int64_t type, at::ScalarType dtype);

// elementwise.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor swiglu(const at::Tensor& gate_up);

// kv_cache.cpp
at::Tensor rope_write(const at::Tensor& qkv, const at::Tensor& cos_sin, at::Tensor& k_cache, at::Tensor& v_cache,
                      const at::Tensor& input_pos, int64_t n_heads, int64_t n_kv_heads,
                      const std::optional<at::Tensor>& k_scales, const std::optional<at::Tensor>& v_scales);

// attend.cpp
at::Tensor attend(const at::Tensor& qkv, const at::Tensor& cos_sin, at::Tensor& k_cache, at::Tensor& v_cache,
                  const at::Tensor& input_pos, int64_t n_heads, int64_t n_kv_heads, int64_t window,
                  const std::optional<at::Tensor>& k_scales, const std::optional<at::Tensor>& v_scales);

// causal_attention.cpp
at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& input_pos, int64_t window, const std::optional<at::Tensor>& k_scales,
                            const std::optional<at::Tensor>& v_scales);

// decode_layers.cpp
at::Tensor decode_layers(const at::Tensor& x, at::TensorList norms, double eps, at::TensorList weights,
                         at::IntArrayRef parts, at::IntArrayRef groupsizes, const at::Tensor& cos_sin,
                         at::TensorList k_caches, at::TensorList v_caches, at::TensorList k_scales,
                         at::TensorList v_scales, const at::Tensor& input_pos, int64_t n_heads, int64_t n_kv_heads,
                         int64_t window, at::IntArrayRef int8_x);

// --- what the ops share --------------------------------------------------------------------------

// An uninitialised tensor shaped like t but for its last dimension, n.
inline at::Tensor with_last(const at::Tensor& t, int64_t n) {
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  shape.back() = n;
  return at::empty(shape, t.options());
}

inline void check_cpu_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "runner::", name, ": CPU tensors only, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              "runner::", name, ": float32 or bfloat16 only, got ", t.scalar_type());
}

}  // namespace runner
