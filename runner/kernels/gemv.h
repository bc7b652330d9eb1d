// GEMV: a few rows of x (decode, verify) against one linear layer's weights, float or quantized.
// Gemv's float and int8 paths are in gemv.cpp, its int4 ones in gemv_int4.cpp; linear.cpp has the
// ops and checked_linear.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <string>
#include <vector>

#include "vec.h"

namespace runner {

constexpr int64_t kRows = 4;  // rows per block: a block's rows stay in L1 across a verify's inputs

// Rows of a GGUF tensor as the file stores them: uint8 [rows, row_bytes], consecutive blocks of
// one type (gguf.h, quant.mode: gguf).
struct GgufPart {
  const uint8_t* blocks = nullptr;
  int64_t type = 0, rows = 0;
};

constexpr int kMaxGgufParts = 4;  // a fused linear's runs of one type: q/k/v in up to three

// One linear layer's weights: T [N, K] (float), int8 [N, K] with scales [N], uint8 [N, K / 2]
// with scales and zeros [N, K / gs] (int4; runner.quant's layouts), or GGUF parts whose rows
// follow one another (gguf.cpp).
template <typename T>
struct Weights {
  const void* w = nullptr;
  const T* scales = nullptr;  // int8 and int4
  const T* zeros = nullptr;   // int4
  int64_t N = 0, K = 0, gs = 0;
  bool int8_x = false;  // x quantized to int8: per group (int4, see gemv_int4.cpp), per block of 32 (int8, GGUF)
  std::array<GgufPart, kMaxGgufParts> gguf{};
  int gguf_parts = 0;
};

// x's M rows made ready once for a layer's weights (widened, rearranged, their group sums), then
// any run of the layer's output rows: the ops share the rows out over at::parallel_for's threads,
// decode_layers over its team.
template <typename T>
class Gemv {
 public:
  Gemv(const Weights<T>& wt, const T* x, int64_t M);

  // Output rows [n0, n1) of every input row into y [M, N]; n0 a multiple of kRows.
  void rows(int64_t n0, int64_t n1, T* y) const;

  // All N rows, shared out over at::parallel_for's threads a block of kRows at a time.
  void all(T* y) const;

 private:
  // gemv.cpp
  void float_rows(int64_t n0, int64_t n1, T* y) const;
  void int8_rows(int64_t n0, int64_t n1, T* y) const;
  void quantize_blocks();
  void int8_q8_rows(int64_t n0, int64_t n1, T* y) const;
  // gemv_int4.cpp
  void prepare_int4();
  void int4_rows(int64_t n, int64_t n1, T* y) const;
  void quantize_x(int64_t G);
  void int4_q8_rows(int64_t n, int64_t n1, T* y) const;
  // gguf.cpp
  void prepare_gguf();
  void gguf_rows(int64_t n0, int64_t n1, T* y) const;

  Weights<T> wt_;
  const T* x_;
  int64_t M_;
  std::vector<float> xf_, sums_, xe_, xo_, xr_, firsts_, dl_, dsums_;
  std::vector<uint16_t> xq_;
  std::vector<int8_t> xq8_;
  std::vector<int32_t> starts_, halves_q8_;
  int64_t quarter_ = 0, half_ = 0;
  bool bf16_path_ = false, words_ = false, halves_ = false;
};

// --- a linear's operands as the ops receive them -------------------------------------------------

// One linear's operands, checked against the width K and dtype of its input and made contiguous:
// {w} float, {w, scales} int8, {w, scales, zeros} int4 with groupsize gs, or GGUF's
// {blocks_0, ..., blocks_p-1, types}: p uint8 parts and their types, int64 [p].
std::vector<at::Tensor> checked_linear(const std::string& name, int64_t K, at::ScalarType dtype, at::TensorList w,
                                      int64_t gs);

// Whether a linear's operands are GGUF parts: the last is their types, int64.
bool is_gguf(at::TensorList w);

// A linear's output rows N: the parts' rows together for GGUF.
int64_t out_rows(at::TensorList w);

// The values in a row of `row_bytes` bytes of GGUF blocks of type `type`, checked (gguf.cpp).
int64_t gguf_width(int64_t type, int64_t row_bytes);

// GGUF parts as Weights (gguf.cpp); the operands checked by checked_linear.
template <typename T>
Weights<T> gguf_weights(const std::vector<at::Tensor>& w, bool int8_x);

template <typename T>
Weights<T> weights_of(const std::vector<at::Tensor>& w, int64_t gs, bool int8_x = false) {
  if (is_gguf(w)) return gguf_weights<T>(w, int8_x);
  Weights<T> out;
  out.int8_x = int8_x;
  out.w = w[0].const_data_ptr();
  if (w.size() > 1) out.scales = w[1].const_data_ptr<T>();
  if (w.size() > 2) out.zeros = w[2].const_data_ptr<T>(), out.gs = gs;
  out.N = w[0].size(0);
  out.K = w[0].size(1) * (w.size() == 3 ? 2 : 1);
  return out;
}

}  // namespace runner
