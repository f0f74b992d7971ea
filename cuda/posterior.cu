/* posterior.cu — splitting the encoder's moments into mean and logvar, and
 * drawing z from the posterior with the generator of src/base/philox.h, so
 * that the same seed gives the CPU's bits: eps comes from the same double
 * arithmetic (IEEE on the device too, every multiply-add an explicit fma),
 * and z = mean + std * eps is rounded as two separate float operations, as
 * the CPU (built with -ffp-contract=off) does. This file alone is compiled
 * with --fmad=false (Makefile), so that no other product is fused either.
 *
 * The Philox counter of an element is first + its NCHW index (the CPU's),
 * also when the backend stores NHWC (kv_philox_index, layout_plan.cuh). */
#include "base/philox.h"
#include "posterior_plan.cuh"
#include "reduce.cuh"

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
        const uint64_t at = kv_philox_index(e, 1, a.c, (size_t)a.h * a.w, a.first);
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

/* ---- training: the gradient through the posterior, and its KL ---- */

struct posterior_grad_args {
    const void *moments, *dz;
    void *dmoments;
    int m16, dz16, dm16;
    size_t block; /* posterior_plan.cuh */
    float kl_weight;
    int sampled, nhwc, z;
    size_t pixels;
    uint64_t seed, first; /* element i's noise: Philox index first + i (NCHW) */
};

static __global__ void posterior_backward_kernel(posterior_grad_args a, size_t count)
{
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < count;
         e += (size_t)gridDim.x * blockDim.x) {
        const size_t mi = kv_posterior_source(e, a.block), li = mi + a.block;
        const float mu = kv_ld(a.moments, a.m16, mi), l = kv_ld(a.moments, a.m16, li);
        const float dz = kv_ld(a.dz, a.dz16, e);
        const float s = kv_clamp_logvar(l);
        float ds = __fmul_rn(__fmul_rn(a.kl_weight, 0.5f), (float)(exp((double)s) - 1.0));
        if (a.sampled) {
            const uint64_t at = kv_philox_index(e, a.nhwc, a.z, a.pixels, a.first);
            ds = __fadd_rn(ds, __fmul_rn(__fmul_rn(__fmul_rn(dz, 0.5f), kv_posterior_std(l)),
                                         kv_philox_normal(a.seed, at)));
        }
        kv_st(a.dmoments, a.dm16, mi, __fadd_rn(dz, __fmul_rn(a.kl_weight, mu)));
        kv_st(a.dmoments, a.dm16, li, kv_logvar_unclamped(l) ? ds : 0.0f);
    }
}

klvae_status_t kv_cuda_posterior_backward(kv_backend *be, const kv_tensor *moments,
                                          const kv_tensor *dz, float kl_weight, bool sampled,
                                          uint64_t seed, uint64_t first, kv_tensor *dmoments)
{
    kv_cuda *cu = kv_cuda_of(be);
    posterior_grad_args a;
    memset(&a, 0, sizeof a);
    kv_cuda_dtype d;
    KV_TRY(kv_cuda_dtype_of(cu, moments->data, "posterior_backward", "moments", &d));
    a.m16 = d == KV_CUDA_BF16;
    KV_TRY(kv_cuda_dtype_of(cu, dz->data, "posterior_backward", "dz", &d));
    a.dz16 = d == KV_CUDA_BF16;
    KV_TRY(kv_cuda_dtype_of(cu, dmoments->data, "posterior_backward", "dmoments", &d));
    a.dm16 = d == KV_CUDA_BF16;
    const size_t count = kv_cuda_numel(dz), pixels = (size_t)dz->shape[2] * dz->shape[3];
    if (!count)
        return KLVAE_OK;
    a.moments = moments->data;
    a.dz = dz->data;
    a.dmoments = dmoments->data;
    a.nhwc = cu->nhwc && pixels > 1;
    a.block = (size_t)dz->shape[1] * (a.nhwc ? 1 : pixels);
    a.kl_weight = kl_weight;
    a.sampled = sampled;
    a.seed = seed;
    a.first = first;
    a.z = dz->shape[1];
    a.pixels = pixels;
    posterior_backward_kernel<<<kv_cuda_blocks(count, cu), 256, 0, cu->stream>>>(a, count);
    KV_LAUNCHED(cu, posterior_backward_kernel);
    return KLVAE_OK;
}

struct kl_terms {
    const void *moments;
    int m16;
    size_t block;
    __device__ double2 operator()(size_t e) const
    {
        const size_t mi = kv_posterior_source(e, block);
        const double mu = kv_ld(moments, m16, mi);
        const double l = kv_clamp_logvar(kv_ld(moments, m16, mi + block));
        return make_double2(0.5 * (mu * mu + exp(l) - 1.0 - l), 0.0);
    }
};

klvae_status_t kv_cuda_kl_sum(kv_backend *be, const kv_tensor *moments, double *sum)
{
    kv_cuda *cu = kv_cuda_of(be);
    kv_cuda_dtype d;
    KV_TRY(kv_cuda_dtype_of(cu, moments->data, "kl_sum", "moments", &d));
    const size_t pixels = (size_t)moments->shape[2] * moments->shape[3];
    const int z = moments->shape[1] / 2;
    const bool nhwc = cu->nhwc && pixels > 1;
    kl_terms f = {moments->data, d == KV_CUDA_BF16, (size_t)z * (nhwc ? 1 : pixels)};
    return kv_cuda_total(cu, (size_t)moments->shape[0] * z * pixels, f, sum, NULL);
}
