/* group_norm_backward.cu — the gradient of act(group_norm(x)) (backend.h,
 * "Family group_norm"), in four steps that mirror src/backend/cpu/group_norm.c:
 *
 *   1. per (sample, channel), over the pixels: sum du and sum du * xhat,
 *      with u = x * scale + shift, du = da * act'(u), xhat = (x - mean) * rstd
 *      (reduce.cuh: double, fixed order);
 *   2. per (sample, group): m1 = mean of du * gamma, m2 = mean of du * gamma
 *      * xhat over the group;
 *   3. per element: dx = rstd * (du * gamma - m1 - xhat * m2);
 *   4. per channel: dgamma += sum du * xhat, dbeta += sum du over the batch.
 *
 * Scale, shift, mean and rstd may be float32 or compute tensors; x, da and dx
 * are compute tensors; dgamma and dbeta the trainer's gradients. */
#include "reduce.cuh"

struct gn_grad_args {
    const void *x, *da, *scale, *shift, *mean, *rstd, *gamma;
    int x16, da16, scale16, shift16, mean16, rstd16, gamma16;
    int channels, groups, act, nhwc;
    size_t pixels;
};

static __device__ __forceinline__ float gn_du(const gn_grad_args &a, size_t i, int n, int c,
                                              float *xhat)
{
    const size_t nc = (size_t)n * a.channels + c, ng = (size_t)n * a.groups + c /
                                                                 (a.channels / a.groups);
    const float x = kv_ld(a.x, a.x16, i);
    const float da = kv_ld(a.da, a.da16, i);
    *xhat = (x - kv_ld(a.mean, a.mean16, ng)) * kv_ld(a.rstd, a.rstd16, ng);
    if (a.act == KV_ACT_NONE)
        return da;
    const float u = x * kv_ld(a.scale, a.scale16, nc) + kv_ld(a.shift, a.shift16, nc);
    return da * kv_activate_grad(a.act, u);
}

struct gn_grad_sums {
    gn_grad_args a;
    __device__ double2 operator()(size_t i, int n, int c) const
    {
        float xhat;
        const float du = gn_du(a, i, n, c, &xhat);
        return make_double2((double)du, (double)du * xhat);
    }
};

/* Step 2: one thread per (sample, group); m[ng] = (m1, m2). */
static __global__ void gn_group_means_kernel(const double2 *sums, gn_grad_args a, int batch,
                                             float2 *m)
{
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= batch * a.groups)
        return;
    const int cpg = a.channels / a.groups, n = idx / a.groups, g = idx % a.groups;
    double s1 = 0.0, s2 = 0.0;
    for (int c = g * cpg; c < (g + 1) * cpg; c++) {
        const double gamma = kv_ld(a.gamma, a.gamma16, c);
        s1 += sums[(size_t)n * a.channels + c].x * gamma;
        s2 += sums[(size_t)n * a.channels + c].y * gamma;
    }
    const double count = (double)cpg * (double)a.pixels;
    m[idx] = make_float2((float)(s1 / count), (float)(s2 / count));
}

/* Step 3. */
static __global__ void gn_dx_kernel(gn_grad_args a, const float2 *m, void *dx, int dx16,
                                    size_t count)
{
    const int cpg = a.channels / a.groups;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x) {
        int n, c;
        kv_storage_nc(i, a.nhwc, a.channels, a.pixels, &n, &c);
        float xhat;
        const float du = gn_du(a, i, n, c, &xhat);
        const size_t ng = (size_t)n * a.groups + c / cpg;
        const float rstd = kv_ld(a.rstd, a.rstd16, ng);
        kv_st(dx, dx16, i, rstd * (du * kv_ld(a.gamma, a.gamma16, c) - m[ng].x - xhat * m[ng].y));
    }
}

/* Step 4: one thread per channel, the batch in order. */
static __global__ void gn_param_grads_kernel(const double2 *sums, int batch, int channels,
                                             void *dgamma, int dg16, void *dbeta, int db16)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels)
        return;
    double sg = 0.0, sb = 0.0;
    for (int n = 0; n < batch; n++) {
        sb += sums[(size_t)n * channels + c].x;
        sg += sums[(size_t)n * channels + c].y;
    }
    kv_st(dgamma, dg16, c, kv_ld(dgamma, dg16, c) + (float)sg);
    kv_st(dbeta, db16, c, kv_ld(dbeta, db16, c) + (float)sb);
}

klvae_status_t kv_cuda_group_norm_backward(kv_backend *be, const kv_tensor *x,
                                           const kv_tensor *gamma, const kv_tensor *scale,
                                           const kv_tensor *shift, const kv_tensor *mean,
                                           const kv_tensor *rstd, int groups, kv_activation act,
                                           const kv_tensor *da, kv_tensor *dx, kv_tensor *dgamma,
                                           kv_tensor *dbeta)
{
    kv_cuda *cu = kv_cuda_of(be);
    gn_grad_args a;
    memset(&a, 0, sizeof a);
    int dx16, dg16, db16;
    KV_TRY(kv_cuda_bf16_flag(cu, "group_norm_backward", x, "x", &a.x16));
    KV_TRY(kv_cuda_bf16_flag(cu, "group_norm_backward", da, "da", &a.da16));
    KV_TRY(kv_cuda_bf16_flag(cu, "group_norm_backward", scale, "scale", &a.scale16));
    KV_TRY(kv_cuda_bf16_flag(cu, "group_norm_backward", shift, "shift", &a.shift16));
    KV_TRY(kv_cuda_bf16_flag(cu, "group_norm_backward", mean, "mean", &a.mean16));
    KV_TRY(kv_cuda_bf16_flag(cu, "group_norm_backward", rstd, "rstd", &a.rstd16));
    KV_TRY(kv_cuda_bf16_flag(cu, "group_norm_backward", gamma, "gamma", &a.gamma16));
    KV_TRY(kv_cuda_bf16_flag(cu, "group_norm_backward", dx, "dx", &dx16));
    KV_TRY(kv_cuda_bf16_flag(cu, "group_norm_backward", dgamma, "dgamma", &dg16));
    KV_TRY(kv_cuda_bf16_flag(cu, "group_norm_backward", dbeta, "dbeta", &db16));
    a.x = x->data;
    a.da = da->data;
    a.scale = scale->data;
    a.shift = shift->data;
    a.mean = mean->data;
    a.rstd = rstd->data;
    a.gamma = gamma->data;
    const int batch = x->shape[0];
    a.channels = x->shape[1];
    a.groups = groups;
    a.act = (int)act;
    a.pixels = (size_t)x->shape[2] * x->shape[3];
    a.nhwc = cu->nhwc && a.pixels > 1;
    const size_t planes = (size_t)batch * a.channels, count = planes * a.pixels;
    double2 *sums = NULL;
    float2 *m = NULL;
    KV_TRY(kv_cuda_temp(cu, planes * sizeof(double2), "group norm gradient sums",
                        (void **)&sums));
    klvae_status_t st = kv_cuda_temp(cu, (size_t)batch * groups * sizeof(float2),
                                     "group norm gradient means", (void **)&m);
    gn_grad_sums f = {a};
    if (st == KLVAE_OK)
        st = kv_cuda_plane_sums(cu, batch, a.channels, x->shape[2], x->shape[3], f, sums);
    cudaError_t e = cudaSuccess;
    if (st == KLVAE_OK) {
        gn_group_means_kernel<<<(batch * groups + 255) / 256, 256, 0, cu->stream>>>(sums, a,
                                                                                   batch, m);
        e = cudaGetLastError();
    }
    if (st == KLVAE_OK && e == cudaSuccess) {
        gn_dx_kernel<<<kv_cuda_blocks(count, cu), 256, 0, cu->stream>>>(a, m, dx->data, dx16,
                                                                        count);
        e = cudaGetLastError();
    }
    if (st == KLVAE_OK && e == cudaSuccess) {
        gn_param_grads_kernel<<<(a.channels + 255) / 256, 256, 0, cu->stream>>>(
            sums, batch, a.channels, dgamma->data, dg16, dbeta->data, db16);
        e = cudaGetLastError();
    }
    if (st == KLVAE_OK && e != cudaSuccess)
        st = kv_cuda_fail(cu, e, "group_norm_backward's kernels");
    kv_cuda_temp_free(cu, m);
    kv_cuda_temp_free(cu, sums);
    return st;
}
