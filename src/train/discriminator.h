/* discriminator.h — the PatchGAN NLayerDiscriminator of taming-transformers,
 * as the LDM trainer uses it:
 *
 *   conv 4x4 s2 p1 (in -> ndf, bias), LeakyReLU 0.2,
 *   for n = 1 .. layers-1: conv 4x4 s2 p1 (no bias), BatchNorm, LeakyReLU,
 *   conv 4x4 s1 p1 (no bias), BatchNorm, LeakyReLU,
 *   conv 4x4 s1 p1 (-> 1, bias): raw logits.
 *
 * Channels ndf * min(2^n, 8). BatchNorm runs in training mode (batch
 * statistics; running statistics updated with momentum 0.1). Parameter names
 * follow taming's Sequential: main.0, main.2, main.3 (BN), ...
 *
 * Data-parallel training with statistics over the global batch sets
 * sum_across: every BatchNorm then adds its per-channel sums (forward: sum x,
 * sum x^2 and the count; backward: sum dy, sum dy xhat) over all processes
 * before it uses them, as PyTorch's SyncBatchNorm does. */
#ifndef KV_DISCRIMINATOR_H
#define KV_DISCRIMINATOR_H

#include "backend/backend.h"
#include "model/model.h"
#include "train/param_set.h"

#define KV_DISC_MAX_LAYERS 6

typedef struct kv_disc {
    kv_backend *be; /* borrowed */
    int layers, channels, in_channels;
    int convs; /* layers + 2 */
    kv_conv conv[KV_DISC_MAX_LAYERS + 2];
    kv_norm bn[KV_DISC_MAX_LAYERS + 2]; /* for convs 1 .. layers */
    float *running_mean[KV_DISC_MAX_LAYERS + 2], *running_var[KV_DISC_MAX_LAYERS + 2]; /* host */
    kv_param params[4 * (KV_DISC_MAX_LAYERS + 2)]; /* the trainable tensors */
    int num_params;
    /* NULL: each process's own batch statistics. Else values[0 .. count) =
     * their sum over all processes, in place, the same on every process. */
    klvae_status_t (*sum_across)(void *ctx, double *values, size_t count);
    void *sum_across_ctx;
} kv_disc;

/* Builds and allocates; initialises as taming's weights_init (conv weights
 * N(0, 0.02), biases uniform(+-1/sqrt(fan_in)), BN weight N(1, 0.02), bias 0)
 * from seed. */
klvae_status_t kv_disc_create(kv_backend *be, int in_channels, int channels, int layers,
                              uint64_t seed, kv_disc **out);
/* Replaces the weights (and BN running statistics) by those of a
 * safetensors file with taming names main.N.*, optionally prefixed
 * "loss.discriminator." or "discriminator.". */
klvae_status_t kv_disc_load(kv_disc *d, const char *path);
void kv_disc_free(kv_disc *d);

/* A shadow with the same shapes (gradients, Adam moments), zeroed. */
klvae_status_t kv_disc_create_like(const kv_disc *d, kv_disc **out);

/* The trainable tensors as a param set (train/param_set.h). */
static inline kv_param_set kv_disc_param_set(const kv_disc *d)
{
    kv_param_set s = {d ? (kv_param *)d->params : NULL, d ? (size_t)d->num_params : 0};
    return s;
}

typedef struct kv_disc_tape {
    kv_tensor in[KV_DISC_MAX_LAYERS + 2];  /* each conv's input (in[0] borrowed) */
    kv_tensor pre[KV_DISC_MAX_LAYERS + 2]; /* each BN's input (the conv output) */
    kv_tensor mean[KV_DISC_MAX_LAYERS + 2], invstd[KV_DISC_MAX_LAYERS + 2];
    double count[KV_DISC_MAX_LAYERS + 2]; /* values each BN's statistics are over */
} kv_disc_tape;

/* logits = D(x) in training mode, keeping the tape (logits allocated). */
/* The smallest image side the discriminator takes (24 for 3 layers). */
int kv_disc_min_size(const kv_disc *d);

klvae_status_t kv_disc_forward(kv_disc *d, const kv_tensor *x, kv_disc_tape *t,
                               kv_tensor *logits);
/* From d_logits: accumulates weight gradients into g (NULL: frozen) and,
 * when dx is not NULL, allocates the input gradient. Frees the tape. */
klvae_status_t kv_disc_backward(kv_disc *d, kv_disc *g, kv_disc_tape *t,
                                const kv_tensor *d_logits, kv_tensor *dx);
void kv_disc_tape_free(kv_backend *be, kv_disc_tape *t);

#endif
