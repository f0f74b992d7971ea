/* optimizer.cu — Adam as one fused kernel per tensor, and the sum of
 * squares that gradient clipping and the adaptive GAN weight take norms
 * with, as src/backend/cpu/optimizer.c: the same operations in the same
 * order as PyTorch's single-tensor Adam,
 *   m += (1 - b1) (g - m);  v = v b2 + (1 - b2) g g;
 *   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps),
 * with the bias corrections computed on the host in double. The parameter
 * may be stored in bf16 (then it is rounded after the update); gradients and
 * moments are the trainer's float32 tensors. */
#include <math.h>

#include "reduce.cuh"

struct adam_args {
    void *p;
    const void *g;
    float *m, *v;
    int p16, g16;
    float b1, b2, eps, step_size, bc2_sqrt;
};

static __global__ void adam_kernel(adam_args a, size_t count)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x) {
        const float g = kv_ld(a.g, a.g16, i);
        const float m = __fadd_rn(a.m[i], __fmul_rn(1.0f - a.b1, g - a.m[i]));
        const float v = __fadd_rn(__fmul_rn(a.v[i], a.b2), __fmul_rn(__fmul_rn(1.0f - a.b2, g), g));
        a.m[i] = m;
        a.v[i] = v;
        const float denom = __fadd_rn(__fdiv_rn(sqrtf(v), a.bc2_sqrt), a.eps);
        const float p = kv_ld(a.p, a.p16, i);
        kv_st(a.p, a.p16, i, p - __fmul_rn(a.step_size, __fdiv_rn(m, denom)));
    }
}

klvae_status_t kv_cuda_adam(kv_backend *be, kv_tensor *param, const kv_tensor *grad, kv_tensor *m,
                            kv_tensor *v, float lr, float beta1, float beta2, float eps,
                            int64_t step)
{
    kv_cuda *cu = kv_cuda_of(be);
    kv_cuda_dtype tp, tg, tm, tv;
    KV_TRY(kv_cuda_dtype_of(cu, param->data, "adam", "the parameter", &tp));
    KV_TRY(kv_cuda_dtype_of(cu, grad->data, "adam", "the gradient", &tg));
    KV_TRY(kv_cuda_dtype_of(cu, m->data, "adam", "m", &tm));
    KV_TRY(kv_cuda_dtype_of(cu, v->data, "adam", "v", &tv));
    if (tm != KV_CUDA_F32 || tv != KV_CUDA_F32)
        return kv_cuda_error(cu, KLVAE_ERR_INTERNAL,
                             "adam: the moments must be float32 tensors (KV_STORAGE_FLOAT32)");
    const size_t count = kv_cuda_numel(param);
    if (!count)
        return KLVAE_OK;
    /* the bias corrections in double, as Python computes them */
    const double bc1 = 1.0 - pow((double)beta1, (double)step);
    const double bc2 = 1.0 - pow((double)beta2, (double)step);
    adam_args a = {param->data, grad->data, (float *)m->data, (float *)v->data,
                   tp == KV_CUDA_BF16, tg == KV_CUDA_BF16, beta1, beta2, eps,
                   (float)((double)lr / bc1), (float)sqrt(bc2)};
    adam_kernel<<<kv_cuda_blocks(count, cu), 256, 0, cu->stream>>>(a, count);
    KV_LAUNCHED(cu, adam_kernel);
    return KLVAE_OK;
}

struct squares {
    const void *x;
    int x16;
    __device__ double2 operator()(size_t i) const
    {
        const double v = kv_ld(x, x16, i);
        return make_double2(v * v, 0.0);
    }
};

klvae_status_t kv_cuda_sum_squares(kv_backend *be, const kv_tensor *x, double *sum)
{
    kv_cuda *cu = kv_cuda_of(be);
    kv_cuda_dtype d;
    KV_TRY(kv_cuda_dtype_of(cu, x->data, "sum_squares", "x", &d));
    squares f = {x->data, d == KV_CUDA_BF16};
    return kv_cuda_total(cu, kv_cuda_numel(x), f, sum, NULL);
}
