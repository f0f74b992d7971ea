/* losses.cu — the pixel loss and the PatchGAN logit losses (backend.h,
 * "Family losses"), as src/backend/cpu/losses.c: the sums in double
 * (reduce.cuh) brought to the host, the gradients elementwise. The layout
 * does not matter: every element counts alike. */
#include "reduce.cuh"

struct pixel_args {
    const void *x, *xhat;
    int x16, xhat16, l1;
};

struct pixel_terms {
    pixel_args a;
    __device__ double2 operator()(size_t i) const
    {
        const float d = kv_ld(a.xhat, a.xhat16, i) - kv_ld(a.x, a.x16, i);
        return make_double2(a.l1 ? (double)fabsf(d) : (double)d * d, 0.0);
    }
};

static __global__ void pixel_grad_kernel(pixel_args a, float scale, void *grad, int g16,
                                         size_t count)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x) {
        const float d = kv_ld(a.xhat, a.xhat16, i) - kv_ld(a.x, a.x16, i);
        const float g = a.l1 ? (d > 0.0f ? scale : (d < 0.0f ? -scale : 0.0f)) : scale * 2.0f * d;
        kv_st(grad, g16, i, g);
    }
}

klvae_status_t kv_cuda_pixel_loss(kv_backend *be, const kv_tensor *x, const kv_tensor *xhat,
                                  kv_pixel_loss kind, float scale, double *sum, kv_tensor *grad)
{
    kv_cuda *cu = kv_cuda_of(be);
    pixel_args a = {x->data, xhat->data, 0, 0, kind == KV_LOSS_L1};
    KV_TRY(kv_cuda_bf16_flag(cu, "pixel_loss", x, "x", &a.x16));
    KV_TRY(kv_cuda_bf16_flag(cu, "pixel_loss", xhat, "xhat", &a.xhat16));
    const size_t count = kv_cuda_numel(x);
    if (grad && grad->data && count) {
        int g16;
        KV_TRY(kv_cuda_bf16_flag(cu, "pixel_loss", grad, "grad", &g16));
        pixel_grad_kernel<<<kv_cuda_blocks(count, cu), 256, 0, cu->stream>>>(a, scale, grad->data,
                                                                            g16, count);
        KV_LAUNCHED(cu, pixel_grad_kernel);
    }
    pixel_terms f = {a};
    return kv_cuda_total(cu, count, f, sum, NULL);
}

/* The loss of one logit and its derivative, in double (the CPU's). */
static __device__ __forceinline__ double2 logit_term(int kind, double v)
{
    switch (kind) {
    case KV_LOGITS_HINGE_REAL:
        return make_double2(v < 1.0 ? 1.0 - v : 0.0, v < 1.0 ? -1.0 : 0.0);
    case KV_LOGITS_HINGE_FAKE:
        return make_double2(v > -1.0 ? 1.0 + v : 0.0, v > -1.0 ? 1.0 : 0.0);
    case KV_LOGITS_VANILLA_REAL: /* softplus(-v), PyTorch's threshold 20 */
        return make_double2(-v > 20.0 ? -v : log1p(exp(-v)),
                            -v > 20.0 ? -1.0 : -1.0 / (1.0 + exp(v)));
    case KV_LOGITS_VANILLA_FAKE:
        return make_double2(v > 20.0 ? v : log1p(exp(v)), v > 20.0 ? 1.0 : 1.0 / (1.0 + exp(-v)));
    default: /* generator */
        return make_double2(-v, -1.0);
    }
}

struct logit_terms {
    const void *l;
    int l16, kind;
    __device__ double2 operator()(size_t i) const
    {
        return make_double2(logit_term(kind, kv_ld(l, l16, i)).x, 0.0);
    }
};

static __global__ void logit_grad_kernel(const void *l, int l16, int kind, double factor,
                                         void *grad, int g16, size_t count)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x)
        kv_st(grad, g16, i, (float)(factor * logit_term(kind, kv_ld(l, l16, i)).y));
}

klvae_status_t kv_cuda_logit_loss(kv_backend *be, const kv_tensor *logits, kv_logit_loss kind,
                                  float scale, double *mean, kv_tensor *grad)
{
    kv_cuda *cu = kv_cuda_of(be);
    int l16;
    KV_TRY(kv_cuda_bf16_flag(cu, "logit_loss", logits, "logits", &l16));
    const size_t count = kv_cuda_numel(logits);
    const double inv = count ? 1.0 / (double)count : 0.0;
    if (grad && grad->data && count) {
        int g16;
        KV_TRY(kv_cuda_bf16_flag(cu, "logit_loss", grad, "grad", &g16));
        logit_grad_kernel<<<kv_cuda_blocks(count, cu), 256, 0, cu->stream>>>(
            logits->data, l16, (int)kind, (double)scale * inv, grad->data, g16, count);
        KV_LAUNCHED(cu, logit_grad_kernel);
    }
    logit_terms f = {logits->data, l16, (int)kind};
    double sum = 0.0;
    KV_TRY(kv_cuda_total(cu, count, f, &sum, NULL));
    *mean = sum * inv;
    return KLVAE_OK;
}
