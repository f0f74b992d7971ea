/* upsample_plan.cuh — the index map of the nearest 2x upsample kernels,
 * __host__ __device__ (KV_HD) plain C, so tests/test_cuda_host.c checks it
 * with the C compiler against a straightforward loop. */
#ifndef KV_UPSAMPLE_PLAN_CUH
#define KV_UPSAMPLE_PLAN_CUH

#include <stddef.h>

#include "base/numerics.h"

/* upsample_nearest2x: the input index of pixel pix of output plane plane,
 * for input planes of h x w (output planes 2h x 2w). The kernels go over
 * (plane, pixel) so that no 64-bit division is needed per element. */
static inline KV_HD size_t kv_upsample_source(size_t plane, int pix, int h, int w)
{
    int oy = pix / (2 * w), ox = pix % (2 * w);
    return plane * (size_t)h * (size_t)w + (size_t)(oy / 2) * (size_t)w + (size_t)(ox / 2);
}

#endif /* KV_UPSAMPLE_PLAN_CUH */
