#pragma once
// The DeepSeek-V3.2 lightning indexer (DSA) of one layer: scores every cached token for each new token and
// selects the top index_topk, which MLA then attends to (model.cpp). transformers `DeepseekV32Indexer`:
//   qI = view(q_lat W_qb^T, [nI, dI]),  kI = LayerNorm(h W_k^T)            [dI]; rope on the first dr columns
//        (non-interleaved, "rotate half", unlike MLA's interleaved rope), same cos/sin tables as MLA
//   I[t, s] = sum_h (h_t W_w^T)_h / sqrt(nI) * relu(qI_{t,h} . kI_s / sqrt(dI)),   s <= t (causal)
//   sel_t = top-k positions of I[t, :]
// The keys kI are cached with the latent (KvPoolSpec::index_dim), so decode scores against every past token.
// The selection is a constant of the forward pass (transformers runs the indexer under no_grad).
#include <vector>

#include "model/config.h"
#include "model/kv_cache.h"
#include "model/weights.h"
#include "ops/backend.h"

namespace dsv3 {

// h [T, H] the normed layer input, q_lat [T, q_lora_rank] the normed q LoRA latent, rows/positions as in the
// step (seqs, pos). Writes the step's index keys into the cache, then returns sel [T, index_topk] int32
// (positions, best first, -1 padding).
Tensor dsa_select_tokens(Backend& be, const ModelConfig& cfg, const IndexerWeights& W, const Tensor& h,
                         const Tensor& q_lat, KvCache& cache, int64_t layer, const std::vector<SeqSlice>& seqs,
                         const std::vector<int32_t>& pos, const Tensor& cos, const Tensor& sin);

}  // namespace dsv3
