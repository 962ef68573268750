// Serving over ranks: the leader's forward and MTP passes replayed on the followers (see Model::set_leader).
// A pass is one broadcast of its size and one of its int64 description:
//   [op (1 forward, 2 MTP), k, absorb, all_logits, keep_hidden, want_logits, nseq,
//    per sequence: cache len, #tokens, #blocks, all_logits, tokens..., blocks...]
// followed, for MTP, by the h_prev rows [T, H] (fp32). Size 0 ends the followers. The followers use the
// leader's block ids in their own pool (every rank's pool has the same shape), so they never allocate.
#include <cstdio>

#include "dist/runtime.h"
#include "model/model.h"

namespace dsv3 {

void Model::announce(int64_t op, const std::vector<BatchSeq>& batch, const ForwardOptions& opt, int64_t k,
                     const Tensor* h_prev, bool want_logits) {
  std::vector<int64_t> m = {op, k, opt.absorb_decode, opt.all_logits, opt.keep_hidden, want_logits,
                            int64_t(batch.size())};
  for (const BatchSeq& b : batch) {
    m.push_back(b.cache ? b.cache->len : 0);
    m.push_back(int64_t(b.tokens.size()));
    m.push_back(b.cache ? int64_t(b.cache->blocks.size()) : 0);
    m.push_back(b.all_logits);
    m.insert(m.end(), b.tokens.begin(), b.tokens.end());
    if (b.cache) m.insert(m.end(), b.cache->blocks.begin(), b.cache->blocks.end());
  }
  int64_t n = int64_t(m.size());
  leader_->broadcast(&n, 1, CommType::I64, 0);
  leader_->broadcast(m.data(), n, CommType::I64, 0);
  if (op == 2) {
    Tensor h = be_.to_host(*h_prev);
    if (h.dtype != DType::F32) fail("internal: the serving leader needs fp32 MTP inputs");
    int64_t shape[2] = {h.dim(0), h.dim(1)};
    leader_->broadcast(shape, 2, CommType::I64, 0);
    leader_->broadcast(h.f32(), h.numel(), CommType::F32, 0);
  }
}

void Model::stop_followers() {
  if (!leader_) return;
  int64_t n = 0;
  leader_->broadcast(&n, 1, CommType::I64, 0);
}

void Model::follow(Communicator& comm, KvCache& cache) {
  for (;;) {
    int64_t n = 0;
    {
      dist::ScopedNoTimeout idle;  // waiting for the next request may take any time
      comm.broadcast(&n, 1, CommType::I64, 0);
    }
    if (n == 0) return;
    std::vector<int64_t> m(n);
    comm.broadcast(m.data(), n, CommType::I64, 0);
    const int64_t op = m[0], k = m[1], nseq = m[6];
    ForwardOptions fo;
    fo.absorb_decode = m[2], fo.all_logits = m[3], fo.keep_hidden = m[4];
    const bool want_logits = m[5];
    std::vector<SeqCache> caches(nseq);
    std::vector<BatchSeq> batch(nseq);
    size_t p = 7;
    for (int64_t i = 0; i < nseq; ++i) {
      const int64_t len = m[p], nt = m[p + 1], nb = m[p + 2];
      batch[i].all_logits = m[p + 3];
      p += 4;
      batch[i].tokens.assign(m.begin() + p, m.begin() + p + nt), p += nt;
      caches[i].blocks.assign(m.begin() + p, m.begin() + p + nb), p += nb;
      caches[i].len = len;
      batch[i].cache = &caches[i];
    }
    Tensor h;
    if (op == 2) {
      int64_t shape[2];
      comm.broadcast(shape, 2, CommType::I64, 0);
      h = Tensor::empty(DType::F32, {shape[0], shape[1]}, "mtp_h");
      comm.broadcast(h.f32(), h.numel(), CommType::F32, 0);
    }
    // The leader validated the same pass: an input error happens on every rank before any collective.
    try {
      if (op == 1) {
        forward(batch, cache, fo);
      } else {
        Tensor logits;
        mtp_forward(k, h, batch, cache, want_logits ? &logits : nullptr);
      }
    } catch (const InputError& e) {
      std::fprintf(stderr, "%sa replayed pass failed as on the leader: %s\n", dist::rank_prefix().c_str(), e.what());
    }
  }
}

}  // namespace dsv3
