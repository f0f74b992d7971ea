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

/* The NHWC kernel moves whole pixels (every channel at once): the input
 * pixel of output pixel pix (of n * 2h * 2w), for inputs of h x w. */
static inline KV_HD size_t kv_upsample_source_pixel(size_t pix, int h, int w)
{
    const size_t ow = 2 * (size_t)w, oh = 2 * (size_t)h;
    const size_t ox = pix % ow, rest = pix / ow;
    const size_t oy = rest % oh, n = rest / oh;
    return (n * (size_t)h + oy / 2) * (size_t)w + ox / 2;
}

#endif /* KV_UPSAMPLE_PLAN_CUH */
