/* posterior.cu — splitting the encoder's moments into mean and logvar, and
 * drawing z from the posterior with the generator of src/base/philox.h, so
 * that the same seed gives the CPU's bits: eps comes from the same double
 * arithmetic (IEEE on the device too, every multiply-add an explicit fma),
 * and z = mean + std * eps is rounded as two separate float operations, as
 * the CPU (built with -ffp-contract=off) does. This file alone is compiled
 * with --fmad=false (Makefile), so that no other product is fused either.
 *
 * The Philox counter of an element is its NCHW index (the CPU's), also
 * when the backend stores NHWC (layout_plan.cuh). */
#include "base/philox.h"
#include "cuda_ops.h"
#include "posterior_plan.cuh"

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
    void *lv = logvar && logvar->data ? logvar->data : NULL;
    kv_cuda_dtype tm, tmean, tlv = KV_CUDA_F32;
    KV_TRY(kv_cuda_dtype_of(cu, moments->data, "posterior_split", "moments", &tm));
    KV_TRY(kv_cuda_dtype_of(cu, mean->data, "posterior_split", "mean", &tmean));
    if (lv)
        KV_TRY(kv_cuda_dtype_of(cu, lv, "posterior_split", "logvar", &tlv));
    const size_t pixels = (size_t)moments->shape[2] * moments->shape[3];
    /* the run of mean values moments holds together (posterior_plan.cuh) */
    const size_t block = (size_t)mean->shape[1] * (cu->nhwc ? 1 : pixels);
    posterior_split_kernel<<<kv_cuda_blocks(count, cu), 256, 0, cu->stream>>>(
        moments->data, tm == KV_CUDA_BF16, mean->data, tmean == KV_CUDA_BF16, lv,
        tlv == KV_CUDA_BF16, block, count);
    KV_LAUNCHED(cu, posterior_split_kernel);
    return KLVAE_OK;
}

struct sample_args {
    const void *mean, *logvar;
    void *z;
    int mean16, lv16, z16;
    uint64_t seed, first; /* element i draws Philox index first + i */
    size_t count;
    int nhwc, c, h, w; /* the storage map of layout_plan.cuh */
};

static __device__ __forceinline__ float sample_one(const sample_args &a, size_t i, float eps)
{
    const float std = kv_posterior_std(kv_ld(a.logvar, a.lv16, i));
    return __fadd_rn(kv_ld(a.mean, a.mean16, i), __fmul_rn(std, eps));
}

/* NCHW: thread j makes the pair of normals of counter first / 2 + j, the
 * elements of Philox index 2 (first / 2 + j) and the one after. */
static __global__ void gaussian_sample_nchw_kernel(sample_args a)
{
    const uint64_t pair0 = a.first / 2;
    const size_t pairs = (size_t)((a.first + a.count + 1) / 2 - pair0);
    for (size_t j = blockIdx.x * (size_t)blockDim.x + threadIdx.x; j < pairs;
         j += (size_t)gridDim.x * blockDim.x) {
        float eps[2];
        kv_philox_normal_pair(a.seed, pair0 + j, &eps[0], &eps[1]);
        for (int e = 0; e < 2; e++) {
            const uint64_t at = 2 * (pair0 + j) + e;
            if (at < a.first)
                continue;
            size_t i = (size_t)(at - a.first);
            if (i >= a.count)
                break;
            kv_st(a.z, a.z16, i, sample_one(a, i, eps[e]));
        }
    }
}

/* NHWC: thread e makes the pair of its element's NCHW index and keeps its
 * half (twice the Philox work, which is small next to the memory traffic). */
static __global__ void gaussian_sample_nhwc_kernel(sample_args a)
{
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < a.count;
         e += (size_t)gridDim.x * blockDim.x) {
        const uint64_t at = a.first + kv_nhwc_to_nchw(e, a.c, a.h, a.w);
        float eps[2];
        kv_philox_normal_pair(a.seed, at / 2, &eps[0], &eps[1]);
        kv_st(a.z, a.z16, e, sample_one(a, e, eps[at % 2]));
    }
}

klvae_status_t kv_cuda_gaussian_sample(kv_backend *be, const kv_tensor *mean,
                                       const kv_tensor *logvar, uint64_t seed, uint64_t first,
                                       kv_tensor *z)
{
    kv_cuda *cu = kv_cuda_of(be);
    sample_args a;
    memset(&a, 0, sizeof a);
    a.count = kv_cuda_numel(z);
    if (!a.count)
        return KLVAE_OK;
    kv_cuda_dtype d;
    KV_TRY(kv_cuda_dtype_of(cu, mean->data, "gaussian_sample", "mean", &d));
    a.mean16 = d == KV_CUDA_BF16;
    KV_TRY(kv_cuda_dtype_of(cu, logvar->data, "gaussian_sample", "logvar", &d));
    a.lv16 = d == KV_CUDA_BF16;
    KV_TRY(kv_cuda_dtype_of(cu, z->data, "gaussian_sample", "z", &d));
    a.z16 = d == KV_CUDA_BF16;
    a.mean = mean->data;
    a.logvar = logvar->data;
    a.z = z->data;
    a.seed = seed;
    a.first = first;
    a.nhwc = cu->nhwc && z->ndim == 4 && (size_t)z->shape[2] * z->shape[3] > 1;
    if (a.nhwc) {
        a.c = z->shape[1];
        a.h = z->shape[2];
        a.w = z->shape[3];
    }
    /* z may be mean or logvar itself: each element is read before it is
     * written, by the same thread. */
    if (a.nhwc) {
        gaussian_sample_nhwc_kernel<<<kv_cuda_blocks(a.count, cu), 256, 0, cu->stream>>>(a);
        KV_LAUNCHED(cu, gaussian_sample_nhwc_kernel);
    } else {
        gaussian_sample_nchw_kernel<<<kv_cuda_blocks(a.count / 2 + 1, cu), 256, 0,
                                      cu->stream>>>(a);
        KV_LAUNCHED(cu, gaussian_sample_nchw_kernel);
    }
    return KLVAE_OK;
}
