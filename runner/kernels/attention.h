// KV caches and a few tokens' attention: what attend.cpp, kv_cache.cpp, causal_attention.cpp and
// decode_layers.cpp share.
//
// A cache is [B, n_kv_heads, L, head_dim] in the model's dtype, or int8 with an fp32 scale per
// position and key head (k_scales, v_scales [B, n_kv_heads, L]; runner.quant.kv_cache).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "vec.h"

namespace runner {

// --- kv_cache.cpp --------------------------------------------------------------------------------

// RoPE on one head (rotate-half pairing), rounding as the reference does in T.
template <typename T>
void rope(const T* in, const float* cos, const float* sin, int64_t hd, T* out);

// A KV cache's rows: in T (k, v), or int8 (kq, vq) with their scales (ks, vs) [B, KVH, L].
template <typename T>
struct CacheRows {
  T* k;
  T* v;
  int8_t* kq;
  int8_t* vq;
  float* ks;
  float* vs;

  // Key k (RoPE'd here; `rotated` holds hd values of scratch) and value v into row `at`.
  void write(int64_t at, const T* k_in, const T* v_in, const float* cos, const float* sin, int64_t hd,
             T* rotated) const;
};

// Whether k_cache and v_cache are an int8 cache: its scales given, each checked to be fp32
// [B, n_kv_heads, L], contiguous.
bool int8_cache(const char* name, const at::Tensor& k_cache, const std::optional<at::Tensor>& k_scales,
                const std::optional<at::Tensor>& v_scales);

// The checks on caches and positions that attend, rope_write and decode_layers share, for B rows
// of `count` tokens in `dtype`; returns the positions as [B, count], each inside the cache.
at::Tensor checked_positions(const char* name, int64_t B, int64_t count, at::ScalarType dtype,
                             const at::Tensor& cos_sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& input_pos, int64_t H, int64_t KVH, bool int8 = false);
// The same for qkv [B, T, (H + 2 KVH) head_dim].
at::Tensor checked_positions(const char* name, const at::Tensor& qkv, const at::Tensor& cos_sin,
                             const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& input_pos,
                             int64_t H, int64_t KVH, bool int8);

// cos_sin with one rotation per position of every row, as the positions have them.
at::Tensor rotations(const at::Tensor& cos_sin, int64_t B, int64_t count, int64_t hd);

// A tensor's data, or nullptr: a float cache's pointers are unset for an int8 one and the other
// way round.
template <typename T>
T* maybe(at::Tensor& t, bool yes) { return yes ? t.mutable_data_ptr<T>() : nullptr; }
inline float* maybe(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

// --- attend.cpp ----------------------------------------------------------------------------------

// A few tokens' attention (decode, verify): B rows of `count` tokens each; row b's token t sits at
// pos[b * count + t] of row b's cache, and cos_sin holds its rotation at the same index. write()
// puts every new key and value into the cache. Then each item, one key head of one token over one
// chunk of kChunk positions, gives each query head of that key head its chunk's maximum score,
// sum of exponentials and weighted sum of values (FlashDecoding's split): the chunk's keys and
// values are read from memory once for the group's heads, and a long cache is shared out evenly
// over the threads. combine() merges a token's chunks per query head.
template <typename T>
struct FewTokens {
  static constexpr int64_t kChunk = 64;  // positions an item covers
  const T* qkv;
  const float* cos_sin;
  T* kc;
  T* vc;
  T* y;
  const int64_t* pos;
  int64_t B, count, H, KVH, hd, L, window;
  float* parts = nullptr;  // partials() floats, set before items run
  // An int8 cache (kc and vc unset): values [B, KVH, L, hd] and their scales [B, KVH, L].
  int8_t* kq = nullptr;
  int8_t* vq = nullptr;
  float* ks = nullptr;
  float* vs = nullptr;

  int64_t tokens() const { return B * count; }
  int64_t longest() const {
    int64_t n = 0;
    for (int64_t i = 0; i < tokens(); ++i) n = std::max(n, window > 0 ? std::min(window, pos[i] + 1) : pos[i] + 1);
    return n;
  }
  int64_t chunks() const { return (longest() + kChunk - 1) / kChunk; }
  int64_t items() const { return tokens() * KVH * chunks(); }
  int64_t heads() const { return tokens() * H; }  // combine()'s items
  int64_t partials() const { return heads() * chunks() * (hd + 2); }
  int64_t width() const { return (H + 2 * KVH) * hd; }

  // Every new key and value goes into the cache first: a query sees those at positions up to its own.
  void write() const;

  // A thread's buffers for items: the rotated queries of the last key head it served (a thread's
  // items run chunk after chunk of one key head), as int8 with their scales for an int8 cache, and
  // a chunk's scores.
  struct Scratch {
    std::vector<T> qh;
    std::vector<float> qf, p, dq;
    std::vector<int8_t> q8;
    std::vector<float*> outs;  // an int8 cache's weighted sums, per query head
    int64_t queries = -1;  // t * KVH + g of those queries
    Scratch(const FewTokens& a)
        : qh(a.H / a.KVH * a.hd), qf(a.H / a.KVH * a.hd), p(a.H / a.KVH * kChunk), dq(a.H / a.KVH),
          q8(a.H / a.KVH * a.hd), outs(a.H / a.KVH) {}
  };

  // Chunk c of token t's visible positions (a sliding window's last `window` of them), for every
  // query head of key head g: into its partial, [maximum, sum of exp(score - maximum), hd sums].
  void item(int64_t item, Scratch& s) const;

  // Query head i (token i / H, head i % H): its chunks' partials merged, rescaled to the largest
  // maximum, into y. (Each chunk's maximum is replaced by its weight on the way.)
  void combine(int64_t i) const;

  // write(), every item, then combine(): the attend op.
  void run();
};

}  // namespace runner
