/* pool.c — 2x2 max pooling (LPIPS' VGG trunk) and its gradient. */
#include <string.h>

#include "backend/cpu/cpu_ops.h"

typedef struct pool_job {
    const float *x, *dy;
    float *out;
    int h, w, ho, wo;
} pool_job;

static void max_pool_task(void *arg, int task, int thread)
{
    (void)thread;
    const pool_job *j = arg;
    const float *x = j->x + (size_t)task * j->h * j->w;
    float *y = j->out + (size_t)task * j->ho * j->wo;
    for (int r = 0; r < j->ho; r++)
        for (int c = 0; c < j->wo; c++) {
            const float *p = x + (size_t)(2 * r) * j->w + 2 * c;
            float m = p[0];
            m = p[1] > m ? p[1] : m;
            m = p[j->w] > m ? p[j->w] : m;
            m = p[j->w + 1] > m ? p[j->w + 1] : m;
            y[(size_t)r * j->wo + c] = m;
        }
}

klvae_status_t kv_cpu_max_pool2x2(kv_backend *be, const kv_tensor *x, kv_tensor *y)
{
    pool_job j = {x->data, NULL, y->data, x->shape[2], x->shape[3], y->shape[2], y->shape[3]};
    kv_pool_run_sized(kv_cpu_of(be)->pool, x->shape[0] * x->shape[1], max_pool_task, &j,
                      kv_tensor_numel(x) + kv_tensor_numel(y));
    return KLVAE_OK;
}

static void max_pool_backward_task(void *arg, int task, int thread)
{
    (void)thread;
    const pool_job *j = arg;
    const float *x = j->x + (size_t)task * j->h * j->w;
    const float *dy = j->dy + (size_t)task * j->ho * j->wo;
    float *dx = j->out + (size_t)task * j->h * j->w;
    memset(dx, 0, (size_t)j->h * j->w * sizeof(float));
    for (int r = 0; r < j->ho; r++)
        for (int c = 0; c < j->wo; c++) {
            size_t at[4] = {(size_t)(2 * r) * j->w + 2 * c, (size_t)(2 * r) * j->w + 2 * c + 1,
                            (size_t)(2 * r + 1) * j->w + 2 * c,
                            (size_t)(2 * r + 1) * j->w + 2 * c + 1};
            size_t best = at[0];
            for (int k = 1; k < 4; k++) /* first maximum wins, as in PyTorch */
                if (x[at[k]] > x[best])
                    best = at[k];
            dx[best] += dy[(size_t)r * j->wo + c];
        }
}

klvae_status_t kv_cpu_max_pool2x2_backward(kv_backend *be, const kv_tensor *x,
                                           const kv_tensor *dy, kv_tensor *dx)
{
    pool_job j = {x->data, dy->data, dx->data, x->shape[2], x->shape[3], dy->shape[2],
                  dy->shape[3]};
    kv_pool_run_sized(kv_cpu_of(be)->pool, x->shape[0] * x->shape[1], max_pool_backward_task, &j,
                      2 * kv_tensor_numel(x) + kv_tensor_numel(dy));
    return KLVAE_OK;
}
