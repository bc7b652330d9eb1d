// The row kernels of rms_norm and swiglu (elementwise.cpp), which decode_layers runs too.
#pragma once

#include <cstdint>

namespace runner {

// One row: x / rms(x), rounded to T, times w.
template <typename T>
void rms_norm_row(const T* xi, const T* w, T* yi, int64_t D, float eps);

// Columns [j0, j1) of one row: silu(gate) * up, gate and up each I wide. j0 is a multiple of
// kLanes, so every column takes the same path (vector or tail) whatever the span.
template <typename T>
void swiglu_span(const T* g, const T* u, T* y, int64_t I, int64_t j0, int64_t j1);

}  // namespace runner
