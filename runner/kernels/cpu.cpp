// runner's CPU kernels for batch-1 decoding: what the profile of a decode step asked for.
//
// A decode step reads every weight once and does little else, so its time is the time to stream
// the weights plus the per-op overhead of a few hundred small ops. These kernels stream bf16 and
// fp32 weights at close to the machine's read bandwidth, and decode_layers runs every layer of a
// step in one call and one parallel region. One source serves every target (runner/kernels/__init__.py builds it once per instruction
// set): AVX512-BF16 and AVX-512 have hand-written paths for the hot loops; everything else is
// written once with GCC/Clang vector extensions, as wide as the target's registers (AVX2's 256
// bits; SSE pairs on a generic x86-64 target), with scalar loops only for tails:
//
//   linear(x [M, K], w [N, K]) -> [M, N]               fp32 accumulation; M is small (decode, verify)
//   int8_linear(x [M, K], w int8 [N, K], scales [N])   weight-only int8 (runner.quant.int8's layout)
//   int4_linear(x [M, K], w uint8 [N, K/2], scales, zeros [N, K/gs], gs, int8_x)
//                                                        weight-only int4 (runner.quant.int4's layout);
//                                                        int8_x: x quantized to int8 per group, integer
//                                                        dot products (AVX512-VNNI, AVX2's vpmaddubsw)
//   dequantize_int8(w int8 [N, K], scales [N]) -> [N, K]      a prompt's weights, for torch's GEMM
//   dequantize_int4(w uint8 [N, K/2], scales, zeros [N, K/gs], gs) -> [N, K]   (in the scales' dtype)
//   rms_norm(x [..., D], w [D], eps) -> [..., D]
//   swiglu(gate_up [..., 2I]) -> [..., I]              silu(gate) * up
//   attend(qkv, cos_sin, k_cache!, v_cache!, pos, n_heads, n_kv_heads, window) -> [B, T, H * hd]
//                                                        a few tokens (decode, verify) of B rows, each
//                                                        at its own positions: RoPE, cache write,
//                                                        causal (sliding-window) GQA attention
//   expert_linear, int8_expert_linear, int4_expert_linear (x [M, K], stacked weights [E, N, ...], ids [M])
//                                                        row m through expert ids[m] only
//   rope_write(qkv, cos_sin, k_cache!, v_cache!, pos, n_heads, n_kv_heads) -> q [1, H, T, hd]
//                                                        a prompt: RoPE and the cache write, for
//                                                        causal_attention to follow
//   decode_layers(x, norms, eps, weights (each linear {w}, {w, scales} or {w, scales, zeros}), ...)
//                                                        a few tokens through every dense layer in one
//                                                        call and one parallel region
//   causal_attention(q [1, H, T, hd], k_cache, v_cache, pos [T], window) -> [1, T, H * hd]
//                                                        a prompt's causal (sliding-window) GQA
//                                                        attention over the cache, block by block
//   attend, rope_write, causal_attention and decode_layers also take an int8 cache: int8 k_cache
//   and v_cache with their fp32 scales [B, n_kv_heads, L] (k_scales, v_scales; quant.kv_cache)
//
// Each rounds where the torch reference (runner/model/functional.py) rounds, so bf16 results
// stay within a rounding step of it; tests/kernels compare them.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

using c10::BFloat16;

inline float widen(float v) { return v; }
inline float widen(BFloat16 v) { return static_cast<float>(v); }
inline float widen(int8_t v) { return v; }

// The value a float takes once stored as T (round to nearest even for bf16).
template <typename T>
inline float round_to(float v) { return widen(static_cast<T>(v)); }

// --- portable vectors --------------------------------------------------------------------------------

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));
typedef uint32_t vu __attribute__((vector_size(4 * kLanes)));
typedef uint16_t vh __attribute__((vector_size(2 * kLanes)));
typedef int8_t vb __attribute__((vector_size(kLanes)));
typedef uint8_t vub __attribute__((vector_size(kLanes)));

// Widening loads of kLanes narrow integers into 32-bit lanes. The compilers scalarise
// __builtin_convertvector from 8- and 16-bit lanes, so x86 gets its one-instruction widenings.
inline vi widen_u8(const uint8_t* p) {
#if defined(__AVX512F__)
  return (vi)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
#elif defined(__AVX2__)
  return (vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
#else
  vub b;
  std::memcpy(&b, p, sizeof b);
  return __builtin_convertvector(b, vi);
#endif
}
inline vi widen_i8(const int8_t* p) {
#if defined(__AVX512F__)
  return (vi)_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p));
#elif defined(__AVX2__)
  return (vi)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p));
#else
  vb b;
  std::memcpy(&b, p, sizeof b);
  return __builtin_convertvector(b, vi);
#endif
}
inline vi widen_u16(const uint16_t* p) {
#if defined(__AVX512F__)
  return (vi)_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
#elif defined(__AVX2__)
  return (vi)_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
#else
  vh h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, vi);
#endif
}

inline vf splat(float v) { return vf{} + v; }
inline vf vload(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline vf vload(const BFloat16* p) { return (vf)(widen_u16((const uint16_t*)p) << 16); }  // bf16: an fp32's top half
inline vf vload(const int8_t* p) { return __builtin_convertvector(widen_i8(p), vf); }
// fp32 bits rounded to the nearest bf16, ties to even (finite values).
inline vu bf16_bits(vf v) {
  const vu u = (vu)v;
  return (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
}
template <typename T>
inline vf vround(vf v) {
  if constexpr (std::is_same_v<T, BFloat16>) return (vf)bf16_bits(v);
  return v;
}
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline void vstore(BFloat16* p, vf v) {
  const vi top = (vi)(bf16_bits(v) >> 16);
#if defined(__AVX512F__)
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16((__m512i)top));
#elif defined(__AVX2__)
  const __m256i packed = _mm256_packus_epi32((__m256i)top, (__m256i)top);  // per 128-bit half
  _mm_storeu_si128((__m128i*)p, _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08)));
#else
  const vh h = __builtin_convertvector(top, vh);
  std::memcpy(p, &h, sizeof h);
#endif
}
inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}
// e^x (Cephes' expf: a degree-5 polynomial on [-ln2/2, ln2/2] and a power of two), within 2 ulp.
inline vf vexp(vf x) {
  const vf top = splat(88.3762626647949f);
  x = x < top ? x : top;
  x = x > -top ? x : -top;
  const vf fx = x * 1.44269504088896341f + 0.5f;
  vf n = __builtin_convertvector(__builtin_convertvector(fx, vi), vf);
  n = n > fx ? n - 1.f : n;  // floor
  x = x - n * 0.693359375f - n * -2.12194440e-4f;
  vf y = splat(1.9875691500e-4f);
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * (x * x) + x + 1.f;
  return y * (vf)((__builtin_convertvector(n, vi) + 127) << 23);
}

// 1 / d within an ulp or two of fp32: the hardware's estimate and one Newton step. A division
// costs as much as vexp; this made swiglu over a prompt's rows faster than torch's on AVX2.
inline vf vrecip(vf d) {
#if defined(__AVX512F__) || defined(__AVX2__)
#if defined(__AVX512F__)
  const vf r = (vf)_mm512_rcp14_ps((__m512)d);
#else
  const vf r = (vf)_mm256_rcp_ps((__m256)d);
#endif
  return r * (2.f - d * r);
#else
  return 1.f / d;
#endif
}

// --- dot products: weight rows against one activation row, fp32 accumulation ------------------

constexpr int64_t kRows = 4;  // rows per block: a block's rows stay in L1 across a verify's inputs
// Each row is read start to end, the rows one after another, with a prefetch this far ahead: one
// sequential stream is what this machine's prefetchers follow best. Four rows read side by side
// (four short streams) streamed bf16 weights at 19.6 GB/s on two threads of an AMD EPYC, one row
// at a time 23.5, and with this prefetch 28 (torch's sum of a large tensor: 32).
constexpr int64_t kAheadBytes = 2048;
inline void ahead(const void* p) { __builtin_prefetch((const char*)p + kAheadBytes, 0, 3); }
// Each 64-byte line of [p, p + bytes), kAheadBytes on.
inline void ahead(const void* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) ahead((const char*)p + b);
}
// Independent sums a row keeps: a fused multiply-add waits about four cycles for the sum before it,
// so one chain of them caps a row at a vector per four cycles (int8 on AVX-512: 14 GB/s a thread).
constexpr int kChains = 4;

// Sixteen values of T as fp32, masked by m (first(n): the first n).
#if defined(__AVX512BW__)
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const BFloat16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
inline __mmask16 first(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }
#endif

#if defined(__AVX512BF16__)
inline __m512bh load_bh(const BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline __m512bh load_bh(const BFloat16* p, __mmask32 m) { return (__m512bh)_mm512_maskz_loadu_epi16(m, p); }
#endif

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

// --- weight-only int8 and int4: integer weights against fp32 activations ---------------------------

// sum_g scale[g] * sum_{k in g} x[k] q[k] for int4 rows (two levels a byte, even column low);
// xe, xo: x's even and odd columns. The zero points are added by the caller.
template <typename T>
void dot_rows_i4(const float* xe, const float* xo, const float* xr, const uint8_t* w, const T* scales, int64_t K,
                 int64_t gs, int64_t rows, float* out) {
  const int64_t bytes = K / 2, G = K / gs, per_group = gs / 2;
  for (int64_t r = 0; r < rows; ++r, w += bytes, scales += G) {
#if defined(__AVX512F__)
    // 16 bytes hold 32 columns, all in one group (gs % 32 == 0); two steps a turn, two sums.
    const __m512i low = _mm512_set1_epi32(0xF);
    auto part = [&](int64_t b) {
      const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w + b)));
      const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, low)), _mm512_loadu_ps(xe + b));
      return _mm512_mul_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(q, 4)), _mm512_loadu_ps(xo + b), t),
                           _mm512_set1_ps(widen(scales[b / per_group])));
    };
    __m512 a = _mm512_setzero_ps(), c = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + 32 <= bytes; b += 32) {
      if ((b & 63) == 0) ahead(w + b);
      a = _mm512_add_ps(a, part(b));
      c = _mm512_add_ps(c, part(b + 16));
    }
    if (b < bytes) a = _mm512_add_ps(a, part(b));
    out[r] = _mm512_reduce_add_ps(_mm512_add_ps(a, c));
#else
    // Eight-lane vectors: 32 bytes at a time as eight 32-bit words, word i holding columns
    // 8i..8i+7 of the step's 64 (nibble c: column 8i + c), against xr, x arranged to match
    // (xr[64 step + 8 c + i] = x[64 step + 8 i + c]). Shifts and masks in place of widening
    // shuffles; lanes 0-3 are one group of 32 columns and lanes 4-7 the next (or the same).
    static_assert(kLanes == 8, "the word-wise int4 loop takes eight lanes");
    vf a{};
    int64_t b = 0;
    for (; b + 32 <= bytes; b += 32) {
      if (b % 64 == 0) ahead(w + b);
      vu q;
      std::memcpy(&q, w + b, sizeof q);
      const float* xs = xr + 2 * b;
      vf t0 = __builtin_convertvector((vi)(q & 0xFu), vf) * vload(xs);
      vf t1 = __builtin_convertvector((vi)((q >> 4) & 0xFu), vf) * vload(xs + 8);
      t0 += __builtin_convertvector((vi)((q >> 8) & 0xFu), vf) * vload(xs + 16);
      t1 += __builtin_convertvector((vi)((q >> 12) & 0xFu), vf) * vload(xs + 24);
      t0 += __builtin_convertvector((vi)((q >> 16) & 0xFu), vf) * vload(xs + 32);
      t1 += __builtin_convertvector((vi)((q >> 20) & 0xFu), vf) * vload(xs + 40);
      t0 += __builtin_convertvector((vi)((q >> 24) & 0xFu), vf) * vload(xs + 48);
      t1 += __builtin_convertvector((vi)(q >> 28), vf) * vload(xs + 56);
      const float s0 = widen(scales[2 * b / gs]), s1 = widen(scales[(2 * b + 32) / gs]);
      a += (t0 + t1) * vf{s0, s0, s0, s0, s1, s1, s1, s1};
    }
    for (int64_t g = 2 * b / gs; g < G; ++g) {  // a last group of 32 columns
      vf p0{}, p1{};
      // A group is gs / 2 >= 16 bytes: a whole number of vector pairs at 8 lanes (AVX2, SSE pairs).
      for (int64_t b = g * per_group; b < (g + 1) * per_group; b += 2 * kLanes) {
        if (b % 64 == 0) ahead(w + b);
        const vi q0 = widen_u8(w + b), q1 = widen_u8(w + b + kLanes);
        p0 += __builtin_convertvector(q0 & 0xF, vf) * vload(xe + b) + __builtin_convertvector(q0 >> 4, vf) * vload(xo + b);
        p1 += __builtin_convertvector(q1 & 0xF, vf) * vload(xe + b + kLanes) +
              __builtin_convertvector(q1 >> 4, vf) * vload(xo + b + kLanes);
      }
      a += (p0 + p1) * widen(scales[g]);
    }
    out[r] = hsum(a);
#endif
  }
}

#if defined(__AVX512BF16__)
// The bf16 twin of dot_rows_i4 for bf16 activations, 128 columns (64 bytes) a step, R rows side
// by side: the step's x is loaded once for all of them, and their R sums are independent chains.
// Each 16-bit lane of the loaded bytes holds four levels, columns 4j..4j+3; OR-ing a level into
// the bits of bf16 128.0 (0x4300) makes the exact bf16 of 128 + q in one instruction, which
// vdpbf16ps multiplies with x's columns 4j + c (xs[c], bf16) and sums in fp32. A product lane i
// covers columns 8i..8i+7 of the step, so its scale is the bf16 at `spread`'s word 2i + 1 (a word
// moved into an fp32's top half is that fp32). The zero points are folded in: w = (q - 8) s + z =
// (128 + q) s - 136 s + z. `firsts` holds each group's sum of x in the group's first lane of its
// step (0 in the others), so a lane's products start from -136 sum before s multiplies them; z sum
// goes into the row's lanes sixteen groups at a time, before they are summed. One row at a time,
// with the scales widened by three instructions a step, this ran at 12.6 GB/s on two threads of an
// AMD EPYC; four rows at a time with one permute for the scales, at 16-18. On one thread, a
// 3072 x 576 layer: 69 us with the zero points in a pass of their own per row (a separate sum),
// 57 with them folded in and a row's last 32 bytes in 256-bit halves, 53 with eight rows side by
// side (the x loads shared by twice as many), 50 with the z sums out of the step loop. The 256-bit
// halves gained 1.5% (57.4 -> 56.5 us), within the noise, and went: the masked step takes that tail.
constexpr uint16_t kBf16_128 = 0x4300;

template <int R>
void dot_rows_i4_bf16(const BFloat16* const xs[4], const float* firsts, const float* sums, const uint8_t* w,
                      const BFloat16* scales, const BFloat16* zeros, int64_t K, int64_t gs, BFloat16* out) {
  const int64_t bytes = K / 2, G = K / gs;
  // Lane i's group within the step, (8 i) / gs, in its top word.
  const __m512i iota = _mm512_set_epi32(120, 112, 104, 96, 88, 80, 72, 64, 56, 48, 40, 32, 24, 16, 8, 0);
  const __m512i spread = _mm512_slli_epi32(_mm512_srlv_epi32(iota, _mm512_set1_epi32(__builtin_ctzll(gs))), 16);
  const __m512i nibble = _mm512_set1_epi16(0xF), offset = _mm512_set1_epi16((short)kBf16_128);
  const __m512 minus136 = _mm512_set1_ps(-136.f);
  const int64_t per_step = std::max<int64_t>(128 / gs, 1);
  __m512 a[R];
  for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_ps();
  // One cache line of levels a row and step; a last, shorter step masked (xs is padded to whole steps).
  for (int64_t b = 0; b < bytes; b += 64) {
    const __mmask64 m = bytes - b >= 64 ? ~0ull : (1ull << (bytes - b)) - 1;
    const int64_t j = b / 2;  // the step's first entry in each xs[c]
    const int64_t g = 2 * b / gs;
    const __mmask8 sm = (__mmask8)((1u << std::min(per_step, G - g)) - 1);
    const __m512bh x0 = load_bh(xs[0] + j), x1 = load_bh(xs[1] + j), x2 = load_bh(xs[2] + j), x3 = load_bh(xs[3] + j);
    const __m512 start = _mm512_mul_ps(_mm512_loadu_ps(firsts + b / 4), minus136);
    for (int r = 0; r < R; ++r) {
      const uint8_t* row = w + r * bytes + b;
      ahead(row);
      const __m512i q = _mm512_maskz_loadu_epi8(m, row);
      // (q >> s) & 0xF | 0x4300 in one ternary-logic op: A & B | C is 0xEA.
      // The top level needs no mask: the shift leaves nothing above it.
      const __m512bh n3 = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(q, 12), offset);
      const __m512bh n2 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(q, 8), nibble, offset, 0xEA);
      const __m512bh n1 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(q, 4), nibble, offset, 0xEA);
      const __m512bh n0 = (__m512bh)_mm512_ternarylogic_epi32(q, nibble, offset, 0xEA);
      __m512 t = _mm512_dpbf16_ps(start, n0, x0);
      t = _mm512_dpbf16_ps(t, n1, x1);
      t = _mm512_dpbf16_ps(t, n2, x2);
      t = _mm512_dpbf16_ps(t, n3, x3);
      const __m128i s16 = _mm_maskz_loadu_epi16(sm, scales + r * G + g);
      const __m512 s = _mm512_castsi512_ps(
          _mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, spread, _mm512_castsi128_si512(s16)));
      a[r] = _mm512_fmadd_ps(t, s, a[r]);
    }
  }
  // Each group's z sum, sixteen groups at a time, into the lanes before they are summed.
  for (int64_t g = 0; g < G; g += 16) {
    const __mmask16 gm = first(G - g);
    const __m512 sum = _mm512_maskz_loadu_ps(gm, sums + g);
    for (int r = 0; r < R; ++r) a[r] = _mm512_fmadd_ps(load16(zeros + r * G + g, gm), sum, a[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = static_cast<BFloat16>(_mm512_reduce_add_ps(a[r]));
}
#endif

// x [n] -> q [n] and its scale d = max|x| / 127, q = x / d rounded half to even: what
// runner.model.functional.quantize_rows computes (a division, as there, so the same integers).
// Vectors of x at a time: a decode step quantizes every int8 activation group, and with an int8
// KV cache every new key, value and query.
template <typename T>
float quantize_row(const T* x, int64_t n, int8_t* q) {
  vf tops{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vf v = (vf)((vu)vload(x + i) & 0x7FFFFFFFu);
    tops = v > tops ? v : tops;
  }
  float top = 0.f;
  for (int l = 0; l < kLanes; ++l) top = std::max(top, tops[l]);
  for (int64_t j = i; j < n; ++j) top = std::max(top, std::fabs(widen(x[j])));
  const float d = top / 127.f;
  if (!(d > 0.f)) {
    std::fill(q, q + n, (int8_t)0);
    return d;
  }
  const vf magic = splat(12582912.f);  // 1.5 * 2^23: adding and taking it away rounds to an integer, ties to even
  for (i = 0; i + kLanes <= n; i += kLanes) {
    vi r = __builtin_convertvector((vload(x + i) / splat(d) + magic) - magic, vi);
    r = r > 127 ? 127 : r;  // only a subnormal d reaches past 127
    r = r < -127 ? -127 : r;
    for (int l = 0; l < kLanes; ++l) q[i + l] = (int8_t)r[l];
  }
  for (; i < n; ++i) q[i] = (int8_t)std::min(127.f, std::max(-127.f, std::nearbyint(widen(x[i]) / d)));
  return d;
}

// --- int4 weights against int8 activations (quant.activations: int8) ------------------------------
// x is quantized per group of the weights' gs columns, q = rne(x / d) with d = max|x| / 127, and
// kept as its even and odd columns (a weight byte's low and high level), padded to whole steps of
// 64 bytes. w = (level - 8) s + z makes a row's sum
//   sum_g s[g] d[g] (sum_{k in g} level[k] q[k] - 8 Q[g]) + sum_g z[g] d[g] Q[g],   Q[g] = sum_{k in g} q[k],
// the first bracket exact in int32. Per eight columns (a lane of the vector kernel) the kernels
// take `dl`, the group's d, and `starts`, -8 Q[g] in the group's first eight columns and 0 in
// the rest; `dq` holds d[g] Q[g] by group. This is llama.cpp's way with its Q8 activations.
struct Int8X {
  const int8_t* even;
  const int8_t* odd;
  const float* dl;
  const int32_t* starts;
  const float* dq;
};

// The portable loop: a group's integer sum in vectors, then its scales.
template <typename T>
void dot_rows_i4_q8(const Int8X& x, const uint8_t* w, const T* scales, const T* zeros, int64_t K, int64_t gs,
                    int64_t rows, float* out) {
  const int64_t bytes = K / 2, G = K / gs, per_group = gs / 2;
  for (int64_t r = 0; r < rows; ++r, w += bytes, scales += G, zeros += G) {
    float acc = 0.f;
    for (int64_t g = 0; g < G; ++g) {
      vi p{};
      for (int64_t b = g * per_group; b < (g + 1) * per_group; b += kLanes) {  // gs / 2 >= 16 bytes: whole vectors
        if (b % 64 == 0) ahead(w + b);
        const vi q = widen_u8(w + b);
        p += (q & 0xF) * widen_i8(x.even + b) + (q >> 4) * widen_i8(x.odd + b);
      }
      int32_t sum = x.starts[g * gs / 8];
      for (int i = 0; i < kLanes; ++i) sum += p[i];
      acc += (float)sum * x.dl[g * gs / 8] * widen(scales[g]) + widen(zeros[g]) * x.dq[g];
    }
    out[r] = acc;
  }
}

#if defined(__AVX2__)
// AVX2 (and AVX-512 without VNNI): 64 columns (32 bytes of levels) a step on vpmaddubsw, whose
// pair sums stay within int16 (2 x 15 x 127), and vpmaddwd into eight lanes of eight columns.
template <typename T>
void dot_rows_i4_q8_avx2(const Int8X& x, const uint8_t* w, const T* scales, const T* zeros, int64_t K, int64_t gs,
                         int64_t rows, float* out) {
  const int64_t bytes = K / 2, G = K / gs;
  const __m256i nibble = _mm256_set1_epi8(0xF), ones = _mm256_set1_epi16(1);
  for (int64_t r = 0; r < rows; ++r, w += bytes, scales += G, zeros += G) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t b = 0; b < bytes; b += 32) {  // a row is a whole number of 16-byte groups; x is padded
      if (b % 64 == 0) ahead(w + b);
      const __m256i q = bytes - b >= 32 ? _mm256_loadu_si256((const __m256i*)(w + b))
                                        : _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i*)(w + b)));
      const __m256i low = _mm256_and_si256(q, nibble), high = _mm256_and_si256(_mm256_srli_epi16(q, 4), nibble);
      const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(low, _mm256_loadu_si256((const __m256i*)(x.even + b))),
                                             _mm256_maddubs_epi16(high, _mm256_loadu_si256((const __m256i*)(x.odd + b))));
      const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(pairs, ones),
                                         _mm256_loadu_si256((const __m256i*)(x.starts + b / 4)));
      const int64_t g = 2 * b / gs;  // lanes 0-3 are group g; 4-7 too, or g + 1 for groups of 32
      const float s0 = widen(scales[g]), s1 = gs == 32 && g + 1 < G ? widen(scales[g + 1]) : s0;
      const __m256 s = _mm256_set_m128(_mm_set1_ps(s1), _mm_set1_ps(s0));
      a = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(p), _mm256_loadu_ps(x.dl + b / 4)), s, a);
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, a);
    float acc = 0.f;
    for (int i = 0; i < 8; ++i) acc += lanes[i];
    for (int64_t g = 0; g < G; ++g) acc += widen(zeros[g]) * x.dq[g];
    out[r] = acc;
  }
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// Lane i of a step's scales vector: the scale of the group of the step's columns 8i..8i+7, from
// the step's first group on (bf16: into the fp32's top half, as dot_rows_i4_bf16 spreads them).
inline __m512 spread_scales(const float* s, __mmask8 m, __m512i groups) {
  return _mm512_permutexvar_ps(groups, _mm512_maskz_loadu_ps((__mmask16)m, s));
}
inline __m512 spread_scales(const BFloat16* s, __mmask8 m, __m512i groups) {
  return _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, _mm512_slli_epi32(groups, 16),
                                                             _mm512_castsi128_si512(_mm_maskz_loadu_epi16(m, s))));
}

// R rows side by side, 128 columns (64 bytes of levels) a step: the low levels against x's even
// columns and the high ones against its odd ones on vpdpbusd (unsigned levels by signed q, four
// products a lane, summed onto `starts`), lane i covering the step's columns 8i..8i+7; then d and
// the row's scale. The z d Q terms go into the lanes sixteen groups at a time, after the steps.
// On one thread of a 2-core Intel Xeon (AVX512-BF16 and VNNI, no AMX), a 3072 x 576 layer with bf16
// x: 100 us on dot_rows_i4_bf16, 68 on this with the zero points in a pass of their own per row, 52
// with -8 Q in the products' start and z d Q after the steps (in alternation, one process).
template <int R, typename T>
void dot_rows_i4_q8_vnni(const Int8X& x, const uint8_t* w, const T* scales, const T* zeros, int64_t K, int64_t gs,
                         float* out) {
  const int64_t bytes = K / 2, G = K / gs;
  const __m512i iota = _mm512_set_epi32(120, 112, 104, 96, 88, 80, 72, 64, 56, 48, 40, 32, 24, 16, 8, 0);
  const __m512i groups = _mm512_srlv_epi32(iota, _mm512_set1_epi32(__builtin_ctzll(gs)));  // lane i's group in the step
  const __m512i nibble = _mm512_set1_epi8(0xF);
  const int64_t per_step = std::max<int64_t>(128 / gs, 1);
  __m512 a[R];
  for (int r = 0; r < R; ++r) a[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < bytes; b += 64) {  // a last, shorter step masked (x's arrays are padded with zeros)
    const __mmask64 m = bytes - b >= 64 ? ~0ull : (1ull << (bytes - b)) - 1;
    const int64_t g = 2 * b / gs;
    const __mmask8 sm = (__mmask8)((1u << std::min(per_step, G - g)) - 1);
    const __m512i e = _mm512_loadu_si512(x.even + b), o = _mm512_loadu_si512(x.odd + b);
    const __m512i start = _mm512_loadu_si512(x.starts + b / 4);
    const __m512 d = _mm512_loadu_ps(x.dl + b / 4);
    for (int r = 0; r < R; ++r) {
      const uint8_t* row = w + r * bytes + b;
      ahead(row);
      const __m512i q = _mm512_maskz_loadu_epi8(m, row);
      const __m512i low = _mm512_and_si512(q, nibble), high = _mm512_and_si512(_mm512_srli_epi16(q, 4), nibble);
      const __m512i p = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(start, low, e), high, o);
      a[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(p), d), spread_scales(scales + r * G + g, sm, groups), a[r]);
    }
  }
  for (int64_t g = 0; g < G; g += 16) {
    const __mmask16 gm = first(G - g);
    const __m512 dq = _mm512_maskz_loadu_ps(gm, x.dq + g);
    for (int r = 0; r < R; ++r) a[r] = _mm512_fmadd_ps(load16(zeros + r * G + g, gm), dq, a[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(a[r]);
}
#endif

template <typename T>
std::vector<float> widened(const T* x, int64_t n) {
  std::vector<float> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = widen(x[i]);
  return out;
}

// sum_g (zeros[g] - base * scales[g]) * sums[g]: one row's zero points against x's group sums.
// (Left scalar, this loop cost as much as the row's dot product: G is K / 32.)
template <typename T>
float group_offsets(const T* zeros, const T* scales, const float* sums, int64_t G, float base) {
  int64_t g = 0;
  float total = 0.f;
#if defined(__AVX512BW__)
  __m512 acc = _mm512_setzero_ps();
  const __m512 b = _mm512_set1_ps(-base);
  for (; g < G; g += 16) {
    const __mmask16 m = G - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (G - g)) - 1);
    __m512 z, s;
    if constexpr (std::is_same_v<T, BFloat16>) {
      z = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, zeros + g)), 16));
      s = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, scales + g)), 16));
    } else {
      z = _mm512_maskz_loadu_ps(m, zeros + g);
      s = _mm512_maskz_loadu_ps(m, scales + g);
    }
    acc = _mm512_fmadd_ps(_mm512_fmadd_ps(s, b, z), _mm512_maskz_loadu_ps(m, sums + g), acc);
  }
  total = _mm512_reduce_add_ps(acc);
#else
  vf acc{};
  for (; g + kLanes <= G; g += kLanes) acc += (vload(zeros + g) - base * vload(scales + g)) * vload(sums + g);
  total = hsum(acc);
#endif
  for (; g < G; ++g) total += (widen(zeros[g]) - base * widen(scales[g])) * sums[g];
  return total;
}

// One linear layer's weights: T [N, K] (float), int8 [N, K] with scales [N], or uint8 [N, K / 2]
// with scales and zeros [N, K / gs] (int4; runner.quant's layouts).
template <typename T>
struct Weights {
  const void* w = nullptr;
  const T* scales = nullptr;  // int8 and int4
  const T* zeros = nullptr;   // int4
  int64_t N = 0, K = 0, gs = 0;
  bool int8_x = false;  // int4: x quantized to int8 per group (see dot_rows_i4_q8)
};

// x's M rows made ready once for a layer's weights (widened, rearranged, their group sums), then
// any run of the layer's output rows: the ops share the rows out over at::parallel_for's threads,
// decode_layers over its team.
template <typename T>
class Gemv {
 public:
  Gemv(const Weights<T>& wt, const T* x, int64_t M) : wt_(wt), x_(x), M_(M) {
    const int64_t K = wt.K;
    if (wt.zeros == nullptr) {
      if (wt.scales != nullptr) xf_ = widened(x, M * K);  // int8's loop takes fp32 x
      return;
    }
    const int64_t G = K / wt.gs;
    if (wt.int8_x) {
      quantize_x(G);
      return;
    }
    // Each group's sum of x, for the zero points: w = (q - 8) s + z = q s + (z - 8 s). A group is
    // a whole number of vectors (gs is a power of two >= 32).
    sums_.resize(M * G);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < G; ++g) {
        vf acc{};
        for (int64_t k = g * wt.gs; k < (g + 1) * wt.gs; k += kLanes) acc += vload(x + m * K + k);
        sums_[m * G + g] = hsum(acc);
      }
#if defined(__AVX512BF16__)
    bf16_path_ = std::is_same_v<T, BFloat16> && K % 8 == 0;
#endif
    // x rearranged as each path reads it: by column mod 4 in bf16 (padded to whole steps of 32
    // entries), or even and odd columns in fp32. (Element by element through float, this took
    // half of a small layer's call.)
    quarter_ = (K / 4 + 31) / 32 * 32;
    xq_.resize(bf16_path_ ? M * 4 * quarter_ : 0);
    // Eight-lane targets read xr (dot_rows_i4's word order), and even and odd columns only for a
    // last 32 columns past whole steps of 64.
    words_ = kLanes == 8 && !bf16_path_;
    halves_ = !bf16_path_ && (!words_ || K % 64);
    xe_.resize(halves_ ? M * K / 2 : 0);
    xo_.resize(halves_ ? M * K / 2 : 0);
    xr_.resize(words_ ? M * K : 0);
    // The bf16 path's group sums, each in its group's first lane of a step (see dot_rows_i4_bf16).
    firsts_.resize(bf16_path_ ? M * quarter_ / 2 : 0);
    for (int64_t m = 0; m < M; ++m) {
      if (bf16_path_) {
        const uint16_t* bits = reinterpret_cast<const uint16_t*>(x + m * K);
        for (int64_t c = 0; c < 4; ++c) {
          uint16_t* to = xq_.data() + (m * 4 + c) * quarter_;
          for (int64_t j = 0; j < K / 4; ++j) to[j] = bits[4 * j + c];
        }
        for (int64_t k = 0; k < K; k += wt.gs) firsts_[m * quarter_ / 2 + k / 8] = sums_[m * G + k / wt.gs];
      } else {
        for (int64_t j = 0; halves_ && j < K / 2; ++j) {
          xe_[m * K / 2 + j] = widen(x[m * K + 2 * j]);
          xo_[m * K / 2 + j] = widen(x[m * K + 2 * j + 1]);
        }
        for (int64_t k = 0; words_ && k + 64 <= K; k += 64)
          for (int64_t c = 0; c < 8; ++c)
            for (int64_t i = 0; i < 8; ++i) xr_[m * K + k + 8 * c + i] = widen(x[m * K + k + 8 * i + c]);
      }
    }
  }

  // Output rows [n0, n1) of every input row into y [M, N]; n0 a multiple of kRows.
  void rows(int64_t n0, int64_t n1, T* y) const {
    if (wt_.int8_x)
      int4_q8_rows(n0, n1, y);
    else if (wt_.zeros != nullptr)
      int4_rows(n0, n1, y);
    else if (wt_.scales != nullptr)
      int8_rows(n0, n1, y);
    else
      float_rows(n0, n1, y);
  }

  // All N rows, shared out over at::parallel_for's threads a block of kRows at a time.
  void all(T* y) const {
    const int64_t N = wt_.N, blocks = (N + kRows - 1) / kRows;
    at::parallel_for(0, blocks, 16,
                     [&](int64_t begin, int64_t end) { rows(begin * kRows, std::min(N, end * kRows), y); });
  }

 private:
  // Block by block, each block's rows kept in L1 across the M inputs.
  void float_rows(int64_t n0, int64_t n1, T* y) const {
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

  void int8_rows(int64_t n0, int64_t n1, T* y) const {
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

  // One call per input row over the run: the kernels' setup is paid once.
  void int4_rows(int64_t n, int64_t n1, T* y) const {
    const uint8_t* w = static_cast<const uint8_t*>(wt_.w);
    const T* scales = wt_.scales;
    const int64_t N = wt_.N, K = wt_.K, gs = wt_.gs, G = K / gs, rows = n1 - n;
    // The bf16 path sums 128 + q (see dot_rows_i4_bf16): its offset per group is z - 136 s.
    const float base = bf16_path_ ? 136.f : 8.f;
    std::vector<float> acc(bf16_path_ ? 0 : rows);
    for (int64_t m = 0; m < M_; ++m) {
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<T, BFloat16>) {
        if (bf16_path_) {
          const BFloat16* xs[4];
          for (int c = 0; c < 4; ++c) xs[c] = reinterpret_cast<const BFloat16*>(xq_.data() + (m * 4 + c) * quarter_);
          const float *firsts = firsts_.data() + m * quarter_ / 2, *sums = sums_.data() + m * G;
          const T* zeros = wt_.zeros;
          int64_t r = 0;
          for (; r + 8 <= rows; r += 8)
            dot_rows_i4_bf16<8>(xs, firsts, sums, w + (n + r) * K / 2, scales + (n + r) * G, zeros + (n + r) * G, K, gs,
                                y + m * N + n + r);
          for (; r + kRows <= rows; r += kRows)
            dot_rows_i4_bf16<kRows>(xs, firsts, sums, w + (n + r) * K / 2, scales + (n + r) * G, zeros + (n + r) * G, K, gs,
                                    y + m * N + n + r);
          for (; r < rows; ++r)
            dot_rows_i4_bf16<1>(xs, firsts, sums, w + (n + r) * K / 2, scales + (n + r) * G, zeros + (n + r) * G, K, gs,
                                y + m * N + n + r);
          continue;
        }
      }
#endif
      if (!bf16_path_)
        dot_rows_i4(halves_ ? xe_.data() + m * K / 2 : nullptr, halves_ ? xo_.data() + m * K / 2 : nullptr,
                    words_ ? xr_.data() + m * K : nullptr, w + n * K / 2, scales + n * G, K, gs, rows, acc.data());
      for (int64_t r = 0; r < rows; ++r) {
        const float offset =
            group_offsets(wt_.zeros + (n + r) * G, scales + (n + r) * G, sums_.data() + m * G, G, base);
        y[m * N + n + r] = static_cast<T>(acc[r] + offset);
      }
    }
  }

  // x quantized for the int8 activation kernels, row by row (see Int8X); dq in sums_.
  void quantize_x(int64_t G) {
    const int64_t K = wt_.K, gs = wt_.gs;
    half_ = (K / 2 + 63) / 64 * 64;
    xq8_.assign(M_ * 2 * half_, 0);
    dl_.assign(M_ * half_ / 4, 0.f);
    starts_.assign(M_ * half_ / 4, 0);
    sums_.resize(M_ * G);
    std::vector<int8_t> q(gs);
    for (int64_t m = 0; m < M_; ++m) {
      int8_t* even = xq8_.data() + m * 2 * half_;
      int8_t* odd = even + half_;
      for (int64_t g = 0; g < G; ++g) {
        const float d = quantize_row(x_ + m * K + g * gs, gs, q.data());
        int32_t sum = 0;
        for (int64_t k = 0; k < gs; k += 2) {
          even[(g * gs + k) / 2] = q[k], odd[(g * gs + k) / 2] = q[k + 1];
          sum += q[k] + q[k + 1];
        }
        std::fill_n(dl_.data() + m * half_ / 4 + g * gs / 8, gs / 8, d);
        starts_[m * half_ / 4 + g * gs / 8] = -8 * sum;
        sums_[m * G + g] = d * (float)sum;
      }
    }
  }

  void int4_q8_rows(int64_t n, int64_t n1, T* y) const {
    const uint8_t* w = static_cast<const uint8_t*>(wt_.w);
    const int64_t N = wt_.N, K = wt_.K, gs = wt_.gs, G = K / gs, rows = n1 - n;
    float acc[8];
    for (int64_t m = 0; m < M_; ++m) {
      const Int8X x{xq8_.data() + m * 2 * half_, xq8_.data() + m * 2 * half_ + half_, dl_.data() + m * half_ / 4,
                    starts_.data() + m * half_ / 4, sums_.data() + m * G};
      for (int64_t r = 0; r < rows;) {
        const uint8_t* at = w + (n + r) * K / 2;
        const T *scales = wt_.scales + (n + r) * G, *zeros = wt_.zeros + (n + r) * G;
        const int64_t R = rows - r >= 8 ? 8 : 1;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
        if (R == 8)
          dot_rows_i4_q8_vnni<8>(x, at, scales, zeros, K, gs, acc);
        else
          dot_rows_i4_q8_vnni<1>(x, at, scales, zeros, K, gs, acc);
#elif defined(__AVX2__)
        dot_rows_i4_q8_avx2(x, at, scales, zeros, K, gs, R, acc);
#else
        dot_rows_i4_q8(x, at, scales, zeros, K, gs, R, acc);
#endif
        for (int64_t i = 0; i < R; ++i) y[m * N + n + r + i] = static_cast<T>(acc[i]);
        r += R;
      }
    }
  }

  Weights<T> wt_;
  const T* x_;
  int64_t M_;
  std::vector<float> xf_, sums_, xe_, xo_, xr_, firsts_, dl_;
  std::vector<uint16_t> xq_;
  std::vector<int8_t> xq8_;
  std::vector<int32_t> starts_;
  int64_t quarter_ = 0, half_ = 0;
  bool bf16_path_ = false, words_ = false, halves_ = false;
};

// --- ops ------------------------------------------------------------------------------------------

// An uninitialised tensor shaped like t but for its last dimension, n.
at::Tensor with_last(const at::Tensor& t, int64_t n) {
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  shape.back() = n;
  return at::empty(shape, t.options());
}

void check_cpu_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "runner::", name, ": CPU tensors only, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16,
              "runner::", name, ": float32 or bfloat16 only, got ", t.scalar_type());
}

// One linear's operands, checked against the width K and dtype of its input and made contiguous:
// {w} float, {w, scales} int8, {w, scales, zeros} int4 with groupsize gs.
std::vector<at::Tensor> checked_linear(const std::string& name, int64_t K, at::ScalarType dtype, at::TensorList w,
                                      int64_t gs) {
  const auto fail = [&](const auto&... what) { TORCH_CHECK(false, "runner::", name, ": ", what...); };
  if (w.empty() || w.size() > 3) fail("a linear is {w}, {w, scales} or {w, scales, zeros}, got ", w.size(), " tensors");
  const int64_t N = w[0].size(0);
  switch (w.size()) {
    case 1:
      if (!(w[0].dim() == 2 && K == w[0].size(1)))
        fail("x [..., K] and w [N, K] disagree: K = ", K, " and w ", w[0].sizes());
      if (w[0].scalar_type() != dtype) fail("x and w dtypes differ");
      break;
    case 2:
      if (!(w[0].dim() == 2 && w[0].scalar_type() == at::kChar && K == w[0].size(1)))
        fail("w must be int8 [N, K] for x [..., K], got ", w[0].sizes(), " for K = ", K);
      if (!(w[1].numel() == N && w[1].scalar_type() == dtype)) fail("scales must be [N] in x's dtype");
      break;
    case 3:
      if (!(w[0].dim() == 2 && w[0].scalar_type() == at::kByte && w[0].size(1) * 2 == K))
        fail("w must be uint8 [N, K / 2] for x [..., K], got ", w[0].sizes(), " for K = ", K);
      // A power of two: a 128-column step of the bf16 path then starts on a group's first column.
      if (!(gs >= 32 && (gs & (gs - 1)) == 0 && K % gs == 0))
        fail("groupsize must be a power of two >= 32 that divides K, got ", gs);
      if (!(w[1].sizes() == w[2].sizes() && w[1].dim() == 2 && w[1].size(0) == N && w[1].size(1) == K / gs &&
            w[1].scalar_type() == dtype && w[2].scalar_type() == dtype))
        fail("scales and zeros must be [N, K / groupsize] in x's dtype");
  }
  std::vector<at::Tensor> out;
  for (const auto& t : w) out.push_back(t.contiguous());
  return out;
}

template <typename T>
Weights<T> weights_of(const std::vector<at::Tensor>& w, int64_t gs, bool int8_x = false) {
  Weights<T> out;
  out.int8_x = int8_x;
  out.w = w[0].const_data_ptr();
  if (w.size() > 1) out.scales = w[1].const_data_ptr<T>();
  if (w.size() > 2) out.zeros = w[2].const_data_ptr<T>(), out.gs = gs;
  out.N = w[0].size(0);
  out.K = w[0].size(1) * (w.size() == 3 ? 2 : 1);
  return out;
}

at::Tensor linear_of(const std::string& name, const at::Tensor& x, at::TensorList w, int64_t gs, bool int8_x = false) {
  check_cpu_float(x, name.c_str());
  const auto operands = checked_linear(name, x.size(-1), x.scalar_type(), w, gs);
  auto xc = x.contiguous();
  auto y = with_last(x, w[0].size(0));
  const int64_t M = x.numel() / x.size(-1);
  if (x.scalar_type() == at::kBFloat16)
    Gemv<BFloat16>(weights_of<BFloat16>(operands, gs, int8_x), xc.const_data_ptr<BFloat16>(), M)
        .all(y.mutable_data_ptr<BFloat16>());
  else
    Gemv<float>(weights_of<float>(operands, gs, int8_x), xc.const_data_ptr<float>(), M)
        .all(y.mutable_data_ptr<float>());
  return y;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& w) { return linear_of("linear", x, {w}, 0); }

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  return linear_of("int8_linear", x, {w, scales}, 0);
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& zeros,
                       int64_t groupsize, bool int8_x) {
  return linear_of("int4_linear", x, {w, scales, zeros}, groupsize, int8_x);
}

// --- experts: stacked weights [E, N, ...]; row m of x goes through expert ids[m] only ------------
// Each row runs the plain GEMV on its expert's slice, so the experts no row chose are never read
// and a quantized expert is read once, never dequantized into a copy.

at::Tensor checked_ids(const char* name, const at::Tensor& x, const at::Tensor& ids, int64_t E) {
  check_cpu_float(x, name);
  TORCH_CHECK(x.dim() == 2, "runner::", name, ": x must be [M, K], got ", x.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.numel() == x.size(0), "runner::", name,
              ": ids must be M int64 expert indices for x [M, K]");
  auto c = ids.contiguous();
  const int64_t* id = c.const_data_ptr<int64_t>();
  for (int64_t m = 0; m < x.size(0); ++m)
    TORCH_CHECK(id[m] >= 0 && id[m] < E, "runner::", name, ": expert ", id[m], " is not one of the ", E);
  return c;
}

// f(row m of x, its expert, row m of y), for every row, in x's dtype T.
template <typename F>
at::Tensor per_row(const at::Tensor& x, const at::Tensor& ids, int64_t N, F f) {
  auto xc = x.contiguous();
  auto y = at::empty({x.size(0), N}, x.options());
  const int64_t* id = ids.const_data_ptr<int64_t>();
  const int64_t K = x.size(1);
  for (int64_t m = 0; m < x.size(0); ++m) {
    if (x.scalar_type() == at::kBFloat16)
      f(xc.const_data_ptr<BFloat16>() + m * K, id[m], y.mutable_data_ptr<BFloat16>() + m * N);
    else
      f(xc.const_data_ptr<float>() + m * K, id[m], y.mutable_data_ptr<float>() + m * N);
  }
  return y;
}

at::Tensor expert_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& ids) {
  TORCH_CHECK(w.dim() == 3 && x.dim() == 2 && x.size(1) == w.size(2) && w.scalar_type() == x.scalar_type() &&
                  w.is_contiguous(),
              "runner::expert_linear: w must be contiguous [E, N, K] in x's dtype with x [M, K], got ", w.sizes(),
              " and ", x.sizes());
  auto id = checked_ids("expert_linear", x, ids, w.size(0));
  const int64_t N = w.size(1), K = w.size(2);
  return per_row(x, id, N, [&](auto* xr, int64_t e, auto* yr) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(xr)>>;
    Weights<T> we;
    we.w = w.const_data_ptr<T>() + e * N * K, we.N = N, we.K = K;
    Gemv<T>(we, xr, 1).all(yr);
  });
}

at::Tensor int8_expert_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                              const at::Tensor& ids) {
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kChar && w.is_contiguous() && x.dim() == 2 &&
                  x.size(1) == w.size(2),
              "runner::int8_expert_linear: w must be contiguous int8 [E, N, K] with x [M, K], got ", w.sizes(),
              " and ", x.sizes());
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == w.size(0) && scales.size(1) == w.size(1) &&
                  scales.scalar_type() == x.scalar_type() && scales.is_contiguous(),
              "runner::int8_expert_linear: scales must be contiguous [E, N] in x's dtype");
  auto id = checked_ids("int8_expert_linear", x, ids, w.size(0));
  const int64_t N = w.size(1), K = w.size(2);
  return per_row(x, id, N, [&](auto* xr, int64_t e, auto* yr) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(xr)>>;
    Weights<T> we;
    we.w = w.const_data_ptr<int8_t>() + e * N * K, we.scales = scales.const_data_ptr<T>() + e * N, we.N = N, we.K = K;
    Gemv<T>(we, xr, 1).all(yr);
  });
}

at::Tensor int4_expert_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                              const at::Tensor& zeros, int64_t groupsize, const at::Tensor& ids) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && w.scalar_type() == at::kByte && w.is_contiguous() &&
                  w.size(2) * 2 == x.size(1),
              "runner::int4_expert_linear: w must be contiguous uint8 [E, N, K / 2] with x [M, K], got ", w.sizes(),
              " and ", x.sizes());
  const int64_t E = w.size(0), N = w.size(1), K = x.size(1);
  TORCH_CHECK(groupsize >= 32 && (groupsize & (groupsize - 1)) == 0 && K % groupsize == 0,
              "runner::int4_expert_linear: groupsize must be a power of two >= 32 that divides K, got ", groupsize);
  const int64_t G = K / groupsize;
  TORCH_CHECK(scales.sizes() == zeros.sizes() && scales.dim() == 3 && scales.size(0) == E && scales.size(1) == N &&
                  scales.size(2) == G && scales.scalar_type() == x.scalar_type() &&
                  zeros.scalar_type() == x.scalar_type() && scales.is_contiguous() && zeros.is_contiguous(),
              "runner::int4_expert_linear: scales and zeros must be contiguous [E, N, K / groupsize] in x's dtype");
  auto id = checked_ids("int4_expert_linear", x, ids, E);
  return per_row(x, id, N, [&](auto* xr, int64_t e, auto* yr) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(xr)>>;
    Weights<T> we;
    we.w = w.const_data_ptr<uint8_t>() + e * N * K / 2, we.N = N, we.K = K, we.gs = groupsize;
    we.scales = scales.const_data_ptr<T>() + e * N * G, we.zeros = zeros.const_data_ptr<T>() + e * N * G;
    Gemv<T>(we, xr, 1).all(yr);
  });
}

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

// Rows per thread for row-wise ops: a decode step's few rows stay on the calling thread (a parallel
// region costs more than they do); a prompt's hundreds are shared out.
inline int64_t grain_rows(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)); }

// One row: x / rms(x), rounded to T, times w.
template <typename T>
void rms_norm_row(const T* xi, const T* w, T* yi, int64_t D, float eps) {
  const int64_t whole = D / kLanes * kLanes;
  vf acc{};
  for (int64_t d = 0; d < whole; d += kLanes) acc += vload(xi + d) * vload(xi + d);
  float ss = hsum(acc);
  for (int64_t d = whole; d < D; ++d) ss += widen(xi[d]) * widen(xi[d]);
  const float r = 1.f / std::sqrt(ss / D + eps);
  for (int64_t d = 0; d < whole; d += kLanes) vstore(yi + d, vround<T>(vload(xi + d) * r) * vload(w + d));
  for (int64_t d = whole; d < D; ++d) yi[d] = static_cast<T>(round_to<T>(widen(xi[d]) * r) * widen(w[d]));
}

template <typename T>
void rms_norm_impl(const T* x, const T* w, T* y, int64_t rows, int64_t D, float eps) {
  at::parallel_for(0, rows, grain_rows(D), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) rms_norm_row(x + i * D, w, y + i * D, D, eps);
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  check_cpu_float(x, "rms_norm");
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(-1) && w.scalar_type() == x.scalar_type(),
              "runner::rms_norm: weight must be [", x.size(-1), "] in x's dtype");
  auto xc = x.contiguous();
  auto wc = w.contiguous();
  auto y = at::empty_like(xc);
  const int64_t D = x.size(-1), rows = x.numel() / D;
  if (x.scalar_type() == at::kBFloat16)
    rms_norm_impl(xc.const_data_ptr<BFloat16>(), wc.const_data_ptr<BFloat16>(), y.mutable_data_ptr<BFloat16>(), rows, D, (float)eps);
  else
    rms_norm_impl(xc.const_data_ptr<float>(), wc.const_data_ptr<float>(), y.mutable_data_ptr<float>(), rows, D, (float)eps);
  return y;
}

// Columns [j0, j1) of one row: silu(gate) * up, gate and up each I wide. j0 is a multiple of
// kLanes, so every column takes the same path (vector or tail) whatever the span.
template <typename T>
void swiglu_span(const T* g, const T* u, T* y, int64_t I, int64_t j0, int64_t j1) {
  const int64_t whole = std::min(j1, I / kLanes * kLanes);
  int64_t j = j0;
  for (; j < whole; j += kLanes) {
    const vf gv = vload(g + j);
    vstore(y + j, vround<T>(gv * vrecip(1.f + vexp(-gv))) * vload(u + j));
  }
  for (; j < j1; ++j) {
    const float gv = widen(g[j]);
    y[j] = static_cast<T>(round_to<T>(gv / (1.f + std::exp(-gv))) * widen(u[j]));
  }
}

template <typename T>
void swiglu_impl(const T* gu, T* y, int64_t rows, int64_t I) {
  at::parallel_for(0, rows, grain_rows(I), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) swiglu_span(gu + i * 2 * I, gu + i * 2 * I + I, y + i * I, I, 0, I);
  });
}

at::Tensor swiglu(const at::Tensor& gate_up) {
  check_cpu_float(gate_up, "swiglu");
  TORCH_CHECK(gate_up.size(-1) % 2 == 0, "runner::swiglu: the last dimension must be even");
  auto gc = gate_up.contiguous();
  const int64_t I = gate_up.size(-1) / 2, rows = gate_up.numel() / (2 * I);
  auto y = with_last(gate_up, I);
  if (gate_up.scalar_type() == at::kBFloat16)
    swiglu_impl(gc.const_data_ptr<BFloat16>(), y.mutable_data_ptr<BFloat16>(), rows, I);
  else
    swiglu_impl(gc.const_data_ptr<float>(), y.mutable_data_ptr<float>(), rows, I);
  return y;
}

// RoPE on one head (rotate-half pairing), rounding as the reference does in T.
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
// One position at a time, widening k and summing each product vector, this was most of a long
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
// time took a shuffle and a shift each).
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

// max(p[0..n)) (-inf for none) over vectors of positions: one position at a time, a chain of
// dependent maxima, this was a fifth of a long cache's attention.
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

// --- an int8 KV cache: keys and values int8 with a scale per position and key head ---------------

// A KV cache's rows: in T (k, v), or int8 (kq, vq) with their scales (ks, vs) [B, KVH, L].
template <typename T>
struct CacheRows {
  T* k;
  T* v;
  int8_t* kq;
  int8_t* vq;
  float* ks;
  float* vs;

  // Key k (RoPE'd here; `rotated` holds hd values of scratch) and value v into row `at`.
  void write(int64_t at, const T* k_in, const T* v_in, const float* cos, const float* sin, int64_t hd,
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
};

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

// A few tokens' attention (decode, verify): B rows of `count` tokens each; row b's token t sits at
// pos[b * count + t] of row b's cache, and cos_sin holds its rotation at the same index. write()
// puts every new key and value into the cache. Then each item, one key head of one token over one
// chunk of kChunk positions, gives each query head of that key head its chunk's maximum score,
// sum of exponentials and weighted sum of values (FlashDecoding's split): the chunk's keys and
// values are read from memory once for the group's heads, and a long cache is shared out evenly
// over the threads. combine() merges a token's chunks per query head.
template <typename T>
struct FewTokens {
  static constexpr int64_t kChunk = 64;  // positions an item covers
  const T* qkv;
  const float* cos_sin;
  T* kc;
  T* vc;
  T* y;
  const int64_t* pos;
  int64_t B, count, H, KVH, hd, L, window;
  float* parts = nullptr;  // partials() floats, set before items run
  // An int8 cache (kc and vc unset): values [B, KVH, L, hd] and their scales [B, KVH, L].
  int8_t* kq = nullptr;
  int8_t* vq = nullptr;
  float* ks = nullptr;
  float* vs = nullptr;

  int64_t tokens() const { return B * count; }
  int64_t longest() const {
    int64_t n = 0;
    for (int64_t i = 0; i < tokens(); ++i) n = std::max(n, window > 0 ? std::min(window, pos[i] + 1) : pos[i] + 1);
    return n;
  }
  int64_t chunks() const { return (longest() + kChunk - 1) / kChunk; }
  int64_t items() const { return tokens() * KVH * chunks(); }
  int64_t heads() const { return tokens() * H; }  // combine()'s items
  int64_t partials() const { return heads() * chunks() * (hd + 2); }
  int64_t width() const { return (H + 2 * KVH) * hd; }

  // Every new key and value goes into the cache first: a query sees those at positions up to its own.
  void write() const {
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

  // A thread's buffers for items: the rotated queries of the last key head it served (a thread's
  // items run chunk after chunk of one key head), as int8 with their scales for an int8 cache, and
  // a chunk's scores.
  struct Scratch {
    std::vector<T> qh;
    std::vector<float> qf, p, dq;
    std::vector<int8_t> q8;
    std::vector<float*> outs;  // an int8 cache's weighted sums, per query head
    int64_t queries = -1;  // t * KVH + g of those queries
    Scratch(const FewTokens& a)
        : qh(a.H / a.KVH * a.hd), qf(a.H / a.KVH * a.hd), p(a.H / a.KVH * kChunk), dq(a.H / a.KVH),
          q8(a.H / a.KVH * a.hd), outs(a.H / a.KVH) {}
  };

  // Chunk c of token t's visible positions (a sliding window's last `window` of them), for every
  // query head of key head g: into its partial, [maximum, sum of exp(score - maximum), hd sums].
  void item(int64_t item, Scratch& s) const {
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
      // exp over whole vectors of positions (one call per position was a fifth of a long cache's time)
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

  // Query head i (token i / H, head i % H): its chunks' partials merged, rescaled to the largest
  // maximum, into y. (Each chunk's maximum is replaced by its weight on the way.)
  void combine(int64_t i) const {
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

  void run() {
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
};

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

// --- a prompt's attention: causal (sliding-window) GQA over the cache, a block at a time ---------

// FlashAttention's online softmax, on the CPU: a block of kQueryBlock queries against kKeyBlock
// keys at a time. Each key head's keys and values are first widened to fp32 once (keys
// transposed, a block at a time) and shared by every query of its heads; R rows' scores stay in
// registers while the head dimension is summed, and R rows' outputs while the values are.
constexpr int64_t kQueryBlock = 64;
constexpr int64_t kKeyBlock = 64;
// Sums a tile keeps in registers: 4 rows x 4 vectors of AVX-512's 32 registers, 6 x 2 of AVX2's
// 16 (4 x 2 there left the loads and broadcasts, not the multiply-adds, as the bound).
constexpr int kScoreRows = kLanes >= 16 ? 4 : 6;
constexpr int kScoreVectors = kLanes >= 16 ? 4 : 2;
constexpr int64_t kQueryRows = (kQueryBlock + kScoreRows - 1) / kScoreRows * kScoreRows;  // whole tiles

// Online softmax over one key block's scores s [kQueryRows][kKeyBlock] (keys j0.. from base, nk
// of them in the cache): masked scores become 0, the others exp(score - the row's running
// maximum), and each row's total and output are rescaled as its maximum grows.
void softmax_block(float* s, const int64_t* pos, int64_t n, int64_t hd, int64_t base, int64_t j0, int64_t nk,
                   int64_t window, float* o, float* top, float* total) {
  for (int64_t r = 0; r < n; ++r) {
    float* sr = s + r * kKeyBlock;
    const int64_t p = pos[r] - base, lo = window > 0 ? p + 1 - window : -1;
    // Only a block on the diagonal (or the window's edge) has keys this row must not see.
    if (j0 + kKeyBlock - 1 > p || j0 <= lo)
      for (int64_t j = 0; j < kKeyBlock; ++j)
        if (j0 + j > p || j0 + j < std::max<int64_t>(lo, 0) || j >= nk) sr[j] = -INFINITY;
    vf mv = vload(sr);
    for (int64_t j = kLanes; j < kKeyBlock; j += kLanes) {
      const vf x = vload(sr + j);
      mv = x > mv ? x : mv;
    }
    float m = -INFINITY;
    for (int i = 0; i < kLanes; ++i) m = std::max(m, mv[i]);
    if (m == -INFINITY) {  // none of this block's keys is visible to this row
      std::fill(sr, sr + kKeyBlock, 0.f);
      continue;
    }
    const float grown = std::max(top[r], m), shrink = std::exp(top[r] - grown);
    top[r] = grown;
    vf sums{};
    for (int64_t j = 0; j < kKeyBlock; j += kLanes) {
      const vf x = vload(sr + j);
      const vf kept = x == -INFINITY ? vf{} : vexp(x - grown);  // exactly 0 where masked
      vstore(sr + j, kept);
      sums += kept;
    }
    total[r] = total[r] * shrink + hsum(sums);
    if (shrink != 1.f)
      for (int64_t d = 0; d < hd; ++d) o[r * hd + d] *= shrink;
  }
}

// A query block's start: the outputs, maxima and totals reset, and the first key block any of
// its n rows sees, with the last key (indices from base).
std::pair<int64_t, int64_t> start_block(const int64_t* pos, int64_t n, int64_t base, int64_t keys, int64_t window,
                                        int64_t hd, float* o, float* top, float* total) {
  int64_t first = keys, last = -1;
  for (int64_t r = 0; r < n; ++r) {
    first = std::min(first, (window > 0 ? std::max<int64_t>(0, pos[r] + 1 - window) : 0) - base);
    last = std::max(last, pos[r] - base);
  }
  std::fill(o, o + kQueryRows * hd, 0.f);
  std::fill(top, top + kQueryRows, -INFINITY);
  std::fill(total, total + kQueryRows, 0.f);
  return {first / kKeyBlock * kKeyBlock, last};
}

// One query block of one head: rows [i0, i0 + n), their queries qf (scaled fp32, kQueryRows rows
// with zeros past n), over key blocks starting at `base` (kt: [block][hd][kKeyBlock], vals:
// [key - base][hd]); o gets the rows' outputs, unnormalised, and total their softmax sums.
void attend_block(const float* qf, const float* kt, const float* vals, const int64_t* pos, int64_t n, int64_t hd,
                  int64_t base, int64_t keys, int64_t window, float* s, float* o, float* top, float* total) {
  const auto [start, last] = start_block(pos, n, base, keys, window, hd, o, top, total);
  for (int64_t j0 = start; j0 <= last; j0 += kKeyBlock) {
    const int64_t nk = std::min(kKeyBlock, keys - j0);
    const float* kb = kt + j0 * hd;  // this block's [hd][kKeyBlock]
    // Scores: R rows x kScoreVectors vectors of keys in registers, summed over the head dimension.
    for (int64_t r = 0; r < n; r += kScoreRows)
      for (int64_t c0 = 0; c0 < kKeyBlock; c0 += kScoreVectors * kLanes) {
        vf a[kScoreRows][kScoreVectors] = {};
        for (int64_t d = 0; d < hd; ++d) {
          const float* k = kb + d * kKeyBlock + c0;
          vf kv[kScoreVectors];
          for (int c = 0; c < kScoreVectors; ++c) kv[c] = vload(k + c * kLanes);
          for (int rr = 0; rr < kScoreRows; ++rr) {
            const float x = qf[(r + rr) * hd + d];
            for (int c = 0; c < kScoreVectors; ++c) a[rr][c] += x * kv[c];
          }
        }
        for (int rr = 0; rr < kScoreRows; ++rr)
          for (int c = 0; c < kScoreVectors; ++c) vstore(s + (r + rr) * kKeyBlock + c0 + c * kLanes, a[rr][c]);
      }
    softmax_block(s, pos, n, hd, base, j0, nk, window, o, top, total);
    // The weighted sum of values: R rows' outputs, two vectors of dimensions at a time, in registers.
    const float* vb = vals + j0 * hd;
    for (int64_t r = 0; r < n; r += kScoreRows) {
      int64_t d = 0;
      for (; d < hd / kLanes * kLanes; d += 2 * kLanes) {
        const int parts = d + 2 * kLanes <= hd ? 2 : 1;
        vf a[kScoreRows][2] = {};
        for (int rr = 0; rr < kScoreRows; ++rr)
          for (int c = 0; c < parts; ++c) a[rr][c] = vload(o + (r + rr) * hd + d + c * kLanes);
        for (int64_t j = 0; j < nk; ++j) {
          const vf v0 = vload(vb + j * hd + d), v1 = parts == 2 ? vload(vb + j * hd + d + kLanes) : vf{};
          for (int rr = 0; rr < kScoreRows; ++rr) {
            const float p = s[(r + rr) * kKeyBlock + j];
            a[rr][0] += p * v0;
            a[rr][1] += p * v1;
          }
        }
        for (int rr = 0; rr < kScoreRows; ++rr)
          for (int c = 0; c < parts; ++c) vstore(o + (r + rr) * hd + d + c * kLanes, a[rr][c]);
      }
      for (d = hd / kLanes * kLanes; d < hd; ++d)
        for (int rr = 0; rr < kScoreRows; ++rr) {
          float a = o[(r + rr) * hd + d];
          for (int64_t j = 0; j < nk; ++j) a += s[(r + rr) * kKeyBlock + j] * vb[j * hd + d];
          o[(r + rr) * hd + d] = a;
        }
    }
  }
}

#if defined(__AVX512BF16__)
// attend_block for bf16 with vdpbf16ps, twice as many products an instruction: the keys as fp32
// words of two neighbouring dimensions (kp: [block][hd / 2][kKeyBlock]), the values as words of
// two neighbouring keys (vp: [block][kKeyBlock / 2][hd]), the queries as words of two dimensions
// (qp: [kQueryBlock][hd / 2], zeros past n), and each row's softmax weights rounded to bf16 pairs
// (p2: [kQueryBlock][kKeyBlock / 2]), as torch's bf16 flash attention rounds them.
void attend_block_bf16(const uint32_t* qp, const uint32_t* kp, const uint32_t* vp, const int64_t* pos, int64_t n,
                       int64_t hd, int64_t base, int64_t keys, int64_t window, float scale, float* s, uint32_t* p2,
                       float* o, float* top, float* total) {
  static_assert(kKeyBlock == 64 && kScoreRows == 4, "the bf16 block is 4 x 64 scores");
  const int64_t pairs = hd / 2;
  const auto [start, last] = start_block(pos, n, base, keys, window, hd, o, top, total);
  const __m512 scaled = _mm512_set1_ps(scale);
  for (int64_t j0 = start; j0 <= last; j0 += kKeyBlock) {
    const int64_t nk = std::min(kKeyBlock, keys - j0);
    const uint32_t* kb = kp + j0 * pairs;
    for (int64_t r = 0; r < n; r += 4) {
      __m512 a[4][4];
      for (int rr = 0; rr < 4; ++rr)
        for (int c = 0; c < 4; ++c) a[rr][c] = _mm512_setzero_ps();
      for (int64_t dp = 0; dp < pairs; ++dp) {
        const uint32_t* k = kb + dp * kKeyBlock;
        const __m512bh k0 = (__m512bh)_mm512_loadu_si512(k), k1 = (__m512bh)_mm512_loadu_si512(k + 16),
                       k2 = (__m512bh)_mm512_loadu_si512(k + 32), k3 = (__m512bh)_mm512_loadu_si512(k + 48);
        for (int rr = 0; rr < 4; ++rr) {
          const __m512bh x = (__m512bh)_mm512_set1_epi32((int)qp[(r + rr) * pairs + dp]);
          a[rr][0] = _mm512_dpbf16_ps(a[rr][0], x, k0);
          a[rr][1] = _mm512_dpbf16_ps(a[rr][1], x, k1);
          a[rr][2] = _mm512_dpbf16_ps(a[rr][2], x, k2);
          a[rr][3] = _mm512_dpbf16_ps(a[rr][3], x, k3);
        }
      }
      for (int rr = 0; rr < 4; ++rr)
        for (int c = 0; c < 4; ++c) _mm512_storeu_ps(s + (r + rr) * kKeyBlock + c * 16, _mm512_mul_ps(a[rr][c], scaled));
    }
    softmax_block(s, pos, n, hd, base, j0, nk, window, o, top, total);
    for (int64_t r = 0; r < n; ++r)
      for (int c = 0; c < 2; ++c) {
        const float* sr = s + r * kKeyBlock + 32 * c;
        _mm512_storeu_si512(p2 + r * 32 + 16 * c,
                            (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(sr + 16), _mm512_loadu_ps(sr)));
      }
    const uint32_t* vb = vp + j0 / 2 * hd;
    const int64_t kpairs = (nk + 1) / 2;
    for (int64_t r = 0; r < n; r += 4)
      for (int64_t d = 0; d < hd; d += 16) {
        __m512 a[4];
        for (int rr = 0; rr < 4; ++rr) a[rr] = _mm512_loadu_ps(o + (r + rr) * hd + d);
        for (int64_t jp = 0; jp < kpairs; ++jp) {
          const __m512bh v = (__m512bh)_mm512_loadu_si512(vb + jp * hd + d);
          for (int rr = 0; rr < 4; ++rr)
            a[rr] = _mm512_dpbf16_ps(a[rr], (__m512bh)_mm512_set1_epi32((int)p2[(r + rr) * 32 + jp]), v);
        }
        for (int rr = 0; rr < 4; ++rr) _mm512_storeu_ps(o + (r + rr) * hd + d, a[rr]);
      }
  }
}
#endif

template <typename T>
void causal_attention_impl(const T* q, const T* kc, const T* vc, T* y, const int64_t* pos, int64_t H, int64_t KVH,
                           int64_t count, int64_t hd, int64_t L, int64_t window) {
  const int64_t group = H / KVH, blocks = (count + kQueryBlock - 1) / kQueryBlock, pairs = hd / 2;
  const float scale = 1.f / std::sqrt((float)hd);
  bool packed = false;  // bf16 pairs for vdpbf16ps, else fp32
#if defined(__AVX512BF16__)
  packed = std::is_same_v<T, BFloat16> && hd % 16 == 0;
#endif
  // The keys any query sees: [base, base + keys).
  int64_t base = L, end = 0;
  for (int64_t i = 0; i < count; ++i) {
    base = std::min(base, window > 0 ? std::max<int64_t>(0, pos[i] + 1 - window) : 0);
    end = std::max(end, pos[i] + 1);
  }
  const int64_t keys = end - base, key_blocks = (keys + kKeyBlock - 1) / kKeyBlock;
  // One key head's keys and values at a time, widened or paired (zeros past the last key).
  std::vector<float> kt(packed ? 0 : key_blocks * kKeyBlock * hd), vals(packed ? 0 : key_blocks * kKeyBlock * hd);
  std::vector<uint32_t> kp(packed ? key_blocks * kKeyBlock * pairs : 0), vp(packed ? key_blocks * kKeyBlock * pairs : 0);
  const int threads = at::get_num_threads();
  for (int64_t g = 0; g < KVH; ++g) {
    const T* kh = kc + (g * L + base) * hd;
    const T* vh = vc + (g * L + base) * hd;
    at::parallel_for(0, key_blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t j = b * kKeyBlock; j < (b + 1) * kKeyBlock; ++j) {
          const bool in = j < keys;
          if (packed) {
            const uint16_t* kw = (const uint16_t*)(kh + j * hd);
            const uint16_t* vw = (const uint16_t*)(vh + j * hd);
            for (int64_t dp = 0; dp < pairs; ++dp)
              kp[(b * pairs + dp) * kKeyBlock + j % kKeyBlock] = in ? kw[2 * dp] | (uint32_t)kw[2 * dp + 1] << 16 : 0;
            // word (j / 2, d) holds key j's value in its low half when j is even, else its high half
            for (int64_t d = 0; d < hd; ++d) {
              uint32_t& word = vp[(j / 2) * hd + d];
              const uint32_t bits = in ? vw[d] : 0;
              word = j % 2 ? (word & 0xFFFFu) | bits << 16 : bits;
            }
          } else {
            for (int64_t d = 0; d < hd; ++d) {
              kt[(b * hd + d) * kKeyBlock + j % kKeyBlock] = in ? widen(kh[j * hd + d]) : 0.f;
              vals[j * hd + d] = in ? widen(vh[j * hd + d]) : 0.f;
            }
          }
        }
    });
    // The group's heads' query blocks, each taken by the next free thread, the last blocks (which
    // see the most keys) first: dealt in turn, one thread of two got a ninth more work.
    const int64_t items = group * blocks;
    std::atomic<int64_t> next{0};
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      std::vector<float> qf(packed ? 0 : kQueryRows * hd), s(kQueryRows * kKeyBlock), o(kQueryRows * hd),
          top(kQueryRows), total(kQueryRows);
      std::vector<uint32_t> qp(packed ? kQueryBlock * pairs : 0), p2(packed ? kQueryBlock * kKeyBlock / 2 : 0);
      for (int64_t item = next++; item < items; item = next++) {
        const int64_t h = g * group + item % group, i0 = (blocks - 1 - item / group) * kQueryBlock;
        const int64_t n = std::min(kQueryBlock, count - i0);
        const T* qh = q + (h * count + i0) * hd;
        if (packed) {
#if defined(__AVX512BF16__)
          std::fill(qp.begin(), qp.end(), 0u);
          std::memcpy(qp.data(), qh, n * hd * sizeof(T));
          attend_block_bf16(qp.data(), kp.data(), vp.data(), pos + i0, n, hd, base, keys, window, scale, s.data(),
                            p2.data(), o.data(), top.data(), total.data());
#endif
        } else {
          std::fill(qf.begin(), qf.end(), 0.f);
          for (int64_t r = 0; r < n; ++r)
            for (int64_t d = 0; d < hd; ++d) qf[r * hd + d] = widen(qh[r * hd + d]) * scale;
          attend_block(qf.data(), kt.data(), vals.data(), pos + i0, n, hd, base, keys, window, s.data(), o.data(),
                       top.data(), total.data());
        }
        for (int64_t r = 0; r < n; ++r) {
          T* out = y + ((i0 + r) * H + h) * hd;
          for (int64_t d = 0; d < hd; ++d) out[d] = static_cast<T>(o[r * hd + d] / total[r]);
        }
      }
    });
  }
}

// The checks on caches and positions that attend, rope_write and decode_layers share, for B rows
// of `count` tokens in `dtype`; returns the positions as [B, count], each inside the cache.
// Whether k_cache and v_cache are an int8 cache: its scales given, each checked to be fp32
// [B, n_kv_heads, L], contiguous.
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
                             const at::Tensor& input_pos, int64_t H, int64_t KVH, bool int8 = false) {
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

template <typename T>
T* maybe(at::Tensor& t, bool yes) { return yes ? t.mutable_data_ptr<T>() : nullptr; }
inline float* maybe(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

// cos_sin with one rotation per position of every row, as the positions have them.
at::Tensor rotations(const at::Tensor& cos_sin, int64_t B, int64_t count, int64_t hd) {
  return cos_sin.numel() == count * 2 * hd ? cos_sin.reshape({1, count, 2 * hd}).expand({B, count, 2 * hd}).contiguous()
                                           : cos_sin.contiguous();
}

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

// An int8 cache's first n positions [KVH, n, hd] as T, and rows of q put on int8's grid (each
// rounded to int8 with its own scale and back): as the reference reads an int8 cache.
template <typename T>
void dequantize_cache(const int8_t* c, const float* scales, int64_t KVH, int64_t L, int64_t n, int64_t hd, T* out) {
  at::parallel_for(0, KVH * n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t at = i / n * L + i % n;
      for (int64_t d = 0; d < hd; ++d) out[i * hd + d] = static_cast<T>((float)c[at * hd + d] * scales[at]);
    }
  });
}

template <typename T>
void int8_grid(T* x, int64_t rows, int64_t hd) {
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> q(hd);
    for (int64_t r = begin; r < end; ++r) {
      const float d = quantize_row(x + r * hd, hd, q.data());
      for (int64_t i = 0; i < hd; ++i) x[r * hd + i] = static_cast<T>((float)q[i] * d);
    }
  });
}

at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& input_pos, int64_t window, const std::optional<at::Tensor>& k_scales,
                            const std::optional<at::Tensor>& v_scales) {
  check_cpu_float(q, "causal_attention");
  const bool int8 = int8_cache("causal_attention", k_cache, k_scales, v_scales);
  TORCH_CHECK(window >= 0, "runner::causal_attention: window must be >= 0 (0: none), got ", window);
  TORCH_CHECK(q.dim() == 4 && q.size(0) == 1 && k_cache.dim() == 4 && k_cache.size(0) == 1 && q.size(3) == k_cache.size(3),
              "runner::causal_attention: q must be [1, n_heads, T, head_dim] and the caches [1, n_kv_heads, L, head_dim], got ",
              q.sizes(), " and ", k_cache.sizes());
  const int64_t H = q.size(1), count = q.size(2), KVH = k_cache.size(1), L = k_cache.size(2), hd = q.size(3);
  const at::ScalarType stored = int8 ? at::kChar : q.scalar_type();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.scalar_type() == stored && v_cache.scalar_type() == stored,
              "runner::causal_attention: caches must be contiguous [1, n_kv_heads, L, head_dim] in q's dtype (int8 with scales)");
  TORCH_CHECK(H % KVH == 0, "runner::causal_attention: n_heads must be a multiple of n_kv_heads");
  TORCH_CHECK(input_pos.scalar_type() == at::kLong && input_pos.numel() == count,
              "runner::causal_attention: input_pos must be T int64 positions");
  auto positions = input_pos.contiguous();
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i)
    TORCH_CHECK(pos[i] >= 0 && pos[i] < L, "runner::causal_attention: position ", pos[i], " is outside the cache of ", L);
  auto qc = q.contiguous();
  auto y = at::empty({1, count, H * hd}, q.options());
  const auto run = [&](auto zero) {
    using T = decltype(zero);
    if (!int8) {
      causal_attention_impl(qc.const_data_ptr<T>(), k_cache.const_data_ptr<T>(), v_cache.const_data_ptr<T>(),
                            y.mutable_data_ptr<T>(), pos, H, KVH, count, hd, L, window);
      return;
    }
    // An int8 cache: the positions any query sees, read as the model's dtype, for the same kernel.
    if (count == 0) return;
    const int64_t n = *std::max_element(pos, pos + count) + 1;
    auto k = at::empty({KVH, n, hd}, q.options()), v = at::empty({KVH, n, hd}, q.options());
    dequantize_cache(k_cache.const_data_ptr<int8_t>(), k_scales->const_data_ptr<float>(), KVH, L, n, hd,
                     k.mutable_data_ptr<T>());
    dequantize_cache(v_cache.const_data_ptr<int8_t>(), v_scales->const_data_ptr<float>(), KVH, L, n, hd,
                     v.mutable_data_ptr<T>());
    qc = qc.clone();
    int8_grid(qc.mutable_data_ptr<T>(), H * count, hd);
    causal_attention_impl(qc.const_data_ptr<T>(), k.const_data_ptr<T>(), v.const_data_ptr<T>(), y.mutable_data_ptr<T>(),
                          pos, H, KVH, count, hd, n, window);
  };
  if (q.scalar_type() == at::kBFloat16)
    run(BFloat16());
  else
    run(0.f);
  return y;
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

// --- a decode step's layers in one parallel region -----------------------------------------------
// The step is a list of stages (a layer's norm, its linears, its attention, ...), each a number of
// independent work items. Every thread of one parallel region takes the next item from one counter,
// waits until every item of the stages before it is done, and runs it. No thread waits for another
// to arrive: a team of one (a nested region) runs every item itself, and a thread that starts late
// joins wherever the step is. The ops one by one open a parallel region per linear, 120 a step for
// SmolLM2, and leave the other thread idle through each norm, residual and short attention.

inline void spin_pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// A thread's state in a stage: the input its linear has made ready, attention's buffers.
template <typename T>
struct Scratch {
  std::optional<Gemv<T>> gemv;
  std::optional<typename FewTokens<T>::Scratch> attend;
};

template <typename T>
struct Stage {
  int64_t items;
  std::function<void(Scratch<T>&, int64_t item, bool first)> run;  // first: the thread's first item of the stage
};

template <typename T>
void run_stages(const std::vector<Stage<T>>& stages) {
  std::vector<int64_t> base(stages.size() + 1, 0);  // stage s holds items [base[s], base[s + 1])
  for (size_t s = 0; s < stages.size(); ++s) base[s + 1] = base[s] + stages[s].items;
  const int64_t total = base.back();
  // On cache lines of their own: a thread spinning on `done` must not take `next` from the others.
  alignas(64) std::atomic<int64_t> next{0};
  alignas(64) std::atomic<int64_t> done{0};
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    Scratch<T> scratch;
    size_t s = 0, entered = stages.size();
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < total;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      while (base[s + 1] <= i) ++s;
      // Items are taken in order, so done reaching base[s] means every item before stage s is done.
      while (done.load(std::memory_order_acquire) < base[s]) spin_pause();
      stages[s].run(scratch, i - base[s], entered != s);
      entered = s;
      done.fetch_add(1, std::memory_order_release);
    }
  });
}

// A dense layer's operands.
template <typename T>
struct Layer {
  const T* attention_norm;
  const T* ffn_norm;
  Weights<T> wqkv, wo, w13, w2;
  T* k_cache;  // or, for an int8 cache, these four
  T* v_cache;
  int8_t* kq;
  int8_t* vq;
  float* ks;
  float* vs;
};

// x [M, D] through every layer into y [M, D]; `tokens` (its qkv, y, caches unset) says where the
// M = B * count tokens sit. The same kernels in the same order as the ops one by one: bit for bit
// the same result.
template <typename T>
void decode_layers_impl(const T* x, T* y, const std::vector<Layer<T>>& layers, float eps, FewTokens<T> tokens,
                        int64_t D, int64_t I) {
  const int64_t M = tokens.B * tokens.count;
  std::vector<T> buffers(M * (5 * D + tokens.width() + tokens.H * tokens.hd + 3 * I));
  std::vector<float> partials(tokens.partials());  // attention's, for each layer in turn
  float* parts = partials.data();
  T* xn = buffers.data();  // a norm's output, each linear's input but wo's and w2's
  T* o = xn + M * D;       // wo's output
  T* h = o + M * D;        // the residual stream after attention
  T* d = h + M * D;        // w2's output
  T* qkv = d + M * D;
  T* att = qkv + M * tokens.width();
  T* gu = att + M * tokens.H * tokens.hd;
  T* act = gu + M * 2 * I;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  std::vector<Stage<T>> stages;
  const auto single = [&](auto f) { stages.push_back({1, [f](Scratch<T>&, int64_t, bool) { f(); }}); };
  const auto linear = [&](const Weights<T>& w, const T* in, T* out) {
    // One run of rows a thread, whole blocks of kRows: taken by whoever is free. Each item costs
    // its counters' cache lines crossing between the cores: four runs a thread took SmolLM2's
    // layers 7% longer than one, eight 23%.
    const int64_t run = std::max<int64_t>(16, ((w.N + threads - 1) / threads + kRows - 1) / kRows * kRows);
    stages.push_back({(w.N + run - 1) / run, [&w, in, out, M, run](Scratch<T>& s, int64_t item, bool first) {
                        if (first) s.gemv.emplace(w, in, M);
                        s.gemv->rows(item * run, std::min(w.N, (item + 1) * run), out);
                      }});
  };
  const auto norm = [=](const T* in, const T* weight) {
    for (int64_t m = 0; m < M; ++m) rms_norm_row(in + m * D, weight, xn + m * D, D, eps);
  };
  for (size_t l = 0; l < layers.size(); ++l) {
    const Layer<T>& layer = layers[l];
    const T* stream = l == 0 ? x : y;  // the residual stream
    if (l == 0) single([=] { norm(x, layer.attention_norm); });
    linear(layer.wqkv, xn, qkv);
    FewTokens<T> attention = tokens;
    attention.qkv = qkv, attention.y = att, attention.kc = layer.k_cache, attention.vc = layer.v_cache;
    attention.kq = layer.kq, attention.vq = layer.vq, attention.ks = layer.ks, attention.vs = layer.vs;
    attention.parts = parts;
    single([=] { attention.write(); });
    const int64_t run = (attention.items() + threads - 1) / threads;  // a run of (token, key head, chunk) items a thread
    const auto attend = [attention, run](Scratch<T>& s, int64_t item, bool first) {
      if (first) s.attend.emplace(attention);
      const int64_t end = std::min(attention.items(), (item + 1) * run);
      for (int64_t i = item * run; i < end; ++i) attention.item(i, *s.attend);
    };
    stages.push_back({(attention.items() + run - 1) / run, attend});
    const int64_t merged = (attention.heads() + threads - 1) / threads;  // a run of query heads a thread
    stages.push_back({(attention.heads() + merged - 1) / merged, [attention, merged](Scratch<T>&, int64_t item, bool) {
                        const int64_t end = std::min(attention.heads(), (item + 1) * merged);
                        for (int64_t i = item * merged; i < end; ++i) attention.combine(i);
                      }});
    linear(layer.wo, att, o);
    single([=] {
      for (int64_t i = 0; i < M * D; ++i) h[i] = static_cast<T>(widen(stream[i]) + widen(o[i]));
      norm(h, layer.ffn_norm);
    });
    linear(layer.w13, xn, gu);
    // A span of columns a thread, a multiple of kLanes.
    const int64_t span = ((I + threads - 1) / threads + kLanes - 1) / kLanes * kLanes, spans = (I + span - 1) / span;
    stages.push_back({M * spans, [=](Scratch<T>&, int64_t item, bool) {
                        const int64_t m = item / spans, j0 = item % spans * span;
                        swiglu_span(gu + m * 2 * I, gu + m * 2 * I + I, act + m * I, I, j0, std::min(I, j0 + span));
                      }});
    linear(layer.w2, act, d);
    const T* next_norm = l + 1 < layers.size() ? layers[l + 1].attention_norm : nullptr;
    single([=] {
      for (int64_t i = 0; i < M * D; ++i) y[i] = static_cast<T>(widen(h[i]) + widen(d[i]));
      if (next_norm != nullptr) norm(y, next_norm);
    });
  }
  run_stages(stages);
}

// Dense layers for a few tokens (decode, verify) in one call: one parallel region for them all.
// norms: each layer's attention and ffn norm; weights: each layer's wqkv, wo, w13 and w2 operands
// one after another, parts[i] tensors for linear i ({w}, {w, scales}, {w, scales, zeros}).
at::Tensor decode_layers(const at::Tensor& x, at::TensorList norms, double eps, at::TensorList weights,
                         at::IntArrayRef parts, at::IntArrayRef groupsizes, const at::Tensor& cos_sin,
                         at::TensorList k_caches, at::TensorList v_caches, at::TensorList k_scales,
                         at::TensorList v_scales, const at::Tensor& input_pos, int64_t n_heads, int64_t n_kv_heads,
                         int64_t window, at::IntArrayRef int8_x) {
  const char* name = "decode_layers";
  check_cpu_float(x, name);
  TORCH_CHECK(window >= 0, "runner::decode_layers: window must be >= 0 (0: none), got ", window);
  TORCH_CHECK(x.dim() == 3, "runner::decode_layers: x must be [B, T, dim], got ", x.sizes());
  const int64_t n = k_caches.size(), B = x.size(0), count = x.size(1), D = x.size(2);
  TORCH_CHECK(n > 0 && v_caches.size() == n && norms.size() == 2 * n && parts.size() == 4 * n &&
                  groupsizes.size() == 4 * n,
              "runner::decode_layers: per layer, two norms, a k and a v cache, and four linears' parts and groupsizes");
  TORCH_CHECK(int8_x.empty() || int8_x.size() == 4 * n,
              "runner::decode_layers: int8_x must be empty or one flag for each of the ", 4 * n, " linears");
  int64_t total = 0;
  for (const int64_t p : parts) total += p;
  TORCH_CHECK(total == (int64_t)weights.size(), "runner::decode_layers: parts add up to ", total, ", not to the ",
              weights.size(), " weight tensors");
  const int64_t H = n_heads, KVH = n_kv_heads;
  TORCH_CHECK((k_scales.empty() && v_scales.empty()) || (k_scales.size() == n && v_scales.size() == n),
              "runner::decode_layers: k_scales and v_scales are empty, or one each for every layer's int8 cache");
  const bool int8 = !k_scales.empty();
  const auto positions = checked_positions(name, B, count, x.scalar_type(), cos_sin, k_caches[0], v_caches[0],
                                           input_pos, H, KVH, int8);
  for (int64_t l = 0; l < n; ++l) {
    TORCH_CHECK(k_caches[l].sizes() == k_caches[0].sizes() && v_caches[l].sizes() == k_caches[0].sizes() &&
                    k_caches[l].is_contiguous() && v_caches[l].is_contiguous() &&
                    k_caches[l].scalar_type() == k_caches[0].scalar_type() &&
                    v_caches[l].scalar_type() == k_caches[0].scalar_type(),
                "runner::decode_layers: every layer's caches must be contiguous and shaped as the first's, ",
                k_caches[0].sizes(), ", in x's dtype (int8 with scales)");
    if (int8) int8_cache(name, k_caches[l], k_scales[l], v_scales[l]);
  }
  const int64_t L = k_caches[0].size(2), hd = k_caches[0].size(3);
  for (const auto& norm : norms)
    TORCH_CHECK(norm.dim() == 1 && norm.size(0) == D && norm.scalar_type() == x.scalar_type(),
                "runner::decode_layers: norms must be [", D, "] in x's dtype");
  // Every linear checked against its input's width: wqkv and w13 take dim, wo H * hd, w2 I.
  std::vector<std::vector<at::Tensor>> linears;
  int64_t offset = 0, I = 0;
  for (int64_t i = 0; i < 4 * n; ++i) {
    const at::TensorList w = weights.slice(offset, parts[i]);
    offset += parts[i];
    const int64_t K = i % 4 == 1 ? H * hd : i % 4 == 3 ? I : D;
    TORCH_CHECK(!w.empty(), "runner::decode_layers: linear ", i, " has no tensors");
    linears.push_back(checked_linear(name, K, x.scalar_type(), w, groupsizes[i]));
    TORCH_CHECK(int8_x.empty() || !int8_x[i] || w.size() == 3, "runner::decode_layers: linear ", i,
                " has int8_x set, which applies to int4 linears ({w, scales, zeros}) only");
    const int64_t N = w[0].size(0);
    if (i % 4 == 2) I = N / 2;
    const int64_t want = i % 4 == 0 ? (H + 2 * KVH) * hd : i % 4 == 2 ? 2 * I : D;
    TORCH_CHECK(N == want && (i % 4 != 2 || N % 2 == 0), "runner::decode_layers: linear ", i, " (",
                std::array<const char*, 4>{"wqkv", "wo", "w13", "w2"}[i % 4], " of layer ", i / 4, ") has ", N,
                " outputs, not ", want);
  }
  auto xc = x.contiguous();
  auto cs = rotations(cos_sin, B, count, hd);
  auto y = at::empty_like(xc);
  const auto run = [&](auto zero) {
    using T = decltype(zero);
    std::vector<Layer<T>> layers;
    for (int64_t l = 0; l < n; ++l) {
      Layer<T> layer{norms[2 * l].const_data_ptr<T>(), norms[2 * l + 1].const_data_ptr<T>()};
      Weights<T>* parts_of[4] = {&layer.wqkv, &layer.wo, &layer.w13, &layer.w2};
      for (int i = 0; i < 4; ++i)
        *parts_of[i] = weights_of<T>(linears[4 * l + i], groupsizes[4 * l + i], !int8_x.empty() && int8_x[4 * l + i]);
      at::Tensor k = k_caches[l], v = v_caches[l];
      layer.k_cache = maybe<T>(k, !int8), layer.v_cache = maybe<T>(v, !int8);
      layer.kq = maybe<int8_t>(k, int8), layer.vq = maybe<int8_t>(v, int8);
      layer.ks = int8 ? k_scales[l].data_ptr<float>() : nullptr, layer.vs = int8 ? v_scales[l].data_ptr<float>() : nullptr;
      layers.push_back(layer);
    }
    FewTokens<T> tokens{nullptr, cs.const_data_ptr<float>(), nullptr, nullptr, nullptr,
                        positions.const_data_ptr<int64_t>(), B, count, H, KVH, hd, L, window};
    decode_layers_impl(xc.const_data_ptr<T>(), y.mutable_data_ptr<T>(), layers, (float)eps, tokens, D, I);
  };
  if (x.scalar_type() == at::kBFloat16)
    run(BFloat16());
  else
    run(0.f);
  return y;
}

std::string isa() {
#if defined(__AVX512BF16__)
  return "avx512-bf16";
#elif defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "generic";
#endif
}

}  // namespace

TORCH_LIBRARY(runner, m) {
  m.def("linear(Tensor x, Tensor w) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor w, Tensor scales) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor w, Tensor scales, Tensor zeros, int groupsize, bool int8_x=False) -> Tensor");
  m.def("dequantize_int8(Tensor w, Tensor scales) -> Tensor");
  m.def("dequantize_int4(Tensor w, Tensor scales, Tensor zeros, int groupsize) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("swiglu(Tensor gate_up) -> Tensor");
  // k_scales, v_scales: an int8 cache's (runner.model.llama.KVCache), with int8 k_cache and v_cache.
  m.def("attend(Tensor qkv, Tensor cos_sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor input_pos, "
        "int n_heads, int n_kv_heads, int window=0, Tensor(c!)? k_scales=None, Tensor(d!)? v_scales=None) -> Tensor");
  m.def("rope_write(Tensor qkv, Tensor cos_sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor input_pos, "
        "int n_heads, int n_kv_heads, Tensor(c!)? k_scales=None, Tensor(d!)? v_scales=None) -> Tensor");
  m.def("causal_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor input_pos, int window=0, "
        "Tensor? k_scales=None, Tensor? v_scales=None) -> Tensor");
  m.def("decode_layers(Tensor x, Tensor[] norms, float eps, Tensor[] weights, int[] parts, int[] groupsizes, "
        "Tensor cos_sin, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor(c!)[] k_scales, Tensor(d!)[] v_scales, "
        "Tensor input_pos, int n_heads, int n_kv_heads, int window=0, int[] int8_x=[]) -> Tensor");
  m.def("expert_linear(Tensor x, Tensor w, Tensor ids) -> Tensor");
  m.def("int8_expert_linear(Tensor x, Tensor w, Tensor scales, Tensor ids) -> Tensor");
  m.def("int4_expert_linear(Tensor x, Tensor w, Tensor scales, Tensor zeros, int groupsize, Tensor ids) -> Tensor");
  m.def("isa() -> str", &isa);
}

TORCH_LIBRARY_IMPL(runner, CPU, m) {
  m.impl("linear", &linear);
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear", &int4_linear);
  m.impl("dequantize_int8", &dequantize_int8);
  m.impl("dequantize_int4", &dequantize_int4);
  m.impl("rms_norm", &rms_norm);
  m.impl("swiglu", &swiglu);
  m.impl("attend", &attend);
  m.impl("rope_write", &rope_write);
  m.impl("causal_attention", &causal_attention);
  m.impl("decode_layers", &decode_layers);
  m.impl("expert_linear", &expert_linear);
  m.impl("int8_expert_linear", &int8_expert_linear);
  m.impl("int4_expert_linear", &int4_expert_linear);
}
