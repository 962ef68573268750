// Absorbed MLA decode over the paged bf16 latent cache, one query per sequence (FlashMLA-style):
//   score[h, t] = (q_lat[h] . c_t + q_pe[h] . kpe_t) * scale,  out_lat[h] = sum_t softmax_t(score[h]) c_t.
// All heads of a sequence share the cache rows, so a block takes 16 heads (the mma M dimension) and reads each
// cache row [c | kpe] (r + dr bf16) once into shared memory, 32 rows per tile (cp.async, double-buffered):
//   S [16 heads x 32 keys]: warp w computes keys 8w..8w+7 over the whole r + dr, then shares S in shared memory;
//   softmax: every warp redoes the (cheap) online-softmax statistics of the 16 x 32 tile identically;
//   O [16 heads x r] += P C: warp w owns latent columns [w r/4, (w+1) r/4).
// Long contexts split the keys over blocks (flash-decoding); a second kernel merges the splits' partial (m, l, O).
// Other latent sizes take a simple kernel (scores in a workspace, then softmax and the weighted sum).
#include <algorithm>
#include <cmath>

#include "ops/cuda/common.cuh"

namespace dsv3::cuda {

namespace {

constexpr int kTileKeys = 32, kThreads = 128, kHeads = 16;

__host__ __device__ inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Row pitch (elements) of a cache/query row in shared memory: r + dr (a multiple of 16) plus 8, an odd number
// of 16-byte chunks, so the 8 rows an ldmatrix reads fall in distinct banks.
__host__ __device__ constexpr int row_pitch(int r, int dr) { return r + dr + 8; }
inline size_t fast_smem(int r, int dr) {
  return size_t(kHeads + 2 * kTileKeys) * row_pitch(r, dr) * sizeof(bf16) + size_t(kHeads) * (kTileKeys + 1) * sizeof(float);
}

template <int R>
__global__ void __launch_bounds__(kThreads) mla_decode_kernel(const bf16* __restrict__ q_lat, const bf16* __restrict__ q_pe,
                                                              const bf16* __restrict__ pool, const int* __restrict__ meta,
                                                              int B, int nh, int dr, int bs, int splits, float scale_log2,
                                                              float* __restrict__ ws_o, float2* __restrict__ ws_ml,
                                                              bf16* __restrict__ out_lat) {
  pdl_start();
  static_assert(R % 64 == 0, "each warp takes r/4 latent columns in 16-wide pairs of n-tiles");
  constexpr int RW = R / 4;   // latent columns per warp
  constexpr int NT = RW / 8;  // n-tiles per warp
  const int DK = R + dr, KP = row_pitch(R, dr);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* Qs = reinterpret_cast<bf16*>(smem_raw);  // [16][KP]
  bf16* Cs = Qs + kHeads * KP;                    // [2][32][KP]
  float* Ss = reinterpret_cast<float*>(Cs + 2 * kTileKeys * KP);  // [16][33]
  constexpr int SP = kTileKeys + 1;

  const int split = blockIdx.x, b = blockIdx.y, hg0 = blockIdx.z * kHeads;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int n = meta[b];
  const int* table = meta + meta[B + b];
  const int tiles = ceil_div(n, kTileKeys), per = ceil_div(tiles, splits);
  const int t0 = split * per, t1 = min(tiles, t0 + per);
  const int nhp = gridDim.z * kHeads;

  const int QC = DK / 8;
  for (int c = threadIdx.x; c < kHeads * QC; c += kThreads) {
    const int hh = c / QC, cc = c % QC, h = hg0 + hh;
    const bool ok = h < nh;
    const int64_t hb = int64_t(b) * nh + (ok ? h : 0);
    const bf16* src = cc * 8 < R ? q_lat + hb * R + cc * 8 : q_pe + hb * dr + (cc * 8 - R);
    cp_async16(Qs + hh * KP + cc * 8, src, ok);
  }
  // Lane k of every warp looks up the pool row of key k of the tile (32 independent block-table reads at once);
  // warp w then copies keys w, w + 4, ..., taking each row from lane k by a shuffle, its lanes striding the row's
  // 16-byte chunks. (One dependent table read per key, in turn, made the copy latency-bound.)
  // The table reads of tile t + 2 are issued while tile t is computed (row_next), so a copy never waits for them.
  static_assert(kTileKeys == 32, "one key per lane");
  auto table_row = [&](int tt) {
    const int pl = tt * kTileKeys + lane;
    return pl < n ? table[pl / bs] * bs + pl % bs : 0;
  };
  auto load_tile = [&](int tt, int buf, int row_l) {
    bf16* Cb = Cs + buf * kTileKeys * KP;
    for (int rr = warp; rr < kTileKeys; rr += kThreads / 32) {
      const int row = __shfl_sync(0xffffffffu, row_l, rr);
      const bool ok = tt * kTileKeys + rr < n;
      const bf16* src = pool + int64_t(row) * DK;
      bf16* dst = Cb + rr * KP;
      for (int cc = lane; cc < QC; cc += 32) cp_async16(dst + cc * 8, src + cc * 8, ok);
    }
  };
  if (t0 < t1) load_tile(t0, 0, table_row(t0));
  cp_async_commit();
  int row_next = t0 + 1 < t1 ? table_row(t0 + 1) : 0;

  float o[NT][4];
#pragma unroll
  for (int i = 0; i < NT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  for (int tt = t0; tt < t1; ++tt) {
    const int buf = (tt - t0) & 1;
    if (tt + 1 < t1) load_tile(tt + 1, buf ^ 1, row_next);
    cp_async_commit();
    row_next = tt + 2 < t1 ? table_row(tt + 2) : 0;
    cp_async_wait<1>();
    __syncthreads();
    const bf16* Cb = Cs + buf * kTileKeys * KP;

    // S for keys 8w..8w+7 of the tile, all 16 heads, over the full r + dr: four independent accumulator chains
    // (one chain of r / 16 dependent mmas was the loop's critical path), the latent part unrolled.
    float sc[4][4] = {};
#pragma unroll
    for (int ks = 0; ks < R / 16; ++ks) {
      uint32_t a[4], bb[2];
      ldmatrix_x4(a, Qs + (lane & 15) * KP + ks * 16 + (lane >> 4) * 8);
      ldmatrix_x2(bb, Cb + (warp * 8 + (lane & 7)) * KP + ks * 16 + ((lane >> 3) & 1) * 8);
      mma_bf16(sc[ks & 3], a[0], a[1], a[2], a[3], bb[0], bb[1]);
    }
    for (int ks = R / 16; ks < DK / 16; ++ks) {  // the rope part (dr / 16 steps)
      uint32_t a[4], bb[2];
      ldmatrix_x4(a, Qs + (lane & 15) * KP + ks * 16 + (lane >> 4) * 8);
      ldmatrix_x2(bb, Cb + (warp * 8 + (lane & 7)) * KP + ks * 16 + ((lane >> 3) & 1) * 8);
      mma_bf16(sc[ks & 3], a[0], a[1], a[2], a[3], bb[0], bb[1]);
    }
    float sacc[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) sacc[e] = (sc[0][e] + sc[1][e]) + (sc[2][e] + sc[3][e]);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = warp * 8 + 2 * t + (e & 1);
      const bool ok = tt * kTileKeys + key < n;
      Ss[(g + (e >> 1) * 8) * SP + key] = ok ? sacc[e] * scale_log2 : -INFINITY;
    }
    __syncthreads();

    // Online softmax on rows g (r = 0) and g + 8 (r = 1); p[r][kk][i]: keys 16kk + 2t + {0, 1, 8, 9}[i].
    float p[2][2][4], mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int kk = 0; kk < 2; ++kk)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int key = kk * 16 + 2 * t + (i & 1) + (i >> 1) * 8;
          p[r][kk][i] = Ss[(g + r * 8) * SP + key];
          mx[r] = fmaxf(mx[r], p[r][kk][i]);
        }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float mn = fmaxf(m[r], mx[r]);
      const float mu = mn == -INFINITY ? 0.f : mn;
      alpha[r] = exp2f(m[r] - mu);
      m[r] = mn;
      l[r] *= alpha[r];
#pragma unroll
      for (int kk = 0; kk < 2; ++kk)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          p[r][kk][i] = exp2f(p[r][kk][i] - mu);
          l[r] += p[r][kk][i];
        }
    }
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      o[i][0] *= alpha[0];
      o[i][1] *= alpha[0];
      o[i][2] *= alpha[1];
      o[i][3] *= alpha[1];
    }
    // O[:, warp's columns] += P C.
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      const uint32_t a0 = pack_bf16(p[0][kk][0], p[0][kk][1]), a1 = pack_bf16(p[1][kk][0], p[1][kk][1]);
      const uint32_t a2 = pack_bf16(p[0][kk][2], p[0][kk][3]), a3 = pack_bf16(p[1][kk][2], p[1][kk][3]);
#pragma unroll
      for (int dp = 0; dp < NT / 2; ++dp) {
        uint32_t bb[4];
        ldmatrix_x4_trans(bb, Cb + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * KP + warp * RW + dp * 16 +
                                  (lane >> 4) * 8);
        mma_bf16(o[2 * dp], a0, a1, a2, a3, bb[0], bb[1]);
        mma_bf16(o[2 * dp + 1], a0, a1, a2, a3, bb[2], bb[3]);
      }
    }
    __syncthreads();  // Ss and this buffer are overwritten next iteration
  }
  cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  if (splits == 1) {  // one block saw every key: normalize and write the result, no merge kernel
    const float ia = l[0] > 0.f ? 1.f / l[0] : 0.f, ib = l[1] > 0.f ? 1.f / l[1] : 0.f;
    const int ha = hg0 + g, hb = ha + 8;
#pragma unroll
    for (int i = 0; i < NT; ++i) {
      const int col = warp * RW + i * 8 + 2 * t;
      if (ha < nh)
        *reinterpret_cast<uint32_t*>(out_lat + (int64_t(b) * nh + ha) * R + col) = pack_bf16(o[i][0] * ia, o[i][1] * ia);
      if (hb < nh)
        *reinterpret_cast<uint32_t*>(out_lat + (int64_t(b) * nh + hb) * R + col) = pack_bf16(o[i][2] * ib, o[i][3] * ib);
    }
    return;
  }
  const int64_t base = (int64_t(b) * splits + split) * nhp + hg0;  // head row hg0 of this (b, split)
#pragma unroll
  for (int i = 0; i < NT; ++i) {
    const int col = warp * RW + i * 8 + 2 * t;
    *reinterpret_cast<float2*>(ws_o + (base + g) * R + col) = make_float2(o[i][0], o[i][1]);
    *reinterpret_cast<float2*>(ws_o + (base + g + 8) * R + col) = make_float2(o[i][2], o[i][3]);
  }
  if (warp == 0 && t == 0) {
    ws_ml[base + g] = make_float2(m[0], l[0]);
    ws_ml[base + g + 8] = make_float2(m[1], l[1]);
  }
}

// out_lat[b, h, :] = sum_s O_s e^(m_s - M) / sum_s l_s e^(m_s - M) (base 2). Block (b, h, 128-column chunk),
// 8 warps: the split weights e^(m_s - M) / L go to shared memory, then warp w sums splits w, w + 8, ... for its
// lanes' 4 columns each (independent 16-byte loads) and the warps' partial sums are added. (A thread walking every
// split in turn, one dependent load after another, took ~80 us at 64 splits.)
constexpr int kCombineThreads = 256, kCombineCols = 128, kMaxSplits = 256;
__global__ void __launch_bounds__(kCombineThreads) mla_decode_combine_kernel(bf16* out_lat, const float* ws_o,
                                                                            const float2* ws_ml, int nh, int nhp,
                                                                            int r, int splits) {
  pdl_start();
  __shared__ float wsh[kMaxSplits];
  __shared__ float red[kCombineThreads / 32];
  __shared__ float4 part[kCombineThreads / 32][32];
  const int b = blockIdx.x, h = blockIdx.y, c0 = blockIdx.z * kCombineCols;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  auto row_of = [&](int s) { return (int64_t(b) * splits + s) * nhp + h; };
  float m = -INFINITY;
  for (int s = threadIdx.x; s < splits; s += kCombineThreads) m = fmaxf(m, ws_ml[row_of(s)].x);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if (lane == 0) red[warp] = m;
  __syncthreads();
  float M = red[0];
  for (int w = 1; w < kCombineThreads / 32; ++w) M = fmaxf(M, red[w]);
  __syncthreads();  // red is reused for L
  float l = 0.f;
  for (int s = threadIdx.x; s < splits; s += kCombineThreads) {
    const float2 ml = ws_ml[row_of(s)];
    const float w = ml.x == -INFINITY ? 0.f : exp2f(ml.x - M);
    wsh[s] = w;
    l += ml.y * w;
  }
  l = warp_sum(l);
  if (lane == 0) red[warp] = l;
  __syncthreads();
  float L = 0.f;
  for (int w = 0; w < kCombineThreads / 32; ++w) L += red[w];
  const float inv = L > 0.f ? 1.f / L : 0.f;
  const int c = c0 + 4 * lane;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  if (c < r) {
#pragma unroll 4
    for (int s = warp; s < splits; s += kCombineThreads / 32) {
      const float w = wsh[s];
      const float4 o = *reinterpret_cast<const float4*>(ws_o + row_of(s) * r + c);
      acc.x += o.x * w, acc.y += o.y * w, acc.z += o.z * w, acc.w += o.w * w;
    }
  }
  part[warp][lane] = acc;
  __syncthreads();
  if (warp == 0 && c < r) {
    float4 t = part[0][lane];
    for (int w = 1; w < kCombineThreads / 32; ++w) {
      const float4 q = part[w][lane];
      t.x += q.x, t.y += q.y, t.z += q.z, t.w += q.w;
    }
    bf16* dst = out_lat + (int64_t(b) * nh + h) * r + c;
    *reinterpret_cast<uint32_t*>(dst) = pack_bf16(t.x * inv, t.y * inv);
    *reinterpret_cast<uint32_t*>(dst + 2) = pack_bf16(t.z * inv, t.w * inv);
  }
}

// Any latent size (and fp32 activations): block per (sequence, head); scores into the workspace, block softmax,
// weighted sum.
template <typename T>
__global__ void mla_decode_ref_kernel(T* out_lat, const T* q_lat, const T* q_pe, const T* pool, const int* meta, int B,
                                      int nh, int r, int dr, int bs, int max_n, float scale, float* ws) {
  pdl_start();
  const int b = blockIdx.x, h = blockIdx.y;
  const int n = meta[b];
  const int* table = meta + meta[B + b];
  const T* ql = q_lat + (int64_t(b) * nh + h) * r;
  const T* qp = q_pe + (int64_t(b) * nh + h) * dr;
  float* sc = ws + (int64_t(b) * nh + h) * max_n;
  auto row = [&](int p) { return pool + (int64_t(table[p / bs]) * bs + p % bs) * (r + dr); };
  float mx = -INFINITY;
  for (int p = threadIdx.x; p < n; p += blockDim.x) {
    const T* cr = row(p);
    float s = 0.f;
    for (int i = 0; i < r; ++i) s += to_f(ql[i]) * to_f(cr[i]);
    for (int i = 0; i < dr; ++i) s += to_f(qp[i]) * to_f(cr[r + i]);
    sc[p] = s * scale;
    mx = fmaxf(mx, s * scale);
  }
  __shared__ float red[32];
  mx = warp_max(mx);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = mx;
  __syncthreads();
  mx = -INFINITY;
  for (int i = 0; i < int(blockDim.x >> 5); ++i) mx = fmaxf(mx, red[i]);
  __syncthreads();
  float sum = 0.f;
  for (int p = threadIdx.x; p < n; p += blockDim.x) {
    const float e = expf(sc[p] - mx);
    sc[p] = e;
    sum += e;
  }
  sum = block_sum(sum);  // also orders the sc[] writes before the reads below
  for (int c = threadIdx.x; c < r; c += blockDim.x) {
    float acc = 0.f;
    for (int p = 0; p < n; ++p) acc += sc[p] * to_f(row(p)[c]);
    out_lat[(int64_t(b) * nh + h) * r + c] = from_f<T>(acc / sum);
  }
}

// Pool row rows[i] of this layer = [c[i, :r] | kpe[i, :dr]]; negative rows are skipped.
__global__ void kv_write_kernel(bf16* pool, const int* rows, const bf16* c, const bf16* kpe, int r, int dr) {
  pdl_start();
  const int i = blockIdx.x, row = rows[i];
  if (row < 0) return;
  bf16* dst = pool + int64_t(row) * (r + dr);
  for (int j = threadIdx.x; j < r + dr; j += blockDim.x)
    dst[j] = j < r ? c[int64_t(i) * r + j] : kpe[int64_t(i) * dr + j - r];
}

bool fast_shape(int r, int dr) { return (r == 64 || r == 128 || r == 256 || r == 512) && dr % 8 == 0 && (r + dr) % 16 == 0; }

template <int R>
void launch_fast(const bf16* q_lat, const bf16* q_pe, const bf16* pool, const int* meta, int B, int nh, int dr, int bs,
                 int splits, float scale, float* ws_o, float2* ws_ml, bf16* out_lat, cudaStream_t s) {
  const size_t smem = fast_smem(R, dr);
  static size_t configured = 0;
  if (smem > configured) {
    DSV3_CUDA_CHECK(cudaFuncSetAttribute(mla_decode_kernel<R>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    configured = smem;
  }
  const dim3 grid(splits, B, ceil_div(nh, kHeads));
  launch(mla_decode_kernel<R>, dim3(grid), dim3(kThreads), smem, s, q_lat, q_pe, pool, meta, B, nh, dr, bs, splits,
                                                    scale * 1.4426950408889634f, ws_o, ws_ml, out_lat);
}

}  // namespace

void kv_write(bf16* pool, const int* rows, const bf16* c, const bf16* kpe, int T, int r, int dr, cudaStream_t s) {
  if (T == 0) return;
  launch(kv_write_kernel, dim3(T), dim3(128), 0, s, pool, rows, c, kpe, r, dr);
  DSV3_CUDA_KERNEL_CHECK();
}

void mla_decode_f32(float* out_lat, const float* q_lat, const float* q_pe, const float* pool, const int* meta, int B,
                    int nh, int r, int dr, int bs, int max_n, float scale, void* ws, cudaStream_t s) {
  if (B == 0) return;
  launch(mla_decode_ref_kernel<float>, dim3(B, nh), dim3(128), 0, s, out_lat, q_lat, q_pe, pool, meta, B, nh, r, dr, bs,
         max_n, scale, static_cast<float*>(ws));
  DSV3_CUDA_KERNEL_CHECK();
}

int mla_decode_splits(int B, int nh, int max_n, int num_sms) {
  const int blocks = B * ceil_div(nh, kHeads);
  const int tiles = std::max(1, ceil_div(max_n, kTileKeys));
  // Enough blocks for two per multiprocessor, at least one 32-key tile per split, at most kMaxSplits (the merge
  // kernel's shared memory). Decode at small batch is latency-bound: a block walks its tiles one after the other,
  // so one sequence's long context is spread over up to 2 x SMs blocks.
  int splits = ceil_div(2 * num_sms, std::max(1, blocks));
  splits = std::min({splits, tiles, kMaxSplits});
  return std::max(1, splits);
}

size_t mla_decode_ws_bytes(int B, int nh, int r, int splits, int max_n) {
  const size_t nhp = size_t(ceil_div(nh, kHeads)) * kHeads;
  const size_t fast = size_t(B) * splits * nhp * (size_t(r) * sizeof(float) + sizeof(float2));
  const size_t ref = size_t(B) * nh * std::max(1, max_n) * sizeof(float);
  return std::max(fast, ref) + 256;
}

void mla_decode(bf16* out_lat, const bf16* q_lat, const bf16* q_pe, const bf16* pool, const int* meta, int B, int nh,
                int r, int dr, int bs, int splits, int max_n, float scale, void* ws, cudaStream_t s) {
  if (B == 0) return;
  const bool al = ((reinterpret_cast<uintptr_t>(q_lat) | reinterpret_cast<uintptr_t>(q_pe) |
                    reinterpret_cast<uintptr_t>(pool)) & 15) == 0;
  if (al && fast_shape(r, dr)) {
    DSV3_CHECK(splits >= 1 && splits <= kMaxSplits, "mla_decode: {} splits (1 to {})", splits, kMaxSplits);
    const int nhp = ceil_div(nh, kHeads) * kHeads;
    float* ws_o = static_cast<float*>(ws);
    float2* ws_ml = reinterpret_cast<float2*>(ws_o + size_t(B) * splits * nhp * r);
    switch (r) {
      case 64: launch_fast<64>(q_lat, q_pe, pool, meta, B, nh, dr, bs, splits, scale, ws_o, ws_ml, out_lat, s); break;
      case 128: launch_fast<128>(q_lat, q_pe, pool, meta, B, nh, dr, bs, splits, scale, ws_o, ws_ml, out_lat, s); break;
      case 256: launch_fast<256>(q_lat, q_pe, pool, meta, B, nh, dr, bs, splits, scale, ws_o, ws_ml, out_lat, s); break;
      default: launch_fast<512>(q_lat, q_pe, pool, meta, B, nh, dr, bs, splits, scale, ws_o, ws_ml, out_lat, s); break;
    }
    DSV3_CUDA_KERNEL_CHECK();
    if (splits > 1)
      launch(mla_decode_combine_kernel, dim3(B, nh, ceil_div(r, kCombineCols)), dim3(kCombineThreads), 0, s, out_lat,
             ws_o, ws_ml, nh, nhp, r, splits);
  } else {
    launch(mla_decode_ref_kernel<bf16>, dim3(B, nh), dim3(128), 0, s, out_lat, q_lat, q_pe, pool, meta, B, nh, r, dr, bs, max_n, scale,
                                                      static_cast<float*>(ws));
  }
  DSV3_CUDA_KERNEL_CHECK();
}

}  // namespace dsv3::cuda
