/* activation.cu — y = act(x) elementwise, float32 or bf16 operands as in
 * elementwise.cu, with the activations of base/numerics.h (the CPU's). */
#include "cuda_ops.h"

static __global__ void activation_kernel(const void *x, int x16, void *y, int y16, int act,
                                         size_t count)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x)
        kv_st(y, y16, i, kv_activate(act, kv_ld(x, x16, i)));
}

klvae_status_t kv_cuda_activation(kv_backend *be, const kv_tensor *x, kv_activation act,
                                  kv_tensor *y)
{
    kv_cuda *cu = kv_cuda_of(be);
    size_t count = kv_cuda_numel(y);
    if (!count)
        return KLVAE_OK;
    KV_CU(cu, cudaSetDevice(cu->device));
    activation_kernel<<<kv_cuda_blocks(count, cu), 256, 0, cu->stream>>>(
        x->data, kv_cuda_dtype_of(cu, x->data), y->data, kv_cuda_dtype_of(cu, y->data), (int)act,
        count);
    KV_LAUNCHED(cu, activation_kernel);
    return KLVAE_OK;
}
