// The float and int8 GEMV: weight rows streamed against a few rows of x, fp32 accumulation.
#include <ATen/Parallel.h>

#include <algorithm>

#include "gemv.h"

namespace runner {
namespace {

// W: the weights' type (fp32, bf16, int8: weight-only int8 takes this loop on every target; on
// AVX-512 it beat a hand-written loop of masked 16-byte steps, 20 against 17 GB/s); X: x's.
template <typename W, typename X = W>
void dot_rows(const X* x, const W* w, int64_t K, int64_t rows, float* out) {
  constexpr int64_t step = kChains * kLanes;
  for (int64_t r = 0; r < rows; ++r, w += K) {
    vf a[kChains] = {};
    int64_t k = 0;
    for (; k + step <= K; k += step) {
      ahead(w + k, step * sizeof(W));
      for (int c = 0; c < kChains; ++c) a[c] += vload(w + k + c * kLanes) * vload(x + k + c * kLanes);
    }
    for (; k + kLanes <= K; k += kLanes) a[0] += vload(w + k) * vload(x + k);
    float total = hsum((a[0] + a[1]) + (a[2] + a[3]));
    for (; k < K; ++k) total += widen(w[k]) * widen(x[k]);
    out[r] = total;
  }
}

#if !defined(__AVX512BF16__)
// bf16 rows without bf16 arithmetic: each 32-bit lane of the loaded bytes holds two neighbours,
// the even one in its low half. A shift and a mask make both fp32 (a bf16 is an fp32's top half),
// with no widening shuffle: the 49152 x 576 output layer went from 0.58x to above torch on AVX2.
inline void even_odd(const BFloat16* p, vf& even, vf& odd) {
  vu u;
  std::memcpy(&u, p, sizeof u);
  even = (vf)(u << 16);
  odd = (vf)(u & 0xFFFF0000u);
}

template <>
void dot_rows<BFloat16>(const BFloat16* x, const BFloat16* w, int64_t K, int64_t rows, float* out) {
  constexpr int64_t pair = 2 * kLanes, step = kChains * pair;
  vf xe, xo, we, wo;
  for (int64_t r = 0; r < rows; ++r, w += K) {
    vf a[kChains] = {};
    int64_t k = 0;
    for (; k + step <= K; k += step) {
      ahead(w + k, step * 2);
      for (int c = 0; c < kChains; ++c) {
        even_odd(x + k + c * pair, xe, xo);
        even_odd(w + k + c * pair, we, wo);
        a[c] += we * xe + wo * xo;
      }
    }
    for (; k + pair <= K; k += pair) {
      even_odd(x + k, xe, xo);
      even_odd(w + k, we, wo);
      a[0] += we * xe + wo * xo;
    }
    float total = hsum((a[0] + a[1]) + (a[2] + a[3]));
    for (; k < K; ++k) total += widen(w[k]) * widen(x[k]);
    out[r] = total;
  }
}
#endif

#if defined(__AVX512BF16__)
template <>
void dot_rows<BFloat16>(const BFloat16* x, const BFloat16* w, int64_t K, int64_t rows, float* out) {
  for (int64_t r = 0; r < rows; ++r, w += K) {
    __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {  // two cache lines, two sums
      ahead(w + k, 128);
      a = _mm512_dpbf16_ps(a, load_bh(w + k), load_bh(x + k));
      b = _mm512_dpbf16_ps(b, load_bh(w + k + 32), load_bh(x + k + 32));
    }
    for (; k < K; k += 32) {
      const __mmask32 m = K - k >= 32 ? ~0u : (__mmask32)((1ull << (K - k)) - 1);
      a = _mm512_dpbf16_ps(a, load_bh(w + k, m), load_bh(x + k, m));
    }
    out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
  }
}
#endif

#if defined(__AVX512F__)
template <>
void dot_rows<float>(const float* x, const float* w, int64_t K, int64_t rows, float* out) {
  for (int64_t r = 0; r < rows; ++r, w += K) {
    __m512 a = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {  // 16 floats: one cache line
      ahead(w + k);
      a = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + k), a);
    }
    if (k < K) {
      __mmask16 m = (__mmask16)((1u << (K - k)) - 1);
      a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + k), _mm512_maskz_loadu_ps(m, x + k), a);
    }
    out[r] = _mm512_reduce_add_ps(a);
  }
}
#endif

// int8 weights against x quantized to int8 per block of kBlock columns (int8_x): a row's sum is
// sum_b d[b] sum_{k in b} w[k] q[k], each block's sum exact in int32, as llama.cpp's Q8_0 x Q8_0.
constexpr int64_t kBlock = 32;

inline void dot_row_i8_q8(const int8_t* q, const float* d, const int8_t* w, int64_t K, float* out) {
#if defined(__AVX2__)
  // vpmaddubsw takes unsigned by signed bytes: |w| by q with w's sign, pair sums within int16
  // (2 x 128 x 127). One row at a time: a single stream through the weights, which rows side
  // by side (sharing q's loads) would break into several.
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 a = _mm256_setzero_ps(), c = _mm256_setzero_ps();
  int64_t k = 0;
  const auto block = [&](int64_t k) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)(w + k));
    const __m256i x = _mm256_loadu_si256((const __m256i*)(q + k));
    const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(v, v), _mm256_sign_epi8(x, v)), ones);
    return _mm256_mul_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d[k / kBlock]));
  };
  for (; k + 2 * kBlock <= K; k += 2 * kBlock) {  // a cache line a turn, two sums
    ahead(w + k);
    a = _mm256_add_ps(a, block(k));
    c = _mm256_add_ps(c, block(k + kBlock));
  }
  if (k < K) a = _mm256_add_ps(a, block(k));
  *out = hsum8(_mm256_add_ps(a, c));
#else
  float acc = 0.f;
  for (int64_t k = 0; k < K; k += kBlock) {
    vi p{};
    for (int64_t i = k; i < k + kBlock; i += kLanes) p += widen_i8(w + i) * widen_i8(q + i);
    int32_t sum = 0;
    for (int l = 0; l < kLanes; ++l) sum += p[l];
    acc += (float)sum * d[k / kBlock];
  }
  *out = acc;
#endif
}

template <typename T>
std::vector<float> widened(const T* x, int64_t n) {
  std::vector<float> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = widen(x[i]);
  return out;
}

}  // namespace

template <typename T>
Gemv<T>::Gemv(const Weights<T>& wt, const T* x, int64_t M) : wt_(wt), x_(x), M_(M) {
  if (wt.gguf_parts > 0)
    prepare_gguf();
  else if (wt.zeros != nullptr)
    prepare_int4();
  else if (wt.scales != nullptr && wt.int8_x && wt.K % kBlock == 0)
    quantize_blocks();
  else if (wt.scales != nullptr)
    xf_ = widened(x, M * wt.K);  // int8's float loop takes fp32 x
}

template <typename T>
void Gemv<T>::rows(int64_t n0, int64_t n1, T* y) const {
  if (wt_.gguf_parts > 0)
    gguf_rows(n0, n1, y);
  else if (wt_.int8_x && wt_.zeros != nullptr)
    int4_q8_rows(n0, n1, y);
  else if (wt_.zeros != nullptr)
    int4_rows(n0, n1, y);
  else if (wt_.scales != nullptr)
    int8_rows(n0, n1, y);
  else
    float_rows(n0, n1, y);
}

template <typename T>
void Gemv<T>::all(T* y) const {
  const int64_t N = wt_.N, blocks = (N + kRows - 1) / kRows;
  at::parallel_for(0, blocks, 16,
                   [&](int64_t begin, int64_t end) { rows(begin * kRows, std::min(N, end * kRows), y); });
}

// Block by block, each block's rows kept in L1 across the M inputs.
template <typename T>
void Gemv<T>::float_rows(int64_t n0, int64_t n1, T* y) const {
  const T* w = static_cast<const T*>(wt_.w);
  const int64_t N = wt_.N, K = wt_.K;
  float acc[kRows];
  for (int64_t n = n0; n < n1; n += kRows) {
    const int64_t rows = std::min(kRows, n1 - n);
    for (int64_t m = 0; m < M_; ++m) {
      dot_rows<T>(x_ + m * K, w + n * K, K, rows, acc);
      for (int64_t r = 0; r < rows; ++r) y[m * N + n + r] = static_cast<T>(acc[r]);
    }
  }
}

template <typename T>
void Gemv<T>::quantize_blocks() {
  const int64_t K = wt_.K;
  xq8_.resize(M_ * K);
  dl_.resize(M_ * K / kBlock);
  for (int64_t b = 0; b < M_ * K / kBlock; ++b) dl_[b] = quantize_row(x_ + b * kBlock, kBlock, xq8_.data() + b * kBlock);
}

template <typename T>
void Gemv<T>::int8_q8_rows(int64_t n0, int64_t n1, T* y) const {
  const int8_t* w = static_cast<const int8_t*>(wt_.w);
  const int64_t N = wt_.N, K = wt_.K;
  for (int64_t m = 0; m < M_; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      float acc;
      dot_row_i8_q8(xq8_.data() + m * K, dl_.data() + m * K / kBlock, w + n * K, K, &acc);
      y[m * N + n] = static_cast<T>(acc * widen(wt_.scales[n]));
    }
}

template <typename T>
void Gemv<T>::int8_rows(int64_t n0, int64_t n1, T* y) const {
  if (!xq8_.empty()) return int8_q8_rows(n0, n1, y);
  const int8_t* w = static_cast<const int8_t*>(wt_.w);
  const int64_t N = wt_.N, K = wt_.K;
  float acc[kRows];
  for (int64_t m = 0; m < M_; ++m)
    for (int64_t n = n0; n < n1; n += kRows) {
      const int64_t rows = std::min(kRows, n1 - n);
      dot_rows<int8_t, float>(xf_.data() + m * K, w + n * K, K, rows, acc);
      for (int64_t r = 0; r < rows; ++r) y[m * N + n + r] = static_cast<T>(acc[r] * widen(wt_.scales[n + r]));
    }
}

template class Gemv<float>;
template class Gemv<BFloat16>;

}  // namespace runner
