// The kernels for float16 and bfloat16 scales (lowbit_cpu_kernels.h), compiled beside the others.
#include "lowbit_cpu_kernels.h"

LOWBIT_KERNELS(, at::Half)
LOWBIT_KERNELS(, at::BFloat16)
