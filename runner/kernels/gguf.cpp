// GGUF's quantized weights as the file stores them (quant.mode: gguf): blocks uint8 [N, row_bytes],
// row n the tensor's row n as consecutive blocks of one type (gguf.h).
//
//   gguf_linear(x [M, K], blocks, type, int8_x) -> [M, N]   in x's dtype, fp32 accumulation
//       float x: x widened to fp32 and arranged once a call (FloatRow); per group, the integer
//                levels times x summed in fp32, then one multiply by the group's scales (and the
//                min times the group's sums of x)
//       int8_x:  x quantized per block of 32 columns, d = max|x| / 127, q = x / d rounded half to
//                even (runner.model.functional.quantize_rows on each block, vec.h's quantize_row),
//                integer dot products of the levels with q per group, then the group's scales; a
//                min (w = s q + off) adds off * d * sum(q) per group
//   dequantize_gguf(blocks, type, dtype) -> [N, K]           gguf's values bit for bit in fp32,
//                                                              rounded once for bf16 (prompts)
#include <ATen/Parallel.h>

#include <type_traits>
#include <vector>

#include "gemv.h"  // kRows
#include "gguf.h"
#include "ops.h"

namespace runner {
namespace {

using gguf::v8f;
using gguf::v8i;

// f(Q{}) for the block type `type` names; a TORCH_CHECK error for any other.
template <typename F>
void with_type(const char* op, int64_t type, F&& f) {
  switch (type) {
    case gguf::Q4_0::kType: return f(gguf::Q4_0{});
    case gguf::Q4_1::kType: return f(gguf::Q4_1{});
    case gguf::Q5_0::kType: return f(gguf::Q5_0{});
    case gguf::Q5_1::kType: return f(gguf::Q5_1{});
    case gguf::Q8_0::kType: return f(gguf::Q8_0{});
    case gguf::Q4_K::kType: return f(gguf::Q4_K{});
    case gguf::Q5_K::kType: return f(gguf::Q5_K{});
    case gguf::Q6_K::kType: return f(gguf::Q6_K{});
  }
  TORCH_CHECK(false, "runner::", op, ": GGUF type ", type,
              " is not one of Q4_0 (2), Q4_1 (3), Q5_0 (6), Q5_1 (7), Q8_0 (8), Q4_K (12), Q5_K (13), Q6_K (14)");
}

static inline float hsum8(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

// The block's first line `kAheadBytes` on, and its others for blocks over a line.
template <typename Q>
static inline void ahead_block(const uint8_t* b) {
  if constexpr (Q::kBytes >= 64)
    ahead(b, Q::kBytes);
  else
    ahead(b);
}

// --- float x: gguf's weights in registers against fp32 rows of x -----------------------------------

// The group's c-th eight weights in fp32, gguf's values exactly (see gguf.h), from levels less
// kBias (centred): s (level - kBias) as numpy multiplies it, down to the sign of a zero
// (dequantize_rows; float_row applies the scales once a group instead).
template <typename Q>
static inline v8f weights8(const gguf::Levels& centred, const gguf::Scales& s, int c) {
  const v8f level = gguf::level_chunk(centred, c);
  const float sc = c < 2 ? s.s0 : s.s1;
  if constexpr (Q::kOffset)
    return level * sc + s.off;
  else
    return level * sc;
}

// One row of x as float_row reads it: each group of 32 columns in words' order, xr[32 g + 8 j + i]
// = x[32 g + 4 i + j] (so byte j of word i meets its column without a shuffle), and for types
// with a min, sums[8 g + i] = the sum of the columns word i covers.
struct FloatRow {
  const float* xr;
  const float* sums;
};

// out[r] = sum_k w[k] x[r][k] over one weight row of `blocks` blocks, R rows of x side by side (a
// group is decoded once for all of them): per group and row, sum (level - kBias) x in eight lanes,
// then one multiply by the group's scales, and off times the lanes' sums of x for a min. Every
// row takes the same steps in the same order whatever R is, so its result does not depend on the
// rows beside it. Two sums a row, as int8_row, and one for the mins.
template <typename Q, int R>
void float_row(const uint8_t* w, int64_t blocks, const FloatRow* x, float* out) {
  constexpr int kGroups = Q::kValues / 32;
  v8f acc[R][2] = {}, offsets[R] = {};
  const auto block = [&](int64_t b, auto chain) {
    const uint8_t* at = w + b * Q::kBytes;
    ahead_block<Q>(at);
    Q::groups(at, [&](int j, const gguf::Levels& q, gguf::Scales s) {
      const int64_t g = b * kGroups + j;
      const v8i wd = gguf::words(gguf::less<Q::kBias>(q));
      const v8f l0 = gguf::byte_levels<0>(wd), l1 = gguf::byte_levels<1>(wd), l2 = gguf::byte_levels<2>(wd),
                l3 = gguf::byte_levels<3>(wd);
      const v8f scale = Q::kTwoScales ? v8f{s.s0, s.s0, s.s0, s.s0, s.s1, s.s1, s.s1, s.s1} : gguf::splat8(s.s0);
      for (int r = 0; r < R; ++r) {
        const float* xr = x[r].xr + 32 * g;
        const v8f t = gguf::fma8(l3, gguf::load8(xr + 24),
                                 gguf::fma8(l2, gguf::load8(xr + 16), gguf::fma8(l1, gguf::load8(xr + 8), l0 * gguf::load8(xr))));
        v8f& sum = acc[r][kGroups > 1 ? j % 2 : decltype(chain)::value];
        sum = gguf::fma8(t, scale, sum);
        if constexpr (Q::kOffset) offsets[r] = gguf::fma8(gguf::splat8(s.off), gguf::load8(x[r].sums + 8 * g), offsets[r]);
      }
    });
  };
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) {
    block(b, std::integral_constant<int, 0>{});
    block(b + 1, std::integral_constant<int, 1>{});
  }
  if (b < blocks) block(b, std::integral_constant<int, 0>{});
  for (int r = 0; r < R; ++r) out[r] = hsum8((acc[r][0] + acc[r][1]) + offsets[r]);
}

// --- int8 x: integer dot products with the levels ---------------------------------------------------

// One row of x quantized per block of 32 columns: its levels, each block's d and d * sum(q), and
// the sums of each block's halves in lanes 0 and 4 of eight (where dot_q8 sums the halves'
// products), which a type with kBias takes -kBias times.
struct Q8Row {
  const int8_t* q;
  const float* d;
  const float* dsum;
  const int32_t* halves;
};

// out[r] = sum over groups of d_x (s0, s1 on the two halves) sum((level - kBias) q) + off d_x sum(q).
template <typename Q, int R>
void int8_row(const uint8_t* w, int64_t blocks, const Q8Row* x, float* out) {
  constexpr int kGroups = Q::kValues / 32;
  v8f acc[R][2] = {};
  float offsets[R][2] = {};
  // Two sums a row, and two of the mins' terms: a K-quant's groups alternate between them, a
  // 32-value type's blocks (a sum waits about four cycles for the one before it).
  const auto block = [&](int64_t b, auto chain) {
    const uint8_t* at = w + b * Q::kBytes;
    ahead_block<Q>(at);
    Q::groups(at, [&](int j, const gguf::Levels& q, gguf::Scales s) {
      const int64_t g = b * kGroups + j;
      for (int r = 0; r < R; ++r) {
        v8i dot = gguf::dot_q8<Q::kSigned>(q, x[r].q + 32 * g);
        if constexpr (Q::kBias != 0) {
          v8i halves;
          std::memcpy(&halves, x[r].halves + 8 * g, sizeof halves);
          dot += halves * -Q::kBias;
        }
        const v8f p = __builtin_convertvector(dot, v8f);
        const float d = x[r].d[g];
        v8f scale;
        if constexpr (Q::kTwoScales) {
          const float a = s.s0 * d, c = s.s1 * d;
          scale = v8f{a, a, a, a, c, c, c, c};
        } else {
          scale = gguf::splat8(s.s0 * d);
        }
        const int c = kGroups > 1 ? j % 2 : decltype(chain)::value;
        acc[r][c] = gguf::fma8(p, scale, acc[r][c]);
        if constexpr (Q::kOffset) offsets[r][c] = gguf::fma1(s.off, x[r].dsum[g], offsets[r][c]);
      }
    });
  };
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) {
    block(b, std::integral_constant<int, 0>{});
    block(b + 1, std::integral_constant<int, 1>{});
  }
  if (b < blocks) block(b, std::integral_constant<int, 0>{});
  for (int r = 0; r < R; ++r) out[r] = hsum8(acc[r][0] + acc[r][1]) + (offsets[r][0] + offsets[r][1]);
}

#if defined(__AVX2__)
// Q4_0 and Q4_1 (16 bytes of nibbles after d, and Q4_1's m) against one row of int8 x, W weight
// rows side by side, two blocks (64 values) a step: a row's two blocks' nibbles in one register
// (lanes 0-3 the first block, 4-7 the second) meet x's matching halves on vpmaddubsw, as the int4
// kernel's steps do, where int8_row takes a block at a time with its scales in scalar code. The
// step's x, its d and Q4_0's -8 sum(q) (in each block's first lane) are loaded once for the W
// rows; the blocks' fp16 d and m become fp32 (exactly) four at a time; Q4_1's m d_x sum(q) terms
// gather in a four-lane sum of their own. A row's result does not depend on W.
template <typename Q, int W>
void nibble_rows(const uint8_t* w, int64_t row_bytes, int64_t blocks, const Q8Row& x, float* out) {
  constexpr int64_t kHead = Q::kBytes - 16;  // d, and m for Q4_1
  const __m256i nibble = _mm256_set1_epi8(0xF), ones = _mm256_set1_epi16(1);
  const __m256i pick = _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0), pick_d = _mm256_set_epi32(2, 2, 2, 2, 0, 0, 0, 0);
  __m256 acc[W];
  __m128 mins[W];
  for (int r = 0; r < W; ++r) acc[r] = _mm256_setzero_ps(), mins[r] = _mm_setzero_ps();
  const auto step = [&](int64_t b, auto two) __attribute__((always_inline)) {
    constexpr bool kTwo = decltype(two)::value;
    __m256i lo, hi;  // x's values 0-15 and 16-31 of each block: the low and high nibbles' columns
    __m256 dx;
    if constexpr (kTwo) {
      const __m256i a = _mm256_loadu_si256((const __m256i*)(x.q + 32 * b));
      const __m256i c = _mm256_loadu_si256((const __m256i*)(x.q + 32 * b + 32));
      lo = _mm256_permute2x128_si256(a, c, 0x20), hi = _mm256_permute2x128_si256(a, c, 0x31);
      dx = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i*)(x.d + b)))), pick);
    } else {  // a row's last, odd block: lanes 4-7 are zeros
      lo = _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i*)(x.q + 32 * b)));
      hi = _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i*)(x.q + 32 * b + 16)));
      dx = _mm256_set1_ps(x.d[b]);
    }
    __m256i start = _mm256_setzero_si256();
    if constexpr (Q::kBias != 0) {
      const int32_t q0 = x.halves[8 * b] + x.halves[8 * b + 4];
      const int32_t q1 = kTwo ? x.halves[8 * b + 8] + x.halves[8 * b + 12] : 0;
      start = _mm256_set_epi32(0, 0, 0, -Q::kBias * q1, 0, 0, 0, -Q::kBias * q0);
    }
    __m128 dsum = _mm_setzero_ps();
    if constexpr (Q::kOffset) dsum = _mm_set_ps(kTwo ? x.dsum[b + 1] : 0.f, 0.f, x.dsum[b], 0.f);
    for (int r = 0; r < W; ++r) {
      const uint8_t* at = w + r * row_bytes + b * Q::kBytes;
      ahead(at);
      __m256i q;
      uint32_t second = 0;
      if constexpr (kTwo) {
        q = _mm256_loadu2_m128i((const __m128i*)(at + Q::kBytes + kHead), (const __m128i*)(at + kHead));
        second = gguf::word(at + Q::kBytes);
      } else {
        q = _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i*)(at + kHead)));
      }
      const __m256i low = _mm256_and_si256(q, nibble), high = _mm256_and_si256(_mm256_srli_epi16(q, 4), nibble);
      const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(low, lo), _mm256_maddubs_epi16(high, hi));
      __m256i p = _mm256_madd_epi16(pairs, ones);
      if constexpr (Q::kBias != 0) p = _mm256_add_epi32(p, start);
      // [d0, m0, d1, m1] in fp32 (Q4_0: the words after d are levels, never read)
      uint32_t first = Q::kOffset ? gguf::word(at) : (uint32_t)at[0] | (uint32_t)at[1] << 8;
      if constexpr (!Q::kOffset) second &= 0xFFFFu;
      const __m128 dm = _mm_cvtph_ps(_mm_set_epi32(0, 0, (int)second, (int)first));
      const __m256 dw = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(dm), pick_d);
      acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(p), dx), dw, acc[r]);
      if constexpr (Q::kOffset) mins[r] = _mm_fmadd_ps(dm, dsum, mins[r]);
    }
  };
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) step(b, std::true_type{});
  if (b < blocks) step(b, std::false_type{});
  for (int r = 0; r < W; ++r) out[r] = hsum8((v8f)acc[r]) + (mins[r][1] + mins[r][3]);
}
#endif

// --- the linear (Gemv's GGUF path) -----------------------------------------------------------------

// x's rows as a part's loops read them (Gemv::prepare_gguf makes them): fp32 in FloatRow's order
// with its sums, or levels, d, d * sum(q) and the halves' sums per block of 32 when q is set.
struct GgufX {
  const float *xr, *sums;
  const int8_t* q;
  const float *d, *dsum;
  const int32_t* halves;
  int64_t K;

  FloatRow float_row(int64_t m) const { return FloatRow{xr + m * K, sums + m * K / 4}; }
  Q8Row q8_row(int64_t m) const { return Q8Row{q + m * K, d + m * K / 32, dsum + m * K / 32, halves + m * K / 4}; }
};

// Rows [n0, n1) of one part of type Q into y [M, N] at column `column` + n: a weight row against
// up to four rows of x at a time (the row stays in L1 for the next four).
template <typename Q, typename T>
void part_rows(const uint8_t* w, int64_t n0, int64_t n1, const GgufX& x, int64_t M, T* y, int64_t N, int64_t column) {
  const int64_t blocks = x.K / Q::kValues, row_bytes = blocks * Q::kBytes;
  float acc[4];
  FloatRow xf[4];
  Q8Row xq[4];
#if defined(__AVX2__)
  if constexpr (std::is_same_v<Q, gguf::Q4_0> || std::is_same_v<Q, gguf::Q4_1>) {
    if (x.q != nullptr) {
      for (int64_t m = 0; m < M; ++m) {
        const Q8Row xm = x.q8_row(m);
        T* ym = y + m * N + column;
        int64_t n = n0;
        for (; n + 4 <= n1; n += 4) {
          nibble_rows<Q, 4>(w + n * row_bytes, row_bytes, blocks, xm, acc);
          for (int r = 0; r < 4; ++r) ym[n + r] = static_cast<T>(acc[r]);
        }
        for (; n < n1; ++n) {
          nibble_rows<Q, 1>(w + n * row_bytes, row_bytes, blocks, xm, acc);
          ym[n] = static_cast<T>(acc[0]);
        }
      }
      return;
    }
  }
#endif
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    for (int64_t m = 0; m < M; m += 4) {
      const int64_t R = std::min<int64_t>(4, M - m);
      if (x.q != nullptr) {
        for (int64_t r = 0; r < R; ++r) xq[r] = x.q8_row(m + r);
        switch (R) {
          case 1: int8_row<Q, 1>(row, blocks, xq, acc); break;
          case 2: int8_row<Q, 2>(row, blocks, xq, acc); break;
          case 3: int8_row<Q, 3>(row, blocks, xq, acc); break;
          default: int8_row<Q, 4>(row, blocks, xq, acc);
        }
      } else {
        for (int64_t r = 0; r < R; ++r) xf[r] = x.float_row(m + r);
        switch (R) {
          case 1: float_row<Q, 1>(row, blocks, xf, acc); break;
          case 2: float_row<Q, 2>(row, blocks, xf, acc); break;
          case 3: float_row<Q, 3>(row, blocks, xf, acc); break;
          default: float_row<Q, 4>(row, blocks, xf, acc);
        }
      }
      for (int64_t r = 0; r < R; ++r) y[(m + r) * N + column + n] = static_cast<T>(acc[r]);
    }
  }
}

// --- dequantize -------------------------------------------------------------------------------------

// Rows [n0, n1) of blocks as T [N, K]: each weight s * level + off in fp32 (gguf's value, see
// gguf.h), rounded once to T.
template <typename Q, typename T>
void dequantize_rows(const uint8_t* w, int64_t blocks, int64_t n0, int64_t n1, T* y) {
  const int64_t K = blocks * Q::kValues;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t b = 0; b < blocks; ++b) {
      T* out = y + n * K + b * Q::kValues;
      Q::groups(w + (n * blocks + b) * Q::kBytes, [&](int j, const gguf::Levels& q, gguf::Scales s) {
        const gguf::Levels centred = gguf::less<Q::kBias>(q);
#pragma GCC unroll 4
        for (int c = 0; c < 4; ++c) {
          const v8f v = weights8<Q>(centred, s, c);
          T* to = out + 32 * j + 8 * c;
          if constexpr (std::is_same_v<T, float>) {
            std::memcpy(to, &v, sizeof v);
          } else {
            // bf16: an fp32's top half, rounded to nearest even (vec.h's bf16_bits, eight lanes).
            typedef uint32_t v8u __attribute__((vector_size(32)));
            typedef uint16_t v8h __attribute__((vector_size(16)));
            const v8u u = (v8u)v;
            const v8h top = __builtin_convertvector((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16, v8h);
            std::memcpy(to, &top, sizeof top);
          }
        }
      });
    }
}

// blocks' row width in values, checked: a whole number of blocks of Q.
template <typename Q>
int64_t checked_width(const char* op, const at::Tensor& blocks) {
  TORCH_CHECK(blocks.device().is_cpu() && blocks.dim() == 2 && blocks.scalar_type() == at::kByte, "runner::", op,
              ": blocks must be a CPU uint8 tensor [N, row_bytes], got ", blocks.scalar_type(), " ", blocks.sizes());
  TORCH_CHECK(blocks.size(1) % Q::kBytes == 0, "runner::", op, ": a row of ", blocks.size(1),
              " bytes is not a whole number of ", Q::kBytes, "-byte blocks of type ", Q::kType);
  return blocks.size(1) / Q::kBytes * Q::kValues;
}

}  // namespace

// x's M rows made ready once for every part, whatever its type: fp32 in FloatRow's order with the
// sums its mins take, or quantized per block of 32 with the sums Q8Row holds.
template <typename T>
void Gemv<T>::prepare_gguf() {
  const int64_t K = wt_.K, M = M_, blocks = M * K / 32;
  if (wt_.int8_x) {
    xq8_.resize(M * K);
    dl_.resize(blocks);
    dsums_.resize(blocks);
    halves_q8_.assign(8 * blocks, 0);
    for (int64_t b = 0; b < blocks; ++b) {
      const float d = quantize_row(x_ + 32 * b, 32, xq8_.data() + 32 * b);
      int32_t sums[2] = {0, 0};
      for (int i = 0; i < 32; ++i) sums[i / 16] += xq8_[32 * b + i];
      dl_[b] = d;
      dsums_[b] = d * (float)(sums[0] + sums[1]);
      halves_q8_[8 * b] = sums[0], halves_q8_[8 * b + 4] = sums[1];
    }
    return;
  }
  xf_.resize(M * K);
  sums_.resize(M * K / 4);
  for (int64_t g = 0; g < blocks; ++g)
    for (int i = 0; i < 8; ++i) {
      const T* from = x_ + 32 * g + 4 * i;
      float* to = xf_.data() + 32 * g + i;
      to[0] = widen(from[0]), to[8] = widen(from[1]), to[16] = widen(from[2]), to[24] = widen(from[3]);
      sums_[8 * g + i] = ((to[0] + to[8]) + to[16]) + to[24];
    }
}

// Output rows [n0, n1) through the parts they fall in, each by its own type's loop.
template <typename T>
void Gemv<T>::gguf_rows(int64_t n0, int64_t n1, T* y) const {
  const GgufX x = wt_.int8_x ? GgufX{nullptr, nullptr, xq8_.data(), dl_.data(), dsums_.data(), halves_q8_.data(), wt_.K}
                             : GgufX{xf_.data(), sums_.data(), nullptr, nullptr, nullptr, nullptr, wt_.K};
  int64_t start = 0;
  for (int i = 0; i < wt_.gguf_parts; ++i) {
    const GgufPart& part = wt_.gguf[i];
    const int64_t lo = std::max(n0, start), hi = std::min(n1, start + part.rows);
    if (lo < hi)
      with_type("gguf_linear", part.type, [&](auto q) {
        part_rows<decltype(q)>(part.blocks, lo - start, hi - start, x, M_, y, wt_.N, start);
      });
    start += part.rows;
  }
}

// The values in a row of `row_bytes` bytes of blocks of type `type`, checked: whole blocks.
int64_t gguf_width(int64_t type, int64_t row_bytes) {
  int64_t K = 0;
  with_type("gguf_linear", type, [&](auto q) {
    using Q = decltype(q);
    TORCH_CHECK(row_bytes % Q::kBytes == 0, "runner::gguf_linear: a row of ", row_bytes,
                " bytes is not a whole number of ", Q::kBytes, "-byte blocks of type ", Q::kType);
    K = row_bytes / Q::kBytes * Q::kValues;
  });
  return K;
}

template <typename T>
Weights<T> gguf_weights(const std::vector<at::Tensor>& w, bool int8_x) {
  Weights<T> out;
  out.int8_x = int8_x;
  const int64_t* types = w.back().const_data_ptr<int64_t>();
  out.gguf_parts = (int)w.size() - 1;
  for (int i = 0; i < out.gguf_parts; ++i) {
    out.gguf[i] = GgufPart{w[i].const_data_ptr<uint8_t>(), types[i], w[i].size(0)};
    out.N += w[i].size(0);
  }
  out.K = gguf_width(types[0], w[0].size(1));
  return out;
}

template Weights<float> gguf_weights<float>(const std::vector<at::Tensor>&, bool);
template Weights<BFloat16> gguf_weights<BFloat16>(const std::vector<at::Tensor>&, bool);
template void Gemv<float>::prepare_gguf();
template void Gemv<float>::gguf_rows(int64_t, int64_t, float*) const;
template void Gemv<BFloat16>::prepare_gguf();
template void Gemv<BFloat16>::gguf_rows(int64_t, int64_t, BFloat16*) const;

at::Tensor gguf_linear(const at::Tensor& x, const at::Tensor& blocks, int64_t type, bool int8_x) {
  check_cpu_float(x, "gguf_linear");
  at::Tensor y;
  with_type("gguf_linear", type, [&](auto q) {
    using Q = decltype(q);
    const int64_t K = checked_width<Q>("gguf_linear", blocks);
    TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.size(0) >= 1, "runner::gguf_linear: x must be [M, K] with K = ",
                K, " (the blocks' row width), got ", x.sizes());
    const auto w = blocks.contiguous();
    const auto xc = x.contiguous();
    const int64_t M = x.size(0), N = blocks.size(0);
    y = at::empty({M, N}, x.options());
    const auto run = [&](auto zero) {
      using T = decltype(zero);
      Weights<T> wt;
      wt.gguf[0] = GgufPart{w.const_data_ptr<uint8_t>(), type, N};
      wt.gguf_parts = 1, wt.N = N, wt.K = K, wt.int8_x = int8_x;
      Gemv<T>(wt, xc.const_data_ptr<T>(), M).all(y.mutable_data_ptr<T>());
    };
    if (x.scalar_type() == at::kBFloat16)
      run(BFloat16());
    else
      run(0.f);
  });
  return y;
}

at::Tensor dequantize_gguf(const at::Tensor& blocks, int64_t type, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "runner::dequantize_gguf: dtype must be float32 or bfloat16, got ", dtype);
  at::Tensor y;
  with_type("dequantize_gguf", type, [&](auto q) {
    using Q = decltype(q);
    const int64_t K = checked_width<Q>("dequantize_gguf", blocks), N = blocks.size(0);
    const auto w = blocks.contiguous();
    y = at::empty({N, K}, blocks.options().dtype(dtype));
    const uint8_t* src = w.const_data_ptr<uint8_t>();
    const int64_t count = K / Q::kValues;
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      if (dtype == at::kBFloat16)
        dequantize_rows<Q>(src, count, begin, end, y.mutable_data_ptr<BFloat16>());
      else
        dequantize_rows<Q>(src, count, begin, end, y.mutable_data_ptr<float>());
    });
  });
  return y;
}

}  // namespace runner
