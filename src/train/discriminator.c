/* discriminator.c — see discriminator.h. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/philox.h"
#include "formats/safetensors.h"
#include "model/layers.h"
#include "train/discriminator.h"

#define BN_EPS 1e-5f
#define BN_MOMENTUM 0.1f

/* taming's Sequential index of conv i, and of its BatchNorm (conv + 1). */
static int main_index(const kv_disc *d, int i)
{
    return i == 0 ? 0 : (i <= d->layers ? 2 + 3 * (i - 1) : 2 + 3 * d->layers);
}

static kv_conv_geometry geometry(const kv_disc *d, int i)
{
    kv_conv_geometry g = {i < d->layers ? 2 : 1, 1, 1, 1, 1};
    return g;
}

static bool has_bn(const kv_disc *d, int i)
{
    return i >= 1 && i <= d->layers;
}

static void add_param(kv_disc *d, kv_tensor *t, const char *fmt, int index, const char *what,
                      kv_param_kind kind, int fan_in)
{
    kv_param *p = &d->params[d->num_params++];
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, fmt, index, what);
    p->tensor = t;
    p->kind = kind;
    p->fan_in = fan_in;
}

void kv_disc_free(kv_disc *d)
{
    if (!d)
        return;
    for (int i = 0; i < d->num_params; i++)
        kv_tensor_release(d->be, d->params[i].tensor);
    for (int i = 0; i < d->convs; i++) {
        free(d->running_mean[i]);
        free(d->running_var[i]);
    }
    free(d);
}

/* Shapes and parameter list, no values. */
static klvae_status_t disc_build(kv_backend *be, int in_channels, int channels, int layers,
                                 kv_storage storage, kv_disc **out)
{
    *out = NULL;
    if (layers < 1 || layers > KV_DISC_MAX_LAYERS || channels < 1 || channels > 1024)
        return kv_error(KLVAE_ERR_OPTION,
                        "a discriminator of %d layers and %d channels is not supported "
                        "(disc_layers 1 to %d, disc_channels 1 to 1024)",
                        layers, channels, KV_DISC_MAX_LAYERS);
    kv_disc *d = calloc(1, sizeof *d);
    if (!d)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory creating the discriminator");
    d->be = be;
    d->layers = layers;
    d->channels = channels;
    d->in_channels = in_channels;
    d->convs = layers + 2;
    int in = in_channels;
    for (int i = 0; i < d->convs; i++) {
        int mult = i <= layers ? (1 << (i < 3 ? i : 3)) : 0;
        int out_ch = i == d->convs - 1 ? 1 : channels * KV_MIN(mult, 8);
        bool bias = !has_bn(d, i);
        kv_conv *c = &d->conv[i];
        c->weight.ndim = 4;
        c->weight.shape[0] = out_ch;
        c->weight.shape[1] = in;
        c->weight.shape[2] = c->weight.shape[3] = 4;
        add_param(d, &c->weight, "main.%d.%s", main_index(d, i), "weight", KV_PARAM_WEIGHT,
                  in * 16);
        if (bias) {
            c->bias.ndim = 1;
            c->bias.shape[0] = out_ch;
            add_param(d, &c->bias, "main.%d.%s", main_index(d, i), "bias", KV_PARAM_BIAS,
                      in * 16);
        }
        if (has_bn(d, i)) {
            d->bn[i].weight.ndim = d->bn[i].bias.ndim = 1;
            d->bn[i].weight.shape[0] = d->bn[i].bias.shape[0] = out_ch;
            add_param(d, &d->bn[i].weight, "main.%d.%s", main_index(d, i) + 1, "weight",
                      KV_PARAM_NORM_WEIGHT, 0);
            add_param(d, &d->bn[i].bias, "main.%d.%s", main_index(d, i) + 1, "bias",
                      KV_PARAM_NORM_BIAS, 0);
            d->running_mean[i] = calloc((size_t)out_ch, sizeof(float));
            d->running_var[i] = malloc((size_t)out_ch * sizeof(float));
            if (!d->running_mean[i] || !d->running_var[i]) {
                kv_disc_free(d);
                return kv_error(KLVAE_ERR_OUT_OF_MEMORY,
                                "out of memory creating the discriminator");
            }
            for (int c2 = 0; c2 < out_ch; c2++)
                d->running_var[i][c2] = 1.0f;
        }
        in = out_ch;
    }
    for (int i = 0; i < d->num_params; i++) {
        kv_tensor *t = d->params[i].tensor;
        klvae_status_t st =
            be->ops->alloc(be, kv_tensor_numel(t) * sizeof(float), storage, &t->data);
        if (st != KLVAE_OK) {
            kv_disc_free(d);
            return st;
        }
        t->owned = true;
        t->dtype = KV_F32;
    }
    *out = d;
    return KLVAE_OK;
}

klvae_status_t kv_disc_create(kv_backend *be, int in_channels, int channels, int layers,
                              uint64_t seed, kv_disc **out)
{
    kv_disc *d;
    klvae_status_t st = disc_build(be, in_channels, channels, layers, KV_STORAGE_COMPUTE, &d);
    if (st != KLVAE_OK)
        return st;
    size_t largest = 1;
    for (int i = 0; i < d->num_params; i++)
        largest = KV_MAX(largest, kv_tensor_numel(d->params[i].tensor));
    float *host = malloc(largest * sizeof *host);
    if (!host) {
        kv_disc_free(d);
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory creating the discriminator");
    }
    for (int i = 0; i < d->num_params && st == KLVAE_OK; i++) {
        const kv_param *p = &d->params[i];
        size_t n = kv_tensor_numel(p->tensor);
        uint64_t base = (uint64_t)(i + 1) << 36;
        for (size_t e = 0; e < n; e++) {
            switch (p->kind) {
            case KV_PARAM_WEIGHT: host[e] = 0.02f * kv_philox_normal(seed, base + e); break;
            case KV_PARAM_BIAS: {
                float bound = (float)(1.0 / sqrt((double)p->fan_in));
                host[e] = (2.0f * kv_philox_uniform(seed, base + e) - 1.0f) * bound;
                break;
            }
            case KV_PARAM_NORM_WEIGHT:
                host[e] = 1.0f + 0.02f * kv_philox_normal(seed, base + e);
                break;
            case KV_PARAM_NORM_BIAS: host[e] = 0.0f; break;
            }
        }
        st = be->ops->upload(be, p->tensor, host);
    }
    free(host);
    if (st != KLVAE_OK) {
        kv_disc_free(d);
        return st;
    }
    *out = d;
    return KLVAE_OK;
}

klvae_status_t kv_disc_create_like(const kv_disc *d, kv_disc **out)
{
    kv_disc *g;
    klvae_status_t st =
        disc_build(d->be, d->in_channels, d->channels, d->layers, KV_STORAGE_FLOAT32, &g);
    for (int i = 0; st == KLVAE_OK && i < g->num_params; i++)
        st = g->be->ops->fill(g->be, g->params[i].tensor, 0.0f);
    if (st != KLVAE_OK) {
        kv_disc_free(g);
        return st;
    }
    *out = g;
    return KLVAE_OK;
}

static const char *const disc_prefixes[] = {"", "loss.discriminator.", "discriminator."};

static const kv_st_tensor *find_prefixed(const kv_safetensors *st, const char *name)
{
    return kv_st_find_prefixed(st, disc_prefixes, KV_ARRAY_LEN(disc_prefixes), name);
}

/* The tensor called name (any accepted prefix), checked to have want's
 * shape. */
static klvae_status_t find_exact_shape(const kv_safetensors *st, const char *name,
                                       const kv_tensor *want, const kv_st_tensor **out)
{
    const kv_st_tensor *t = *out = find_prefixed(st, name);
    if (!t)
        return kv_error(KLVAE_ERR_MISSING_TENSOR, "%s: missing tensor '%s' of the discriminator",
                        st->path, name);
    bool same = t->ndim == want->ndim;
    for (int k = 0; same && k < t->ndim; k++)
        same = t->shape[k] == want->shape[k];
    if (!same)
        return kv_error(KLVAE_ERR_SHAPE,
                        "%s: discriminator tensor '%s' has another shape than disc_layers and "
                        "disc_channels give (first dimension %lld, expected %d)",
                        st->path, t->name, t->ndim ? (long long)t->shape[0] : 0LL, want->shape[0]);
    return KLVAE_OK;
}

klvae_status_t kv_disc_load(kv_disc *d, const char *path)
{
    kv_safetensors st;
    klvae_status_t status = kv_st_open(path, &st);
    if (status != KLVAE_OK)
        return status;
    size_t largest = 1;
    for (int i = 0; i < d->num_params; i++)
        largest = KV_MAX(largest, kv_tensor_numel(d->params[i].tensor));
    float *host = malloc(largest * sizeof *host);
    if (!host)
        status = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory loading %s", path);
    const kv_st_tensor *t = NULL;
    for (int i = 0; status == KLVAE_OK && i < d->num_params; i++) {
        const kv_param *p = &d->params[i];
        status = find_exact_shape(&st, p->name, p->tensor, &t);
        if (status == KLVAE_OK)
            status = kv_weights_read(d->be, &st, t, host, p->tensor);
    }
    /* Running statistics are optional: a file without them keeps 0 and 1. */
    for (int i = 0; status == KLVAE_OK && i < d->convs; i++) {
        if (!has_bn(d, i))
            continue;
        char name[64];
        snprintf(name, sizeof name, "main.%d.running_mean", main_index(d, i) + 1);
        if (!find_prefixed(&st, name))
            continue;
        kv_tensor want = d->bn[i].weight;
        status = find_exact_shape(&st, name, &want, &t);
        if (status == KLVAE_OK) /* host arrays: read and checked in place */
            status = kv_weights_check_finite(&st, t, d->running_mean[i]);
        snprintf(name, sizeof name, "main.%d.running_var", main_index(d, i) + 1);
        if (status == KLVAE_OK)
            status = find_exact_shape(&st, name, &want, &t);
        if (status == KLVAE_OK)
            status = kv_weights_check_finite(&st, t, d->running_var[i]);
    }
    free(host);
    kv_st_close(&st);
    return status;
}

void kv_disc_tape_free(kv_backend *be, kv_disc_tape *t)
{
    for (int i = 0; i < KV_DISC_MAX_LAYERS + 2; i++) {
        if (i > 0)
            kv_tensor_release(be, &t->in[i]);
        kv_tensor_release(be, &t->pre[i]);
        kv_tensor_release(be, &t->mean[i]);
        kv_tensor_release(be, &t->invstd[i]);
    }
    memset(t, 0, sizeof *t);
}

int kv_disc_min_size(const kv_disc *d)
{
    for (int side = 1;; side++) {
        int s = side;
        for (int i = 0; i < d->convs && s >= 1; i++)
            s = s + 2 - 4 < 0 ? 0 : (s + 2 - 4) / geometry(d, i).stride + 1;
        if (s >= 1)
            return side;
    }
}

/* Conv i's BatchNorm on t->pre[i] into y (allocated): the batch's
 * per-channel sums (over every process's batch with sum_across), then the
 * normalisation; the tape keeps mean, invstd and the count. */
static klvae_status_t bn_forward(kv_disc *d, int i, kv_disc_tape *t, kv_tensor *y)
{
    kv_backend *be = d->be;
    const kv_tensor *pre = &t->pre[i];
    const size_t c = (size_t)pre->shape[1];
    double *sums = malloc((2 * c + 1) * sizeof *sums);
    if (!sums)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory in the discriminator");
    /* statistics in float32 whatever the backend computes in: the backward
     * recomputes xhat from them */
    klvae_status_t st = kv_tensor_alloc_f32(be, 1, (int)c, 1, 1, &t->mean[i]);
    if (st == KLVAE_OK)
        st = kv_tensor_alloc_f32(be, 1, (int)c, 1, 1, &t->invstd[i]);
    if (st == KLVAE_OK)
        st = kv_tensor_alloc_like(be, pre, y);
    if (st == KLVAE_OK)
        st = be->ops->batch_norm_stats(be, pre, sums);
    sums[2 * c] = (double)pre->shape[0] * pre->shape[2] * pre->shape[3];
    if (st == KLVAE_OK && d->sum_across)
        st = d->sum_across(d->sum_across_ctx, sums, 2 * c + 1);
    t->count[i] = sums[2 * c];
    if (st == KLVAE_OK)
        st = be->ops->batch_norm(be, pre, &d->bn[i].weight, &d->bn[i].bias, sums, t->count[i],
                                 BN_EPS, BN_MOMENTUM, d->running_mean[i], d->running_var[i], y,
                                 &t->mean[i], &t->invstd[i]);
    free(sums);
    return st;
}

/* The backward of conv i's BatchNorm: dx (allocated) from dy; its weight
 * and bias gradients accumulate into g (NULL: frozen). The gradient sums
 * are added over every process's batch with sum_across, as the statistics
 * were. */
static klvae_status_t bn_backward(kv_disc *d, kv_disc *g, int i, const kv_disc_tape *t,
                                  const kv_tensor *dy, kv_tensor *dx)
{
    kv_backend *be = d->be;
    const kv_tensor *pre = &t->pre[i];
    const size_t c = (size_t)pre->shape[1];
    double *sums = malloc(2 * c * sizeof *sums);
    if (!sums)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory in the discriminator");
    klvae_status_t st = kv_tensor_alloc_like(be, pre, dx);
    if (st == KLVAE_OK)
        st = be->ops->batch_norm_backward_stats(be, pre, &t->mean[i], &t->invstd[i], dy, sums,
                                                g ? &g->bn[i].weight : NULL,
                                                g ? &g->bn[i].bias : NULL);
    if (st == KLVAE_OK && d->sum_across)
        st = d->sum_across(d->sum_across_ctx, sums, 2 * c);
    if (st == KLVAE_OK)
        st = be->ops->batch_norm_backward(be, pre, &d->bn[i].weight, &t->mean[i], &t->invstd[i],
                                          dy, sums, t->count[i], dx);
    free(sums);
    return st;
}

klvae_status_t kv_disc_forward(kv_disc *d, const kv_tensor *x, kv_disc_tape *t, kv_tensor *logits)
{
    kv_backend *be = d->be;
    memset(t, 0, sizeof *t);
    memset(logits, 0, sizeof *logits);
    t->in[0] = *x;
    t->in[0].owned = false;
    klvae_status_t st = KLVAE_OK;
    for (int i = 0; i < d->convs && st == KLVAE_OK; i++) {
        const kv_tensor *in = &t->in[i];
        if (in->shape[2] < 2 || in->shape[3] < 2) { /* a 4x4 kernel needs 1 + 2 + 1 rows */
            st = kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                          "images are too small for a %d-layer discriminator", d->layers);
            break;
        }
        kv_tensor y = {0};
        st = kv_conv_new(be, &d->conv[i], in, NULL, NULL, geometry(d, i), &y);
        if (st != KLVAE_OK)
            break;
        if (i == d->convs - 1) {
            *logits = y;
            return KLVAE_OK;
        }
        if (has_bn(d, i)) {
            t->pre[i] = y;
            memset(&y, 0, sizeof y);
            st = bn_forward(d, i, t, &y);
        }
        if (st == KLVAE_OK)
            st = be->ops->activation(be, &y, KV_ACT_LEAKY_RELU, &y);
        t->in[i + 1] = y;
    }
    kv_disc_tape_free(be, t);
    return st;
}

klvae_status_t kv_disc_backward(kv_disc *d, kv_disc *g, kv_disc_tape *t,
                                const kv_tensor *d_logits, kv_tensor *dx)
{
    kv_backend *be = d->be;
    kv_tensor cur = {0}, din = {0};
    klvae_status_t st = KLVAE_OK;
    if (dx)
        memset(dx, 0, sizeof *dx);
    const kv_tensor *dy = d_logits;
    for (int i = d->convs - 1; i >= 0 && st == KLVAE_OK; i--) {
        kv_conv_geometry geo = geometry(d, i);
        if (g)
            st = be->ops->conv2d_backward_weight(be, &t->in[i], NULL, dy, geo, &g->conv[i].weight,
                                                 g->conv[i].bias.data ? &g->conv[i].bias : NULL);
        if (st != KLVAE_OK || (i == 0 && !dx))
            break;
        const kv_tensor *in = &t->in[i];
        st = kv_tensor_alloc(be, in->shape[0], in->shape[1], in->shape[2], in->shape[3], &din);
        if (st == KLVAE_OK)
            st = be->ops->conv2d_backward_data(be, dy, &d->conv[i].weight, geo, &din);
        kv_tensor_release(be, &cur);
        cur = din;
        memset(&din, 0, sizeof din);
        dy = &cur;
        if (st != KLVAE_OK || i == 0)
            break;
        /* through conv i-1's LeakyReLU (from its output) and BatchNorm */
        st = be->ops->activation_backward(be, &t->in[i], &cur, KV_ACT_LEAKY_RELU, &cur);
        if (st == KLVAE_OK && has_bn(d, i - 1)) {
            st = bn_backward(d, g, i - 1, t, &cur, &din);
            kv_tensor_release(be, &cur);
            cur = din;
            memset(&din, 0, sizeof din);
            dy = &cur;
        }
    }
    if (st == KLVAE_OK && dx) {
        *dx = cur;
        memset(&cur, 0, sizeof cur);
    }
    kv_tensor_release(be, &cur);
    kv_tensor_release(be, &din);
    kv_disc_tape_free(be, t);
    return st;
}
