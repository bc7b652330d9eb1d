// The linear ops: a few rows of x through one linear layer (float, int8 or int4 weights), or each
// row through its own expert of stacked weights, on Gemv.
//
//   linear(x [M, K], w [N, K]) -> [M, N]               fp32 accumulation; M is small (decode, verify)
//   int8_linear(x [M, K], w int8 [N, K], scales [N], int8_x)
//                                                        weight-only int8 (runner.quant.int8's layout);
//                                                        int8_x: x quantized to int8 per block of 32
//                                                        columns, integer dot products
//   int4_linear(x [M, K], w uint8 [N, K/2], scales, zeros [N, K/gs], gs, int8_x)
//                                                        weight-only int4 (runner.quant.int4's layout);
//                                                        int8_x: x quantized to int8 per group, integer
//                                                        dot products (AVX512-VNNI, AVX2's vpmaddubsw)
//   expert_linear, int8_expert_linear, int4_expert_linear (x [M, K], stacked weights [E, N, ...], ids [M])
//                                                        row m through expert ids[m] only
#include <type_traits>

#include "gemv.h"
#include "ops.h"

namespace runner {

bool is_gguf(at::TensorList w) { return w.size() >= 2 && w.back().scalar_type() == at::kLong; }

int64_t out_rows(at::TensorList w) {
  if (!is_gguf(w)) return w[0].size(0);
  int64_t N = 0;
  for (size_t i = 0; i + 1 < w.size(); ++i) N += w[i].size(0);
  return N;
}

namespace {

// GGUF parts {blocks_0, ..., types}: each uint8 [rows, row_bytes] of its type, all K values wide.
std::vector<at::Tensor> checked_gguf(const std::string& name, int64_t K, at::TensorList w) {
  const auto fail = [&](const auto&... what) { TORCH_CHECK(false, "runner::", name, ": ", what...); };
  const int64_t parts = w.size() - 1;
  const at::Tensor& types = w.back();
  if (!(types.dim() == 1 && types.size(0) == parts && types.device().is_cpu()))
    fail("a GGUF linear's types must be a CPU int64 tensor of one type per part, [", parts, "], got ", types.sizes());
  if (parts > kMaxGgufParts) fail("a GGUF linear has at most ", kMaxGgufParts, " parts, got ", parts);
  const auto kinds = types.contiguous();
  std::vector<at::Tensor> out;
  for (int64_t i = 0; i < parts; ++i) {
    if (!(w[i].dim() == 2 && w[i].scalar_type() == at::kByte && w[i].size(0) > 0))
      fail("GGUF part ", i, " must be uint8 [rows, row_bytes], got ", w[i].scalar_type(), " ", w[i].sizes());
    const int64_t width = gguf_width(kinds.const_data_ptr<int64_t>()[i], w[i].size(1));
    if (width != K) fail("GGUF part ", i, " holds rows of ", width, " values for x [..., K], K = ", K);
    out.push_back(w[i].contiguous());
  }
  out.push_back(kinds);
  return out;
}

}  // namespace

std::vector<at::Tensor> checked_linear(const std::string& name, int64_t K, at::ScalarType dtype, at::TensorList w,
                                      int64_t gs) {
  const auto fail = [&](const auto&... what) { TORCH_CHECK(false, "runner::", name, ": ", what...); };
  if (is_gguf(w)) return checked_gguf(name, K, w);
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

namespace {

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

}  // namespace

at::Tensor linear(const at::Tensor& x, const at::Tensor& w) { return linear_of("linear", x, {w}, 0); }

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, bool int8_x) {
  return linear_of("int8_linear", x, {w, scales}, 0, int8_x);
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const at::Tensor& zeros,
                       int64_t groupsize, bool int8_x) {
  return linear_of("int4_linear", x, {w, scales, zeros}, groupsize, int8_x);
}

// --- experts: stacked weights [E, N, ...]; row m of x goes through expert ids[m] only ------------
// Each row runs the plain GEMV on its expert's slice, so the experts no row chose are never read
// and a quantized expert is read once, never dequantized into a copy.

namespace {

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

}  // namespace

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

}  // namespace runner
