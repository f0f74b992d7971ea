/* vae.c — the AutoencoderKL forward pass, written once against the backend
 * interface (src/backend/backend.h). Intermediate tensors are released as soon as
 * the next layer has consumed them, so the memory held at any moment is the
 * live set of the network, not its history. */
#include <math.h>
#include <string.h>

#include "model/vae.h"

#define GN_EPS 1e-6f /* every GroupNorm of the model */

static const kv_conv_geometry same_3x3 = {1, 1, 1, 1, 1};
static const kv_conv_geometry pointwise = {1, 0, 0, 0, 0};
/* Downsample2D: zero pad (left 0, right 1, top 0, bottom 1), then stride 2. */
static const kv_conv_geometry downsample = {2, 0, 0, 1, 1};

/* y = conv(prologue(x)) into y, which the caller allocated. */
static klvae_status_t conv_into(kv_backend *be, const kv_conv *c, const kv_tensor *x,
                                const kv_conv_prologue *prologue, kv_conv_geometry g,
                                kv_tensor *y)
{
    return be->ops->conv2d(be, x, prologue, &c->weight, &c->bias, g, y);
}

/* y = conv(prologue(x)) into a new tensor. */
static klvae_status_t conv_new(kv_backend *be, const kv_conv *c, const kv_tensor *x,
                               const kv_conv_prologue *prologue, kv_conv_geometry g, kv_tensor *y)
{
    const kv_tensor *w = &c->weight;
    int kh = w->ndim == 4 ? w->shape[2] : 1, kw = w->ndim == 4 ? w->shape[3] : 1;
    int ho = (x->shape[2] + g.pad_top + g.pad_bottom - kh) / g.stride + 1;
    int wo = (x->shape[3] + g.pad_left + g.pad_right - kw) / g.stride + 1;
    klvae_status_t st = kv_tensor_alloc(be, x->shape[0], w->shape[0], ho, wo, y);
    if (st != KLVAE_OK)
        return st;
    st = conv_into(be, c, x, prologue, g, y);
    if (st != KLVAE_OK)
        kv_tensor_release(be, y);
    return st;
}

/* A group norm (and activation) of x, as the prologue of the convolution
 * that consumes it: only the (N, C) scale and shift are stored. */
typedef struct norm_prologue {
    kv_conv_prologue p;
    kv_tensor scale, shift;
} norm_prologue;

static klvae_status_t norm_prologue_make(klvae_model_t *m, const kv_norm *nm, kv_activation act,
                                         const kv_tensor *x, norm_prologue *out)
{
    kv_backend *be = m->be;
    memset(out, 0, sizeof *out);
    klvae_status_t st = kv_tensor_alloc(be, x->shape[0], x->shape[1], 1, 1, &out->scale);
    if (st == KLVAE_OK)
        st = kv_tensor_alloc(be, x->shape[0], x->shape[1], 1, 1, &out->shift);
    if (st == KLVAE_OK)
        st = be->ops->group_norm_stats(be, x, &nm->weight, &nm->bias, m->cfg.norm_num_groups,
                                       GN_EPS, &out->scale, &out->shift, NULL, NULL);
    out->p.scale = &out->scale;
    out->p.shift = &out->shift;
    out->p.act = act;
    return st;
}

static void norm_prologue_release(kv_backend *be, norm_prologue *np)
{
    kv_tensor_release(be, &np->scale);
    kv_tensor_release(be, &np->shift);
}

/* y = conv(act(group_norm(x))) in a new tensor, the norm fused into the
 * convolution. */
static klvae_status_t norm_conv_new(klvae_model_t *m, const kv_norm *nm, kv_activation act,
                                    const kv_conv *c, const kv_tensor *x, kv_tensor *y)
{
    norm_prologue np;
    klvae_status_t st = norm_prologue_make(m, nm, act, x, &np);
    if (st == KLVAE_OK)
        st = conv_new(m->be, c, x, &np.p, same_3x3, y);
    norm_prologue_release(m->be, &np);
    return st;
}

static klvae_status_t norm_new(kv_backend *be, const kv_norm *nm, int groups, kv_activation act,
                               const kv_tensor *x, kv_tensor *y)
{
    klvae_status_t st =
        kv_tensor_alloc(be, x->shape[0], x->shape[1], x->shape[2], x->shape[3], y);
    if (st != KLVAE_OK)
        return st;
    st = be->ops->group_norm(be, x, &nm->weight, &nm->bias, groups, GN_EPS, act, y);
    if (st != KLVAE_OK)
        kv_tensor_release(be, y);
    return st;
}

/* ResnetBlock2D: out = shortcut(x) + conv2(act(norm2(conv1(act(norm1(x)))))),
 * each norm fused into the conv after it. Consumes *x (released unless it is
 * not owned) and leaves the result in *x. */
static klvae_status_t resnet_forward(klvae_model_t *m, const kv_resnet *r, kv_tensor *x)
{
    kv_backend *be = m->be;
    const kv_activation act = kv_config_activation(&m->cfg);
    kv_tensor h = {0}, h2 = {0}, skip = {0};
    klvae_status_t st;

    if ((st = norm_conv_new(m, &r->norm1, act, &r->conv1, x, &h2)) != KLVAE_OK)
        goto done;
    if ((st = norm_conv_new(m, &r->norm2, act, &r->conv2, &h2, &h)) != KLVAE_OK)
        goto done;
    kv_tensor_release(be, &h2);
    if (r->has_shortcut) {
        if ((st = conv_new(be, &r->shortcut, x, NULL, pointwise, &skip)) != KLVAE_OK)
            goto done;
        kv_tensor_release(be, x);
        st = be->ops->add(be, &skip, &h, &h);
        kv_tensor_release(be, &skip);
    } else {
        st = be->ops->add(be, x, &h, &h);
        kv_tensor_release(be, x);
    }
    if (st != KLVAE_OK)
        goto done;
    *x = h;
    return KLVAE_OK;
done:
    kv_tensor_release(be, &h);
    kv_tensor_release(be, &h2);
    kv_tensor_release(be, &skip);
    return st;
}

/* Mid-block attention: x + to_out(attention(to_q(n), to_k(n), to_v(n))) with
 * n = group_norm(x). The Linear projections act on channels, which in NCHW
 * is a 1x1 convolution. Consumes *x and leaves the result in it. */
static klvae_status_t attention_forward(klvae_model_t *m, const kv_attention *a, kv_tensor *x)
{
    kv_backend *be = m->be;
    const int c = a->channels;
    kv_tensor n = {0}, q = {0}, k = {0}, v = {0}, o = {0};
    klvae_status_t st;
    kv_conv pq = a->to_q, pk = a->to_k, pv = a->to_v, po = a->to_out;
    pq.weight = kv_tensor_view4(&a->to_q.weight, c, c, 1, 1);
    pk.weight = kv_tensor_view4(&a->to_k.weight, c, c, 1, 1);
    pv.weight = kv_tensor_view4(&a->to_v.weight, c, c, 1, 1);
    po.weight = kv_tensor_view4(&a->to_out.weight, c, c, 1, 1);

    if ((st = norm_new(be, &a->norm, m->cfg.norm_num_groups, KV_ACT_NONE, x, &n)) != KLVAE_OK ||
        (st = conv_new(be, &pq, &n, NULL, pointwise, &q)) != KLVAE_OK ||
        (st = conv_new(be, &pk, &n, NULL, pointwise, &k)) != KLVAE_OK ||
        (st = conv_new(be, &pv, &n, NULL, pointwise, &v)) != KLVAE_OK)
        goto done;
    kv_tensor_release(be, &n);
    /* The attended values reuse n's size: (B, C, H, W). */
    if ((st = kv_tensor_alloc(be, x->shape[0], c, x->shape[2], x->shape[3], &n)) != KLVAE_OK ||
        (st = be->ops->attention(be, &q, &k, &v, (float)(1.0 / sqrt((double)c)), &n)) !=
            KLVAE_OK)
        goto done;
    kv_tensor_release(be, &q);
    kv_tensor_release(be, &k);
    kv_tensor_release(be, &v);
    if ((st = conv_new(be, &po, &n, NULL, pointwise, &o)) != KLVAE_OK)
        goto done;
    kv_tensor_release(be, &n);
    if ((st = be->ops->add(be, &o, x, &o)) != KLVAE_OK)
        goto done;
    kv_tensor_release(be, x);
    *x = o;
    return KLVAE_OK;
done:
    kv_tensor_release(be, &n);
    kv_tensor_release(be, &q);
    kv_tensor_release(be, &k);
    kv_tensor_release(be, &v);
    kv_tensor_release(be, &o);
    return st;
}

static klvae_status_t mid_block_forward(klvae_model_t *m, const kv_mid_block *mid, kv_tensor *x)
{
    klvae_status_t st = resnet_forward(m, &mid->resnets[0], x);
    if (st == KLVAE_OK && mid->has_attention)
        st = attention_forward(m, &mid->attention, x);
    if (st == KLVAE_OK)
        st = resnet_forward(m, &mid->resnets[1], x);
    return st;
}

/* Replaces *x by conv(*x), releasing the old tensor. */
static klvae_status_t conv_replace(kv_backend *be, const kv_conv *c, kv_tensor *x,
                                   kv_conv_geometry g)
{
    kv_tensor y;
    klvae_status_t st = conv_new(be, c, x, NULL, g, &y);
    if (st != KLVAE_OK)
        return st;
    kv_tensor_release(be, x);
    *x = y;
    return KLVAE_OK;
}

klvae_status_t kv_vae_encode(klvae_model_t *m, const kv_tensor *images, kv_tensor *mean,
                             kv_tensor *logvar)
{
    kv_tensor moments = {0};
    klvae_status_t st = kv_vae_encode_moments(m, images, &moments);
    if (st == KLVAE_OK)
        st = m->be->ops->posterior_split(m->be, &moments, mean, logvar);
    kv_tensor_release(m->be, &moments);
    return st;
}

klvae_status_t kv_vae_encode_moments(klvae_model_t *m, const kv_tensor *images,
                                     kv_tensor *moments)
{
    kv_backend *be = m->be;
    const kv_encoder *e = &m->enc;
    kv_tensor h = {0};
    klvae_status_t st = conv_new(be, &e->conv_in, images, NULL, same_3x3, &h);
    for (int i = 0; st == KLVAE_OK && i < m->cfg.num_blocks; i++) {
        const kv_level *lv = &e->down[i];
        for (int j = 0; st == KLVAE_OK && j < lv->num_resnets; j++)
            st = resnet_forward(m, &lv->resnets[j], &h);
        if (st == KLVAE_OK && lv->has_sampler)
            st = conv_replace(be, &lv->sampler, &h, downsample);
    }
    if (st == KLVAE_OK)
        st = mid_block_forward(m, &e->mid, &h);
    if (st == KLVAE_OK) { /* conv_norm_out, SiLU, conv_out */
        kv_tensor moments;
        st = norm_conv_new(m, &e->norm_out, KV_ACT_SILU, &e->conv_out, &h, &moments);
        kv_tensor_release(be, &h);
        h = moments;
    }
    if (st == KLVAE_OK && m->cfg.use_quant_conv)
        st = conv_replace(be, &m->quant_conv, &h, pointwise);
    if (st != KLVAE_OK) {
        kv_tensor_release(be, &h);
        return st;
    }
    *moments = h;
    return KLVAE_OK;
}

klvae_status_t kv_vae_decode(klvae_model_t *m, const kv_tensor *z, kv_tensor *images)
{
    kv_backend *be = m->be;
    const kv_decoder *d = &m->dec;
    kv_tensor h = {0}, up = {0};
    klvae_status_t st = KLVAE_OK;
    if (m->cfg.use_post_quant_conv) {
        kv_tensor zq = {0};
        st = conv_new(be, &m->post_quant_conv, z, NULL, pointwise, &zq);
        if (st == KLVAE_OK)
            st = conv_new(be, &d->conv_in, &zq, NULL, same_3x3, &h);
        kv_tensor_release(be, &zq);
    } else {
        st = conv_new(be, &d->conv_in, z, NULL, same_3x3, &h);
    }
    if (st == KLVAE_OK)
        st = mid_block_forward(m, &d->mid, &h);
    for (int i = 0; st == KLVAE_OK && i < m->cfg.num_blocks; i++) {
        const kv_level *lv = &d->up[i];
        for (int j = 0; st == KLVAE_OK && j < lv->num_resnets; j++)
            st = resnet_forward(m, &lv->resnets[j], &h);
        if (st == KLVAE_OK && lv->has_sampler) {
            st = kv_tensor_alloc(be, h.shape[0], h.shape[1], 2 * h.shape[2], 2 * h.shape[3],
                                 &up);
            if (st == KLVAE_OK)
                st = be->ops->upsample_nearest2x(be, &h, &up);
            kv_tensor_release(be, &h);
            if (st == KLVAE_OK)
                st = conv_new(be, &lv->sampler, &up, NULL, same_3x3, &h);
            kv_tensor_release(be, &up);
        }
    }
    if (st == KLVAE_OK) { /* conv_norm_out, SiLU, conv_out into the output */
        norm_prologue np;
        st = norm_prologue_make(m, &d->norm_out, KV_ACT_SILU, &h, &np);
        if (st == KLVAE_OK)
            st = conv_into(be, &d->conv_out, &h, &np.p, same_3x3, images);
        norm_prologue_release(be, &np);
    }
    kv_tensor_release(be, &h);
    return st;
}
