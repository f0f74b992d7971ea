/* elementwise.cuh — the kernels of the elementwise ops (elementwise.cu,
 * activation.cu): y[i] = op(a[i], b[i]) for a functor op, where a missing
 * operand reads as 0.
 *
 * When every operand is stored in one dtype and 16-byte aligned, a thread
 * moves whole 16-byte words (8 bf16 or 4 float32 values); otherwise (mixed
 * dtypes, such as a float32 master copy next to bf16 weights) one value at
 * a time, each operand read as its own dtype. */
#ifndef KV_ELEMENTWISE_CUH
#define KV_ELEMENTWISE_CUH

#include "cuda_ops.h"

template <typename T, typename Op>
static __global__ void kv_ew_vector_kernel(Op op, T *y, const T *a, const T *b, size_t count)
{
    typedef kv_vec<T> V;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    const size_t vectors = count / V::width;
    for (size_t v = blockIdx.x * (size_t)blockDim.x + threadIdx.x; v < vectors; v += stride) {
        float va[V::width], vb[V::width];
        if (a)
            V::load(a, v * V::width, va);
        if (b)
            V::load(b, v * V::width, vb);
#pragma unroll
        for (int k = 0; k < V::width; k++)
            va[k] = op(a ? va[k] : 0.0f, b ? vb[k] : 0.0f);
        V::store(y, v * V::width, va);
    }
    /* the tail, by the first threads */
    const size_t i = vectors * V::width + blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < count)
        kv_st(y, sizeof(T) == 2, i,
              op(a ? kv_ld(a, sizeof(T) == 2, i) : 0.0f, b ? kv_ld(b, sizeof(T) == 2, i) : 0.0f));
}

template <typename Op>
static __global__ void kv_ew_mixed_kernel(Op op, void *y, int y16, const void *a, int a16,
                                          const void *b, int b16, size_t count)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x)
        kv_st(y, y16, i, op(a ? kv_ld(a, a16, i) : 0.0f, b ? kv_ld(b, b16, i) : 0.0f));
}

/* y = op(a, b) elementwise over numel(y) values; a and b may be NULL, or y
 * itself. */
template <typename Op>
static klvae_status_t kv_cuda_elementwise(kv_cuda *cu, const char *name, Op op, kv_tensor *y,
                                          const kv_tensor *a, const kv_tensor *b)
{
    const size_t count = kv_cuda_numel(y);
    if (!count)
        return KLVAE_OK;
    kv_cuda_dtype ty, ta = KV_CUDA_F32, tb = KV_CUDA_F32;
    KV_TRY(kv_cuda_dtype_of(cu, y->data, name, "the output", &ty));
    if (a)
        KV_TRY(kv_cuda_dtype_of(cu, a->data, name, "the first operand", &ta));
    if (b)
        KV_TRY(kv_cuda_dtype_of(cu, b->data, name, "the second operand", &tb));
    const void *pa = a ? a->data : NULL, *pb = b ? b->data : NULL;
    const bool same = (!a || ta == ty) && (!b || tb == ty);
    if (same && kv_cuda_aligned16(y->data, pa, pb)) {
        const size_t width = ty == KV_CUDA_BF16 ? 8 : 4;
        const unsigned blocks = kv_cuda_blocks(count / width + 1, cu);
        if (ty == KV_CUDA_BF16)
            kv_ew_vector_kernel<uint16_t, Op><<<blocks, 256, 0, cu->stream>>>(
                op, (uint16_t *)y->data, (const uint16_t *)pa, (const uint16_t *)pb, count);
        else
            kv_ew_vector_kernel<float, Op><<<blocks, 256, 0, cu->stream>>>(
                op, (float *)y->data, (const float *)pa, (const float *)pb, count);
    } else {
        kv_ew_mixed_kernel<Op><<<kv_cuda_blocks(count, cu), 256, 0, cu->stream>>>(
            op, y->data, ty == KV_CUDA_BF16, pa, ta == KV_CUDA_BF16, pb, tb == KV_CUDA_BF16,
            count);
    }
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
        return kv_cuda_fail(cu, e, name);
    return KLVAE_OK;
}

#endif /* KV_ELEMENTWISE_CUH */
