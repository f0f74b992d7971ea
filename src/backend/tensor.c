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

klvae_status_t kv_tensor_alloc(kv_backend *be, int n, int c, int h, int w, kv_tensor *out)
{
    size_t count, bytes;
    memset(out, 0, sizeof *out);
    if (!kv_numel4(n, c, h, w, &count) || !kv_mul_size(count, sizeof(float), &bytes))
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "tensor of %d x %d x %d x %d is too large", n, c,
                        h, w);
    void *data = NULL;
    klvae_status_t st = be->ops->alloc(be, bytes, &data);
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
