/* group_norm.c — group normalisation with an optional fused activation.
 * Statistics are summed in double (a group of the 512^2 decoder holds
 * millions of values), then applied as y = x * s + t per channel, the form
 * PyTorch uses. */
#include <math.h>
#include <string.h>

#include "backend/cpu/cpu_ops.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define KV_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KV_VECTOR_CLONES
#endif

#define KV_LANES 8

typedef struct gn_job {
    const float *x, *gamma, *beta;
    float *scale, *shift; /* (N, C) */
    float *mean, *rstd;   /* (N, G), optional */
    int channels, groups;
    size_t plane; /* H * W */
    float eps;
} gn_job;

/* Sum and sum of squares in double, in KV_LANES independent lanes so that
 * the loop vectorises without reassociating anything. */
KV_VECTOR_CLONES
static void sum_and_squares(const float *x, size_t count, double *sum_out, double *sumsq_out)
{
    double sum[KV_LANES] = {0}, sumsq[KV_LANES] = {0};
    size_t i = 0;
    for (; i + KV_LANES <= count; i += KV_LANES)
        for (int l = 0; l < KV_LANES; l++) {
            double v = x[i + (size_t)l];
            sum[l] += v;
            sumsq[l] += v * v;
        }
    double s = 0.0, q = 0.0;
    for (; i < count; i++) {
        s += x[i];
        q += (double)x[i] * x[i];
    }
    for (int l = 0; l < KV_LANES; l++) {
        s += sum[l];
        q += sumsq[l];
    }
    *sum_out = s;
    *sumsq_out = q;
}

static void gn_stats_task(void *arg, int task, int thread)
{
    (void)thread;
    const gn_job *j = arg;
    int cpg = j->channels / j->groups;
    int n = task / j->groups, g = task % j->groups;
    const float *x = j->x + ((size_t)n * j->channels + (size_t)g * cpg) * j->plane;
    size_t count = (size_t)cpg * j->plane;
    double sum, sumsq;
    sum_and_squares(x, count, &sum, &sumsq);
    double mean = sum / (double)count;
    double var = sumsq / (double)count - mean * mean;
    if (var < 0.0)
        var = 0.0;
    double rstd = 1.0 / sqrt(var + (double)j->eps);
    if (j->mean) {
        j->mean[task] = (float)mean;
        j->rstd[task] = (float)rstd;
    }
    for (int c = g * cpg; c < (g + 1) * cpg; c++) {
        float s = (float)(rstd * (double)j->gamma[c]);
        j->scale[(size_t)n * j->channels + c] = s;
        j->shift[(size_t)n * j->channels + c] = (float)((double)j->beta[c] - (double)s * mean);
    }
}

/* exp(x) in float for the activations: Cody-Waite reduction by ln 2 and a
 * degree-6 polynomial, about 1 ulp, written so that loops over it
 * vectorise (libm's expf is a call per element). */
static inline float fast_expf(float x)
{
    /* Clamp without branches: exp(-87) is near FLT_MIN, exp(88) near FLT_MAX.
     * Written so that NaN fails both tests and becomes -87: the conversion
     * of k to an integer below is then defined for every input. (SiLU still
     * gives NaN for NaN: it multiplies by v.) */
    x = x > -87.0f ? x : -87.0f;
    x = x < 88.0f ? x : 88.0f;
    /* k = round(x / ln 2) by the 1.5 * 2^23 trick: no call to a rounding
     * function, so the loop vectorises. */
    const float shifter = 12582912.0f;
    float k = (x * 1.44269504f + shifter) - shifter;
    float r = x - k * 0.693145752f; /* ln 2, high part */
    r = r - k * 1.42860677e-06f;    /* ln 2, low part */
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)k + 127) << 23; /* 2^k, k in [-126, 127] */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

KV_VECTOR_CLONES
static void scale_shift(const float *x, float *y, size_t n, float s, float t)
{
    for (size_t i = 0; i < n; i++)
        y[i] = x[i] * s + t;
}

/* 1 / x for x >= 1, without a division (a vector division costs as much as
 * the rest of SiLU together): a bit-level first guess good to about 1/8,
 * then three Newton steps, each squaring the relative error, to about 1 ulp. */
static inline float reciprocal(float x)
{
    int32_t bits;
    memcpy(&bits, &x, sizeof bits);
    bits = 0x7EF311C7 - bits;
    float r;
    memcpy(&r, &bits, sizeof r);
    r = r * (2.0f - x * r);
    r = r * (2.0f - x * r);
    r = r * (2.0f - x * r);
    return r;
}

KV_VECTOR_CLONES
static void scale_shift_silu(const float *x, float *y, size_t n, float s, float t)
{
    for (size_t i = 0; i < n; i++) {
        float v = x[i] * s + t;
        y[i] = v * reciprocal(1.0f + fast_expf(-v));
    }
}

void kv_cpu_scale_shift_act(const float *x, float *y, size_t n, float s, float t,
                            kv_activation act)
{
    if (act == KV_ACT_NONE) {
        scale_shift(x, y, n, s, t);
    } else if (act == KV_ACT_SILU) {
        scale_shift_silu(x, y, n, s, t);
    } else {
        for (size_t i = 0; i < n; i++)
            y[i] = kv_activate(act, x[i] * s + t);
    }
}

klvae_status_t kv_cpu_group_norm_stats(kv_backend *be, const kv_tensor *x, const kv_tensor *gamma,
                                       const kv_tensor *beta, int groups, float eps,
                                       kv_tensor *scale, kv_tensor *shift, kv_tensor *mean,
                                       kv_tensor *rstd)
{
    gn_job j;
    memset(&j, 0, sizeof j);
    j.x = x->data;
    j.gamma = gamma->data;
    j.beta = beta->data;
    j.scale = scale->data;
    j.shift = shift->data;
    j.mean = mean ? mean->data : NULL;
    j.rstd = rstd ? rstd->data : NULL;
    j.channels = x->shape[1];
    j.groups = groups;
    j.plane = (size_t)x->shape[2] * x->shape[3];
    j.eps = eps;
    kv_pool_run_sized(kv_cpu_of(be)->pool, x->shape[0] * groups, gn_stats_task, &j,
                      kv_tensor_numel(x));
    return KLVAE_OK;
}

typedef struct apply_job {
    const float *x, *scale, *shift;
    float *y;
    size_t plane;
    kv_activation act;
} apply_job;

static void apply_task(void *arg, int task, int thread)
{
    (void)thread;
    const apply_job *j = arg;
    kv_cpu_scale_shift_act(j->x + (size_t)task * j->plane, j->y + (size_t)task * j->plane,
                           j->plane, j->scale[task], j->shift[task], j->act);
}

klvae_status_t kv_cpu_group_norm(kv_backend *be, const kv_tensor *x, const kv_tensor *gamma,
                                 const kv_tensor *beta, int groups, float eps, kv_activation act,
                                 kv_tensor *y)
{
    kv_cpu *cpu = kv_cpu_of(be);
    const int batch = x->shape[0], channels = x->shape[1];
    /* The (N, C) scale and shift live in the calling thread's scratch, which
     * tasks of this op do not otherwise use. */
    klvae_status_t st = kv_cpu_reserve_scratch(cpu, 2 * (size_t)batch * channels);
    if (st != KLVAE_OK)
        return st;
    kv_tensor scale = kv_tensor_wrap(cpu->scratch[0], batch, channels, 1, 1);
    kv_tensor shift = kv_tensor_wrap(cpu->scratch[0] + (size_t)batch * channels, batch, channels,
                                     1, 1);
    kv_cpu_group_norm_stats(be, x, gamma, beta, groups, eps, &scale, &shift, NULL, NULL);
    apply_job j = {x->data, scale.data, shift.data, y->data,
                   (size_t)x->shape[2] * x->shape[3], act};
    kv_pool_run_sized(cpu->pool, batch * channels, apply_task, &j, 2 * kv_tensor_numel(x));
    return KLVAE_OK;
}

/* ---- backward ---- */

typedef struct gn_backward_job {
    const float *x, *gamma, *scale, *shift, *mean, *rstd, *da;
    float *dx;
    double *dgamma_part, *dbeta_part; /* (N, C): summed over n afterwards */
    int channels, groups;
    size_t plane;
    kv_activation act;
} gn_backward_job;

/* One (n, group): du = da * act'(u), the per-channel sums for gamma and
 * beta, then dx from the group means of dxh = du * gamma and dxh * xhat. */
static void gn_backward_task(void *arg, int task, int thread)
{
    (void)thread;
    const gn_backward_job *j = arg;
    const int cpg = j->channels / j->groups;
    const int n = task / j->groups, g = task % j->groups;
    const float mean = j->mean[task], rstd = j->rstd[task];
    double sum_dxh = 0.0, sum_dxh_xhat = 0.0;
    for (int c = g * cpg; c < (g + 1) * cpg; c++) {
        const size_t nc = (size_t)n * j->channels + c;
        const float *x = j->x + nc * j->plane, *da = j->da + nc * j->plane;
        float *dx = j->dx + nc * j->plane; /* holds du for now */
        const float s = j->scale[nc], t = j->shift[nc], gamma = j->gamma[c];
        double sum_du = 0.0, sum_du_xhat = 0.0;
        for (size_t i = 0; i < j->plane; i++) {
            float du = j->act == KV_ACT_NONE ? da[i]
                                             : da[i] * kv_activate_grad(j->act, x[i] * s + t);
            float xhat = (x[i] - mean) * rstd;
            dx[i] = du;
            sum_du += du;
            sum_du_xhat += (double)du * xhat;
        }
        j->dgamma_part[nc] = sum_du_xhat;
        j->dbeta_part[nc] = sum_du;
        sum_dxh += sum_du * gamma;
        sum_dxh_xhat += sum_du_xhat * gamma;
    }
    const double count = (double)cpg * (double)j->plane;
    const float m1 = (float)(sum_dxh / count), m2 = (float)(sum_dxh_xhat / count);
    for (int c = g * cpg; c < (g + 1) * cpg; c++) {
        const size_t nc = (size_t)n * j->channels + c;
        const float *x = j->x + nc * j->plane;
        float *dx = j->dx + nc * j->plane;
        const float gamma = j->gamma[c];
        for (size_t i = 0; i < j->plane; i++) {
            float xhat = (x[i] - mean) * rstd;
            dx[i] = rstd * (dx[i] * gamma - m1 - xhat * m2);
        }
    }
}

klvae_status_t kv_cpu_group_norm_backward(kv_backend *be, const kv_tensor *x,
                                          const kv_tensor *gamma, const kv_tensor *scale,
                                          const kv_tensor *shift, const kv_tensor *mean,
                                          const kv_tensor *rstd, int groups, kv_activation act,
                                          const kv_tensor *da, kv_tensor *dx, kv_tensor *dgamma,
                                          kv_tensor *dbeta)
{
    kv_cpu *cpu = kv_cpu_of(be);
    const int batch = x->shape[0], channels = x->shape[1];
    const size_t nc = (size_t)batch * channels;
    klvae_status_t st = kv_cpu_reserve_shared(cpu, 4 * nc);
    if (st != KLVAE_OK)
        return st;
    gn_backward_job j = {x->data,    gamma->data, scale->data, shift->data, mean->data,
                         rstd->data, da->data,    dx->data,    (double *)cpu->shared,
                         (double *)cpu->shared + nc, channels, groups,
                         (size_t)x->shape[2] * x->shape[3], act};
    kv_pool_run_sized(cpu->pool, batch * groups, gn_backward_task, &j, 3 * kv_tensor_numel(x));
    /* Sum over the batch in a fixed order: the same bits for any threads. */
    float *dg = dgamma->data, *db = dbeta->data;
    for (int c = 0; c < channels; c++) {
        double sg = 0.0, sb = 0.0;
        for (int n = 0; n < batch; n++) {
            sg += j.dgamma_part[(size_t)n * channels + c];
            sb += j.dbeta_part[(size_t)n * channels + c];
        }
        dg[c] += (float)sg;
        db[c] += (float)sb;
    }
    return KLVAE_OK;
}
