/* lpips.c — see lpips.h. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "formats/safetensors.h"
#include "model/layers.h"
#include "train/lpips.h"

/* torchvision's features indices of the 13 convolutions, and the block
 * (tap) each belongs to. */
static const int conv_index[KV_LPIPS_CONVS] = {0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28};
static const int conv_block[KV_LPIPS_CONVS] = {0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4};
static const int tap_conv[KV_LPIPS_TAPS] = {1, 3, 6, 9, 12}; /* relu1_2 ... relu5_3 */
static const float scaling_shift[3] = {-0.030f, -0.088f, -0.188f};
static const float scaling_scale[3] = {0.458f, 0.448f, 0.450f};

static bool last_of_block(int i)
{
    return i == KV_LPIPS_CONVS - 1 || conv_block[i + 1] != conv_block[i];
}

static const char *const prefixes[] = {"", "loss.perceptual_loss.", "perceptual_loss."};

/* The tensor for conv i's weight or bias under any accepted name. */
static const kv_st_tensor *find_conv(const kv_safetensors *st, int i, const char *what)
{
    char torchvision[64], lpips[64];
    snprintf(torchvision, sizeof torchvision, "features.%d.%s", conv_index[i], what);
    snprintf(lpips, sizeof lpips, "net.slice%d.%d.%s", conv_block[i] + 1, conv_index[i], what);
    const kv_st_tensor *t = kv_st_find_prefixed(st, prefixes, KV_ARRAY_LEN(prefixes), torchvision);
    return t ? t : kv_st_find_prefixed(st, prefixes, KV_ARRAY_LEN(prefixes), lpips);
}

static const kv_st_tensor *find_lin(const kv_safetensors *st, int k)
{
    char single[64], listed[64];
    snprintf(single, sizeof single, "lin%d.model.1.weight", k);
    snprintf(listed, sizeof listed, "lins.%d.model.1.weight", k);
    const kv_st_tensor *t = kv_st_find_prefixed(st, prefixes, KV_ARRAY_LEN(prefixes), single);
    return t ? t : kv_st_find_prefixed(st, prefixes, KV_ARRAY_LEN(prefixes), listed);
}

static klvae_status_t load_tensor(kv_backend *be, const kv_safetensors *st, const kv_st_tensor *t,
                                  int n, int c, int h, int w, kv_tensor *out)
{
    klvae_status_t status = kv_tensor_alloc(be, n, c, h, w, out);
    float *staging = NULL;
    if (status == KLVAE_OK && !be->host_memory) {
        staging = malloc(kv_tensor_numel(out) * sizeof(float));
        if (!staging)
            status = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory loading %s", st->path);
    }
    if (status == KLVAE_OK)
        status = kv_weights_read(be, st, t, staging, out);
    free(staging);
    return status;
}

void kv_lpips_free(kv_lpips *l)
{
    if (!l)
        return;
    for (int i = 0; i < KV_LPIPS_CONVS; i++) {
        kv_tensor_release(l->be, &l->convs[i].weight);
        kv_tensor_release(l->be, &l->convs[i].bias);
    }
    for (int k = 0; k < KV_LPIPS_TAPS; k++)
        kv_tensor_release(l->be, &l->lin[k]);
    for (int i = 0; i < KV_LPIPS_CONVS; i++)
        kv_tensor_release(l->be, &l->transposed[i]);
    free(l);
}

/* l->transposed[i][ci][co][ky][kx] = weight[co][ci][2 - ky][2 - kx]: the
 * kernel of conv2d_backward_data for a 3x3, pad 1, stride 1 convolution. */
static klvae_status_t make_transposed(kv_lpips *l, int i)
{
    const kv_tensor *w = &l->convs[i].weight;
    const int co = w->shape[0], ci = w->shape[1];
    const size_t count = kv_tensor_numel(w);
    float *host = malloc(2 * count * sizeof(float));
    if (!host)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory for LPIPS gradients");
    float *flipped = host + count;
    klvae_status_t st = l->be->ops->download(l->be, host, w);
    for (int o = 0; st == KLVAE_OK && o < co; o++)
        for (int c = 0; c < ci; c++)
            for (int t = 0; t < 9; t++)
                flipped[((size_t)c * co + o) * 9 + t] = host[((size_t)o * ci + c) * 9 + 8 - t];
    if (st == KLVAE_OK)
        st = kv_tensor_alloc(l->be, ci, co, 3, 3, &l->transposed[i]);
    if (st == KLVAE_OK)
        st = l->be->ops->upload(l->be, &l->transposed[i], flipped);
    if (st != KLVAE_OK)
        kv_tensor_release(l->be, &l->transposed[i]);
    free(host);
    return st;
}

klvae_status_t kv_lpips_load(kv_backend *be, const char *path, kv_lpips **out)
{
    *out = NULL;
    kv_safetensors st;
    klvae_status_t status = kv_st_open(path, &st);
    if (status != KLVAE_OK)
        return status;
    kv_lpips *l = calloc(1, sizeof *l);
    if (!l) {
        kv_st_close(&st);
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory loading %s", path);
    }
    l->be = be;
    int in = 3;
    for (int i = 0; i < KV_LPIPS_CONVS && status == KLVAE_OK; i++) {
        const kv_st_tensor *w = find_conv(&st, i, "weight"), *b = find_conv(&st, i, "bias");
        if (!w || !b) {
            status = kv_error(KLVAE_ERR_MISSING_TENSOR,
                              "%s: missing tensor 'features.%d.%s' of the LPIPS VGG16 trunk", path,
                              conv_index[i], w ? "bias" : "weight");
            break;
        }
        int co = w->ndim == 4 ? (int)w->shape[0] : -1;
        if (w->ndim != 4 || w->shape[1] != in || w->shape[2] != 3 || w->shape[3] != 3 || co < 1 ||
            co > 4096 || b->ndim != 1 || b->shape[0] != co ||
            (i > 0 && conv_block[i] == conv_block[i - 1] && co != in)) {
            status = kv_error(KLVAE_ERR_SHAPE,
                              "%s: '%s' should be a 3x3 convolution from %d channels (VGG16 "
                              "layout), found a %d-D tensor",
                              path, w->name, in, w->ndim);
            break;
        }
        l->widths[conv_block[i]] = co;
        status = load_tensor(be, &st, w, co, in, 3, 3, &l->convs[i].weight);
        if (status == KLVAE_OK)
            status = load_tensor(be, &st, b, co, 1, 1, 1, &l->convs[i].bias);
        l->convs[i].bias.ndim = 1;
        in = co;
    }
    for (int k = 0; k < KV_LPIPS_TAPS && status == KLVAE_OK; k++) {
        const kv_st_tensor *t = find_lin(&st, k);
        if (!t) {
            status = kv_error(KLVAE_ERR_MISSING_TENSOR,
                              "%s: missing tensor 'lin%d.model.1.weight' (the LPIPS lin weights; "
                              "tools/export_lpips.py writes them)",
                              path, k);
            break;
        }
        if (kv_st_numel(t) != (size_t)l->widths[k] || (t->ndim != 4 && t->ndim != 1)) {
            status = kv_error(KLVAE_ERR_SHAPE, "%s: '%s' should hold %d weights, one per channel",
                              path, t->name, l->widths[k]);
            break;
        }
        status = load_tensor(be, &st, t, 1, l->widths[k], 1, 1, &l->lin[k]);
    }
    kv_st_close(&st);
    if (status != KLVAE_OK) {
        kv_lpips_free(l);
        return status;
    }
    *out = l;
    return KLVAE_OK;
}

/* The trunk on one image batch: relu outputs of every convolution in
 * y[13] (all of them kept for the backward when keep is set; otherwise
 * only the taps are kept), and the unit-normalised taps. */
typedef struct trunk {
    kv_tensor y[KV_LPIPS_CONVS];
    kv_tensor normed[KV_LPIPS_TAPS], norms[KV_LPIPS_TAPS];
} trunk;

static void trunk_free(kv_backend *be, trunk *t)
{
    for (int i = 0; i < KV_LPIPS_CONVS; i++)
        kv_tensor_release(be, &t->y[i]);
    for (int k = 0; k < KV_LPIPS_TAPS; k++) {
        kv_tensor_release(be, &t->normed[k]);
        kv_tensor_release(be, &t->norms[k]);
    }
}

static klvae_status_t trunk_forward(kv_lpips *l, const kv_tensor *images, bool keep, trunk *t)
{
    kv_backend *be = l->be;
    memset(t, 0, sizeof *t);
    const int n = images->shape[0];
    float a[3], b[3];
    for (int c = 0; c < 3; c++) {
        a[c] = 1.0f / scaling_scale[c];
        b[c] = -scaling_shift[c] / scaling_scale[c];
    }
    kv_tensor x = {0}, pooled = {0};
    klvae_status_t st = kv_tensor_alloc(be, n, 3, images->shape[2], images->shape[3], &x);
    if (st == KLVAE_OK)
        st = be->ops->channel_affine(be, images, a, b, &x);
    const kv_tensor *in = &x;
    for (int i = 0; i < KV_LPIPS_CONVS && st == KLVAE_OK; i++) {
        if (i > 0 && conv_block[i] != conv_block[i - 1]) { /* 2x2 max pool first */
            const kv_tensor *prev = &t->y[i - 1];
            st = kv_tensor_alloc(be, n, prev->shape[1], prev->shape[2] / 2, prev->shape[3] / 2,
                                 &pooled);
            if (st == KLVAE_OK && (pooled.shape[2] < 1 || pooled.shape[3] < 1))
                st = kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                              "LPIPS needs images of at least 16 x 16 pixels");
            if (st == KLVAE_OK)
                st = be->ops->max_pool2x2(be, prev, &pooled);
            in = &pooled;
        }
        if (st == KLVAE_OK)
            st = kv_conv_new(be, &l->convs[i], in, NULL, NULL, kv_same_3x3, &t->y[i]);
        if (st == KLVAE_OK)
            st = be->ops->activation(be, &t->y[i], KV_ACT_RELU, &t->y[i]);
        kv_tensor_release(be, &x);
        kv_tensor_release(be, &pooled);
        if (st == KLVAE_OK && last_of_block(i)) {
            int k = conv_block[i];
            const kv_tensor *f = &t->y[i];
            st = kv_tensor_alloc(be, n, f->shape[1], f->shape[2], f->shape[3], &t->normed[k]);
            if (st == KLVAE_OK)
                st = kv_tensor_alloc_f32(be, n, 1, f->shape[2], f->shape[3], &t->norms[k]);
            if (st == KLVAE_OK)
                st = be->ops->unit_normalize(be, f, &t->normed[k], &t->norms[k]);
        }
        /* Without a backward, a convolution's output is only read by the
         * next convolution (or its pool), which has just run. */
        if (!keep && i > 0)
            kv_tensor_release(be, &t->y[i - 1]);
        in = &t->y[i];
    }
    if (!keep)
        kv_tensor_release(be, &t->y[KV_LPIPS_CONVS - 1]);
    if (st != KLVAE_OK)
        trunk_free(be, t);
    return st;
}

/* Elements of one image of a tap. */
static uint64_t image_elements(const kv_tensor *t)
{
    return (uint64_t)t->shape[1] * t->shape[2] * t->shape[3];
}

klvae_status_t kv_lpips_forward(kv_lpips *l, const kv_tensor *a, const kv_tensor *b,
                                float dropout, uint64_t seed, uint64_t first_image,
                                double *distances, const float *grad_scale, kv_tensor *db)
{
    kv_backend *be = l->be;
    const int n = a->shape[0];
    const bool grad = grad_scale != NULL;
    trunk ta, tb;
    double *per_tap = malloc((size_t)n * sizeof(double));
    if (!per_tap)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory for LPIPS distances");
    klvae_status_t st = trunk_forward(l, a, false, &ta);
    if (st != KLVAE_OK) {
        free(per_tap);
        return st;
    }
    st = trunk_forward(l, b, grad, &tb);
    if (st != KLVAE_OK) {
        trunk_free(be, &ta);
        free(per_tap);
        return st;
    }
    kv_tensor dtap[KV_LPIPS_TAPS];
    memset(dtap, 0, sizeof dtap);
    for (int i = 0; i < n; i++)
        distances[i] = 0.0;
    for (int k = 0; k < KV_LPIPS_TAPS && st == KLVAE_OK; k++) {
        kv_tensor dn = {0};
        if (grad)
            st = kv_tensor_alloc(be, n, tb.normed[k].shape[1], tb.normed[k].shape[2],
                                 tb.normed[k].shape[3], &dn);
        if (st == KLVAE_OK)
            st = be->ops->lpips_distance(be, &ta.normed[k], &tb.normed[k], &l->lin[k], dropout,
                                         seed + (uint64_t)k * 0x9E3779B97F4A7C15ull,
                                         first_image * image_elements(&ta.normed[k]), per_tap,
                                         grad_scale, grad ? &dn : NULL);
        for (int i = 0; st == KLVAE_OK && i < n; i++)
            distances[i] += per_tap[i];
        if (st == KLVAE_OK && grad) { /* through the unit normalisation, in place */
            st = be->ops->unit_normalize_backward(be, &tb.y[tap_conv[k]], &tb.norms[k], &dn, &dn);
        }
        dtap[k] = dn;
    }
    free(per_tap);
    trunk_free(be, &ta);
    if (st != KLVAE_OK || !grad) {
        for (int k = 0; k < KV_LPIPS_TAPS; k++)
            kv_tensor_release(be, &dtap[k]);
        trunk_free(be, &tb);
        return st;
    }
    /* Back through the trunk, from the last convolution to the image. */
    kv_tensor d = dtap[KV_LPIPS_TAPS - 1], din = {0};
    memset(&dtap[KV_LPIPS_TAPS - 1], 0, sizeof d);
    for (int i = KV_LPIPS_CONVS - 1; i >= 0 && st == KLVAE_OK; i--) {
        st = be->ops->activation_backward(be, &tb.y[i], &d, KV_ACT_RELU, &d);
        if (st == KLVAE_OK && !l->transposed[i].data)
            st = make_transposed(l, i);
        kv_conv transposed = {l->transposed[i], {0}}; /* no bias */
        if (st == KLVAE_OK) /* the transposed convolution, as backend.h defines it */
            st = kv_conv_new(be, &transposed, &d, NULL, NULL, kv_same_3x3, &din);
        kv_tensor_release(be, &d);
        d = din;
        memset(&din, 0, sizeof din);
        if (st == KLVAE_OK && i > 0 && conv_block[i] != conv_block[i - 1]) {
            /* through the max pool into the previous block's tap */
            const kv_tensor *prev = &tb.y[i - 1];
            st = kv_tensor_alloc(be, n, prev->shape[1], prev->shape[2], prev->shape[3], &din);
            if (st == KLVAE_OK)
                st = be->ops->max_pool2x2_backward(be, prev, &d, &din);
            kv_tensor_release(be, &d);
            d = din;
            memset(&din, 0, sizeof din);
            int k = conv_block[i - 1];
            if (st == KLVAE_OK)
                st = be->ops->add(be, &d, &dtap[k], &d);
            kv_tensor_release(be, &dtap[k]);
        }
    }
    if (st == KLVAE_OK) { /* the scaling layer */
        float s[3];
        for (int c = 0; c < 3; c++)
            s[c] = 1.0f / scaling_scale[c];
        st = kv_tensor_alloc(be, n, 3, b->shape[2], b->shape[3], db);
        if (st == KLVAE_OK)
            st = be->ops->channel_affine(be, &d, s, NULL, db);
    }
    kv_tensor_release(be, &d);
    for (int k = 0; k < KV_LPIPS_TAPS; k++)
        kv_tensor_release(be, &dtap[k]);
    trunk_free(be, &tb);
    return st;
}

/* Stages one host image batch on the backend (a view when it computes in
 * host memory). */
static klvae_status_t stage_host(kv_backend *be, const float *host, int n, int h, int w,
                                 kv_tensor *t)
{
    if (be->host_memory) {
        *t = kv_tensor_wrap((float *)host, n, 3, h, w);
        return KLVAE_OK;
    }
    klvae_status_t st = kv_tensor_alloc(be, n, 3, h, w, t);
    if (st == KLVAE_OK)
        st = be->ops->upload(be, t, host);
    return st;
}

klvae_status_t kv_lpips_distance_host(kv_lpips *l, const float *a, const float *b, int n, int h,
                                      int w, double *distances)
{
    if (!l || !a || !b || !distances || n <= 0 || h < 16 || w < 16)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "kv_lpips_distance_host: NULL pointer or bad size (%d, 3, %d, %d); LPIPS "
                        "takes images of at least 16 x 16",
                        n, h, w);
    kv_tensor ta = {0}, tb = {0};
    klvae_status_t st = stage_host(l->be, a, n, h, w, &ta);
    if (st == KLVAE_OK)
        st = stage_host(l->be, b, n, h, w, &tb);
    if (st == KLVAE_OK)
        st = kv_lpips_forward(l, &ta, &tb, 0.0f, 0, 0, distances, NULL, NULL);
    kv_tensor_release(l->be, &ta);
    kv_tensor_release(l->be, &tb);
    return st;
}
