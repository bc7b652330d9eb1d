// Vector helpers every kernel file shares, as wide as the registers of the target compiled for.
//
// One set of sources serves every target (runner/kernels/__init__.py builds them once per
// instruction set): AVX512-BF16 and AVX-512 have hand-written paths for the hot loops; everything
// else is written once with GCC/Clang vector extensions, as wide as the target's registers (AVX2's
// 256 bits; SSE pairs on a generic x86-64 target), with scalar loops only for tails. The compiler
// flags decide which paths a build has: each file tests __AVX512F__, __AVX512BF16__, __AVX2__ and
// the rest itself.
//
// Everything here is static inline: each file gets its own copy, inlined into its hot loops.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace runner {

using c10::BFloat16;

static inline float widen(float v) { return v; }
static inline float widen(BFloat16 v) { return static_cast<float>(v); }
static inline float widen(int8_t v) { return v; }

// The value a float takes once stored as T (round to nearest even for bf16).
template <typename T>
static inline float round_to(float v) { return widen(static_cast<T>(v)); }

// --- portable vectors ----------------------------------------------------------------------------

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
static inline vi widen_u8(const uint8_t* p) {
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
static inline vi widen_i8(const int8_t* p) {
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
static inline vi widen_u16(const uint16_t* p) {
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

static inline vf splat(float v) { return vf{} + v; }
static inline vf vload(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
static inline vf vload(const BFloat16* p) { return (vf)(widen_u16((const uint16_t*)p) << 16); }  // bf16: an fp32's top half
static inline vf vload(const int8_t* p) { return __builtin_convertvector(widen_i8(p), vf); }
// fp32 bits rounded to the nearest bf16, ties to even (finite values).
static inline vu bf16_bits(vf v) {
  const vu u = (vu)v;
  return (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
}
template <typename T>
static inline vf vround(vf v) {
  if constexpr (std::is_same_v<T, BFloat16>) return (vf)bf16_bits(v);
  return v;
}
static inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
static inline void vstore(BFloat16* p, vf v) {
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
static inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}
#if defined(__AVX2__)
// 256-bit vectors where AVX2 code runs on every x86 target that has it, AVX-512 ones included
// (where vf is 512 bits): eight floats, their loads from float or bf16, their sum.
typedef float vf8 __attribute__((vector_size(32)));
static inline vf8 load8(const float* p) { return (vf8)_mm256_loadu_ps(p); }
static inline vf8 load8(const BFloat16* p) {
  return (vf8)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16);
}
static inline float hsum8(__m256 v) {
  const vf8 lanes = (vf8)v;
  float s = 0.f;
  for (int i = 0; i < 8; ++i) s += lanes[i];
  return s;
}
// The sums of four vectors' lanes, out[r] += sum of a[r]: one tree of horizontal adds for all four.
static inline void hsum4(const __m256* a, float* out) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  alignas(16) float sums[4];
  _mm_store_ps(sums, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
  for (int r = 0; r < 4; ++r) out[r] += sums[r];
}
#endif
// e^x (Cephes' expf: a degree-5 polynomial on [-ln2/2, ln2/2] and a power of two), within 2 ulp.
static inline vf vexp(vf x) {
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

// 1 / d within an ulp or two of fp32: the hardware's estimate and one Newton step (a division
// costs as much as vexp).
static inline vf vrecip(vf d) {
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

// --- streaming: weight rows read once, start to end ----------------------------------------------

// Each row is read start to end, the rows one after another, with a prefetch this far ahead: one
// sequential stream is what the hardware prefetchers follow best (several rows read side by side
// are several short streams).
constexpr int64_t kAheadBytes = 2048;
static inline void ahead(const void* p) { __builtin_prefetch((const char*)p + kAheadBytes, 0, 3); }
// Each 64-byte line of [p, p + bytes), kAheadBytes on.
static inline void ahead(const void* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) ahead((const char*)p + b);
}
// Independent sums a row keeps: a fused multiply-add waits about four cycles for the sum before it,
// so one chain of them caps a row at a vector per four cycles.
constexpr int kChains = 4;

// Sixteen values of T as fp32, masked by m (first(n): the first n).
#if defined(__AVX512BW__)
static inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
static inline __m512 load16(const BFloat16* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
static inline __mmask16 first(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }
#endif

#if defined(__AVX512BF16__)
static inline __m512bh load_bh(const BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); }
static inline __m512bh load_bh(const BFloat16* p, __mmask32 m) { return (__m512bh)_mm512_maskz_loadu_epi16(m, p); }
#endif

// --- int8 rows: the one rounding rule for int8 activations and an int8 KV cache ------------------

// x [n] -> q [n] and its scale d = max|x| / 127, q = x / d rounded half to even: what
// runner.model.functional.quantize_rows computes (a division, as there, so the same integers).
// Vectors of x at a time: a decode step quantizes every int8 activation group, and with an int8
// KV cache every new key, value and query.
template <typename T>
static inline float quantize_row(const T* x, int64_t n, int8_t* q) {
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

}  // namespace runner
