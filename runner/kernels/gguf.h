// GGUF's quantized blocks, read as the file stores them (gguf.cpp has the ops that use them).
//
// Every type here is a run of blocks, each block a whole number of groups of 32 values; a group's
// weights are w = s (level - kBias) + off, with integer levels and fp32 scales read from the block
// (Q6_K has a scale per 16 values: s0 for a group's first 16, s1 for the rest). Each type's
// groups(block, f) calls f(j, levels, scales) for the block's groups in order. The byte layouts
// and formulas are the `gguf` package's numpy dequantizers (gguf/quants.py), which the tests hold
// the ops to.
//
// The levels come as 32 int8 in one AVX2 register (AVX2 and AVX-512 targets) or in an array
// (generic), decoded by shifts, masks and byte shuffles, never a loop over values. They are
// unsigned and below 64, but for Q8_0's (kSigned). Centred types (Q4_0, Q5_0, Q6_K) give them as
// stored, kBias above the value, so that int8 dot products take them unsigned as they are.
//
// Every product s * (level - kBias) is exact in fp32 (an fp16 scale of 11 significant bits, times
// a 6- or 8-bit sub-block scale, times a level of at most 6 bits, stays within 24 bits), and so are
// s * level and s * kBias; so w = s level + (off - s kBias) rounds once whether the sum is fused
// into one multiply-add or not: the values equal numpy's bit for bit under -ffp-contract=fast too.
#pragma once

#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "vec.h"

namespace runner {
namespace gguf {

// --- eight-lane vectors on every target (AVX-512 targets run the AVX2 code) -----------------------

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8f load8(const float* p) { v8f v; std::memcpy(&v, p, sizeof v); return v; }
static inline v8f splat8(float v) { return v8f{v, v, v, v, v, v, v, v}; }  // v8f{} + v would add 0 at run time

static inline float half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

static inline uint32_t word(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// A group's scales: w = s0 * level + off for its first 16 values, s1 * level + off for the rest.
struct Scales {
  float s0, s1, off;
};

#if defined(__AVX2__)
using Levels = __m256i;

// 16 bytes of two levels each as 32 levels: the low nibbles first (values 0-15), then the high.
static inline __m256i nibbles(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128((const __m128i*)p);
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(0xF));
}

// Bit j of v as byte j: 0xFF where set, 0 where clear.
static inline __m256i bit_bytes(uint32_t v) {
  const __m256i which = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
  const __m256i bit = _mm256_set1_epi64x((int64_t)0x8040201008040201ull);
  return _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)v), which), bit), bit);
}

// level - bias, for every level.
template <int bias>
static inline __m256i less(__m256i q) {
  return bias == 0 ? q : _mm256_sub_epi8(q, _mm256_set1_epi8(bias));
}

// Eight levels, the c-th eight of the group, as fp32.
static inline v8f level_chunk(__m256i q, int c) {
  const __m128i half = c < 2 ? _mm256_castsi256_si128(q) : _mm256_extracti128_si256(q, 1);
  return (v8f)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c % 2 ? _mm_srli_si128(half, 8) : half));
}

// The group's levels as eight 32-bit words, word i holding levels 4i..4i+3 (level 4i + j in byte j).
static inline v8i words(__m256i q) { return (v8i)q; }

// sum_{i in 4l..4l+3} level[i] * x[i] in lane l, exact: vpmaddubsw takes unsigned by signed bytes
// (signed levels: |level| against x with the level's sign), pairs within int16 (2 x 128 x 127).
template <bool kSigned>
static inline v8i dot_q8(__m256i q, const int8_t* x) {
  const __m256i xv = _mm256_loadu_si256((const __m256i*)x);
  const __m256i pairs = kSigned ? _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(xv, q))
                                : _mm256_maddubs_epi16(q, xv);
  return (v8i)_mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}
#else
struct Levels {
  int8_t v[32];
};

template <int bias>
static inline Levels less(const Levels& q) {
  Levels out;
  for (int i = 0; i < 32; ++i) out.v[i] = q.v[i] - bias;
  return out;
}

static inline v8f level_chunk(const Levels& q, int c) {
  v8f out;
  for (int i = 0; i < 8; ++i) out[i] = q.v[8 * c + i];
  return out;
}

static inline v8i words(const Levels& q) {
  v8i v;
  std::memcpy(&v, q.v, sizeof v);
  return v;
}

template <bool kSigned>
static inline v8i dot_q8(const Levels& q, const int8_t* x) {
  v8i out{};
  for (int i = 0; i < 32; ++i) out[i / 4] += q.v[i] * x[i];
  return out;
}
#endif

// Byte j of each of the words (see words), a signed level, in fp32: shifts within the lanes, where
// widening a run of bytes would move them across lanes.
template <int j>
static inline v8f byte_levels(v8i w) {
  return __builtin_convertvector((w << (24 - 8 * j)) >> 24, v8f);
}

// a * b + c, fused where the target has FMA: written out, so that every caller rounds alike (the
// compiler's contraction may differ between a kernel's instantiations for one row and for four).
static inline v8f fma8(v8f a, v8f b, v8f c) {
#if defined(__FMA__)
  return (v8f)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
  return a * b + c;
#endif
}

static inline float fma1(float a, float b, float c) {
#if defined(__FMA__)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

// --- the block types (GGMLQuantizationType's values) -----------------------------------------------

struct Q4_0 {  // d, then 16 bytes: value i in byte i's low nibble, value 16 + i in its high; w = d (q - 8)
  static constexpr int kType = 2, kValues = 32, kBytes = 18, kBias = 8;
  static constexpr bool kSigned = false, kOffset = false, kTwoScales = false;
  template <typename F>
  static void groups(const uint8_t* b, F&& f) {
    const float d = half(b);
#if defined(__AVX2__)
    f(0, nibbles(b + 2), Scales{d, d, 0.f});
#else
    Levels q;
    for (int i = 0; i < 16; ++i) q.v[i] = b[2 + i] & 0xF, q.v[16 + i] = b[2 + i] >> 4;
    f(0, q, Scales{d, d, 0.f});
#endif
  }
};

struct Q4_1 {  // d, m, then Q4_0's nibbles; w = d q + m
  static constexpr int kType = 3, kValues = 32, kBytes = 20, kBias = 0;
  static constexpr bool kSigned = false, kOffset = true, kTwoScales = false;
  template <typename F>
  static void groups(const uint8_t* b, F&& f) {
    const float d = half(b), m = half(b + 2);
#if defined(__AVX2__)
    f(0, nibbles(b + 4), Scales{d, d, m});
#else
    Levels q;
    for (int i = 0; i < 16; ++i) q.v[i] = b[4 + i] & 0xF, q.v[16 + i] = b[4 + i] >> 4;
    f(0, q, Scales{d, d, m});
#endif
  }
};

struct Q5_0 {  // d, 32 high bits (value i's in bit i), Q4_0's nibbles; w = d (q - 16)
  static constexpr int kType = 6, kValues = 32, kBytes = 22, kBias = 16;
  static constexpr bool kSigned = false, kOffset = false, kTwoScales = false;
  template <typename F>
  static void groups(const uint8_t* b, F&& f) {
    const float d = half(b);
    const uint32_t high = word(b + 2);
#if defined(__AVX2__)
    f(0, _mm256_or_si256(nibbles(b + 6), _mm256_and_si256(bit_bytes(high), _mm256_set1_epi8(0x10))), Scales{d, d, 0.f});
#else
    Levels q;
    for (int i = 0; i < 16; ++i) {
      q.v[i] = (b[6 + i] & 0xF) | ((high >> i) & 1) << 4;
      q.v[16 + i] = (b[6 + i] >> 4) | ((high >> (16 + i)) & 1) << 4;
    }
    f(0, q, Scales{d, d, 0.f});
#endif
  }
};

struct Q5_1 {  // d, m, Q5_0's high bits and nibbles; w = d q + m
  static constexpr int kType = 7, kValues = 32, kBytes = 24, kBias = 0;
  static constexpr bool kSigned = false, kOffset = true, kTwoScales = false;
  template <typename F>
  static void groups(const uint8_t* b, F&& f) {
    const float d = half(b), m = half(b + 2);
    const uint32_t high = word(b + 4);
#if defined(__AVX2__)
    f(0, _mm256_or_si256(nibbles(b + 8), _mm256_and_si256(bit_bytes(high), _mm256_set1_epi8(0x10))), Scales{d, d, m});
#else
    Levels q;
    for (int i = 0; i < 16; ++i) {
      q.v[i] = (b[8 + i] & 0xF) | ((high >> i) & 1) << 4;
      q.v[16 + i] = (b[8 + i] >> 4) | ((high >> (16 + i)) & 1) << 4;
    }
    f(0, q, Scales{d, d, m});
#endif
  }
};

struct Q8_0 {  // d, 32 int8; w = d q
  static constexpr int kType = 8, kValues = 32, kBytes = 34, kBias = 0;
  static constexpr bool kSigned = true, kOffset = false, kTwoScales = false;
  template <typename F>
  static void groups(const uint8_t* b, F&& f) {
    const float d = half(b);
#if defined(__AVX2__)
    f(0, _mm256_loadu_si256((const __m256i*)(b + 2)), Scales{d, d, 0.f});
#else
    Levels q;
    std::memcpy(q.v, b + 2, 32);
    f(0, q, Scales{d, d, 0.f});
#endif
  }
};

// Q4_K and Q5_K's d, dmin and eight 6-bit scales and mins packed in 12 bytes (gguf's
// Q4_K.get_scale_min) as each group's s = d sc and off = -dmin mn. Bytes 0-3 hold scales 0-3 in
// their low six bits, bytes 4-7 mins 0-3; scales and mins 4-7 have their low four bits in bytes
// 8-11 (scales low nibble, mins high) and their top two in the top bits of bytes 0-3 (scales)
// and 4-7 (mins). Four bytes at a time in 32-bit words, then eight lanes at once.
static inline void k_scales(const uint8_t* b, float s[8], float off[8]) {
  const float d = half(b), dmin = half(b + 2);
  const uint8_t* p = b + 4;
  const uint32_t w0 = word(p), w1 = word(p + 4), w2 = word(p + 8);
  const uint32_t sc[2] = {w0 & 0x3F3F3F3Fu, (w2 & 0x0F0F0F0Fu) | ((w0 >> 2) & 0x30303030u)};
  const uint32_t mn[2] = {w1 & 0x3F3F3F3Fu, ((w2 >> 4) & 0x0F0F0F0Fu) | ((w1 >> 2) & 0x30303030u)};
  uint8_t scb[8], mnb[8];
  std::memcpy(scb, sc, 8);
  std::memcpy(mnb, mn, 8);
  for (int i = 0; i < 8; ++i) s[i] = d * (float)scb[i], off[i] = -(dmin * (float)mnb[i]);
}

// d, dmin, the packed scales, 128 bytes of nibbles: group j (values 32j..32j+31) in the low
// nibbles of bytes 32(j/2).. for even j, the high ones for odd j; w = d sc[j] q - dmin mn[j].
struct Q4_K {
  static constexpr int kType = 12, kValues = 256, kBytes = 144, kBias = 0;
  static constexpr bool kSigned = false, kOffset = true, kTwoScales = false;
  template <typename F>
  static void groups(const uint8_t* b, F&& f) {
    float s[8], off[8];
    k_scales(b, s, off);
    const uint8_t* qs = b + 16;
    for (int j = 0; j < 8; j += 2) {
#if defined(__AVX2__)
      const __m256i bytes = _mm256_loadu_si256((const __m256i*)(qs + 16 * j)), low = _mm256_set1_epi8(0xF);
      const __m256i q0 = _mm256_and_si256(bytes, low), q1 = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
#else
      Levels q0, q1;
      for (int i = 0; i < 32; ++i) q0.v[i] = qs[16 * j + i] & 0xF, q1.v[i] = qs[16 * j + i] >> 4;
#endif
      f(j, q0, Scales{s[j], s[j], off[j]});
      f(j + 1, q1, Scales{s[j + 1], s[j + 1], off[j + 1]});
    }
  }
};

// Q4_K's fields with 32 bytes of high bits after the scales: value i of group j has bit j of byte
// i; w = d sc[j] q - dmin mn[j] with q 0..31.
struct Q5_K {
  static constexpr int kType = 13, kValues = 256, kBytes = 176, kBias = 0;
  static constexpr bool kSigned = false, kOffset = true, kTwoScales = false;
  template <typename F>
  static void groups(const uint8_t* b, F&& f) {
    float s[8], off[8];
    k_scales(b, s, off);
    const uint8_t *qh = b + 16, *qs = b + 48;
#if defined(__AVX2__)
    const __m256i high = _mm256_loadu_si256((const __m256i*)qh), low = _mm256_set1_epi8(0xF);
    __m256i bit = _mm256_set1_epi8(1);  // group j's bit in every byte; it moves up a place a group
#endif
    for (int j = 0; j < 8; j += 2) {
#if defined(__AVX2__)
      const __m256i bytes = _mm256_loadu_si256((const __m256i*)(qs + 16 * j)), sixteen = _mm256_set1_epi8(0x10);
      // 0x10 where the bit is set: compare the masked byte with the bit, keep 0x10 of the 0xFF.
      const __m256i h0 = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(high, bit), bit), sixteen);
      bit = _mm256_add_epi8(bit, bit);
      const __m256i h1 = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(high, bit), bit), sixteen);
      bit = _mm256_add_epi8(bit, bit);
      const __m256i q0 = _mm256_or_si256(_mm256_and_si256(bytes, low), h0);
      const __m256i q1 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bytes, 4), low), h1);
#else
      Levels q0, q1;
      for (int i = 0; i < 32; ++i) {
        q0.v[i] = (qs[16 * j + i] & 0xF) | ((qh[i] >> j) & 1) << 4;
        q1.v[i] = (qs[16 * j + i] >> 4) | ((qh[i] >> (j + 1)) & 1) << 4;
      }
#endif
      f(j, q0, Scales{s[j], s[j], off[j]});
      f(j + 1, q1, Scales{s[j + 1], s[j + 1], off[j + 1]});
    }
  }
};

// 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales (one per 16 values), d. Each half
// h of the block (values 128h..) takes 64 low-nibble bytes L = ql[64h..] and 32 high-bit bytes
// H = qh[32h..]; its group g (0-3) is the low nibbles of L[32(g%2)..] for g < 2, else the high
// ones, with bits 2g, 2g + 1 of H above them; w = d sc[v / 16] (q - 32).
struct Q6_K {
  static constexpr int kType = 14, kValues = 256, kBytes = 210, kBias = 32;
  static constexpr bool kSigned = false, kOffset = false, kTwoScales = true;
  template <typename F>
  static void groups(const uint8_t* b, F&& f) {
    const float d = half(b + 208);
    const int8_t* sc = (const int8_t*)(b + 192);
    float s[16];  // d sc, once a block
    for (int i = 0; i < 16; ++i) s[i] = d * (float)sc[i];
    for (int h = 0; h < 2; ++h) {
      const uint8_t *ql = b + 64 * h, *qh = b + 128 + 32 * h;
#if defined(__AVX2__)
      const __m256i low = _mm256_set1_epi8(0xF), three = _mm256_set1_epi8(3 << 4);
      const __m256i l0 = _mm256_loadu_si256((const __m256i*)ql), l1 = _mm256_loadu_si256((const __m256i*)(ql + 32));
      const __m256i hb = _mm256_loadu_si256((const __m256i*)qh);
      // Each group's two high bits moved to bits 4-5 (a 16-bit shift; the mask drops what crosses bytes).
      const __m256i q[4] = {
          _mm256_or_si256(_mm256_and_si256(l0, low), _mm256_and_si256(_mm256_slli_epi16(hb, 4), three)),
          _mm256_or_si256(_mm256_and_si256(l1, low), _mm256_and_si256(_mm256_slli_epi16(hb, 2), three)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low), _mm256_and_si256(hb, three)),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low),
                          _mm256_and_si256(_mm256_srli_epi16(hb, 2), three)),
      };
#endif
      for (int g = 0; g < 4; ++g) {
        const int j = 4 * h + g;
#if defined(__AVX2__)
        const __m256i levels = q[g];
#else
        Levels levels;
        for (int i = 0; i < 32; ++i)
          levels.v[i] = (g < 2 ? ql[32 * g + i] & 0xF : ql[32 * (g - 2) + i] >> 4) | ((qh[i] >> (2 * g)) & 3) << 4;
#endif
        f(j, levels, Scales{s[2 * j], s[2 * j + 1], 0.f});
      }
    }
  }
};

}  // namespace gguf
}  // namespace runner
