/* posterior.c — splitting the encoder's moments into mean and logvar, and
 * drawing z from the posterior with the shared Philox generator. */
#include <string.h>

#include "backend/cpu/cpu_ops.h"
#include "base/philox.h"

klvae_status_t kv_cpu_posterior_split(kv_backend *be, const kv_tensor *moments, kv_tensor *mean,
                                      kv_tensor *logvar)
{
    (void)be;
    const int batch = moments->shape[0], z = mean->shape[1];
    const size_t block = (size_t)z * moments->shape[2] * moments->shape[3];
    const float *src = moments->data;
    for (int n = 0; n < batch; n++) {
        const float *m = src + (size_t)n * 2 * block;
        memcpy((float *)mean->data + (size_t)n * block, m, block * sizeof(float));
        if (logvar && logvar->data) {
            float *lv = (float *)logvar->data + (size_t)n * block;
            for (size_t i = 0; i < block; i++) {
                float v = m[block + i];
                lv[i] = kv_clamp_logvar(v);
            }
        }
    }
    return KLVAE_OK;
}

#define KV_SAMPLE_CHUNK 8192 /* even: with an even first, a task never splits a pair */

typedef struct sample_job {
    const float *mean, *logvar;
    float *z;
    size_t count;
    uint64_t seed, first;
} sample_job;

static void sample_task(void *arg, int task, int thread)
{
    (void)thread;
    const sample_job *j = arg;
    size_t i0 = (size_t)task * KV_SAMPLE_CHUNK;
    size_t i1 = KV_MIN(j->count, i0 + KV_SAMPLE_CHUNK);
    float eps[2];
    uint64_t pair = UINT64_MAX;
    for (size_t i = i0; i < i1; i++) {
        const uint64_t at = j->first + i; /* Philox index: pair at / 2, half at % 2 */
        if (at >> 1 != pair) {
            pair = at >> 1;
            kv_philox_normal_pair(j->seed, pair, &eps[0], &eps[1]);
        }
        float std = kv_posterior_std(j->logvar[i]);
        j->z[i] = j->mean[i] + std * eps[at & 1];
    }
}

klvae_status_t kv_cpu_gaussian_sample(kv_backend *be, const kv_tensor *mean,
                                      const kv_tensor *logvar, uint64_t seed, uint64_t first,
                                      kv_tensor *z)
{
    sample_job j = {mean->data, logvar->data, z->data, kv_tensor_numel(z), seed, first};
    int tasks = (int)((j.count + KV_SAMPLE_CHUNK - 1) / KV_SAMPLE_CHUNK);
    kv_pool_run(kv_cpu_of(be)->pool, tasks, sample_task, &j);
    return KLVAE_OK;
}

/* ---- training ---- */

typedef struct posterior_back_job {
    const float *moments, *dz;
    float *dmoments;
    int z;
    size_t plane;
    float kl_weight;
    bool sampled;
    uint64_t seed, first;
} posterior_back_job;

static void posterior_backward_task(void *arg, int task, int thread)
{
    (void)thread;
    const posterior_back_job *j = arg;
    const int n = task / j->z, c = task % j->z;
    const float *mu = j->moments + ((size_t)n * 2 * j->z + c) * j->plane;
    const float *lv = mu + (size_t)j->z * j->plane;
    const float *dz = j->dz + ((size_t)n * j->z + c) * j->plane;
    float *dmu = j->dmoments + ((size_t)n * 2 * j->z + c) * j->plane;
    float *dlv = dmu + (size_t)j->z * j->plane;
    const uint64_t first = j->first + (uint64_t)task * j->plane; /* Philox index of the plane */
    for (size_t p = 0; p < j->plane; p++) {
        float l = lv[p];
        float s = kv_clamp_logvar(l);
        float ds = j->kl_weight * 0.5f * (float)(exp((double)s) - 1.0);
        if (j->sampled)
            ds += dz[p] * 0.5f * kv_posterior_std(l) * kv_philox_normal(j->seed, first + p);
        dmu[p] = dz[p] + j->kl_weight * mu[p];
        dlv[p] = kv_logvar_unclamped(l) ? ds : 0.0f;
    }
}

klvae_status_t kv_cpu_posterior_backward(kv_backend *be, const kv_tensor *moments,
                                         const kv_tensor *dz, float kl_weight, bool sampled,
                                         uint64_t seed, uint64_t first, kv_tensor *dmoments)
{
    posterior_back_job j = {moments->data, dz->data, dmoments->data, dz->shape[1],
                            (size_t)dz->shape[2] * dz->shape[3], kl_weight, sampled, seed, first};
    kv_pool_run(kv_cpu_of(be)->pool, dz->shape[0] * dz->shape[1], posterior_backward_task, &j);
    return KLVAE_OK;
}

klvae_status_t kv_cpu_kl_sum(kv_backend *be, const kv_tensor *moments, double *sum)
{
    (void)be;
    const int batch = moments->shape[0], z = moments->shape[1] / 2;
    const size_t plane = (size_t)moments->shape[2] * moments->shape[3];
    double s = 0.0;
    for (int n = 0; n < batch; n++)
        for (int c = 0; c < z; c++) {
            const float *mu = (const float *)moments->data + ((size_t)n * 2 * z + c) * plane;
            const float *lv = mu + (size_t)z * plane;
            for (size_t p = 0; p < plane; p++) {
                double l = kv_clamp_logvar(lv[p]);
                s += 0.5 * ((double)mu[p] * mu[p] + exp(l) - 1.0 - l);
            }
        }
    *sum = s;
    return KLVAE_OK;
}
