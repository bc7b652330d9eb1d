// A few tokens' attention (decode, verify), FlashDecoding's way: RoPE, the cache write, and causal
// (sliding-window) GQA attention over a float or int8 cache, chunk by chunk of the cache.
//
//   attend(qkv, cos_sin, k_cache!, v_cache!, pos, n_heads, n_kv_heads, window) -> [B, T, H * hd]
//                                                        a few tokens (decode, verify) of B
//                                                        rows, each at its own positions
#include <ATen/Parallel.h>

#include "attention.h"
#include "ops.h"

namespace runner {
namespace {

// --- scores and weighted values over a chunk of a float cache ------------------------------------

#if defined(__AVX512BF16__)
// Lane j: the sum of v[j]'s sixteen lanes (a transpose by unpacks and shuffles, adding as it goes:
// 45 instructions for sixteen sums, against about 8 each one by one).
inline __m512 sums16(const __m512 v[16]) {
  __m512 a[8], b[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit block: [x0+x2, y0+y2, x1+x3, y1+y3] of v[2i], v[2i+1]
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per block: v[4i..4i+3]'s partial sums, in order
    b[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // The four blocks of each b[i] added: block i of the result is b[i]'s total.
  const __m512 c01 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 c23 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c01, c23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(c01, c23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// p[j] = scale (q . k_j) for bf16 q and cache rows k, sixteen positions at a time on vdpbf16ps (a
// head of 64 is two instructions a position); returns how many positions it did, a multiple of 16.
// One position at a time, widening k and summing each product vector, would be most of a long
// cache's attention.
inline int64_t scores_bf16(const BFloat16* q, const BFloat16* k, int64_t hd, int64_t n, float scale, float* p) {
  constexpr int kMaxChunks = 8;  // head_dim up to 256, in pairs of 16 bf16 pairs
  const int64_t chunks = hd / 32;
  if (hd % 32 != 0 || chunks > kMaxChunks) return 0;
  __m512bh qv[kMaxChunks];
  for (int64_t c = 0; c < chunks; ++c) qv[c] = load_bh(q + 32 * c);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m512 v[16];
    for (int i = 0; i < 16; ++i) {
      const BFloat16* kr = k + (j + i) * hd;
      ahead(kr);
      __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), load_bh(kr), qv[0]);
      for (int64_t c = 1; c < chunks; ++c) a = _mm512_dpbf16_ps(a, load_bh(kr + 32 * c), qv[c]);
      v[i] = a;
    }
    _mm512_storeu_ps(p + j, _mm512_mul_ps(sums16(v), _mm512_set1_ps(scale)));
  }
  return j;
}
#endif

#if defined(__AVX512BW__)
// out[d] = sum_i p[i] v[i][d] for bf16 rows v of Blocks x 32 dimensions, 32 dimensions a load: a
// bf16 shifted into an fp32's top half is that fp32, so the even dimensions are the words moved up
// and the odd ones the words masked in place, two instructions for 32 values (widening 16 at a
// time takes a shuffle and a shift each).
template <int Blocks>
void weighted_values_bf16(const float* p, const BFloat16* v, int64_t n, float* out) {
  const __m512i top = _mm512_set1_epi32((int)0xFFFF0000u);
  __m512 even[Blocks], odd[Blocks];
  for (int b = 0; b < Blocks; ++b) even[b] = odd[b] = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; ++i) {
    const __m512 w = _mm512_set1_ps(p[i]);
    const BFloat16* row = v + i * Blocks * 32;
    for (int b = 0; b < Blocks; ++b) {
      const __m512i x = _mm512_loadu_si512(row + 32 * b);
      even[b] = _mm512_fmadd_ps(w, _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)), even[b]);
      odd[b] = _mm512_fmadd_ps(w, _mm512_castsi512_ps(_mm512_and_si512(x, top)), odd[b]);
    }
  }
  // Dimension 2j is even's lane j, 2j + 1 odd's.
  const __m512i low = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i high = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  for (int b = 0; b < Blocks; ++b) {
    _mm512_storeu_ps(out + 32 * b, _mm512_permutex2var_ps(even[b], low, odd[b]));
    _mm512_storeu_ps(out + 32 * b + 16, _mm512_permutex2var_ps(even[b], high, odd[b]));
  }
}

// The head sizes it serves (the common ones); returns how many dimensions it did: hd or 0.
inline int64_t weighted_values_bf16(const float* p, const BFloat16* v, int64_t hd, int64_t n, float* out) {
  switch (hd) {
    case 32: weighted_values_bf16<1>(p, v, n, out); return hd;
    case 64: weighted_values_bf16<2>(p, v, n, out); return hd;
    case 128: weighted_values_bf16<4>(p, v, n, out); return hd;
    default: return 0;
  }
}
#endif

// q . k for fp32 q and a cache row k.
template <typename T>
float dot(const float* q, const T* k, int64_t n) {
#if defined(__AVX512BW__)
  __m512 a = _mm512_setzero_ps();
  for (int64_t d = 0; d < n; d += 16) a = _mm512_fmadd_ps(load16(q + d, first(n - d)), load16(k + d, first(n - d)), a);
  return _mm512_reduce_add_ps(a);
#else
  vf a{};
  int64_t d = 0;
  for (; d + kLanes <= n; d += kLanes) a += vload(q + d) * vload(k + d);
  float total = hsum(a);
  for (; d < n; ++d) total += q[d] * widen(k[d]);
  return total;
#endif
}

// max(p[0..n)) (-inf for none) over vectors of positions: one position at a time would be a chain
// of dependent maxima, a large part of a long cache's attention.
inline float largest(const float* p, int64_t n) {
  vf tops = splat(-INFINITY);
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const vf v = vload(p + j);
    tops = v > tops ? v : tops;
  }
  float top = -INFINITY;
  for (int l = 0; l < kLanes; ++l) top = std::max(top, tops[l]);
  for (; j < n; ++j) top = std::max(top, p[j]);
  return top;
}

// --- an int8 cache: int8 keys and values with a scale per position and key head ------------------

// p[j] = scale dk[j] (q . k_j) for int8 q and cache rows k, for heads of whole 64s (else none);
// returns how many positions it did. vpdpbusd takes unsigned bytes times signed ones, so the keys
// are moved up by 128 (a xor of the sign bits) and 128 sum(q) taken away after; a head of 64 is
// one instruction a position, sixteen positions summed by one transpose.
#if defined(__AVX512VNNI__) && defined(__AVX512BF16__)
inline int64_t scores_int8_vnni(const int8_t* q, const int8_t* k, const float* dk, int64_t hd, int64_t n, float scale,
                                float* p) {
  constexpr int kMaxChunks = 4;  // head_dim up to 256, 64 bytes a chunk
  const int64_t chunks = hd / 64;
  if (hd % 64 != 0 || chunks > kMaxChunks) return 0;
  __m512i qv[kMaxChunks];
  int32_t qsum = 0;
  for (int64_t d = 0; d < hd; ++d) qsum += q[d];
  for (int64_t c = 0; c < chunks; ++c) qv[c] = _mm512_loadu_si512(q + 64 * c);
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  const __m512 offset = _mm512_set1_ps(128.f * (float)qsum), s = _mm512_set1_ps(scale);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m512 v[16];
    for (int i = 0; i < 16; ++i) {
      const int8_t* kr = k + (j + i) * hd;
      ahead(kr);
      __m512i a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_xor_si512(_mm512_loadu_si512(kr), flip), qv[0]);
      for (int64_t c = 1; c < chunks; ++c)
        a = _mm512_dpbusd_epi32(a, _mm512_xor_si512(_mm512_loadu_si512(kr + 64 * c), flip), qv[c]);
      v[i] = _mm512_cvtepi32_ps(a);  // exact: |lane| < 2^24
    }
    const __m512 dots = _mm512_sub_ps(sums16(v), offset);  // exact integers again
    _mm512_storeu_ps(p + j, _mm512_mul_ps(_mm512_mul_ps(dots, _mm512_loadu_ps(dk + j)), s));
  }
  for (; j < n; ++j) {  // the last few (all of a short cache's), one reduction each
    const int8_t* kr = k + j * hd;
    __m512i a = _mm512_setzero_si512();
    for (int64_t c = 0; c < chunks; ++c)
      a = _mm512_dpbusd_epi32(a, _mm512_xor_si512(_mm512_loadu_si512(kr + 64 * c), flip), qv[c]);
    p[j] = (float)(_mm512_reduce_add_epi32(a) - 128 * qsum) * dk[j] * scale;
  }
  return j;
}
#endif

#if defined(__AVX2__)
// The same on AVX2 (and on AVX-512 for heads that are not whole 64s): vpmaddubsw multiplies
// unsigned by signed bytes, so |q| times k with q's sign (no pair can saturate: 2 x 127 x 127 <
// 2^15). Eight positions summed by horizontal adds.
inline int64_t scores_int8_avx2(const int8_t* q, const int8_t* k, const float* dk, int64_t hd, int64_t n, float scale,
                                float* p) {
  constexpr int kMaxChunks = 8;
  const int64_t chunks = hd / 32;
  if (hd % 32 != 0 || chunks > kMaxChunks) return 0;
  __m256i qs[kMaxChunks], qa[kMaxChunks];
  for (int64_t c = 0; c < chunks; ++c) {
    qs[c] = _mm256_loadu_si256((const __m256i*)(q + 32 * c));
    qa[c] = _mm256_abs_epi8(qs[c]);
  }
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256 s = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256i v[8];
    for (int i = 0; i < 8; ++i) {
      const int8_t* kr = k + (j + i) * hd;
      __m256i a = _mm256_setzero_si256();
      for (int64_t c = 0; c < chunks; ++c) {
        const __m256i kv = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(kr + 32 * c)), qs[c]);
        a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(qa[c], kv), ones));
      }
      v[i] = a;
    }
    const __m256i t0 = _mm256_hadd_epi32(v[0], v[1]), t1 = _mm256_hadd_epi32(v[2], v[3]);
    const __m256i t2 = _mm256_hadd_epi32(v[4], v[5]), t3 = _mm256_hadd_epi32(v[6], v[7]);
    const __m256i u0 = _mm256_hadd_epi32(t0, t1), u1 = _mm256_hadd_epi32(t2, t3);  // halves of 0-3, 4-7
    const __m256i dots = _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
    _mm256_storeu_ps(p + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dots), _mm256_loadu_ps(dk + j)), s));
  }
  for (; j < n; ++j) {  // the last few, one reduction each
    const int8_t* kr = k + j * hd;
    __m256i a = _mm256_setzero_si256();
    for (int64_t c = 0; c < chunks; ++c) {
      const __m256i kv = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(kr + 32 * c)), qs[c]);
      a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_maddubs_epi16(qa[c], kv), ones));
    }
    const __m128i h = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    const __m128i q2 = _mm_add_epi32(h, _mm_shuffle_epi32(h, _MM_SHUFFLE(1, 0, 3, 2)));
    p[j] = (float)_mm_cvtsi128_si32(_mm_add_epi32(q2, _mm_shuffle_epi32(q2, _MM_SHUFFLE(2, 3, 0, 1)))) * dk[j] * scale;
  }
  return j;
}
#endif

// p[j] = scale dk[j] (q . k_j) for int8 q and cache rows k: the widest path this build has for the
// head size, a portable loop for the rest.
inline void scores_int8(const int8_t* q, const int8_t* k, const float* dk, int64_t hd, int64_t n, float scale, float* p) {
  int64_t j = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BF16__)
  j = scores_int8_vnni(q, k, dk, hd, n, scale, p);
#endif
#if defined(__AVX2__)
  if (j == 0) j = scores_int8_avx2(q, k, dk, hd, n, scale, p);
#endif
  for (; j < n; ++j) {
    int32_t a = 0;
    for (int64_t d = 0; d < hd; ++d) a += (int32_t)q[d] * k[j * hd + d];
    p[j] = (float)a * dk[j] * scale;
  }
}

// out[d] = sum_j w[j] v[j][d] for float weights and cache rows v (a vector of dimensions at a time,
// its sum held in registers over every position).
template <typename V>
void weighted_values(const float* w, const V* v, int64_t hd, int64_t n, float* out) {
  int64_t d = 0;
  for (; d + kLanes <= hd; d += kLanes) {
    vf a[kChains] = {};
    int64_t j = 0;
    for (; j + kChains <= n; j += kChains)
      for (int k = 0; k < kChains; ++k) a[k] += w[j + k] * vload(v + (j + k) * hd + d);
    for (; j < n; ++j) a[0] += w[j] * vload(v + j * hd + d);
    vstore(out + d, (a[0] + a[1]) + (a[2] + a[3]));
  }
  for (; d < hd; ++d) {
    float a = 0.f;
    for (int64_t j = 0; j < n; ++j) a += w[j] * widen(v[j * hd + d]);
    out[d] = a;
  }
}

#if defined(__AVX512VNNI__) && defined(__AVX512BF16__)
// The same for int8 rows of Blocks x 32 dimensions, n <= 64 positions and the weights (>= 0) of
// Heads query heads at once (w[h * stride + j]: each row is read and widened once for them all),
// on vpdpwssd: each head's weights as int16 (scale its largest / 32767: each off by at most
// 1/65534 of the largest, where bf16 would be off by 1/512 of itself), two positions an
// instruction, rows j and j + 1 interleaved into (v[j][d], v[j + 1][d]) word pairs. In int32 a sum
// stays under 32 x 2 x 32767 x 127 < 2^31.
template <int Blocks, int Heads>
void weighted_values_int8(const float* w, int64_t stride, const int8_t* v, int64_t n, float* const* out) {
  alignas(64) int16_t w16[Heads][64 + 2] = {};
  float down[Heads];
  for (int h = 0; h < Heads; ++h) {
    const float top = largest(w + h * stride, n);
    down[h] = top > 0.f ? top / 32767.f : 0.f;
    if (top > 0.f)  // w / top <= 1 (32767 / top would overflow for a top under 1e-34)
      for (int64_t j = 0; j < n; ++j) w16[h][j] = (int16_t)std::nearbyint(w[h * stride + j] / top * 32767.f);
  }
  __m512i lo[Heads][Blocks], hi[Heads][Blocks];
  for (int h = 0; h < Heads; ++h)
    for (int b = 0; b < Blocks; ++b) lo[h][b] = hi[h][b] = _mm512_setzero_si512();
  for (int64_t j = 0; j < n; j += 2) {
    const int8_t* r0 = v + j * Blocks * 32;
    const int8_t* r1 = j + 1 < n ? r0 + Blocks * 32 : r0;  // w16[h][n] is 0 when n is odd
    ahead(r0, 2 * Blocks * 32);
    __m512i pairs[Heads];
    for (int h = 0; h < Heads; ++h) {
      int32_t pair;
      std::memcpy(&pair, w16[h] + j, sizeof pair);
      pairs[h] = _mm512_set1_epi32(pair);
    }
    for (int b = 0; b < Blocks; ++b) {
      const __m512i a = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(r0 + 32 * b)));
      const __m512i c = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(r1 + 32 * b)));
      const __m512i l = _mm512_unpacklo_epi16(a, c), u = _mm512_unpackhi_epi16(a, c);
      for (int h = 0; h < Heads; ++h) {
        lo[h][b] = _mm512_dpwssd_epi32(lo[h][b], l, pairs[h]);
        hi[h][b] = _mm512_dpwssd_epi32(hi[h][b], u, pairs[h]);
      }
    }
  }
  // Per 128-bit lane L, lo holds dimensions 8L..8L+3 and hi 8L+4..8L+7: back into order.
  const __m512i first = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
  const __m512i second = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
  for (int h = 0; h < Heads; ++h) {
    const __m512 scale = _mm512_set1_ps(down[h]);
    for (int b = 0; b < Blocks; ++b) {
      const __m512 l = _mm512_cvtepi32_ps(lo[h][b]), u = _mm512_cvtepi32_ps(hi[h][b]);
      _mm512_storeu_ps(out[h] + 32 * b, _mm512_mul_ps(_mm512_permutex2var_ps(l, first, u), scale));
      _mm512_storeu_ps(out[h] + 32 * b + 16, _mm512_mul_ps(_mm512_permutex2var_ps(l, second, u), scale));
    }
  }
}

// Up to four heads of 32 or 64 dimensions a pass, two of 128 (the sums stay in registers).
template <int Blocks>
void weighted_values_int8_heads(const float* w, int64_t stride, int64_t heads, const int8_t* v, int64_t n,
                                float* const* out) {
  constexpr int kMost = Blocks > 2 ? 2 : 4;
  for (int64_t h = 0; h < heads; h += kMost) {
    const float* wh = w + h * stride;
    switch (std::min<int64_t>(kMost, heads - h)) {
      case 1: weighted_values_int8<Blocks, 1>(wh, stride, v, n, out + h); break;
      case 2: weighted_values_int8<Blocks, 2>(wh, stride, v, n, out + h); break;
      case 3: if constexpr (kMost > 2) weighted_values_int8<Blocks, 3>(wh, stride, v, n, out + h); break;
      default: if constexpr (kMost > 2) weighted_values_int8<Blocks, 4>(wh, stride, v, n, out + h); break;
    }
  }
}
#endif

// out[h][d] = sum_j w[h * stride + j] v[j][d] for `heads` heads' weights over the same int8 rows.
inline void weighted_values_int8(const float* w, int64_t stride, int64_t heads, const int8_t* v, int64_t hd, int64_t n,
                                 float* const* out) {
#if defined(__AVX512VNNI__) && defined(__AVX512BF16__)
  switch (hd) {
    case 32: return weighted_values_int8_heads<1>(w, stride, heads, v, n, out);
    case 64: return weighted_values_int8_heads<2>(w, stride, heads, v, n, out);
    case 128: return weighted_values_int8_heads<4>(w, stride, heads, v, n, out);
    default: break;
  }
#endif
  for (int64_t h = 0; h < heads; ++h) weighted_values(w + h * stride, v, hd, n, out[h]);
}

}  // namespace

template <typename T>
void FewTokens<T>::write() const {
  for (int64_t i = 0; i < tokens(); ++i) {
    const float* cos = cos_sin + i * 2 * hd;
    const float* sin = cos + hd;
    const T* k = qkv + i * width() + H * hd;
    const T* v = k + KVH * hd;
    const int64_t row = (i / count) * KVH * L;
    std::vector<T> rotated(kq != nullptr ? hd : 0);  // an int8 cache's scratch
    for (int64_t g = 0; g < KVH; ++g)
      CacheRows<T>{kc, vc, kq, vq, ks, vs}.write(row + g * L + pos[i], k + g * hd, v + g * hd, cos, sin, hd,
                                                 rotated.data());
  }
}

template <typename T>
void FewTokens<T>::item(int64_t item, Scratch& s) const {
  const int64_t C = chunks(), t = item / (KVH * C), g = item / C % KVH, c = item % C;
  const int64_t first = window > 0 ? std::max<int64_t>(0, pos[t] + 1 - window) : 0;
  const int64_t start = first + c * kChunk, n = std::min<int64_t>(kChunk, pos[t] + 1 - start);
  const int64_t row = (t / count) * KVH * L, group = H / KVH;
  const float scale = 1.f / std::sqrt((float)hd);
  const int64_t at = row + g * L + start;  // the chunk's first position in the cache
  const T* kh = kq == nullptr ? kc + at * hd : nullptr;
  const T* vh = kq == nullptr ? vc + at * hd : nullptr;
  if (s.queries != t * KVH + g) {
    s.queries = t * KVH + g;
    for (int64_t i = 0; i < group; ++i) {
      rope(qkv + t * width() + (g * group + i) * hd, cos_sin + t * 2 * hd, cos_sin + t * 2 * hd + hd, hd,
           s.qh.data() + i * hd);
      if (kq != nullptr)
        s.dq[i] = quantize_row(s.qh.data() + i * hd, hd, s.q8.data() + i * hd);
      else
        for (int64_t d = 0; d < hd; ++d) s.qf[i * hd + d] = widen(s.qh[i * hd + d]);
    }
  }
  for (int64_t i = 0; i < group; ++i) {
    float* part = parts + ((t * H + g * group + i) * C + c) * (hd + 2);
    float* p = s.p.data() + (kq != nullptr ? i * kChunk : 0);  // an int8 cache keeps each head's weights
    if (n <= 0) {  // a shorter token's chunk past its last position
      part[0] = -INFINITY, part[1] = 0.f;
      std::fill(part + 2, part + 2 + hd, 0.f);
      continue;
    }
    const T* qh = s.qh.data() + i * hd;
    const float* qf = s.qf.data() + i * hd;
    if (kq != nullptr) {
      scores_int8(s.q8.data() + i * hd, kq + at * hd, ks + at, hd, n, scale * s.dq[i], p);
    } else {
      int64_t done = 0;
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, BFloat16>) done = scores_bf16(qh, kh, hd, n, scale, p);
#endif
      for (int64_t j = done; j < n; ++j) p[j] = dot(qf, kh + j * hd, hd) * scale;
    }
    const float top = largest(p, n);
    // exp over whole vectors of positions (one call per position would be a large part of a long cache's time)
    vf sums{};
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      const vf e = vexp(vload(p + j) - top);
      vstore(p + j, e);
      sums += e;
    }
    float total = hsum(sums);
    for (; j < n; ++j) total += (p[j] = std::exp(p[j] - top));
    part[0] = top, part[1] = total;
    if (kq != nullptr) {  // each position's weight times its values' scale; the sums after every head's
      for (j = 0; j + kLanes <= n; j += kLanes) vstore(p + j, vload(p + j) * vload(vs + at + j));
      for (; j < n; ++j) p[j] *= vs[at + j];
      s.outs[i] = part + 2;
      continue;
    }
#if defined(__AVX512BW__)
    if constexpr (std::is_same_v<T, BFloat16>)
      if (weighted_values_bf16(p, vh, hd, n, part + 2) == hd) continue;
#endif
    weighted_values(p, vh, hd, n, part + 2);
  }
  // The group's heads in one pass over the chunk's int8 values (a short token's chunk has none).
  if (kq != nullptr && n > 0) weighted_values_int8(s.p.data(), kChunk, group, vq + at * hd, hd, n, s.outs.data());
}

template <typename T>
void FewTokens<T>::combine(int64_t i) const {
  const int64_t C = chunks();
  float* part = parts + i * C * (hd + 2);
  float top = -INFINITY, total = 0.f;
  for (int64_t c = 0; c < C; ++c) top = std::max(top, part[c * (hd + 2)]);
  for (int64_t c = 0; c < C; ++c) {
    float* pc = part + c * (hd + 2);
    pc[0] = pc[0] == -INFINITY ? 0.f : std::exp(pc[0] - top);
    total += pc[1] * pc[0];
  }
  T* out = y + i * hd;
  int64_t d = 0;
  for (; d + kLanes <= hd; d += kLanes) {
    vf a{};
    for (int64_t c = 0; c < C; ++c) a += vload(part + c * (hd + 2) + 2 + d) * part[c * (hd + 2)];
    vstore(out + d, a / total);
  }
  for (; d < hd; ++d) {
    float a = 0.f;
    for (int64_t c = 0; c < C; ++c) a += part[c * (hd + 2) + 2 + d] * part[c * (hd + 2)];
    out[d] = static_cast<T>(a / total);
  }
}

template <typename T>
void FewTokens<T>::run() {
  write();
  std::vector<float> buffer(partials());
  parts = buffer.data();
  // A few heads over a short cache is too little work to share out; a long cache is not.
  const int64_t grain = longest() * hd * heads() < (1 << 16) ? items() : 1;
  at::parallel_for(0, items(), grain, [&](int64_t begin, int64_t end) {
    Scratch s(*this);
    for (int64_t i = begin; i < end; ++i) item(i, s);
  });
  for (int64_t i = 0; i < heads(); ++i) combine(i);
}

at::Tensor attend(const at::Tensor& qkv, const at::Tensor& cos_sin, at::Tensor& k_cache, at::Tensor& v_cache,
                  const at::Tensor& input_pos, int64_t n_heads, int64_t n_kv_heads, int64_t window,
                  const std::optional<at::Tensor>& k_scales, const std::optional<at::Tensor>& v_scales) {
  TORCH_CHECK(window >= 0, "runner::attend: window must be >= 0 (0: none), got ", window);
  const bool int8 = int8_cache("attend", k_cache, k_scales, v_scales);
  auto positions = checked_positions("attend", qkv, cos_sin, k_cache, v_cache, input_pos, n_heads, n_kv_heads, int8);
  const int64_t KVH = n_kv_heads, H = n_heads, L = k_cache.size(2), hd = k_cache.size(3);
  const int64_t B = qkv.size(0), count = qkv.size(1);
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  auto qc = qkv.contiguous();
  auto cs = rotations(cos_sin, B, count, hd);
  auto y = at::empty({B, count, H * hd}, qkv.options());
  const auto run = [&](auto zero) {
    using T = decltype(zero);
    FewTokens<T> tokens{qc.const_data_ptr<T>(), cs.const_data_ptr<float>(), maybe<T>(k_cache, !int8),
                        maybe<T>(v_cache, !int8), y.mutable_data_ptr<T>(), pos, B, count, H, KVH, hd, L, window};
    tokens.kq = maybe<int8_t>(k_cache, int8), tokens.vq = maybe<int8_t>(v_cache, int8);
    tokens.ks = maybe(k_scales), tokens.vs = maybe(v_scales);
    tokens.run();
  };
  if (qkv.scalar_type() == at::kBFloat16)
    run(BFloat16());
  else
    run(0.f);
  return y;
}

template struct FewTokens<float>;
template struct FewTokens<BFloat16>;

}  // namespace runner
