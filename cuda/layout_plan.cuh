/* layout_plan.cuh — the index maps between the core's NCHW order and the
 * CUDA backend's NHWC layout (cuda_ops.h, "Storage"). Plain C and
 * __host__ __device__, so tests/test_cuda_host.c checks them on the CPU.
 *
 * The core and every caller see tensors as NCHW: upload, download and the
 * device copies (memory.cu) convert at the boundary, and the few ops whose
 * result depends on an element's logical position (the Philox counter of
 * gaussian_sample, the channel split of posterior_split, the upsample)
 * compute that position from the NHWC index with these maps. Tensors that
 * are not 4-D (biases, linear weights as (out, in)) and (N, C, 1, 1) tensors
 * are stored in the same order in both layouts. A 4-D weight (co, ci, kh,
 * kw) stored NHWC is (co, kh, kw, ci): cuDNN's NHWC filter layout. */
#ifndef KV_LAYOUT_PLAN_CUH
#define KV_LAYOUT_PLAN_CUH

#include <stddef.h>
#include <stdint.h>

#include "base/numerics.h"

/* The NHWC index of element i (NCHW order) of an (n, c, h, w) tensor. */
static inline KV_HD size_t kv_nchw_to_nhwc(size_t i, int c, int h, int w)
{
    const size_t hw = (size_t)h * (size_t)w;
    const size_t pix = i % hw, nc = i / hw;
    const size_t ch = nc % (size_t)c, n = nc / (size_t)c;
    return (n * hw + pix) * (size_t)c + ch;
}

/* The NCHW index of element e (NHWC order) of an (n, c, h, w) tensor. */
static inline KV_HD size_t kv_nhwc_to_nchw(size_t e, int c, int h, int w)
{
    const size_t hw = (size_t)h * (size_t)w;
    const size_t ch = e % (size_t)c, rest = e / (size_t)c;
    const size_t pix = rest % hw, n = rest / hw;
    return (n * (size_t)c + ch) * hw + pix;
}

/* Where element i of a tensor of shape (n, c, h, w) in NCHW order lives in
 * the backend's storage: the same index unless the backend is NHWC and the
 * tensor 4-D with more than one pixel. */
static inline KV_HD size_t kv_storage_index(size_t i, int nhwc, int ndim, int c, int h, int w)
{
    return nhwc && ndim == 4 && (size_t)h * (size_t)w > 1 ? kv_nchw_to_nhwc(i, c, h, w) : i;
}

/* The sample and channel of the element at storage index i of an (n, c, h,
 * w) tensor of hw = h * w pixels. */
static inline KV_HD void kv_storage_nc(size_t i, int nhwc, int c, size_t hw, int *n, int *ch)
{
    if (nhwc) {
        *ch = (int)(i % (size_t)c);
        *n = (int)(i / ((size_t)c * hw));
    } else {
        const size_t plane = i / hw;
        *ch = (int)(plane % (size_t)c);
        *n = (int)(plane / (size_t)c);
    }
}

/* The Philox index of the element at storage index e of an (n, c, h, w)
 * tensor of hw = h * w pixels whose first element (NCHW order) draws index
 * first: first + its NCHW index, the CPU ops' counter, whatever the layout
 * (gaussian_sample, posterior_backward's noise, lpips_distance's dropout
 * mask). first places the tensor in a larger one: a process's share of a
 * batch split over processes draws that share's numbers. */
static inline KV_HD uint64_t kv_philox_index(size_t e, int nhwc, int c, size_t hw, uint64_t first)
{
    if (!nhwc)
        return first + (uint64_t)e;
    const size_t ch = e % (size_t)c, rest = e / (size_t)c;
    const size_t pix = rest % hw, n = rest / hw;
    return first + (uint64_t)((n * (size_t)c + ch) * hw + pix);
}

#endif /* KV_LAYOUT_PLAN_CUH */
