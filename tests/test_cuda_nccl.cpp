// The NCCL transport with one GPU rank (bootstrapped over the local communicator): every collective on device
// memory against the one-rank semantics (a sum over one rank is the value, gathers and all-to-all are copies),
// and a split. Multi-GPU runs are scripts/gpu-check's job on a machine with several GPUs.
#include <gtest/gtest.h>

#if DSV3_HAVE_NCCL
#include <cuda_runtime.h>

#include <vector>

#include "cuda_test_helpers.h"
#include "dist/nccl.h"

namespace dsv3 {
namespace {

template <typename T>
T* dev(const std::vector<T>& h) {
  T* p = nullptr;
  EXPECT_EQ(cudaMalloc(&p, h.size() * sizeof(T) + 1), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  return p;
}
template <typename T>
std::vector<T> host(const T* p, size_t n) {
  std::vector<T> h(n);
  EXPECT_EQ(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  return h;
}

TEST(CudaNccl, OneRankCollectives) {
  REQUIRE_CUDA();
  auto boot = make_local_communicator();
  auto c = make_nccl_communicator(*boot, 0);
  ASSERT_EQ(c->size(), 1);
  ASSERT_EQ(c->rank(), 0);
  EXPECT_EQ(c->transport(), "nccl");
  std::vector<float> x = {1.5f, -2.f, 3.25f, 0.f, 7.f};
  float* d = dev(x);
  c->all_reduce_sum(d, 5, CommType::F32);
  EXPECT_EQ(host(d, 5), x);
  float* o = dev(std::vector<float>(5, 0.f));
  c->reduce_scatter_sum(o, d, {5}, CommType::F32);
  EXPECT_EQ(host(o, 5), x);
  float* g = dev(std::vector<float>(5, 0.f));
  c->all_gather(g, d, {5}, CommType::F32);
  EXPECT_EQ(host(g, 5), x);
  std::vector<int64_t> xi = {4, 5, 6};
  int64_t* di = dev(xi);
  int64_t* ri = dev(std::vector<int64_t>(3, 0));
  c->all_to_all(di, {3}, ri, {3}, CommType::I64);
  EXPECT_EQ(host(ri, 3), xi);
  c->broadcast(di, 3, CommType::I64, 0);
  EXPECT_EQ(host(di, 3), xi);
  c->barrier();
  auto s = c->split(0, 0);
  EXPECT_EQ(s->size(), 1);
  s->all_reduce_sum(d, 5, CommType::F32);
  EXPECT_EQ(host(d, 5), x);
  for (void* p : {(void*)d, (void*)o, (void*)g, (void*)di, (void*)ri}) cudaFree(p);
}

}  // namespace
}  // namespace dsv3
#endif  // DSV3_HAVE_NCCL
