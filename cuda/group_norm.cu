/* group_norm.cu — group normalisation statistics and the fused apply step,
 * in either layout.
 *
 * Statistics are summed in double whatever the storage dtype, in an order
 * fixed by the shape alone (no atomics, no dependence on the GPU's size):
 *   NCHW: a group (C/G channels of one sample) is contiguous; it is cut into
 *         chunks (group_norm_plan.cuh), one block sums a chunk;
 *   NHWC: a sample's pixels are cut into chunks; one block sums, for every
 *         channel, its chunk of pixels, each thread reading whole 16-byte
 *         words of channels; the per-channel sums are added per group after.
 * A second kernel, one thread per (sample, group), adds the partial sums in
 * order and applies backend.h's formula (kv_gn_finalize). */
#include "cuda_ops.h"
#include "group_norm_plan.cuh"

#define GN_THREADS 256

static __device__ __forceinline__ double warp_sum(double v)
{
    for (int offset = 16; offset > 0; offset >>= 1)
        v += __shfl_down_sync(0xFFFFFFFFu, v, offset);
    return v;
}

/* NCHW: block k of group ng sums chunk k % chunks of that group into
 * partials[2 * k] (sum) and partials[2 * k + 1] (sum of squares). */
static __global__ void __launch_bounds__(GN_THREADS)
    gn_partial_nchw_kernel(const void *x, int x16, size_t count, int chunks, double *partials)
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

/* NHWC: block (k, n) sums chunk k of the pixels of sample n, per channel,
 * into partials[2 * ((n * chunks + k) * C + c)] (+1: squares). A slot is W
 * consecutive channels (one 16-byte word when W > 1); with S slots and S <=
 * GN_THREADS, T = GN_THREADS / S threads share a slot, taking every T-th
 * pixel, and their sums are added in thread order through shared memory
 * (2 * T * S * W doubles); with more slots each thread takes whole slots. */
/* The sums of W channels (slot) of pixels p0, p0 + step, ... below p1. */
template <typename T, int W>
static __device__ __forceinline__ void gn_slot_sums(const T *xs, int channels, int slot, size_t p0,
                                                    size_t p1, size_t step, double s[W],
                                                    double q[W])
{
#pragma unroll
    for (int j = 0; j < W; j++)
        s[j] = q[j] = 0.0;
    for (size_t p = p0; p < p1; p += step) {
        float v[W];
        if (W > 1)
            kv_vec<T>::load(xs, p * channels + (size_t)slot * W, v);
        else
            v[0] = kv_ld(xs, sizeof(T) == 2, p * channels + slot);
#pragma unroll
        for (int j = 0; j < W; j++) {
            s[j] += v[j];
            q[j] += (double)v[j] * v[j];
        }
    }
}

template <typename T, int W>
static __global__ void __launch_bounds__(GN_THREADS)
    gn_partial_nhwc_kernel(const T *x, int channels, size_t pixels, int chunks, double *partials)
{
    extern __shared__ double lanes[]; /* sums, then squares: (sharers, channels) each */
    const int slots = channels / W, n = blockIdx.y, k = blockIdx.x;
    size_t p0, p1;
    kv_gn_chunk_range(pixels, chunks, k, &p0, &p1);
    const T *xs = x + (size_t)n * pixels * channels;
    double *out = partials + 2 * ((size_t)n * chunks + k) * channels;
    double s[W], q[W];
    if (slots > GN_THREADS) { /* whole slots per thread */
        for (int slot = threadIdx.x; slot < slots; slot += GN_THREADS) {
            gn_slot_sums<T, W>(xs, channels, slot, p0, p1, 1, s, q);
#pragma unroll
            for (int j = 0; j < W; j++) {
                out[2 * ((size_t)slot * W + j)] = s[j];
                out[2 * ((size_t)slot * W + j) + 1] = q[j];
            }
        }
        return;
    }
    const int sharers = GN_THREADS / slots;
    const int slot = threadIdx.x % slots, lane = threadIdx.x / slots;
    double *lane_s = lanes, *lane_q = lanes + (size_t)sharers * channels;
    if (lane < sharers) {
        gn_slot_sums<T, W>(xs, channels, slot, p0 + lane, p1, sharers, s, q);
#pragma unroll
        for (int j = 0; j < W; j++) {
            lane_s[(size_t)lane * channels + slot * W + j] = s[j];
            lane_q[(size_t)lane * channels + slot * W + j] = q[j];
        }
    }
    __syncthreads();
    for (int ch = threadIdx.x; ch < channels; ch += GN_THREADS) {
        double ss = 0.0, qq = 0.0;
        for (int l = 0; l < sharers; l++) { /* in lane order: fixed by the shape */
            ss += lane_s[(size_t)l * channels + ch];
            qq += lane_q[(size_t)l * channels + ch];
        }
        out[2 * (size_t)ch] = ss;
        out[2 * (size_t)ch + 1] = qq;
    }
}

struct gn_outputs {
    void *scale, *shift; /* (N, C) tensors, or NULL */
    int scale16, shift16;
    float *scale32, *shift32; /* (N, C) float32 buffers, or NULL */
    void *mean, *rstd;        /* (N, G) tensors, or NULL */
    int mean16, rstd16;
};

/* One thread per (sample, group): the group's sums in a fixed order, then
 * scale and shift of each of its channels. per_channel: NHWC partials. */
static __global__ void gn_finalize_kernel(const double *partials, int per_channel, int chunks,
                                          int batch, int channels, int groups, size_t count,
                                          float eps, const void *gamma, int gamma16,
                                          const void *beta, int beta16, gn_outputs out)
{
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= batch * groups)
        return;
    const int cpg = channels / groups, n = idx / groups, g = idx % groups;
    double s = 0.0, q = 0.0;
    for (int k = 0; k < chunks; k++) {
        if (per_channel) {
            const double *p = partials + 2 * ((size_t)n * chunks + k) * channels;
            for (int c = g * cpg; c < (g + 1) * cpg; c++) {
                s += p[2 * c];
                q += p[2 * c + 1];
            }
        } else {
            s += partials[2 * ((size_t)idx * chunks + k)];
            q += partials[2 * ((size_t)idx * chunks + k) + 1];
        }
    }
    for (int c = g * cpg; c < (g + 1) * cpg; c++) {
        float scale, shift;
        double mean, rstd;
        kv_gn_finalize(s, q, count, eps, kv_ld(gamma, gamma16, c), kv_ld(beta, beta16, c), &scale,
                       &shift, &mean, &rstd);
        const size_t nc = (size_t)n * channels + c;
        if (out.scale) {
            kv_st(out.scale, out.scale16, nc, scale);
            kv_st(out.shift, out.shift16, nc, shift);
        }
        if (out.scale32) {
            out.scale32[nc] = scale;
            out.shift32[nc] = shift;
        }
        if (out.mean && c == g * cpg) {
            kv_st(out.mean, out.mean16, idx, (float)mean);
            kv_st(out.rstd, out.rstd16, idx, (float)rstd);
        }
    }
}

static klvae_status_t launch_partials_nhwc(kv_cuda *cu, const kv_tensor *x, kv_cuda_dtype dt,
                                           int chunks, double *partials)
{
    const int channels = x->shape[1];
    const size_t pixels = (size_t)x->shape[2] * x->shape[3];
    const int width = dt == KV_CUDA_BF16 ? 8 : 4;
    const bool vec = channels % width == 0 && kv_cuda_aligned16(x->data);
    const int w = vec ? width : 1, slots = channels / w;
    const int sharers = slots <= GN_THREADS ? GN_THREADS / slots : 1;
    /* the kernel's lanes whenever slots <= GN_THREADS (sharers may be 1) */
    const size_t shared = slots <= GN_THREADS ? (size_t)2 * sharers * channels * sizeof(double) : 0;
    const dim3 grid((unsigned)chunks, (unsigned)x->shape[0]);
    if (dt == KV_CUDA_BF16 && vec)
        gn_partial_nhwc_kernel<uint16_t, 8><<<grid, GN_THREADS, shared, cu->stream>>>(
            (const uint16_t *)x->data, channels, pixels, chunks, partials);
    else if (dt == KV_CUDA_BF16)
        gn_partial_nhwc_kernel<uint16_t, 1><<<grid, GN_THREADS, shared, cu->stream>>>(
            (const uint16_t *)x->data, channels, pixels, chunks, partials);
    else if (vec)
        gn_partial_nhwc_kernel<float, 4><<<grid, GN_THREADS, shared, cu->stream>>>(
            (const float *)x->data, channels, pixels, chunks, partials);
    else
        gn_partial_nhwc_kernel<float, 1><<<grid, GN_THREADS, shared, cu->stream>>>(
            (const float *)x->data, channels, pixels, chunks, partials);
    KV_LAUNCHED(cu, gn_partial_nhwc_kernel);
    return KLVAE_OK;
}

/* Statistics of x into out; with want_coef32, *coef gets a float32 block of
 * 2 * N * C values (scale then shift), which the caller frees. */
static klvae_status_t gn_stats(kv_cuda *cu, const char *op, const kv_tensor *x,
                               const kv_tensor *gamma, const kv_tensor *beta, int groups,
                               float eps, gn_outputs out, bool want_coef32, float **coef)
{
    const int batch = x->shape[0], channels = x->shape[1];
    const size_t pixels = (size_t)x->shape[2] * x->shape[3];
    const size_t count = (size_t)(channels / groups) * pixels;
    kv_cuda_dtype tx, tg, tb;
    KV_TRY(kv_cuda_dtype_of(cu, x->data, op, "the input", &tx));
    KV_TRY(kv_cuda_dtype_of(cu, gamma->data, op, "gamma", &tg));
    KV_TRY(kv_cuda_dtype_of(cu, beta->data, op, "beta", &tb));
    const bool nhwc = cu->nhwc && pixels > 1;
    const int chunks = nhwc ? kv_gn_chunks(pixels * channels) : kv_gn_chunks(count);
    const size_t partial_count =
        nhwc ? (size_t)batch * chunks * channels : (size_t)batch * groups * chunks;
    if (!nhwc && partial_count > 0x7FFFFFFF)
        return kv_cuda_error(cu, KLVAE_ERR_UNSUPPORTED, "%s: %d x %d groups are too many", op,
                             batch, groups);
    double *partials = NULL;
    KV_TRY(kv_cuda_temp(cu, partial_count * 2 * sizeof(double), "group norm sums",
                        (void **)&partials));
    klvae_status_t st = KLVAE_OK;
    if (want_coef32) {
        st = kv_cuda_temp(cu, (size_t)2 * batch * channels * sizeof(float),
                          "group norm coefficients", (void **)coef);
        out.scale32 = *coef;
        out.shift32 = *coef + (size_t)batch * channels;
    }
    if (st == KLVAE_OK && nhwc)
        st = launch_partials_nhwc(cu, x, tx, chunks, partials);
    if (st == KLVAE_OK && !nhwc) {
        gn_partial_nchw_kernel<<<(unsigned)partial_count, GN_THREADS, 0, cu->stream>>>(
            x->data, tx == KV_CUDA_BF16, count, chunks, partials);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess)
            st = kv_cuda_fail(cu, e, "the launch of gn_partial_nchw_kernel");
    }
    if (st == KLVAE_OK) {
        const int threads = batch * groups;
        gn_finalize_kernel<<<(threads + 255) / 256, 256, 0, cu->stream>>>(
            partials, nhwc, chunks, batch, channels, groups, count, eps, gamma->data,
            tg == KV_CUDA_BF16, beta->data, tb == KV_CUDA_BF16, out);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess)
            st = kv_cuda_fail(cu, e, "the launch of gn_finalize_kernel");
    }
    kv_cuda_temp_free(cu, partials);
    if (st != KLVAE_OK && want_coef32) {
        kv_cuda_temp_free(cu, *coef);
        *coef = NULL;
    }
    return st;
}

klvae_status_t kv_cuda_group_norm_stats(kv_backend *be, const kv_tensor *x,
                                        const kv_tensor *gamma, const kv_tensor *beta, int groups,
                                        float eps, kv_tensor *scale, kv_tensor *shift,
                                        kv_tensor *mean, kv_tensor *rstd)
{
    kv_cuda *cu = kv_cuda_of(be);
    gn_outputs out;
    memset(&out, 0, sizeof out);
    kv_cuda_dtype d;
    out.scale = scale->data;
    out.shift = shift->data;
    KV_TRY(kv_cuda_dtype_of(cu, scale->data, "group_norm_stats", "scale", &d));
    out.scale16 = d == KV_CUDA_BF16;
    KV_TRY(kv_cuda_dtype_of(cu, shift->data, "group_norm_stats", "shift", &d));
    out.shift16 = d == KV_CUDA_BF16;
    if (mean && mean->data && rstd && rstd->data) {
        out.mean = mean->data;
        out.rstd = rstd->data;
        KV_TRY(kv_cuda_dtype_of(cu, mean->data, "group_norm_stats", "mean", &d));
        out.mean16 = d == KV_CUDA_BF16;
        KV_TRY(kv_cuda_dtype_of(cu, rstd->data, "group_norm_stats", "rstd", &d));
        out.rstd16 = d == KV_CUDA_BF16;
    }
    return gn_stats(cu, "group_norm_stats", x, gamma, beta, groups, eps, out, false, NULL);
}

/* y = act(x * scale[n, c] + shift[n, c]) over count elements, n = i /
 * sample, c = i / plane % C (NCHW) or i % C (NHWC, plane == 1); W elements
 * per step (of one sample and channel in NCHW, of one pixel in NHWC). */
template <typename T, int W>
static __global__ void gn_apply_kernel(const T *x, const float *scale, const float *shift,
                                       int act, T *y, size_t count, int channels, size_t plane,
                                       size_t sample)
{
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t v = blockIdx.x * (size_t)blockDim.x + threadIdx.x; v < count / W; v += stride) {
        const size_t i = v * W;
        float val[W];
        if (W > 1)
            kv_vec<T>::load(x, i, val);
        else
            val[0] = kv_ld(x, sizeof(T) == 2, i);
        const size_t n = i / sample;
#pragma unroll
        for (int k = 0; k < W; k++) {
            const size_t c = plane == 1 ? (i + k) % (size_t)channels
                                        : (i + k) / plane % (size_t)channels;
            const size_t nc = n * channels + c;
            val[k] = kv_activate(act, val[k] * scale[nc] + shift[nc]);
        }
        if (W > 1)
            kv_vec<T>::store(y, i, val);
        else
            kv_st(y, sizeof(T) == 2, i, val[0]);
    }
}

klvae_status_t kv_cuda_group_norm(kv_backend *be, const kv_tensor *x, const kv_tensor *gamma,
                                  const kv_tensor *beta, int groups, float eps, kv_activation act,
                                  kv_tensor *y)
{
    kv_cuda *cu = kv_cuda_of(be);
    kv_cuda_dtype tx, ty;
    KV_TRY(kv_cuda_dtype_of(cu, x->data, "group_norm", "the input", &tx));
    KV_TRY(kv_cuda_dtype_of(cu, y->data, "group_norm", "the output", &ty));
    if (tx != ty)
        return kv_cuda_error(cu, KLVAE_ERR_INTERNAL,
                             "group_norm: input and output are stored in different dtypes");
    gn_outputs out;
    memset(&out, 0, sizeof out);
    float *coef = NULL;
    KV_TRY(gn_stats(cu, "group_norm", x, gamma, beta, groups, eps, out, true, &coef));
    const int batch = x->shape[0], channels = x->shape[1];
    const size_t pixels = (size_t)x->shape[2] * x->shape[3];
    const size_t count = (size_t)batch * channels * pixels;
    const size_t plane = cu->nhwc ? 1 : pixels, sample = (size_t)channels * pixels;
    const int width = tx == KV_CUDA_BF16 ? 8 : 4;
    const bool vec = kv_cuda_aligned16(x->data, y->data) &&
                     (cu->nhwc ? channels % width == 0 : pixels % width == 0);
    const unsigned blocks = kv_cuda_blocks(vec ? count / width : count, cu);
    const float *sc = coef, *sh = coef + (size_t)batch * channels;
    if (tx == KV_CUDA_BF16 && vec)
        gn_apply_kernel<uint16_t, 8><<<blocks, 256, 0, cu->stream>>>(
            (const uint16_t *)x->data, sc, sh, (int)act, (uint16_t *)y->data, count, channels,
            plane, sample);
    else if (tx == KV_CUDA_BF16)
        gn_apply_kernel<uint16_t, 1><<<blocks, 256, 0, cu->stream>>>(
            (const uint16_t *)x->data, sc, sh, (int)act, (uint16_t *)y->data, count, channels,
            plane, sample);
    else if (vec)
        gn_apply_kernel<float, 4><<<blocks, 256, 0, cu->stream>>>(
            (const float *)x->data, sc, sh, (int)act, (float *)y->data, count, channels, plane, sample);
    else
        gn_apply_kernel<float, 1><<<blocks, 256, 0, cu->stream>>>(
            (const float *)x->data, sc, sh, (int)act, (float *)y->data, count, channels, plane, sample);
    cudaError_t e = cudaGetLastError();
    kv_cuda_temp_free(cu, coef);
    if (e != cudaSuccess)
        return kv_cuda_fail(cu, e, "the launch of gn_apply_kernel");
    return KLVAE_OK;
}
