/* losses.c — the pixel loss and the PatchGAN logit losses. Sums are taken
 * in double over fixed chunks and combined in a fixed order. */
#include <math.h>
#include <string.h>

#include "backend/cpu/cpu_ops.h"

#define KV_LOSS_CHUNK 16384

/* ---- pixel loss ---- */

typedef struct pixel_job {
    const float *x, *xhat;
    float *grad;
    size_t count;
    kv_pixel_loss kind;
    float scale;
    double *partial;
} pixel_job;

static void pixel_task(void *arg, int task, int thread)
{
    (void)thread;
    const pixel_job *j = arg;
    size_t i0 = (size_t)task * KV_LOSS_CHUNK, i1 = KV_MIN(j->count, i0 + KV_LOSS_CHUNK);
    double s = 0.0;
    for (size_t i = i0; i < i1; i++) {
        float d = j->xhat[i] - j->x[i];
        if (j->kind == KV_LOSS_L1) {
            s += fabsf(d);
            if (j->grad)
                j->grad[i] = d > 0.0f ? j->scale : (d < 0.0f ? -j->scale : 0.0f);
        } else {
            s += (double)d * d;
            if (j->grad)
                j->grad[i] = j->scale * 2.0f * d;
        }
    }
    j->partial[task] = s;
}

klvae_status_t kv_cpu_pixel_loss(kv_backend *be, const kv_tensor *x, const kv_tensor *xhat,
                                 kv_pixel_loss kind, float scale, double *sum, kv_tensor *grad)
{
    kv_cpu *cpu = kv_cpu_of(be);
    size_t count = kv_tensor_numel(x);
    int chunks = (int)((count + KV_LOSS_CHUNK - 1) / KV_LOSS_CHUNK);
    klvae_status_t st = kv_cpu_reserve_shared(cpu, 2 * (size_t)KV_MAX(chunks, 1));
    if (st != KLVAE_OK)
        return st;
    pixel_job j = {x->data, xhat->data, grad ? grad->data : NULL, count, kind, scale,
                   (double *)cpu->shared};
    kv_pool_run(cpu->pool, chunks, pixel_task, &j);
    double s = 0.0;
    for (int c = 0; c < chunks; c++)
        s += j.partial[c];
    *sum = s;
    return KLVAE_OK;
}

/* ---- PatchGAN logit losses (small tensors: serial) ---- */

static double softplus(double v)
{
    return v > 20.0 ? v : log1p(exp(v)); /* PyTorch's threshold */
}

static double sigmoid(double v)
{
    return 1.0 / (1.0 + exp(-v));
}

klvae_status_t kv_cpu_logit_loss(kv_backend *be, const kv_tensor *logits, kv_logit_loss kind,
                                 float scale, double *mean, kv_tensor *grad)
{
    (void)be;
    const float *l = logits->data;
    float *g = grad ? grad->data : NULL;
    const size_t n = kv_tensor_numel(logits);
    const double inv = 1.0 / (double)n;
    double s = 0.0;
    for (size_t i = 0; i < n; i++) {
        double v = l[i], d = 0.0;
        switch (kind) {
        case KV_LOGITS_HINGE_REAL:
            s += v < 1.0 ? 1.0 - v : 0.0;
            d = v < 1.0 ? -1.0 : 0.0;
            break;
        case KV_LOGITS_HINGE_FAKE:
            s += v > -1.0 ? 1.0 + v : 0.0;
            d = v > -1.0 ? 1.0 : 0.0;
            break;
        case KV_LOGITS_VANILLA_REAL:
            s += softplus(-v);
            d = -v > 20.0 ? -1.0 : -sigmoid(-v);
            break;
        case KV_LOGITS_VANILLA_FAKE:
            s += softplus(v);
            d = v > 20.0 ? 1.0 : sigmoid(v);
            break;
        case KV_LOGITS_GENERATOR:
            s -= v;
            d = -1.0;
            break;
        }
        if (g)
            g[i] = (float)(scale * d * inv);
    }
    *mean = s * inv;
    return KLVAE_OK;
}
