// A prompt's attention: causal (sliding-window) GQA over the cache, a block at a time.
//
//   causal_attention(q [1, H, T, hd], k_cache, v_cache, pos [T], window) -> [1, T, H * hd]
//                                                        over a float cache, or an int8 one read as
//                                                        the reference reads it
#include <ATen/Parallel.h>

#include <atomic>
#include <utility>

#include "attention.h"
#include "ops.h"

namespace runner {
namespace {

// FlashAttention's online softmax, on the CPU: a block of kQueryBlock queries against kKeyBlock
// keys at a time. Each key head's keys and values are first widened to fp32 once (keys
// transposed, a block at a time) and shared by every query of its heads; R rows' scores stay in
// registers while the head dimension is summed, and R rows' outputs while the values are.
constexpr int64_t kQueryBlock = 64;
constexpr int64_t kKeyBlock = 64;
// Sums a tile keeps in registers: 4 rows x 4 vectors of AVX-512's 32 registers, 6 x 2 of AVX2's
// 16 (with 4 x 2 there the loads and broadcasts, not the multiply-adds, would be the bound).
constexpr int kScoreRows = kLanes >= 16 ? 4 : 6;
constexpr int kScoreVectors = kLanes >= 16 ? 4 : 2;
constexpr int64_t kQueryRows = (kQueryBlock + kScoreRows - 1) / kScoreRows * kScoreRows;  // whole tiles

// Online softmax over one key block's scores s [kQueryRows][kKeyBlock] (keys j0.. from base, nk
// of them in the cache): masked scores become 0, the others exp(score - the row's running
// maximum), and each row's total and output are rescaled as its maximum grows.
void softmax_block(float* s, const int64_t* pos, int64_t n, int64_t hd, int64_t base, int64_t j0, int64_t nk,
                   int64_t window, float* o, float* top, float* total) {
  for (int64_t r = 0; r < n; ++r) {
    float* sr = s + r * kKeyBlock;
    const int64_t p = pos[r] - base, lo = window > 0 ? p + 1 - window : -1;
    // Only a block on the diagonal (or the window's edge) has keys this row must not see.
    if (j0 + kKeyBlock - 1 > p || j0 <= lo)
      for (int64_t j = 0; j < kKeyBlock; ++j)
        if (j0 + j > p || j0 + j < std::max<int64_t>(lo, 0) || j >= nk) sr[j] = -INFINITY;
    vf mv = vload(sr);
    for (int64_t j = kLanes; j < kKeyBlock; j += kLanes) {
      const vf x = vload(sr + j);
      mv = x > mv ? x : mv;
    }
    float m = -INFINITY;
    for (int i = 0; i < kLanes; ++i) m = std::max(m, mv[i]);
    if (m == -INFINITY) {  // none of this block's keys is visible to this row
      std::fill(sr, sr + kKeyBlock, 0.f);
      continue;
    }
    const float grown = std::max(top[r], m), shrink = std::exp(top[r] - grown);
    top[r] = grown;
    vf sums{};
    for (int64_t j = 0; j < kKeyBlock; j += kLanes) {
      const vf x = vload(sr + j);
      const vf kept = x == -INFINITY ? vf{} : vexp(x - grown);  // exactly 0 where masked
      vstore(sr + j, kept);
      sums += kept;
    }
    total[r] = total[r] * shrink + hsum(sums);
    if (shrink != 1.f)
      for (int64_t d = 0; d < hd; ++d) o[r * hd + d] *= shrink;
  }
}

// A query block's start: the outputs, maxima and totals reset, and the first key block any of
// its n rows sees, with the last key (indices from base).
std::pair<int64_t, int64_t> start_block(const int64_t* pos, int64_t n, int64_t base, int64_t keys, int64_t window,
                                        int64_t hd, float* o, float* top, float* total) {
  int64_t first = keys, last = -1;
  for (int64_t r = 0; r < n; ++r) {
    first = std::min(first, (window > 0 ? std::max<int64_t>(0, pos[r] + 1 - window) : 0) - base);
    last = std::max(last, pos[r] - base);
  }
  std::fill(o, o + kQueryRows * hd, 0.f);
  std::fill(top, top + kQueryRows, -INFINITY);
  std::fill(total, total + kQueryRows, 0.f);
  return {first / kKeyBlock * kKeyBlock, last};
}

// One query block of one head: rows [i0, i0 + n), their queries qf (scaled fp32, kQueryRows rows
// with zeros past n), over key blocks starting at `base` (kt: [block][hd][kKeyBlock], vals:
// [key - base][hd]); o gets the rows' outputs, unnormalised, and total their softmax sums.
void attend_block(const float* qf, const float* kt, const float* vals, const int64_t* pos, int64_t n, int64_t hd,
                  int64_t base, int64_t keys, int64_t window, float* s, float* o, float* top, float* total) {
  const auto [start, last] = start_block(pos, n, base, keys, window, hd, o, top, total);
  for (int64_t j0 = start; j0 <= last; j0 += kKeyBlock) {
    const int64_t nk = std::min(kKeyBlock, keys - j0);
    const float* kb = kt + j0 * hd;  // this block's [hd][kKeyBlock]
    // Scores: R rows x kScoreVectors vectors of keys in registers, summed over the head dimension.
    for (int64_t r = 0; r < n; r += kScoreRows)
      for (int64_t c0 = 0; c0 < kKeyBlock; c0 += kScoreVectors * kLanes) {
        vf a[kScoreRows][kScoreVectors] = {};
        for (int64_t d = 0; d < hd; ++d) {
          const float* k = kb + d * kKeyBlock + c0;
          vf kv[kScoreVectors];
          for (int c = 0; c < kScoreVectors; ++c) kv[c] = vload(k + c * kLanes);
          for (int rr = 0; rr < kScoreRows; ++rr) {
            const float x = qf[(r + rr) * hd + d];
            for (int c = 0; c < kScoreVectors; ++c) a[rr][c] += x * kv[c];
          }
        }
        for (int rr = 0; rr < kScoreRows; ++rr)
          for (int c = 0; c < kScoreVectors; ++c) vstore(s + (r + rr) * kKeyBlock + c0 + c * kLanes, a[rr][c]);
      }
    softmax_block(s, pos, n, hd, base, j0, nk, window, o, top, total);
    // The weighted sum of values: R rows' outputs, two vectors of dimensions at a time, in registers.
    const float* vb = vals + j0 * hd;
    for (int64_t r = 0; r < n; r += kScoreRows) {
      int64_t d = 0;
      for (; d < hd / kLanes * kLanes; d += 2 * kLanes) {
        const int parts = d + 2 * kLanes <= hd ? 2 : 1;
        vf a[kScoreRows][2] = {};
        for (int rr = 0; rr < kScoreRows; ++rr)
          for (int c = 0; c < parts; ++c) a[rr][c] = vload(o + (r + rr) * hd + d + c * kLanes);
        for (int64_t j = 0; j < nk; ++j) {
          const vf v0 = vload(vb + j * hd + d), v1 = parts == 2 ? vload(vb + j * hd + d + kLanes) : vf{};
          for (int rr = 0; rr < kScoreRows; ++rr) {
            const float p = s[(r + rr) * kKeyBlock + j];
            a[rr][0] += p * v0;
            a[rr][1] += p * v1;
          }
        }
        for (int rr = 0; rr < kScoreRows; ++rr)
          for (int c = 0; c < parts; ++c) vstore(o + (r + rr) * hd + d + c * kLanes, a[rr][c]);
      }
      for (d = hd / kLanes * kLanes; d < hd; ++d)
        for (int rr = 0; rr < kScoreRows; ++rr) {
          float a = o[(r + rr) * hd + d];
          for (int64_t j = 0; j < nk; ++j) a += s[(r + rr) * kKeyBlock + j] * vb[j * hd + d];
          o[(r + rr) * hd + d] = a;
        }
    }
  }
}

#if defined(__AVX512BF16__)
// attend_block for bf16 with vdpbf16ps, twice as many products an instruction: the keys as fp32
// words of two neighbouring dimensions (kp: [block][hd / 2][kKeyBlock]), the values as words of
// two neighbouring keys (vp: [block][kKeyBlock / 2][hd]), the queries as words of two dimensions
// (qp: [kQueryBlock][hd / 2], zeros past n), and each row's softmax weights rounded to bf16 pairs
// (p2: [kQueryBlock][kKeyBlock / 2]), as torch's bf16 flash attention rounds them.
void attend_block_bf16(const uint32_t* qp, const uint32_t* kp, const uint32_t* vp, const int64_t* pos, int64_t n,
                       int64_t hd, int64_t base, int64_t keys, int64_t window, float scale, float* s, uint32_t* p2,
                       float* o, float* top, float* total) {
  static_assert(kKeyBlock == 64 && kScoreRows == 4, "the bf16 block is 4 x 64 scores");
  const int64_t pairs = hd / 2;
  const auto [start, last] = start_block(pos, n, base, keys, window, hd, o, top, total);
  const __m512 scaled = _mm512_set1_ps(scale);
  for (int64_t j0 = start; j0 <= last; j0 += kKeyBlock) {
    const int64_t nk = std::min(kKeyBlock, keys - j0);
    const uint32_t* kb = kp + j0 * pairs;
    for (int64_t r = 0; r < n; r += 4) {
      __m512 a[4][4];
      for (int rr = 0; rr < 4; ++rr)
        for (int c = 0; c < 4; ++c) a[rr][c] = _mm512_setzero_ps();
      for (int64_t dp = 0; dp < pairs; ++dp) {
        const uint32_t* k = kb + dp * kKeyBlock;
        const __m512bh k0 = (__m512bh)_mm512_loadu_si512(k), k1 = (__m512bh)_mm512_loadu_si512(k + 16),
                       k2 = (__m512bh)_mm512_loadu_si512(k + 32), k3 = (__m512bh)_mm512_loadu_si512(k + 48);
        for (int rr = 0; rr < 4; ++rr) {
          const __m512bh x = (__m512bh)_mm512_set1_epi32((int)qp[(r + rr) * pairs + dp]);
          a[rr][0] = _mm512_dpbf16_ps(a[rr][0], x, k0);
          a[rr][1] = _mm512_dpbf16_ps(a[rr][1], x, k1);
          a[rr][2] = _mm512_dpbf16_ps(a[rr][2], x, k2);
          a[rr][3] = _mm512_dpbf16_ps(a[rr][3], x, k3);
        }
      }
      for (int rr = 0; rr < 4; ++rr)
        for (int c = 0; c < 4; ++c) _mm512_storeu_ps(s + (r + rr) * kKeyBlock + c * 16, _mm512_mul_ps(a[rr][c], scaled));
    }
    softmax_block(s, pos, n, hd, base, j0, nk, window, o, top, total);
    for (int64_t r = 0; r < n; ++r)
      for (int c = 0; c < 2; ++c) {
        const float* sr = s + r * kKeyBlock + 32 * c;
        _mm512_storeu_si512(p2 + r * 32 + 16 * c,
                            (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(sr + 16), _mm512_loadu_ps(sr)));
      }
    const uint32_t* vb = vp + j0 / 2 * hd;
    const int64_t kpairs = (nk + 1) / 2;
    for (int64_t r = 0; r < n; r += 4)
      for (int64_t d = 0; d < hd; d += 16) {
        __m512 a[4];
        for (int rr = 0; rr < 4; ++rr) a[rr] = _mm512_loadu_ps(o + (r + rr) * hd + d);
        for (int64_t jp = 0; jp < kpairs; ++jp) {
          const __m512bh v = (__m512bh)_mm512_loadu_si512(vb + jp * hd + d);
          for (int rr = 0; rr < 4; ++rr)
            a[rr] = _mm512_dpbf16_ps(a[rr], (__m512bh)_mm512_set1_epi32((int)p2[(r + rr) * 32 + jp]), v);
        }
        for (int rr = 0; rr < 4; ++rr) _mm512_storeu_ps(o + (r + rr) * hd + d, a[rr]);
      }
  }
}
#endif

template <typename T>
void causal_attention_impl(const T* q, const T* kc, const T* vc, T* y, const int64_t* pos, int64_t H, int64_t KVH,
                           int64_t count, int64_t hd, int64_t L, int64_t window) {
  const int64_t group = H / KVH, blocks = (count + kQueryBlock - 1) / kQueryBlock, pairs = hd / 2;
  const float scale = 1.f / std::sqrt((float)hd);
  bool packed = false;  // bf16 pairs for vdpbf16ps, else fp32
#if defined(__AVX512BF16__)
  packed = std::is_same_v<T, BFloat16> && hd % 16 == 0;
#endif
  // The keys any query sees: [base, base + keys).
  int64_t base = L, end = 0;
  for (int64_t i = 0; i < count; ++i) {
    base = std::min(base, window > 0 ? std::max<int64_t>(0, pos[i] + 1 - window) : 0);
    end = std::max(end, pos[i] + 1);
  }
  const int64_t keys = end - base, key_blocks = (keys + kKeyBlock - 1) / kKeyBlock;
  // One key head's keys and values at a time, widened or paired (zeros past the last key).
  std::vector<float> kt(packed ? 0 : key_blocks * kKeyBlock * hd), vals(packed ? 0 : key_blocks * kKeyBlock * hd);
  std::vector<uint32_t> kp(packed ? key_blocks * kKeyBlock * pairs : 0), vp(packed ? key_blocks * kKeyBlock * pairs : 0);
  const int threads = at::get_num_threads();
  for (int64_t g = 0; g < KVH; ++g) {
    const T* kh = kc + (g * L + base) * hd;
    const T* vh = vc + (g * L + base) * hd;
    at::parallel_for(0, key_blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t j = b * kKeyBlock; j < (b + 1) * kKeyBlock; ++j) {
          const bool in = j < keys;
          if (packed) {
            const uint16_t* kw = (const uint16_t*)(kh + j * hd);
            const uint16_t* vw = (const uint16_t*)(vh + j * hd);
            for (int64_t dp = 0; dp < pairs; ++dp)
              kp[(b * pairs + dp) * kKeyBlock + j % kKeyBlock] = in ? kw[2 * dp] | (uint32_t)kw[2 * dp + 1] << 16 : 0;
            // word (j / 2, d) holds key j's value in its low half when j is even, else its high half
            for (int64_t d = 0; d < hd; ++d) {
              uint32_t& word = vp[(j / 2) * hd + d];
              const uint32_t bits = in ? vw[d] : 0;
              word = j % 2 ? (word & 0xFFFFu) | bits << 16 : bits;
            }
          } else {
            for (int64_t d = 0; d < hd; ++d) {
              kt[(b * hd + d) * kKeyBlock + j % kKeyBlock] = in ? widen(kh[j * hd + d]) : 0.f;
              vals[j * hd + d] = in ? widen(vh[j * hd + d]) : 0.f;
            }
          }
        }
    });
    // The group's heads' query blocks, each taken by the next free thread, the last blocks (which
    // see the most keys) first: dealt in turn, the threads' shares of the work would be uneven.
    const int64_t items = group * blocks;
    std::atomic<int64_t> next{0};
    at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
      std::vector<float> qf(packed ? 0 : kQueryRows * hd), s(kQueryRows * kKeyBlock), o(kQueryRows * hd),
          top(kQueryRows), total(kQueryRows);
      std::vector<uint32_t> qp(packed ? kQueryBlock * pairs : 0), p2(packed ? kQueryBlock * kKeyBlock / 2 : 0);
      for (int64_t item = next++; item < items; item = next++) {
        const int64_t h = g * group + item % group, i0 = (blocks - 1 - item / group) * kQueryBlock;
        const int64_t n = std::min(kQueryBlock, count - i0);
        const T* qh = q + (h * count + i0) * hd;
        if (packed) {
#if defined(__AVX512BF16__)
          std::fill(qp.begin(), qp.end(), 0u);
          std::memcpy(qp.data(), qh, n * hd * sizeof(T));
          attend_block_bf16(qp.data(), kp.data(), vp.data(), pos + i0, n, hd, base, keys, window, scale, s.data(),
                            p2.data(), o.data(), top.data(), total.data());
#endif
        } else {
          std::fill(qf.begin(), qf.end(), 0.f);
          for (int64_t r = 0; r < n; ++r)
            for (int64_t d = 0; d < hd; ++d) qf[r * hd + d] = widen(qh[r * hd + d]) * scale;
          attend_block(qf.data(), kt.data(), vals.data(), pos + i0, n, hd, base, keys, window, s.data(), o.data(),
                       top.data(), total.data());
        }
        for (int64_t r = 0; r < n; ++r) {
          T* out = y + ((i0 + r) * H + h) * hd;
          for (int64_t d = 0; d < hd; ++d) out[d] = static_cast<T>(o[r * hd + d] / total[r]);
        }
      }
    });
  }
}

// An int8 cache's first n positions [KVH, n, hd] as T, and rows of q put on int8's grid (each
// rounded to int8 with its own scale and back): as the reference reads an int8 cache.
template <typename T>
void dequantize_cache(const int8_t* c, const float* scales, int64_t KVH, int64_t L, int64_t n, int64_t hd, T* out) {
  at::parallel_for(0, KVH * n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t at = i / n * L + i % n;
      for (int64_t d = 0; d < hd; ++d) out[i * hd + d] = static_cast<T>((float)c[at * hd + d] * scales[at]);
    }
  });
}

template <typename T>
void int8_grid(T* x, int64_t rows, int64_t hd) {
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> q(hd);
    for (int64_t r = begin; r < end; ++r) {
      const float d = quantize_row(x + r * hd, hd, q.data());
      for (int64_t i = 0; i < hd; ++i) x[r * hd + i] = static_cast<T>((float)q[i] * d);
    }
  });
}

}  // namespace

at::Tensor causal_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& input_pos, int64_t window, const std::optional<at::Tensor>& k_scales,
                            const std::optional<at::Tensor>& v_scales) {
  check_cpu_float(q, "causal_attention");
  const bool int8 = int8_cache("causal_attention", k_cache, k_scales, v_scales);
  TORCH_CHECK(window >= 0, "runner::causal_attention: window must be >= 0 (0: none), got ", window);
  TORCH_CHECK(q.dim() == 4 && q.size(0) == 1 && k_cache.dim() == 4 && k_cache.size(0) == 1 && q.size(3) == k_cache.size(3),
              "runner::causal_attention: q must be [1, n_heads, T, head_dim] and the caches [1, n_kv_heads, L, head_dim], got ",
              q.sizes(), " and ", k_cache.sizes());
  const int64_t H = q.size(1), count = q.size(2), KVH = k_cache.size(1), L = k_cache.size(2), hd = q.size(3);
  const at::ScalarType stored = int8 ? at::kChar : q.scalar_type();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() &&
                  k_cache.scalar_type() == stored && v_cache.scalar_type() == stored,
              "runner::causal_attention: caches must be contiguous [1, n_kv_heads, L, head_dim] in q's dtype (int8 with scales)");
  TORCH_CHECK(H % KVH == 0, "runner::causal_attention: n_heads must be a multiple of n_kv_heads");
  TORCH_CHECK(input_pos.scalar_type() == at::kLong && input_pos.numel() == count,
              "runner::causal_attention: input_pos must be T int64 positions");
  auto positions = input_pos.contiguous();
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i)
    TORCH_CHECK(pos[i] >= 0 && pos[i] < L, "runner::causal_attention: position ", pos[i], " is outside the cache of ", L);
  auto qc = q.contiguous();
  auto y = at::empty({1, count, H * hd}, q.options());
  const auto run = [&](auto zero) {
    using T = decltype(zero);
    if (!int8) {
      causal_attention_impl(qc.const_data_ptr<T>(), k_cache.const_data_ptr<T>(), v_cache.const_data_ptr<T>(),
                            y.mutable_data_ptr<T>(), pos, H, KVH, count, hd, L, window);
      return;
    }
    // An int8 cache: the positions any query sees, read as the model's dtype, for the same kernel.
    if (count == 0) return;
    const int64_t n = *std::max_element(pos, pos + count) + 1;
    auto k = at::empty({KVH, n, hd}, q.options()), v = at::empty({KVH, n, hd}, q.options());
    dequantize_cache(k_cache.const_data_ptr<int8_t>(), k_scales->const_data_ptr<float>(), KVH, L, n, hd,
                     k.mutable_data_ptr<T>());
    dequantize_cache(v_cache.const_data_ptr<int8_t>(), v_scales->const_data_ptr<float>(), KVH, L, n, hd,
                     v.mutable_data_ptr<T>());
    qc = qc.clone();
    int8_grid(qc.mutable_data_ptr<T>(), H * count, hd);
    causal_attention_impl(qc.const_data_ptr<T>(), k.const_data_ptr<T>(), v.const_data_ptr<T>(), y.mutable_data_ptr<T>(),
                          pos, H, KVH, count, hd, n, window);
  };
  if (q.scalar_type() == at::kBFloat16)
    run(BFloat16());
  else
    run(0.f);
  return y;
}

}  // namespace runner
