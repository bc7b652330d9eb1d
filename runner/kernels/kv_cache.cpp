// KV caches: RoPE, the cache write (float, or int8 with a scale per position and key head), and the
// checks on caches and positions every attention op makes; and the op for a prompt's write:
//
//   rope_write(qkv, cos_sin, k_cache!, v_cache!, pos, n_heads, n_kv_heads) -> q [1, H, T, hd]
//                                                        a prompt: RoPE and the cache write, for
//                                                        causal_attention to follow
#include <ATen/Parallel.h>

#include "attention.h"
#include "ops.h"

namespace runner {

template <typename T>
void rope(const T* in, const float* cos, const float* sin, int64_t hd, T* out) {
  const int64_t half = hd / 2;
  for (int64_t d = 0; d < hd; ++d) {
    const float rotated = d < half ? -widen(in[d + half]) : widen(in[d - half]);
    const float a = round_to<T>(widen(in[d]) * round_to<T>(cos[d]));
    const float b = round_to<T>(rotated * round_to<T>(sin[d]));
    out[d] = static_cast<T>(a + b);
  }
}

template <typename T>
void CacheRows<T>::write(int64_t at, const T* k_in, const T* v_in, const float* cos, const float* sin, int64_t hd,
                         T* rotated) const {
  if (kq == nullptr) {
    rope(k_in, cos, sin, hd, k + at * hd);
    std::copy(v_in, v_in + hd, v + at * hd);
    return;
  }
  rope(k_in, cos, sin, hd, rotated);
  ks[at] = quantize_row(rotated, hd, kq + at * hd);
  vs[at] = quantize_row(v_in, hd, vq + at * hd);
}

bool int8_cache(const char* name, const at::Tensor& k_cache, const std::optional<at::Tensor>& k_scales,
                const std::optional<at::Tensor>& v_scales) {
  TORCH_CHECK(k_scales.has_value() == v_scales.has_value(), "runner::", name,
              ": k_scales and v_scales come together (an int8 cache) or not at all");
  if (!k_scales.has_value()) return false;
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.scalar_type() == at::kChar, "runner::", name,
              ": scales come with int8 caches [B, n_kv_heads, L, head_dim], got ", k_cache.scalar_type(), " ",
              k_cache.sizes());
  for (const at::Tensor& scales : {*k_scales, *v_scales})
    TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.sizes() == k_cache.sizes().slice(0, 3),
                "runner::", name, ": an int8 cache's scales must be contiguous fp32 ", k_cache.sizes().slice(0, 3),
                ", got ", scales.scalar_type(), " ", scales.sizes());
  return true;
}

at::Tensor checked_positions(const char* name, int64_t B, int64_t count, at::ScalarType dtype,
                             const at::Tensor& cos_sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& input_pos, int64_t H, int64_t KVH, bool int8) {
  TORCH_CHECK(k_cache.dim() == 4, "runner::", name, ": caches must be [B, n_kv_heads, L, head_dim], got ",
              k_cache.sizes());
  const int64_t L = k_cache.size(2), hd = k_cache.size(3);
  const at::ScalarType stored = int8 ? at::kChar : dtype;
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.size(0) == B && k_cache.size(1) == KVH && k_cache.scalar_type() == stored &&
                  v_cache.scalar_type() == stored,
              "runner::", name, ": caches must be contiguous [B, n_kv_heads, L, head_dim] in qkv's dtype (int8 with scales)");
  TORCH_CHECK(H % KVH == 0 && hd % 2 == 0, "runner::", name, ": n_heads must be a multiple of n_kv_heads");
  TORCH_CHECK(input_pos.scalar_type() == at::kLong && (input_pos.numel() == count || input_pos.numel() == B * count),
              "runner::", name, ": input_pos must be T int64 positions, or [B, T]");
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat && cos_sin.numel() == input_pos.numel() * 2 * hd, "runner::", name,
              ": cos_sin must be fp32 [..., 2, head_dim], one per position");
  // Shared positions ([T]) are spelled out per row, as cos_sin then is: [B * T] each.
  auto positions = input_pos.reshape({-1, count}).expand({B, count}).contiguous();
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < B * count; ++i)
    TORCH_CHECK(pos[i] >= 0 && pos[i] < L, "runner::", name, ": position ", pos[i], " is outside the cache of ", L);
  return positions;
}

at::Tensor checked_positions(const char* name, const at::Tensor& qkv, const at::Tensor& cos_sin,
                             const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& input_pos,
                             int64_t H, int64_t KVH, bool int8) {
  check_cpu_float(qkv, name);
  TORCH_CHECK(k_cache.dim() == 4 && qkv.dim() == 3 && qkv.size(2) == (H + 2 * KVH) * k_cache.size(3), "runner::", name,
              ": qkv must be [B, T, (n_heads + 2 n_kv_heads) head_dim], got ", qkv.sizes());
  return checked_positions(name, qkv.size(0), qkv.size(1), qkv.scalar_type(), cos_sin, k_cache, v_cache, input_pos,
                           H, KVH, int8);
}

at::Tensor rotations(const at::Tensor& cos_sin, int64_t B, int64_t count, int64_t hd) {
  return cos_sin.numel() == count * 2 * hd ? cos_sin.reshape({1, count, 2 * hd}).expand({B, count, 2 * hd}).contiguous()
                                           : cos_sin.contiguous();
}

namespace {

// RoPE on every head of T tokens; keys and values go into the cache, queries into q [H, T, hd].
// An int8 cache (kq, vq and their scales ks, vs instead of kc, vc) gets them quantized.
template <typename T>
void rope_write_impl(const T* qkv, const float* cos_sin, T* kc, T* vc, T* q, const int64_t* pos, int64_t count,
                     int64_t H, int64_t KVH, int64_t hd, int64_t L, int8_t* kq, int8_t* vq, float* ks, float* vs) {
  const int64_t width = (H + 2 * KVH) * hd;
  at::parallel_for(0, count, 16, [&](int64_t begin, int64_t end) {
    std::vector<T> rotated(hd);
    for (int64_t t = begin; t < end; ++t) {
      const float* cos = cos_sin + t * 2 * hd;
      const float* sin = cos + hd;
      const T* row = qkv + t * width;
      for (int64_t h = 0; h < H; ++h) rope(row + h * hd, cos, sin, hd, q + (h * count + t) * hd);
      for (int64_t g = 0; g < KVH; ++g)
        CacheRows<T>{kc, vc, kq, vq, ks, vs}.write(g * L + pos[t], row + (H + g) * hd, row + (H + KVH + g) * hd, cos,
                                                   sin, hd, rotated.data());
    }
  });
}

}  // namespace

at::Tensor rope_write(const at::Tensor& qkv, const at::Tensor& cos_sin, at::Tensor& k_cache, at::Tensor& v_cache,
                      const at::Tensor& input_pos, int64_t n_heads, int64_t n_kv_heads,
                      const std::optional<at::Tensor>& k_scales, const std::optional<at::Tensor>& v_scales) {
  const bool int8 = int8_cache("rope_write", k_cache, k_scales, v_scales);
  auto positions = checked_positions("rope_write", qkv, cos_sin, k_cache, v_cache, input_pos, n_heads, n_kv_heads, int8);
  TORCH_CHECK(qkv.size(0) == 1, "runner::rope_write: one row only (a prompt), got ", qkv.size(0));
  const int64_t L = k_cache.size(2), hd = k_cache.size(3), count = qkv.size(1);
  auto qc = qkv.contiguous();
  auto cs = cos_sin.contiguous();
  auto q = at::empty({1, n_heads, count, hd}, qkv.options());
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  if (qkv.scalar_type() == at::kBFloat16)
    rope_write_impl(qc.const_data_ptr<BFloat16>(), cs.const_data_ptr<float>(), maybe<BFloat16>(k_cache, !int8),
                    maybe<BFloat16>(v_cache, !int8), q.mutable_data_ptr<BFloat16>(), pos, count, n_heads, n_kv_heads,
                    hd, L, maybe<int8_t>(k_cache, int8), maybe<int8_t>(v_cache, int8), maybe(k_scales), maybe(v_scales));
  else
    rope_write_impl(qc.const_data_ptr<float>(), cs.const_data_ptr<float>(), maybe<float>(k_cache, !int8),
                    maybe<float>(v_cache, !int8), q.mutable_data_ptr<float>(), pos, count, n_heads, n_kv_heads, hd, L,
                    maybe<int8_t>(k_cache, int8), maybe<int8_t>(v_cache, int8), maybe(k_scales), maybe(v_scales));
  return q;
}

template void rope(const float*, const float*, const float*, int64_t, float*);
template void rope(const BFloat16*, const float*, const float*, int64_t, BFloat16*);
template struct CacheRows<float>;
template struct CacheRows<BFloat16>;

}  // namespace runner
