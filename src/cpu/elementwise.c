/* elementwise.c — add and nearest 2x upsampling. */
#include <string.h>

#include "cpu_ops.h"

#define KV_ELEMENTWISE_CHUNK 65536

typedef struct add_job {
    const float *a, *b;
    float *y;
    size_t count;
} add_job;

static void add_task(void *arg, int task, int thread)
{
    (void)thread;
    const add_job *j = arg;
    size_t i0 = (size_t)task * KV_ELEMENTWISE_CHUNK;
    size_t i1 = KV_MIN(j->count, i0 + KV_ELEMENTWISE_CHUNK);
    for (size_t i = i0; i < i1; i++)
        j->y[i] = j->a[i] + j->b[i];
}

klvae_status_t kv_cpu_add(kv_backend *be, const kv_tensor *a, const kv_tensor *b, kv_tensor *y)
{
    add_job j = {a->data, b->data, y->data, kv_tensor_numel(y)};
    int tasks = (int)((j.count + KV_ELEMENTWISE_CHUNK - 1) / KV_ELEMENTWISE_CHUNK);
    kv_pool_run(kv_cpu_of(be)->pool, tasks, add_task, &j);
    return KLVAE_OK;
}

typedef struct upsample_job {
    const float *x;
    float *y;
    int h, w;
} upsample_job;

static void upsample_task(void *arg, int task, int thread)
{
    (void)thread;
    const upsample_job *j = arg;
    const float *x = j->x + (size_t)task * j->h * j->w;
    float *y = j->y + (size_t)task * 4 * j->h * j->w;
    const int wo = 2 * j->w;
    for (int r = 0; r < j->h; r++) {
        float *out = y + (size_t)(2 * r) * wo;
        const float *in = x + (size_t)r * j->w;
        for (int c = 0; c < j->w; c++) {
            out[2 * c] = in[c];
            out[2 * c + 1] = in[c];
        }
        memcpy(out + wo, out, (size_t)wo * sizeof(float));
    }
}

klvae_status_t kv_cpu_upsample_nearest2x(kv_backend *be, const kv_tensor *x, kv_tensor *y)
{
    upsample_job j = {x->data, y->data, x->shape[2], x->shape[3]};
    kv_pool_run(kv_cpu_of(be)->pool, x->shape[0] * x->shape[1], upsample_task, &j);
    return KLVAE_OK;
}
