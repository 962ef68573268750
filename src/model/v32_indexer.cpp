#include "model/v32_indexer.h"

#include <cmath>

namespace dsv3 {

Tensor dsa_select_tokens(Backend& be, const ModelConfig& cfg, const IndexerWeights& W, const Tensor& h,
                         const Tensor& q_lat, KvCache& cache, int64_t layer, const std::vector<SeqSlice>& seqs,
                         const std::vector<int32_t>& pos, const Tensor& cos, const Tensor& sin) {
  const int64_t T = h.dim(0), nI = cfg.index_n_heads, dI = cfg.index_head_dim;
  const DType at = be.act_dtype();
  // Index keys of the new tokens: LayerNorm (eps 1e-6, fixed in transformers), rope on [0, dr), into the cache
  // before scoring (a token sees its own key).
  Tensor k = be.alloc(at, {T, dI}, "index_k");
  be.linear(k, h, W.wk);
  be.layernorm(k, k, W.k_norm_w, W.k_norm_b, 1e-6f);
  be.rope(k, 1, dI, 0, pos, cos, sin, /*interleave=*/false);
  be.index_key_write(cache.pool(), cache.spec(), layer, seqs, k);
  // Index queries [T, nI, dI] from the q latent, rope on each head's first dr columns.
  Tensor q = be.alloc(at, {T, nI * dI}, "index_q");
  be.linear(q, q_lat, W.wq_b);
  be.rope(q, nI, dI, 0, pos, cos, sin, /*interleave=*/false);
  Tensor w = be.alloc(DType::F32, {T, nI}, "index_w");
  be.linear(w, h, W.weights_proj);
  Tensor sel = be.alloc(DType::I32, {T, cfg.index_topk}, "dsa_sel");
  be.dsa_select(sel, q, w, cache.pool(), cache.spec(), layer, seqs, float(1.0 / std::sqrt(double(dI))),
                float(1.0 / std::sqrt(double(nI))));
  return sel;
}

}  // namespace dsv3
