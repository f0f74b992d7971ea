/* vae.c — the AutoencoderKL forward pass, written once against the backend
 * interface (src/backend.h). Intermediate tensors are released as soon as
 * the next layer has consumed them, so the memory held at any moment is the
 * live set of the network, not its history. */
#include <math.h>
#include <string.h>

#include "model.h"

#define GN_EPS 1e-6f /* every GroupNorm of the model */

static const kv_conv_geometry same_3x3 = {1, 1, 1, 1, 1};
static const kv_conv_geometry pointwise = {1, 0, 0, 0, 0};
/* Downsample2D: zero pad (left 0, right 1, top 0, bottom 1), then stride 2. */
static const kv_conv_geometry downsample = {2, 0, 0, 1, 1};

/* y = conv(x) into a new tensor. */
static klvae_status_t conv_new(kv_backend *be, const kv_conv *c, const kv_tensor *x,
                               kv_conv_geometry g, kv_tensor *y)
{
    const kv_tensor *w = &c->weight;
    int kh = w->ndim == 4 ? w->shape[2] : 1, kw = w->ndim == 4 ? w->shape[3] : 1;
    int ho = (x->shape[2] + g.pad_top + g.pad_bottom - kh) / g.stride + 1;
    int wo = (x->shape[3] + g.pad_left + g.pad_right - kw) / g.stride + 1;
    klvae_status_t st = kv_tensor_alloc(be, x->shape[0], w->shape[0], ho, wo, y);
    if (st != KLVAE_OK)
        return st;
    st = be->ops->conv2d(be, x, w, &c->bias, g, y);
    if (st != KLVAE_OK)
        kv_tensor_release(be, y);
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

/* ResnetBlock2D: out = shortcut(x) + conv2(act(norm2(conv1(act(norm1(x)))))).
 * Consumes *x (released unless it is not owned) and leaves the result in
 * *x. */
static klvae_status_t resnet_forward(klvae_model_t *m, const kv_resnet *r, kv_tensor *x)
{
    kv_backend *be = m->be;
    const int groups = m->cfg.norm_num_groups;
    const kv_activation act = kv_config_activation(&m->cfg);
    kv_tensor h = {0}, h2 = {0}, skip = {0};
    klvae_status_t st;

    if ((st = norm_new(be, &r->norm1, groups, act, x, &h)) != KLVAE_OK)
        goto done;
    if ((st = conv_new(be, &r->conv1, &h, same_3x3, &h2)) != KLVAE_OK)
        goto done;
    kv_tensor_release(be, &h);
    /* norm2 in place: its input is not needed afterwards */
    if ((st = be->ops->group_norm(be, &h2, &r->norm2.weight, &r->norm2.bias, groups, GN_EPS, act,
                                  &h2)) != KLVAE_OK)
        goto done;
    if ((st = conv_new(be, &r->conv2, &h2, same_3x3, &h)) != KLVAE_OK)
        goto done;
    kv_tensor_release(be, &h2);
    if (r->has_shortcut) {
        if ((st = conv_new(be, &r->shortcut, x, pointwise, &skip)) != KLVAE_OK)
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
        (st = conv_new(be, &pq, &n, pointwise, &q)) != KLVAE_OK ||
        (st = conv_new(be, &pk, &n, pointwise, &k)) != KLVAE_OK ||
        (st = conv_new(be, &pv, &n, pointwise, &v)) != KLVAE_OK)
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
    if ((st = conv_new(be, &po, &n, pointwise, &o)) != KLVAE_OK)
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
    klvae_status_t st = conv_new(be, c, x, g, &y);
    if (st != KLVAE_OK)
        return st;
    kv_tensor_release(be, x);
    *x = y;
    return KLVAE_OK;
}

klvae_status_t kv_vae_encode(klvae_model_t *m, const kv_tensor *images, kv_tensor *mean,
                             kv_tensor *logvar)
{
    kv_backend *be = m->be;
    const kv_encoder *e = &m->enc;
    kv_tensor h = {0};
    klvae_status_t st = conv_new(be, &e->conv_in, images, same_3x3, &h);
    for (int i = 0; st == KLVAE_OK && i < m->cfg.num_blocks; i++) {
        const kv_level *lv = &e->down[i];
        for (int j = 0; st == KLVAE_OK && j < lv->num_resnets; j++)
            st = resnet_forward(m, &lv->resnets[j], &h);
        if (st == KLVAE_OK && lv->has_sampler)
            st = conv_replace(be, &lv->sampler, &h, downsample);
    }
    if (st == KLVAE_OK)
        st = mid_block_forward(m, &e->mid, &h);
    if (st == KLVAE_OK)
        st = be->ops->group_norm(be, &h, &e->norm_out.weight, &e->norm_out.bias,
                                 m->cfg.norm_num_groups, GN_EPS, KV_ACT_SILU, &h);
    if (st == KLVAE_OK)
        st = conv_replace(be, &e->conv_out, &h, same_3x3);
    if (st == KLVAE_OK && m->cfg.use_quant_conv)
        st = conv_replace(be, &m->quant_conv, &h, pointwise);
    if (st == KLVAE_OK)
        st = be->ops->posterior_split(be, &h, mean, logvar);
    kv_tensor_release(be, &h);
    return st;
}

klvae_status_t kv_vae_decode(klvae_model_t *m, const kv_tensor *z, kv_tensor *images)
{
    kv_backend *be = m->be;
    const kv_decoder *d = &m->dec;
    kv_tensor h = {0}, up = {0};
    klvae_status_t st = KLVAE_OK;
    if (m->cfg.use_post_quant_conv) {
        kv_tensor zq = {0};
        st = conv_new(be, &m->post_quant_conv, z, pointwise, &zq);
        if (st == KLVAE_OK)
            st = conv_new(be, &d->conv_in, &zq, same_3x3, &h);
        kv_tensor_release(be, &zq);
    } else {
        st = conv_new(be, &d->conv_in, z, same_3x3, &h);
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
                st = conv_new(be, &lv->sampler, &up, same_3x3, &h);
            kv_tensor_release(be, &up);
        }
    }
    if (st == KLVAE_OK)
        st = be->ops->group_norm(be, &h, &d->norm_out.weight, &d->norm_out.bias,
                                 m->cfg.norm_num_groups, GN_EPS, KV_ACT_SILU, &h);
    if (st == KLVAE_OK)
        st = be->ops->conv2d(be, &h, &d->conv_out.weight, &d->conv_out.bias, same_3x3, images);
    kv_tensor_release(be, &h);
    return st;
}
