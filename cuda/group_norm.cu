/* group_norm.cu — group normalisation statistics and the fused apply step.
 *
 * Statistics are summed in double whatever the storage dtype: each group
 * (C/G contiguous channels of one sample) is cut into chunks by its size
 * (cuda/group_norm_plan.cuh), one block sums a chunk, and one thread per
 * (sample, channel) adds its group's chunk sums in chunk order and applies
 * backend.h's formula. No atomics: the result depends on the shape only. */
#include "cuda_ops.h"
#include "group_norm_plan.cuh"

#define GN_THREADS 256

static __device__ __forceinline__ double warp_sum(double v)
{
    for (int offset = 16; offset > 0; offset >>= 1)
        v += __shfl_down_sync(0xFFFFFFFFu, v, offset);
    return v;
}

/* Block k of group ng sums chunk k % chunks of that group into
 * partials[2 * k] (sum) and partials[2 * k + 1] (sum of squares). */
static __global__ void __launch_bounds__(GN_THREADS)
    gn_partial_kernel(const void *x, int x16, size_t count, int chunks, double *partials)
{
    __shared__ double shared[2][GN_THREADS / 32];
    const size_t block = blockIdx.x, ng = block / chunks;
    const int chunk = (int)(block % chunks);
    size_t begin, end;
    kv_gn_chunk_range(count, chunks, chunk, &begin, &end);
    const size_t base = ng * count;
    double s = 0.0, q = 0.0;
    for (size_t i = begin + threadIdx.x; i < end; i += GN_THREADS) {
        double v = kv_ld(x, x16, base + i);
        s += v;
        q += v * v;
    }
    s = warp_sum(s);
    q = warp_sum(q);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        shared[0][warp] = s;
        shared[1][warp] = q;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        s = 0.0;
        q = 0.0;
        for (int w = 0; w < GN_THREADS / 32; w++) {
            s += shared[0][w];
            q += shared[1][w];
        }
        partials[2 * block] = s;
        partials[2 * block + 1] = q;
    }
}

struct gn_outputs {
    void *scale, *shift; /* (N, C) tensors, or NULL */
    int scale16, shift16;
    float *scale32, *shift32; /* (N, C) float32 buffers, or NULL */
    void *mean, *rstd;        /* (N, G) tensors, or NULL */
    int mean16, rstd16;
};

static __global__ void gn_finalize_kernel(const double *partials, int chunks, int batch,
                                          int channels, int groups, size_t count, float eps,
                                          const void *gamma, int gamma16, const void *beta,
                                          int beta16, gn_outputs out)
{
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= batch * channels)
        return;
    const int cpg = channels / groups;
    const int n = idx / channels, c = idx % channels, ng = n * groups + c / cpg;
    const double *p = partials + (size_t)2 * ng * chunks;
    double s = 0.0, q = 0.0;
    for (int k = 0; k < chunks; k++) {
        s += p[2 * k];
        q += p[2 * k + 1];
    }
    float scale, shift;
    double mean, rstd;
    kv_gn_finalize(s, q, count, eps, kv_ld(gamma, gamma16, c), kv_ld(beta, beta16, c), &scale,
                   &shift, &mean, &rstd);
    if (out.scale) {
        kv_st(out.scale, out.scale16, idx, scale);
        kv_st(out.shift, out.shift16, idx, shift);
    }
    if (out.scale32) {
        out.scale32[idx] = scale;
        out.shift32[idx] = shift;
    }
    if (out.mean && c % cpg == 0) {
        kv_st(out.mean, out.mean16, ng, (float)mean);
        kv_st(out.rstd, out.rstd16, ng, (float)rstd);
    }
}

/* Statistics of x into out; *coef32 gets the float32 buffer of 2 * N * C
 * values (scale then shift) that follows the partial sums. */
static klvae_status_t gn_stats(kv_cuda *cu, const kv_tensor *x, const kv_tensor *gamma,
                               const kv_tensor *beta, int groups, float eps, gn_outputs out,
                               bool want_coef32, float **coef32)
{
    const int batch = x->shape[0], channels = x->shape[1];
    const size_t plane = (size_t)x->shape[2] * x->shape[3];
    const size_t count = (size_t)(channels / groups) * plane;
    const int chunks = kv_gn_chunks(count);
    const size_t blocks = (size_t)batch * groups * chunks;
    const size_t partial_bytes = blocks * 2 * sizeof(double);
    const size_t coef_bytes = want_coef32 ? (size_t)2 * batch * channels * sizeof(float) : 0;
    void *buf = NULL;
    KV_TRY(kv_cuda_reserve(cu, KV_BUF_STATS, partial_bytes + coef_bytes, &buf));
    double *partials = (double *)buf;
    if (want_coef32) {
        out.scale32 = (float *)((char *)buf + partial_bytes);
        out.shift32 = out.scale32 + (size_t)batch * channels;
        *coef32 = out.scale32;
    }
    if (blocks > 0x7FFFFFFF)
        return kv_cuda_error(cu, KLVAE_ERR_UNSUPPORTED, "group norm of %d x %d groups is too large",
                             batch, groups);
    gn_partial_kernel<<<(unsigned)blocks, GN_THREADS, 0, cu->stream>>>(
        x->data, kv_cuda_dtype_of(cu, x->data), count, chunks, partials);
    KV_LAUNCHED(cu, gn_partial_kernel);
    const int threads = batch * channels;
    gn_finalize_kernel<<<(threads + 255) / 256, 256, 0, cu->stream>>>(
        partials, chunks, batch, channels, groups, count, eps, gamma->data,
        kv_cuda_dtype_of(cu, gamma->data), beta->data, kv_cuda_dtype_of(cu, beta->data), out);
    KV_LAUNCHED(cu, gn_finalize_kernel);
    return KLVAE_OK;
}

klvae_status_t kv_cuda_group_norm_stats(kv_backend *be, const kv_tensor *x,
                                        const kv_tensor *gamma, const kv_tensor *beta, int groups,
                                        float eps, kv_tensor *scale, kv_tensor *shift,
                                        kv_tensor *mean, kv_tensor *rstd)
{
    kv_cuda *cu = kv_cuda_of(be);
    KV_CU(cu, cudaSetDevice(cu->device));
    gn_outputs out;
    memset(&out, 0, sizeof out);
    out.scale = scale->data;
    out.shift = shift->data;
    out.scale16 = kv_cuda_dtype_of(cu, scale->data);
    out.shift16 = kv_cuda_dtype_of(cu, shift->data);
    if (mean && mean->data && rstd && rstd->data) {
        out.mean = mean->data;
        out.rstd = rstd->data;
        out.mean16 = kv_cuda_dtype_of(cu, mean->data);
        out.rstd16 = kv_cuda_dtype_of(cu, rstd->data);
    }
    return gn_stats(cu, x, gamma, beta, groups, eps, out, false, NULL);
}

/* y = act(x * scale[plane] + shift[plane]), over (plane, pixel). */
static __global__ void gn_apply_kernel(const void *x, int x16, const float *scale,
                                       const float *shift, int act, void *y, int y16,
                                       size_t planes, size_t plane_size)
{
    for (size_t plane = blockIdx.y; plane < planes; plane += gridDim.y) {
        const float s = scale[plane], t = shift[plane];
        const size_t base = plane * plane_size;
        for (size_t pix = blockIdx.x * (size_t)blockDim.x + threadIdx.x; pix < plane_size;
             pix += (size_t)gridDim.x * blockDim.x) {
            float v = kv_ld(x, x16, base + pix) * s + t;
            kv_st(y, y16, base + pix, kv_activate(act, v));
        }
    }
}

klvae_status_t kv_cuda_group_norm(kv_backend *be, const kv_tensor *x, const kv_tensor *gamma,
                                  const kv_tensor *beta, int groups, float eps, kv_activation act,
                                  kv_tensor *y)
{
    kv_cuda *cu = kv_cuda_of(be);
    KV_CU(cu, cudaSetDevice(cu->device));
    gn_outputs out;
    memset(&out, 0, sizeof out);
    float *coef = NULL;
    KV_TRY(gn_stats(cu, x, gamma, beta, groups, eps, out, true, &coef));
    const size_t planes = (size_t)x->shape[0] * x->shape[1];
    const size_t plane_size = (size_t)x->shape[2] * x->shape[3];
    gn_apply_kernel<<<kv_cuda_grid2(cu, planes, plane_size), 256, 0, cu->stream>>>(
        x->data, kv_cuda_dtype_of(cu, x->data), coef, coef + planes, (int)act, y->data,
        kv_cuda_dtype_of(cu, y->data), planes, plane_size);
    KV_LAUNCHED(cu, gn_apply_kernel);
    return KLVAE_OK;
}
