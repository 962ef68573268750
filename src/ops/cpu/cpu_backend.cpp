// The CPU reference backend: fp32 activations, OpenBLAS for matrix products, OpenMP for the rest.
#include <cmath>
#include <cstring>
#include <map>
#include <mutex>

#include "core/fp8.h"
#include "ops/cpu/cpu_ops.h"
#include "ops/cpu/gemm.h"

namespace dsv3 {

namespace {

// Recycles activation buffers by exact size: a forward pass allocates the same shapes every step, and fresh
// pages from the OS cost a page fault and a zeroing each (measured: ~7% of a decode step).
class BufferPool : public std::enable_shared_from_this<BufferPool> {
 public:
  std::shared_ptr<void> get(size_t bytes) {
    bytes = (bytes + 63) / 64 * 64;
    if (bytes == 0) bytes = 64;
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        p = it->second.back();
        it->second.pop_back();
        held_ -= bytes;
      }
    }
    if (!p) p = std::aligned_alloc(64, bytes);
    if (!p) fail("out of memory allocating {} bytes", bytes);
    std::weak_ptr<BufferPool> self = shared_from_this();
    return std::shared_ptr<void>(p, [self, bytes](void* q) {
      if (auto pool = self.lock()) pool->put(q, bytes);
      else std::free(q);
    });
  }
  ~BufferPool() {
    for (auto& [n, v] : free_)
      for (void* p : v) std::free(p);
  }

 private:
  void put(void* p, size_t bytes) {
    std::lock_guard<std::mutex> g(mu_);
    if (held_ + bytes > kMaxHeld) {
      std::free(p);
      return;
    }
    free_[bytes].push_back(p);
    held_ += bytes;
  }
  static constexpr size_t kMaxHeld = size_t(2) << 30;  // cap what idle buffers may hold
  std::mutex mu_;
  std::map<size_t, std::vector<void*>> free_;
  size_t held_ = 0;
};

class CpuBackend final : public Backend {
 public:
  Device device() const override { return Device::CPU; }
  std::string name() const override { return "cpu"; }
  DType act_dtype() const override { return DType::F32; }

  Tensor alloc(DType t, Shape s, const char* name) override {
    Tensor r;
    r.name = name;
    r.dtype = t;
    r.shape = std::move(s);
    r.storage = pool_->get(r.nbytes());
    r.data = r.storage.get();
    return r;
  }
  Tensor upload(const Tensor& host) override { return host; }
  Tensor to_host(const Tensor& t) override { return t; }
  Tensor alloc_kv_pool(const KvPoolSpec& spec) override {
    return Tensor::zeros(DType::F32, {spec.layers, spec.num_blocks, spec.block_size, spec.row()}, "kv_pool");
  }

  void zero(Tensor& t) override { std::memset(t.data, 0, t.nbytes()); }
  void gather_rows(Tensor& out, const Tensor& x, const std::vector<int64_t>& rows) override {
    const int64_t C = x.dim(-1);
    for (size_t i = 0; i < rows.size(); ++i) std::memcpy(out.f32() + i * C, x.f32() + rows[i] * C, C * 4);
  }
  void embedding(Tensor& out, const Tensor& table, const std::vector<int32_t>& ids) override {
    const int64_t H = table.dim(1);
#pragma omp parallel for schedule(static) if (ids.size() > 64)
    for (int64_t t = 0; t < int64_t(ids.size()); ++t)
      cpu::widen_rows(out.f32() + t * H, H, static_cast<const char*>(table.data) + size_t(ids[t]) * H * dtype_size(table.dtype),
                      table.dtype, H, 1, H);
  }
  void rmsnorm(Tensor& out, const Tensor& x, const Tensor& w, float eps, int64_t x_stride) override {
    const int64_t D = out.dim(-1), T = out.numel() / D;
    cpu::rmsnorm(out.f32(), x.f32(), x_stride ? x_stride : D, w, T, D, eps);
  }
  void add(Tensor& out, const Tensor& a, const Tensor& b) override {
    const int64_t n = out.numel();
    float* o = out.f32();
    const float *pa = a.f32(), *pb = b.f32();
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) o[i] = pa[i] + pb[i];
  }
  void silu_mul(Tensor& out, const Tensor& gate, const Tensor& up) override {
    const int64_t n = out.numel();
    float* o = out.f32();
    const float *g = gate.f32(), *u = up.f32();
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t i = 0; i < n; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
  }
  void copy_cols(Tensor& out, const Tensor& x, int64_t c0) override {
    const int64_t T = out.dim(0), n = out.dim(1), C = x.dim(-1);
    for (int64_t t = 0; t < T; ++t) std::memcpy(out.f32() + t * n, x.f32() + t * C + c0, n * 4);
  }
  void concat_cols(Tensor& out, const Tensor& a, const Tensor& b) override {
    const int64_t T = out.dim(0), na = a.dim(-1), nb = b.dim(-1);
    for (int64_t t = 0; t < T; ++t) {
      std::memcpy(out.f32() + t * (na + nb), a.f32() + t * na, na * 4);
      std::memcpy(out.f32() + t * (na + nb) + na, b.f32() + t * nb, nb * 4);
    }
  }
  void linear(Tensor& y, const Tensor& x, const Tensor& w) override {
    const int64_t K = w.dim(1), N = w.dim(0), M = x.numel() / K;
    DSV3_CHECK(x.numel() == M * K && y.numel() == M * N, "linear {}: x {} y {} w {}", w.name, shape_str(x.shape),
               shape_str(y.shape), shape_str(w.shape));
    if (w.dtype == DType::F8E4M3) {
      Tensor xq = fp8_activation(x, M, K);
      cpu::gemm_xwT_fp8(M, N, K, xq.f32(), K, w.ptr<uint8_t>(), fp8_scales(w), y.f32(), N);
      return;
    }
    cpu::gemm_xwT(M, N, K, x.f32(), K, w.data, w.dtype, K, y.f32(), N);
  }
  void rope(Tensor& x, int64_t n, int64_t stride, int64_t off, const std::vector<int32_t>& pos, const Tensor& cos,
            const Tensor& sin, bool interleave) override {
    cpu::rope(x.f32(), int64_t(pos.size()), n, stride, off, cos.dim(1) * 2, pos.data(), cos.f32(), sin.f32(), interleave);
  }
  void kv_write(Tensor& pool, const KvPoolSpec& spec, int64_t layer, const std::vector<SeqSlice>& seqs,
                const Tensor& c, const Tensor& kpe) override {
    const int64_t r = spec.kv_lora_rank, dr = spec.rope_dim, bs = spec.block_size;
    float* base = pool.f32() + size_t(layer) * spec.num_blocks * bs * spec.row();
    for (auto& s : seqs)
      for (int64_t i = 0; i < s.len; ++i) {
        int64_t p = s.pos0 + i;
        DSV3_CHECK(p / bs < s.num_blocks, "kv_write: position {} beyond the sequence's {} blocks", p, s.num_blocks);
        float* dst = base + (size_t(s.blocks[p / bs]) * bs + p % bs) * spec.row();
        std::memcpy(dst, c.f32() + (s.row0 + i) * r, r * 4);
        std::memcpy(dst + r, kpe.f32() + (s.row0 + i) * dr, dr * 4);
      }
  }
  void kv_gather(Tensor& c_out, Tensor& kpe_out, const Tensor& pool, const KvPoolSpec& spec, int64_t layer,
                 const SeqSlice& s, int64_t n) override {
    const int64_t r = spec.kv_lora_rank, dr = spec.rope_dim, bs = spec.block_size;
    const float* base = pool.f32() + size_t(layer) * spec.num_blocks * bs * spec.row();
    for (int64_t p = 0; p < n; ++p) {
      const float* src = base + (size_t(s.blocks[p / bs]) * bs + p % bs) * spec.row();
      std::memcpy(c_out.f32() + p * r, src, r * 4);
      std::memcpy(kpe_out.f32() + p * dr, src + r, dr * 4);
    }
  }
  void mla_attention(Tensor& out, const Tensor& q, const Tensor& kv, const Tensor& kpe, int64_t pos0, int64_t nh,
                     int64_t dn, int64_t dr, int64_t dv, float scale) override {
    cpu::mla_attention(out.f32(), q.f32(), kv.f32(), kpe.f32(), q.dim(0), pos0, nh, dn, dr, dv, scale);
  }
  void mla_decode(Tensor& out_lat, const Tensor& q_lat, const Tensor& q_pe, const Tensor& pool,
                  const KvPoolSpec& spec, int64_t layer, const std::vector<SeqSlice>& seqs, float scale) override {
    cpu::mla_decode(out_lat, q_lat, q_pe, pool, spec, layer, seqs, scale);
  }
  void mla_absorb_q(Tensor& q_lat, const Tensor& q, const Tensor& kv_b, int64_t nh, int64_t dn, int64_t dr,
                    int64_t dv) override {
    // q_lat[b, h, :] = sum_d q[b, h, d] W_UK[h][d, :]: a row-combination of W_UK[h] per query. One parallel
    // pass over heads (each head's [dn, r] block is read once for all B queries).
    const int64_t B = q.dim(0), r = kv_b.dim(1);
    DSV3_CHECK(kv_b.dtype != DType::F8E4M3, "mla_absorb_q: kv_b_proj must not be fp8 (kept dequantized)");
    const bool bf = kv_b.dtype == DType::BF16;
#pragma omp parallel for schedule(static)
    for (int64_t h = 0; h < nh; ++h) {
      std::vector<float> wrow(r);
      float* out0 = q_lat.f32() + h * r;
      for (int64_t b = 0; b < B; ++b) std::fill(out0 + b * nh * r, out0 + b * nh * r + r, 0.f);
      for (int64_t d = 0; d < dn; ++d) {
        const int64_t row = h * (dn + dv) + d;
        if (bf) cpu::widen_rows(wrow.data(), r, kv_b.ptr<uint16_t>() + row * r, DType::BF16, r, 1, r);
        const float* w = bf ? wrow.data() : kv_b.ptr<float>() + row * r;
        for (int64_t b = 0; b < B; ++b) {
          const float qv = q.f32()[b * nh * (dn + dr) + h * (dn + dr) + d];
          float* o = out0 + b * nh * r;
          for (int64_t i = 0; i < r; ++i) o[i] += qv * w[i];
        }
      }
    }
  }
  void mla_absorb_out(Tensor& out, const Tensor& o_lat, const Tensor& kv_b, int64_t nh, int64_t dn,
                      int64_t dv) override {
    const int64_t B = o_lat.dim(0), r = kv_b.dim(1);
    DSV3_CHECK(kv_b.dtype != DType::F8E4M3, "mla_absorb_out: kv_b_proj must not be fp8 (kept dequantized)");
    const size_t es = dtype_size(kv_b.dtype);
    if (B <= cpu::kSmallM) {  // decode: every head's W_UV in one parallel pass
      std::vector<cpu::GemvJob> jobs;
      for (int64_t h = 0; h < nh; ++h)
        jobs.push_back({static_cast<const char*>(kv_b.data) + size_t((h * (dn + dv) + dn) * r) * es, kv_b.dtype, dv, r,
                        r, o_lat.f32() + h * r, nh * r, out.f32() + h * dv, nh * dv, B});
      cpu::gemv_multi(jobs);
      return;
    }
    for (int64_t h = 0; h < nh; ++h) {
      const char* w = static_cast<const char*>(kv_b.data) + size_t((h * (dn + dv) + dn) * r) * es;
      cpu::gemm_xwT(B, dv, r, o_lat.f32() + h * r, nh * r, w, kv_b.dtype, r, out.f32() + h * dv, nh * dv);
    }
  }
  // DeepSeek-V3.2 sparse attention (ops/cpu/dsa.cpp, ops/cpu/attention.cpp).
  void layernorm(Tensor& out, const Tensor& x, const Tensor& w, const Tensor& b, float eps) override {
    const int64_t D = out.dim(-1), T = out.numel() / D;
    cpu::layernorm(out.f32(), x.f32(), w, b, T, D, eps);
  }
  void index_key_write(Tensor& pool, const KvPoolSpec& spec, int64_t layer, const std::vector<SeqSlice>& seqs,
                       const Tensor& k) override {
    DSV3_CHECK(k.dim(-1) == spec.index_dim, "index_key_write: keys {} for index_dim {}", shape_str(k.shape), spec.index_dim);
    cpu::index_key_write(pool, spec, layer, seqs, k.f32());
  }
  void dsa_select(Tensor& sel, const Tensor& q, const Tensor& w, const Tensor& pool, const KvPoolSpec& spec,
                  int64_t layer, const std::vector<SeqSlice>& seqs, float q_scale, float w_scale) override {
    const int64_t T = sel.dim(0), nI = w.dim(1);
    DSV3_CHECK(sel.dtype == DType::I32 && q.numel() == T * nI * spec.index_dim && w.numel() == T * nI,
               "dsa_select: sel {} q {} w {}", shape_str(sel.shape), shape_str(q.shape), shape_str(w.shape));
    cpu::dsa_select(sel.ptr<int32_t>(), sel.dim(1), q.f32(), w.f32(), nI, pool, spec, layer, seqs, q_scale, w_scale);
  }
  void mla_attention_sparse(Tensor& out, const Tensor& q, const Tensor& kv, const Tensor& kpe, const Tensor& sel,
                            int64_t pos0, int64_t nh, int64_t dn, int64_t dr, int64_t dv, float scale) override {
    DSV3_CHECK(sel.dtype == DType::I32 && sel.dim(0) == q.dim(0), "mla_attention_sparse: sel {} for q {}",
               shape_str(sel.shape), shape_str(q.shape));
    cpu::mla_attention(out.f32(), q.f32(), kv.f32(), kpe.f32(), q.dim(0), pos0, nh, dn, dr, dv, scale,
                       sel.ptr<int32_t>(), sel.dim(1));
  }
  void mla_decode_sparse(Tensor& out_lat, const Tensor& q_lat, const Tensor& q_pe, const Tensor& pool,
                         const KvPoolSpec& spec, int64_t layer, const std::vector<SeqSlice>& seqs, const Tensor& sel,
                         float scale) override {
    DSV3_CHECK(sel.dtype == DType::I32 && sel.dim(0) == int64_t(seqs.size()), "mla_decode_sparse: sel {} for {} sequences",
               shape_str(sel.shape), seqs.size());
    cpu::mla_decode(out_lat, q_lat, q_pe, pool, spec, layer, seqs, scale, &sel);
  }

  void moe_route(Tensor& topk_idx, Tensor& topk_w, const Tensor& logits, const Tensor& bias,
                 const RouteParams& p) override {
    cpu::moe_route(topk_idx.ptr<int32_t>(), topk_w.f32(), logits.f32(), bias ? bias.f32() : nullptr, logits.dim(0), p);
  }
  void moe_experts_acc(Tensor& out, const Tensor& x, const Tensor& topk_idx, const Tensor& topk_w, const Tensor& gate,
                       const Tensor& up, const Tensor& down) override {
    cpu::moe_experts_acc(out.f32(), x.f32(), topk_idx.ptr<int32_t>(), topk_w.f32(), x.dim(0), topk_idx.dim(1),
                         x.dim(1), gate, up, down);
  }

  // Fused ops: the compositions backend.h defines them by (the reference the device kernels are tested against).
  void linear_swiglu(Tensor& out, const Tensor& x, const Tensor& gate, const Tensor& up) override {
    Tensor u = alloc(DType::F32, out.shape, "swiglu_up");
    if (gate.dtype == DType::F8E4M3 && up.dtype == DType::F8E4M3) {  // x quantized once for both products
      const int64_t K = gate.dim(1), N = gate.dim(0), M = x.numel() / K;
      DSV3_CHECK(x.numel() == M * K && out.numel() == M * N && up.shape == gate.shape, "linear_swiglu {}: x {} out {}",
                 gate.name, shape_str(x.shape), shape_str(out.shape));
      Tensor xq = fp8_activation(x, M, K);
      cpu::gemm_xwT_fp8(M, N, K, xq.f32(), K, gate.ptr<uint8_t>(), fp8_scales(gate), out.f32(), N);
      cpu::gemm_xwT_fp8(M, N, K, xq.f32(), K, up.ptr<uint8_t>(), fp8_scales(up), u.f32(), N);
    } else {
      linear(out, x, gate);
      linear(u, x, up);
    }
    silu_mul(out, out, u);
  }
  void kv_norm_rope_write(Tensor& pool, const KvPoolSpec& spec, int64_t layer, const std::vector<SeqSlice>& seqs,
                          const Tensor& kva, const Tensor& norm_w, float eps, const std::vector<int32_t>& pos,
                          const Tensor& cos, const Tensor& sin, bool interleave) override {
    const int64_t T = kva.dim(0), r = spec.kv_lora_rank, dr = spec.rope_dim;
    DSV3_CHECK(kva.numel() == T * (r + dr) && int64_t(pos.size()) == T, "kv_norm_rope_write: kv_a {} for {} positions",
               shape_str(kva.shape), pos.size());
    Tensor c = alloc(DType::F32, {T, r}, "c"), kpe = alloc(DType::F32, {T, dr}, "k_pe");
    rmsnorm(c, kva, norm_w, eps, r + dr);
    copy_cols(kpe, kva, r);
    rope(kpe, 1, dr, 0, pos, cos, sin, interleave);
    kv_write(pool, spec, layer, seqs, c, kpe);
  }
  void mla_decode_q(Tensor& q_lat, Tensor& q_pe, const Tensor& q, const Tensor& kv_b, int64_t nh, int64_t dn,
                    int64_t dr, int64_t dv, const std::vector<int32_t>& pos, const Tensor& cos, const Tensor& sin,
                    bool interleave) override {
    const int64_t B = q.dim(0);
    DSV3_CHECK(q.numel() == B * nh * (dn + dr) && q_pe.numel() == B * nh * dr && int64_t(pos.size()) == B,
               "mla_decode_q: q {} q_pe {} for {} positions", shape_str(q.shape), shape_str(q_pe.shape), pos.size());
    mla_absorb_q(q_lat, q, kv_b, nh, dn, dr, dv);
    Tensor qp = q_pe.reshape({B * nh, dr});
    copy_cols(qp, q.reshape({B * nh, dn + dr}), dn);
    rope(qp, nh, dr, 0, pos, cos, sin, interleave);
  }

 private:
  // The FP8 activation operand: x [M, K] quantized in 1x128 tiles and dequantized (values code x tile scale).
  Tensor fp8_activation(const Tensor& x, int64_t M, int64_t K) {
    Tensor xq = alloc(DType::F32, {M, K}, "x_fp8");
    std::memcpy(xq.data, x.data, size_t(M * K) * 4);
    fp8::round_trip_1x128(xq.f32(), M, K, K);
    return xq;
  }
  static const float* fp8_scales(const Tensor& w) {
    DSV3_CHECK(w.scale, "fp8 weight {} has no block scales", w.name);
    return w.scale;
  }
  std::shared_ptr<BufferPool> pool_ = std::make_shared<BufferPool>();
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

std::unique_ptr<Backend> make_backend(const std::string& device) {
  if (device == "cpu") return make_cpu_backend();
  if (device == "cuda") return make_cuda_backend(0);
  if (device.rfind("cuda:", 0) == 0) {
    int idx = 0;
    try {
      idx = std::stoi(device.substr(5));
    } catch (...) {
      fail("bad device '{}' (expected cpu, cuda or cuda:N)", device);
    }
    return make_cuda_backend(idx);
  }
  fail("unknown device '{}' (expected cpu, cuda or cuda:N)", device);
}

}  // namespace dsv3
