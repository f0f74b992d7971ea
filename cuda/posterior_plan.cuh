/* posterior_plan.cuh — the index map of the posterior kernels,
 * __host__ __device__ (KV_HD) plain C, so tests/test_cuda_host.c checks it
 * with the C compiler. */
#ifndef KV_POSTERIOR_PLAN_CUH
#define KV_POSTERIOR_PLAN_CUH

#include <stddef.h>

#include "base/numerics.h"

/* posterior_split: the moments index of element i of mean, where block is
 * the run of mean values that moments holds together: in NCHW one sample's
 * mean, Z * H * W; in NHWC one pixel's, Z (moments is (N, H, W, 2Z)). The
 * logvar of element i is block further. */
static inline KV_HD size_t kv_posterior_source(size_t i, size_t block)
{
    return (i / block) * 2 * block + i % block;
}

#endif /* KV_POSTERIOR_PLAN_CUH */
