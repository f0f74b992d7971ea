/* upsample.cu — nearest 2x upsampling (the decoder's Upsample2D, which the
 * forward reads through the next convolution's staging instead: this op
 * serves the backward and the tests). The index maps are in
 * upsample_plan.cuh, which the host tests check. */
#include "cuda_ops.h"
#include "upsample_plan.cuh"

/* NCHW, over (plane, output pixel): consecutive threads write consecutive
 * outputs and read each input twice from the cache. */
static __global__ void upsample_nchw_kernel(const void *x, int x16, void *y, int y16, int h,
                                            int w, size_t planes)
{
    const int opix = 4 * h * w;
    for (size_t plane = blockIdx.y; plane < planes; plane += gridDim.y)
        for (int pix = blockIdx.x * blockDim.x + threadIdx.x; pix < opix;
             pix += gridDim.x * blockDim.x)
            kv_st(y, y16, plane * opix + pix, kv_ld(x, x16, kv_upsample_source(plane, pix, h, w)));
}

/* NHWC: element e of y is channel e % c of output pixel e / c. */
static __global__ void upsample_nhwc_kernel(const void *x, int x16, void *y, int y16, int c,
                                            int h, int w, size_t count)
{
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < count;
         e += (size_t)gridDim.x * blockDim.x) {
        const size_t src = kv_upsample_source_pixel(e / (size_t)c, h, w) * (size_t)c + e % (size_t)c;
        kv_st(y, y16, e, kv_ld(x, x16, src));
    }
}

klvae_status_t kv_cuda_upsample_nearest2x(kv_backend *be, const kv_tensor *x, kv_tensor *y)
{
    kv_cuda *cu = kv_cuda_of(be);
    const size_t count = kv_cuda_numel(y);
    if (!count)
        return KLVAE_OK;
    kv_cuda_dtype tx, ty;
    KV_TRY(kv_cuda_dtype_of(cu, x->data, "upsample_nearest2x", "the input", &tx));
    KV_TRY(kv_cuda_dtype_of(cu, y->data, "upsample_nearest2x", "the output", &ty));
    if (cu->nhwc) {
        upsample_nhwc_kernel<<<kv_cuda_blocks(count, cu), 256, 0, cu->stream>>>(
            x->data, tx == KV_CUDA_BF16, y->data, ty == KV_CUDA_BF16, x->shape[1], x->shape[2],
            x->shape[3], count);
        KV_LAUNCHED(cu, upsample_nhwc_kernel);
    } else {
        const size_t planes = (size_t)x->shape[0] * x->shape[1];
        upsample_nchw_kernel<<<kv_cuda_grid2(cu, planes, count / planes), 256, 0, cu->stream>>>(
            x->data, tx == KV_CUDA_BF16, y->data, ty == KV_CUDA_BF16, x->shape[2], x->shape[3],
            planes);
        KV_LAUNCHED(cu, upsample_nchw_kernel);
    }
    return KLVAE_OK;
}

/* ---- backward: dx = the sum of the four dy values each x was copied to,
 * added as the CPU does: (top left + top right) + (bottom left + bottom
 * right). ---- */

static __global__ void upsample_backward_kernel(const void *dy, int dy16, void *dx, int dx16,
                                                int nhwc, int c, int h, int w, size_t count)
{
    const size_t ow = 2 * (size_t)w;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < count;
         e += (size_t)gridDim.x * blockDim.x) {
        size_t a, step_x, step_y; /* dy index of the top left value, and its neighbours' steps */
        if (nhwc) {
            const size_t ch = e % c, pix = e / c, x = pix % w, rest = pix / w;
            const size_t y = rest % h, n = rest / h;
            a = ((n * 2 * h + 2 * y) * ow + 2 * x) * c + ch;
            step_x = c;
            step_y = ow * c;
        } else {
            const size_t x = e % w, rest = e / w, y = rest % h, plane = rest / h;
            a = (plane * 2 * h + 2 * y) * ow + 2 * x;
            step_x = 1;
            step_y = ow;
        }
        const float top = kv_ld(dy, dy16, a) + kv_ld(dy, dy16, a + step_x);
        const float bottom = kv_ld(dy, dy16, a + step_y) + kv_ld(dy, dy16, a + step_y + step_x);
        kv_st(dx, dx16, e, top + bottom);
    }
}

klvae_status_t kv_cuda_upsample_nearest2x_backward(kv_backend *be, const kv_tensor *dy,
                                                   kv_tensor *dx)
{
    kv_cuda *cu = kv_cuda_of(be);
    const size_t count = kv_cuda_numel(dx);
    if (!count)
        return KLVAE_OK;
    kv_cuda_dtype ty, tx;
    KV_TRY(kv_cuda_dtype_of(cu, dy->data, "upsample_nearest2x_backward", "dy", &ty));
    KV_TRY(kv_cuda_dtype_of(cu, dx->data, "upsample_nearest2x_backward", "dx", &tx));
    upsample_backward_kernel<<<kv_cuda_blocks(count, cu), 256, 0, cu->stream>>>(
        dy->data, ty == KV_CUDA_BF16, dx->data, tx == KV_CUDA_BF16, cu->nhwc, dx->shape[1],
        dx->shape[2], dx->shape[3], count);
    KV_LAUNCHED(cu, upsample_backward_kernel);
    return KLVAE_OK;
}
