// The CUDA (Hopper) backend: bf16 activations with fp32 accumulation, bf16 latent cache, cuBLAS for dense
// products, own kernels for skinny (decode) products, norms, RoPE, MLA attention and the MoE router/dispatch.
// Every op is enqueued on one stream; the host waits only in to_host() and synchronize() (and once per MoE
// layer in prefill, to size the grouped expert GEMM). Host-side metadata (token ids, positions, cache block
// tables) is uploaded once per forward through content-checked slots: the 27 layers of a step reuse it.
// Pure decode steps may run as recorded CUDA graphs (step_graph.h): then alloc() and the uploads go through the
// recording, and every launch is skipped while a recording is replayed (skip()).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <tuple>

#include "core/fp8.h"
#include "ops/cuda/cuda_backend.h"
#include "ops/cuda/device.h"
#include "ops/cuda/fp8.h"
#include "ops/cuda/cudnn/attention.h"
#include "ops/cuda/sm90/grouped.h"
#include "ops/cuda/step_graph.h"

namespace dsv3 {

namespace {

using cuda::bf16;
using cuda::DeviceContext;

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::BF16: return CUDA_R_16BF;
    case DType::F32: return CUDA_R_32F;
    default: fail("no CUDA matrix type for dtype {}", dtype_name(t));
  }
}

// "model.layers.3.self_attn.q_proj.weight" -> "self_attn.q_proj"; "lm_head.weight" -> "lm_head".
std::string weight_kind(const std::string& name) {
  std::string s = name;
  if (s.rfind("model.layers.", 0) == 0) {
    size_t dot = s.find('.', 13);
    s = dot == std::string::npos ? s : s.substr(dot + 1);
  }
  if (s.size() > 7 && s.compare(s.size() - 7, 7, ".weight") == 0) s.resize(s.size() - 7);
  return s.empty() ? "?" : s;
}

class CudaBackend;

// FP8 products of at most kFp8SkinnyRows rows run on the skinny kernel; of at most kFp8QuantInBlockRows rows it also
// quantizes the activation itself (see linear_fp8).
constexpr int64_t kFp8SkinnyRows = 32, kFp8QuantInBlockRows = 8;

// Events around one op when profiling is on (they do not synchronize; read back in take_profile()).
class ProfScope {
 public:
  ProfScope(CudaBackend& be, const char* name, double bytes = 0);
  ProfScope(CudaBackend& be, std::string name, double bytes);
  ~ProfScope();

 private:
  CudaBackend* be_ = nullptr;
  size_t slot_ = 0;
};

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int dev) : dev_(dev), ctx_(DeviceContext::get(dev)) {
    DSV3_CUDA_CHECK(cudaSetDevice(dev));
    const char* e = std::getenv("DSV3_CUDA_SKINNY");
    skinny_ = !(e && std::string(e) == "0");
    const char* p = std::getenv("DSV3_CUDA_PROFILE");
    profiling_ = p && std::string(p) == "1";
    // DSV3_CUDA_ACT=f32: fp32 activations and cache, fp32 matrix products (no TF32) and simple attention kernels,
    // for exact comparisons with the CPU backend; not a fast path.
    const char* a = std::getenv("DSV3_CUDA_ACT");
    act_ = a && std::string(a) == "f32" ? DType::F32 : DType::BF16;
    // DSV3_CUDA_GRAPHS=0: every decode step eager (no whole-step graphs).
    const char* g = std::getenv("DSV3_CUDA_GRAPHS");
    graphs_on_ = !(g && std::string(g) == "0");
    // DSV3_CUDA_FP8_GEMM=mma: dense fp8 products above decode sizes on the grouped mma.sync kernel, not cuBLASLt.
    const char* f8 = std::getenv("DSV3_CUDA_FP8_GEMM");
    fp8_lt_ = !(f8 && std::string(f8) == "mma");
    // DSV3_CUDA_FP8_QUANT=in-block: decode-sized fp8 products quantize their activation inside the skinny kernel
    // instead of reading it quantized by a separate launch. Measured on infer-m (one H200, same run): batch 1
    // 281 vs 275 tok/s, batch 32 1,758 vs 2,609 (every short block redoing the quantization costs more than the
    // launch it saves), so separate is the default.
    const char* fq = std::getenv("DSV3_CUDA_FP8_QUANT");
    fp8_quant_in_block_ = fq && std::string(fq) == "in-block";
    // DSV3_CUDA_GROUPED=cublas: prefill's routed experts on cuBLAS' grouped GEMM (bf16) and the mma.sync kernel
    // (fp8) instead of the sm90 wgmma/TMA kernels (sm90/grouped.h), which are the default where built.
    const char* gr = std::getenv("DSV3_CUDA_GROUPED");
    sm90_grouped_ = cuda::sm90::available() && !(gr && std::string(gr) == "cublas");
    // DSV3_CUDA_ATTN=native: bf16 prefill attention on the hand-written kernel instead of cuDNN's fused one.
    const char* at = std::getenv("DSV3_CUDA_ATTN");
    cudnn_attention_ = cuda::cudnn::available() && !(at && std::string(at) == "native");
  }
  ~CudaBackend() override {
    try {
      flush();
    } catch (...) {
    }
    cudaStreamSynchronize(ctx_.stream);
    graphs_.clear();
    for (auto& s : slots_)
      if (s.pinned) {
        cudaEventSynchronize(s.ev);
        cudaFreeHost(s.pinned);
      }
    for (auto& s : slots_)
      if (s.ev) cudaEventDestroy(s.ev);
    for (auto& p : prof_pending_) {
      cudaEventDestroy(p.a);
      cudaEventDestroy(p.b);
    }
    for (auto ev : prof_free_) cudaEventDestroy(ev);
  }

  Device device() const override { return Device::CUDA; }
  std::string name() const override {
    return "cuda:" + std::to_string(dev_) + (act_ == DType::F32 ? " (fp32 activations)" : "");
  }
  DType act_dtype() const override { return act_; }
  cudaStream_t stream() const { return ctx_.stream; }
  DeviceContext& ctx() { return ctx_; }

  // ---- memory
  Tensor alloc(DType t, Shape s, const char* name) override {
    if (graphs_.mode() != cuda::StepGraphs::Mode::Off) return graphs_.alloc(t, std::move(s), name);
    return cuda::device_tensor(ctx_, t, std::move(s), name);
  }

  Tensor upload(const Tensor& host) override {
    if (host.device == Device::CUDA) return host;
    outside_graph_step("upload");
    Tensor r = alloc(host.dtype, host.shape, host.name.c_str());
    if (host.nbytes())
      DSV3_CUDA_CHECK(cudaMemcpyAsync(r.data, host.data, host.nbytes(), cudaMemcpyHostToDevice, ctx_.stream));
    return r;
  }

  // Checkpoint tensors straight into a device flat buffer (backend.h). Same dtype: one copy from the (mmap'd)
  // host memory; other float dtypes are converted on the host per tensor first (fp32 checkpoints into bf16
  // buffers, f16); fp8 goes up as stored and is dequantized here.
  void write_weights(Tensor& flat, int64_t offset, const void* src, DType src_dt, int64_t n) override {
    if (flat.device == Device::CPU) return Backend::write_weights(flat, offset, src, src_dt, n);
    check_weight_dest(flat, offset, n);
    outside_graph_step("write_weights");
    char* dst = static_cast<char*>(flat.data) + size_t(offset) * dtype_size(flat.dtype);
    if (src_dt == flat.dtype) {
      // Pageable source: the copy returns once the bytes are staged, so the file mapping may go right after.
      DSV3_CUDA_CHECK(cudaMemcpyAsync(dst, src, size_t(n) * dtype_size(src_dt), cudaMemcpyHostToDevice, ctx_.stream));
      return;
    }
    Tensor tmp = Tensor::empty(flat.dtype, {n}, "weights_tmp");
    write_weights_host(tmp, 0, src, src_dt, n);
    DSV3_CUDA_CHECK(cudaMemcpyAsync(dst, tmp.data, tmp.nbytes(), cudaMemcpyHostToDevice, ctx_.stream));
    DSV3_CUDA_CHECK(cudaStreamSynchronize(ctx_.stream));  // tmp is freed on return
  }
  void write_weights_fp8(Tensor& flat, int64_t offset, const uint8_t* w8, const float* scale, int64_t N, int64_t K,
                         int64_t bn, int64_t bk) override {
    if (flat.device == Device::CPU) return Backend::write_weights_fp8(flat, offset, w8, scale, N, K, bn, bk);
    check_weight_dest(flat, offset, N * K);
    outside_graph_step("write_weights_fp8");
    const int64_t ns = ((N + bn - 1) / bn) * ((K + bk - 1) / bk);
    Tensor d8 = alloc(DType::U8, {N * K}, "fp8_weight");
    Tensor ds = alloc(DType::F32, {ns}, "fp8_scale");
    DSV3_CUDA_CHECK(cudaMemcpyAsync(d8.data, w8, size_t(N * K), cudaMemcpyHostToDevice, ctx_.stream));
    DSV3_CUDA_CHECK(cudaMemcpyAsync(ds.data, scale, size_t(ns) * 4, cudaMemcpyHostToDevice, ctx_.stream));
    char* dst = static_cast<char*>(flat.data) + size_t(offset) * dtype_size(flat.dtype);
    cuda::dequant_fp8(dst, flat.dtype, d8.ptr<uint8_t>(), ds.f32(), N, K, bn, bk, ctx_.stream);
  }


  void write_raw(Tensor& dst, size_t byte_offset, const void* src, size_t bytes) override {
    if (dst.device == Device::CPU) return Backend::write_raw(dst, byte_offset, src, bytes);
    outside_graph_step("write_raw");
    if (byte_offset + bytes > dst.nbytes())
      fail("write_raw: [{}, {}) is outside the {} bytes of {}", byte_offset, byte_offset + bytes, dst.nbytes(), dst.name);
    // Pageable source: the copy returns once the bytes are staged, so the caller may release them right after.
    DSV3_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(dst.data) + byte_offset, src, bytes, cudaMemcpyHostToDevice,
                                    ctx_.stream));
  }

  Tensor to_host(const Tensor& t) override {
    flush();
    if (t.device == Device::CPU) return t;
    const size_t nb = t.nbytes();
    const bool pinned = nb >= (size_t(256) << 10);
    if (t.dtype == DType::BF16) {
      Tensor raw = pinned ? cuda::pinned_tensor(ctx_, DType::BF16, t.shape, t.name) : Tensor::empty(DType::BF16, t.shape, t.name);
      copy_to_host(raw.data, t.data, nb);
      Tensor out = Tensor::empty(DType::F32, t.shape, t.name);
      convert_to_f32(DType::BF16, raw.data, out.f32(), size_t(t.numel()));
      return out;
    }
    Tensor out = pinned ? cuda::pinned_tensor(ctx_, t.dtype, t.shape, t.name) : Tensor::empty(t.dtype, t.shape, t.name);
    copy_to_host(out.data, t.data, nb);
    return out;
  }

  Tensor alloc_kv_pool(const KvPoolSpec& spec) override {
    outside_graph_step("alloc_kv_pool");
    Tensor p = alloc(act_, {spec.layers, spec.num_blocks, spec.block_size, spec.row()}, "kv_pool");
    DSV3_CUDA_CHECK(cudaMemsetAsync(p.data, 0, p.nbytes(), ctx_.stream));
    return p;
  }

  void synchronize() override {
    outside_graph_step("synchronize");
    flush();
    end_step();
    DSV3_CUDA_CHECK(cudaStreamSynchronize(ctx_.stream));
    DSV3_CUDA_CHECK(cudaGetLastError());
  }

  void fill_normal(Tensor& t, float mean, float std, uint64_t seed) override {
    flush();
    if (t.device == Device::CPU) return Backend::fill_normal(t, mean, std, seed);
    outside_graph_step("fill_normal");
    ProfScope ps(*this, "fill_normal");
    cuda::fill_normal(t.data, t.dtype, t.numel(), mean, std, seed, ctx_.stream);
  }

  // ---- elementwise / norms
  void zero(Tensor& t) override {
    flush();
    check_dev(t, "zero");
    if (t.nbytes() && !skip()) DSV3_CUDA_CHECK(cudaMemsetAsync(t.data, 0, t.nbytes(), ctx_.stream));
  }

  void gather_rows(Tensor& out, const Tensor& x, const std::vector<int64_t>& rows) override {
    flush();
    ProfScope ps(*this, "gather_rows");
    check_dev(out, "gather_rows");
    check_dev(x, "gather_rows");
    DSV3_CHECK(out.dtype == x.dtype, "gather_rows: {} vs {}", dtype_name(out.dtype), dtype_name(x.dtype));
    const int64_t C = x.dim(-1), n = int64_t(rows.size()), esz = int64_t(dtype_size(x.dtype));
    DSV3_CHECK(out.numel() == n * C, "gather_rows: out {} for {} rows of {}", shape_str(out.shape), n, C);
    const int64_t nx = x.numel() / std::max<int64_t>(C, 1);
    std::vector<int32_t> r32(rows.size());
    for (size_t i = 0; i < rows.size(); ++i) {
      DSV3_CHECK(rows[i] >= 0 && rows[i] < nx, "gather_rows: row {} of {}", rows[i], nx);
      r32[i] = int32_t(rows[i]);
    }
    const int* d = upload_i32(kSlotGather, r32);
    if (skip()) return;
    cuda::copy_rows(out.data, nullptr, C * esz, x.data, d, C * esz, n, C * esz, ctx_.stream);
  }

  void embedding(Tensor& out, const Tensor& table, const std::vector<int32_t>& ids) override {
    flush();
    ProfScope ps(*this, "embedding");
    check_dev(out, "embedding");
    check_dev(table, "embedding");
    const int64_t H = table.dim(1), T = int64_t(ids.size());
    DSV3_CHECK(out.numel() == T * H, "embedding: out {} for {} ids of width {}", shape_str(out.shape), T, H);
    const int* d = upload_i32(kSlotIds, ids);
    if (skip()) return;
    cuda::embedding(out.data, out.dtype, table.data, table.dtype, d, T, H, ctx_.stream);
  }

  void rmsnorm(Tensor& out, const Tensor& x, const Tensor& w, float eps, int64_t x_stride) override {
    const int64_t Dn = out.dim(-1);
    if (pend_.on && comb_.on && pend_.b.data == comb_.f.data && pend_.out.data == x.data &&
        (x_stride == 0 || x_stride == Dn) && x.numel() == pend_.out.numel() && out.numel() == x.numel() &&
        out.dtype == DType::BF16 && x.dtype == DType::BF16 && pend_.a.data == x.data && w.numel() == Dn &&
        w.device == Device::CUDA && comb_.f.numel() == x.numel() && Dn == comb_.f.dim(-1) &&
        cuda::combine_add_rmsnorm_ok(x.data, comb_.f.data, comb_.y.data, out.data, int(comb_.K), Dn)) {
      // The routed experts' un-permute, the residual add and this norm in one kernel (see combine_add_rmsnorm).
      ProfScope ps(*this, "moe.combine+add+rmsnorm", double(x.nbytes()) * 5);
      PendingAdd p = std::move(pend_);
      PendingCombine c = std::move(comb_);
      pend_ = PendingAdd{};
      comb_ = PendingCombine{};
      if (skip()) return;
      cuda::combine_add_rmsnorm(p.out.ptr<bf16>(), c.f.ptr<bf16>(), c.y.ptr<float>(), c.w.f32(), c.pair_pos, int(c.T),
                                int(c.K), out.ptr<bf16>(), w.data, w.dtype, Dn, eps, ctx_.stream);
      return;
    }
    flush_combine();
    if (pend_.on && pend_.out.data == x.data && (x_stride == 0 || x_stride == Dn) && x.numel() == pend_.out.numel() &&
        out.numel() == x.numel() && out.dtype == DType::BF16 && x.dtype == DType::BF16 && w.numel() == Dn &&
        w.device == Device::CUDA && cuda::add_rmsnorm_ok(x.data, pend_.a.data, pend_.b.data, out.data, Dn)) {
      ProfScope ps(*this, "add+rmsnorm", double(x.nbytes()) * 4);
      PendingAdd p = std::move(pend_);
      pend_ = PendingAdd{};
      if (skip()) return;
      cuda::add_rmsnorm(p.out.ptr<bf16>(), p.a.ptr<bf16>(), p.b.ptr<bf16>(), out.ptr<bf16>(), w.data, w.dtype,
                        x.numel() / Dn, Dn, eps, ctx_.stream);
      return;
    }
    flush();
    check_dev(out, "rmsnorm");
    check_dev(x, "rmsnorm");
    check_dev(w, "rmsnorm");
    const int64_t D = out.dim(-1), T = out.numel() / std::max<int64_t>(D, 1);
    ProfScope ps(*this, "rmsnorm", double(T * D) * 2 * dtype_size(out.dtype));
    DSV3_CHECK(out.dtype == x.dtype, "rmsnorm {}: out {} x {}", w.name, dtype_name(out.dtype), dtype_name(x.dtype));
    DSV3_CHECK(w.numel() == D, "rmsnorm {}: weight {} for rows of {}", w.name, shape_str(w.shape), D);
    if (skip()) return;
    cuda::rmsnorm(out.data, x.data, x_stride ? x_stride : D, w.data, w.dtype, out.dtype, T, D, eps, ctx_.stream);
  }

  // Deferred: the model's residual add is always followed by the norm of its result, which fuses it (rmsnorm);
  // any other op first flushes it.
  void add(Tensor& out, const Tensor& a, const Tensor& b) override {
    // A pending combine into b stays pending: the norm that follows may take combine, add and norm at once.
    if (comb_.on && b.data == comb_.f.data && a.data != b.data && out.data != b.data) flush_add();
    else flush();
    check_same(out, a, "add");
    check_same(out, b, "add");
    pend_ = PendingAdd{out, a, b, true};
  }
  // Runs the deferred ops in their order: the combine (issued first), then the residual add.
  void flush() {
    flush_combine();
    flush_add();
  }
  void flush_combine() {
    if (!comb_.on) return;
    PendingCombine c = std::move(comb_);
    comb_ = PendingCombine{};
    if (skip()) return;
    ProfScope ps(*this, "moe.combine");
    cuda::moe_combine(c.f.ptr<bf16>(), c.y.data, true, c.w.f32(), c.pair_pos, int(c.T), int(c.K), int(c.f.dim(-1)),
                      ctx_.stream);
  }
  void flush_add() {
    if (!pend_.on) return;
    PendingAdd p = std::move(pend_);
    pend_ = PendingAdd{};
    if (skip()) return;
    ProfScope ps(*this, "add", double(p.out.nbytes()) * 3);
    cuda::add(p.out.data, p.a.data, p.b.data, p.out.numel(), p.out.dtype, ctx_.stream);
  }

  void silu_mul(Tensor& out, const Tensor& gate, const Tensor& up) override {
    flush();
    ProfScope ps(*this, "silu_mul", double(out.nbytes()) * 3);
    check_same(out, gate, "silu_mul");
    check_same(out, up, "silu_mul");
    if (skip()) return;
    cuda::silu_mul(out.data, gate.data, up.data, out.numel(), out.dtype, ctx_.stream);
  }

  void copy_cols(Tensor& out, const Tensor& x, int64_t c0) override {
    flush();
    ProfScope ps(*this, "copy_cols");
    check_dev(out, "copy_cols");
    check_dev(x, "copy_cols");
    DSV3_CHECK(out.dtype == x.dtype, "copy_cols: dtypes differ");
    const int64_t T = out.dim(0), n = out.dim(-1), C = x.dim(-1), esz = int64_t(dtype_size(x.dtype));
    DSV3_CHECK(c0 + n <= C && x.numel() / C == T, "copy_cols: [{}, {}) of {}", c0, c0 + n, shape_str(x.shape));
    if (skip()) return;
    cuda::copy_rows(out.data, nullptr, n * esz, static_cast<const char*>(x.data) + c0 * esz, nullptr, C * esz, T, n * esz,
                    ctx_.stream);
  }

  void concat_cols(Tensor& out, const Tensor& a, const Tensor& b) override {
    flush();
    ProfScope ps(*this, "concat_cols");
    check_dev(out, "concat_cols");
    DSV3_CHECK(out.dtype == a.dtype && out.dtype == b.dtype, "concat_cols: dtypes differ");
    const int64_t T = out.dim(0), na = a.dim(-1), nb = b.dim(-1), esz = int64_t(dtype_size(out.dtype));
    DSV3_CHECK(out.dim(-1) == na + nb, "concat_cols: {} + {} into {}", na, nb, shape_str(out.shape));
    char* o = static_cast<char*>(out.data);
    if (skip()) return;
    cuda::copy_rows(o, nullptr, (na + nb) * esz, a.data, nullptr, na * esz, T, na * esz, ctx_.stream);
    cuda::copy_rows(o + na * esz, nullptr, (na + nb) * esz, b.data, nullptr, nb * esz, T, nb * esz, ctx_.stream);
  }

  // ---- matrices
  void linear(Tensor& y, const Tensor& x, const Tensor& w_in) override {
    flush();
    check_dev(y, "linear");
    check_dev(x, "linear");
    if (w_in.dtype == DType::F8E4M3) return linear_fp8(y, x, w_in);
    if (x.dtype == DType::F32 || (w_in.dtype == DType::F32 && y.dtype == DType::F32)) {
      // fp32 activations, or an fp32 weight with an fp32 output (the router of an fp32 checkpoint): fp32 product.
      const Tensor& w = f32_weight(w_in);
      const int64_t K = w.dim(1), N = w.dim(0), M = x.numel() / std::max<int64_t>(K, 1);
      DSV3_CHECK(x.numel() == M * K && y.numel() == M * N && y.dtype == DType::F32, "linear {}: x {} y {} {} w {}",
                 w.name, shape_str(x.shape), dtype_name(y.dtype), shape_str(y.shape), shape_str(w.shape));
      ProfScope ps(*this, "linear_f32", double(N * K * 4));
      if (M == 0 || N == 0) return;
      Tensor xf = x;
      if (x.dtype != DType::F32) {
        xf = alloc(DType::F32, x.shape, "x_f32");
        if (!skip()) cuda::bf16_to_f32(xf.ptr<float>(), x.ptr<bf16>(), x.numel(), ctx_.stream);
      }
      if (!skip()) gemm_xwT(y.data, DType::F32, N, w.data, K, xf.data, K, M, N, K, DType::F32);
      return;
    }
    const Tensor& w = bf16_weight(w_in);
    const int64_t K = w.dim(1), N = w.dim(0), M = x.numel() / std::max<int64_t>(K, 1);
    DSV3_CHECK(x.numel() == M * K && y.numel() == M * N, "linear {}: x {} y {} w {}", w.name, shape_str(x.shape),
               shape_str(y.shape), shape_str(w.shape));
    DSV3_CHECK(x.dtype == DType::BF16, "linear {}: input must be bf16, got {}", w.name, dtype_name(x.dtype));
    ProfScope ps(*this, profiling_ ? "linear:" + weight_kind(w_in.name) : std::string(),
                 double(N * K * 2 + M * K * 2 + M * N * int64_t(dtype_size(y.dtype))));
    if (M == 0 || N == 0 || skip()) return;
    cuda::SkinnyArgs a;
    a.w = static_cast<const bf16*>(w.data);
    a.ldw = K;
    a.x = static_cast<const bf16*>(x.data);
    a.ldx = K;
    a.y = y.data;
    a.ldy = N;
    a.M = int(M);
    a.N = int(N);
    a.K = int(K);
    a.out_t = y.dtype;
    if (skinny_ && M <= cuda::kSkinnyMaxRows && cuda::skinny_aligned(a)) {
      cuda::skinny_gemm(a, int(M), ctx_.stream);
      return;
    }
    gemm_xwT(y.data, y.dtype, N, w.data, K, x.data, K, M, N, K, DType::BF16);
  }

  // ---- fused decode ops
  void linear_swiglu(Tensor& out, const Tensor& x, const Tensor& gate_in, const Tensor& up_in) override {
    flush();
    check_dev(out, "linear_swiglu");
    check_dev(x, "linear_swiglu");
    const int64_t I = gate_in.dim(0), K = gate_in.dim(1), M = x.numel() / std::max<int64_t>(K, 1);
    DSV3_CHECK(up_in.shape == gate_in.shape && x.numel() == M * K && out.numel() == M * I && out.dtype == x.dtype,
               "linear_swiglu {}: x {} out {} gate {} up {}", gate_in.name, shape_str(x.shape), shape_str(out.shape),
               shape_str(gate_in.shape), shape_str(up_in.shape));
    if (x.dtype == DType::BF16 && skinny_ && M <= cuda::kSkinnyMaxRows && gate_in.dtype != DType::F8E4M3) {
      const Tensor& g = bf16_weight(gate_in);
      const Tensor& u = bf16_weight(up_in);
      cuda::SkinnyArgs a;
      a.w = g.ptr<bf16>();
      a.w2 = u.ptr<bf16>();
      a.ldw = K;
      a.x = x.ptr<bf16>();
      a.ldx = K;
      a.y = out.data;
      a.ldy = I;
      a.M = int(M);
      a.N = int(I);
      a.K = int(K);
      a.out_t = DType::BF16;
      if (cuda::skinny_aligned(a)) {
        // Both matrices' rows in one pass, SwiGLU in the epilogue: one kernel instead of three.
        ProfScope ps(*this, profiling_ ? "linear_swiglu:" + weight_kind(gate_in.name) : std::string(),
                     double(2 * I * K * 2 + M * K * 2 + M * I * 2));
        if (M == 0 || skip()) return;
        cuda::skinny_gemm(a, int(M), ctx_.stream);
        return;
      }
    }
    if (gate_in.dtype == DType::F8E4M3 && up_in.dtype == DType::F8E4M3 && M <= kFp8QuantInBlockRows && K % 16 == 0 &&
        gate_in.scale && up_in.scale && fp8_quant_in_block_) {
      // Both fp8 matrices in one pass with x quantized in the block and SwiGLU in the epilogue: one kernel.
      ProfScope ps(*this, profiling_ ? "linear_swiglu_fp8:" + weight_kind(gate_in.name) : std::string(),
                   double(2 * I * K + M * K * 2 + M * I * 2));
      if (M == 0 || skip()) return;
      cuda::Fp8SkinnyArgs a;
      a.w = gate_in.ptr<uint8_t>(), a.sw = gate_in.scale, a.w2 = up_in.ptr<uint8_t>(), a.sw2 = up_in.scale;
      a.xa = x.data, a.xa_t = x.dtype, a.y = out.data, a.ldy = I, a.M = int(M), a.N = int(I), a.K = int(K);
      a.out_t = out.dtype;
      cuda::fp8_skinny_gemm(a, ctx_.stream);
      return;
    }
    Tensor u = alloc(out.dtype, out.shape, "swiglu_up");
    linear(out, x, gate_in);
    linear(u, x, up_in);
    silu_mul(out, out, u);
  }

  void kv_norm_rope_write(Tensor& pool, const KvPoolSpec& spec, int64_t layer, const std::vector<SeqSlice>& seqs,
                          const Tensor& kva, const Tensor& norm_w, float eps, const std::vector<int32_t>& pos,
                          const Tensor& cos, const Tensor& sin, bool interleave) override {
    flush();
    ProfScope ps(*this, "kv_norm_rope_write");
    check_pool(pool, spec, layer);
    check_dev(kva, "kv_norm_rope_write");
    check_dev(norm_w, "kv_norm_rope_write");
    check_dev(cos, "kv_norm_rope_write");
    const int64_t r = spec.kv_lora_rank, dr = spec.rope_dim, T = kva.dim(0);
    DSV3_CHECK(kva.dtype == pool.dtype && kva.numel() == T * (r + dr) && int64_t(pos.size()) == T &&
                   norm_w.numel() == r && cos.dtype == DType::F32 && sin.dtype == DType::F32 && cos.dim(1) * 2 == dr,
               "kv_norm_rope_write: kv_a {} {} norm {} rope {} for {} positions", dtype_name(kva.dtype),
               shape_str(kva.shape), shape_str(norm_w.shape), shape_str(cos.shape), pos.size());
    for (int32_t p : pos)
      DSV3_CHECK(p >= 0 && p < cos.dim(0), "kv_norm_rope_write: position {} beyond table of {}", p, cos.dim(0));
    const int* drows = upload_i32(kSlotKvWrite, cache_rows(spec, seqs, T));
    const int* dpos = upload_i32(kSlotPos, pos);
    if (skip()) return;
    cuda::kv_norm_rope_write(layer_base(pool, spec, layer), drows, kva.data, kva.dtype, int(T), int(r), int(dr),
                             norm_w.data, norm_w.dtype, eps, dpos, cos.f32(), sin.f32(), interleave, ctx_.stream);
  }

  void mla_decode_q(Tensor& q_lat, Tensor& q_pe, const Tensor& q, const Tensor& kv_b, int64_t nh, int64_t dn,
                    int64_t dr, int64_t dv, const std::vector<int32_t>& pos, const Tensor& cos, const Tensor& sin,
                    bool interleave) override {
    flush();
    const int64_t B = q.dim(0);
    check_dev(q_pe, "mla_decode_q");
    check_dev(cos, "mla_decode_q");
    DSV3_CHECK(q_pe.dtype == act_ && q_pe.numel() == B * nh * dr && int64_t(pos.size()) == B &&
                   cos.dtype == DType::F32 && sin.dtype == DType::F32 && cos.dim(1) * 2 == dr,
               "mla_decode_q: q_pe {} {} rope {} for {} positions", dtype_name(q_pe.dtype), shape_str(q_pe.shape),
               shape_str(cos.shape), pos.size());
    for (int32_t p : pos) DSV3_CHECK(p >= 0 && p < cos.dim(0), "mla_decode_q: position {} beyond table of {}", p, cos.dim(0));
    const int* dpos = upload_i32(kSlotPos, pos);
    cuda::RopeArgs ra;
    ra.pos = dpos;
    ra.cos = cos.f32();
    ra.sin = sin.f32();
    ra.interleave = interleave;
    if (absorb_q(q_lat, q, kv_b, nh, dn, dr, dv, &q_pe, ra)) return;  // q_pe written by the absorb kernel
    ProfScope ps(*this, "rope_copy");
    if (B == 0 || skip()) return;
    cuda::rope_copy(q_pe.data, q.data, act_, B, nh, dn + dr, dn, dr, dpos, ra.cos, ra.sin, interleave, ctx_.stream);
  }

  // ---- rotary embedding
  void rope(Tensor& x, int64_t n, int64_t stride, int64_t off, const std::vector<int32_t>& pos, const Tensor& cos,
            const Tensor& sin, bool interleave) override {
    flush();
    ProfScope ps(*this, "rope");
    check_dev(x, "rope");
    check_dev(cos, "rope");
    const int64_t T = int64_t(pos.size()), dr = cos.dim(1) * 2;
    DSV3_CHECK(cos.dtype == DType::F32 && sin.dtype == DType::F32, "rope: tables must be fp32");
    DSV3_CHECK(x.numel() >= T * n * stride && off + dr <= stride, "rope: x {} for T {} n {} stride {}",
               shape_str(x.shape), T, n, stride);
    for (int32_t p : pos) DSV3_CHECK(p >= 0 && p < cos.dim(0), "rope: position {} beyond table of {}", p, cos.dim(0));
    const int* d = upload_i32(kSlotPos, pos);
    if (skip()) return;
    cuda::rope(x.data, x.dtype, T, n, stride, off, dr, d, cos.f32(), sin.f32(), interleave, ctx_.stream);
  }

  // ---- MLA
  void kv_write(Tensor& pool, const KvPoolSpec& spec, int64_t layer, const std::vector<SeqSlice>& seqs, const Tensor& c,
                const Tensor& kpe) override {
    flush();
    ProfScope ps(*this, "kv_write");
    check_pool(pool, spec, layer);
    DSV3_CHECK(c.dtype == pool.dtype && kpe.dtype == pool.dtype, "kv_write: c and k_pe must be {}",
               dtype_name(pool.dtype));
    const int64_t r = spec.kv_lora_rank, dr = spec.rope_dim, T = c.dim(0);
    const int* d = upload_i32(kSlotKvWrite, cache_rows(spec, seqs, T));
    if (skip()) return;
    if (pool.dtype == DType::BF16) {
      cuda::kv_write(reinterpret_cast<bf16*>(layer_base(pool, spec, layer)), d, c.ptr<bf16>(), kpe.ptr<bf16>(), int(T),
                     int(r), int(dr), ctx_.stream);
      return;
    }
    const int64_t es = int64_t(dtype_size(pool.dtype));
    char* base = layer_base(pool, spec, layer);
    cuda::copy_rows(base, d, spec.row() * es, c.data, nullptr, r * es, T, r * es, ctx_.stream);
    cuda::copy_rows(base + r * es, d, spec.row() * es, kpe.data, nullptr, dr * es, T, dr * es, ctx_.stream);
  }

  void kv_gather(Tensor& c_out, Tensor& kpe_out, const Tensor& pool, const KvPoolSpec& spec, int64_t layer,
                 const SeqSlice& s, int64_t n) override {
    flush();
    ProfScope ps(*this, "kv_gather");
    check_pool(pool, spec, layer);
    DSV3_CHECK(c_out.dtype == pool.dtype && kpe_out.dtype == pool.dtype, "kv_gather: outputs must be {}",
               dtype_name(pool.dtype));
    const int64_t es = int64_t(dtype_size(pool.dtype));
    const int64_t r = spec.kv_lora_rank, dr = spec.rope_dim, bs = spec.block_size;
    DSV3_CHECK((n + bs - 1) / bs <= s.num_blocks, "kv_gather: {} positions beyond {} blocks", n, s.num_blocks);
    std::vector<int32_t> rows(static_cast<size_t>(n));
    for (int64_t p = 0; p < n; ++p) rows[size_t(p)] = int32_t(int64_t(s.blocks[p / bs]) * bs + p % bs);
    const int* d = upload_i32(kSlotKvGather, rows);
    if (skip()) return;
    const char* base = layer_base(pool, spec, layer);
    cuda::copy_rows(c_out.data, nullptr, r * es, base, d, spec.row() * es, n, r * es, ctx_.stream);
    cuda::copy_rows(kpe_out.data, nullptr, dr * es, base + r * es, d, spec.row() * es, n, dr * es, ctx_.stream);
  }

  void mla_attention(Tensor& out, const Tensor& q, const Tensor& kv, const Tensor& kpe, int64_t pos0, int64_t nh,
                     int64_t dn, int64_t dr, int64_t dv, float scale) override {
    flush();
    const int64_t len = q.numel() / (nh * (dn + dr)), n = pos0 + len;
    ProfScope ps(*this, "mla_attention", double(len * nh * (dn + dr) * 2 + n * nh * (dn + dv) * 2 + len * nh * dv * 2));
    if (skip()) return;
    const Tensor* all[] = {&out, &q, &kv, &kpe};
    for (const Tensor* t : all)
      DSV3_CHECK(t->device == Device::CUDA && t->dtype == q.dtype, "mla_attention: {} must be a {} CUDA tensor",
                 t->name, dtype_name(q.dtype));
    if (q.dtype == DType::F32) {
      cuda::mla_prefill_f32(out.f32(), q.f32(), kv.f32(), kpe.f32(), int(len), int(pos0), int(nh), int(dn), int(dr),
                            int(dv), scale, ctx_.stream);
      return;
    }
    DSV3_CHECK(kv.numel() >= n * nh * (dn + dv) && kpe.numel() >= n * dr && out.numel() == len * nh * dv,
               "mla_attention: kv {} kpe {} out {} for len {} pos0 {}", shape_str(kv.shape), shape_str(kpe.shape),
               shape_str(out.shape), len, pos0);
    if (cudnn_attention_ && graphs_.mode() == cuda::StepGraphs::Mode::Off && dn % 8 == 0 && dr % 8 == 0 &&
        dv % 8 == 0) {
      // cuDNN's fused attention reads dense keys: each head's k_nope next to the shared k_pe ([n, nh, dn+dr], a
      // copy of n * nh * (dn+dr) values, small next to the attention's n^2 work); v stays a view into kv.
      Tensor kd = alloc(DType::BF16, {n, nh, dn + dr}, "k_dense");
      cuda::mla_concat_k(static_cast<bf16*>(kd.data), static_cast<const bf16*>(kv.data),
                         static_cast<const bf16*>(kpe.data), int(n), int(nh), int(dn), int(dr), int(dv), ctx_.stream);
      cuda::cudnn::CausalAttention a;
      a.out = static_cast<bf16*>(out.data), a.q = static_cast<const bf16*>(q.data), a.k = static_cast<const bf16*>(kd.data);
      a.v = static_cast<const bf16*>(kv.data) + dn, a.v_row = nh * (dn + dv), a.v_head = dn + dv;
      a.len = int(len), a.n = int(n), a.nh = int(nh), a.dqk = int(dn + dr), a.dv = int(dv), a.scale = scale;
      const char* why = nullptr;
      if (cuda::cudnn::causal_attention(a, ctx_.stream, &why)) return;
      if (!cudnn_warned_) std::fprintf(stderr, "dsv3: prefill attention on the built-in kernel: %s\n", why);
      cudnn_warned_ = true;
    }
    cuda::mla_prefill(static_cast<bf16*>(out.data), static_cast<const bf16*>(q.data), static_cast<const bf16*>(kv.data),
                      static_cast<const bf16*>(kpe.data), int(len), int(pos0), int(nh), int(dn), int(dr), int(dv), scale,
                      ctx_.stream);
  }

  void mla_decode(Tensor& out_lat, const Tensor& q_lat, const Tensor& q_pe, const Tensor& pool, const KvPoolSpec& spec,
                  int64_t layer, const std::vector<SeqSlice>& seqs, float scale) override {
    flush();
    check_pool(pool, spec, layer);
    const int64_t B = int64_t(seqs.size()), nh = q_lat.dim(1), r = spec.kv_lora_rank, dr = spec.rope_dim,
                  bs = spec.block_size;
    DSV3_CHECK(q_lat.dim(0) == B && q_lat.dim(2) == r && q_pe.numel() == B * nh * dr && out_lat.numel() == B * nh * r,
               "mla_decode: q_lat {} q_pe {} out {} for {} sequences", shape_str(q_lat.shape), shape_str(q_pe.shape),
               shape_str(out_lat.shape), B);
    // meta: [B] key counts, [B] table offsets, then each sequence's block table. The split count and workspace
    // follow the block-table capacity bucket (cap blocks), not the exact length, so a recorded step (whose
    // tables are padded to cap blocks each) and an eager one launch the same grid: splits past a sequence's
    // keys are empty and the merge gives them zero weight.
    int64_t cap = 1;
    for (const SeqSlice& s : seqs) cap = std::max(cap, (s.pos0 + bs) / bs);
    cap = cuda::graph_capacity_blocks(cap);
    const bool graph = graphs_.mode() != cuda::StepGraphs::Mode::Off;
    if (graph) {
      DSV3_CHECK(cap <= graphs_.key().cap_blocks, "mla_decode: {} blocks beyond the graph step's capacity {}", cap,
                 graphs_.key().cap_blocks);
      cap = graphs_.key().cap_blocks;
    }
    std::vector<int32_t> meta(size_t(2 * B));
    if (graph) meta.reserve(size_t(B * (2 + cap)));
    for (int64_t b = 0; b < B; ++b) {
      const SeqSlice& s = seqs[size_t(b)];
      const int64_t n = s.pos0 + 1, nb = (n + bs - 1) / bs;
      DSV3_CHECK(nb <= s.num_blocks, "mla_decode: {} positions beyond the sequence's {} blocks", n, s.num_blocks);
      meta[size_t(b)] = int32_t(n);
      meta[size_t(B + b)] = int32_t(meta.size());
      meta.insert(meta.end(), s.blocks, s.blocks + nb);
      if (graph) meta.resize(meta.size() + size_t(cap - nb), 0);
    }
    const int64_t max_n = cap * bs;
    ProfScope ps(*this, "mla_decode", double(B * nh * (2 * r + dr) * 2) + double(max_n * B * spec.row() * 2));
    const int* d = upload_i32(kSlotDecode, meta);
    if (pool.dtype == DType::F32) {
      Tensor ws = alloc(DType::U8, {int64_t(cuda::mla_decode_ws_bytes(int(B), int(nh), int(r), 1, int(max_n)))}, "ws");
      if (skip()) return;
      cuda::mla_decode_f32(out_lat.f32(), q_lat.f32(), q_pe.f32(),
                           reinterpret_cast<const float*>(layer_base(pool, spec, layer)), d, int(B), int(nh), int(r),
                           int(dr), int(bs), int(max_n), scale, ws.data, ctx_.stream);
      return;
    }
    const int splits = cuda::mla_decode_splits(int(B), int(nh), int(max_n), ctx_.prop.multiProcessorCount);
    Tensor ws = alloc(DType::U8, {int64_t(cuda::mla_decode_ws_bytes(int(B), int(nh), int(r), splits, int(max_n)))},
                      "mla_decode_ws");
    if (skip()) return;
    cuda::mla_decode(static_cast<bf16*>(out_lat.data), static_cast<const bf16*>(q_lat.data),
                     static_cast<const bf16*>(q_pe.data), reinterpret_cast<const bf16*>(layer_base(pool, spec, layer)), d,
                     int(B), int(nh), int(r), int(dr), int(bs), splits, int(max_n), scale, ws.data, ctx_.stream);
  }

  void mla_absorb_q(Tensor& q_lat, const Tensor& q, const Tensor& kv_b_in, int64_t nh, int64_t dn, int64_t dr,
                    int64_t dv) override {
    flush();
    absorb_q(q_lat, q, kv_b_in, nh, dn, dr, dv, nullptr, cuda::RopeArgs{});
  }
  // q_lat = q_nope . W_UK per head. With q_pe, the small-batch kernel also writes the rotated q_pe and this returns
  // true; otherwise (cuBLAS path, or no q_pe) it returns false and q_pe is the caller's job.
  bool absorb_q(Tensor& q_lat, const Tensor& q, const Tensor& kv_b_in, int64_t nh, int64_t dn, int64_t dr, int64_t dv,
                Tensor* q_pe, const cuda::RopeArgs& ra) {
    const bool f32 = q.dtype == DType::F32;
    const Tensor& kv_b = f32 ? f32_weight(kv_b_in) : bf16_weight(kv_b_in);
    const int64_t B = q.dim(0), r = kv_b.dim(1);
    ProfScope ps(*this, "mla_absorb_q", double(nh * dn * r * 2));
    DSV3_CHECK(q.dtype == act_ && q_lat.dtype == act_, "mla_absorb_q: {} tensors expected", dtype_name(act_));
    DSV3_CHECK(q.numel() == B * nh * (dn + dr) && q_lat.numel() == B * nh * r && kv_b.dim(0) == nh * (dn + dv),
               "mla_absorb_q: q {} q_lat {} kv_b {}", shape_str(q.shape), shape_str(q_lat.shape), shape_str(kv_b.shape));
    const bool al4 = (reinterpret_cast<uintptr_t>(kv_b.data) & 3) == 0;
    const bool small = !f32 && B <= 8 && dn <= 256 && r % 2 == 0 && al4;
    if (B == 0 || skip()) return small;
    if (small) {
      cuda::absorb_q_small(static_cast<bf16*>(q_lat.data), static_cast<const bf16*>(q.data),
                           static_cast<const bf16*>(kv_b.data), int(B), int(nh), int(dn), int(dr), int(dv), int(r),
                           q_pe ? q_pe->ptr<bf16>() : nullptr, ra, ctx_.stream);
      return true;
    }
    // Per head h: q_lat_h [B, r] = q_h [B, dn] W_UK[h] [dn, r]. Column-major: C (r x B) = W (r x dn) * Q (dn x B).
    const float one = 1.f, zero = 0.f;
    const cudaDataType_t ct = cuda_type(act_);
    DSV3_CUBLAS_CHECK(cublasGemmStridedBatchedEx(ctx_.blas, CUBLAS_OP_N, CUBLAS_OP_N, int(r), int(B), int(dn), &one,
                                                 kv_b.data, ct, int(r), (dn + dv) * r, q.data, ct, int(nh * (dn + dr)),
                                                 dn + dr, &zero, q_lat.data, ct, int(nh * r), r, int(nh),
                                                 CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return false;
  }

  void mla_absorb_out(Tensor& out, const Tensor& o_lat, const Tensor& kv_b_in, int64_t nh, int64_t dn,
                      int64_t dv) override {
    flush();
    const bool f32 = o_lat.dtype == DType::F32;
    const Tensor& kv_b = f32 ? f32_weight(kv_b_in) : bf16_weight(kv_b_in);
    const int64_t B = o_lat.dim(0), r = kv_b.dim(1);
    ProfScope ps(*this, "mla_absorb_out", double(nh * dv * r * 2));
    DSV3_CHECK(o_lat.dtype == act_ && out.dtype == act_, "mla_absorb_out: {} tensors expected", dtype_name(act_));
    const int64_t es = int64_t(dtype_size(act_));
    const void* w_uv = static_cast<const char*>(kv_b.data) + dn * r * es;
    DSV3_CHECK(o_lat.numel() == B * nh * r && out.numel() == B * nh * dv, "mla_absorb_out: o_lat {} out {}",
               shape_str(o_lat.shape), shape_str(out.shape));
    if (B == 0 || skip()) return;
    cuda::SkinnyArgs a;
    a.w = static_cast<const bf16*>(kv_b.data) + dn * r;
    a.ldw = r;
    a.stride_w = (dn + dv) * r;
    a.x = static_cast<const bf16*>(o_lat.data);
    a.ldx = nh * r;
    a.stride_x = r;
    a.y = out.data;
    a.ldy = nh * dv;
    a.stride_y = dv;
    a.M = int(B);
    a.N = int(dv);
    a.K = int(r);
    a.batch = int(nh);
    a.out_t = out.dtype;
    if (!f32 && skinny_ && B <= cuda::kSkinnyMaxRows && cuda::skinny_aligned(a)) {
      cuda::skinny_gemm(a, int(B), ctx_.stream);
      return;
    }
    // Per head: out_h [B, dv] = o_lat_h [B, r] W_UV[h]^T. Column-major: C (dv x B) = W^T (dv x r) * O (r x B).
    const float one = 1.f, zero = 0.f;
    const cudaDataType_t ct = cuda_type(act_);
    DSV3_CUBLAS_CHECK(cublasGemmStridedBatchedEx(ctx_.blas, CUBLAS_OP_T, CUBLAS_OP_N, int(dv), int(B), int(r), &one, w_uv,
                                                 ct, int(r), (dn + dv) * r, o_lat.data, ct, int(nh * r), r, &zero,
                                                 out.data, ct, int(nh * dv), dv, int(nh), CUBLAS_COMPUTE_32F,
                                                 CUBLAS_GEMM_DEFAULT));
  }

  // ---- DeepSeek-V3.2 sparse attention: CPU only for now (the model runs on the CPU reference backend).
  [[noreturn]] static void no_dsa(const char* op) {
    fail("{} (DeepSeek-V3.2 sparse attention) is not implemented on cuda yet; run this model with --device cpu", op);
  }
  void layernorm(Tensor&, const Tensor&, const Tensor&, const Tensor&, float) override { no_dsa("layernorm"); }
  void index_key_write(Tensor&, const KvPoolSpec&, int64_t, const std::vector<SeqSlice>&, const Tensor&) override {
    no_dsa("index_key_write");
  }
  void dsa_select(Tensor&, const Tensor&, const Tensor&, const Tensor&, const KvPoolSpec&, int64_t,
                  const std::vector<SeqSlice>&, float, float) override {
    no_dsa("dsa_select");
  }
  void mla_attention_sparse(Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t,
                            int64_t, int64_t, int64_t, float) override {
    no_dsa("mla_attention_sparse");
  }
  void mla_decode_sparse(Tensor&, const Tensor&, const Tensor&, const Tensor&, const KvPoolSpec&, int64_t,
                         const std::vector<SeqSlice>&, const Tensor&, float) override {
    no_dsa("mla_decode_sparse");
  }

  // ---- DeepSeekMoE
  void moe_route(Tensor& topk_idx, Tensor& topk_w, const Tensor& logits, const Tensor& bias,
                 const RouteParams& p) override {
    flush();
    const int64_t T = logits.dim(0);
    ProfScope ps(*this, act_ == DType::BF16 && T <= cuda::kRoutePlanMaxT ? "moe_route+plan" : "moe_route");
    DSV3_CHECK(logits.dtype == DType::F32 && logits.dim(1) == p.n_experts, "moe_route: logits {} {}",
               dtype_name(logits.dtype), shape_str(logits.shape));
    DSV3_CHECK(topk_idx.dtype == DType::I32 && topk_w.dtype == DType::F32 && topk_idx.numel() == T * p.top_k &&
                   topk_w.numel() == T * p.top_k,
               "moe_route: idx {} w {}", shape_str(topk_idx.shape), shape_str(topk_w.shape));
    const float* b = nullptr;
    if (bias) {
      DSV3_CHECK(bias.dtype == DType::F32 && bias.device == Device::CUDA && bias.numel() == p.n_experts,
                 "moe_route: bias {} must be fp32 [{}] on the GPU", bias.name, p.n_experts);
      b = bias.f32();
    }
    route_plan_ = RoutePlan{};
    if (act_ == DType::BF16 && T > 0 && T <= cuda::kRoutePlanMaxT) {
      // Decode sizes: the dispatch plan of moe_experts_acc is made here in the same kernel and kept for it.
      const int64_t E = p.n_experts, P = T * p.top_k;
      RoutePlan rp{topk_idx, alloc(DType::I32, {3 * E + 2 + 2 * P}, "moe_plan"), T, p.top_k, E};
      if (!skip()) {
        int* c = rp.plan.ptr<int>();
        cuda::moe_route_plan(topk_idx.ptr<int>(), topk_w.f32(), logits.f32(), b, int(T), p, c, c + E, c + 2 * E + 1,
                             c + 3 * E + 1, c + 3 * E + 2, c + 3 * E + 2 + P, ctx_.stream);
      }
      route_plan_ = std::move(rp);
      return;
    }
    if (skip()) return;
    cuda::moe_route(topk_idx.ptr<int>(), topk_w.f32(), logits.f32(), b, int(T), p, ctx_.stream);
  }

  void moe_experts_acc(Tensor& out, const Tensor& x, const Tensor& topk_idx, const Tensor& topk_w, const Tensor& gate_in,
                       const Tensor& up_in, const Tensor& down_in) override;

  // The expert dispatch plan of moe_experts_acc for routing idx [T, K] over E experts (moe_plan's arrays:
  // counts [E], offsets [E+1], active [E], n_active [1], sorted_xrow [T K], pair_pos [T K]): the one moe_route
  // made at decode sizes when it is for this idx, else made now.
  Tensor dispatch_plan(const Tensor& topk_idx, int64_t T, int64_t K, int64_t E) {
    const int64_t P = T * K;
    Tensor plan;
    const bool planned = route_plan_.plan && route_plan_.idx.data == topk_idx.data && route_plan_.T == T &&
                         route_plan_.K == K && route_plan_.E == E;
    if (planned) plan = std::move(route_plan_.plan);
    else plan = alloc(DType::I32, {3 * E + 2 + 2 * P}, "moe_plan");
    route_plan_ = RoutePlan{};
    int* counts = plan.ptr<int>();
    if (!planned && !skip()) {
      ProfScope ps(*this, "moe.plan");
      cuda::moe_plan(topk_idx.ptr<int>(), int(T), int(K), int(E), counts, counts + E, counts + 2 * E + 1,
                     counts + 3 * E + 1, counts + 3 * E + 2, counts + 3 * E + 2 + P, ctx_.stream);
    }
    return plan;
  }
  // counts [E] (device) on the host; waits for the stream.
  std::vector<int> counts_to_host(const int* counts, int64_t E) {
    if (!moe_counts_host_ || moe_counts_host_.numel() < E)
      moe_counts_host_ = cuda::pinned_tensor(ctx_, DType::I32, {std::max<int64_t>(E, 1024)}, "counts");
    DSV3_CUDA_CHECK(cudaMemcpyAsync(moe_counts_host_.data, counts, E * 4, cudaMemcpyDeviceToHost, ctx_.stream));
    DSV3_CUDA_CHECK(cudaStreamSynchronize(ctx_.stream));
    return std::vector<int>(moe_counts_host_.ptr<int>(), moe_counts_host_.ptr<int>() + E);
  }

  // ---- FP8 weights (fp8.h): activations quantized in 1x128 tiles on the fly, products on fp8 tensor cores
  void linear_fp8(Tensor& y, const Tensor& x, const Tensor& w);
  // Quantizes x [M, K] (act dtype): codes [M, K] and scales [M, tiles(K)] (scales_ld 0) or [tiles(K), scales_ld].
  std::pair<Tensor, Tensor> quantize_act(const Tensor& x, int64_t M, int64_t K, int64_t scales_ld = 0);
  void moe_experts_fp8(Tensor& out, const Tensor& x, const Tensor& topk_idx, const Tensor& topk_w, const Tensor& gate,
                       const Tensor& up, const Tensor& down);

  // ---- whole-step graphs (step_graph.h)
  bool begin_graph_step(const GraphStepKey& key) override {
    if (!graphs_on_ || profiling_ || act_ != DType::BF16 || key.batch <= 0) return false;
    flush();
    cuda::StepGraphs::Key k;
    k.batch = key.batch;
    k.cap_blocks = cuda::graph_capacity_blocks(std::max<int64_t>(key.kv_blocks, 1));
    k.variant = skinny_ ? 1 : 0;
    // Staging bytes: the decode tables (B x (2 + cap)) and the per-row ids, positions and cache rows, with room.
    const size_t meta = size_t(k.batch) * size_t(k.cap_blocks + 2) * 4 + size_t(k.batch) * 64 + 65536;
    return graphs_.begin(k, meta) != cuda::StepGraphs::Mode::Off;
  }
  bool end_graph_step() override {
    flush();
    route_plan_ = RoutePlan{};
    return graphs_.end();
  }
  void cancel_graph_step() override {
    pend_ = PendingAdd{};
    comb_ = PendingCombine{};
    route_plan_ = RoutePlan{};
    graphs_.cancel();
  }
  void set_graphs(bool on) {
    outside_graph_step("set_graphs");
    graphs_on_ = on;
    if (!on) graphs_.clear();
  }
  cuda::StepGraphs::Stats graph_stats() const { return graphs_.stats(); }

  // ---- helpers used by the free functions of cuda_backend.h
  void set_profiling(bool on) {
    collect_profile();
    profiling_ = on;
  }
  std::vector<cuda::OpStat> take_profile();
  void set_skinny(bool on) { skinny_ = on; }
  bool profiling() const { return profiling_; }
  size_t prof_begin(std::string name, double bytes);
  void prof_end(size_t slot);

  // y [M, N] (ytype) = x [M, K] W [N, K]^T through cuBLAS; leading dimensions in elements.
  // in_t: the dtype of w and x (BF16, or F32 for plain fp32 products: CUBLAS_COMPUTE_32F does not use TF32).
  void gemm_xwT(void* y, DType yt, int64_t ldy, const void* w, int64_t ldw, const void* x, int64_t ldx, int64_t M,
                int64_t N, int64_t K, DType in_t) {
    const float one = 1.f, zero = 0.f;
    DSV3_CUBLAS_CHECK(cublasGemmEx(ctx_.blas, CUBLAS_OP_T, CUBLAS_OP_N, int(N), int(M), int(K), &one, w, cuda_type(in_t),
                                   int(ldw), x, cuda_type(in_t), int(ldx), &zero, y, cuda_type(yt), int(ldy),
                                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }

 private:
  enum Slot { kSlotIds, kSlotPos, kSlotKvWrite, kSlotKvGather, kSlotDecode, kSlotGather, kSlotGemmPtrs, kSlotCount };
  struct UploadSlot {
    std::vector<char> last;
    Tensor dev;
    void* pinned = nullptr;
    size_t pinned_cap = 0;
    cudaEvent_t ev = nullptr;
  };
  struct WeightCopy {
    std::weak_ptr<void> owner;
    int64_t numel = 0;
    Tensor copy;  // the converted weight
  };
  struct ProfPending {
    std::string name;
    double bytes;
    cudaEvent_t a, b;
  };

  // Launches are skipped while a graph step is replayed (the recording does the work; see step_graph.h).
  bool skip() const { return graphs_.replaying(); }
  void outside_graph_step(const char* op) const {
    DSV3_CHECK(graphs_.mode() == cuda::StepGraphs::Mode::Off, "{} inside a graph step", op);
  }
  void check_dev(const Tensor& t, const char* op) const {
    if (t.device != Device::CUDA && t.numel() > 0)
      fail("{}: tensor {} is on the CPU; upload it to the CUDA backend first", op, t.name);
  }
  void check_same(const Tensor& out, const Tensor& a, const char* op) const {
    check_dev(out, op);
    check_dev(a, op);
    DSV3_CHECK(out.dtype == a.dtype && out.numel() == a.numel(), "{}: {} {} vs {} {}", op, dtype_name(out.dtype),
               shape_str(out.shape), dtype_name(a.dtype), shape_str(a.shape));
  }
  void check_pool(const Tensor& pool, const KvPoolSpec& spec, int64_t layer) const {
    DSV3_CHECK(pool.device == Device::CUDA && pool.dtype == act_ &&
                   pool.numel() == spec.layers * spec.num_blocks * spec.block_size * spec.row(),
               "kv pool {} {} does not match its spec", dtype_name(pool.dtype), shape_str(pool.shape));
    DSV3_CHECK(layer >= 0 && layer < spec.layers, "kv pool: layer {} of {}", layer, spec.layers);
  }
  // Cache row (block * block_size + slot) of each of the T batch rows that seqs cover; -1 for rows they do not.
  static std::vector<int32_t> cache_rows(const KvPoolSpec& spec, const std::vector<SeqSlice>& seqs, int64_t T) {
    const int64_t bs = spec.block_size;
    std::vector<int32_t> rows(size_t(T), -1);
    for (auto& s : seqs)
      for (int64_t i = 0; i < s.len; ++i) {
        const int64_t p = s.pos0 + i;
        DSV3_CHECK(p / bs < s.num_blocks, "kv_write: position {} beyond the sequence's {} blocks", p, s.num_blocks);
        DSV3_CHECK(s.row0 + i < T, "kv_write: row {} of {}", s.row0 + i, T);
        rows[size_t(s.row0 + i)] = int32_t(int64_t(s.blocks[p / bs]) * bs + p % bs);
      }
    return rows;
  }
  static char* layer_base(const Tensor& pool, const KvPoolSpec& spec, int64_t layer) {
    return static_cast<char*>(pool.data) +
           size_t(layer * spec.num_blocks * spec.block_size * spec.row()) * dtype_size(pool.dtype);
  }

  // Host time from the first op after a wait to the next wait: how long issuing a step's work takes.
  void note_op() {
    if (in_step_) return;
    in_step_ = true;
    step_t0_ = std::chrono::steady_clock::now();
  }
  void end_step() {
    if (!in_step_) return;
    in_step_ = false;
    host_enqueue_ms_ += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - step_t0_).count();
    host_steps_++;
  }
  void copy_to_host(void* dst, const void* src, size_t bytes) {
    outside_graph_step("to_host");
    end_step();
    if (bytes) DSV3_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, ctx_.stream));
    DSV3_CUDA_CHECK(cudaStreamSynchronize(ctx_.stream));
    collect_profile();
  }

  // Device copy of host int32 metadata, re-sent only when the content changed since the slot's last upload
  // (every layer of a step asks for the same positions and block tables). The pinned staging buffer is reused
  // once its previous copy has completed (event); the device buffer is overwritten in stream order, after the
  // kernels that read its old content.
  const int* upload_i32(Slot id, const std::vector<int32_t>& v) {
    return static_cast<const int*>(upload_raw(id, v.data(), v.size() * sizeof(int32_t)));
  }
  const void* upload_raw(Slot id, const void* data, size_t bytes) {
    UploadSlot& s = slots_[id];
    if (bytes == 0) return nullptr;
    if (graphs_.mode() != cuda::StepGraphs::Mode::Off) return graphs_.upload(int(id), data, bytes);
    if (s.dev && s.last.size() == bytes && std::memcmp(s.last.data(), data, bytes) == 0) return s.dev.data;
    if (!s.ev) DSV3_CUDA_CHECK(cudaEventCreateWithFlags(&s.ev, cudaEventDisableTiming));
    DSV3_CUDA_CHECK(cudaEventSynchronize(s.ev));
    if (s.pinned_cap < bytes) {
      if (s.pinned) DSV3_CUDA_CHECK(cudaFreeHost(s.pinned));
      s.pinned_cap = std::max<size_t>(bytes * 2, 4096);
      DSV3_CUDA_CHECK(cudaMallocHost(&s.pinned, s.pinned_cap));
    }
    if (!s.dev || s.dev.nbytes() < bytes) s.dev = alloc(DType::U8, {int64_t(s.pinned_cap)}, "metadata");
    std::memcpy(s.pinned, data, bytes);
    DSV3_CUDA_CHECK(cudaMemcpyAsync(s.dev.data, s.pinned, bytes, cudaMemcpyHostToDevice, ctx_.stream));
    DSV3_CUDA_CHECK(cudaEventRecord(s.ev, ctx_.stream));
    s.last.assign(static_cast<const char*>(data), static_cast<const char*>(data) + bytes);
    return s.dev.data;
  }

  // A weight in the dtype a kernel wants: itself, or a cached converted copy (bf16 copies of fp32 checkpoints;
  // fp32 copies of bf16 weights for fp32 mode and fp32 routers), keyed by address and checked against the
  // owner's lifetime so a freed and reused address is not mistaken.
  const Tensor& bf16_weight(const Tensor& w) { return weight_as(w, DType::BF16, wcache_); }
  const Tensor& f32_weight(const Tensor& w) { return weight_as(w, DType::F32, wcache32_); }
  // The 128x128 block scales of fp8 expert weights w [E, N, K] as [E][tiles(K)][tiles(N)], the layout the sm90
  // grouped kernel reads (sm90::transpose_block_scales), made once per weight.
  const float* scales_transposed(const Tensor& w) {
    auto it = scale_t_cache_.find(w.data);
    if (it != scale_t_cache_.end()) {
      const WeightCopy& c = it->second;
      const bool same_owner = !c.owner.expired() && !c.owner.owner_before(w.storage) && !w.storage.owner_before(c.owner);
      if (same_owner && c.numel == w.numel()) return c.copy.f32();
    }
    const int64_t E = w.dim(0), nt = fp8::tiles(w.dim(1)), kt = fp8::tiles(w.dim(2));
    WeightCopy c;
    c.owner = w.storage;
    c.numel = w.numel();
    c.copy = cuda::device_tensor(ctx_, DType::F32, {E * nt * kt}, "scale_t");
    cuda::sm90::transpose_block_scales(c.copy.f32(), w.scale, E, nt, kt, ctx_.stream);
    return (scale_t_cache_[w.data] = std::move(c)).copy.f32();
  }
  const Tensor& weight_as(const Tensor& w, DType want, std::unordered_map<const void*, WeightCopy>& cache) {
    DSV3_CHECK(w.dtype == DType::F32 || w.dtype == DType::BF16, "weight {} has dtype {}; expected F32 or BF16", w.name,
               dtype_name(w.dtype));
    check_dev(w, "weight");
    if (w.dtype == want) return w;
    auto it = cache.find(w.data);
    if (it != cache.end()) {
      const WeightCopy& c = it->second;
      const bool same_owner = !c.owner.expired() && !c.owner.owner_before(w.storage) && !w.storage.owner_before(c.owner);
      if (same_owner && c.numel == w.numel()) return c.copy;
    }
    if (graphs_.mode() != cuda::StepGraphs::Mode::Off) {
      // First use inside a graph step: the copy must outlive the recording, so the step runs eagerly instead.
      graphs_.unsupported("a weight conversion");
      return w;
    }
    WeightCopy c;
    c.owner = w.storage;
    c.numel = w.numel();
    c.copy = alloc(want, w.shape, w.name.c_str());
    if (want == DType::BF16)
      cuda::f32_to_bf16(static_cast<bf16*>(c.copy.data), static_cast<const float*>(w.data), w.numel(), ctx_.stream);
    else
      cuda::bf16_to_f32(c.copy.ptr<float>(), w.ptr<bf16>(), w.numel(), ctx_.stream);
    return (cache[w.data] = std::move(c)).copy;
  }

  void collect_profile() {
    if (prof_pending_.empty()) return;
    DSV3_CUDA_CHECK(cudaStreamSynchronize(ctx_.stream));
    for (auto& p : prof_pending_) {
      float ms = 0;
      DSV3_CUDA_CHECK(cudaEventElapsedTime(&ms, p.a, p.b));
      auto& st = prof_[p.name];
      st.name = p.name;
      st.calls++;
      st.ms += ms;
      st.bytes += p.bytes;
      prof_free_.push_back(p.a);
      prof_free_.push_back(p.b);
    }
    prof_pending_.clear();
  }
  cudaEvent_t new_event() {
    if (!prof_free_.empty()) {
      cudaEvent_t e = prof_free_.back();
      prof_free_.pop_back();
      return e;
    }
    cudaEvent_t e;
    DSV3_CUDA_CHECK(cudaEventCreate(&e));
    return e;
  }

  int dev_;
  DeviceContext& ctx_;
  bool skinny_ = true, profiling_ = false, sm90_grouped_ = false, cudnn_attention_ = false, cudnn_warned_ = false;
  UploadSlot slots_[kSlotCount];
  std::unordered_map<const void*, WeightCopy> wcache_, wcache32_;
  std::unordered_map<const void*, WeightCopy> scale_t_cache_;  // transposed fp8 block scales (sm90 grouped form)
  DType act_ = DType::BF16;
  std::vector<ProfPending> prof_pending_;
  std::vector<cudaEvent_t> prof_free_;
  std::map<std::string, cuda::OpStat> prof_;
  Tensor moe_counts_host_;
  struct PendingAdd {
    Tensor out, a, b;
    bool on = false;
  } pend_;
  // The decode MoE's weighted un-permute, deferred like the add: f [T, H] += sum_k w y[pair_pos] (y fp32 [P, H]).
  struct PendingCombine {
    Tensor f, y, w, plan;  // plan: holds pair_pos's memory until the kernel is issued
    const int* pair_pos = nullptr;
    int64_t T = 0, K = 0;
    bool on = false;
  } comb_;
  // The plan made by moe_route at decode sizes for the experts call that follows (idx held, so its address cannot
  // be reused by another tensor while the plan is kept).
  struct RoutePlan {
    Tensor idx, plan;
    int64_t T = 0, K = 0, E = 0;
  } route_plan_;
  bool fp8_lt_ = true;  // dense fp8 products on cuBLASLt (else the mma.sync kernel)
  bool fp8_quant_in_block_ = false;  // decode-sized fp8 products quantize their activation in the kernel
  double moe_stats_[3] = {0, 0, 0};  // profiled MoE calls, summed active experts, summed max tokens per expert
  bool in_step_ = false;             // see note_op()
  bool graphs_on_ = true;
  cuda::StepGraphs graphs_{ctx_};
  std::chrono::steady_clock::time_point step_t0_;
  double host_enqueue_ms_ = 0;
  int64_t host_steps_ = 0;

  friend class ProfScope;
};

ProfScope::ProfScope(CudaBackend& be, const char* name, double bytes) : ProfScope(be, std::string(name), bytes) {}
ProfScope::ProfScope(CudaBackend& be, std::string name, double bytes) {
  be.note_op();
  if (!be.profiling()) return;
  be_ = &be;
  slot_ = be.prof_begin(std::move(name), bytes);
}
ProfScope::~ProfScope() {
  if (be_) be_->prof_end(slot_);
}

size_t CudaBackend::prof_begin(std::string name, double bytes) {
  ProfPending p{std::move(name), bytes, new_event(), new_event()};
  DSV3_CUDA_CHECK(cudaEventRecord(p.a, ctx_.stream));
  prof_pending_.push_back(std::move(p));
  return prof_pending_.size() - 1;
}
void CudaBackend::prof_end(size_t slot) {
  if (slot < prof_pending_.size()) cudaEventRecord(prof_pending_[slot].b, ctx_.stream);
}

std::vector<cuda::OpStat> CudaBackend::take_profile() {
  collect_profile();
  std::vector<cuda::OpStat> v;
  for (auto& [k, s] : prof_) v.push_back(s);
  std::sort(v.begin(), v.end(), [](const cuda::OpStat& a, const cuda::OpStat& b) { return a.ms > b.ms; });
  prof_.clear();
  // Pseudo-entries (not GPU time): host time to issue the work between waits; MoE routing statistics.
  if (host_steps_) {
    cuda::OpStat h;
    h.name = "(host: time to issue the ops between two waits)";
    h.calls = host_steps_;
    h.ms = host_enqueue_ms_;
    v.push_back(h);
  }
  if (moe_stats_[0] > 0) {
    cuda::OpStat m;
    m.name = fmt::format("(moe: {:.1f} active experts, {:.1f} max tokens per expert, per layer)",
                         moe_stats_[1] / moe_stats_[0], moe_stats_[2] / moe_stats_[0]);
    v.push_back(m);
  }
  host_enqueue_ms_ = 0;
  host_steps_ = 0;
  moe_stats_[0] = moe_stats_[1] = moe_stats_[2] = 0;
  return v;
}

// out[T, H] += sum_k w[t, k] Expert_idx[t,k](x[t]). Pairs (t, k) are bucketed by expert on the GPU (moe_plan).
// Decode-sized batches (at most 64 tokens): the skinny kernel reads each active expert's gate and up rows once
// for all its tokens and writes silu(g) * u, then the down rows into fp32 per-pair rows, with no host
// synchronization. Prefill: the expert counts come back to the host (one wait per MoE layer) to describe one
// grouped cuBLAS GEMM per projection with each expert's exact token count: routing can be very uneven (random
// weights send most tokens to a few experts), so padding every expert to the largest count can cost 8x.
// Both end in the weighted un-permute.
void CudaBackend::moe_experts_acc(Tensor& out, const Tensor& x, const Tensor& topk_idx, const Tensor& topk_w,
                                  const Tensor& gate_in, const Tensor& up_in, const Tensor& down_in) {
  flush();
  if (gate_in.dtype == DType::F8E4M3) return moe_experts_fp8(out, x, topk_idx, topk_w, gate_in, up_in, down_in);
  const bool f32 = x.dtype == DType::F32;
  const Tensor& gate = f32 ? f32_weight(gate_in) : bf16_weight(gate_in);
  const Tensor& up = f32 ? f32_weight(up_in) : bf16_weight(up_in);
  const Tensor& down = f32 ? f32_weight(down_in) : bf16_weight(down_in);
  const int64_t T = x.dim(0), H = x.dim(1), K = topk_idx.dim(1), E = gate.dim(0), I = gate.dim(1), P = T * K;
  DSV3_CHECK(x.dtype == act_ && out.dtype == act_ && out.numel() == T * H, "moe_experts_acc: x {} out {}",
             shape_str(x.shape), shape_str(out.shape));
  DSV3_CHECK(up.shape == gate.shape && down.dim(0) == E && down.dim(1) == H && down.dim(2) == I && gate.dim(2) == H,
             "moe_experts_acc: gate {} up {} down {} for H {}", shape_str(gate.shape), shape_str(up.shape),
             shape_str(down.shape), H);
  DSV3_CHECK(topk_idx.dtype == DType::I32 && topk_w.dtype == DType::F32 && topk_idx.dim(0) == T,
             "moe_experts_acc: idx {} w {}", shape_str(topk_idx.shape), shape_str(topk_w.shape));
  if (T == 0) return;
  const bool small = !f32 && T <= 64 && skinny_ && H % 8 == 0 && I % 8 == 0;
  if (!small && graphs_.mode() != cuda::StepGraphs::Mode::Off) {
    graphs_.unsupported("the grouped expert GEMM (host-sized)");  // the capture fails; the step runs eagerly
    return;
  }
  Tensor plan = dispatch_plan(topk_idx, T, K, E);
  int* counts = plan.ptr<int>();
  int* offsets = counts + E;
  int* active = offsets + E + 1;
  int* n_active = active + E;
  int* sorted_xrow = n_active + 1;
  int* pair_pos = sorted_xrow + P;
  // The sm90 kernels read the expert offsets on the device: no wait for the counts (except to profile).
  const bool sm90 = !small && !f32 && sm90_grouped_ && H % 8 == 0 && I % 8 == 0;
  std::vector<int> cnt;
  if ((!small && !sm90) || profiling_) cnt = counts_to_host(counts, E);  // to plan cuBLAS' grouped GEMM, or to profile
  double eb = 0;  // bytes of the active experts' weights (profiling only)
  if (profiling_) {
    int na = 0, mx = 0;
    for (int c : cnt) na += c > 0, mx = std::max(mx, c);
    eb = double(na) * double(I * H * 2);
    moe_stats_[0] += 1;
    moe_stats_[1] += na;
    moe_stats_[2] += mx;
  }
  if (small) {
    cuda::SkinnyArgs g;
    g.w = gate.ptr<bf16>();
    g.w2 = up.ptr<bf16>();
    g.ldw = H;
    g.stride_w = I * H;
    g.x = x.ptr<bf16>();
    g.ldx = H;
    g.N = int(I);
    g.K = int(H);
    g.batch = int(std::min(E, P));
    g.active = active;
    g.n_active = n_active;
    g.counts = counts;
    g.offsets = offsets;
    g.xrow = sorted_xrow;
    cuda::SkinnyArgs d = g;
    d.w = down.ptr<bf16>();
    d.w2 = nullptr;
    d.ldw = I;
    d.stride_w = H * I;
    d.ldx = I;
    d.N = int(H);
    d.K = int(I);
    d.xrow = nullptr;
    Tensor act = alloc(DType::BF16, {P, I}, "moe_act");
    Tensor y = alloc(DType::F32, {P, H}, "moe_y");
    // The combine is deferred (flush_combine): the residual add and norm that follow take it into their kernel.
    comb_ = PendingCombine{out, y, topk_w, plan, pair_pos, T, K, true};
    if (skip()) return;
    g.y = act.data;
    g.ldy = I;
    g.out_t = DType::BF16;
    d.x = act.ptr<bf16>();
    d.y = y.data;
    d.ldy = H;
    d.out_t = DType::F32;
    const int hint = int(std::min<int64_t>(T, cuda::kSkinnyMaxRows));
    {
      ProfScope ps(*this, "moe.gate_up", 2 * eb);
      cuda::skinny_gemm(g, hint, ctx_.stream);
    }
    {
      ProfScope ps(*this, "moe.down", eb);
      cuda::skinny_gemm(d, hint, ctx_.stream);
    }
    return;
  }
  // Prefill (and fp32 mode): inputs in sorted-pair order, then grouped GEMMs over the experts that have tokens.
  const int64_t es = int64_t(dtype_size(act_));
  Tensor xs = alloc(act_, {P, H}, "moe_x");
  Tensor gbuf = alloc(act_, {P, I}, "moe_g"), ubuf = alloc(act_, {P, I}, "moe_u");
  Tensor y = alloc(act_, {P, H}, "moe_y");
  {
    ProfScope ps(*this, "moe.gather");
    cuda::copy_rows(xs.data, nullptr, H * es, x.data, sorted_xrow, H * es, P, H * es, ctx_.stream);
  }
  if (sm90) {
    // gate and up in one launch (2E groups), then down: sm90/grouped.h's expert form over the plan's offsets.
    cuda::sm90::ExpertGemm g;
    g.A = xs.data, g.lda = H, g.W[0] = gate.data, g.W[1] = up.data, g.w_stride = I * H;
    g.D[0] = gbuf.data, g.D[1] = ubuf.data, g.ldd = I, g.offsets = offsets;
    g.E = int(E), g.N = int(I), g.K = int(H), g.sets = 2;
    const size_t wsb = cuda::sm90::expert_workspace_bytes(int(2 * E), false);
    Tensor ws = alloc(DType::U8, {int64_t(wsb)}, "sm90_workspace");
    {
      ProfScope ps(*this, "moe.gate_up", 2 * eb);
      cuda::sm90::expert_gemm_bf16(g, ws.data, wsb, ctx_.stream);
    }
    {
      ProfScope ps(*this, "moe.silu_mul");
      cuda::silu_mul(gbuf.data, gbuf.data, ubuf.data, P * I, act_, ctx_.stream);
    }
    g.A = gbuf.data, g.lda = I, g.W[0] = down.data, g.W[1] = nullptr, g.w_stride = H * I;
    g.D[0] = y.data, g.D[1] = nullptr, g.ldd = H, g.N = int(H), g.K = int(I), g.sets = 1;
    {
      ProfScope ps(*this, "moe.down", eb);
      cuda::sm90::expert_gemm_bf16(g, ws.data, wsb, ctx_.stream);
    }
    ProfScope ps(*this, "moe.combine");
    cuda::moe_combine(out.ptr<bf16>(), y.data, false, topk_w.f32(), pair_pos, int(T), int(K), int(H), ctx_.stream);
    return;
  }
  std::vector<int64_t> off(size_t(E) + 1, 0);
  for (int64_t e = 0; e < E; ++e) off[size_t(e) + 1] = off[size_t(e)] + cnt[size_t(e)];
  // Column-major view of y = x W^T: C (n_out x tokens) = W^T (n_out x k) * X (k x tokens), W row-major [n_out, k].
  struct Group {
    std::vector<int> m, n, k, lda, ldb, ldc, size;
    std::vector<cublasOperation_t> ta, tb;
    std::vector<float> alpha, beta;
    std::vector<const void*> A, B;
    std::vector<void*> C;
    void add(int m_, int n_, int k_, const void* a, const void* b, void* c) {
      m.push_back(m_), n.push_back(n_), k.push_back(k_), lda.push_back(k_), ldb.push_back(k_), ldc.push_back(m_);
      size.push_back(1), ta.push_back(CUBLAS_OP_T), tb.push_back(CUBLAS_OP_N), alpha.push_back(1.f), beta.push_back(0.f);
      A.push_back(a), B.push_back(b), C.push_back(c);
    }
  } gu, dn;
  auto at = [es](const Tensor& t, int64_t elems) { return static_cast<char*>(t.data) + elems * es; };
  for (int64_t e = 0; e < E; ++e) {
    const int c = cnt[size_t(e)];
    if (!c) continue;
    const int64_t o = off[size_t(e)];
    gu.add(int(I), c, int(H), at(gate, e * I * H), at(xs, o * H), at(gbuf, o * I));
    gu.add(int(I), c, int(H), at(up, e * I * H), at(xs, o * H), at(ubuf, o * I));
    dn.add(int(H), c, int(I), at(down, e * H * I), at(gbuf, o * I), at(y, o * H));
  }
  // Device arrays of operand pointers: [A | B | C] of the gate/up groups, then of the down groups.
  std::vector<const void*> ptrs;
  for (auto* gr : {&gu, &dn}) {
    ptrs.insert(ptrs.end(), gr->A.begin(), gr->A.end());
    ptrs.insert(ptrs.end(), gr->B.begin(), gr->B.end());
    ptrs.insert(ptrs.end(), gr->C.begin(), gr->C.end());
  }
  auto* dptr = static_cast<void* const*>(upload_raw(kSlotGemmPtrs, ptrs.data(), ptrs.size() * sizeof(void*)));
  const cudaDataType_t ct = cuda_type(act_);
  auto grouped = [&](Group& gr, void* const* base) {
    const int n = int(gr.m.size());
    if (n == 0) return;
    const cublasStatus_t st = cublasGemmGroupedBatchedEx(
        ctx_.blas, gr.ta.data(), gr.tb.data(), gr.m.data(), gr.n.data(), gr.k.data(), gr.alpha.data(),
        reinterpret_cast<const void* const*>(base), ct, gr.lda.data(), reinterpret_cast<const void* const*>(base + n), ct,
        gr.ldb.data(), gr.beta.data(), base + 2 * n, ct, gr.ldc.data(), n, gr.size.data(), CUBLAS_COMPUTE_32F);
    if (st != CUBLAS_STATUS_NOT_SUPPORTED) {
      DSV3_CUBLAS_CHECK(st);
      return;
    }
    for (int i = 0; i < n; ++i)  // a cuBLAS without this grouped form: one call per expert
      DSV3_CUBLAS_CHECK(cublasGemmEx(ctx_.blas, CUBLAS_OP_T, CUBLAS_OP_N, gr.m[i], gr.n[i], gr.k[i], &gr.alpha[i], gr.A[i],
                                     ct, gr.lda[i], gr.B[i], ct, gr.ldb[i], &gr.beta[i], gr.C[i], ct, gr.ldc[i],
                                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  };
  {
    ProfScope ps(*this, "moe.gate_up", 2 * eb);
    grouped(gu, dptr);
  }
  {
    ProfScope ps(*this, "moe.silu_mul");
    cuda::silu_mul(gbuf.data, gbuf.data, ubuf.data, P * I, act_, ctx_.stream);
  }
  {
    ProfScope ps(*this, "moe.down", eb);
    grouped(dn, dptr + 3 * gu.m.size());
  }
  ProfScope ps(*this, "moe.combine");
  if (f32) cuda::moe_combine_f32(out.f32(), y.ptr<float>(), topk_w.f32(), pair_pos, int(T), int(K), int(H), ctx_.stream);
  else cuda::moe_combine(out.ptr<bf16>(), y.data, false, topk_w.f32(), pair_pos, int(T), int(K), int(H), ctx_.stream);
}

// ---- FP8 weights. Activations are quantized in 1x128 tiles by a kernel right before each product (core/fp8.h's
// codes and scales, bit for bit); weights stay e4m3 with their 128x128 block scales. Decode-sized products (at most
// kFp8SkinnyRows rows) read the weights straight from memory in the skinny kernel; larger ones go to cuBLASLt's
// block-scaled FP8 GEMM (DSV3_CUDA_FP8_GEMM=mma: the grouped mma.sync kernel instead), routed experts to the
// grouped FP8 kernel (all active experts in one launch per projection).

std::pair<Tensor, Tensor> CudaBackend::quantize_act(const Tensor& x, int64_t M, int64_t K, int64_t scales_ld) {
  const int64_t kt = fp8::tiles(K);
  Tensor q = alloc(DType::U8, {M, K}, "x_fp8");
  Tensor sc = alloc(DType::F32, {scales_ld ? kt * scales_ld : M * kt}, "x_fp8_scale");
  if (!skip() && M > 0)
    cuda::quantize_1x128(q.ptr<uint8_t>(), sc.f32(), scales_ld, x.data, x.dtype, K, M, K, ctx_.stream);
  return {q, sc};
}

void CudaBackend::linear_fp8(Tensor& y, const Tensor& x, const Tensor& w) {
  check_dev(w, "linear");
  const int64_t K = w.dim(-1), N = w.dim(0), M = x.numel() / std::max<int64_t>(K, 1);
  DSV3_CHECK(w.ndim() == 2 && w.scale && x.numel() == M * K && y.numel() == M * N, "linear {}: x {} y {} fp8 w {}",
             w.name, shape_str(x.shape), shape_str(y.shape), shape_str(w.shape));
  DSV3_CHECK(x.dtype == act_ && (y.dtype == DType::BF16 || y.dtype == DType::F32), "linear {}: x {} y {}", w.name,
             dtype_name(x.dtype), dtype_name(y.dtype));
  if (K % 16 != 0) fail("linear {}: fp8 weights need an input width that is a multiple of 16, got {}", w.name, K);
  ProfScope ps(*this, profiling_ ? "linear_fp8:" + weight_kind(w.name) : std::string(), double(N * K + M * K * 2));
  if (M == 0 || N == 0) return;
  const int64_t kt = fp8::tiles(K);
  if (M > kFp8SkinnyRows && fp8_lt_) {
    // cuBLASLt offers its block-scaled kernels for row counts that are multiples of 16: pad with zero rows.
    const int64_t Mp = (M + 15) / 16 * 16, esz = int64_t(dtype_size(y.dtype));
    Tensor xq = alloc(DType::U8, {Mp, K}, "x_fp8"), sx = alloc(DType::F32, {kt * Mp}, "x_fp8_scale");
    Tensor yp = Mp > M ? alloc(y.dtype, {Mp, N}, "y_padded") : y;
    const float* sw = w.scale;
    Tensor swp;
    if (kt % 4) swp = alloc(DType::F32, {fp8::tiles(N) * cuda::round_up4(kt)}, "w_scale_padded"), sw = swp.f32();
    if (skip()) return;
    if (Mp > M) DSV3_CUDA_CHECK(cudaMemsetAsync(xq.ptr<uint8_t>() + M * K, 0, size_t((Mp - M) * K), ctx_.stream));
    cuda::quantize_1x128(xq.ptr<uint8_t>(), sx.f32(), Mp, x.data, x.dtype, K, M, K, ctx_.stream);
    if (kt % 4) cuda::pad_scale_rows(swp.f32(), w.scale, fp8::tiles(N), kt, ctx_.stream);
    cuda::LtFp8 lt{ctx_.lt, ctx_.blas_ws, size_t(32) << 20};
    if (cuda::fp8_lt_gemm(lt, yp.data, y.dtype, xq.ptr<uint8_t>(), sx.f32(), w.ptr<uint8_t>(), sw, Mp, N, K,
                          ctx_.stream)) {
      if (Mp > M) cuda::copy_rows(y.data, nullptr, N * esz, yp.data, nullptr, N * esz, M, N * esz, ctx_.stream);
      return;
    }
  }
  if (M <= kFp8SkinnyRows) {
    // Up to kFp8QuantInBlockRows rows the skinny kernel quantizes x itself (one launch); above, every block would
    // redo it, so x is quantized once first.
    Tensor xq, sx;
    const bool in_block = fp8_quant_in_block_ && M <= kFp8QuantInBlockRows;
    if (!in_block) std::tie(xq, sx) = quantize_act(x, M, K);
    if (skip()) return;
    cuda::Fp8SkinnyArgs a;
    a.w = w.ptr<uint8_t>();
    a.sw = w.scale;
    if (!in_block) a.x = xq.ptr<uint8_t>(), a.sx = sx.f32();
    else a.xa = x.data, a.xa_t = x.dtype;
    a.y = y.data;
    a.ldy = N;
    a.M = int(M);
    a.N = int(N);
    a.K = int(K);
    a.out_t = y.dtype;
    cuda::fp8_skinny_gemm(a, ctx_.stream);
    return;
  }
  auto [xq, sx] = quantize_act(x, M, K);
  if (graphs_.mode() != cuda::StepGraphs::Mode::Off) {
    graphs_.unsupported("the fp8 mma GEMM (host-described problems)");
    return;
  }
  std::vector<cuda::Fp8Problem> probs{{xq.ptr<uint8_t>(), sx.f32(), w.ptr<uint8_t>(), w.scale, y.data, int(M), int(N),
                                       int(K), int(K), int(K), int(N), int(kt), int(kt), y.dtype == DType::F32, 0, 0}};
  Tensor dp = alloc(DType::U8, {int64_t(sizeof(cuda::Fp8Problem))}, "fp8_problems");
  cuda::fp8_grouped_gemm(probs, static_cast<cuda::Fp8Problem*>(dp.data), ctx_.stream);
}

void CudaBackend::moe_experts_fp8(Tensor& out, const Tensor& x, const Tensor& topk_idx, const Tensor& topk_w,
                                  const Tensor& gate, const Tensor& up, const Tensor& down) {
  for (const Tensor* t : {&gate, &up, &down}) {
    check_dev(*t, "moe_experts_acc");
    DSV3_CHECK(t->dtype == DType::F8E4M3 && t->scale && t->ndim() == 3, "moe_experts_acc: expert weight {} is {} {}",
               t->name, dtype_name(t->dtype), shape_str(t->shape));
  }
  const int64_t T = x.dim(0), H = x.dim(1), K = topk_idx.dim(1), E = gate.dim(0), I = gate.dim(1), P = T * K;
  DSV3_CHECK(x.dtype == act_ && out.dtype == act_ && out.numel() == T * H, "moe_experts_acc: x {} out {}",
             shape_str(x.shape), shape_str(out.shape));
  DSV3_CHECK(up.shape == gate.shape && down.dim(0) == E && down.dim(1) == H && down.dim(2) == I && gate.dim(2) == H,
             "moe_experts_acc: gate {} up {} down {} for H {}", shape_str(gate.shape), shape_str(up.shape),
             shape_str(down.shape), H);
  DSV3_CHECK(topk_idx.dtype == DType::I32 && topk_w.dtype == DType::F32 && topk_idx.dim(0) == T,
             "moe_experts_acc: idx {} w {}", shape_str(topk_idx.shape), shape_str(topk_w.shape));
  if (H % 16 || I % 16) fail("moe_experts_acc: fp8 experts need H and I multiples of 16, got {} and {}", H, I);
  if (T == 0) return;
  const bool small = act_ == DType::BF16 && T <= 64;
  if (!small && graphs_.mode() != cuda::StepGraphs::Mode::Off) {
    graphs_.unsupported("the grouped fp8 expert GEMM (host-sized)");
    return;
  }
  const int64_t kh = fp8::tiles(H), ki = fp8::tiles(I);
  Tensor plan = dispatch_plan(topk_idx, T, K, E);
  int* counts = plan.ptr<int>();
  int* offsets = counts + E;
  int* active = offsets + E + 1;
  int* n_active = active + E;
  int* sorted_xrow = n_active + 1;
  int* pair_pos = sorted_xrow + P;
  if (small) {
    // Decode sizes: gate and up in one pass per active expert (SwiGLU in the epilogue), then down on the SwiGLU
    // output into fp32 per-pair rows; x and the SwiGLU output are quantized by a launch each before their product
    // (or inside the skinny kernel with DSV3_CUDA_FP8_QUANT=in-block).
    cuda::Fp8SkinnyArgs a;
    a.stride_w = I * H;
    a.stride_sw = ki * kh;
    a.xa = x.data;
    a.xa_t = act_;
    a.ldy = I;
    a.N = int(I);
    a.K = int(H);
    a.batch = int(std::min(E, P));
    a.active = active;
    a.n_active = n_active;
    a.counts = counts;
    a.offsets = offsets;
    a.xrow = sorted_xrow;
    a.out_t = act_;
    Tensor act = alloc(act_, {P, I}, "moe_act");
    Tensor y = alloc(DType::F32, {P, H}, "moe_y");
    Tensor xq, sx, aq, sa;
    if (!fp8_quant_in_block_) {
      std::tie(xq, sx) = quantize_act(x, T, H);
      a.xa = nullptr, a.x = xq.ptr<uint8_t>(), a.sx = sx.f32();
    }
    comb_ = PendingCombine{out, y, topk_w, plan, pair_pos, T, K, true};
    if (!skip()) {
      ProfScope ps(*this, "moe.fp8.gate_up");
      a.w = gate.ptr<uint8_t>(), a.sw = gate.scale, a.w2 = up.ptr<uint8_t>(), a.sw2 = up.scale, a.y = act.data;
      cuda::fp8_skinny_gemm(a, ctx_.stream);
    }
    if (!fp8_quant_in_block_) std::tie(aq, sa) = quantize_act(act, P, I);
    if (skip()) return;
    ProfScope ps(*this, "moe.fp8.down");
    a.w = down.ptr<uint8_t>(), a.sw = down.scale, a.w2 = nullptr, a.sw2 = nullptr, a.stride_w = H * I;
    a.stride_sw = kh * ki, a.xa = fp8_quant_in_block_ ? act.data : nullptr, a.xrow = nullptr;
    if (!fp8_quant_in_block_) a.x = aq.ptr<uint8_t>(), a.sx = sa.f32();
    a.y = y.data, a.ldy = H, a.N = int(H), a.K = int(I), a.out_t = DType::F32;
    cuda::fp8_skinny_gemm(a, ctx_.stream);
    return;
  }
  auto [xq, sx] = quantize_act(x, T, H);
  Tensor g = alloc(act_, {P, I}, "moe_g"), u = alloc(act_, {P, I}, "moe_u");
  if (act_ == DType::BF16 && sm90_grouped_) {
    // sm90/grouped.h's fp8 expert form: rows in sorted-pair order with their scales regrouped per expert, gate
    // and up in one launch, SwiGLU, the SwiGLU output quantized and regrouped, down; no host round trip.
    Tensor xs = alloc(DType::U8, {P, H}, "moe_x_fp8"), sxs = alloc(DType::F32, {P, kh}, "moe_x_scale");
    Tensor sxg = alloc(DType::F32, {P * kh}, "moe_x_scale_grouped"), y = alloc(act_, {P, H}, "moe_y");
    const size_t wsb = cuda::sm90::expert_workspace_bytes(int(2 * E), true);
    Tensor ws = alloc(DType::U8, {int64_t(wsb)}, "sm90_workspace");
    const float *gs = scales_transposed(gate), *us = scales_transposed(up), *ds = scales_transposed(down);
    if (skip()) return;
    cuda::copy_rows(xs.data, nullptr, H, xq.data, sorted_xrow, H, P, H, ctx_.stream);
    cuda::copy_rows(sxs.data, nullptr, kh * 4, sx.data, sorted_xrow, kh * 4, P, kh * 4, ctx_.stream);
    cuda::sm90::regroup_act_scales(sxg.f32(), sxs.f32(), offsets, int(E), P, kh, ctx_.stream);
    cuda::sm90::ExpertGemm eg;
    eg.A = xs.data, eg.lda = H, eg.W[0] = gate.data, eg.W[1] = up.data, eg.w_stride = I * H;
    eg.D[0] = g.data, eg.D[1] = u.data, eg.ldd = I, eg.offsets = offsets;
    eg.E = int(E), eg.N = int(I), eg.K = int(H), eg.sets = 2, eg.sa = sxg.f32(), eg.sw[0] = gs, eg.sw[1] = us;
    {
      ProfScope ps(*this, "moe.fp8.gate_up");
      cuda::sm90::expert_gemm_fp8(eg, ws.data, wsb, ctx_.stream);
      cuda::silu_mul(g.data, g.data, u.data, P * I, act_, ctx_.stream);
    }
    auto [aq, sa] = quantize_act(g, P, I);
    Tensor sag = alloc(DType::F32, {P * ki}, "moe_act_scale_grouped");
    cuda::sm90::regroup_act_scales(sag.f32(), sa.f32(), offsets, int(E), P, ki, ctx_.stream);
    eg.A = aq.data, eg.lda = I, eg.W[0] = down.data, eg.W[1] = nullptr, eg.w_stride = H * I;
    eg.D[0] = y.data, eg.D[1] = nullptr, eg.ldd = H, eg.N = int(H), eg.K = int(I), eg.sets = 1;
    eg.sa = sag.f32(), eg.sw[0] = ds, eg.sw[1] = nullptr;
    {
      ProfScope ps(*this, "moe.fp8.down");
      cuda::sm90::expert_gemm_fp8(eg, ws.data, wsb, ctx_.stream);
    }
    ProfScope ps(*this, "moe.combine");
    cuda::moe_combine(out.ptr<bf16>(), y.data, false, topk_w.f32(), pair_pos, int(T), int(K), int(H), ctx_.stream);
    return;
  }
  // Prefill: the quantized rows in sorted-pair order, then one grouped launch per projection over the active experts.
  const std::vector<int> cnt = counts_to_host(counts, E);
  Tensor xs = alloc(DType::U8, {P, H}, "moe_x_fp8"), sxs = alloc(DType::F32, {P, kh}, "moe_x_scale");
  Tensor y = alloc(act_, {P, H}, "moe_y");
  cuda::copy_rows(xs.data, nullptr, H, xq.data, sorted_xrow, H, P, H, ctx_.stream);
  cuda::copy_rows(sxs.data, nullptr, kh * 4, sx.data, sorted_xrow, kh * 4, P, kh * 4, ctx_.stream);
  const int64_t es = int64_t(dtype_size(act_));
  std::vector<cuda::Fp8Problem> gu, dn;
  int64_t o = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int c = cnt[size_t(e)];
    if (!c) continue;
    const int cf = act_ == DType::F32;
    for (const Tensor* w : {&gate, &up})
      gu.push_back({xs.ptr<uint8_t>() + o * H, sxs.f32() + o * kh, w->ptr<uint8_t>() + e * I * H, w->scale + e * ki * kh,
                    static_cast<char*>((w == &gate ? g : u).data) + o * I * es, c, int(I), int(H), int(H), int(H), int(I),
                    int(kh), int(kh), cf, 0, 0});
    dn.push_back({nullptr, nullptr, down.ptr<uint8_t>() + e * H * I, down.scale + e * kh * ki,
                  static_cast<char*>(y.data) + o * H * es, c, int(H), int(I), int(I), int(I), int(H), int(ki), int(ki), cf,
                  0, 0});
    dn.back().tile0 = int(o);  // row offset, resolved below once the activation codes exist
    o += c;
  }
  Tensor dp = alloc(DType::U8, {int64_t((gu.size() + dn.size() + 1) * sizeof(cuda::Fp8Problem))}, "fp8_problems");
  auto* dprobs = static_cast<cuda::Fp8Problem*>(dp.data);
  {
    ProfScope ps(*this, "moe.fp8.gate_up");
    cuda::fp8_grouped_gemm(gu, dprobs, ctx_.stream);
    cuda::silu_mul(g.data, g.data, u.data, P * I, act_, ctx_.stream);
  }
  auto [aq, sa] = quantize_act(g, P, I);
  for (auto& p : dn) {
    const int64_t row = p.tile0;
    p.A = aq.ptr<uint8_t>() + row * I;
    p.sa = sa.f32() + row * ki;
    p.tile0 = 0;
  }
  {
    ProfScope ps(*this, "moe.fp8.down");
    cuda::fp8_grouped_gemm(dn, dprobs + gu.size(), ctx_.stream);
  }
  ProfScope ps(*this, "moe.combine");
  if (act_ == DType::F32)
    cuda::moe_combine_f32(out.f32(), y.ptr<float>(), topk_w.f32(), pair_pos, int(T), int(K), int(H), ctx_.stream);
  else
    cuda::moe_combine(out.ptr<bf16>(), y.data, false, topk_w.f32(), pair_pos, int(T), int(K), int(H), ctx_.stream);
}

CudaBackend& as_cuda(Backend& be) {
  auto* c = dynamic_cast<CudaBackend*>(&be);
  if (!c) fail("backend {} is not a CUDA backend", be.name());
  return *c;
}

}  // namespace

namespace cuda {

std::pair<Tensor, Tensor> quantize_weight_fp8(Backend& be_in, const Tensor& w) {
  CudaBackend& be = as_cuda(be_in);
  DSV3_CHECK(w.device == Device::CUDA && (w.dtype == DType::BF16 || w.dtype == DType::F32) &&
                 (w.ndim() == 2 || w.ndim() == 3),
             "quantize_weight_fp8: {} is {} {}", w.name, dtype_name(w.dtype), shape_str(w.shape));
  const int64_t B = w.ndim() == 3 ? w.dim(0) : 1, N = w.dim(-2), K = w.dim(-1);
  Tensor q = be.alloc(DType::F8E4M3, w.shape, w.name.c_str());
  Tensor s = be.alloc(DType::F32, {B * fp8::tiles(N) * fp8::tiles(K)}, (w.name + "_scale_inv").c_str());
  quantize_128x128(q.ptr<uint8_t>(), s.f32(), w.data, w.dtype, N, K, B, be.stream());
  q.scale = s.f32();
  return {q, s};
}

void* stream_of(Backend& be) { return as_cuda(be).stream(); }

}  // namespace cuda

bool cuda_available() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return n > 0;
}

std::unique_ptr<Backend> make_cuda_backend(int device_index) {
  cuda::require_device(device_index);
  return std::make_unique<CudaBackend>(device_index);
}

namespace cuda {

void set_profiling(Backend& be, bool on) { as_cuda(be).set_profiling(on); }
std::vector<OpStat> take_profile(Backend& be) { return as_cuda(be).take_profile(); }
void set_skinny(Backend& be, bool on) { as_cuda(be).set_skinny(on); }
void set_graphs(Backend& be, bool on) { as_cuda(be).set_graphs(on); }
GraphStats graph_stats(Backend& be) {
  const StepGraphs::Stats s = as_cuda(be).graph_stats();
  return GraphStats{s.captures, s.replays, s.eager, s.failed};
}

DeviceInfo device_info(Backend& be) {
  const cudaDeviceProp& p = as_cuda(be).ctx().prop;
  DeviceInfo d;
  d.name = p.name;
  d.sms = p.multiProcessorCount;
  d.mem_gib = double(p.totalGlobalMem) / double(1ull << 30);
  int khz = 0;
  cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, as_cuda(be).ctx().dev);
  d.clock_mhz = khz / 1000;
  return d;
}

double time_ms(Backend& be, int warm, int reps, const std::function<void()>& fn) {
  CudaBackend& c = as_cuda(be);
  for (int i = 0; i < warm; ++i) fn();
  std::vector<float> v;
  cudaEvent_t a, b;
  DSV3_CUDA_CHECK(cudaEventCreate(&a));
  DSV3_CUDA_CHECK(cudaEventCreate(&b));
  for (int i = 0; i < reps; ++i) {
    DSV3_CUDA_CHECK(cudaEventRecord(a, c.stream()));
    fn();
    DSV3_CUDA_CHECK(cudaEventRecord(b, c.stream()));
    DSV3_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    DSV3_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    v.push_back(ms);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  DSV3_CUDA_CHECK(cudaGetLastError());
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : double(v[v.size() / 2]);
}

double measure_copy_bandwidth(Backend& be, size_t bytes, int reps) {
  CudaBackend& c = as_cuda(be);
  Tensor a = c.alloc(DType::U8, {int64_t(bytes)}, "copy_a"), b = c.alloc(DType::U8, {int64_t(bytes)}, "copy_b");
  DSV3_CUDA_CHECK(cudaMemsetAsync(a.data, 1, bytes, c.stream()));
  const double ms = time_ms(be, 3, reps, [&] {
    DSV3_CUDA_CHECK(cudaMemcpyAsync(b.data, a.data, bytes, cudaMemcpyDeviceToDevice, c.stream()));
  });
  return 2.0 * double(bytes) / (ms * 1e-3);
}

double measure_gemm_flops(Backend& be, int m, int n, int k, int reps) {
  CudaBackend& c = as_cuda(be);
  Tensor x = c.alloc(DType::BF16, {m, k}, "gemm_x"), w = c.alloc(DType::BF16, {n, k}, "gemm_w"),
         y = c.alloc(DType::BF16, {m, n}, "gemm_y");
  c.fill_normal(x, 0.f, 1.f, 1);  // random data: zeros run faster than real data
  c.fill_normal(w, 0.f, 1.f, 2);
  const double ms =
      time_ms(be, 3, reps, [&] { c.gemm_xwT(y.data, DType::BF16, n, w.data, k, x.data, k, m, n, k, DType::BF16); });
  return 2.0 * double(m) * n * k / (ms * 1e-3);
}

}  // namespace cuda

}  // namespace dsv3
