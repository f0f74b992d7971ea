/* elementwise.c — y = a + b, the per-channel affine map (LPIPS' scaling
 * layer), and the vector ops of the trainer: scale, fill, axpy, lerp. */
#include "backend/cpu/cpu_ops.h"

typedef struct add_job {
    const float *a, *b;
    float *y;
    size_t count;
} add_job;

static void add_task(void *arg, int task, int thread)
{
    (void)thread;
    const add_job *j = arg;
    size_t i0, i1;
    kv_cpu_chunk_range(j->count, task, &i0, &i1);
    for (size_t i = i0; i < i1; i++)
        j->y[i] = j->a[i] + j->b[i];
}

klvae_status_t kv_cpu_add(kv_backend *be, const kv_tensor *a, const kv_tensor *b, kv_tensor *y)
{
    kv_cpu_wrote(be, y);
    add_job j = {a->data, b->data, y->data, kv_tensor_numel(y)};
    kv_pool_run(kv_cpu_of(be)->pool, kv_cpu_chunks(j.count), add_task, &j);
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
    kv_cpu_wrote(be, y);
    affine_job j = {x->data, a, b, y->data, x->shape[1], (size_t)x->shape[2] * x->shape[3]};
    kv_pool_run_sized(kv_cpu_of(be)->pool, x->shape[0] * x->shape[1], affine_task, &j,
                      2 * kv_tensor_numel(x));
    return KLVAE_OK;
}

/* One elementwise op's arguments. */
typedef struct unary_job {
    const float *x, *y;
    float *out;
    size_t count;
    float a;
} unary_job;

static void scale_task(void *arg, int task, int thread)
{
    (void)thread;
    const unary_job *j = arg;
    size_t i0, i1;
    kv_cpu_chunk_range(j->count, task, &i0, &i1);
    for (size_t i = i0; i < i1; i++)
        j->out[i] *= j->a;
}

klvae_status_t kv_cpu_scale(kv_backend *be, kv_tensor *x, float a)
{
    kv_cpu_wrote(be, x);
    unary_job j = {NULL, NULL, x->data, kv_tensor_numel(x), a};
    kv_pool_run(kv_cpu_of(be)->pool, kv_cpu_chunks(j.count), scale_task, &j);
    return KLVAE_OK;
}

static void fill_task(void *arg, int task, int thread)
{
    (void)thread;
    const unary_job *j = arg;
    size_t i0, i1;
    kv_cpu_chunk_range(j->count, task, &i0, &i1);
    for (size_t i = i0; i < i1; i++)
        j->out[i] = j->a;
}

klvae_status_t kv_cpu_fill(kv_backend *be, kv_tensor *x, float value)
{
    kv_cpu_wrote(be, x);
    unary_job j = {NULL, NULL, x->data, kv_tensor_numel(x), value};
    kv_pool_run(kv_cpu_of(be)->pool, kv_cpu_chunks(j.count), fill_task, &j);
    return KLVAE_OK;
}

static void axpy_task(void *arg, int task, int thread)
{
    (void)thread;
    const unary_job *j = arg;
    size_t i0, i1;
    kv_cpu_chunk_range(j->count, task, &i0, &i1);
    for (size_t i = i0; i < i1; i++)
        j->out[i] += j->a * j->x[i];
}

klvae_status_t kv_cpu_axpy(kv_backend *be, float a, const kv_tensor *x, kv_tensor *y)
{
    kv_cpu_wrote(be, y);
    unary_job j = {x->data, NULL, y->data, kv_tensor_numel(x), a};
    kv_pool_run(kv_cpu_of(be)->pool, kv_cpu_chunks(j.count), axpy_task, &j);
    return KLVAE_OK;
}

static void lerp_task(void *arg, int task, int thread)
{
    (void)thread;
    const unary_job *j = arg;
    size_t i0, i1;
    kv_cpu_chunk_range(j->count, task, &i0, &i1);
    for (size_t i = i0; i < i1; i++)
        j->out[i] += j->a * (j->y[i] - j->out[i]);
}

klvae_status_t kv_cpu_lerp(kv_backend *be, kv_tensor *x, const kv_tensor *y, float t)
{
    kv_cpu_wrote(be, x);
    unary_job j = {NULL, y->data, x->data, kv_tensor_numel(x), t};
    kv_pool_run(kv_cpu_of(be)->pool, kv_cpu_chunks(j.count), lerp_task, &j);
    return KLVAE_OK;
}
