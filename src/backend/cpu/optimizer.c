/* optimizer.c — Adam, and the sum of squares that gradient clipping and the
 * adaptive GAN weight take norms with. Adam orders its operations exactly
 * as PyTorch's single-tensor implementation:
 *   m += (1 - b1) (g - m);  v = v b2 + (1 - b2) g g;
 *   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps). */
#include <math.h>

#include "backend/cpu/cpu_ops.h"

#define KV_ADAM_CHUNK 65536

typedef struct adam_job {
    float *p, *m, *v;
    const float *g;
    size_t count;
    float b1, b2, eps, step_size, bc2_sqrt;
} adam_job;

static void adam_task(void *arg, int task, int thread)
{
    (void)thread;
    const adam_job *j = arg;
    size_t i0 = (size_t)task * KV_ADAM_CHUNK, i1 = KV_MIN(j->count, i0 + KV_ADAM_CHUNK);
    for (size_t i = i0; i < i1; i++) {
        float g = j->g[i];
        float m = j->m[i] + (1.0f - j->b1) * (g - j->m[i]);
        float v = j->v[i] * j->b2 + (1.0f - j->b2) * g * g;
        j->m[i] = m;
        j->v[i] = v;
        float denom = sqrtf(v) / j->bc2_sqrt + j->eps;
        j->p[i] -= j->step_size * (m / denom);
    }
}

klvae_status_t kv_cpu_adam(kv_backend *be, kv_tensor *param, const kv_tensor *grad, kv_tensor *m,
                           kv_tensor *v, float lr, float beta1, float beta2, float eps,
                           int64_t step)
{
    kv_cpu_wrote(be, param);
    /* The bias corrections in double, as Python computes them. */
    double bc1 = 1.0 - pow((double)beta1, (double)step);
    double bc2 = 1.0 - pow((double)beta2, (double)step);
    adam_job j = {param->data, m->data, v->data, grad->data, kv_tensor_numel(param), beta1, beta2,
                  eps, (float)((double)lr / bc1), (float)sqrt(bc2)};
    int tasks = (int)((j.count + KV_ADAM_CHUNK - 1) / KV_ADAM_CHUNK);
    kv_pool_run(kv_cpu_of(be)->pool, tasks, adam_task, &j);
    return KLVAE_OK;
}

typedef struct reduce_job {
    const float *x;
    size_t count;
    double *partial;
} reduce_job;

static void sum_squares_task(void *arg, int task, int thread)
{
    (void)thread;
    const reduce_job *j = arg;
    size_t i0, i1;
    kv_cpu_chunk_range(j->count, task, &i0, &i1);
    double s = 0.0;
    for (size_t i = i0; i < i1; i++)
        s += (double)j->x[i] * j->x[i];
    j->partial[task] = s;
}

klvae_status_t kv_cpu_sum_squares(kv_backend *be, const kv_tensor *x, double *sum)
{
    kv_cpu *cpu = kv_cpu_of(be);
    size_t count = kv_tensor_numel(x);
    int chunks = kv_cpu_chunks(count);
    klvae_status_t st = kv_cpu_reserve_shared(cpu, 2 * (size_t)KV_MAX(chunks, 1));
    if (st != KLVAE_OK)
        return st;
    reduce_job j = {x->data, count, (double *)cpu->shared};
    kv_pool_run(cpu->pool, chunks, sum_squares_task, &j);
    double s = 0.0;
    for (int c = 0; c < chunks; c++) /* fixed order */
        s += j.partial[c];
    *sum = s;
    return KLVAE_OK;
}
