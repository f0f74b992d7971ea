/* tensor.c — small helpers around kv_tensor. */
#include <string.h>

#include "backend/backend.h"

size_t kv_tensor_numel(const kv_tensor *t)
{
    size_t n = 1;
    for (int i = 0; i < t->ndim; i++)
        n *= (size_t)t->shape[i];
    return n;
}

kv_tensor kv_tensor_view4(const kv_tensor *t, int n, int c, int h, int w)
{
    kv_tensor v = *t;
    v.ndim = 4;
    v.shape[0] = n;
    v.shape[1] = c;
    v.shape[2] = h;
    v.shape[3] = w;
    v.owned = false;
    return v;
}

kv_tensor kv_tensor_wrap(void *data, int n, int c, int h, int w)
{
    kv_tensor t;
    memset(&t, 0, sizeof t);
    t.data = data;
    t.ndim = 4;
    t.shape[0] = n;
    t.shape[1] = c;
    t.shape[2] = h;
    t.shape[3] = w;
    t.dtype = KV_F32;
    return t;
}

static klvae_status_t tensor_alloc(kv_backend *be, int n, int c, int h, int w,
                                   kv_storage storage, kv_tensor *out)
{
    size_t count, bytes;
    memset(out, 0, sizeof *out);
    if (!kv_numel4(n, c, h, w, &count) || !kv_mul_size(count, sizeof(float), &bytes))
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "tensor of %d x %d x %d x %d is too large", n, c,
                        h, w);
    void *data = NULL;
    klvae_status_t st = be->ops->alloc(be, bytes, storage, &data);
    if (st != KLVAE_OK)
        return st;
    *out = kv_tensor_wrap(data, n, c, h, w);
    out->owned = true;
    return KLVAE_OK;
}

void kv_tensor_release(kv_backend *be, kv_tensor *t)
{
    if (t->owned && t->data)
        be->ops->release(be, t->data);
    memset(t, 0, sizeof *t);
}

klvae_status_t kv_tensor_alloc(kv_backend *be, int n, int c, int h, int w, kv_tensor *out)
{
    return tensor_alloc(be, n, c, h, w, KV_STORAGE_COMPUTE, out);
}

klvae_status_t kv_tensor_alloc_f32(kv_backend *be, int n, int c, int h, int w, kv_tensor *out)
{
    return tensor_alloc(be, n, c, h, w, KV_STORAGE_FLOAT32, out);
}

klvae_status_t kv_tensor_alloc_like(kv_backend *be, const kv_tensor *like, kv_tensor *out)
{
    return kv_tensor_alloc(be, like->shape[0], like->shape[1], like->shape[2], like->shape[3],
                           out);
}

klvae_status_t kv_conv_output_alloc(kv_backend *be, const kv_tensor *x, bool upsample2x,
                                    const kv_tensor *w, kv_conv_geometry g, kv_tensor *y)
{
    const int kh = w->ndim == 4 ? w->shape[2] : 1, kw = w->ndim == 4 ? w->shape[3] : 1;
    const int up = upsample2x ? 1 : 0;
    const int ho = ((x->shape[2] << up) + g.pad_top + g.pad_bottom - kh) / g.stride + 1;
    const int wo = ((x->shape[3] << up) + g.pad_left + g.pad_right - kw) / g.stride + 1;
    if (ho < 1 || wo < 1) {
        memset(y, 0, sizeof *y);
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "a %d x %d input is too small for a %d x %d convolution of stride %d",
                        x->shape[2], x->shape[3], kh, kw, g.stride);
    }
    return kv_tensor_alloc(be, x->shape[0], w->shape[0], ho, wo, y);
}
