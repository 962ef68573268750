#pragma once
// Muon for DeepSeek-V4 (the V4 report's Algorithm 1, docs/deepseek-v4.md section 11), host fp32 over the flat
// parameter buffer. For each orthogonalized matrix W [n, m] with gradient G:
//   M = mu M + G;   O = NS(mu M + G) sqrt(max(n, m)) gamma   (Nesterov look-ahead; update RMS ~ gamma)
//   W = W (1 - lr lambda) - lr O
// NS is the hybrid Newton-Schulz iteration: X = M / (||M||_F + 1e-7), on the wide orientation, 8 steps with
// (a, b, c) = (3.4445, -4.7750, 2.0315) then 2 with (2, -1.5, 0.5): X = a X + (b A + c A^2) X, A = X X^T.
// Everything else is AdamW (the trainer's --beta1/--beta2/--eps/--weight-decay). Choices where the sources are
// silent or disagree (section 11 [UNSURE]):
//   Muon      every 2-D weight of the blocks: attention projections, CSA/HCA compressor wkv/wgate (whole, not split
//             into halves), mHC fn of every block and hc_head_fn (whole, not split into pre/post/comb), router
//             gate, shared experts, and each routed expert's w1, w2, w3 separately; wo_a per output group (the
//             o_groups blocks of its rows are independent maps of disjoint heads).
//   AdamW     embedding, head, RMSNorm weights, mHC base and scale, attention sinks [H] and the compressors' position
//             biases ape [m, w] (a bias table, not a linear map). Weight decay only on AdamW's 2-D tensors
//             (embedding, head, ape), as the V3 trainer: norms, sinks, base and scale are not decayed.
//   neither   the lightning indexer (no gradient reaches it: not updated, not decayed).
// The global-norm gradient clip (--clip) scales the gradient before either optimizer sees it.
#include <cstdint>
#include <string>
#include <vector>

#include "model/v4_config.h"
#include "model/weights.h"
#include "train/optimizer.h"

namespace dsv3 {

struct MuonConfig {
  double momentum = 0.95, weight_decay = 0.1, rms = 0.18;  // mu, lambda, gamma
  int ns_steps = 10;
};

// X [rows, cols] in place: the hybrid Newton-Schulz orthogonalization (transposes internally when rows > cols).
void newton_schulz(float* X, int64_t rows, int64_t cols, int steps = 10);

struct MuonMatrix {
  std::string name;  // tensor name (wo_a groups: "<name>[group j]")
  int64_t offset = 0, rows = 0, cols = 0;
};
struct AdamSegment {
  std::string name;
  int64_t offset = 0, n = 0;
  bool decay = false;
};
struct MuonPartition {
  std::vector<MuonMatrix> muon;
  std::vector<AdamSegment> adam;
  std::vector<std::string> frozen;  // no gradient (the indexer)
};
MuonPartition v4_muon_partition(const V4Config& c, const ParamLayout& layout);

// AdamW over explicit segments (host), then Muon over the matrices.
class Muon {
 public:
  Muon(MuonPartition part, int64_t num_params, MuonConfig mc, AdamWConfig ac);
  // One step with learning rate lr; returns the gradient's global norm before clipping.
  double step(float* params, const float* grads, double lr);
  int64_t t = 0;
  const MuonPartition& partition() const { return part_; }
  // The state a checkpoint keeps, each [num_params]: Muon's momentum, AdamW's moments (their segments used).
  std::vector<float>& momentum() { return mom_; }
  std::vector<float>& adam_m() { return m_; }
  std::vector<float>& adam_v() { return v_; }

 private:
  MuonPartition part_;
  MuonConfig mc_;
  AdamWConfig ac_;
  std::vector<float> mom_, m_, v_;  // Muon momentum; AdamW moments ([num_params], only their segments used)
};

// Plain AdamW over the same segments as the V3 trainer's AdamW (matrices decayed, norms and 1-D not), skipping the
// V4 indexer: the `--optimizer adamw` path of V4 training.
class HostAdamW {
 public:
  HostAdamW(std::vector<AdamSegment> segs, int64_t num_params, AdamWConfig ac);
  double step(float* params, const float* grads, double lr);
  int64_t t = 0;
  std::vector<float>& adam_m() { return m_; }  // the moments a checkpoint keeps, [num_params]
  std::vector<float>& adam_v() { return v_; }

 private:
  std::vector<AdamSegment> segs_;
  AdamWConfig ac_;
  std::vector<float> m_, v_;
};
// AdamW segments of every trained V4 tensor (decay: 2-D and not a norm); the indexer is left out.
std::vector<AdamSegment> v4_adamw_segments(const ParamLayout& layout);

}  // namespace dsv3
