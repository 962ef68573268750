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
#include <cmath>

#include "model/v4_kernels.h"
#include "model/v4_parts.h"

namespace dsv3 {

void v4_compress(Backend& be, const V4Config& c, const V4CompressorWeights& w, const Tensor& x, int64_t m,
                 bool overlap, int64_t width, const V4RopeTable& rope, V4CompressorState& st) {
  const int64_t T = x.dim(0), cols = overlap ? 2 * width : width, r = c.qk_rope_head_dim;
  Tensor C = v4_new(be, {T, cols}, "compress_kv"), Z = v4_new(be, {T, cols}, "compress_gate");
  be.linear(C, x, w.wkv);
  be.linear(Z, x, w.wgate);
  // Rows of the open window first, then the new ones.
  std::vector<float>& bk = st.buf_kv;
  std::vector<float>& bg = st.buf_gate;
  bk.insert(bk.end(), C.f32(), C.f32() + T * cols);
  bg.insert(bg.end(), Z.f32(), Z.f32() + T * cols);
  const int64_t rows = int64_t(bk.size()) / cols, windows = rows / m;
  if (windows == 0) return;
  const float* ape = w.ape.f32();  // [m, cols]
  Tensor E = v4_new(be, {windows, width}, "compress_entries");
  std::vector<int32_t> pos(static_cast<size_t>(windows));
  const int64_t slots = overlap ? 2 * m : m;
  for (int64_t wi = 0; wi < windows; ++wi) {
    const float* kv = bk.data() + wi * m * cols;
    const float* g = bg.data() + wi * m * cols;
    float* e = E.f32() + wi * width;
    const bool has_prev = overlap && !st.prev_kv.empty();
    std::vector<float> z(static_cast<size_t>(slots)), v(static_cast<size_t>(slots));
    for (int64_t ch = 0; ch < width; ++ch) {
      // Slots: [lookahead halves of the previous window (CSA) | this window's (current halves)].
      int64_t n = 0;
      if (overlap)
        for (int64_t i = 0; i < m; ++i, ++n) {
          v[size_t(n)] = has_prev ? st.prev_kv[size_t(i * width + ch)] : 0.f;
          z[size_t(n)] = has_prev ? st.prev_gate[size_t(i * width + ch)] : -INFINITY;
        }
      const int64_t off = overlap ? width : 0;
      for (int64_t i = 0; i < m; ++i, ++n) {
        v[size_t(n)] = kv[i * cols + off + ch];
        z[size_t(n)] = g[i * cols + off + ch] + ape[i * cols + off + ch];
      }
      std::vector<float> P(static_cast<size_t>(slots));
      e[ch] = v4k::pool(P.data(), v.data(), z.data(), slots);
    }
    if (overlap) {  // this window's lookahead halves feed the next entry
      st.prev_kv.assign(size_t(m * width), 0.f);
      st.prev_gate.assign(size_t(m * width), 0.f);
      for (int64_t i = 0; i < m; ++i)
        for (int64_t ch = 0; ch < width; ++ch) {
          st.prev_kv[size_t(i * width + ch)] = kv[i * cols + ch];
          st.prev_gate[size_t(i * width + ch)] = g[i * cols + ch] + ape[i * cols + ch];
        }
    }
    pos[size_t(wi)] = int32_t((st.entries + wi) * m);
  }
  be.rmsnorm(E, E, w.norm, float(c.rms_norm_eps));
  be.rope(E, 1, width, width - r, pos, rope.cos, rope.sin, /*interleave=*/true);
  st.kv.insert(st.kv.end(), E.f32(), E.f32() + windows * width);
  st.entries += windows;
  bk.erase(bk.begin(), bk.begin() + windows * m * cols);
  bg.erase(bg.begin(), bg.begin() + windows * m * cols);
}

}  // namespace dsv3
