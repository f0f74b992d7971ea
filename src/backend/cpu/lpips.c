/* lpips.c — the LPIPS ops: the channel-wise unit normalisation of a
 * feature map and its gradient, and the weighted squared distance of two
 * normalised taps with optional dropout. Sums are taken in double over fixed
 * chunks of pixels and combined in a fixed order. (The network that calls
 * them is src/train/lpips.c.) */
#include <math.h>
#include <stdbool.h>
#include <string.h>

#include "backend/cpu/cpu_ops.h"
#include "base/philox.h"

#define KV_LPIPS_CHUNK 16384 /* pixels */
#define KV_UNIT_EPS 1e-10

/* ---- unit normalisation over channels ---- */

typedef struct unit_job {
    const float *x, *dy, *norms;
    float *y; /* y or dx */
    float *out_norms;
    int channels;
    size_t plane;
} unit_job;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define KV_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KV_VECTOR_CLONES
#endif

/* Pixels whose sums over channels run side by side: the channels of a
 * pixel lie a plane apart, so the loops go channel by channel over a block
 * of contiguous pixels, each pixel's sum still in channel order. */
#define KV_UNIT_BLOCK 64

KV_VECTOR_CLONES
static void unit_normalize_task(void *arg, int task, int thread)
{
    (void)thread;
    const unit_job *j = arg;
    const int chunks = (int)((j->plane + KV_LPIPS_CHUNK - 1) / KV_LPIPS_CHUNK);
    const int n = task / chunks;
    const size_t p0 = (size_t)(task % chunks) * KV_LPIPS_CHUNK;
    const size_t p1 = KV_MIN(j->plane, p0 + KV_LPIPS_CHUNK);
    const float *x = j->x + (size_t)n * j->channels * j->plane;
    float *y = j->y + (size_t)n * j->channels * j->plane;
    for (size_t b0 = p0; b0 < p1; b0 += KV_UNIT_BLOCK) {
        const size_t count = KV_MIN((size_t)KV_UNIT_BLOCK, p1 - b0);
        double ss[KV_UNIT_BLOCK];
        float inv[KV_UNIT_BLOCK];
        for (size_t i = 0; i < count; i++)
            ss[i] = 0.0;
        for (int c = 0; c < j->channels; c++) {
            const float *xc = x + (size_t)c * j->plane + b0;
            for (size_t i = 0; i < count; i++) {
                double v = xc[i];
                ss[i] += v * v;
            }
        }
        for (size_t i = 0; i < count; i++) {
            float r = (float)sqrt(ss[i]);
            j->out_norms[(size_t)n * j->plane + b0 + i] = r;
            inv[i] = 1.0f / (r + (float)KV_UNIT_EPS);
        }
        for (int c = 0; c < j->channels; c++) {
            const float *xc = x + (size_t)c * j->plane + b0;
            float *yc = y + (size_t)c * j->plane + b0;
            for (size_t i = 0; i < count; i++)
                yc[i] = xc[i] * inv[i];
        }
    }
}

klvae_status_t kv_cpu_unit_normalize(kv_backend *be, const kv_tensor *x, kv_tensor *y,
                                     kv_tensor *norms)
{
    unit_job j = {x->data, NULL, NULL, y->data, norms->data, x->shape[1],
                  (size_t)x->shape[2] * x->shape[3]};
    int chunks = (int)((j.plane + KV_LPIPS_CHUNK - 1) / KV_LPIPS_CHUNK);
    kv_pool_run(kv_cpu_of(be)->pool, x->shape[0] * chunks, unit_normalize_task, &j);
    return KLVAE_OK;
}

KV_VECTOR_CLONES
static void unit_normalize_backward_task(void *arg, int task, int thread)
{
    (void)thread;
    const unit_job *j = arg;
    const int chunks = (int)((j->plane + KV_LPIPS_CHUNK - 1) / KV_LPIPS_CHUNK);
    const int n = task / chunks;
    const size_t p0 = (size_t)(task % chunks) * KV_LPIPS_CHUNK;
    const size_t p1 = KV_MIN(j->plane, p0 + KV_LPIPS_CHUNK);
    const size_t base = (size_t)n * j->channels * j->plane;
    const float *x = j->x + base, *dy = j->dy + base;
    float *dx = j->y + base;
    for (size_t b0 = p0; b0 < p1; b0 += KV_UNIT_BLOCK) {
        const size_t count = KV_MIN((size_t)KV_UNIT_BLOCK, p1 - b0);
        double dot[KV_UNIT_BLOCK], a[KV_UNIT_BLOCK], b[KV_UNIT_BLOCK];
        bool zero[KV_UNIT_BLOCK];
        for (size_t i = 0; i < count; i++)
            dot[i] = 0.0;
        for (int c = 0; c < j->channels; c++) {
            const size_t at = (size_t)c * j->plane + b0;
            for (size_t i = 0; i < count; i++)
                dot[i] += (double)dy[at + i] * x[at + i];
        }
        for (size_t i = 0; i < count; i++) {
            const double r = j->norms[(size_t)n * j->plane + b0 + i];
            /* an all-zero feature vector: PyTorch's gradient is NaN there */
            const double re = r + KV_UNIT_EPS;
            zero[i] = r == 0.0;
            a[i] = zero[i] ? 0.0 : 1.0 / re;
            b[i] = zero[i] ? 0.0 : dot[i] / (re * re * r);
        }
        for (int c = 0; c < j->channels; c++) {
            const size_t at = (size_t)c * j->plane + b0;
            for (size_t i = 0; i < count; i++)
                dx[at + i] = zero[i] ? 0.0f : (float)(dy[at + i] * a[i] - x[at + i] * b[i]);
        }
    }
}

klvae_status_t kv_cpu_unit_normalize_backward(kv_backend *be, const kv_tensor *x,
                                              const kv_tensor *norms, const kv_tensor *dy,
                                              kv_tensor *dx)
{
    unit_job j = {x->data, dy->data, norms->data, dx->data, NULL, x->shape[1],
                  (size_t)x->shape[2] * x->shape[3]};
    int chunks = (int)((j.plane + KV_LPIPS_CHUNK - 1) / KV_LPIPS_CHUNK);
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
    uint64_t seed, first;
} lpips_job;

static void lpips_task(void *arg, int task, int thread)
{
    (void)thread;
    const lpips_job *j = arg;
    const int n = task / j->chunks;
    const size_t p0 = (size_t)(task % j->chunks) * KV_LPIPS_CHUNK;
    const size_t p1 = KV_MIN(j->plane, p0 + KV_LPIPS_CHUNK);
    const float g = j->grad_scale ? j->grad_scale[n] * 2.0f / (float)j->plane : 0.0f;
    double sum = 0.0;
    for (int c = 0; c < j->channels; c++) {
        const size_t base = ((size_t)n * j->channels + c) * j->plane;
        const float w = j->w[c];
        double sc = 0.0;
        for (size_t p = p0; p < p1; p++) {
            float m = 1.0f;
            if (j->dropout > 0.0f)
                m = kv_philox_uniform(j->seed, j->first + base + p) < j->dropout ? 0.0f : j->keep_scale;
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
                                     uint64_t first, double *values, const float *grad_scale,
                                     kv_tensor *db)
{
    kv_cpu *cpu = kv_cpu_of(be);
    const int batch = a->shape[0];
    const size_t plane = (size_t)a->shape[2] * a->shape[3];
    const int chunks = (int)((plane + KV_LPIPS_CHUNK - 1) / KV_LPIPS_CHUNK);
    klvae_status_t st = kv_cpu_reserve_shared(cpu, 2 * (size_t)batch * chunks);
    if (st != KLVAE_OK)
        return st;
    lpips_job j = {a->data,      b->data,        w->data, db ? db->data : NULL,
                   grad_scale,   (double *)cpu->shared,   a->shape[1],
                   chunks,       plane,          dropout, dropout > 0.0f ? 1.0f / (1.0f - dropout) : 1.0f,
                   dropout_seed, first};
    kv_pool_run(cpu->pool, batch * chunks, lpips_task, &j);
    for (int n = 0; n < batch; n++) {
        double s = 0.0;
        for (int c = 0; c < chunks; c++)
            s += j.partial[(size_t)n * chunks + c];
        values[n] = s / (double)plane;
    }
    return KLVAE_OK;
}
