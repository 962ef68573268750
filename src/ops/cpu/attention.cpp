// MLA attention on the CPU.
//  - mla_attention: prefill form. Keys and values were decompressed from the latent cache by the caller
//    (kv = kv_b_proj(c)); per head, S = Qn Kn^T + Qp Kpe^T (two sgemms), causal softmax, O = P V (sgemm).
//    Queries are processed in chunks so S stays small at long contexts.
//  - mla_decode: absorbed form over the paged cache; one query per sequence. Each cache row is read once
//    for all heads (scores for every head, then the weighted sum of c for every head).
//  Both take an optional DSA selection (DeepSeek-V3.2): sel [rows, K] positions per query (-1 = none); a
//  query then attends only to its selected positions (the others get probability exactly 0, as transformers'
//  finfo.min mask gives).
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "ops/cpu/cpu_ops.h"

namespace dsv3::cpu {

void mla_attention(float* out, const float* q, const float* kv, const float* kpe, int64_t len, int64_t pos0,
                   int64_t nh, int64_t dn, int64_t dr, int64_t dv, float scale, const int32_t* sel, int64_t K) {
  const int64_t n = pos0 + len;  // keys
  const int64_t qs = nh * (dn + dr), ks = nh * (dn + dv);
  const int64_t chunk = 256;
  std::vector<float> S(size_t(std::min(chunk, len) * n));
  for (int64_t h = 0; h < nh; ++h) {
    for (int64_t i0 = 0; i0 < len; i0 += chunk) {
      const int64_t m = std::min(chunk, len - i0);
      const int64_t nk = pos0 + i0 + m;  // keys visible to the last query of the chunk
      const float* qh = q + i0 * qs + h * (dn + dr);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(m), int(nk), int(dn), scale, qh, int(qs),
                  kv + h * (dn + dv), int(ks), 0.f, S.data(), int(nk));
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(m), int(nk), int(dr), scale, qh + dn, int(qs), kpe,
                  int(dr), 1.f, S.data(), int(nk));
#pragma omp parallel for schedule(static) if (m * nk > 32768)
      for (int64_t i = 0; i < m; ++i) {
        float* row = S.data() + i * nk;
        const int64_t last = pos0 + i0 + i;  // causal: keys 0..last
        if (sel) {  // DSA: keys outside the selection get -inf (probability 0)
          std::vector<uint8_t> keep(size_t(last + 1), 0);
          for (int64_t k = 0; k < K; ++k) {
            const int32_t j = sel[(i0 + i) * K + k];
            if (j >= 0 && j <= last) keep[j] = 1;
          }
          for (int64_t j = 0; j <= last; ++j)
            if (!keep[j]) row[j] = -std::numeric_limits<float>::infinity();
        }
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j <= last; ++j) mx = std::max(mx, row[j]);
        double sum = 0;
        for (int64_t j = 0; j <= last; ++j) {
          row[j] = std::exp(row[j] - mx);
          sum += row[j];
        }
        float inv = float(1.0 / sum);
        for (int64_t j = 0; j <= last; ++j) row[j] *= inv;
        for (int64_t j = last + 1; j < nk; ++j) row[j] = 0.f;
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(m), int(dv), int(nk), 1.f, S.data(), int(nk),
                  kv + h * (dn + dv) + dn, int(ks), 0.f, out + i0 * nh * dv + h * dv, int(nh * dv));
    }
  }
}

void mla_decode(Tensor& out_lat, const Tensor& q_lat, const Tensor& q_pe, const Tensor& pool, const KvPoolSpec& spec,
                int64_t layer, const std::vector<SeqSlice>& seqs, float scale, const Tensor* sel) {
  const int64_t nh = q_lat.dim(1), r = spec.kv_lora_rank, dr = spec.rope_dim, row = spec.row(), bs = spec.block_size;
  const float* base = pool.ptr<float>() + size_t(layer) * spec.num_blocks * bs * row;
  for (size_t b = 0; b < seqs.size(); ++b) {
    const SeqSlice& sq = seqs[b];
    // The attended positions: all of 0..pos0 (t itself), or the selected ones (at[t]).
    std::vector<int64_t> at;
    if (sel) {
      const int64_t K = sel->dim(1);
      for (int64_t k = 0; k < K; ++k) {
        const int32_t j = sel->ptr<int32_t>()[b * K + k];
        if (j >= 0 && j <= sq.pos0) at.push_back(j);
      }
    }
    const int64_t n = sel ? int64_t(at.size()) : sq.pos0 + 1;
    const int64_t* atp = sel ? at.data() : nullptr;
    const float* ql = q_lat.ptr<float>() + b * nh * r;
    const float* qp = q_pe.ptr<float>() + b * nh * dr;
    float* o = out_lat.ptr<float>() + b * nh * r;
    std::vector<float> S(size_t(nh * n));
    auto cache_row = [&](int64_t t) {
      const int64_t p = atp ? atp[t] : t;
      return base + (size_t(sq.blocks[p / bs]) * bs + p % bs) * row;
    };
    // Scores: every cache row once, all heads.
#pragma omp parallel for schedule(static) if (n * nh * row > 65536)
    for (int64_t t = 0; t < n; ++t) {
      const float* cr = cache_row(t);
      for (int64_t h = 0; h < nh; ++h) {
        float s = 0;
        const float* a = ql + h * r;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < r; ++i) s += a[i] * cr[i];
        const float* p = qp + h * dr;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < dr; ++i) s += p[i] * cr[r + i];
        S[h * n + t] = s * scale;
      }
    }
    for (int64_t h = 0; h < nh; ++h) {
      float* sr = S.data() + h * n;
      float mx = *std::max_element(sr, sr + n);
      double sum = 0;
      for (int64_t t = 0; t < n; ++t) {
        sr[t] = std::exp(sr[t] - mx);
        sum += sr[t];
      }
      float inv = float(1.0 / sum);
      for (int64_t t = 0; t < n; ++t) sr[t] *= inv;
    }
    // Weighted sum of latents, parallel over latent channels so each thread reads its slice of every row.
    std::fill(o, o + nh * r, 0.f);
    const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(r / 16, 32));
#pragma omp parallel for schedule(static) if (n * nh * r > 65536)
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      const int64_t c0 = r * ch / nchunks, c1 = r * (ch + 1) / nchunks;
      for (int64_t t = 0; t < n; ++t) {
        const float* cr = cache_row(t);
        for (int64_t h = 0; h < nh; ++h) {
          const float p = S[h * n + t];
          float* oh = o + h * r;
#pragma omp simd
          for (int64_t i = c0; i < c1; ++i) oh[i] += p * cr[i];
        }
      }
    }
  }
}

}  // namespace dsv3::cpu
