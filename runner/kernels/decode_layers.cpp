// A decode step's layers in one parallel region:
//
//   decode_layers(x, norms, eps, weights (each linear {w}, {w, scales}, {w, scales, zeros} or GGUF's
//                 {blocks_0, ..., types}), ...)
//                                                        a few tokens (decode, verify)
//                                                        through every dense layer in one call
//   decode_layers.all_reduce(..., segment, rank, world_size)
//                                                        the same on one tensor-parallel rank: wo's
//                                                        and w2's outputs summed over the ranks
//                                                        through shared memory (shm_reduce.cpp)
//   decode_layers.held(x, operands, cos_sin, input_pos)  the same with every other operand in one
//                                                        LayerOperands object, made once (eager steps)
//
// The step is a list of stages (a layer's norm, its linears, its attention, ...), each a number of
// independent work items. Every thread of one parallel region takes the next item from one counter,
// waits until every item of the stages before it is done, and runs it. No thread waits for another
// to arrive: a team of one (a nested region) runs every item itself, and a thread that starts late
// joins wherever the step is. The ops one by one open a parallel region per linear, 120 a step for
// SmolLM2, and leave the other thread idle through each norm, residual and short attention.
//
// Waits spin briefly, then yield the core (wait.h): on a busy machine the thread being waited for
// may be the one that lost its core.
#include <ATen/Parallel.h>
#include <ATen/ops/empty_like.h>
#include <torch/custom_class.h>

#include <array>
#include <atomic>
#include <functional>
#include <optional>
#include <vector>

#include "attention.h"
#include "elementwise.h"
#include "gemv.h"
#include "ops.h"
#include "shm_reduce.h"
#include "wait.h"

namespace runner {
namespace {

// A thread's state in a stage: the input its linear has made ready, attention's buffers.
template <typename T>
struct Scratch {
  std::optional<Gemv<T>> gemv;
  std::optional<typename FewTokens<T>::Scratch> attend;
};

template <typename T>
struct Stage {
  int64_t items;
  std::function<void(Scratch<T>&, int64_t item, bool first)> run;  // first: the thread's first item of the stage
};

template <typename T>
void run_stages(const std::vector<Stage<T>>& stages) {
  std::vector<int64_t> base(stages.size() + 1, 0);  // stage s holds items [base[s], base[s + 1])
  for (size_t s = 0; s < stages.size(); ++s) base[s + 1] = base[s] + stages[s].items;
  const int64_t total = base.back();
  // On cache lines of their own: a thread spinning on `done` must not take `next` from the others.
  alignas(64) std::atomic<int64_t> next{0};
  alignas(64) std::atomic<int64_t> done{0};
  // An item that throws (an all-reduce whose peer died) ends the step: the others stop waiting.
  alignas(64) std::atomic<bool> failed{false};
  std::exception_ptr error;
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    Scratch<T> scratch;
    size_t s = 0, entered = stages.size();
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < total;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      while (base[s + 1] <= i) ++s;
      // Items are taken in order, so done reaching base[s] means every item before stage s is done.
      Backoff backoff;
      while (done.load(std::memory_order_acquire) < base[s] && !failed.load(std::memory_order_relaxed)) backoff();
      if (failed.load(std::memory_order_acquire)) return;
      try {
        stages[s].run(scratch, i - base[s], entered != s);
      } catch (...) {
        if (!failed.exchange(true)) error = std::current_exception();
        return;
      }
      entered = s;
      done.fetch_add(1, std::memory_order_release);
    }
  });
  if (error) std::rethrow_exception(error);
}

// A dense layer's operands.
template <typename T>
struct Layer {
  const T* attention_norm;
  const T* ffn_norm;
  Weights<T> wqkv, wo, w13, w2;
  T* k_cache;  // or, for an int8 cache, these four
  T* v_cache;
  int8_t* kq;
  int8_t* vq;
  float* ks;
  float* vs;
};

// x [M, D] through every layer into y [M, D]; `tokens` (its qkv, y, caches unset) says where the
// M = B * count tokens sit; `shared`, if not null, sums wo's and w2's outputs over the ranks. The
// same kernels in the same order as the ops one by one: bit for bit the same result.
template <typename T>
void decode_layers_impl(const T* x, T* y, const std::vector<Layer<T>>& layers, float eps, FewTokens<T> tokens,
                        int64_t D, int64_t I, const Segment* shared) {
  const int64_t M = tokens.B * tokens.count;
  std::vector<T> buffers(M * (5 * D + tokens.width() + tokens.H * tokens.hd + 3 * I));
  std::vector<float> partials(tokens.partials());  // attention's, for each layer in turn
  float* parts = partials.data();
  T* xn = buffers.data();  // a norm's output, each linear's input but wo's and w2's
  T* o = xn + M * D;       // wo's output
  T* h = o + M * D;        // the residual stream after attention
  T* d = h + M * D;        // w2's output
  T* qkv = d + M * D;
  T* att = qkv + M * tokens.width();
  T* gu = att + M * tokens.H * tokens.hd;
  T* act = gu + M * 2 * I;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  std::vector<Stage<T>> stages;
  const auto single = [&](auto f) { stages.push_back({1, [f](Scratch<T>&, int64_t, bool) { f(); }}); };
  const auto linear = [&](const Weights<T>& w, const T* in, T* out) {
    // One run of rows a thread, whole blocks of kRows: taken by whoever is free. Each item costs
    // its counters' cache lines crossing between the cores, so the runs are as long as they can be.
    const int64_t run = std::max<int64_t>(16, ((w.N + threads - 1) / threads + kRows - 1) / kRows * kRows);
    stages.push_back({(w.N + run - 1) / run, [&w, in, out, M, run](Scratch<T>& s, int64_t item, bool first) {
                        if (first) s.gemv.emplace(w, in, M);
                        s.gemv->rows(item * run, std::min(w.N, (item + 1) * run), out);
                      }});
  };
  const auto norm = [=](const T* in, const T* weight) {
    for (int64_t m = 0; m < M; ++m) rms_norm_row(in + m * D, weight, xn + m * D, D, eps);
  };
  for (size_t l = 0; l < layers.size(); ++l) {
    const Layer<T>& layer = layers[l];
    const T* stream = l == 0 ? x : y;  // the residual stream
    if (l == 0) single([=] { norm(x, layer.attention_norm); });
    linear(layer.wqkv, xn, qkv);
    FewTokens<T> attention = tokens;
    attention.qkv = qkv, attention.y = att, attention.kc = layer.k_cache, attention.vc = layer.v_cache;
    attention.kq = layer.kq, attention.vq = layer.vq, attention.ks = layer.ks, attention.vs = layer.vs;
    attention.parts = parts;
    single([=] { attention.write(); });
    const int64_t run = (attention.items() + threads - 1) / threads;  // a run of (token, key head, chunk) items a thread
    const auto attend = [attention, run](Scratch<T>& s, int64_t item, bool first) {
      if (first) s.attend.emplace(attention);
      const int64_t end = std::min(attention.items(), (item + 1) * run);
      for (int64_t i = item * run; i < end; ++i) attention.item(i, *s.attend);
    };
    stages.push_back({(attention.items() + run - 1) / run, attend});
    const int64_t merged = (attention.heads() + threads - 1) / threads;  // a run of query heads a thread
    stages.push_back({(attention.heads() + merged - 1) / merged, [attention, merged](Scratch<T>&, int64_t item, bool) {
                        const int64_t end = std::min(attention.heads(), (item + 1) * merged);
                        for (int64_t i = item * merged; i < end; ++i) attention.combine(i);
                      }});
    linear(layer.wo, att, o);
    single([=] {
      if (shared != nullptr) shared->all_reduce(o, o, M * D);
      for (int64_t i = 0; i < M * D; ++i) h[i] = static_cast<T>(widen(stream[i]) + widen(o[i]));
      norm(h, layer.ffn_norm);
    });
    linear(layer.w13, xn, gu);
    // A span of columns a thread, a multiple of kLanes.
    const int64_t span = ((I + threads - 1) / threads + kLanes - 1) / kLanes * kLanes, spans = (I + span - 1) / span;
    stages.push_back({M * spans, [=](Scratch<T>&, int64_t item, bool) {
                        const int64_t m = item / spans, j0 = item % spans * span;
                        swiglu_span(gu + m * 2 * I, gu + m * 2 * I + I, act + m * I, I, j0, std::min(I, j0 + span));
                      }});
    linear(layer.w2, act, d);
    const T* next_norm = l + 1 < layers.size() ? layers[l + 1].attention_norm : nullptr;
    single([=] {
      if (shared != nullptr) shared->all_reduce(d, d, M * D);
      for (int64_t i = 0; i < M * D; ++i) y[i] = static_cast<T>(widen(h[i]) + widen(d[i]));
      if (next_norm != nullptr) norm(y, next_norm);
    });
  }
  run_stages(stages);
}

}  // namespace

// Dense layers for a few tokens (decode, verify) in one call: one parallel region for them all.
// norms: each layer's attention and ffn norm; weights: each layer's wqkv, wo, w13 and w2 operands
// one after another, parts[i] tensors for linear i ({w}, {w, scales}, {w, scales, zeros}, or GGUF
// parts and their types).
// segment: a tensor-parallel rank's shared memory (shm_reduce.cpp), or none.
at::Tensor decode_layers_all_reduce(const at::Tensor& x, at::TensorList norms, double eps, at::TensorList weights,
                                    at::IntArrayRef parts, at::IntArrayRef groupsizes, const at::Tensor& cos_sin,
                                    at::TensorList k_caches, at::TensorList v_caches, at::TensorList k_scales,
                                    at::TensorList v_scales, const at::Tensor& input_pos, int64_t n_heads,
                                    int64_t n_kv_heads, int64_t window, at::IntArrayRef int8_x,
                                    const std::optional<at::Tensor>& segment, int64_t rank, int64_t world_size) {
  const char* name = "decode_layers";
  std::optional<Segment> shared;
  if (segment.has_value()) shared.emplace(*segment, rank, world_size, name);
  check_cpu_float(x, name);
  TORCH_CHECK(window >= 0, "runner::decode_layers: window must be >= 0 (0: none), got ", window);
  TORCH_CHECK(x.dim() == 3, "runner::decode_layers: x must be [B, T, dim], got ", x.sizes());
  const int64_t n = k_caches.size(), B = x.size(0), count = x.size(1), D = x.size(2);
  TORCH_CHECK(n > 0 && v_caches.size() == n && norms.size() == 2 * n && parts.size() == 4 * n &&
                  groupsizes.size() == 4 * n,
              "runner::decode_layers: per layer, two norms, a k and a v cache, and four linears' parts and groupsizes");
  TORCH_CHECK(int8_x.empty() || int8_x.size() == 4 * n,
              "runner::decode_layers: int8_x must be empty or one flag for each of the ", 4 * n, " linears");
  int64_t total = 0;
  for (const int64_t p : parts) total += p;
  TORCH_CHECK(total == (int64_t)weights.size(), "runner::decode_layers: parts add up to ", total, ", not to the ",
              weights.size(), " weight tensors");
  const int64_t H = n_heads, KVH = n_kv_heads;
  TORCH_CHECK((k_scales.empty() && v_scales.empty()) || (k_scales.size() == n && v_scales.size() == n),
              "runner::decode_layers: k_scales and v_scales are empty, or one each for every layer's int8 cache");
  const bool int8 = !k_scales.empty();
  const auto positions = checked_positions(name, B, count, x.scalar_type(), cos_sin, k_caches[0], v_caches[0],
                                           input_pos, H, KVH, int8);
  for (int64_t l = 0; l < n; ++l) {
    TORCH_CHECK(k_caches[l].sizes() == k_caches[0].sizes() && v_caches[l].sizes() == k_caches[0].sizes() &&
                    k_caches[l].is_contiguous() && v_caches[l].is_contiguous() &&
                    k_caches[l].scalar_type() == k_caches[0].scalar_type() &&
                    v_caches[l].scalar_type() == k_caches[0].scalar_type(),
                "runner::decode_layers: every layer's caches must be contiguous and shaped as the first's, ",
                k_caches[0].sizes(), ", in x's dtype (int8 with scales)");
    if (int8) int8_cache(name, k_caches[l], k_scales[l], v_scales[l]);
  }
  const int64_t L = k_caches[0].size(2), hd = k_caches[0].size(3);
  for (const auto& norm : norms)
    TORCH_CHECK(norm.dim() == 1 && norm.size(0) == D && norm.scalar_type() == x.scalar_type(),
                "runner::decode_layers: norms must be [", D, "] in x's dtype");
  // Every linear checked against its input's width: wqkv and w13 take dim, wo H * hd, w2 I.
  std::vector<std::vector<at::Tensor>> linears;
  int64_t offset = 0, I = 0;
  for (int64_t i = 0; i < 4 * n; ++i) {
    const at::TensorList w = weights.slice(offset, parts[i]);
    offset += parts[i];
    const int64_t K = i % 4 == 1 ? H * hd : i % 4 == 3 ? I : D;
    TORCH_CHECK(!w.empty(), "runner::decode_layers: linear ", i, " has no tensors");
    linears.push_back(checked_linear(name, K, x.scalar_type(), w, groupsizes[i]));
    TORCH_CHECK(int8_x.empty() || !int8_x[i] || w.size() == 3 || is_gguf(w), "runner::decode_layers: linear ", i,
                " has int8_x set, which applies to int4 linears ({w, scales, zeros}) and GGUF parts only");
    const int64_t N = out_rows(w);
    if (i % 4 == 2) I = N / 2;
    const int64_t want = i % 4 == 0 ? (H + 2 * KVH) * hd : i % 4 == 2 ? 2 * I : D;
    TORCH_CHECK(N == want && (i % 4 != 2 || N % 2 == 0), "runner::decode_layers: linear ", i, " (",
                std::array<const char*, 4>{"wqkv", "wo", "w13", "w2"}[i % 4], " of layer ", i / 4, ") has ", N,
                " outputs, not ", want);
  }
  auto xc = x.contiguous();
  auto cs = rotations(cos_sin, B, count, hd);
  auto y = at::empty_like(xc);
  const auto run = [&](auto zero) {
    using T = decltype(zero);
    std::vector<Layer<T>> layers;
    for (int64_t l = 0; l < n; ++l) {
      Layer<T> layer{norms[2 * l].const_data_ptr<T>(), norms[2 * l + 1].const_data_ptr<T>()};
      Weights<T>* parts_of[4] = {&layer.wqkv, &layer.wo, &layer.w13, &layer.w2};
      for (int i = 0; i < 4; ++i)
        *parts_of[i] = weights_of<T>(linears[4 * l + i], groupsizes[4 * l + i], !int8_x.empty() && int8_x[4 * l + i]);
      at::Tensor k = k_caches[l], v = v_caches[l];
      layer.k_cache = maybe<T>(k, !int8), layer.v_cache = maybe<T>(v, !int8);
      layer.kq = maybe<int8_t>(k, int8), layer.vq = maybe<int8_t>(v, int8);
      layer.ks = int8 ? k_scales[l].data_ptr<float>() : nullptr, layer.vs = int8 ? v_scales[l].data_ptr<float>() : nullptr;
      layers.push_back(layer);
    }
    FewTokens<T> tokens{nullptr, cs.const_data_ptr<float>(), nullptr, nullptr, nullptr,
                        positions.const_data_ptr<int64_t>(), B, count, H, KVH, hd, L, window};
    decode_layers_impl(xc.const_data_ptr<T>(), y.mutable_data_ptr<T>(), layers, (float)eps, tokens, D, I,
                       shared ? &*shared : nullptr);
  };
  if (x.scalar_type() == at::kBFloat16)
    run(BFloat16());
  else
    run(0.f);
  return y;
}

at::Tensor decode_layers(const at::Tensor& x, at::TensorList norms, double eps, at::TensorList weights,
                         at::IntArrayRef parts, at::IntArrayRef groupsizes, const at::Tensor& cos_sin,
                         at::TensorList k_caches, at::TensorList v_caches, at::TensorList k_scales,
                         at::TensorList v_scales, const at::Tensor& input_pos, int64_t n_heads, int64_t n_kv_heads,
                         int64_t window, at::IntArrayRef int8_x) {
  return decode_layers_all_reduce(x, norms, eps, weights, parts, groupsizes, cos_sin, k_caches, v_caches, k_scales,
                                  v_scales, input_pos, n_heads, n_kv_heads, window, int8_x, std::nullopt, 0, 1);
}

// decode_layers' operands that stay the same from one step to the next (every tensor but x,
// cos_sin and input_pos), held by a torch object made once: a step then passes four arguments
// where it passed several hundred tensors, each converted from Python on every call.
struct LayerOperands : torch::CustomClassHolder {
  std::vector<at::Tensor> norms, weights, k_caches, v_caches, k_scales, v_scales;
  std::vector<int64_t> parts, groupsizes, int8_x;
  double eps;
  int64_t n_heads, n_kv_heads, window;

  LayerOperands(std::vector<at::Tensor> norms, double eps, std::vector<at::Tensor> weights, std::vector<int64_t> parts,
                std::vector<int64_t> groupsizes, std::vector<at::Tensor> k_caches, std::vector<at::Tensor> v_caches,
                std::vector<at::Tensor> k_scales, std::vector<at::Tensor> v_scales, int64_t n_heads,
                int64_t n_kv_heads, int64_t window, std::vector<int64_t> int8_x)
      : norms(std::move(norms)), weights(std::move(weights)), k_caches(std::move(k_caches)),
        v_caches(std::move(v_caches)), k_scales(std::move(k_scales)), v_scales(std::move(v_scales)),
        parts(std::move(parts)), groupsizes(std::move(groupsizes)), int8_x(std::move(int8_x)), eps(eps),
        n_heads(n_heads), n_kv_heads(n_kv_heads), window(window) {}
};

at::Tensor decode_layers_held(const at::Tensor& x, const c10::intrusive_ptr<LayerOperands>& held,
                              const at::Tensor& cos_sin, const at::Tensor& input_pos) {
  const LayerOperands& o = *held;
  return decode_layers(x, o.norms, o.eps, o.weights, o.parts, o.groupsizes, cos_sin, o.k_caches, o.v_caches,
                       o.k_scales, o.v_scales, input_pos, o.n_heads, o.n_kv_heads, o.window, o.int8_x);
}

}  // namespace runner

// ops.cpp defines decode_layers; the overloads with a segment and with held operands are this file's own.
TORCH_LIBRARY_FRAGMENT(runner, m) {
  m.class_<runner::LayerOperands>("LayerOperands")
      .def(torch::init<std::vector<at::Tensor>, double, std::vector<at::Tensor>, std::vector<int64_t>,
                       std::vector<int64_t>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<at::Tensor>, std::vector<at::Tensor>, int64_t, int64_t, int64_t,
                       std::vector<int64_t>>());
  m.def("decode_layers.held(Tensor x, __torch__.torch.classes.runner.LayerOperands operands, Tensor cos_sin, "
        "Tensor input_pos) -> Tensor");
  m.def("decode_layers.all_reduce(Tensor x, Tensor[] norms, float eps, Tensor[] weights, int[] parts, "
        "int[] groupsizes, Tensor cos_sin, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor(c!)[] k_scales, "
        "Tensor(d!)[] v_scales, Tensor input_pos, int n_heads, int n_kv_heads, int window, int[] int8_x, "
        "Tensor? segment, int rank, int world_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(runner, CPU, m) {
  m.impl("decode_layers.all_reduce", &runner::decode_layers_all_reduce);
  m.impl("decode_layers.held", &runner::decode_layers_held);
}
