// prnn_v2_backward.cu - instantiations of kernel v2's backward-data pass (see prnn_v2.cuh).
#include "prnn_v2.cuh"

namespace prnn {
const void* backward_kernel_v2(prnnDataType_t dtype, int precision, int reg_steps) {
  return select_kernel_v2<true>(dtype, precision, reg_steps);
}
}  // namespace prnn
