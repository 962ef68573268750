// Builds without NCCL (no CUDA, or a toolkit without it): make_nccl_communicator refuses with the reason.
#include "core/error.h"
#include "dist/nccl.h"

#if !DSV3_HAVE_NCCL
namespace dsv3 {

bool have_nccl() { return false; }
std::unique_ptr<Communicator> make_nccl_communicator(Communicator&, int) {
  fail("this dsv3 was built without NCCL (it needs the CUDA backend and the toolkit's nccl.h / libnccl)");
}

}  // namespace dsv3
#endif
