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
// for a type with kBias, -kBias times the sums of each block's halves, in lanes 0 and 4 of eight
// (where dot_q8 sums the halves' products).
struct Q8Row {
  const int8_t* q;
  const float* d;
  const float* dsum;
  const int32_t* bias;
};

// out[r] = sum over groups of d_x (s0, s1 on the two halves) sum((level - kBias) q) + off d_x sum(q).
template <typename Q, int R>
void int8_row(const uint8_t* w, int64_t blocks, const Q8Row* x, float* out) {
  constexpr int kGroups = Q::kValues / 32;
  v8f acc[R][2] = {};
  float offsets[R] = {};
  // Two sums a row: a K-quant's groups alternate between them, a 32-value type's blocks.
  const auto block = [&](int64_t b, auto chain) {
    const uint8_t* at = w + b * Q::kBytes;
    ahead_block<Q>(at);
    Q::groups(at, [&](int j, const gguf::Levels& q, gguf::Scales s) {
      const int64_t g = b * kGroups + j;
      for (int r = 0; r < R; ++r) {
        v8i dot = gguf::dot_q8<Q::kSigned>(q, x[r].q + 32 * g);
        if constexpr (Q::kBias != 0) {
          v8i bias;
          std::memcpy(&bias, x[r].bias + 8 * g, sizeof bias);
          dot += bias;
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
        v8f& sum = acc[r][kGroups > 1 ? j % 2 : decltype(chain)::value];
        sum = gguf::fma8(p, scale, sum);
        if constexpr (Q::kOffset) offsets[r] = gguf::fma1(s.off, x[r].dsum[g], offsets[r]);
      }
    });
  };
  int64_t b = 0;
  for (; b + 2 <= blocks; b += 2) {
    block(b, std::integral_constant<int, 0>{});
    block(b + 1, std::integral_constant<int, 1>{});
  }
  if (b < blocks) block(b, std::integral_constant<int, 0>{});
  for (int r = 0; r < R; ++r) out[r] = hsum8(acc[r][0] + acc[r][1]) + offsets[r];
}

// --- the linear ------------------------------------------------------------------------------------

// x's M rows made ready once (fp32, or quantized per block of 32), then any run of output rows.
template <typename Q, typename T>
class GgufLinear {
 public:
  GgufLinear(const uint8_t* w, int64_t N, int64_t K, const T* x, int64_t M, bool int8_x)
      : w_(w), N_(N), K_(K), M_(M), int8_x_(int8_x), blocks_(K / Q::kValues) {
    if (int8_x) {
      q_.resize(M * K);
      d_.resize(M * K / 32);
      dsum_.resize(M * K / 32);
      bias_.resize(Q::kBias != 0 ? M * K / 4 : 0);
      for (int64_t b = 0; b < M * K / 32; ++b) {
        const float d = quantize_row(x + 32 * b, 32, q_.data() + 32 * b);
        int32_t sums[2] = {0, 0};
        for (int i = 0; i < 32; ++i) sums[i / 16] += q_[32 * b + i];
        d_[b] = d;
        dsum_[b] = d * (float)(sums[0] + sums[1]);
        if (Q::kBias != 0) bias_[8 * b] = -Q::kBias * sums[0], bias_[8 * b + 4] = -Q::kBias * sums[1];
      }
      for (int64_t m = 0; m < M; ++m)
        rows_q8_.push_back(Q8Row{q_.data() + m * K, d_.data() + m * K / 32, dsum_.data() + m * K / 32,
                                 bias_.data() + m * K / 4});
      return;
    }
    xr_.resize(M * K);
    sums_.resize(Q::kOffset ? M * K / 4 : 0);
    for (int64_t g = 0; g < M * K / 32; ++g)
      for (int i = 0; i < 8; ++i) {
        const T* from = x + 32 * g + 4 * i;
        float* to = xr_.data() + 32 * g + i;
        to[0] = widen(from[0]), to[8] = widen(from[1]), to[16] = widen(from[2]), to[24] = widen(from[3]);
        if (Q::kOffset) sums_[8 * g + i] = ((to[0] + to[8]) + to[16]) + to[24];
      }
    for (int64_t m = 0; m < M; ++m)
      rows_f_.push_back(FloatRow{xr_.data() + m * K, Q::kOffset ? sums_.data() + m * K / 4 : nullptr});
  }

  // Output rows [n0, n1) of every input row into y [M, N]: a weight row against up to four rows of
  // x at a time (the row stays in L1 for the next four).
  void rows(int64_t n0, int64_t n1, T* y) const {
    const int64_t row_bytes = blocks_ * Q::kBytes;
    float acc[4];
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = w_ + n * row_bytes;
      for (int64_t m = 0; m < M_; m += 4) {
        const int64_t R = std::min<int64_t>(4, M_ - m);
        if (int8_x_) {
          const Q8Row* x = rows_q8_.data() + m;
          switch (R) {
            case 1: int8_row<Q, 1>(row, blocks_, x, acc); break;
            case 2: int8_row<Q, 2>(row, blocks_, x, acc); break;
            case 3: int8_row<Q, 3>(row, blocks_, x, acc); break;
            default: int8_row<Q, 4>(row, blocks_, x, acc);
          }
        } else {
          const FloatRow* x = rows_f_.data() + m;
          switch (R) {
            case 1: float_row<Q, 1>(row, blocks_, x, acc); break;
            case 2: float_row<Q, 2>(row, blocks_, x, acc); break;
            case 3: float_row<Q, 3>(row, blocks_, x, acc); break;
            default: float_row<Q, 4>(row, blocks_, x, acc);
          }
        }
        for (int64_t r = 0; r < R; ++r) y[(m + r) * N_ + n] = static_cast<T>(acc[r]);
      }
    }
  }

  // All N rows, shared out over at::parallel_for's threads a block of kRows at a time.
  void all(T* y) const {
    const int64_t blocks = (N_ + kRows - 1) / kRows;
    at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
      rows(begin * kRows, std::min(N_, end * kRows), y);
    });
  }

 private:
  const uint8_t* w_;
  int64_t N_, K_, M_;
  bool int8_x_;
  int64_t blocks_;
  std::vector<float> xr_, sums_, d_, dsum_;
  std::vector<int8_t> q_;
  std::vector<int32_t> bias_;
  std::vector<FloatRow> rows_f_;
  std::vector<Q8Row> rows_q8_;
};

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
    if (x.scalar_type() == at::kBFloat16)
      GgufLinear<Q, BFloat16>(w.const_data_ptr<uint8_t>(), N, K, xc.const_data_ptr<BFloat16>(), M, int8_x)
          .all(y.mutable_data_ptr<BFloat16>());
    else
      GgufLinear<Q, float>(w.const_data_ptr<uint8_t>(), N, K, xc.const_data_ptr<float>(), M, int8_x)
          .all(y.mutable_data_ptr<float>());
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
