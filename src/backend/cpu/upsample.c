/* upsample.c — nearest 2x upsampling and its gradient. */
#include <string.h>

#include "backend/cpu/cpu_ops.h"

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
    kv_pool_run_sized(kv_cpu_of(be)->pool, x->shape[0] * x->shape[1], upsample_task, &j,
                      5 * kv_tensor_numel(x));
    return KLVAE_OK;
}

typedef struct upsample_back_job {
    const float *dy;
    float *dx;
    int h, w; /* of dx */
} upsample_back_job;

static void upsample_backward_task(void *arg, int task, int thread)
{
    (void)thread;
    const upsample_back_job *j = arg;
    const int wo = 2 * j->w;
    const float *dy = j->dy + (size_t)task * 4 * j->h * j->w;
    float *dx = j->dx + (size_t)task * j->h * j->w;
    for (int r = 0; r < j->h; r++) {
        const float *a = dy + (size_t)(2 * r) * wo, *b = a + wo;
        for (int c = 0; c < j->w; c++)
            dx[(size_t)r * j->w + c] = (a[2 * c] + a[2 * c + 1]) + (b[2 * c] + b[2 * c + 1]);
    }
}

klvae_status_t kv_cpu_upsample_nearest2x_backward(kv_backend *be, const kv_tensor *dy,
                                                  kv_tensor *dx)
{
    upsample_back_job j = {dy->data, dx->data, dx->shape[2], dx->shape[3]};
    kv_pool_run_sized(kv_cpu_of(be)->pool, dx->shape[0] * dx->shape[1], upsample_backward_task, &j,
                      5 * kv_tensor_numel(dx));
    return KLVAE_OK;
}
