// The kernels compiled as one translation unit, as they were written before the split into
// files: the compiler sees every caller and callee at once and inlines across the op families
// (decode_layers into the GEMVs, norms and attention) without link-time optimisation.
#include "gemv.cpp"
#include "gemv_int4.cpp"
#include "linear.cpp"
#include "dequantize.cpp"
#include "gguf.cpp"
#include "elementwise.cpp"
#include "kv_cache.cpp"
#include "attend.cpp"
#include "causal_attention.cpp"
#include "shm_reduce.cpp"
#include "decode_layers.cpp"
#include "ops.cpp"
