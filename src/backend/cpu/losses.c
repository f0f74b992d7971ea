/* losses.c — the loss pieces of training: LPIPS' unit normalisation and
 * distance, the pixel loss, the PatchGAN logit losses. Sums are taken in
 * double over fixed chunks and combined in a fixed order. */
#include <math.h>
#include <string.h>

#include "backend/cpu/cpu_ops.h"
#include "base/philox.h"

#define KV_LOSS_CHUNK 16384
#define KV_UNIT_EPS 1e-10

/* ---- unit normalisation over channels ---- */

typedef struct unit_job {
    const float *x, *dy, *norms;
    float *y; /* y or dx */
    float *out_norms;
    int channels;
    size_t plane;
} unit_job;

static void unit_normalize_task(void *arg, int task, int thread)
{
    (void)thread;
    const unit_job *j = arg;
    const int chunks = (int)((j->plane + KV_LOSS_CHUNK - 1) / KV_LOSS_CHUNK);
    const int n = task / chunks;
    const size_t p0 = (size_t)(task % chunks) * KV_LOSS_CHUNK;
    const size_t p1 = KV_MIN(j->plane, p0 + KV_LOSS_CHUNK);
    const float *x = j->x + (size_t)n * j->channels * j->plane;
    float *y = j->y + (size_t)n * j->channels * j->plane;
    for (size_t p = p0; p < p1; p++) {
        double ss = 0.0;
        for (int c = 0; c < j->channels; c++) {
            double v = x[(size_t)c * j->plane + p];
            ss += v * v;
        }
        float r = (float)sqrt(ss);
        j->out_norms[(size_t)n * j->plane + p] = r;
        float inv = 1.0f / (r + (float)KV_UNIT_EPS);
        for (int c = 0; c < j->channels; c++)
            y[(size_t)c * j->plane + p] = x[(size_t)c * j->plane + p] * inv;
    }
}

klvae_status_t kv_cpu_unit_normalize(kv_backend *be, const kv_tensor *x, kv_tensor *y,
                                     kv_tensor *norms)
{
    unit_job j = {x->data, NULL, NULL, y->data, norms->data, x->shape[1],
                  (size_t)x->shape[2] * x->shape[3]};
    int chunks = (int)((j.plane + KV_LOSS_CHUNK - 1) / KV_LOSS_CHUNK);
    kv_pool_run(kv_cpu_of(be)->pool, x->shape[0] * chunks, unit_normalize_task, &j);
    return KLVAE_OK;
}

static void unit_normalize_backward_task(void *arg, int task, int thread)
{
    (void)thread;
    const unit_job *j = arg;
    const int chunks = (int)((j->plane + KV_LOSS_CHUNK - 1) / KV_LOSS_CHUNK);
    const int n = task / chunks;
    const size_t p0 = (size_t)(task % chunks) * KV_LOSS_CHUNK;
    const size_t p1 = KV_MIN(j->plane, p0 + KV_LOSS_CHUNK);
    const size_t base = (size_t)n * j->channels * j->plane;
    const float *x = j->x + base, *dy = j->dy + base;
    float *dx = j->y + base;
    for (size_t p = p0; p < p1; p++) {
        const double r = j->norms[(size_t)n * j->plane + p];
        if (r == 0.0) { /* all-zero feature vector: PyTorch's gradient is NaN here */
            for (int c = 0; c < j->channels; c++)
                dx[(size_t)c * j->plane + p] = 0.0f;
            continue;
        }
        double dot = 0.0;
        for (int c = 0; c < j->channels; c++)
            dot += (double)dy[(size_t)c * j->plane + p] * x[(size_t)c * j->plane + p];
        const double re = r + KV_UNIT_EPS;
        const double a = 1.0 / re, b = dot / (re * re * r);
        for (int c = 0; c < j->channels; c++) {
            size_t i = (size_t)c * j->plane + p;
            dx[i] = (float)(dy[i] * a - x[i] * b);
        }
    }
}

klvae_status_t kv_cpu_unit_normalize_backward(kv_backend *be, const kv_tensor *x,
                                              const kv_tensor *norms, const kv_tensor *dy,
                                              kv_tensor *dx)
{
    unit_job j = {x->data, dy->data, norms->data, dx->data, NULL, x->shape[1],
                  (size_t)x->shape[2] * x->shape[3]};
    int chunks = (int)((j.plane + KV_LOSS_CHUNK - 1) / KV_LOSS_CHUNK);
    kv_pool_run(kv_cpu_of(be)->pool, x->shape[0] * chunks, unit_normalize_backward_task, &j);
    return KLVAE_OK;
}

/* ---- LPIPS distance of one tap ---- */

typedef struct lpips_job {
    const float *a, *b, *w;
    float *db;
    const float *grad_scale;
    double *partial; /* (N, chunks) */
    int channels, chunks;
    size_t plane;
    float dropout, keep_scale;
    uint64_t seed;
} lpips_job;

static void lpips_task(void *arg, int task, int thread)
{
    (void)thread;
    const lpips_job *j = arg;
    const int n = task / j->chunks;
    const size_t p0 = (size_t)(task % j->chunks) * KV_LOSS_CHUNK;
    const size_t p1 = KV_MIN(j->plane, p0 + KV_LOSS_CHUNK);
    const float g = j->grad_scale ? j->grad_scale[n] * 2.0f / (float)j->plane : 0.0f;
    double sum = 0.0;
    for (int c = 0; c < j->channels; c++) {
        const size_t base = ((size_t)n * j->channels + c) * j->plane;
        const float w = j->w[c];
        double sc = 0.0;
        for (size_t p = p0; p < p1; p++) {
            float m = 1.0f;
            if (j->dropout > 0.0f)
                m = kv_philox_uniform(j->seed, base + p) < j->dropout ? 0.0f : j->keep_scale;
            float d = j->a[base + p] - j->b[base + p];
            sc += (double)(m * d * d);
            if (j->db)
                j->db[base + p] = g * w * m * (-d);
        }
        sum += w * sc;
    }
    j->partial[task] = sum;
}

klvae_status_t kv_cpu_lpips_distance(kv_backend *be, const kv_tensor *a, const kv_tensor *b,
                                     const kv_tensor *w, float dropout, uint64_t dropout_seed,
                                     double *values, const float *grad_scale, kv_tensor *db)
{
    kv_cpu *cpu = kv_cpu_of(be);
    const int batch = a->shape[0];
    const size_t plane = (size_t)a->shape[2] * a->shape[3];
    const int chunks = (int)((plane + KV_LOSS_CHUNK - 1) / KV_LOSS_CHUNK);
    klvae_status_t st = kv_cpu_reserve_shared(cpu, 2 * (size_t)batch * chunks);
    if (st != KLVAE_OK)
        return st;
    lpips_job j = {a->data,      b->data,        w->data, db ? db->data : NULL,
                   grad_scale,   (double *)cpu->shared,   a->shape[1],
                   chunks,       plane,          dropout, dropout > 0.0f ? 1.0f / (1.0f - dropout) : 1.0f,
                   dropout_seed};
    kv_pool_run(cpu->pool, batch * chunks, lpips_task, &j);
    for (int n = 0; n < batch; n++) {
        double s = 0.0;
        for (int c = 0; c < chunks; c++)
            s += j.partial[(size_t)n * chunks + c];
        values[n] = s / (double)plane;
    }
    return KLVAE_OK;
}

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
