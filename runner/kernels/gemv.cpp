// The float and int8 GEMV: weight rows streamed against a few rows of x, fp32 accumulation.
#include <ATen/Parallel.h>

#include <algorithm>

#include "gemv.h"

namespace runner {
namespace {

// Row by row, kChains sums each. W: the weights' type (int8: weight-only int8 takes this loop on
// every target; on AVX-512 it beat a hand-written loop of masked 16-byte steps, 20 against 17 GB/s);
// X: x's. Float weights take the tiles below, except bf16 on AVX512-BF16.
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

// Whether bf16 weights meet x through AVX512-BF16's dot products (dot_rows) rather than the tiles.
template <typename T>
constexpr bool bf16_dots() {
#if defined(__AVX512BF16__)
  return std::is_same_v<T, BFloat16>;
#else
  return false;
#endif
}

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

// --- float weights: register-blocked rows -------------------------------------------------------
//
// A chunk is 2 * kLanes weights, met as two vectors: a bf16 chunk's even and odd values (a shift and
// a mask, no shuffle), an fp32 chunk's two halves. x's rows are laid out the same way once per Gemv
// (chunk_parts()), so each weight chunk, loaded and split once, meets up to kTile rows of x held side by
// side: a load per two multiply-adds instead of two. Each (weight row, x row) pair keeps the same two
// sums whatever rows share its tile, so a row's output does not depend on the batch, bit for bit.
constexpr int64_t kChunk = 2 * kLanes;
constexpr int64_t kTile = 4;  // x rows a weight row streamed from memory meets

static inline vf fma_(vf a, vf b, vf c) {
#if defined(__AVX512F__)
  return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
  return (vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

static inline void parts(const float* w, vf& a, vf& b) {
  a = vload(w);
  b = vload(w + kLanes);
}

static inline void parts(const BFloat16* w, vf& a, vf& b) {
  vu u;
  std::memcpy(&u, w, sizeof u);
  a = (vf)(u << 16);
  b = (vf)(u & 0xFFFF0000u);
}

// x's K values as the chunks' parts (fp32), then the tail past the last whole chunk as it is.
template <typename T>
void chunk_parts(const T* x, int64_t K, float* out) {
  const int64_t whole = K / kChunk * kChunk;
  for (int64_t k = 0; k < whole; k += kChunk) {
    vf a, b;
    parts(x + k, a, b);
    vstore(out + k, a);
    vstore(out + k + kLanes, b);
  }
  for (int64_t k = whole; k < K; ++k) out[k] = widen(x[k]);
}

// The tail past the last whole chunk: one function for every pair, so its rounding is the same.
template <typename W>
__attribute__((noinline)) float tail_dot(const float* x, const W* w, int64_t k, int64_t K, float total) {
  for (; k < K; ++k) total = std::fma(widen(w[k]), x[k], total);
  return total;
}

// The sums of v[0..count): a tree of horizontal adds four vectors at a time where there is one, each
// vector's sum the same tree whatever vectors share it.
static inline void sums(const vf* v, int count, float* out) {
#if defined(__AVX2__) && !defined(__AVX512F__)
  for (int i = 0; i < count; i += 4) {
    __m256 four[4] = {};
    for (int j = 0; j < 4 && i + j < count; ++j) four[j] = (__m256)v[i + j];
    float total[4] = {};
    hsum4(four, total);
    for (int j = 0; j < 4 && i + j < count; ++j) out[i + j] = total[j];
  }
#else
  for (int i = 0; i < count; ++i) out[i] = hsum(v[i]);
#endif
}

// NB weight rows (K apart) against MB rows of x (as parts, K apart): out[r * MB + m] for each pair.
// Each weight chunk is loaded and split once for the MB rows, each x chunk loaded once for the NB.
template <int NB, int MB, typename W>
void tile(const W* w, const float* x, int64_t K, bool stream, float* out) {
  vf s[NB][MB][2] = {};
  const int64_t whole = K / kChunk * kChunk;
  for (int64_t k = 0; k < whole; k += kChunk) {
    vf a[NB], b[NB];
    for (int r = 0; r < NB; ++r) {
      if (stream) ahead(w + r * K + k, kChunk * sizeof(W));
      parts(w + r * K + k, a[r], b[r]);
    }
    for (int m = 0; m < MB; ++m) {
      const vf xa = vload(x + m * K + k), xb = vload(x + m * K + k + kLanes);
      for (int r = 0; r < NB; ++r) {
        s[r][m][0] = fma_(a[r], xa, s[r][m][0]);
        s[r][m][1] = fma_(b[r], xb, s[r][m][1]);
      }
    }
  }
  vf both[NB * MB];
  for (int r = 0; r < NB; ++r)
    for (int m = 0; m < MB; ++m) both[r * MB + m] = s[r][m][0] + s[r][m][1];
  sums(both, NB * MB, out);
  if (whole < K)
    for (int r = 0; r < NB; ++r)
      for (int m = 0; m < MB; ++m) out[r * MB + m] = tail_dot(x + m * K, w + r * K, whole, K, out[r * MB + m]);
}

// The tile for NB weight rows and `rows` (1 to MB) rows of x.
template <int NB, int MB = kTile, typename W>
void tile_of(int64_t rows, const W* w, const float* x, int64_t K, bool stream, float* out) {
  if constexpr (MB > 1)
    if (rows < MB) return tile_of<NB, MB - 1>(rows, w, x, K, stream, out);
  tile<NB, MB>(w, x, K, stream, out);
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
  else if (!bf16_dots<T>()) {
    xf_.resize(M * wt.K);  // float weights: x as the chunks' parts
    for (int64_t m = 0; m < M; ++m) chunk_parts(x + m * wt.K, wt.K, xf_.data() + m * wt.K);
  }
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

// Block by block: the block's rows come from memory for the first tile of x's rows, from L1 after.
template <typename T>
void Gemv<T>::float_rows(int64_t n0, int64_t n1, T* y) const {
  const T* w = static_cast<const T*>(wt_.w);
  const int64_t N = wt_.N, K = wt_.K;
  float acc[std::max({kRows, kTile, int64_t{2 * 2}})];  // a block's rows, the first pass's, a 2 x 2 tile's
  if (bf16_dots<T>()) {
    for (int64_t n = n0; n < n1; n += kRows) {
      const int64_t rows = std::min(kRows, n1 - n);
      for (int64_t m = 0; m < M_; ++m) {
        dot_rows<T>(x_ + m * K, w + n * K, K, rows, acc);
        for (int64_t r = 0; r < rows; ++r) y[m * N + n + r] = static_cast<T>(acc[r]);
      }
    }
    return;
  }
  // The first kTile rows of x meet each weight row as it streams in, one row at a time (a single
  // stream through memory); the rest meet the block's rows from L1 two by two, two x rows at a time.
  const int64_t first = std::min(kTile, M_);
  for (int64_t n = n0; n < n1; n += kRows) {
    const int64_t rows = std::min(kRows, n1 - n);
    for (int64_t r = 0; r < rows; ++r) {
      tile_of<1>(first, w + (n + r) * K, xf_.data(), K, true, acc);
      for (int64_t i = 0; i < first; ++i) y[i * N + n + r] = static_cast<T>(acc[i]);
    }
    for (int64_t m = first; m < M_; m += 2) {
      const int64_t xs = std::min<int64_t>(2, M_ - m);
      for (int64_t r = 0; r < rows; r += 2) {
        const int64_t ws = std::min<int64_t>(2, rows - r);
        if (ws == 2)
          tile_of<2, 2>(xs, w + (n + r) * K, xf_.data() + m * K, K, false, acc);
        else
          tile_of<1, 2>(xs, w + (n + r) * K, xf_.data() + m * K, K, false, acc);
        for (int64_t j = 0; j < ws; ++j)
          for (int64_t i = 0; i < xs; ++i) y[(m + i) * N + n + r + j] = static_cast<T>(acc[j * xs + i]);
      }
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
