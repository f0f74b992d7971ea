/* batch_norm.cu — training-mode batch normalisation (the PatchGAN
 * discriminator's) and its gradient, as src/backend/cpu/batch_norm.c, split
 * as backend.h's Family batch_norm: the statistics (per channel over (N, H,
 * W), summed in double by reduce.cuh, brought to the host) and their use
 * (from given sums over a count: this batch's, or every process's added by
 * data-parallel training in between). The per-channel arithmetic is
 * batch_norm_plan.cuh's; the running statistics (host arrays) move on the
 * host. */
#include <math.h>

#include "batch_norm_plan.cuh"
#include "reduce.cuh"

/* Per channel, the sums over the batch of the per-(sample, channel) sums,
 * in sample order. */
static __global__ void bn_channel_sums_kernel(const double2 *plane_sums, int batch, int channels,
                                              double2 *out)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels)
        return;
    double2 s = make_double2(0.0, 0.0);
    for (int n = 0; n < batch; n++) {
        s.x += plane_sums[(size_t)n * channels + c].x;
        s.y += plane_sums[(size_t)n * channels + c].y;
    }
    out[c] = s;
}

/* sums (host, 2C) = per channel the sums of f's two values over (N, H, W):
 * sums[c] the first, sums[C + c] the second. Waits for the stream. */
template <typename F>
static klvae_status_t bn_host_sums(kv_cuda *cu, const char *op, const kv_tensor *x, F f,
                                   double *sums)
{
    const int batch = x->shape[0], channels = x->shape[1];
    if (channels * sizeof(double2) > KV_CUDA_HOST_SCALARS)
        return kv_cuda_error(cu, KLVAE_ERR_UNSUPPORTED, "%s: %d channels", op, channels);
    double2 *planes = NULL, *out = NULL;
    KV_TRY(kv_cuda_temp(cu, (size_t)batch * channels * sizeof(double2), "batch norm sums",
                        (void **)&planes));
    klvae_status_t st =
        kv_cuda_temp(cu, channels * sizeof(double2), "batch norm channel sums", (void **)&out);
    if (st == KLVAE_OK)
        st = kv_cuda_plane_sums(cu, batch, channels, x->shape[2], x->shape[3], f, planes);
    if (st == KLVAE_OK) {
        bn_channel_sums_kernel<<<(channels + 255) / 256, 256, 0, cu->stream>>>(planes, batch,
                                                                               channels, out);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess)
            st = kv_cuda_fail(cu, e, "the launch of bn_channel_sums_kernel");
    }
    if (st == KLVAE_OK)
        st = kv_cuda_to_host(cu, out, channels * sizeof(double2));
    if (st == KLVAE_OK) {
        const double2 *h = (const double2 *)cu->host_scalars;
        for (int c = 0; c < channels; c++) {
            sums[c] = h[c].x;
            sums[channels + c] = h[c].y;
        }
    }
    kv_cuda_temp_free(cu, out);
    kv_cuda_temp_free(cu, planes);
    return st;
}

/* ---- forward ---- */

struct bn_moments {
    const void *x;
    int x16;
    __device__ double2 operator()(size_t i, int, int) const
    {
        const double v = kv_ld(x, x16, i);
        return make_double2(v, v * v);
    }
};

klvae_status_t kv_cuda_batch_norm_stats(kv_backend *be, const kv_tensor *x, double *sums)
{
    kv_cuda *cu = kv_cuda_of(be);
    int x16;
    KV_TRY(kv_cuda_bf16_flag(cu, "batch_norm_stats", x, "x", &x16));
    bn_moments f = {x->data, x16};
    return bn_host_sums(cu, "batch_norm_stats", x, f, sums);
}

/* Per channel, from the sums (device copy, 2C) over count values: mean,
 * invstd and y's coefficients (s, t). */
static __global__ void bn_coef_kernel(const double *sums, double count, int channels, float eps,
                                      const void *gamma, int g16, const void *beta, int b16,
                                      void *mean, int m16, void *invstd, int i16, float2 *coef)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels)
        return;
    const kv_bn_channel k = kv_bn_forward_channel(sums[c], sums[channels + c], count, eps,
                                                  kv_ld(gamma, g16, c), kv_ld(beta, b16, c));
    kv_st(mean, m16, c, k.mean);
    kv_st(invstd, i16, c, k.invstd);
    coef[c] = make_float2(k.s, k.t);
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
        kv_st(y, y16, i, kv_bn_add(kv_bn_mul(kv_ld(x, x16, i), coef[c].x), coef[c].y));
    }
}

klvae_status_t kv_cuda_batch_norm(kv_backend *be, const kv_tensor *x, const kv_tensor *gamma,
                                  const kv_tensor *beta, const double *sums, double count,
                                  float eps, float momentum, float *running_mean,
                                  float *running_var, kv_tensor *y, kv_tensor *mean,
                                  kv_tensor *invstd)
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
    const int channels = x->shape[1];
    const size_t pixels = (size_t)x->shape[2] * x->shape[3];
    const size_t numel = (size_t)x->shape[0] * channels * pixels;
    double *dsums = NULL;
    float2 *coef = NULL;
    KV_TRY(kv_cuda_from_host(cu, sums, 2 * (size_t)channels * sizeof(double), "batch norm sums",
                             (void **)&dsums));
    klvae_status_t st = kv_cuda_temp(cu, channels * sizeof(float2), "batch norm coefficients",
                                     (void **)&coef);
    cudaError_t e = cudaSuccess;
    if (st == KLVAE_OK) {
        bn_coef_kernel<<<(channels + 255) / 256, 256, 0, cu->stream>>>(
            dsums, count, channels, eps, gamma->data, g16, beta->data, b16, mean->data, m16,
            invstd->data, i16, coef);
        e = cudaGetLastError();
    }
    if (st == KLVAE_OK && e == cudaSuccess && numel) {
        bn_apply_kernel<<<kv_cuda_blocks(numel, cu), 256, 0, cu->stream>>>(
            x->data, x16, coef, y->data, y16, numel, channels, pixels, cu->nhwc && pixels > 1);
        e = cudaGetLastError();
    }
    if (st == KLVAE_OK && e != cudaSuccess)
        st = kv_cuda_fail(cu, e, "batch_norm's kernels");
    /* the host's arrays move on the host, from the same sums, as the CPU's */
    for (int c = 0; st == KLVAE_OK && running_mean && c < channels; c++) {
        const kv_bn_channel k = kv_bn_forward_channel(sums[c], sums[channels + c], count, eps,
                                                      1.0f, 0.0f);
        kv_bn_running(&k, count, momentum, &running_mean[c], &running_var[c]);
    }
    kv_cuda_temp_free(cu, coef);
    kv_cuda_temp_free(cu, dsums);
    return st;
}

/* ---- backward ---- */

struct bn_grad_sums {
    const void *x, *dy, *mean, *invstd;
    int x16, dy16, m16, i16;
    __device__ double2 operator()(size_t i, int, int c) const
    {
        const float xhat = kv_bn_xhat(kv_ld(x, x16, i), kv_ld(mean, m16, c), kv_ld(invstd, i16, c));
        const double dyv = kv_ld(dy, dy16, i);
        return make_double2(dyv, dyv * xhat);
    }
};

/* dgamma[c] += sum dy * xhat, dbeta[c] += sum dy (this batch's share). */
static __global__ void bn_param_grads_kernel(const double *sums, int channels, void *dgamma,
                                             int dg16, void *dbeta, int db16)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels)
        return;
    if (dgamma)
        kv_st(dgamma, dg16, c, kv_ld(dgamma, dg16, c) + (float)sums[channels + c]);
    if (dbeta)
        kv_st(dbeta, db16, c, kv_ld(dbeta, db16, c) + (float)sums[c]);
}

klvae_status_t kv_cuda_batch_norm_backward_stats(kv_backend *be, const kv_tensor *x,
                                                 const kv_tensor *mean, const kv_tensor *invstd,
                                                 const kv_tensor *dy, double *sums,
                                                 kv_tensor *dgamma, kv_tensor *dbeta)
{
    kv_cuda *cu = kv_cuda_of(be);
    const char *op = "batch_norm_backward_stats";
    int x16, m16, i16, dy16, dg16 = 0, db16 = 0;
    KV_TRY(kv_cuda_bf16_flag(cu, op, x, "x", &x16));
    KV_TRY(kv_cuda_bf16_flag(cu, op, mean, "mean", &m16));
    KV_TRY(kv_cuda_bf16_flag(cu, op, invstd, "invstd", &i16));
    KV_TRY(kv_cuda_bf16_flag(cu, op, dy, "dy", &dy16));
    if (dgamma)
        KV_TRY(kv_cuda_bf16_flag(cu, op, dgamma, "dgamma", &dg16));
    if (dbeta)
        KV_TRY(kv_cuda_bf16_flag(cu, op, dbeta, "dbeta", &db16));
    bn_grad_sums f = {x->data, dy->data, mean->data, invstd->data, x16, dy16, m16, i16};
    KV_TRY(bn_host_sums(cu, op, x, f, sums));
    if (!dgamma && !dbeta)
        return KLVAE_OK;
    const int channels = x->shape[1];
    double *dsums = NULL;
    KV_TRY(kv_cuda_from_host(cu, sums, 2 * (size_t)channels * sizeof(double),
                             "batch norm gradient sums", (void **)&dsums));
    bn_param_grads_kernel<<<(channels + 255) / 256, 256, 0, cu->stream>>>(
        dsums, channels, dgamma ? dgamma->data : NULL, dg16, dbeta ? dbeta->data : NULL, db16);
    cudaError_t e = cudaGetLastError();
    kv_cuda_temp_free(cu, dsums);
    return e == cudaSuccess ? KLVAE_OK : kv_cuda_fail(cu, e, "the launch of bn_param_grads_kernel");
}

/* Per channel, what dx needs, from the sums (device copy, 2C) over count. */
static __global__ void bn_grad_coef_kernel(const double *sums, double count, int channels,
                                           const void *gamma, int g16, kv_bn_grad_channel *coef)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels)
        return;
    coef[c] = kv_bn_backward_channel(sums[c], sums[channels + c], count, kv_ld(gamma, g16, c));
}

static __global__ void bn_dx_kernel(const void *x, int x16, const void *dy, int dy16,
                                    const void *mean, int m16, const void *invstd, int i16,
                                    const kv_bn_grad_channel *coef, void *dx, int dx16,
                                    size_t count, int channels, size_t pixels, int nhwc)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x) {
        int n, c;
        kv_storage_nc(i, nhwc, channels, pixels, &n, &c);
        const float is = kv_ld(invstd, i16, c);
        const float xhat = kv_bn_xhat(kv_ld(x, x16, i), kv_ld(mean, m16, c), is);
        kv_st(dx, dx16, i, kv_bn_dx(&coef[c], kv_ld(dy, dy16, i), xhat, is));
    }
}

klvae_status_t kv_cuda_batch_norm_backward(kv_backend *be, const kv_tensor *x,
                                           const kv_tensor *gamma, const kv_tensor *mean,
                                           const kv_tensor *invstd, const kv_tensor *dy,
                                           const double *sums, double count, kv_tensor *dx)
{
    kv_cuda *cu = kv_cuda_of(be);
    const char *op = "batch_norm_backward";
    int x16, g16, m16, i16, dy16, dx16;
    KV_TRY(kv_cuda_bf16_flag(cu, op, x, "x", &x16));
    KV_TRY(kv_cuda_bf16_flag(cu, op, gamma, "gamma", &g16));
    KV_TRY(kv_cuda_bf16_flag(cu, op, mean, "mean", &m16));
    KV_TRY(kv_cuda_bf16_flag(cu, op, invstd, "invstd", &i16));
    KV_TRY(kv_cuda_bf16_flag(cu, op, dy, "dy", &dy16));
    KV_TRY(kv_cuda_bf16_flag(cu, op, dx, "dx", &dx16));
    const int channels = x->shape[1];
    const size_t pixels = (size_t)x->shape[2] * x->shape[3];
    const size_t numel = (size_t)x->shape[0] * channels * pixels;
    double *dsums = NULL;
    kv_bn_grad_channel *coef = NULL;
    KV_TRY(kv_cuda_from_host(cu, sums, 2 * (size_t)channels * sizeof(double),
                             "batch norm gradient sums", (void **)&dsums));
    klvae_status_t st = kv_cuda_temp(cu, channels * sizeof(kv_bn_grad_channel),
                                     "batch norm gradient coefficients", (void **)&coef);
    cudaError_t e = cudaSuccess;
    if (st == KLVAE_OK) {
        bn_grad_coef_kernel<<<(channels + 255) / 256, 256, 0, cu->stream>>>(
            dsums, count, channels, gamma->data, g16, coef);
        e = cudaGetLastError();
    }
    if (st == KLVAE_OK && e == cudaSuccess && numel) {
        bn_dx_kernel<<<kv_cuda_blocks(numel, cu), 256, 0, cu->stream>>>(
            x->data, x16, dy->data, dy16, mean->data, m16, invstd->data, i16, coef, dx->data,
            dx16, numel, channels, pixels, cu->nhwc && pixels > 1);
        e = cudaGetLastError();
    }
    if (st == KLVAE_OK && e != cudaSuccess)
        st = kv_cuda_fail(cu, e, "batch_norm_backward's kernels");
    kv_cuda_temp_free(cu, coef);
    kv_cuda_temp_free(cu, dsums);
    return st;
}
