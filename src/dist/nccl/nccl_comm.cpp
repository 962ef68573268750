// NCCL communicator (see dist/nccl.h). Uneven collectives are NCCL groups of point-to-point or rooted calls:
// reduce-scatter = one ncclReduce per rank's block, all-gather = one ncclBroadcast per rank's block,
// all-to-all = ncclSend/ncclRecv pairs, each group one launch.
#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <thread>

#include "core/error.h"
#include "dist/nccl.h"
#include "dist/runtime.h"

namespace dsv3 {

namespace {

void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail("NCCL transport: {}: {}", what, cudaGetErrorString(e));
}
void nccl_ok(ncclResult_t r, const char* what) {
  if (r != ncclSuccess) fail("NCCL {} failed: {}", what, ncclGetErrorString(r));
}

ncclDataType_t nccl_type(CommType t) {
  switch (t) {
    case CommType::F32: return ncclFloat32;
    case CommType::F64: return ncclFloat64;
    case CommType::I32: return ncclInt32;
    case CommType::I64: return ncclInt64;
    case CommType::U8: return ncclUint8;
  }
  return ncclUint8;
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(ncclComm_t c, int device) : comm_(c), device_(device) {
    nccl_ok(ncclCommUserRank(comm_, &rank_), "rank");
    nccl_ok(ncclCommCount(comm_, &size_), "size");
    cuda_ok(cudaSetDevice(device_), "cudaSetDevice");
    cuda_ok(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "stream");
    cuda_ok(cudaMalloc(&scratch_, sizeof(int32_t)), "cudaMalloc");
  }
  ~NcclCommunicator() override {
    if (scratch_) cudaFree(scratch_);
    if (stream_) cudaStreamDestroy(stream_);
    if (comm_) ncclCommDestroy(comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string transport() const override { return "nccl"; }

  void all_reduce_sum(void* x, int64_t n, CommType t) override {
    nccl_ok(ncclAllReduce(x, x, size_t(n), nccl_type(t), ncclSum, comm_, stream_), "all-reduce");
    wait("all-reduce");
  }
  void reduce_scatter_sum(void* out, const void* in, const std::vector<int64_t>& counts, CommType t) override {
    check(counts);
    const size_t es = comm_type_size(t);
    nccl_ok(ncclGroupStart(), "group");
    int64_t off = 0;
    for (int r = 0; r < size_; ++r) {
      nccl_ok(ncclReduce(static_cast<const char*>(in) + size_t(off) * es, out, size_t(counts[r]), nccl_type(t),
                         ncclSum, r, comm_, stream_), "reduce-scatter");
      off += counts[r];
    }
    nccl_ok(ncclGroupEnd(), "reduce-scatter");
    wait("reduce-scatter");
  }
  void all_gather(void* out, const void* in, const std::vector<int64_t>& counts, CommType t) override {
    check(counts);
    const size_t es = comm_type_size(t);
    nccl_ok(ncclGroupStart(), "group");
    int64_t off = 0;
    for (int r = 0; r < size_; ++r) {
      nccl_ok(ncclBroadcast(in, static_cast<char*>(out) + size_t(off) * es, size_t(counts[r]), nccl_type(t), r, comm_,
                            stream_), "all-gather");
      off += counts[r];
    }
    nccl_ok(ncclGroupEnd(), "all-gather");
    wait("all-gather");
  }
  void all_to_all(const void* send, const std::vector<int64_t>& sc, void* recv, const std::vector<int64_t>& rc,
                  CommType t) override {
    check(sc), check(rc);
    const size_t es = comm_type_size(t);
    nccl_ok(ncclGroupStart(), "group");
    int64_t so = 0, ro = 0;
    for (int r = 0; r < size_; ++r) {
      if (sc[r] > 0)
        nccl_ok(ncclSend(static_cast<const char*>(send) + size_t(so) * es, size_t(sc[r]), nccl_type(t), r, comm_,
                         stream_), "all-to-all send");
      if (rc[r] > 0)
        nccl_ok(ncclRecv(static_cast<char*>(recv) + size_t(ro) * es, size_t(rc[r]), nccl_type(t), r, comm_, stream_),
                "all-to-all recv");
      so += sc[r], ro += rc[r];
    }
    nccl_ok(ncclGroupEnd(), "all-to-all");
    wait("all-to-all");
  }
  void broadcast(void* x, int64_t n, CommType t, int root) override {
    nccl_ok(ncclBroadcast(x, x, size_t(n), nccl_type(t), root, comm_, stream_), "broadcast");
    wait("broadcast");
  }
  void barrier() override { all_reduce_sum(scratch_, 1, CommType::I32); }
  std::unique_ptr<Communicator> split(int color, int key) override {
    ncclComm_t c = nullptr;
    nccl_ok(ncclCommSplit(comm_, color, key, &c, nullptr), "communicator split");
    return std::make_unique<NcclCommunicator>(c, device_);
  }

 private:
  void check(const std::vector<int64_t>& c) const {
    if (int(c.size()) != size_) fail("internal: NCCL collective needs {} counts, got {}", size_, c.size());
  }
  // Polls the stream so that a peer that never joins (dead or hung) ends in an error after the timeout.
  void wait(const char* what) {
    const auto t0 = std::chrono::steady_clock::now();
    const double limit = dist::timeout_s();
    for (;;) {
      const cudaError_t e = cudaStreamQuery(stream_);
      if (e == cudaSuccess) return;
      if (e != cudaErrorNotReady) cuda_ok(e, what);
      ncclResult_t async = ncclSuccess;
      nccl_ok(ncclCommGetAsyncError(comm_, &async), "error query");
      if (async != ncclSuccess) {
        ncclCommAbort(comm_), comm_ = nullptr;
        fail("NCCL {} failed on rank {}: {}", what, rank_, ncclGetErrorString(async));
      }
      if (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() > limit) {
        ncclCommAbort(comm_), comm_ = nullptr;
        fail("NCCL {} did not complete within {:.0f} s on rank {} (DSV3_DIST_TIMEOUT): another rank died or hangs",
             what, limit, rank_);
      }
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
  ncclComm_t comm_ = nullptr;
  int device_ = 0, rank_ = 0, size_ = 1;
  cudaStream_t stream_ = nullptr;
  void* scratch_ = nullptr;
};

}  // namespace

bool have_nccl() { return true; }

std::unique_ptr<Communicator> make_nccl_communicator(Communicator& bootstrap, int device) {
  cuda_ok(cudaSetDevice(device), "cudaSetDevice");
  ncclUniqueId id{};
  if (bootstrap.rank() == 0) nccl_ok(ncclGetUniqueId(&id), "unique id");
  bootstrap.broadcast(&id, int64_t(sizeof(id)), CommType::U8, 0);
  ncclComm_t c = nullptr;
  nccl_ok(ncclCommInitRank(&c, bootstrap.size(), id, bootstrap.rank()), "init");
  return std::make_unique<NcclCommunicator>(c, device);
}

}  // namespace dsv3
