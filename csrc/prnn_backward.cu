// prnn_backward.cu - instantiations of the persistent backward-data kernel (see prnn_kernels.cuh).
#include "prnn_kernels.cuh"

namespace prnn {
const void* backward_kernel(prnnDataType_t dtype, int row_group) {
  return select_kernel<true>(dtype, row_group);
}
}  // namespace prnn
