// A prompt's quantized weights made float for torch's GEMM, each value rounded once to the scales'
// dtype: dequantize_int8(w int8 [N, K], scales [N]) -> [N, K], dequantize_int4(w uint8 [N, K/2],
// scales, zeros [N, K/gs], gs) -> [N, K].
#include <ATen/Parallel.h>

#include "ops.h"
#include "vec.h"

namespace runner {
namespace {

// Rows of quantized weights as T, each value rounded once: q * s, or (q - 8) * s + z.
template <typename T>
void dequantize_int8_impl(const int8_t* w, const T* scales, T* y, int64_t N, int64_t K) {
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float s = widen(scales[n]);
      const int8_t* q = w + n * K;
      T* out = y + n * K;
      int64_t k = 0;
      for (; k + kLanes <= K; k += kLanes) vstore(out + k, vload(q + k) * s);
      for (; k < K; ++k) out[k] = static_cast<T>((float)q[k] * s);
    }
  });
}

template <typename T>
void dequantize_int4_impl(const uint8_t* w, const T* scales, const T* zeros, T* y, int64_t N, int64_t K, int64_t gs) {
  const int64_t G = K / gs, per_group = gs / 2;
#if defined(__AVX512BF16__)
  // Word 2i from word i (the even columns), word 2i + 1 from word 16 + i (the odd ones).
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                              6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
#endif
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t g = 0; g < G; ++g) {
        const float s = widen(scales[n * G + g]), z = widen(zeros[n * G + g]);
        const uint8_t* q = w + n * K / 2 + g * per_group;
        T* out = y + n * K + g * gs;
        int64_t b = 0;
        for (; b + kLanes <= per_group; b += kLanes) {  // kLanes bytes: kLanes even and kLanes odd columns
          const vi levels = widen_u8(q + b);
          const vf even = __builtin_convertvector((levels & 0xF) - 8, vf) * s + z;
          const vf odd = __builtin_convertvector((levels >> 4) - 8, vf) * s + z;
#if defined(__AVX512BF16__)
          if constexpr (std::is_same_v<T, BFloat16>) {  // one rounding instruction, one interleave
            const __m512i both = (__m512i)_mm512_cvtne2ps_pbh((__m512)odd, (__m512)even);
            _mm512_storeu_si512(out + 2 * b, _mm512_permutexvar_epi16(interleave, both));
            continue;
          }
#endif
          if constexpr (std::is_same_v<T, BFloat16>) {
            const vu pairs = (bf16_bits(even) >> 16) | bf16_bits(odd);  // even column in the low half
            std::memcpy(out + 2 * b, &pairs, sizeof pairs);
          } else {
            for (int i = 0; i < kLanes; ++i) {
              out[2 * (b + i)] = even[i];
              out[2 * (b + i) + 1] = odd[i];
            }
          }
        }
        for (; b < per_group; ++b) {  // even column low, odd high
          out[2 * b] = static_cast<T>((float)((q[b] & 0xF) - 8) * s + z);
          out[2 * b + 1] = static_cast<T>((float)((q[b] >> 4) - 8) * s + z);
        }
      }
  });
}

}  // namespace

at::Tensor dequantize_int8(const at::Tensor& w, const at::Tensor& scales) {
  check_cpu_float(scales, "dequantize_int8");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kChar && scales.numel() == w.size(0),
              "runner::dequantize_int8: w must be int8 [N, K] and scales [N]");
  auto wc = w.contiguous();
  auto sc = scales.contiguous();
  auto y = at::empty(w.sizes(), scales.options());
  if (scales.scalar_type() == at::kBFloat16)
    dequantize_int8_impl(wc.const_data_ptr<int8_t>(), sc.const_data_ptr<BFloat16>(), y.mutable_data_ptr<BFloat16>(),
                         w.size(0), w.size(1));
  else
    dequantize_int8_impl(wc.const_data_ptr<int8_t>(), sc.const_data_ptr<float>(), y.mutable_data_ptr<float>(),
                         w.size(0), w.size(1));
  return y;
}

at::Tensor dequantize_int4(const at::Tensor& w, const at::Tensor& scales, const at::Tensor& zeros, int64_t groupsize) {
  check_cpu_float(scales, "dequantize_int4");
  const int64_t N = w.size(0), K = 2 * w.size(1);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && groupsize > 0 && groupsize % 2 == 0 && K % groupsize == 0,
              "runner::dequantize_int4: w must be uint8 [N, K / 2] with groupsize dividing K");
  TORCH_CHECK(scales.sizes() == zeros.sizes() && scales.dim() == 2 && scales.size(0) == N &&
                  scales.size(1) == K / groupsize && zeros.scalar_type() == scales.scalar_type(),
              "runner::dequantize_int4: scales and zeros must be [N, K / groupsize] in one dtype");
  auto wc = w.contiguous();
  auto sc = scales.contiguous();
  auto zc = zeros.contiguous();
  auto y = at::empty({N, K}, scales.options());
  if (scales.scalar_type() == at::kBFloat16)
    dequantize_int4_impl(wc.const_data_ptr<uint8_t>(), sc.const_data_ptr<BFloat16>(), zc.const_data_ptr<BFloat16>(),
                         y.mutable_data_ptr<BFloat16>(), N, K, groupsize);
  else
    dequantize_int4_impl(wc.const_data_ptr<uint8_t>(), sc.const_data_ptr<float>(), zc.const_data_ptr<float>(),
                         y.mutable_data_ptr<float>(), N, K, groupsize);
  return y;
}


}  // namespace runner
