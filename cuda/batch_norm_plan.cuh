/* batch_norm_plan.cuh — the per-channel arithmetic of cuda/batch_norm.cu:
 * what the statistics (sums over count values, this batch's or every
 * process's) make of a channel in the forward and the backward, and the
 * running statistics. Plain C and __host__ __device__, the same operations
 * in the same order as src/backend/cpu/batch_norm.c, so that
 * tests/test_cuda_host.c checks them against the CPU backend bit for bit. */
#ifndef KV_BATCH_NORM_PLAN_CUH
#define KV_BATCH_NORM_PLAN_CUH

#include <math.h>

#include "base/numerics.h"

/* a * b and a + b rounded on their own: no fused multiply-add on the device,
 * as the CPU build (-ffp-contract=off) has none. */
static inline KV_HD float kv_bn_mul(float a, float b)
{
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

static inline KV_HD float kv_bn_add(float a, float b)
{
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

/* One channel of the forward: y = x * s + t. */
typedef struct kv_bn_channel {
    float mean, invstd; /* saved for the backward */
    float s, t;
    double var; /* the biased variance, for the running statistics */
} kv_bn_channel;

/* From the channel's sum and sum of squares over count values: mean = sum /
 * count, var = max(sumsq / count - mean^2, 0), invstd = 1/sqrt(var + eps),
 * s = invstd * gamma, t = beta - mean * s. */
static inline KV_HD kv_bn_channel kv_bn_forward_channel(double sum, double sumsq, double count,
                                                        float eps, float gamma, float beta)
{
    kv_bn_channel k;
    const double mean = sum / count;
    k.var = sumsq / count - mean * mean;
    if (k.var < 0.0)
        k.var = 0.0;
    k.mean = (float)mean;
    k.invstd = (float)(1.0 / sqrt(k.var + (double)eps));
    k.s = kv_bn_mul(k.invstd, gamma);
    k.t = beta - kv_bn_mul(k.mean, k.s);
    return k;
}

/* The running statistics of the channel move by momentum towards the mean
 * and the unbiased variance var * count / (count - 1). */
static inline KV_HD void kv_bn_running(const kv_bn_channel *k, double count, float momentum,
                                       float *running_mean, float *running_var)
{
    const double unbiased = count > 1.0 ? k->var * count / (count - 1.0) : k->var;
    *running_mean = kv_bn_add(kv_bn_mul(1.0f - momentum, *running_mean),
                              kv_bn_mul(momentum, k->mean));
    *running_var = kv_bn_add(kv_bn_mul(1.0f - momentum, *running_var),
                             kv_bn_mul(momentum, (float)unbiased));
}

/* xhat of a value of the channel. */
static inline KV_HD float kv_bn_xhat(float x, float mean, float invstd)
{
    return kv_bn_mul(x - mean, invstd);
}

/* One channel of the backward, from the sums of dy and dy * xhat over the
 * count values the forward normalised: dx = invstd * (dy * gamma - m1 -
 * xhat * m2). */
typedef struct kv_bn_grad_channel {
    float gamma, m1, m2;
} kv_bn_grad_channel;

static inline KV_HD kv_bn_grad_channel kv_bn_backward_channel(double sum_dy, double sum_dy_xhat,
                                                              double count, float gamma)
{
    kv_bn_grad_channel k;
    k.gamma = gamma;
    k.m1 = (float)(sum_dy * gamma / count);
    k.m2 = (float)(sum_dy_xhat * gamma / count);
    return k;
}

static inline KV_HD float kv_bn_dx(const kv_bn_grad_channel *k, float dy, float xhat,
                                   float invstd)
{
    return kv_bn_mul(invstd, (kv_bn_mul(dy, k->gamma) - k->m1) - kv_bn_mul(xhat, k->m2));
}

#endif /* KV_BATCH_NORM_PLAN_CUH */
