/* lpips.cu — the LPIPS ops (src/backend/backend.h, "Family lpips"), in the
 * backend's layout, as src/backend/cpu/lpips.c: the unit normalisation of a
 * feature map over its channels and its gradient (one thread per pixel, sums
 * in double), and the weighted squared distance of two normalised taps with
 * an optional dropout mask drawn from Philox at first + each value's NCHW
 * index, and its gradient. The per-sample distances go to the host. */
#include "base/philox.h"
#include "reduce.cuh"

#define KV_UNIT_EPS 1e-10

/* Storage index of channel c of pixel p of sample n. */
static __device__ __forceinline__ size_t lp_at(int nhwc, size_t n, size_t c, size_t p,
                                               int channels, size_t pixels)
{
    return nhwc ? (n * pixels + p) * channels + c : (n * channels + c) * pixels + p;
}

static __global__ void unit_normalize_kernel(const void *x, int x16, void *y, int y16,
                                             void *norms, int r16, int channels, size_t pixels,
                                             size_t count, int nhwc)
{
    for (size_t np = blockIdx.x * (size_t)blockDim.x + threadIdx.x; np < count;
         np += (size_t)gridDim.x * blockDim.x) {
        const size_t n = np / pixels, p = np % pixels;
        double ss = 0.0;
        for (int c = 0; c < channels; c++) {
            const double v = kv_ld(x, x16, lp_at(nhwc, n, c, p, channels, pixels));
            ss += v * v;
        }
        const float r = (float)sqrt(ss);
        kv_st(norms, r16, np, r);
        const float inv = 1.0f / (r + (float)KV_UNIT_EPS);
        for (int c = 0; c < channels; c++) {
            const size_t i = lp_at(nhwc, n, c, p, channels, pixels);
            kv_st(y, y16, i, kv_ld(x, x16, i) * inv);
        }
    }
}

static __global__ void unit_normalize_backward_kernel(const void *x, int x16, const void *norms,
                                                      int r16, const void *dy, int dy16,
                                                      void *dx, int dx16, int channels,
                                                      size_t pixels, size_t count, int nhwc)
{
    for (size_t np = blockIdx.x * (size_t)blockDim.x + threadIdx.x; np < count;
         np += (size_t)gridDim.x * blockDim.x) {
        const size_t n = np / pixels, p = np % pixels;
        const double r = kv_ld(norms, r16, np);
        if (r == 0.0) { /* an all-zero feature vector: PyTorch's gradient is NaN here */
            for (int c = 0; c < channels; c++)
                kv_st(dx, dx16, lp_at(nhwc, n, c, p, channels, pixels), 0.0f);
            continue;
        }
        double dot = 0.0;
        for (int c = 0; c < channels; c++) {
            const size_t i = lp_at(nhwc, n, c, p, channels, pixels);
            dot += (double)kv_ld(dy, dy16, i) * kv_ld(x, x16, i);
        }
        const double re = r + KV_UNIT_EPS;
        const double a = 1.0 / re, b = dot / (re * re * r);
        for (int c = 0; c < channels; c++) {
            const size_t i = lp_at(nhwc, n, c, p, channels, pixels);
            kv_st(dx, dx16, i, (float)(kv_ld(dy, dy16, i) * a - kv_ld(x, x16, i) * b));
        }
    }
}

klvae_status_t kv_cuda_unit_normalize(kv_backend *be, const kv_tensor *x, kv_tensor *y,
                                      kv_tensor *norms)
{
    kv_cuda *cu = kv_cuda_of(be);
    int x16, y16, r16;
    KV_TRY(kv_cuda_bf16_flag(cu, "unit_normalize", x, "x", &x16));
    KV_TRY(kv_cuda_bf16_flag(cu, "unit_normalize", y, "y", &y16));
    KV_TRY(kv_cuda_bf16_flag(cu, "unit_normalize", norms, "norms", &r16));
    const size_t pixels = (size_t)x->shape[2] * x->shape[3], count = x->shape[0] * pixels;
    if (!count)
        return KLVAE_OK;
    unit_normalize_kernel<<<kv_cuda_blocks(count, cu), 256, 0, cu->stream>>>(
        x->data, x16, y->data, y16, norms->data, r16, x->shape[1], pixels, count,
        cu->nhwc && pixels > 1);
    KV_LAUNCHED(cu, unit_normalize_kernel);
    return KLVAE_OK;
}

klvae_status_t kv_cuda_unit_normalize_backward(kv_backend *be, const kv_tensor *x,
                                               const kv_tensor *norms, const kv_tensor *dy,
                                               kv_tensor *dx)
{
    kv_cuda *cu = kv_cuda_of(be);
    const char *op = "unit_normalize_backward";
    int x16, r16, dy16, dx16;
    KV_TRY(kv_cuda_bf16_flag(cu, op, x, "x", &x16));
    KV_TRY(kv_cuda_bf16_flag(cu, op, norms, "norms", &r16));
    KV_TRY(kv_cuda_bf16_flag(cu, op, dy, "dy", &dy16));
    KV_TRY(kv_cuda_bf16_flag(cu, op, dx, "dx", &dx16));
    const size_t pixels = (size_t)x->shape[2] * x->shape[3], count = x->shape[0] * pixels;
    if (!count)
        return KLVAE_OK;
    unit_normalize_backward_kernel<<<kv_cuda_blocks(count, cu), 256, 0, cu->stream>>>(
        x->data, x16, norms->data, r16, dy->data, dy16, dx->data, dx16, x->shape[1], pixels,
        count, cu->nhwc && pixels > 1);
    KV_LAUNCHED(cu, unit_normalize_backward_kernel);
    return KLVAE_OK;
}

/* ---- the distance of one tap ---- */

struct lpips_args {
    const void *a, *b;
    int a16, b16, nhwc, channels;
    size_t pixels;
    float dropout, keep;
    uint64_t seed, first; /* the mask of NCHW element i: Philox index first + i */
};

/* The dropout factor of the value at storage index i: drawn at first + its
 * NCHW index, as the CPU does (kv_philox_index, layout_plan.cuh). */
static __device__ __forceinline__ float lpips_mask(const lpips_args &a, size_t i)
{
    if (a.dropout <= 0.0f)
        return 1.0f;
    const uint64_t at = kv_philox_index(i, a.nhwc, a.channels, a.pixels, a.first);
    return kv_philox_uniform(a.seed, at) < a.dropout ? 0.0f : a.keep;
}

struct lpips_squares {
    lpips_args a;
    __device__ double2 operator()(size_t i, int, int) const
    {
        const float m = lpips_mask(a, i);
        const float d = kv_ld(a.a, a.a16, i) - kv_ld(a.b, a.b16, i);
        return make_double2((double)(m * d * d), 0.0);
    }
};

/* values[n] = sum_c w[c] s[n, c] / pixels, in channel order. */
static __global__ void lpips_values_kernel(const double2 *sums, const void *w, int w16, int batch,
                                           int channels, size_t pixels, double *values)
{
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= batch)
        return;
    double s = 0.0;
    for (int c = 0; c < channels; c++)
        s += kv_ld(w, w16, c) * sums[(size_t)n * channels + c].x;
    values[n] = s / (double)pixels;
}

/* db = grad_scale[n] * 2 / P * w[c] * m * (b - a). */
static __global__ void lpips_grad_kernel(lpips_args a, const void *w, int w16,
                                         const float *grad_scale, void *db, int db16,
                                         size_t count)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x) {
        int n, c;
        kv_storage_nc(i, a.nhwc, a.channels, a.pixels, &n, &c);
        const float g = grad_scale[n] * 2.0f / (float)a.pixels;
        const float d = kv_ld(a.a, a.a16, i) - kv_ld(a.b, a.b16, i);
        kv_st(db, db16, i, g * kv_ld(w, w16, c) * lpips_mask(a, i) * (-d));
    }
}

klvae_status_t kv_cuda_lpips_distance(kv_backend *be, const kv_tensor *a, const kv_tensor *b,
                                      const kv_tensor *w, float dropout, uint64_t dropout_seed,
                                      uint64_t first, double *values, const float *grad_scale,
                                      kv_tensor *db)
{
    kv_cuda *cu = kv_cuda_of(be);
    const char *op = "lpips_distance";
    lpips_args la;
    memset(&la, 0, sizeof la);
    int w16, db16 = 0;
    KV_TRY(kv_cuda_bf16_flag(cu, op, a, "a", &la.a16));
    KV_TRY(kv_cuda_bf16_flag(cu, op, b, "b", &la.b16));
    KV_TRY(kv_cuda_bf16_flag(cu, op, w, "w", &w16));
    if (db)
        KV_TRY(kv_cuda_bf16_flag(cu, op, db, "db", &db16));
    const int batch = a->shape[0];
    la.a = a->data;
    la.b = b->data;
    la.channels = a->shape[1];
    la.pixels = (size_t)a->shape[2] * a->shape[3];
    la.nhwc = cu->nhwc && la.pixels > 1;
    la.dropout = dropout;
    la.keep = dropout > 0.0f ? 1.0f / (1.0f - dropout) : 1.0f;
    la.seed = dropout_seed;
    la.first = first;
    if ((size_t)batch * sizeof(double) > KV_CUDA_HOST_SCALARS)
        return kv_cuda_error(cu, KLVAE_ERR_UNSUPPORTED, "%s: a batch of %d", op, batch);
    double2 *sums = NULL;
    double *dvalues = NULL;
    float *gs = NULL;
    KV_TRY(kv_cuda_temp(cu, (size_t)batch * la.channels * sizeof(double2), "LPIPS sums",
                        (void **)&sums));
    klvae_status_t st = kv_cuda_temp(cu, (size_t)batch * sizeof(double), "LPIPS distances",
                                     (void **)&dvalues);
    lpips_squares f = {la};
    if (st == KLVAE_OK)
        st = kv_cuda_plane_sums(cu, batch, la.channels, a->shape[2], a->shape[3], f, sums);
    if (st == KLVAE_OK) {
        lpips_values_kernel<<<(batch + 255) / 256, 256, 0, cu->stream>>>(
            sums, w->data, w16, batch, la.channels, la.pixels, dvalues);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess)
            st = kv_cuda_fail(cu, e, "the launch of lpips_values_kernel");
    }
    if (st == KLVAE_OK && grad_scale && db && db->data)
        st = kv_cuda_from_host(cu, grad_scale, (size_t)batch * sizeof(float),
                               "LPIPS gradient scales", (void **)&gs);
    if (st == KLVAE_OK && gs) {
        const size_t count = kv_cuda_numel(db);
        lpips_grad_kernel<<<kv_cuda_blocks(count, cu), 256, 0, cu->stream>>>(
            la, w->data, w16, gs, db->data, db16, count);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess)
            st = kv_cuda_fail(cu, e, "the launch of lpips_grad_kernel");
    }
    if (st == KLVAE_OK)
        st = kv_cuda_to_host(cu, dvalues, (size_t)batch * sizeof(double));
    if (st == KLVAE_OK)
        memcpy(values, cu->host_scalars, (size_t)batch * sizeof(double));
    kv_cuda_temp_free(cu, gs);
    kv_cuda_temp_free(cu, dvalues);
    kv_cuda_temp_free(cu, sums);
    return st;
}
