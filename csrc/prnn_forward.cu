// prnn_forward.cu - instantiations of the persistent forward kernel (see prnn_kernels.cuh).
#include "prnn_kernels.cuh"

namespace prnn {
const void* forward_kernel(prnnDataType_t dtype, int row_group) {
  return select_kernel<false>(dtype, row_group);
}
}  // namespace prnn
