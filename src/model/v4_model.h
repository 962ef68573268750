#pragma once
// The DeepSeek-V4 model on the CPU reference backend (fp32 activations; weights fp32, or under --dtype bf16 the
// matrices the products read in bf16: v4_weights.h), read top to bottom in this order:
//   v4_model.cpp       embedding -> N mHC streams -> decoder layers -> hc_head -> final norm -> lm_head
//   v4_mhc.cpp         manifold-constrained hyper-connections: pre / post / Sinkhorn-projected comb, the head
//   v4_attention.cpp   shared-KV attention: window + compressed entries, sinks, output de-rotation, grouped o-proj
//   v4_compressor.cpp  the CSA (overlapped, rate m) and HCA (rate m') compressors and their cache state
//   v4_indexer.cpp     the lightning indexer: top-k compressed entries per query (CSA layers)
//   v4_moe.cpp         sqrtsoftplus / hash routing, then clamped-SwiGLU experts (grouped) and the shared expert
//   v4_rope.cpp        the main and compress (YaRN) rope tables
// The math is transformers' `deepseek_v4` (the spec, docs/deepseek-v4.md). Forward appends tokens to a
// V4Cache, so a prompt in one call, in chunks or token by token computes the same function; one forward takes
// several sequences (each its own cache), and the one-sequence forward is the batch of one.
// The V4-specific ops (mHC, compressors, indexer, sink attention, routing) are host loops over fp32 tensors;
// matrix products, norms, rope and embedding go through the Backend, which must be the CPU backend for now.
#include <cstdint>
#include <vector>

#include "model/v4_cache.h"
#include "model/v4_weights.h"
#include "ops/backend.h"

namespace dsv3 {

// One rope table (main: sliding layers; compress: CSA/HCA layers). cos/sin [cap, r/2] grow on demand;
// sin_neg = -sin rotates by minus the angle (the attention output's de-rotation).
struct V4RopeTable {
  std::vector<float> inv_freq;  // [r/2]
  float attention_factor = 1.f;
  int64_t cap = 0;
  Tensor cos, sin, sin_neg;     // [cap, r/2] fp32 host
  void ensure(int64_t n_pos);   // tables cover positions [0, n_pos)
};
// inv_freq of a rope table for r rope dims, as transformers computes it (fp32; YaRN ramp for rope type yarn).
std::vector<float> v4_inv_freq(const V4Rope& p, int64_t r);

// Tensors of one layer, views into V4Weights::flat / flat16 (release names in the comments' shapes).
struct V4CompressorWeights {
  Tensor wkv, wgate;  // [w, d], w = 2c (CSA: lookahead and current halves) or c (HCA)
  Tensor ape;         // [m, w] position bias (added to the gate)
  Tensor norm;        // [c] RMSNorm of each entry
};
struct V4IndexerWeights {
  Tensor wq_b;          // [H_I * c_I, d_c]
  Tensor weights_proj;  // [H_I, d]
  V4CompressorWeights comp;  // overlapped compressor at width c_I
};
struct V4HcWeights {
  Tensor fn;     // [(2 + N) N, N d]: rows N pre, N post, N*N comb
  Tensor base;   // [(2 + N) N]
  Tensor scale;  // [3] (alpha_pre, alpha_post, alpha_res)
};
struct V4LayerWeights {
  int64_t index = 0;
  V4Attn type = V4Attn::Sliding;
  V4Mlp mlp = V4Mlp::Moe;
  Tensor attn_norm, ffn_norm;  // [d]
  V4HcWeights hc_attn, hc_ffn;
  // attention
  Tensor sink;              // [H]
  Tensor wq_a, q_norm;      // [d_c, d], [d_c]
  Tensor wq_b;              // [H c, d_c]
  Tensor wkv, kv_norm;      // [c, d], [c]
  Tensor wo_a;              // [g d_g, H c / g] block-diagonal: group j uses rows [j d_g, (j + 1) d_g)
  Tensor wo_b;              // [d, g d_g]
  V4CompressorWeights comp; // CSA / HCA layers
  V4IndexerWeights idx;     // CSA layers
  // MoE
  Tensor gate;              // [E, d] router
  Tensor gate_bias;         // [E] selection bias (moe layers)
  const std::vector<int32_t>* tid2eid = nullptr;  // [V * K] (hash_moe layers)
  Tensor w1, w3;            // [E, F, d] routed experts' gate and up, one grouped tensor each
  Tensor w2;                // [E, d, F] down
  Tensor sw1, sw3, sw2;     // shared expert [F, d], [F, d], [d, F]
};

// MTP block k (mtp.k.*): X0_j = rmsnorm(X_j, hnorm) h_proj^T + rmsnorm(embed[next id], enorm) e_proj^T for each stream
// j of the previous stage's streams X, then a full block, its own hc_head and norm, the main model's head.
struct V4MtpWeights {
  Tensor e_proj, h_proj;             // [d, d]
  Tensor enorm, hnorm, norm;         // [d]
  Tensor hc_fn, hc_base, hc_scale;   // [N, N d], [N], [1]
  V4LayerWeights block;              // layer id num_hidden_layers + k
};

struct V4Rows;  // the rows of a batch (v4_parts.h)

// One sequence of a batched forward: new tokens appended to its own cache (positions cache->len, ...).
struct V4Seq {
  std::vector<int32_t> ids;
  V4Cache* cache = nullptr;
  bool all_logits = false;  // forward: logits for every new token, else its last; mtp_forward: not read (every row)
};

class V4Model {
 public:
  V4Model(V4Weights w, Backend& be);
  const V4Config& config() const { return w_.cfg; }
  const V4Weights& weights() const { return w_; }
  Backend& backend() { return be_; }

  // Several sequences in one forward, any mix of prefill chunks and single-token decodes, each on its own cache:
  // the token-parallel parts (embedding, mHC, norms, projections, routing and experts, head) run over the rows of
  // every sequence at once, the cache-dependent parts per sequence. Returns host fp32 logits in batch order
  // (each sequence's rows as the one-sequence forward gives them); an empty batch gives [0, V]. InputError (before
  // any cache changes) on no tokens, bad ids, positions past max_position_embeddings, a cache made for another
  // config, or one cache twice in the batch.
  // streams: when given, the final streams [T, N, d] of every new token in batch order (before hc_head; what MTP
  // block 1 reads).
  Tensor forward(const std::vector<V4Seq>& batch, Tensor* streams = nullptr);
  // One sequence (the batch of one): logits [rows, V], every new token with all_logits, else the last one.
  Tensor forward(const std::vector<int32_t>& ids, V4Cache& cache, bool all_logits = false, Tensor* streams = nullptr);
  // MTP block k (0-based) over rows i of X [T, N, d] (the previous stage's streams, rows of the batch's sequences
  // in order, sequence s's rows at positions cache->mtp_len[k] + i) with ids[i] the token after row i's: logits
  // [T, V] predicting the token after ids[i] (all rows); streams_out: the block's output streams (the next block's
  // input).
  int64_t mtp_depth() const { return int64_t(mtp_.size()); }
  Tensor mtp_forward(int64_t k, const Tensor& X, const std::vector<V4Seq>& batch, Tensor* streams_out = nullptr);
  Tensor mtp_forward(int64_t k, const Tensor& X, const std::vector<int32_t>& next_ids, V4Cache& cache,
                     Tensor* streams_out = nullptr);

 private:
  Tensor layer_forward(const V4LayerWeights& L, const Tensor& X, const V4Rows& rows,
                       const std::vector<V4LayerCache*>& lc);
  // Checks the batch (as forward documents; mtp: MTP block k's lengths) and lays out its rows.
  V4Rows batch_rows(const std::vector<V4Seq>& batch, int64_t mtp_block);

  V4Weights w_;
  Backend& be_;
  V4LayerWeights make_layer(int64_t block) const;
  std::vector<V4LayerWeights> layers_;
  std::vector<V4MtpWeights> mtp_;
  Tensor embed_, final_norm_, head_, hc_head_fn_, hc_head_base_, hc_head_scale_;
  V4RopeTable rope_main_, rope_compress_;
};

}  // namespace dsv3
