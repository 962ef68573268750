// The KV compressors of CSA and HCA layers (and of the CSA indexer). Each token s contributes a value row
// C_s = x_s Wkv^T and a gate row Z_s = x_s Wgate^T + ape[s mod m]; an entry pools a window per channel with
// the softmax of the gates over its slots, then RMSNorm and rope at the window's first position (compress table).
//   HCA (overlap false): entry w pools the m tokens of window w.                       C, Z: [T, c]
//   CSA (overlap true):  C, Z are [T, 2c]: the first c channels are a token's "lookahead" half, which belongs
//                        to the NEXT window's entry, the last c its "current" half. Entry w pools 2m slots:
//                        the lookahead halves of window w-1 and the current halves of window w (width 2m,
//                        stride m). Window 0 of a sequence has no predecessor: those slots weigh 0.
// Only closed windows emit entries; the open window's raw rows wait in the state, and CSA keeps the last
// closed window's lookahead halves (gate with its position bias) for the next entry. Position of entry w:
// m * w (positions are assumed to start at 0 and be contiguous, as in transformers).
#include <algorithm>
#include <cmath>

#include "model/v4_kernels.h"
#include "model/v4_parts.h"

namespace dsv3 {

void v4_compress(Backend& be, const V4Config& c, const V4CompressorWeights& w, const Tensor& x, const V4Rows& rows,
                 int64_t m, bool overlap, int64_t width, const V4RopeTable& rope,
                 const std::vector<V4CompressorState*>& st) {
  const int64_t T = x.dim(0), cols = overlap ? 2 * width : width, r = c.qk_rope_head_dim, S = rows.seqs();
  // The projections of every row of the batch in one product each.
  Tensor C = v4_new(be, {T, cols}, "compress_kv"), Z = v4_new(be, {T, cols}, "compress_gate");
  be.linear(C, x, w.wkv);
  be.linear(Z, x, w.wgate);
  // Per sequence: its rows join the open window; closed windows pool into entries (collected for all sequences).
  std::vector<float> pooled;       // [entries of the batch, width]
  std::vector<int32_t> epos;       // each entry's position: its window's first
  std::vector<int64_t> n_new(static_cast<size_t>(S), 0);
  const float* ape = w.ape.f32();  // [m, cols]
  const int64_t slots = overlap ? 2 * m : m;
  std::vector<float> z(static_cast<size_t>(slots)), v(static_cast<size_t>(slots)), P(static_cast<size_t>(slots));
  for (int64_t s = 0; s < S; ++s) {
    V4CompressorState& cs = *st[size_t(s)];
    const int64_t t0 = rows.begin(s), T_s = rows.count(s);
    // Rows of the open window first, then the new ones.
    std::vector<float>& bk = cs.buf_kv;
    std::vector<float>& bg = cs.buf_gate;
    bk.insert(bk.end(), C.f32() + t0 * cols, C.f32() + (t0 + T_s) * cols);
    bg.insert(bg.end(), Z.f32() + t0 * cols, Z.f32() + (t0 + T_s) * cols);
    const int64_t windows = (int64_t(bk.size()) / cols) / m;
    if (windows == 0) continue;
    const size_t e0 = pooled.size();
    pooled.resize(e0 + size_t(windows * width));
    for (int64_t wi = 0; wi < windows; ++wi) {
      const float* kv = bk.data() + wi * m * cols;
      const float* g = bg.data() + wi * m * cols;
      float* e = pooled.data() + e0 + wi * width;
      const bool has_prev = overlap && !cs.prev_kv.empty();
      for (int64_t ch = 0; ch < width; ++ch) {
        // Slots: [lookahead halves of the previous window (CSA) | this window's (current halves)].
        int64_t n = 0;
        if (overlap)
          for (int64_t i = 0; i < m; ++i, ++n) {
            v[size_t(n)] = has_prev ? cs.prev_kv[size_t(i * width + ch)] : 0.f;
            z[size_t(n)] = has_prev ? cs.prev_gate[size_t(i * width + ch)] : -INFINITY;
          }
        const int64_t off = overlap ? width : 0;
        for (int64_t i = 0; i < m; ++i, ++n) {
          v[size_t(n)] = kv[i * cols + off + ch];
          z[size_t(n)] = g[i * cols + off + ch] + ape[i * cols + off + ch];
        }
        e[ch] = v4k::pool(P.data(), v.data(), z.data(), slots);
      }
      if (overlap) {  // this window's lookahead halves feed the next entry
        cs.prev_kv.assign(size_t(m * width), 0.f);
        cs.prev_gate.assign(size_t(m * width), 0.f);
        for (int64_t i = 0; i < m; ++i)
          for (int64_t ch = 0; ch < width; ++ch) {
            cs.prev_kv[size_t(i * width + ch)] = kv[i * cols + ch];
            cs.prev_gate[size_t(i * width + ch)] = g[i * cols + ch] + ape[i * cols + ch];
          }
      }
      epos.push_back(int32_t((cs.entries + wi) * m));
    }
    n_new[size_t(s)] = windows;
    bk.erase(bk.begin(), bk.begin() + windows * m * cols);
    bg.erase(bg.begin(), bg.begin() + windows * m * cols);
  }
  const int64_t n_ent = int64_t(epos.size());
  if (n_ent == 0) return;
  // Norm and rope of the new entries of every sequence at once, then each sequence keeps its own.
  Tensor E = v4_new(be, {n_ent, width}, "compress_entries");
  std::copy(pooled.begin(), pooled.end(), E.f32());
  be.rmsnorm(E, E, w.norm, float(c.rms_norm_eps));
  be.rope(E, 1, width, width - r, epos, rope.cos, rope.sin, /*interleave=*/true);
  int64_t e = 0;
  for (int64_t s = 0; s < S; ++s) {
    V4CompressorState& cs = *st[size_t(s)];
    const int64_t n = n_new[size_t(s)];
    cs.kv.insert(cs.kv.end(), E.f32() + e * width, E.f32() + (e + n) * width);
    cs.entries += n;
    e += n;
  }
}

}  // namespace dsv3
