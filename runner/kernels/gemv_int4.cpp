// The int4 GEMV: weight-only int4 rows (runner.quant.int4's layout: two levels a byte, even column
// low; w = (level - 8) s + z per group of gs columns) against a few rows of x, fp32 or bf16, or x
// quantized to int8 per group (int8_x). Gemv's int4 members live here.
#include <algorithm>

#include "gemv.h"

namespace runner {
namespace {

// --- int4 weights against float activations ------------------------------------------------------

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
// goes into the row's lanes sixteen groups at a time, before they are summed. A row's last, short
// step is a masked one.
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

// --- int4 weights against int8 activations (quant.activations: int8) -----------------------------
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
// A step's scales for AVX2's eight lanes: lanes 0-3 take group g's scale, lanes 4-7 group g + 1's
// where a step of 64 columns holds two groups (TWO), else g's too.
template <bool TWO>
inline __m256 step_scales(const float* s, __m256i pick) {
  const __m128 v = TWO ? _mm_castsi128_ps(_mm_loadl_epi64((const __m128i*)s)) : _mm_set1_ps(s[0]);
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), pick);
}
// bf16: the step's one or two scales broadcast to every 32-bit lane, then one in-lane byte shuffle
// (`spread`) moves the lane's bf16 into its fp32's top half.
template <bool TWO>
inline __m256 step_scales(const BFloat16* s, __m256i spread) {
  uint32_t bits = s[0].x * 0x10001u;  // the two bf16 side by side, the first low (one group: g's twice)
  if constexpr (TWO) std::memcpy(&bits, s, 4);
  return _mm256_castsi256_ps(_mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), spread));
}

// AVX2 (and AVX-512 without VNNI): R rows side by side, 64 columns (32 bytes of levels) a step on
// vpmaddubsw, whose pair sums stay within int16 (2 x 15 x 127), and vpmaddwd into eight lanes of
// eight columns, summed onto `starts`; the step's x, d and starts are loaded once for the R rows.
// The z d Q terms are summed eight groups at a time after the steps. A step's group is a shift
// away (gs is a power of two), and whole steps and a row's last half step (16 bytes, one group of
// 32) are separate loops: a division or a branch a step costs as much as a row's multiply-adds.
template <int R, typename T>
void dot_rows_i4_q8_avx2(const Int8X& x, const uint8_t* w, const T* scales, const T* zeros, int64_t K, int64_t gs,
                         float* out) {
  const int64_t bytes = K / 2, G = K / gs, whole = bytes / 32 * 32;
  const int shift = __builtin_ctzll(gs);
  const __m256i nibble = _mm256_set1_epi8(0xF), ones = _mm256_set1_epi16(1);
  // fp32: the scales' lanes; bf16: bytes 0-1 (group g) into lanes 0-3, bytes 2-3 (g + 1) into 4-7.
  const __m256i pick = std::is_same_v<T, float> ? _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0)
                                                : _mm256_set_epi8(3, 2, -1, -1, 3, 2, -1, -1, 3, 2, -1, -1, 3, 2, -1, -1,
                                                                  1, 0, -1, -1, 1, 0, -1, -1, 1, 0, -1, -1, 1, 0, -1, -1);
  __m256 a[R];
  for (int r = 0; r < R; ++r) a[r] = _mm256_setzero_ps();
  // One step of R rows from byte b; FULL: 32 bytes, else the row's last 16; TWO: two groups in it.
  const auto step = [&](int64_t b, auto full, auto two) __attribute__((always_inline)) {
    const __m256i e = _mm256_loadu_si256((const __m256i*)(x.even + b)), o = _mm256_loadu_si256((const __m256i*)(x.odd + b));
    const __m256i start = _mm256_loadu_si256((const __m256i*)(x.starts + b / 4));
    const __m256 d = _mm256_loadu_ps(x.dl + b / 4);
    const int64_t g = (2 * b) >> shift;
    const bool fetch = (b & 63) == 0;
    for (int r = 0; r < R; ++r) {
      const uint8_t* row = w + r * bytes + b;
      if (fetch) {
        if constexpr (R == 1) ahead(row); else __builtin_prefetch(row + 2 * R * bytes, 0, 3);  // this line of the block after next
      }
      __m256i q;
      if constexpr (decltype(full)::value)
        q = _mm256_loadu_si256((const __m256i*)row);
      else
        q = _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i*)row));
      const __m256i low = _mm256_and_si256(q, nibble), high = _mm256_and_si256(_mm256_srli_epi16(q, 4), nibble);
      const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(low, e), _mm256_maddubs_epi16(high, o));
      const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(pairs, ones), start);
      a[r] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(p), d),
                             step_scales<decltype(two)::value>(scales + r * G + g, pick), a[r]);
    }
  };
  using yes = std::true_type;
  using no = std::false_type;
  if (gs == 32)
    for (int64_t b = 0; b < whole; b += 32) step(b, yes{}, yes{});
  else
    for (int64_t b = 0; b < whole; b += 32) step(b, yes{}, no{});
  if (whole < bytes) step(whole, no{}, no{});  // x is padded to whole steps
  for (int r = 0; r < R; ++r) {
    vf8 z{};
    int64_t g = 0;
    for (; g + 8 <= G; g += 8) z += load8(zeros + r * G + g) * load8(x.dq + g);
    a[r] = _mm256_add_ps(a[r], (__m256)z);
    float tail = 0.f;
    for (; g < G; ++g) tail += widen(zeros[r * G + g]) * x.dq[g];
    out[r] = tail;
  }
  if constexpr (R == 4) {
    hsum4(a, out);
  } else {
    for (int r = 0; r < R; ++r) out[r] += hsum8(a[r]);
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
// the row's scale. The z d Q terms go into the lanes sixteen groups at a time, after the steps,
// and -8 Q starts the products: neither takes a pass of its own over the row.
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

// sum_g (zeros[g] - base * scales[g]) * sums[g]: one row's zero points against x's group sums.
// Vectorised: G is K / 32, so a scalar loop would cost as much as the row's dot product.
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

}  // namespace

// x made ready for the int4 kernels: quantized (int8_x), or its group sums and the arrangement
// the target's float kernel reads.
template <typename T>
void Gemv<T>::prepare_int4() {
  const Weights<T>& wt = wt_;
  const T* x = x_;
  const int64_t M = M_, K = wt.K;
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
  // entries), or even and odd columns in fp32. The bf16 path copies bits: element by element
  // through float would be a large part of a small layer's call.
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

// One call per input row over the run: the kernels' setup is paid once.
template <typename T>
void Gemv<T>::int4_rows(int64_t n, int64_t n1, T* y) const {
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
template <typename T>
void Gemv<T>::quantize_x(int64_t G) {
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

template <typename T>
void Gemv<T>::int4_q8_rows(int64_t n, int64_t n1, T* y) const {
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
      if (R == 8) {
        dot_rows_i4_q8_avx2<4>(x, at, scales, zeros, K, gs, acc);
        dot_rows_i4_q8_avx2<4>(x, at + 4 * K / 2, scales + 4 * G, zeros + 4 * G, K, gs, acc + 4);
      } else {
        dot_rows_i4_q8_avx2<1>(x, at, scales, zeros, K, gs, acc);
      }
#else
      dot_rows_i4_q8(x, at, scales, zeros, K, gs, R, acc);
#endif
      for (int64_t i = 0; i < R; ++i) y[m * N + n + r + i] = static_cast<T>(acc[i]);
      r += R;
    }
  }
}

template void Gemv<float>::prepare_int4();
template void Gemv<float>::int4_rows(int64_t, int64_t, float*) const;
template void Gemv<float>::int4_q8_rows(int64_t, int64_t, float*) const;
template void Gemv<BFloat16>::prepare_int4();
template void Gemv<BFloat16>::int4_rows(int64_t, int64_t, BFloat16*) const;
template void Gemv<BFloat16>::int4_q8_rows(int64_t, int64_t, BFloat16*) const;

}  // namespace runner
