// The kernels for float32 and int8 (double-quantised) scales (lowbit_cpu_kernels.h), compiled beside the others.
#include "lowbit_cpu_kernels.h"

LOWBIT_KERNELS(, float)
LOWBIT_KERNELS(, int8_t)
