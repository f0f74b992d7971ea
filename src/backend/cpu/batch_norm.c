/* batch_norm.c — training-mode batch normalisation (the PatchGAN's): batch
 * statistics per channel over (N, H, W), summed in double. The statistics
 * and their use are separate ops so that data-parallel training can add the
 * sums of every process's batch in between (backend.h, Family batch_norm). */
#include <math.h>
#include <string.h>

#include "backend/cpu/cpu_ops.h"

typedef struct bn_job {
    const float *x, *gamma, *beta, *dy, *mean, *invstd;
    float *y, *dx;
    float *out_mean, *out_invstd, *dgamma, *dbeta;
    float *running_mean, *running_var;
    const double *sums;
    double *out_sums;
    double count;
    int batch, channels;
    size_t plane;
    float eps, momentum;
} bn_job;

static void bn_job_shape(bn_job *j, const kv_tensor *x)
{
    j->batch = x->shape[0];
    j->channels = x->shape[1];
    j->plane = (size_t)x->shape[2] * x->shape[3];
}

static void bn_stats_task(void *arg, int c, int thread)
{
    (void)thread;
    const bn_job *j = arg;
    double sum = 0.0, sumsq = 0.0;
    for (int n = 0; n < j->batch; n++) {
        const float *x = j->x + ((size_t)n * j->channels + c) * j->plane;
        for (size_t i = 0; i < j->plane; i++) {
            sum += x[i];
            sumsq += (double)x[i] * x[i];
        }
    }
    j->out_sums[c] = sum;
    j->out_sums[j->channels + c] = sumsq;
}

klvae_status_t kv_cpu_batch_norm_stats(kv_backend *be, const kv_tensor *x, double *sums)
{
    bn_job j;
    memset(&j, 0, sizeof j);
    j.x = x->data;
    j.out_sums = sums;
    bn_job_shape(&j, x);
    kv_pool_run(kv_cpu_of(be)->pool, j.channels, bn_stats_task, &j);
    return KLVAE_OK;
}

static void bn_forward_task(void *arg, int c, int thread)
{
    (void)thread;
    const bn_job *j = arg;
    const double count = j->count;
    double mean = j->sums[c] / count, var = j->sums[j->channels + c] / count - mean * mean;
    if (var < 0.0)
        var = 0.0;
    const float invstd = (float)(1.0 / sqrt(var + (double)j->eps));
    j->out_mean[c] = (float)mean;
    j->out_invstd[c] = invstd;
    const float s = invstd * j->gamma[c], t = j->beta[c] - (float)mean * s;
    for (int n = 0; n < j->batch; n++) {
        const float *x = j->x + ((size_t)n * j->channels + c) * j->plane;
        float *y = j->y + ((size_t)n * j->channels + c) * j->plane;
        for (size_t i = 0; i < j->plane; i++)
            y[i] = x[i] * s + t;
    }
    if (j->running_mean) {
        double unbiased = count > 1.0 ? var * count / (count - 1.0) : var;
        j->running_mean[c] = (1.0f - j->momentum) * j->running_mean[c] + j->momentum * (float)mean;
        j->running_var[c] =
            (1.0f - j->momentum) * j->running_var[c] + j->momentum * (float)unbiased;
    }
}

klvae_status_t kv_cpu_batch_norm(kv_backend *be, const kv_tensor *x, const kv_tensor *gamma,
                                 const kv_tensor *beta, const double *sums, double count,
                                 float eps, float momentum, float *running_mean,
                                 float *running_var, kv_tensor *y, kv_tensor *mean,
                                 kv_tensor *invstd)
{
    bn_job j;
    memset(&j, 0, sizeof j);
    j.x = x->data;
    j.gamma = gamma->data;
    j.beta = beta->data;
    j.y = y->data;
    j.out_mean = mean->data;
    j.out_invstd = invstd->data;
    j.running_mean = running_mean;
    j.running_var = running_var;
    j.sums = sums;
    j.count = count;
    bn_job_shape(&j, x);
    j.eps = eps;
    j.momentum = momentum;
    kv_pool_run(kv_cpu_of(be)->pool, j.channels, bn_forward_task, &j);
    return KLVAE_OK;
}

static void bn_backward_stats_task(void *arg, int c, int thread)
{
    (void)thread;
    const bn_job *j = arg;
    const float mean = j->mean[c], invstd = j->invstd[c];
    double sum_dy = 0.0, sum_dy_xhat = 0.0;
    for (int n = 0; n < j->batch; n++) {
        const size_t base = ((size_t)n * j->channels + c) * j->plane;
        for (size_t i = 0; i < j->plane; i++) {
            float xhat = (j->x[base + i] - mean) * invstd;
            sum_dy += j->dy[base + i];
            sum_dy_xhat += (double)j->dy[base + i] * xhat;
        }
    }
    j->out_sums[c] = sum_dy;
    j->out_sums[j->channels + c] = sum_dy_xhat;
    if (j->dgamma)
        j->dgamma[c] += (float)sum_dy_xhat;
    if (j->dbeta)
        j->dbeta[c] += (float)sum_dy;
}

klvae_status_t kv_cpu_batch_norm_backward_stats(kv_backend *be, const kv_tensor *x,
                                                const kv_tensor *mean, const kv_tensor *invstd,
                                                const kv_tensor *dy, double *sums,
                                                kv_tensor *dgamma, kv_tensor *dbeta)
{
    bn_job j;
    memset(&j, 0, sizeof j);
    j.x = x->data;
    j.mean = mean->data;
    j.invstd = invstd->data;
    j.dy = dy->data;
    j.out_sums = sums;
    j.dgamma = dgamma ? dgamma->data : NULL;
    j.dbeta = dbeta ? dbeta->data : NULL;
    bn_job_shape(&j, x);
    kv_pool_run(kv_cpu_of(be)->pool, j.channels, bn_backward_stats_task, &j);
    return KLVAE_OK;
}

static void bn_backward_task(void *arg, int c, int thread)
{
    (void)thread;
    const bn_job *j = arg;
    const float mean = j->mean[c], invstd = j->invstd[c], gamma = j->gamma[c];
    const double sum_dy = j->sums[c], sum_dy_xhat = j->sums[j->channels + c];
    const float m1 = (float)(sum_dy * gamma / j->count),
                m2 = (float)(sum_dy_xhat * gamma / j->count);
    for (int n = 0; n < j->batch; n++) {
        const size_t base = ((size_t)n * j->channels + c) * j->plane;
        for (size_t i = 0; i < j->plane; i++) {
            float xhat = (j->x[base + i] - mean) * invstd;
            j->dx[base + i] = invstd * (j->dy[base + i] * gamma - m1 - xhat * m2);
        }
    }
}

klvae_status_t kv_cpu_batch_norm_backward(kv_backend *be, const kv_tensor *x,
                                          const kv_tensor *gamma, const kv_tensor *mean,
                                          const kv_tensor *invstd, const kv_tensor *dy,
                                          const double *sums, double count, kv_tensor *dx)
{
    bn_job j;
    memset(&j, 0, sizeof j);
    j.x = x->data;
    j.gamma = gamma->data;
    j.mean = mean->data;
    j.invstd = invstd->data;
    j.dy = dy->data;
    j.dx = dx->data;
    j.sums = sums;
    j.count = count;
    bn_job_shape(&j, x);
    kv_pool_run(kv_cpu_of(be)->pool, j.channels, bn_backward_task, &j);
    return KLVAE_OK;
}
