/* layers.h — the pieces every network of the library is built from (the
 * VAE, LPIPS, the discriminator): a convolution with its output allocated,
 * the geometries the graphs use, a group norm as a convolution's prologue.
 * Written against the backend interface only. */
#ifndef KV_LAYERS_H
#define KV_LAYERS_H

#include "model/model.h"

#define KV_GN_EPS 1e-6f /* every GroupNorm of the VAE */

/* The three convolution geometries of the VAE. */
static const kv_conv_geometry kv_same_3x3 = {1, 1, 1, 1, 1};
static const kv_conv_geometry kv_pointwise = {1, 0, 0, 0, 0};
/* Downsample2D: zero pad (left 0, right 1, top 0, bottom 1), then stride 2. */
static const kv_conv_geometry kv_downsample = {2, 0, 0, 1, 1};

/* Group-norm statistics of one tensor: scale and shift (N, C) for the
 * prologue of the conv that reads the norm, and, for a backward, mean and
 * rstd (N, G). */
typedef struct kv_norm_state {
    kv_tensor scale, shift, mean, rstd;
} kv_norm_state;

void kv_norm_state_free(kv_backend *be, kv_norm_state *n);

/* act(group_norm(x)) as a convolution's prologue. */
static inline kv_conv_prologue kv_norm_prologue(const kv_norm_state *n, kv_activation act)
{
    kv_conv_prologue p = {&n->scale, &n->shift, act, false};
    return p;
}

/* The decoder's nearest 2x upsample as a convolution's prologue. */
static const kv_conv_prologue kv_upsample_prologue = {NULL, NULL, KV_ACT_NONE, true};

/* A Linear layer's (C, C) weight viewed as a (C, C, 1, 1) convolution. */
kv_conv kv_conv_as_1x1(const kv_conv *c, int channels);

/* y = conv(prologue(x)) + bias (+ residual when not NULL) into y, which the
 * caller allocated. The bias is left out when c has none (its data is
 * NULL). */
klvae_status_t kv_conv_into(kv_backend *be, const kv_conv *c, const kv_tensor *x,
                            const kv_conv_prologue *prologue, const kv_tensor *residual,
                            kv_conv_geometry g, kv_tensor *y);

/* The same into a new tensor of the output's shape; y is empty on error. */
klvae_status_t kv_conv_new(kv_backend *be, const kv_conv *c, const kv_tensor *x,
                           const kv_conv_prologue *prologue, const kv_tensor *residual,
                           kv_conv_geometry g, kv_tensor *y);

#endif /* KV_LAYERS_H */
