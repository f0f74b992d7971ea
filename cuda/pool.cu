/* pool.cu — 2x2 max pooling (LPIPS' VGG trunk) and its gradient, in the
 * backend's layout, as src/backend/cpu/pool.c: floor sizes, the gradient
 * routed to the first maximum of each window in row-major order. */
#include "cuda_ops.h"

/* Where value (n, c, y, x) of an (n, c, h, w) tensor is stored. */
static __device__ __forceinline__ size_t pool_at(int nhwc, size_t n, size_t c, size_t y,
                                                 size_t x, int channels, int h, int w)
{
    return nhwc ? ((n * h + y) * w + x) * channels + c : ((n * channels + c) * h + y) * w + x;
}

/* Decodes a storage index into (n, c, y, x). */
static __device__ __forceinline__ void pool_coords(size_t e, int nhwc, int channels, int h, int w,
                                                   size_t *n, size_t *c, size_t *y, size_t *x)
{
    if (nhwc) {
        *c = e % channels;
        const size_t pix = e / channels;
        *x = pix % w;
        *y = pix / w % h;
        *n = pix / w / h;
    } else {
        *x = e % w;
        *y = e / w % h;
        const size_t plane = e / w / h;
        *c = plane % channels;
        *n = plane / channels;
    }
}

/* The storage index of the first maximum of window (wy, wx) of (n, c). */
static __device__ __forceinline__ size_t window_argmax(const void *x, int x16, int nhwc, size_t n,
                                                       size_t c, size_t wy, size_t wx,
                                                       int channels, int h, int w)
{
    size_t best = pool_at(nhwc, n, c, 2 * wy, 2 * wx, channels, h, w);
    float m = kv_ld(x, x16, best);
    for (int k = 1; k < 4; k++) {
        const size_t at = pool_at(nhwc, n, c, 2 * wy + k / 2, 2 * wx + k % 2, channels, h, w);
        const float v = kv_ld(x, x16, at);
        if (v > m) {
            m = v;
            best = at;
        }
    }
    return best;
}

static __global__ void max_pool_kernel(const void *x, int x16, void *y, int y16, int nhwc,
                                       int channels, int h, int w, int ho, int wo, size_t count)
{
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < count;
         e += (size_t)gridDim.x * blockDim.x) {
        size_t n, c, oy, ox;
        pool_coords(e, nhwc, channels, ho, wo, &n, &c, &oy, &ox);
        kv_st(y, y16, e, kv_ld(x, x16, window_argmax(x, x16, nhwc, n, c, oy, ox, channels, h, w)));
    }
}

/* Over dx: each value gets dy of its window if it is that window's first
 * maximum, else 0 (rows and columns past the last window get 0). */
static __global__ void max_pool_backward_kernel(const void *x, int x16, const void *dy, int dy16,
                                                void *dx, int dx16, int nhwc, int channels, int h,
                                                int w, int ho, int wo, size_t count)
{
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < count;
         e += (size_t)gridDim.x * blockDim.x) {
        size_t n, c, y, xx;
        pool_coords(e, nhwc, channels, h, w, &n, &c, &y, &xx);
        float v = 0.0f;
        if (y / 2 < (size_t)ho && xx / 2 < (size_t)wo &&
            window_argmax(x, x16, nhwc, n, c, y / 2, xx / 2, channels, h, w) == e)
            v = kv_ld(dy, dy16, pool_at(nhwc, n, c, y / 2, xx / 2, channels, ho, wo));
        kv_st(dx, dx16, e, v);
    }
}

klvae_status_t kv_cuda_max_pool2x2(kv_backend *be, const kv_tensor *x, kv_tensor *y)
{
    kv_cuda *cu = kv_cuda_of(be);
    const size_t count = kv_cuda_numel(y);
    if (!count)
        return KLVAE_OK;
    kv_cuda_dtype tx, ty;
    KV_TRY(kv_cuda_dtype_of(cu, x->data, "max_pool2x2", "x", &tx));
    KV_TRY(kv_cuda_dtype_of(cu, y->data, "max_pool2x2", "y", &ty));
    max_pool_kernel<<<kv_cuda_blocks(count, cu), 256, 0, cu->stream>>>(
        x->data, tx == KV_CUDA_BF16, y->data, ty == KV_CUDA_BF16, cu->nhwc, x->shape[1],
        x->shape[2], x->shape[3], y->shape[2], y->shape[3], count);
    KV_LAUNCHED(cu, max_pool_kernel);
    return KLVAE_OK;
}

klvae_status_t kv_cuda_max_pool2x2_backward(kv_backend *be, const kv_tensor *x,
                                            const kv_tensor *dy, kv_tensor *dx)
{
    kv_cuda *cu = kv_cuda_of(be);
    const size_t count = kv_cuda_numel(dx);
    if (!count)
        return KLVAE_OK;
    kv_cuda_dtype tx, tdy, tdx;
    KV_TRY(kv_cuda_dtype_of(cu, x->data, "max_pool2x2_backward", "x", &tx));
    KV_TRY(kv_cuda_dtype_of(cu, dy->data, "max_pool2x2_backward", "dy", &tdy));
    KV_TRY(kv_cuda_dtype_of(cu, dx->data, "max_pool2x2_backward", "dx", &tdx));
    max_pool_backward_kernel<<<kv_cuda_blocks(count, cu), 256, 0, cu->stream>>>(
        x->data, tx == KV_CUDA_BF16, dy->data, tdy == KV_CUDA_BF16, dx->data,
        tdx == KV_CUDA_BF16, cu->nhwc, x->shape[1], x->shape[2], x->shape[3], dy->shape[2],
        dy->shape[3], count);
    KV_LAUNCHED(cu, max_pool_backward_kernel);
    return KLVAE_OK;
}
