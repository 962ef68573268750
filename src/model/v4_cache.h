#pragma once
// The DeepSeek-V4 decode cache of one sequence, per layer (transformers' DeepseekV4{HCA,CSA}Cache and its
// sliding-window layer, same contents):
//   every layer   a ring of the last W - 1 key/value vectors [W - 1, c] (the window branch attends over
//                 these plus the new tokens; the slot of position p is p % (W - 1));
//   CSA / HCA     the compressor state: emitted entries [T, c], the raw projections of the tokens of the
//                 unfinished window (< m rows), and for CSA the lookahead halves of the last closed window
//                 (the first m slots of the next entry's pooling);
//   CSA           the same state for the indexer's own compressor (entries [T, c_I]).
// With this state, appending tokens in any chunking gives the entries a one-shot forward gives.
#include <cstdint>
#include <vector>

#include "model/v4_config.h"

namespace dsv3 {

struct V4CompressorState {
  int64_t entries = 0;                  // emitted entries; the next window starts at position entries * m
  std::vector<float> kv;                // [entries, c] normed, rotated entries
  std::vector<float> buf_kv, buf_gate;  // [n < m, w] raw projections (gate without position bias) of the open window
  std::vector<float> prev_kv, prev_gate;  // CSA: [m, c] lookahead halves of the last closed window (gate + bias)
};

struct V4LayerCache {
  std::vector<float> window;  // [W - 1, c] ring of the most recent key/value vectors
  V4CompressorState comp;     // CSA / HCA main compressor
  V4CompressorState index;    // CSA indexer compressor
};

struct V4Cache {
  int64_t len = 0;                  // tokens seen
  int64_t layers_for = -1;          // num_hidden_layers of the config the cache was made for
  std::vector<V4LayerCache> layers;
  std::vector<V4LayerCache> mtp;    // [num_nextn_predict_layers] the MTP blocks' own layer caches
  std::vector<int64_t> mtp_len;     // rows each MTP block has seen
  explicit V4Cache(const V4Config& c)
      : layers_for(c.num_hidden_layers), layers(size_t(c.num_hidden_layers)), mtp(size_t(c.num_nextn_predict_layers)),
        mtp_len(size_t(c.num_nextn_predict_layers), 0) {}
  // Values held (for reports/tests): window rings, entries, buffers.
  int64_t values() const;
};

}  // namespace dsv3
