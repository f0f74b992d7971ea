/* batch_norm.cu — training-mode batch normalisation (the PatchGAN
 * discriminator's) and its gradient, as src/backend/cpu/batch_norm.c: batch
 * statistics per channel over (N, H, W) summed in double (reduce.cuh), the
 * running statistics (host arrays) moved on the host, the gradient through
 * the batch statistics. */
#include <math.h>

#include "reduce.cuh"

struct bn_moments {
    const void *x;
    int x16;
    __device__ double2 operator()(size_t i, int, int) const
    {
        const double v = kv_ld(x, x16, i);
        return make_double2(v, v * v);
    }
};

/* Per channel, the batch's sums in order: mean, invstd, the affine
 * coefficients s, t of y = x * s + t, and (mean, biased variance) for the
 * host's running statistics. */
static __global__ void bn_stats_kernel(const double2 *sums, int batch, int channels,
                                       size_t pixels, float eps, const void *gamma, int g16,
                                       const void *beta, int b16, void *mean, int m16,
                                       void *invstd, int i16, float2 *coef, double2 *moments)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels)
        return;
    double sum = 0.0, sumsq = 0.0;
    for (int n = 0; n < batch; n++) {
        sum += sums[(size_t)n * channels + c].x;
        sumsq += sums[(size_t)n * channels + c].y;
    }
    const double count = (double)batch * (double)pixels;
    const double mu = sum / count;
    double var = sumsq / count - mu * mu;
    if (var < 0.0)
        var = 0.0;
    const float is = (float)(1.0 / sqrt(var + (double)eps));
    kv_st(mean, m16, c, (float)mu);
    kv_st(invstd, i16, c, is);
    const float s = is * kv_ld(gamma, g16, c);
    coef[c] = make_float2(s, kv_ld(beta, b16, c) - (float)mu * s);
    moments[c] = make_double2(mu, var);
}

/* y = x * s[c] + t[c]. */
static __global__ void bn_apply_kernel(const void *x, int x16, const float2 *coef, void *y,
                                       int y16, size_t count, int channels, size_t pixels,
                                       int nhwc)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x) {
        int n, c;
        kv_storage_nc(i, nhwc, channels, pixels, &n, &c);
        kv_st(y, y16, i, kv_ld(x, x16, i) * coef[c].x + coef[c].y);
    }
}

klvae_status_t kv_cuda_batch_norm(kv_backend *be, const kv_tensor *x, const kv_tensor *gamma,
                                  const kv_tensor *beta, float eps, float momentum,
                                  float *running_mean, float *running_var, kv_tensor *y,
                                  kv_tensor *mean, kv_tensor *invstd)
{
    kv_cuda *cu = kv_cuda_of(be);
    const char *op = "batch_norm";
    int x16, g16, b16, y16, m16, i16;
    KV_TRY(kv_cuda_bf16_flag(cu, op, x, "x", &x16));
    KV_TRY(kv_cuda_bf16_flag(cu, op, gamma, "gamma", &g16));
    KV_TRY(kv_cuda_bf16_flag(cu, op, beta, "beta", &b16));
    KV_TRY(kv_cuda_bf16_flag(cu, op, y, "y", &y16));
    KV_TRY(kv_cuda_bf16_flag(cu, op, mean, "mean", &m16));
    KV_TRY(kv_cuda_bf16_flag(cu, op, invstd, "invstd", &i16));
    const int batch = x->shape[0], channels = x->shape[1];
    const size_t pixels = (size_t)x->shape[2] * x->shape[3];
    const size_t count = (size_t)batch * channels * pixels;
    double2 *sums = NULL, *moments = NULL;
    float2 *coef = NULL;
    KV_TRY(kv_cuda_temp(cu, (size_t)batch * channels * sizeof(double2), "batch norm sums",
                        (void **)&sums));
    klvae_status_t st =
        kv_cuda_temp(cu, channels * sizeof(double2), "batch norm moments", (void **)&moments);
    if (st == KLVAE_OK)
        st = kv_cuda_temp(cu, channels * sizeof(float2), "batch norm coefficients",
                          (void **)&coef);
    bn_moments f = {x->data, x16};
    if (st == KLVAE_OK)
        st = kv_cuda_plane_sums(cu, batch, channels, x->shape[2], x->shape[3], f, sums);
    cudaError_t e = cudaSuccess;
    if (st == KLVAE_OK) {
        bn_stats_kernel<<<(channels + 255) / 256, 256, 0, cu->stream>>>(
            sums, batch, channels, pixels, eps, gamma->data, g16, beta->data, b16, mean->data,
            m16, invstd->data, i16, coef, moments);
        e = cudaGetLastError();
    }
    if (st == KLVAE_OK && e == cudaSuccess) {
        bn_apply_kernel<<<kv_cuda_blocks(count, cu), 256, 0, cu->stream>>>(
            x->data, x16, coef, y->data, y16, count, channels, pixels, cu->nhwc && pixels > 1);
        e = cudaGetLastError();
    }
    if (st == KLVAE_OK && e != cudaSuccess)
        st = kv_cuda_fail(cu, e, "batch_norm's kernels");
    if (st == KLVAE_OK && running_mean && channels * sizeof(double2) > KV_CUDA_HOST_SCALARS)
        st = kv_cuda_error(cu, KLVAE_ERR_UNSUPPORTED, "%s: %d channels of running statistics", op,
                           channels);
    if (st == KLVAE_OK && running_mean) /* the host's arrays move on the host, as the CPU's */
        st = kv_cuda_to_host(cu, moments, channels * sizeof(double2));
    if (st == KLVAE_OK && running_mean) {
        const double2 *mv = (const double2 *)cu->host_scalars;
        const double cnt = (double)batch * (double)pixels;
        for (int c = 0; c < channels; c++) {
            const double unbiased = cnt > 1.0 ? mv[c].y * cnt / (cnt - 1.0) : mv[c].y;
            running_mean[c] = (1.0f - momentum) * running_mean[c] + momentum * (float)mv[c].x;
            running_var[c] = (1.0f - momentum) * running_var[c] + momentum * (float)unbiased;
        }
    }
    kv_cuda_temp_free(cu, coef);
    kv_cuda_temp_free(cu, moments);
    kv_cuda_temp_free(cu, sums);
    return st;
}

/* ---- backward ---- */

struct bn_grad_sums {
    const void *x, *dy, *mean, *invstd;
    int x16, dy16, m16, i16;
    __device__ double2 operator()(size_t i, int, int c) const
    {
        const float xhat = (kv_ld(x, x16, i) - kv_ld(mean, m16, c)) * kv_ld(invstd, i16, c);
        const double dyv = kv_ld(dy, dy16, i);
        return make_double2(dyv, dyv * xhat);
    }
};

/* Per channel, what dx = invstd * (dy * gamma - m1 - xhat * m2) needs. */
struct bn_dx_coef {
    float gamma, m1, m2;
};

static __global__ void bn_grad_stats_kernel(const double2 *sums, int batch, int channels,
                                            size_t pixels, const void *gamma, int g16,
                                            void *dgamma, int dg16, void *dbeta, int db16,
                                            bn_dx_coef *coef)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels)
        return;
    double sum_dy = 0.0, sum_dy_xhat = 0.0;
    for (int n = 0; n < batch; n++) {
        sum_dy += sums[(size_t)n * channels + c].x;
        sum_dy_xhat += sums[(size_t)n * channels + c].y;
    }
    kv_st(dgamma, dg16, c, kv_ld(dgamma, dg16, c) + (float)sum_dy_xhat);
    kv_st(dbeta, db16, c, kv_ld(dbeta, db16, c) + (float)sum_dy);
    const double count = (double)batch * (double)pixels;
    const float g = kv_ld(gamma, g16, c);
    coef[c].gamma = g;
    coef[c].m1 = (float)(sum_dy * g / count);
    coef[c].m2 = (float)(sum_dy_xhat * g / count);
}

static __global__ void bn_dx_kernel(const void *x, int x16, const void *dy, int dy16,
                                    const void *mean, int m16, const void *invstd, int i16,
                                    const bn_dx_coef *coef, void *dx, int dx16, size_t count,
                                    int channels, size_t pixels, int nhwc)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x) {
        int n, c;
        kv_storage_nc(i, nhwc, channels, pixels, &n, &c);
        const float is = kv_ld(invstd, i16, c);
        const float xhat = (kv_ld(x, x16, i) - kv_ld(mean, m16, c)) * is;
        kv_st(dx, dx16, i,
              is * (kv_ld(dy, dy16, i) * coef[c].gamma - coef[c].m1 - xhat * coef[c].m2));
    }
}

klvae_status_t kv_cuda_batch_norm_backward(kv_backend *be, const kv_tensor *x,
                                           const kv_tensor *gamma, const kv_tensor *mean,
                                           const kv_tensor *invstd, const kv_tensor *dy,
                                           kv_tensor *dx, kv_tensor *dgamma, kv_tensor *dbeta)
{
    kv_cuda *cu = kv_cuda_of(be);
    const char *op = "batch_norm_backward";
    int x16, g16, m16, i16, dy16, dx16, dg16, db16;
    KV_TRY(kv_cuda_bf16_flag(cu, op, x, "x", &x16));
    KV_TRY(kv_cuda_bf16_flag(cu, op, gamma, "gamma", &g16));
    KV_TRY(kv_cuda_bf16_flag(cu, op, mean, "mean", &m16));
    KV_TRY(kv_cuda_bf16_flag(cu, op, invstd, "invstd", &i16));
    KV_TRY(kv_cuda_bf16_flag(cu, op, dy, "dy", &dy16));
    KV_TRY(kv_cuda_bf16_flag(cu, op, dx, "dx", &dx16));
    KV_TRY(kv_cuda_bf16_flag(cu, op, dgamma, "dgamma", &dg16));
    KV_TRY(kv_cuda_bf16_flag(cu, op, dbeta, "dbeta", &db16));
    const int batch = x->shape[0], channels = x->shape[1];
    const size_t pixels = (size_t)x->shape[2] * x->shape[3];
    const size_t count = (size_t)batch * channels * pixels;
    double2 *sums = NULL;
    bn_dx_coef *coef = NULL;
    KV_TRY(kv_cuda_temp(cu, (size_t)batch * channels * sizeof(double2),
                        "batch norm gradient sums", (void **)&sums));
    klvae_status_t st = kv_cuda_temp(cu, channels * sizeof(bn_dx_coef),
                                     "batch norm gradient coefficients", (void **)&coef);
    bn_grad_sums f = {x->data, dy->data, mean->data, invstd->data, x16, dy16, m16, i16};
    if (st == KLVAE_OK)
        st = kv_cuda_plane_sums(cu, batch, channels, x->shape[2], x->shape[3], f, sums);
    cudaError_t e = cudaSuccess;
    if (st == KLVAE_OK) {
        bn_grad_stats_kernel<<<(channels + 255) / 256, 256, 0, cu->stream>>>(
            sums, batch, channels, pixels, gamma->data, g16, dgamma->data, dg16, dbeta->data,
            db16, coef);
        e = cudaGetLastError();
    }
    if (st == KLVAE_OK && e == cudaSuccess) {
        bn_dx_kernel<<<kv_cuda_blocks(count, cu), 256, 0, cu->stream>>>(
            x->data, x16, dy->data, dy16, mean->data, m16, invstd->data, i16, coef, dx->data,
            dx16, count, channels, pixels, cu->nhwc && pixels > 1);
        e = cudaGetLastError();
    }
    if (st == KLVAE_OK && e != cudaSuccess)
        st = kv_cuda_fail(cu, e, "batch_norm_backward's kernels");
    kv_cuda_temp_free(cu, coef);
    kv_cuda_temp_free(cu, sums);
    return st;
}
