/* activation.c — activations applied on their own (LPIPS' and the
 * discriminator's ReLUs; the VAE's SiLU is fused into group norm and the
 * convolution prologue), and the gradient of the piecewise-linear ones. */
#include "backend/cpu/cpu_ops.h"

/* The activation's arguments: y = act(x), or dx from dy and y. */
typedef struct activation_job {
    const float *x, *y;
    float *out;
    size_t count;
    kv_activation act;
} activation_job;

static void activation_task(void *arg, int task, int thread)
{
    (void)thread;
    const activation_job *j = arg;
    size_t i0, i1;
    kv_cpu_chunk_range(j->count, task, &i0, &i1);
    for (size_t i = i0; i < i1; i++)
        j->out[i] = kv_activate(j->act, j->x[i]);
}

klvae_status_t kv_cpu_activation(kv_backend *be, const kv_tensor *x, kv_activation act,
                                 kv_tensor *y)
{
    kv_cpu_wrote(be, y);
    activation_job j = {x->data, NULL, y->data, kv_tensor_numel(x), act};
    kv_pool_run(kv_cpu_of(be)->pool, kv_cpu_chunks(j.count), activation_task, &j);
    return KLVAE_OK;
}

static void activation_backward_task(void *arg, int task, int thread)
{
    (void)thread;
    const activation_job *j = arg;
    size_t i0, i1;
    kv_cpu_chunk_range(j->count, task, &i0, &i1);
    const float below = j->act == KV_ACT_LEAKY_RELU ? 0.2f : 0.0f;
    for (size_t i = i0; i < i1; i++)
        j->out[i] = j->y[i] > 0.0f ? j->x[i] : below * j->x[i];
}

klvae_status_t kv_cpu_activation_backward(kv_backend *be, const kv_tensor *y,
                                          const kv_tensor *dy, kv_activation act, kv_tensor *dx)
{
    if (act != KV_ACT_RELU && act != KV_ACT_LEAKY_RELU)
        return kv_error(KLVAE_ERR_INTERNAL, "activation_backward supports relu and leaky relu");
    kv_cpu_wrote(be, dx);
    activation_job j = {dy->data, y->data, dx->data, kv_tensor_numel(dy), act};
    kv_pool_run(kv_cpu_of(be)->pool, kv_cpu_chunks(j.count), activation_backward_task, &j);
    return KLVAE_OK;
}
