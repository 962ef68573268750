#pragma once
// The pieces of the DeepSeek-V4 forward (internal to src/model/v4_*.cpp). Activations are host fp32 tensors,
// rows = the new tokens of a batch of sequences, each sequence's rows contiguous and in order (V4Rows); T = rows,
// d = hidden_size, N = hc_mult, c = head_dim, r = rope dims. Outputs are overwritten unless the name says
// accumulate (`_acc`). Token-parallel work (products, norms, rope, mHC, routing, experts) runs over all T rows at
// once; only what reads or writes a sequence's cache (window ring, compressor state, indexer entries, the keys
// a query sees) loops over the sequences.
#include <vector>

#include "model/v4_model.h"

namespace dsv3 {

Tensor v4_new(Backend& be, Shape s, const char* name);  // uninitialized host fp32 activation

// The rows of a batch: sequence s owns rows [off[s], off[s + 1]), row t has position pos[t] (contiguous within
// a sequence, starting at its cache's length) and token id ids[t] (hash routing reads it).
struct V4Rows {
  std::vector<int64_t> off = {0};  // [S + 1]
  std::vector<int32_t> pos, ids;   // [T]
  int64_t seqs() const { return int64_t(off.size()) - 1; }
  int64_t rows() const { return off.back(); }
  int64_t begin(int64_t s) const { return off[size_t(s)]; }
  int64_t count(int64_t s) const { return off[size_t(s) + 1] - off[size_t(s)]; }
  // Appends a sequence of these ids at positions len, len + 1, ...
  void add(const std::vector<int32_t>& new_ids, int64_t len);
};

// ---- v4_mhc.cpp
// From streams X [T, N, d]: the block input u [T, d] = sum_j pre_j X_j, and the weights that fold the block's
// output back in: post [T, N], comb [T, N, N] (comb[t, j, k]: input stream j into output stream k).
void v4_hc_pre(Backend& be, const V4Config& c, const V4HcWeights& w, const Tensor& X, Tensor& u,
               std::vector<float>& post, std::vector<float>& comb);
// X_out[t, k] = post[t, k] f[t] + sum_j comb[t, j, k] X[t, j]   (X, X_out [T, N, d]; f [T, d]).
void v4_hc_post(const V4Config& c, Tensor& X_out, const Tensor& X, const Tensor& f, const std::vector<float>& post,
                const std::vector<float>& comb);
// The final collapse: h [T, d] = sum_j pre_j X_j with pre = sigmoid(scale * fn . rms(X) + base) + hc_eps.
void v4_hc_head(Backend& be, const V4Config& c, const Tensor& fn, const Tensor& base, const Tensor& scale,
                const Tensor& X, Tensor& h);

// ---- v4_attention.cpp
// The attention block of layer L for normed inputs xa [T, d] of the batch's rows; lc[s] is sequence s's cache
// of this layer. Returns [T, d].
Tensor v4_attention(Backend& be, const V4Config& c, const V4LayerWeights& L, const Tensor& xa, const V4Rows& rows,
                    const std::vector<V4LayerCache*>& lc, const V4RopeTable& rope);

// ---- v4_compressor.cpp
// Runs a compressor over the new rows x [T, d]: appends to st[s].kv one entry for every window of m tokens of
// sequence s that closes (the open window's raw rows stay in st[s]), each entry normed and rotated at its
// window's first position. overlap: CSA (2m slots: the previous window's lookahead halves and this window's
// current halves), else HCA (m slots). width: the entry width (c, or c_I for the indexer).
void v4_compress(Backend& be, const V4Config& c, const V4CompressorWeights& w, const Tensor& x, const V4Rows& rows,
                 int64_t m, bool overlap, int64_t width, const V4RopeTable& rope,
                 const std::vector<V4CompressorState*>& st);

// ---- v4_indexer.cpp
// The lightning indexer of a CSA layer: updates each sequence's compressor st[s] with its rows of xa, scores
// every entry of its sequence for every query (qa [T, d_c] the normed q latent) and returns, per sequence s,
// sel[s] [T_s, k[s]] (k[s] = min(index_topk, entries of s)) of the best-scoring causally visible entries, -1
// where a query has fewer than k[s].
struct V4IndexSelection {
  std::vector<int64_t> k;                 // [S]
  std::vector<std::vector<int32_t>> sel;  // [S][T_s * k[s]]
};
V4IndexSelection v4_index_select(Backend& be, const V4Config& c, const V4IndexerWeights& w, const Tensor& xa,
                                 const Tensor& qa, const V4Rows& rows, const std::vector<V4CompressorState*>& st,
                                 const V4RopeTable& rope);
// One sequence at positions pos (the trainer's call): sel [T, *k_out].
std::vector<int32_t> v4_index_select(Backend& be, const V4Config& c, const V4IndexerWeights& w, const Tensor& xa,
                                     const Tensor& qa, const std::vector<int32_t>& pos, V4CompressorState& st,
                                     const V4RopeTable& rope, int64_t* k_out);

// ---- v4_moe.cpp
struct V4Routing {
  int64_t K = 0;
  std::vector<int32_t> idx;  // [T, K] expert ids
  std::vector<float> w;      // [T, K] weights (renormalized, times routed_scaling_factor)
};
// Routing only (ids [T]: each row's token id): moe layers pick top-K of score + bias, hash_moe layers take
// tid2eid[id]; score = sqrt(softplus(y gate^T)) (or sigmoid) of the chosen experts, renormalized.
V4Routing v4_route(Backend& be, const V4Config& c, const V4LayerWeights& L, const Tensor& y,
                   const std::vector<int32_t>& ids);
// out[t] += sum_k w[t, k] Expert_{idx[t, k]}(y[t]) with the clamped SwiGLU (grouped experts w1/w3/w2).
void v4_experts_acc(Backend& be, const V4Config& c, const V4LayerWeights& L, const Tensor& y, const V4Routing& r,
                    Tensor& out);
// out = the shared expert of y (clamped SwiGLU).
void v4_shared_expert(Backend& be, const V4Config& c, const V4LayerWeights& L, const Tensor& y, Tensor& out);

// ---- shared helpers (v4_mhc.cpp)
// x[t, :] *= rsqrt(mean(x[t, :]^2) + eps) in place for rows of D values (the unweighted RMSNorm).
void v4_rms_unweighted(float* x, int64_t rows, int64_t D, float eps);

}  // namespace dsv3
