#pragma once
// Collective communication between the ranks of a distributed job, declared once and implemented per
// transport: dist/local_comm.cpp (one process: every collective is a copy), dist/mpi (OpenMPI, host memory,
// CPU ranks and the NCCL bootstrap), dist/nccl (GPU memory, one GPU per rank). Training and inference code
// call only this interface.
//
// Conventions:
//  - Buffers are memory of the transport (host memory for local/MPI, device memory for NCCL); counts are in
//    elements of `type`, per rank, in rank order of this communicator.
//  - Every rank of the communicator calls the same collectives in the same order (the usual MPI rule); a
//    rank that does not (it died, hangs or diverged) makes the others fail after the job's timeout
//    (dist/runtime.h) instead of waiting forever.
//  - Sums run in a fixed order per transport and world size, so a run is deterministic for a given layout.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace dsv3 {

enum class CommType { F32, F64, I32, I64, U8 };
size_t comm_type_size(CommType t);

template <typename T>
constexpr CommType comm_type_of();
template <> constexpr CommType comm_type_of<float>() { return CommType::F32; }
template <> constexpr CommType comm_type_of<double>() { return CommType::F64; }
template <> constexpr CommType comm_type_of<int32_t>() { return CommType::I32; }
template <> constexpr CommType comm_type_of<int64_t>() { return CommType::I64; }
template <> constexpr CommType comm_type_of<uint8_t>() { return CommType::U8; }

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string transport() const = 0;  // "local", "mpi", "nccl"

  // x[n] = sum over ranks of x[n], in place.
  virtual void all_reduce_sum(void* x, int64_t n, CommType t) = 0;
  // in: [sum(counts)] = one block per rank (block r has counts[r] elements); out [counts[rank]] = the sum over
  // ranks of block `rank`. in and out must not overlap.
  virtual void reduce_scatter_sum(void* out, const void* in, const std::vector<int64_t>& counts, CommType t) = 0;
  // out [sum(counts)] = the concatenation of every rank's in [counts[r]], in rank order.
  virtual void all_gather(void* out, const void* in, const std::vector<int64_t>& counts, CommType t) = 0;
  // Uneven all-to-all: send = blocks for ranks 0..size-1 (send_counts[r] elements each, consecutive);
  // recv = blocks from ranks 0..size-1 (recv_counts[r] elements each, consecutive). recv_counts[r] must equal
  // what rank r sends to this rank (exchange the counts first, see exchange_counts).
  virtual void all_to_all(const void* send, const std::vector<int64_t>& send_counts, void* recv,
                          const std::vector<int64_t>& recv_counts, CommType t) = 0;
  virtual void broadcast(void* x, int64_t n, CommType t, int root) = 0;
  virtual void barrier() = 0;
  // A communicator over the ranks that pass the same color, ordered by key (MPI_Comm_split semantics).
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

  // ---- typed helpers
  template <typename T>
  void all_reduce_sum(std::vector<T>& x) {
    all_reduce_sum(x.data(), int64_t(x.size()), comm_type_of<T>());
  }
  template <typename T>
  T sum(T v) {
    all_reduce_sum(&v, 1, comm_type_of<T>());
    return v;
  }
  // The value of every rank, in rank order.
  template <typename T>
  std::vector<T> gather_all(T v) {
    std::vector<T> out(size());
    all_gather(out.data(), &v, std::vector<int64_t>(size(), 1), comm_type_of<T>());
    return out;
  }
  // recv_counts[r] = send_counts[this rank] of rank r (host vectors, one element per rank).
  std::vector<int64_t> exchange_counts(const std::vector<int64_t>& send_counts);
};

// One process: rank 0 of 1.
std::unique_ptr<Communicator> make_local_communicator();

// Equal-ish contiguous split of n elements over `parts` ranks (the first n % parts get one more).
std::vector<int64_t> even_counts(int64_t n, int parts);

}  // namespace dsv3
