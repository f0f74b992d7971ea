/* posterior.cu — splitting the encoder's moments into mean and logvar, and
 * drawing z from the posterior with the generator of src/base/philox.h, so that
 * the same seed gives the CPU's bits: eps comes from the same double
 * arithmetic (IEEE on the device too, every multiply-add an explicit fma),
 * and z = mean + std * eps is rounded as two separate float operations,
 * as the CPU (built with -ffp-contract=off) does. The plugin is compiled
 * with --fmad=false besides, so no other product is fused either. */
#include "base/philox.h"
#include "cuda_ops.h"

static __global__ void posterior_split_kernel(const void *moments, int m16, void *mean, int mean16,
                                              void *logvar, int lv16, size_t block, size_t count)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t src = kv_posterior_source(i, block);
        kv_st(mean, mean16, i, kv_ld(moments, m16, src));
        if (logvar)
            kv_st(logvar, lv16, i, kv_clamp_logvar(kv_ld(moments, m16, src + block)));
    }
}

klvae_status_t kv_cuda_posterior_split(kv_backend *be, const kv_tensor *moments, kv_tensor *mean,
                                       kv_tensor *logvar)
{
    kv_cuda *cu = kv_cuda_of(be);
    size_t count = kv_cuda_numel(mean);
    if (!count)
        return KLVAE_OK;
    KV_CU(cu, cudaSetDevice(cu->device));
    void *lv = logvar && logvar->data ? logvar->data : NULL;
    size_t block = (size_t)mean->shape[1] * moments->shape[2] * moments->shape[3];
    posterior_split_kernel<<<kv_cuda_blocks(count, cu), 256, 0, cu->stream>>>(
        moments->data, kv_cuda_dtype_of(cu, moments->data), mean->data,
        kv_cuda_dtype_of(cu, mean->data), lv, lv ? kv_cuda_dtype_of(cu, lv) : 0, block, count);
    KV_LAUNCHED(cu, posterior_split_kernel);
    return KLVAE_OK;
}

/* Thread j makes the pair of normals of counter j: elements 2j and 2j + 1. */
static __global__ void gaussian_sample_kernel(const void *mean, int mean16, const void *logvar,
                                              int lv16, uint64_t seed, void *z, int z16,
                                              size_t count)
{
    const size_t pairs = (count + 1) / 2;
    for (size_t j = blockIdx.x * (size_t)blockDim.x + threadIdx.x; j < pairs;
         j += (size_t)gridDim.x * blockDim.x) {
        float eps[2];
        kv_philox_normal_pair(seed, j, &eps[0], &eps[1]);
        for (int e = 0; e < 2; e++) {
            size_t i = 2 * j + e;
            if (i >= count)
                break;
            float std = kv_posterior_std(kv_ld(logvar, lv16, i));
            kv_st(z, z16, i, __fadd_rn(kv_ld(mean, mean16, i), __fmul_rn(std, eps[e])));
        }
    }
}

klvae_status_t kv_cuda_gaussian_sample(kv_backend *be, const kv_tensor *mean,
                                       const kv_tensor *logvar, uint64_t seed, kv_tensor *z)
{
    kv_cuda *cu = kv_cuda_of(be);
    size_t count = kv_cuda_numel(z);
    if (!count)
        return KLVAE_OK;
    KV_CU(cu, cudaSetDevice(cu->device));
    /* z may be mean or logvar itself: each element is read before it is
     * written, by the same thread. */
    gaussian_sample_kernel<<<kv_cuda_blocks((count + 1) / 2, cu), 256, 0, cu->stream>>>(
        mean->data, kv_cuda_dtype_of(cu, mean->data), logvar->data,
        kv_cuda_dtype_of(cu, logvar->data), seed, z->data, kv_cuda_dtype_of(cu, z->data), count);
    KV_LAUNCHED(cu, gaussian_sample_kernel);
    return KLVAE_OK;
}
