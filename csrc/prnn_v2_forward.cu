// prnn_v2_forward.cu - instantiations of kernel v2's forward pass (see prnn_v2.cuh).
#include "prnn_v2.cuh"

namespace prnn {
const void* forward_kernel_v2(prnnDataType_t dtype, int precision, int reg_steps) {
  return select_kernel_v2<false>(dtype, precision, reg_steps);
}
}  // namespace prnn
