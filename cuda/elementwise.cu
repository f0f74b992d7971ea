/* elementwise.cu — add, and the vector ops of the trainer (scale, axpy,
 * lerp, fill).
 *
 * Every operand may be float32 or bf16 (cuda/README.md: the backend's own
 * tensors are bf16 in bf16 mode, a caller's device arrays float32), so the
 * kernels take a flag per operand; the flag is the same for the whole
 * launch, so the branch costs nothing next to the memory traffic. Values
 * are computed in float32. */
#include "cuda_ops.h"

#define KV_UNROLL 4

static __global__ void add_kernel(const void *a, int a16, const void *b, int b16, void *y, int y16,
                                  size_t count)
{
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    for (; i + (KV_UNROLL - 1) * stride < count; i += KV_UNROLL * stride) {
        float v[KV_UNROLL];
#pragma unroll
        for (int u = 0; u < KV_UNROLL; u++)
            v[u] = kv_ld(a, a16, i + u * stride) + kv_ld(b, b16, i + u * stride);
#pragma unroll
        for (int u = 0; u < KV_UNROLL; u++)
            kv_st(y, y16, i + u * stride, v[u]);
    }
    for (; i < count; i += stride)
        kv_st(y, y16, i, kv_ld(a, a16, i) + kv_ld(b, b16, i));
}

klvae_status_t kv_cuda_add(kv_backend *be, const kv_tensor *a, const kv_tensor *b, kv_tensor *y)
{
    kv_cuda *cu = kv_cuda_of(be);
    size_t count = kv_cuda_numel(y);
    if (!count)
        return KLVAE_OK;
    KV_CU(cu, cudaSetDevice(cu->device));
    add_kernel<<<kv_cuda_blocks(count / KV_UNROLL + 1, cu), 256, 0, cu->stream>>>(
        a->data, kv_cuda_dtype_of(cu, a->data), b->data, kv_cuda_dtype_of(cu, b->data), y->data,
        kv_cuda_dtype_of(cu, y->data), count);
    KV_LAUNCHED(cu, add_kernel);
    return KLVAE_OK;
}

/* y = alpha * x + beta * y0 covers scale (y0 unused, x is y) and axpy
 * (y = a x + y). */
static __global__ void affine_kernel(const void *x, int x16, float alpha, const void *y0,
                                     int y016, float beta, void *y, int y16, size_t count)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x) {
        float v = alpha * kv_ld(x, x16, i);
        if (y0)
            v = v + beta * kv_ld(y0, y016, i);
        kv_st(y, y16, i, v);
    }
}

static klvae_status_t affine(kv_cuda *cu, const void *x, float alpha, const void *y0, float beta,
                             void *y, size_t count)
{
    if (!count)
        return KLVAE_OK;
    KV_CU(cu, cudaSetDevice(cu->device));
    affine_kernel<<<kv_cuda_blocks(count, cu), 256, 0, cu->stream>>>(
        x, kv_cuda_dtype_of(cu, x), alpha, y0, y0 ? kv_cuda_dtype_of(cu, y0) : 0, beta, y,
        kv_cuda_dtype_of(cu, y), count);
    KV_LAUNCHED(cu, affine_kernel);
    return KLVAE_OK;
}

klvae_status_t kv_cuda_scale(kv_backend *be, kv_tensor *x, float a)
{
    return affine(kv_cuda_of(be), x->data, a, NULL, 0.0f, x->data, kv_cuda_numel(x));
}

klvae_status_t kv_cuda_axpy(kv_backend *be, float a, const kv_tensor *x, kv_tensor *y)
{
    return affine(kv_cuda_of(be), x->data, a, y->data, 1.0f, y->data, kv_cuda_numel(y));
}

/* x += t (y - x), computed as (1 - t) x + t y would round differently from
 * the CPU's x + t * (y - x); so its own kernel. */
static __global__ void lerp_kernel(void *x, int x16, const void *y, int y16, float t, size_t count)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x) {
        float a = kv_ld(x, x16, i);
        kv_st(x, x16, i, a + t * (kv_ld(y, y16, i) - a));
    }
}

klvae_status_t kv_cuda_lerp(kv_backend *be, kv_tensor *x, const kv_tensor *y, float t)
{
    kv_cuda *cu = kv_cuda_of(be);
    size_t count = kv_cuda_numel(x);
    if (!count)
        return KLVAE_OK;
    KV_CU(cu, cudaSetDevice(cu->device));
    lerp_kernel<<<kv_cuda_blocks(count, cu), 256, 0, cu->stream>>>(
        x->data, kv_cuda_dtype_of(cu, x->data), y->data, kv_cuda_dtype_of(cu, y->data), t, count);
    KV_LAUNCHED(cu, lerp_kernel);
    return KLVAE_OK;
}

static __global__ void fill_kernel(void *x, int x16, float value, size_t count)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x)
        kv_st(x, x16, i, value);
}

klvae_status_t kv_cuda_fill(kv_backend *be, kv_tensor *x, float value)
{
    kv_cuda *cu = kv_cuda_of(be);
    size_t count = kv_cuda_numel(x);
    if (!count)
        return KLVAE_OK;
    KV_CU(cu, cudaSetDevice(cu->device));
    fill_kernel<<<kv_cuda_blocks(count, cu), 256, 0, cu->stream>>>(
        x->data, kv_cuda_dtype_of(cu, x->data), value, count);
    KV_LAUNCHED(cu, fill_kernel);
    return KLVAE_OK;
}
