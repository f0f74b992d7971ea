/* group_norm.c — group normalisation with an optional fused activation.
 * Statistics are summed in double (a group of the 512^2 decoder holds
 * millions of values), then applied as y = x * s + t per channel, the form
 * PyTorch uses. */
#include <math.h>
#include <string.h>

#include "cpu_ops.h"

typedef struct gn_job {
    const float *x, *gamma, *beta;
    float *y;
    int channels, groups;
    size_t plane; /* H * W */
    float eps;
    kv_activation act;
    double *mean, *rstd; /* per (n, group) */
} gn_job;

float kv_cpu_activate(kv_activation act, float v)
{
    switch (act) {
    case KV_ACT_NONE: return v;
    case KV_ACT_SILU: return v / (1.0f + expf(-v));
    case KV_ACT_GELU: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case KV_ACT_RELU: return v > 0.0f ? v : 0.0f;
    case KV_ACT_MISH: {
        /* softplus with PyTorch's threshold of 20 */
        float sp = v > 20.0f ? v : log1pf(expf(v));
        return v * tanhf(sp);
    }
    }
    return v;
}

static void gn_stats_task(void *arg, int task, int thread)
{
    (void)thread;
    const gn_job *j = arg;
    int cpg = j->channels / j->groups;
    int n = task / j->groups, g = task % j->groups;
    const float *x = j->x + ((size_t)n * j->channels + (size_t)g * cpg) * j->plane;
    size_t count = (size_t)cpg * j->plane;
    double sum = 0.0, sumsq = 0.0;
    for (size_t i = 0; i < count; i++) {
        double v = x[i];
        sum += v;
        sumsq += v * v;
    }
    double mean = sum / (double)count;
    double var = sumsq / (double)count - mean * mean;
    if (var < 0.0)
        var = 0.0;
    j->mean[task] = mean;
    j->rstd[task] = 1.0 / sqrt(var + (double)j->eps);
}

static void gn_apply_task(void *arg, int task, int thread)
{
    (void)thread;
    const gn_job *j = arg;
    int cpg = j->channels / j->groups;
    int n = task / j->channels, c = task % j->channels;
    int stat = n * j->groups + c / cpg;
    float s = (float)(j->rstd[stat] * (double)j->gamma[c]);
    float t = (float)((double)j->beta[c] - (double)s * j->mean[stat]);
    const float *x = j->x + (size_t)task * j->plane;
    float *y = j->y + (size_t)task * j->plane;
    if (j->act == KV_ACT_NONE) {
        for (size_t i = 0; i < j->plane; i++)
            y[i] = x[i] * s + t;
    } else if (j->act == KV_ACT_SILU) {
        for (size_t i = 0; i < j->plane; i++) {
            float v = x[i] * s + t;
            y[i] = v / (1.0f + expf(-v));
        }
    } else {
        for (size_t i = 0; i < j->plane; i++)
            y[i] = kv_cpu_activate(j->act, x[i] * s + t);
    }
}

klvae_status_t kv_cpu_group_norm(kv_backend *be, const kv_tensor *x, const kv_tensor *gamma,
                                 const kv_tensor *beta, int groups, float eps, kv_activation act,
                                 kv_tensor *y)
{
    kv_cpu *cpu = kv_cpu_of(be);
    gn_job j;
    memset(&j, 0, sizeof j);
    int batch = x->shape[0];
    j.x = x->data;
    j.y = y->data;
    j.gamma = gamma->data;
    j.beta = beta->data;
    j.channels = x->shape[1];
    j.groups = groups;
    j.plane = (size_t)x->shape[2] * x->shape[3];
    j.eps = eps;
    j.act = act;
    size_t nstats = (size_t)batch * groups;
    klvae_status_t st = kv_cpu_reserve_scratch(cpu, 4 * nstats);
    if (st != KLVAE_OK)
        return st;
    /* The statistics live in the calling thread's scratch, which tasks of
     * this op do not otherwise use. */
    j.mean = (double *)cpu->scratch[0];
    j.rstd = j.mean + nstats;
    kv_pool_run(cpu->pool, (int)nstats, gn_stats_task, &j);
    kv_pool_run(cpu->pool, batch * j.channels, gn_apply_task, &j);
    return KLVAE_OK;
}
