/* elementwise.c — add and nearest 2x upsampling. */
#include <string.h>

#include "backend/cpu/cpu_ops.h"

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

/* ---- training ---- */

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
    kv_pool_run(kv_cpu_of(be)->pool, dx->shape[0] * dx->shape[1], upsample_backward_task, &j);
    return KLVAE_OK;
}

/* Elementwise work in fixed chunks of KV_ELEMENTWISE_CHUNK values. */
typedef struct unary_job {
    const float *x, *y;
    float *out;
    size_t count;
    kv_activation act;
    float a;
} unary_job;

static int chunks_of(size_t count)
{
    return (int)((count + KV_ELEMENTWISE_CHUNK - 1) / KV_ELEMENTWISE_CHUNK);
}

#define CHUNK_RANGE(j, task)                                                                      \
    size_t i0 = (size_t)(task) * KV_ELEMENTWISE_CHUNK;                                            \
    size_t i1 = KV_MIN((j)->count, i0 + KV_ELEMENTWISE_CHUNK)

static void activation_task(void *arg, int task, int thread)
{
    (void)thread;
    const unary_job *j = arg;
    CHUNK_RANGE(j, task);
    for (size_t i = i0; i < i1; i++)
        j->out[i] = kv_cpu_activate(j->act, j->x[i]);
}

klvae_status_t kv_cpu_activation(kv_backend *be, const kv_tensor *x, kv_activation act,
                                 kv_tensor *y)
{
    unary_job j = {x->data, NULL, y->data, kv_tensor_numel(x), act, 0.0f};
    kv_pool_run(kv_cpu_of(be)->pool, chunks_of(j.count), activation_task, &j);
    return KLVAE_OK;
}

static void activation_backward_task(void *arg, int task, int thread)
{
    (void)thread;
    const unary_job *j = arg;
    CHUNK_RANGE(j, task);
    const float below = j->act == KV_ACT_LEAKY_RELU ? 0.2f : 0.0f;
    for (size_t i = i0; i < i1; i++)
        j->out[i] = j->y[i] > 0.0f ? j->x[i] : below * j->x[i];
}

klvae_status_t kv_cpu_activation_backward(kv_backend *be, const kv_tensor *y,
                                          const kv_tensor *dy, kv_activation act, kv_tensor *dx)
{
    if (act != KV_ACT_RELU && act != KV_ACT_LEAKY_RELU)
        return kv_error(KLVAE_ERR_INTERNAL, "activation_backward supports relu and leaky relu");
    unary_job j = {dy->data, y->data, dx->data, kv_tensor_numel(dy), act, 0.0f};
    kv_pool_run(kv_cpu_of(be)->pool, chunks_of(j.count), activation_backward_task, &j);
    return KLVAE_OK;
}

typedef struct affine_job {
    const float *x, *a, *b;
    float *y;
    int channels;
    size_t plane;
} affine_job;

static void affine_task(void *arg, int task, int thread)
{
    (void)thread;
    const affine_job *j = arg;
    const int c = task % j->channels;
    const float a = j->a ? j->a[c] : 1.0f, b = j->b ? j->b[c] : 0.0f;
    const float *x = j->x + (size_t)task * j->plane;
    float *y = j->y + (size_t)task * j->plane;
    for (size_t i = 0; i < j->plane; i++)
        y[i] = x[i] * a + b;
}

klvae_status_t kv_cpu_channel_affine(kv_backend *be, const kv_tensor *x, const float *a,
                                     const float *b, kv_tensor *y)
{
    affine_job j = {x->data, a, b, y->data, x->shape[1], (size_t)x->shape[2] * x->shape[3]};
    kv_pool_run(kv_cpu_of(be)->pool, x->shape[0] * x->shape[1], affine_task, &j);
    return KLVAE_OK;
}

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
    kv_pool_run(kv_cpu_of(be)->pool, x->shape[0] * x->shape[1], max_pool_task, &j);
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
    kv_pool_run(kv_cpu_of(be)->pool, x->shape[0] * x->shape[1], max_pool_backward_task, &j);
    return KLVAE_OK;
}

/* ---- vector ops for the optimiser ---- */

static void scale_task(void *arg, int task, int thread)
{
    (void)thread;
    const unary_job *j = arg;
    CHUNK_RANGE(j, task);
    for (size_t i = i0; i < i1; i++)
        j->out[i] *= j->a;
}

klvae_status_t kv_cpu_scale(kv_backend *be, kv_tensor *x, float a)
{
    unary_job j = {NULL, NULL, x->data, kv_tensor_numel(x), KV_ACT_NONE, a};
    kv_pool_run(kv_cpu_of(be)->pool, chunks_of(j.count), scale_task, &j);
    return KLVAE_OK;
}

static void fill_task(void *arg, int task, int thread)
{
    (void)thread;
    const unary_job *j = arg;
    CHUNK_RANGE(j, task);
    for (size_t i = i0; i < i1; i++)
        j->out[i] = j->a;
}

klvae_status_t kv_cpu_fill(kv_backend *be, kv_tensor *x, float value)
{
    unary_job j = {NULL, NULL, x->data, kv_tensor_numel(x), KV_ACT_NONE, value};
    kv_pool_run(kv_cpu_of(be)->pool, chunks_of(j.count), fill_task, &j);
    return KLVAE_OK;
}

static void axpy_task(void *arg, int task, int thread)
{
    (void)thread;
    const unary_job *j = arg;
    CHUNK_RANGE(j, task);
    for (size_t i = i0; i < i1; i++)
        j->out[i] += j->a * j->x[i];
}

klvae_status_t kv_cpu_axpy(kv_backend *be, float a, const kv_tensor *x, kv_tensor *y)
{
    unary_job j = {x->data, NULL, y->data, kv_tensor_numel(x), KV_ACT_NONE, a};
    kv_pool_run(kv_cpu_of(be)->pool, chunks_of(j.count), axpy_task, &j);
    return KLVAE_OK;
}

static void lerp_task(void *arg, int task, int thread)
{
    (void)thread;
    const unary_job *j = arg;
    CHUNK_RANGE(j, task);
    for (size_t i = i0; i < i1; i++)
        j->out[i] += j->a * (j->y[i] - j->out[i]);
}

klvae_status_t kv_cpu_lerp(kv_backend *be, kv_tensor *x, const kv_tensor *y, float t)
{
    unary_job j = {NULL, y->data, x->data, kv_tensor_numel(x), KV_ACT_NONE, t};
    kv_pool_run(kv_cpu_of(be)->pool, chunks_of(j.count), lerp_task, &j);
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
    CHUNK_RANGE(j, task);
    double s = 0.0;
    for (size_t i = i0; i < i1; i++)
        s += (double)j->x[i] * j->x[i];
    j->partial[task] = s;
}

klvae_status_t kv_cpu_sum_squares(kv_backend *be, const kv_tensor *x, double *sum)
{
    kv_cpu *cpu = kv_cpu_of(be);
    size_t count = kv_tensor_numel(x);
    int chunks = chunks_of(count);
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
