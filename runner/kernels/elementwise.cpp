// Row-wise ops, rounding where the torch reference rounds:
//
//   rms_norm(x [..., D], w [D], eps) -> [..., D]
//   swiglu(gate_up [..., 2I]) -> [..., I]              silu(gate) * up
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>

#include "elementwise.h"
#include "ops.h"
#include "vec.h"

namespace runner {

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

namespace {

// Rows per thread for row-wise ops: a decode step's few rows stay on the calling thread (a parallel
// region costs more than they do); a prompt's hundreds are shared out.
inline int64_t grain_rows(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)); }

template <typename T>
void rms_norm_impl(const T* x, const T* w, T* y, int64_t rows, int64_t D, float eps) {
  at::parallel_for(0, rows, grain_rows(D), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) rms_norm_row(x + i * D, w, y + i * D, D, eps);
  });
}

template <typename T>
void swiglu_impl(const T* gu, T* y, int64_t rows, int64_t I) {
  at::parallel_for(0, rows, grain_rows(I), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) swiglu_span(gu + i * 2 * I, gu + i * 2 * I + I, y + i * I, I, 0, I);
  });
}

}  // namespace

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

template void rms_norm_row(const float*, const float*, float*, int64_t, float);
template void rms_norm_row(const BFloat16*, const BFloat16*, BFloat16*, int64_t, float);
template void swiglu_span(const float*, const float*, float*, int64_t, int64_t, int64_t);
template void swiglu_span(const BFloat16*, const BFloat16*, BFloat16*, int64_t, int64_t, int64_t);

}  // namespace runner
