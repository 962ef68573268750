#pragma once
// The backend interface: every op the model needs, declared once, implemented per device
// (ops/cpu is the reference; ops/cuda the Hopper backend). Model code calls only these, so it has no
// device-specific branches. Conventions:
//  - PyTorch dimension order, a Linear is y = x W^T with W [out, in].
//  - Activations are allocated by the backend (alloc) in its activation dtype (fp32 on the CPU).
//  - Weights may be F32 or BF16, or, for the FP8 inference mode (--dtype fp8), F8E4M3 with 128x128 block
//    scales in Tensor::scale (core/fp8.h). An op given an F8E4M3 weight (linear, linear_swiglu,
//    moe_experts_acc) computes the DeepSeek-V3 FP8 product: the activation is quantized in 1x128 tiles
//    (fp8::quantize_1x128), each 128-wide K block's partial sum of code products is taken in fp32 and scaled by
//    both tiles' scales (promotion every 128 elements of K), so the CPU emulation (dequantize + fp32 GEMM) and
//    the GPU kernels compute the same function up to fp32 summation order.
//  - Outputs are overwritten unless the name says accumulate (`_acc`: out += ...).
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace dsv3 {

struct ModelConfig;

// The latent KV cache of MLA in fixed-size blocks (paged): for every layer and every cached token, the
// normalized latent c (kv_lora_rank) followed by the rotated k_pe (qk_rope_head_dim) and, for DeepSeek-V3.2
// (DSA), the rotated indexer key (index_dim; 0 otherwise). A sequence owns a list of blocks; position p of a
// sequence lives in block table[p / block_size] at slot p % block_size.
struct KvPoolSpec {
  int64_t layers = 0, num_blocks = 0, block_size = 64, kv_lora_rank = 0, rope_dim = 0, index_dim = 0;
  int64_t row() const { return kv_lora_rank + rope_dim + index_dim; }
};

// One sequence of a forward batch: `len` new tokens at rows [row0, row0 + len) of the batch, at positions
// [pos0, pos0 + len); its cache blocks.
struct SeqSlice {
  int64_t row0 = 0, len = 0, pos0 = 0;
  const int32_t* blocks = nullptr;  // block table (host memory), covers pos0 + len positions
  int64_t num_blocks = 0;
};

// Identifies a whole-step graph (see Backend::begin_graph_step): a pure decode step of `batch` sequences, one new
// token each, whose block tables need at most `kv_blocks` blocks (the backend rounds it up to a capacity bucket).
struct GraphStepKey {
  int64_t batch = 0, kv_blocks = 0;
};

// Router hyper-parameters (from the config) for moe_route.
struct RouteParams {
  int64_t n_experts = 0, top_k = 0, n_group = 1, topk_group = 1;
  bool sigmoid = true, norm_topk_prob = true, group_limited = true, noaux_bias = true;
  double scaling = 1.0;
  static RouteParams from_config(const ModelConfig& cfg);  // the config's routing rule
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;
  virtual DType act_dtype() const = 0;

  // ---- memory
  virtual Tensor alloc(DType t, Shape s, const char* name = "") = 0;          // uninitialized
  virtual Tensor upload(const Tensor& host) = 0;                               // copy of a CPU tensor here
  virtual Tensor to_host(const Tensor& t) = 0;                                 // CPU copy, as fp32 for float dtypes
  // [layers, blocks, block, r + dr], zeroed; fp32 on the CPU, bf16 on CUDA (halves the bytes decode reads).
  virtual Tensor alloc_kv_pool(const KvPoolSpec& spec) = 0;
  virtual void synchronize() {}
  // Fills a float tensor (F32 or BF16) with mean + std * N(0, 1) from a counter-based generator: element i
  // depends only on (seed, i), so backends agree and large random models can be made in place (benchmarks,
  // tests). The default works on CPU tensors; device backends override it.
  virtual void fill_normal(Tensor& t, float mean, float std, uint64_t seed);
  // Weights straight from a checkpoint into a flat parameter buffer of this backend (F32 or BF16), so a model
  // is never held twice in host memory: n elements of src (host memory, typically an mmap'd safetensors
  // tensor of dtype src_dt) converted into flat[offset, offset + n). The defaults work on CPU tensors.
  virtual void write_weights(Tensor& flat, int64_t offset, const void* src, DType src_dt, int64_t n);
  // An fp8 e4m3 weight [N, K] (host) times its block scales scale [ceil(N/bn), ceil(K/bk)] (host fp32), exactly
  // as in fp32 (one product per element), into flat[offset, offset + N*K).
  virtual void write_weights_fp8(Tensor& flat, int64_t offset, const uint8_t* w8, const float* scale, int64_t N,
                                 int64_t K, int64_t bn, int64_t bk);

  // Raw bytes into a buffer of this backend: dst's memory at [byte_offset, byte_offset + bytes) = src (host).
  // Used for fp8 codes and scales, which are stored as they are. The default works on CPU tensors.
  virtual void write_raw(Tensor& dst, size_t byte_offset, const void* src, size_t bytes);

  // ---- elementwise / norms
  virtual void zero(Tensor& t) = 0;
  // out[i, :] = x[rows[i], :]; x [T, C], rows host int64.
  virtual void gather_rows(Tensor& out, const Tensor& x, const std::vector<int64_t>& rows) = 0;
  // out[T, H] = table[ids[t], :]; ids host int32 [T]; every id checked < V by the caller.
  virtual void embedding(Tensor& out, const Tensor& table, const std::vector<int32_t>& ids) = 0;
  // out[T, D] = x * rsqrt(mean(x^2) + eps) * w, rows of x may have a stride (x_stride >= D; 0 = D).
  virtual void rmsnorm(Tensor& out, const Tensor& x, const Tensor& w, float eps, int64_t x_stride = 0) = 0;
  virtual void add(Tensor& out, const Tensor& a, const Tensor& b) = 0;            // out = a + b
  virtual void silu_mul(Tensor& out, const Tensor& gate, const Tensor& up) = 0;  // out = silu(gate) * up
  // Columns [c0, c0 + out.cols) of x [T, C] into out [T, n].
  virtual void copy_cols(Tensor& out, const Tensor& x, int64_t c0) = 0;
  // out[T, a + b] = concat(a [T, a], b [T, b]) along columns.
  virtual void concat_cols(Tensor& out, const Tensor& a, const Tensor& b) = 0;

  // ---- matrices
  // y[M, N] = x[M, K] W[N, K]^T.
  virtual void linear(Tensor& y, const Tensor& x, const Tensor& w) = 0;

  // ---- rotary embedding, applied in place to x viewed as [T, n, stride] on columns [off, off + dr) of each
  // of the n rows; positions host int32 [T]; cos/sin tables [max_pos, dr/2] made by make_rope_tables.
  virtual void rope(Tensor& x, int64_t n, int64_t stride, int64_t off, const std::vector<int32_t>& pos,
                    const Tensor& cos, const Tensor& sin, bool interleave) = 0;

  // ---- MLA attention over the paged latent cache
  // Write c [T, r] and k_pe [T, dr] of each sequence's new tokens into its cache blocks.
  virtual void kv_write(Tensor& pool, const KvPoolSpec& spec, int64_t layer, const std::vector<SeqSlice>& seqs,
                        const Tensor& c, const Tensor& kpe) = 0;
  // Gather the first n positions of one sequence: c_out [n, r], kpe_out [n, dr].
  virtual void kv_gather(Tensor& c_out, Tensor& kpe_out, const Tensor& pool, const KvPoolSpec& spec, int64_t layer,
                         const SeqSlice& seq, int64_t n) = 0;
  // Causal attention for one sequence's `len` new queries at positions pos0.. against n = pos0 + len keys:
  // q [len, nh, dn + dr] (nope then pe), kv [n, nh, dn + dv] (k_nope then v), kpe [n, dr] shared by heads;
  // out [len, nh, dv].
  virtual void mla_attention(Tensor& out, const Tensor& q, const Tensor& kv, const Tensor& kpe, int64_t pos0,
                             int64_t nh, int64_t dn, int64_t dr, int64_t dv, float scale) = 0;
  // Absorbed decode, one query per sequence (row b of q_lat/q_pe is sequence b, at position pos0 = n - 1):
  // q_lat [B, nh, r], q_pe [B, nh, dr]; out_lat [B, nh, r] = sum_t softmax_t(q_lat.c_t + q_pe.kpe_t) c_t.
  virtual void mla_decode(Tensor& out_lat, const Tensor& q_lat, const Tensor& q_pe, const Tensor& pool,
                          const KvPoolSpec& spec, int64_t layer, const std::vector<SeqSlice>& seqs, float scale) = 0;
  // q_lat[b, h, :] = q[b, h, :dn] . W_UK[h]   where W_UK[h] = kv_b_proj rows [h*(dn+dv), h*(dn+dv)+dn) [dn, r];
  // q [B, nh, dn + dr].
  virtual void mla_absorb_q(Tensor& q_lat, const Tensor& q, const Tensor& kv_b, int64_t nh, int64_t dn,
                            int64_t dr, int64_t dv) = 0;
  // out[b, h, :] = W_UV[h] . o_lat[b, h, :]   where W_UV[h] = kv_b_proj rows [h*(dn+dv)+dn, (h+1)*(dn+dv)) [dv, r].
  virtual void mla_absorb_out(Tensor& out, const Tensor& o_lat, const Tensor& kv_b, int64_t nh, int64_t dn,
                              int64_t dv) = 0;

  // ---- DeepSeek-V3.2 sparse attention (DSA): the lightning indexer and MLA over the keys it selects
  // out[T, D] = (x - mean(x)) / sqrt(var(x) + eps) * w + b per row (LayerNorm, biased variance); w, b [D].
  virtual void layernorm(Tensor& out, const Tensor& x, const Tensor& w, const Tensor& b, float eps) = 0;
  // Write the index keys k [T, index_dim] of each sequence's new tokens into the index part of their cache rows.
  virtual void index_key_write(Tensor& pool, const KvPoolSpec& spec, int64_t layer, const std::vector<SeqSlice>& seqs,
                               const Tensor& k) = 0;
  // Top-k token selection. For each new token (row r of a sequence, at position p) and every cached position
  // j <= p of that sequence: I[r, j] = sum_h (w[r, h] * w_scale) * relu((q[r, h, :] . k_j) * q_scale), with
  // q [T, nI, index_dim], w [T, nI] fp32, k_j the cached index keys. sel [T, K] int32 gets the K = sel.dim(1)
  // positions of highest I, best first (ties: lower position first), padded with -1 when p + 1 < K.
  virtual void dsa_select(Tensor& sel, const Tensor& q, const Tensor& w, const Tensor& pool, const KvPoolSpec& spec,
                          int64_t layer, const std::vector<SeqSlice>& seqs, float q_scale, float w_scale) = 0;
  // mla_attention where query i attends only to the positions listed in sel[i, :] (sel [len, K] int32, entries
  // -1 ignored; every listed position is causally visible).
  virtual void mla_attention_sparse(Tensor& out, const Tensor& q, const Tensor& kv, const Tensor& kpe,
                                    const Tensor& sel, int64_t pos0, int64_t nh, int64_t dn, int64_t dr, int64_t dv,
                                    float scale) = 0;
  // mla_decode where sequence b attends only to the positions in sel[b, :] (sel [B, K] int32, -1 ignored).
  virtual void mla_decode_sparse(Tensor& out_lat, const Tensor& q_lat, const Tensor& q_pe, const Tensor& pool,
                                 const KvPoolSpec& spec, int64_t layer, const std::vector<SeqSlice>& seqs,
                                 const Tensor& sel, float scale) = 0;

  // ---- DeepSeekMoE
  // From router logits [T, E] (fp32) and the selection bias [E]: expert ids [T, K] (int32) and weights
  // [T, K] (fp32), exactly as the config's routing rule says.
  virtual void moe_route(Tensor& topk_idx, Tensor& topk_w, const Tensor& logits, const Tensor& bias,
                         const RouteParams& p) = 0;
  // out[T, H] += sum_k w[t, k] * Expert_{idx[t, k]}(x[t]); experts as grouped tensors
  // gate/up [E, I, H], down [E, H, I]. Experts that received no token cost nothing.
  virtual void moe_experts_acc(Tensor& out, const Tensor& x, const Tensor& topk_idx, const Tensor& topk_w,
                               const Tensor& gate, const Tensor& up, const Tensor& down) = 0;

  // ---- fused decode ops: each is exactly the composition its comment names (the CPU runs that composition);
  // a device backend may run it as one kernel, which matters at decode sizes where every kernel costs a few
  // microseconds whatever its bytes.
  // out[T, I] = silu(x gate^T) * (x up^T), gate/up [I, H]: linear, linear, silu_mul (the SwiGLU input).
  virtual void linear_swiglu(Tensor& out, const Tensor& x, const Tensor& gate, const Tensor& up) = 0;
  // The step's new cache rows from kv_a [T, r + dr] = [c_raw | k_pe_raw] (row t at position pos[t]):
  // c = rmsnorm(c_raw) * norm_w; k_pe = rope(k_pe_raw); kv_write(pool, spec, layer, seqs, c, k_pe).
  virtual void kv_norm_rope_write(Tensor& pool, const KvPoolSpec& spec, int64_t layer,
                                  const std::vector<SeqSlice>& seqs, const Tensor& kva, const Tensor& norm_w, float eps,
                                  const std::vector<int32_t>& pos, const Tensor& cos, const Tensor& sin,
                                  bool interleave) = 0;
  // The absorbed-decode queries from q [B, nh, dn + dr] whose rope part is not yet rotated (row b at position
  // pos[b]): q_lat [B, nh, r] as mla_absorb_q, and q_pe [B, nh, dr] = rope(q[:, :, dn:]) (q is not modified).
  virtual void mla_decode_q(Tensor& q_lat, Tensor& q_pe, const Tensor& q, const Tensor& kv_b, int64_t nh, int64_t dn,
                            int64_t dr, int64_t dv, const std::vector<int32_t>& pos, const Tensor& cos,
                            const Tensor& sin, bool interleave) = 0;

  // ---- whole-step graphs (optional; the defaults run everything eagerly)
  // A pure decode step has the same op sequence and shapes every time for a given key, so a device backend may
  // record it once and replay the recording, paying one launch instead of hundreds. The model brackets such a
  // step (ops from the embedding to the logits product, no host reads in between):
  //   if (be.begin_graph_step(key)) { ops...; if (!be.end_graph_step()) ops again, eagerly; }
  //   (cancel_graph_step() instead of end when an op throws).
  // Between begin and end the backend may only record the ops, or match them against an earlier recording and
  // take their host metadata (ids, positions, block tables); the work is enqueued by end_graph_step. Tensors
  // allocated inside belong to the recording: they stay valid until the next step with the same key (copy what
  // must outlive it). end_graph_step returns false when nothing was enqueued (the step could not be recorded):
  // the caller runs the same ops again without begin. begin returns false to mean "run eagerly" (first use of a
  // key, profiling, switched off, or a backend without graphs).
  virtual bool begin_graph_step(const GraphStepKey& key) {
    (void)key;
    return false;
  }
  virtual bool end_graph_step() { return true; }
  virtual void cancel_graph_step() {}
};

// Fails unless flat is F32 or BF16 and [offset, offset + n) lies inside it (every write_weights implementation).
void check_weight_dest(const Tensor& flat, int64_t offset, int64_t n);
// The host forms of Backend::write_weights / write_weights_fp8 (flat in CPU memory; the loader's host path).
void write_weights_host(Tensor& flat, int64_t offset, const void* src, DType src_dt, int64_t n);
void write_weights_fp8_host(Tensor& flat, int64_t offset, const uint8_t* w8, const float* scale, int64_t N,
                            int64_t K, int64_t bn, int64_t bk);

inline void Backend::fill_normal(Tensor& t, float mean, float std, uint64_t seed) {
  if (t.device != Device::CPU) fail("fill_normal: backend {} cannot fill device tensor {}", name(), t.name);
  if (t.dtype != DType::F32 && t.dtype != DType::BF16) fail("fill_normal: tensor {} is not F32 or BF16", t.name);
  auto mix = [](uint64_t z) {  // splitmix64 finalizer
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  };
  const int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i) {
    const uint64_t h = mix(seed ^ mix(uint64_t(i)));
    const float u1 = float((h >> 40) + 1) * 5.9604645e-08f, u2 = float(h & 0xffffffull) * 5.9604645e-08f;
    const float v = mean + std * (std::sqrt(-2.f * std::log(u1)) * std::cos(6.2831853f * u2));
    if (t.dtype == DType::F32) t.ptr<float>()[i] = v;
    else t.ptr<uint16_t>()[i] = f32_to_bf16(v);
  }
}

// The CPU reference backend (always available).
std::unique_ptr<Backend> make_cpu_backend();
// The CUDA backend; throws InputError when dsv3 was built without CUDA or no GPU is present.
std::unique_ptr<Backend> make_cuda_backend(int device_index = 0);
bool cuda_available();
std::unique_ptr<Backend> make_backend(const std::string& device);  // "cpu" | "cuda" | "cuda:N"

// RoPE tables for a config (YaRN included): cos, sin [max_pos, dr/2] fp32 on the CPU.
void make_rope_tables(const ModelConfig& cfg, int64_t max_pos, Tensor* cos, Tensor* sin);

}  // namespace dsv3
