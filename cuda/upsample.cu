/* upsample.cu — nearest 2x upsampling (the decoder's Upsample2D), float32
 * or bf16 operands as in elementwise.cu; the index map is in
 * upsample_plan.cuh, which the host tests check. */
#include "cuda_ops.h"

/* Over (plane, output pixel): consecutive threads write consecutive outputs
 * (coalesced) and read each input twice from the cache. */
static __global__ void upsample_kernel(const void *x, int x16, void *y, int y16, int h, int w,
                                       size_t planes)
{
    const int opix = 4 * h * w;
    for (size_t plane = blockIdx.y; plane < planes; plane += gridDim.y)
        for (int pix = blockIdx.x * blockDim.x + threadIdx.x; pix < opix;
             pix += gridDim.x * blockDim.x)
            kv_st(y, y16, plane * opix + pix, kv_ld(x, x16, kv_upsample_source(plane, pix, h, w)));
}

klvae_status_t kv_cuda_upsample_nearest2x(kv_backend *be, const kv_tensor *x, kv_tensor *y)
{
    kv_cuda *cu = kv_cuda_of(be);
    size_t count = kv_cuda_numel(y);
    if (!count)
        return KLVAE_OK;
    KV_CU(cu, cudaSetDevice(cu->device));
    size_t planes = (size_t)x->shape[0] * x->shape[1];
    upsample_kernel<<<kv_cuda_grid2(cu, planes, count / planes), 256, 0, cu->stream>>>(
        x->data, kv_cuda_dtype_of(cu, x->data), y->data, kv_cuda_dtype_of(cu, y->data),
        x->shape[2], x->shape[3], planes);
    KV_LAUNCHED(cu, upsample_kernel);
    return KLVAE_OK;
}
