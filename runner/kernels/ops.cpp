// runner's CPU kernels for batch-1 decoding: what the profile of a decode step asked for. This
// file registers them as torch ops (torch.ops.runner.*); runner/kernels/__init__.py builds every
// .cpp file here into one library per instruction set.
//
// A decode step reads every weight once and does little else, so its time is the time to stream
// the weights plus the per-op overhead of a few hundred small ops. These kernels stream bf16 and
// fp32 weights at close to the machine's read bandwidth, and decode_layers runs every layer of a
// step in one call and one parallel region. Where each op lives:
//
//   linear.cpp            linear, int8_linear, int4_linear and their *_expert_linear twins, on
//                         Gemv (gemv.h; gemv.cpp for float and int8 weights, gemv_int4.cpp for
//                         int4)
//   dequantize.cpp        dequantize_int8, dequantize_int4: a prompt's weights, for torch's GEMM
//   gguf.cpp              gguf_linear, dequantize_gguf: GGUF's quantized blocks as the file
//                         stores them (gguf.h reads each type's blocks)
//   elementwise.cpp       rms_norm, swiglu
//   kv_cache.cpp          rope_write (a prompt's RoPE and cache write), and the cache checks
//   attend.cpp            attend: a few tokens' RoPE, cache write and attention
//   causal_attention.cpp  causal_attention: a prompt's attention over the cache
//   decode_layers.cpp     decode_layers: every dense layer of a decode step
//   vec.h                 the vector helpers they all share, as wide as the target's registers
//
// attend, rope_write, causal_attention and decode_layers also take an int8 cache: int8 k_cache
// and v_cache with their fp32 scales [B, n_kv_heads, L] (k_scales, v_scales; quant.kv_cache).
//
// Each rounds where the torch reference (runner/model/functional.py) rounds, so bf16 results
// stay within a rounding step of it; tests/kernels compare them.
#include <torch/library.h>

#include <string>

#include "ops.h"

namespace runner {
namespace {

// The target this library was built for (tests/kernels check it is the one asked for).
std::string isa() {
#if defined(__AVX512BF16__)
  return "avx512-bf16";
#elif defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "generic";
#endif
}

}  // namespace
}  // namespace runner

TORCH_LIBRARY(runner, m) {
  m.def("linear(Tensor x, Tensor w) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor w, Tensor scales, bool int8_x=False) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor w, Tensor scales, Tensor zeros, int groupsize, bool int8_x=False) -> Tensor");
  m.def("dequantize_int8(Tensor w, Tensor scales) -> Tensor");
  m.def("dequantize_int4(Tensor w, Tensor scales, Tensor zeros, int groupsize) -> Tensor");
  // blocks: uint8 [N, row_bytes], a GGUF tensor's rows of blocks; type: its GGMLQuantizationType.
  m.def("gguf_linear(Tensor x, Tensor blocks, int type, bool int8_x=False) -> Tensor");
  m.def("dequantize_gguf(Tensor blocks, int type, ScalarType dtype) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("swiglu(Tensor gate_up) -> Tensor");
  // k_scales, v_scales: an int8 cache's (runner.model.llama.KVCache), with int8 k_cache and v_cache.
  m.def("attend(Tensor qkv, Tensor cos_sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor input_pos, "
        "int n_heads, int n_kv_heads, int window=0, Tensor(c!)? k_scales=None, Tensor(d!)? v_scales=None) -> Tensor");
  m.def("rope_write(Tensor qkv, Tensor cos_sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor input_pos, "
        "int n_heads, int n_kv_heads, Tensor(c!)? k_scales=None, Tensor(d!)? v_scales=None) -> Tensor");
  m.def("causal_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor input_pos, int window=0, "
        "Tensor? k_scales=None, Tensor? v_scales=None) -> Tensor");
  m.def("decode_layers(Tensor x, Tensor[] norms, float eps, Tensor[] weights, int[] parts, int[] groupsizes, "
        "Tensor cos_sin, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor(c!)[] k_scales, Tensor(d!)[] v_scales, "
        "Tensor input_pos, int n_heads, int n_kv_heads, int window=0, int[] int8_x=[]) -> Tensor");
  m.def("expert_linear(Tensor x, Tensor w, Tensor ids) -> Tensor");
  m.def("int8_expert_linear(Tensor x, Tensor w, Tensor scales, Tensor ids) -> Tensor");
  m.def("int4_expert_linear(Tensor x, Tensor w, Tensor scales, Tensor zeros, int groupsize, Tensor ids) -> Tensor");
  m.def("isa() -> str", &runner::isa);
}

TORCH_LIBRARY_IMPL(runner, CPU, m) {
  m.impl("linear", &runner::linear);
  m.impl("int8_linear", &runner::int8_linear);
  m.impl("int4_linear", &runner::int4_linear);
  m.impl("dequantize_int8", &runner::dequantize_int8);
  m.impl("dequantize_int4", &runner::dequantize_int4);
  m.impl("gguf_linear", &runner::gguf_linear);
  m.impl("dequantize_gguf", &runner::dequantize_gguf);
  m.impl("rms_norm", &runner::rms_norm);
  m.impl("swiglu", &runner::swiglu);
  m.impl("attend", &runner::attend);
  m.impl("rope_write", &runner::rope_write);
  m.impl("causal_attention", &runner::causal_attention);
  m.impl("decode_layers", &runner::decode_layers);
  m.impl("expert_linear", &runner::expert_linear);
  m.impl("int8_expert_linear", &runner::int8_expert_linear);
  m.impl("int4_expert_linear", &runner::int4_expert_linear);
}
