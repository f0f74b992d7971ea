/* layers.c — see layers.h. */
#include <string.h>

#include "model/layers.h"

void kv_norm_state_free(kv_backend *be, kv_norm_state *n)
{
    kv_tensor_release(be, &n->scale);
    kv_tensor_release(be, &n->shift);
    kv_tensor_release(be, &n->mean);
    kv_tensor_release(be, &n->rstd);
}

kv_conv kv_conv_as_1x1(const kv_conv *c, int channels)
{
    kv_conv v = *c;
    if (c->weight.ndim == 2)
        v.weight = kv_tensor_view4(&c->weight, channels, channels, 1, 1);
    return v;
}

klvae_status_t kv_conv_into(kv_backend *be, const kv_conv *c, const kv_tensor *x,
                            const kv_conv_prologue *prologue, const kv_tensor *residual,
                            kv_conv_geometry g, kv_tensor *y)
{
    return be->ops->conv2d(be, x, prologue, &c->weight, c->bias.data ? &c->bias : NULL, residual,
                           g, y);
}

klvae_status_t kv_conv_new(kv_backend *be, const kv_conv *c, const kv_tensor *x,
                           const kv_conv_prologue *prologue, const kv_tensor *residual,
                           kv_conv_geometry g, kv_tensor *y)
{
    klvae_status_t st =
        kv_conv_output_alloc(be, x, prologue && prologue->upsample2x, &c->weight, g, y);
    if (st == KLVAE_OK)
        st = kv_conv_into(be, c, x, prologue, residual, g, y);
    if (st != KLVAE_OK)
        kv_tensor_release(be, y);
    return st;
}
