#include "model/sequence_logits.h"

#include "model/kv_cache.h"

namespace dsv3 {

SequenceLogits sequence_logits(Model& m, Backend& be, const std::vector<int32_t>& ids, int64_t B, int64_t T) {
  const ModelConfig& cfg = m.config();
  const int64_t V = cfg.vocab_size, D = cfg.num_nextn_predict_layers;
  KvCache cache(be, cfg, B * (((T + 63) / 64) * 64) * (1 + D));
  std::vector<SeqCache> seqs(static_cast<size_t>(B));
  std::vector<BatchSeq> batch(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) {
    batch[b].cache = &seqs[b];
    batch[b].tokens.assign(ids.begin() + b * T, ids.begin() + (b + 1) * T);
  }
  ForwardOptions fo;
  fo.all_logits = true;
  fo.keep_hidden = D > 0;
  ForwardResult r = m.forward(batch, cache, fo);
  SequenceLogits out;
  out.logits = r.logits.reshape({B, T, V});
  Tensor h = r.hidden;  // [B * t_prev, H], t_prev = T for k = 1
  int64_t t_prev = T;
  std::vector<std::vector<SeqCache>> mtp_seqs(static_cast<size_t>(D), std::vector<SeqCache>(static_cast<size_t>(B)));
  for (int64_t k = 1; k <= D && T - k >= 1; ++k) {
    const int64_t tk = T - k;
    std::vector<int64_t> rows;
    std::vector<BatchSeq> mb(static_cast<size_t>(B));
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < tk; ++i) rows.push_back(b * t_prev + i);
      mb[b].cache = &mtp_seqs[k - 1][b];
      mb[b].tokens.assign(ids.begin() + b * T + k, ids.begin() + (b + 1) * T);
    }
    Tensor hs = be.alloc(be.act_dtype(), {B * tk, cfg.hidden_size}, "mtp_in");
    be.gather_rows(hs, h, rows);
    Tensor ml;
    h = m.mtp_forward(k, hs, mb, cache, &ml);
    t_prev = tk;
    out.mtp.push_back(ml.reshape({B, tk, V}));
  }
  return out;
}

}  // namespace dsv3
