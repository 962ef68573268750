// DeepSeek-V3.2 sparse attention (DSA) on the CPU: the lightning indexer's LayerNorm, its key cache writes and
// the top-k token selection. The selected positions then restrict MLA (ops/cpu/attention.cpp).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "ops/cpu/cpu_ops.h"
#include "ops/cpu/gemm.h"

namespace dsv3::cpu {

void layernorm(float* out, const float* x, const Tensor& w, const Tensor& b, int64_t T, int64_t D, float eps) {
  DSV3_CHECK(w.numel() == D && b.numel() == D, "layernorm: weight {} / bias {} for width {}", shape_str(w.shape),
             shape_str(b.shape), D);
  std::vector<float> wv(D), bv(D);
  widen_rows(wv.data(), D, w.data, w.dtype, D, 1, D);
  widen_rows(bv.data(), D, b.data, b.dtype, D, 1, D);
#pragma omp parallel for schedule(static) if (T * D > 16384)
  for (int64_t t = 0; t < T; ++t) {
    const float* xr = x + t * D;
    double mean = 0, var = 0;  // fp64 moments: exact to fp32 rounding for any row length
    for (int64_t i = 0; i < D; ++i) mean += xr[i];
    mean /= double(D);
    for (int64_t i = 0; i < D; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    var /= double(D);
    const float m = float(mean), r = float(1.0 / std::sqrt(var + eps));
    float* o = out + t * D;
    for (int64_t i = 0; i < D; ++i) o[i] = (xr[i] - m) * r * wv[i] + bv[i];
  }
}

namespace {

// Cache row of position p of a sequence in one layer.
inline float* cache_row(float* base, const KvPoolSpec& spec, const SeqSlice& s, int64_t p) {
  DSV3_CHECK(p / spec.block_size < s.num_blocks, "dsa: position {} beyond the sequence's {} blocks", p, s.num_blocks);
  return base + (size_t(s.blocks[p / spec.block_size]) * spec.block_size + p % spec.block_size) * spec.row();
}

}  // namespace

void index_key_write(Tensor& pool, const KvPoolSpec& spec, int64_t layer, const std::vector<SeqSlice>& seqs,
                     const float* k) {
  const int64_t di = spec.index_dim, off = spec.kv_lora_rank + spec.rope_dim;
  DSV3_CHECK(di > 0, "index_key_write: the cache has no indexer keys");
  float* base = pool.f32() + size_t(layer) * spec.num_blocks * spec.block_size * spec.row();
  for (auto& s : seqs)
    for (int64_t i = 0; i < s.len; ++i) std::memcpy(cache_row(base, spec, s, s.pos0 + i) + off, k + (s.row0 + i) * di, di * 4);
}

void dsa_select(int32_t* sel, int64_t K, const float* q, const float* w, int64_t nI, const Tensor& pool,
                const KvPoolSpec& spec, int64_t layer, const std::vector<SeqSlice>& seqs, float q_scale, float w_scale) {
  const int64_t di = spec.index_dim, off = spec.kv_lora_rank + spec.rope_dim;
  DSV3_CHECK(di > 0, "dsa_select: the cache has no indexer keys");
  float* base = const_cast<float*>(pool.f32()) + size_t(layer) * spec.num_blocks * spec.block_size * spec.row();
  for (auto& s : seqs) {
    const int64_t n = s.pos0 + s.len;  // positions this slice's last query sees
    // Gather the sequence's index keys once: [n, di].
    std::vector<float> keys(size_t(n * di));
    for (int64_t p = 0; p < n; ++p) std::memcpy(keys.data() + p * di, cache_row(base, spec, s, p) + off, di * 4);
#pragma omp parallel for schedule(dynamic) if (s.len * n * nI * di > 65536)
    for (int64_t i = 0; i < s.len; ++i) {
      const int64_t r = s.row0 + i, last = s.pos0 + i;
      const float* qr = q + r * nI * di;
      std::vector<float> wh(nI);
      for (int64_t h = 0; h < nI; ++h) wh[h] = w[r * nI + h] * w_scale;
      std::vector<float> score(size_t(last + 1));
      for (int64_t j = 0; j <= last; ++j) {
        const float* kj = keys.data() + j * di;
        float acc = 0;
        for (int64_t h = 0; h < nI; ++h) {
          const float* qh = qr + h * di;
          float d = 0;
#pragma omp simd reduction(+ : d)
          for (int64_t c = 0; c < di; ++c) d += qh[c] * kj[c];
          acc += wh[h] * std::max(d * q_scale, 0.f);
        }
        score[j] = acc;
      }
      // Top K by score, ties to the lower position (a deterministic order; transformers' is unspecified).
      std::vector<int32_t> idx(size_t(last + 1));
      std::iota(idx.begin(), idx.end(), 0);
      const int64_t k = std::min<int64_t>(K, last + 1);
      std::partial_sort(idx.begin(), idx.begin() + k, idx.end(), [&](int32_t a, int32_t b) {
        return score[a] > score[b] || (score[a] == score[b] && a < b);
      });
      int32_t* out = sel + r * K;
      for (int64_t c = 0; c < K; ++c) out[c] = c < k ? idx[c] : -1;
    }
  }
}

}  // namespace dsv3::cpu
