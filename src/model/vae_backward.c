/* vae_backward.c — the AutoencoderKL backward: each block's gradient, read
 * from the tape its forward (vae.c) kept. Parameter gradients accumulate
 * into a second module tree of the model's shapes (kv_grads); activations
 * that a group norm produced are recomputed from the kept statistics as the
 * prologue of the convolution that read them. */
#include <math.h>
#include <string.h>

#include "model/layers.h"
#include "model/vae.h"

/* Tells m's trainer that gradient g is complete for this backward. */
static klvae_status_t written(const klvae_model_t *m, const kv_tensor *g)
{
    return m->grad_written && g->data ? m->grad_written(m->grad_written_ctx, g) : KLVAE_OK;
}

/* Backward of y = conv(prologue(x)) for m's conv c: accumulates the weight
 * and bias gradients into gc, and when dx is not NULL allocates dx = the
 * gradient of the convolution's input (that is, of prologue(x)). */
static klvae_status_t conv_back(const klvae_model_t *m, const kv_conv *c, kv_conv *gc,
                                const kv_tensor *x, const kv_conv_prologue *p, kv_conv_geometry g,
                                const kv_tensor *dy, kv_tensor *dx)
{
    kv_backend *be = m->be;
    klvae_status_t st =
        be->ops->conv2d_backward_weight(be, x, p, dy, g, &gc->weight, &gc->bias);
    if (st == KLVAE_OK)
        st = written(m, &gc->weight);
    if (st == KLVAE_OK)
        st = written(m, &gc->bias);
    if (st != KLVAE_OK || !dx)
        return st;
    st = kv_tensor_alloc_like(be, x, dx);
    if (st == KLVAE_OK)
        st = be->ops->conv2d_backward_data(be, dy, &c->weight, g, dx);
    if (st != KLVAE_OK)
        kv_tensor_release(be, dx);
    return st;
}

/* da (the gradient of act(norm(x))) becomes, in place, the gradient of x. */
static klvae_status_t norm_back(klvae_model_t *m, const kv_norm *nm, kv_norm *gn,
                                const kv_norm_state *n, kv_activation act, const kv_tensor *x,
                                kv_tensor *da)
{
    klvae_status_t st = m->be->ops->group_norm_backward(
        m->be, x, &nm->weight, &n->scale, &n->shift, &n->mean, &n->rstd, m->cfg.norm_num_groups,
        act, da, da, &gn->weight, &gn->bias);
    if (st == KLVAE_OK)
        st = written(m, &gn->weight);
    if (st == KLVAE_OK)
        st = written(m, &gn->bias);
    return st;
}

/* ---- resnet ---- */

static void resnet_tape_free(kv_backend *be, kv_resnet_tape *t)
{
    kv_tensor_release(be, &t->x);
    kv_tensor_release(be, &t->h2);
    kv_norm_state_free(be, &t->n1);
    kv_norm_state_free(be, &t->n2);
}

/* d (the gradient of the block's output, consumed) becomes the gradient of
 * its input. Frees the tape. */
static klvae_status_t resnet_backward(klvae_model_t *m, const kv_resnet *r, kv_resnet *gr,
                                      kv_resnet_tape *t, kv_tensor *d)
{
    kv_backend *be = m->be;
    const kv_activation act = kv_config_activation(&m->cfg);
    kv_conv_prologue p1 = kv_norm_prologue(&t->n1, act), p2 = kv_norm_prologue(&t->n2, act);
    kv_tensor dh2 = {0}, dx = {0}, dskip = {0};
    klvae_status_t st = KLVAE_OK;
    if (!t->h2.data) /* recompute: conv1's output again, from the kept input and statistics */
        st = kv_conv_new(be, &r->conv1, &t->x, &p1, NULL, kv_same_3x3, &t->h2);
    if (st == KLVAE_OK)
        st = conv_back(m, &r->conv2, &gr->conv2, &t->h2, &p2, kv_same_3x3, d, &dh2);
    if (st == KLVAE_OK)
        st = norm_back(m, &r->norm2, &gr->norm2, &t->n2, act, &t->h2, &dh2);
    if (st == KLVAE_OK)
        st = conv_back(m, &r->conv1, &gr->conv1, &t->x, &p1, kv_same_3x3, &dh2, &dx);
    kv_tensor_release(be, &dh2);
    if (st == KLVAE_OK)
        st = norm_back(m, &r->norm1, &gr->norm1, &t->n1, act, &t->x, &dx);
    if (st == KLVAE_OK && r->has_shortcut) {
        st = conv_back(m, &r->shortcut, &gr->shortcut, &t->x, NULL, kv_pointwise, d, &dskip);
        if (st == KLVAE_OK)
            st = be->ops->add(be, &dx, &dskip, &dx);
        kv_tensor_release(be, &dskip);
    } else if (st == KLVAE_OK) {
        st = be->ops->add(be, &dx, d, &dx);
    }
    resnet_tape_free(be, t);
    kv_tensor_release(be, d);
    if (st != KLVAE_OK) {
        kv_tensor_release(be, &dx);
        return st;
    }
    *d = dx;
    return KLVAE_OK;
}

/* ---- attention ---- */

static void attention_tape_free(kv_backend *be, kv_attention_tape *t)
{
    kv_tensor *all[] = {&t->x, &t->normed, &t->q, &t->k, &t->v, &t->a};
    for (size_t i = 0; i < KV_ARRAY_LEN(all); i++)
        kv_tensor_release(be, all[i]);
    kv_norm_state_free(be, &t->n);
}

static klvae_status_t attention_backward(klvae_model_t *m, const kv_attention *a,
                                         kv_attention *ga, kv_attention_tape *t, kv_tensor *d)
{
    kv_backend *be = m->be;
    const int c = a->channels;
    kv_conv pq = kv_conv_as_1x1(&a->to_q, c), pk = kv_conv_as_1x1(&a->to_k, c),
            pv = kv_conv_as_1x1(&a->to_v, c), po = kv_conv_as_1x1(&a->to_out, c);
    kv_conv gq = kv_conv_as_1x1(&ga->to_q, c), gk = kv_conv_as_1x1(&ga->to_k, c),
            gv = kv_conv_as_1x1(&ga->to_v, c), go = kv_conv_as_1x1(&ga->to_out, c);
    kv_tensor da = {0}, dq = {0}, dk = {0}, dv = {0}, dn = {0}, tmp = {0};
    klvae_status_t st = conv_back(m, &po, &go, &t->a, NULL, kv_pointwise, d, &da);
    if (st == KLVAE_OK)
        st = kv_tensor_alloc_like(be, &t->q, &dq);
    if (st == KLVAE_OK)
        st = kv_tensor_alloc_like(be, &t->k, &dk);
    if (st == KLVAE_OK)
        st = kv_tensor_alloc_like(be, &t->v, &dv);
    if (st == KLVAE_OK)
        st = be->ops->attention_backward(be, &t->q, &t->k, &t->v, (float)(1.0 / sqrt((double)c)),
                                         &da, &dq, &dk, &dv);
    kv_tensor_release(be, &da);
    if (st == KLVAE_OK)
        st = conv_back(m, &pq, &gq, &t->normed, NULL, kv_pointwise, &dq, &dn);
    if (st == KLVAE_OK)
        st = conv_back(m, &pk, &gk, &t->normed, NULL, kv_pointwise, &dk, &tmp);
    if (st == KLVAE_OK)
        st = be->ops->add(be, &dn, &tmp, &dn);
    kv_tensor_release(be, &tmp);
    if (st == KLVAE_OK)
        st = conv_back(m, &pv, &gv, &t->normed, NULL, kv_pointwise, &dv, &tmp);
    if (st == KLVAE_OK)
        st = be->ops->add(be, &dn, &tmp, &dn);
    kv_tensor_release(be, &tmp);
    kv_tensor_release(be, &dq);
    kv_tensor_release(be, &dk);
    kv_tensor_release(be, &dv);
    if (st == KLVAE_OK)
        st = norm_back(m, &a->norm, &ga->norm, &t->n, KV_ACT_NONE, &t->x, &dn);
    if (st == KLVAE_OK) /* the residual: d itself flows to x too */
        st = be->ops->add(be, &dn, d, &dn);
    attention_tape_free(be, t);
    kv_tensor_release(be, d);
    if (st != KLVAE_OK) {
        kv_tensor_release(be, &dn);
        return st;
    }
    *d = dn;
    return KLVAE_OK;
}

/* ---- mid block ---- */

static klvae_status_t mid_backward(klvae_model_t *m, const kv_mid_block *mid, kv_mid_block *g,
                                   kv_mid_tape *t, kv_tensor *d)
{
    klvae_status_t st = resnet_backward(m, &mid->resnets[1], &g->resnets[1], &t->res[1], d);
    if (st == KLVAE_OK && mid->has_attention)
        st = attention_backward(m, &mid->attention, &g->attention, &t->attn, d);
    if (st == KLVAE_OK)
        st = resnet_backward(m, &mid->resnets[0], &g->resnets[0], &t->res[0], d);
    return st;
}

static void mid_tape_free(kv_backend *be, kv_mid_tape *t)
{
    resnet_tape_free(be, &t->res[0]);
    resnet_tape_free(be, &t->res[1]);
    attention_tape_free(be, &t->attn);
}

static void level_tape_free(kv_backend *be, kv_level_tape *t)
{
    for (int j = 0; j <= KV_MAX_LAYERS; j++)
        resnet_tape_free(be, &t->res[j]);
    kv_tensor_release(be, &t->sampler_in);
}

/* ---- encoder ---- */

void kv_encoder_tape_free(kv_backend *be, kv_encoder_tape *t)
{
    for (int i = 0; i < KV_MAX_BLOCKS; i++)
        level_tape_free(be, &t->down[i]);
    mid_tape_free(be, &t->mid);
    kv_tensor_release(be, &t->out_in);
    kv_norm_state_free(be, &t->out_norm);
    kv_tensor_release(be, &t->quant_in);
    memset(&t->images, 0, sizeof t->images);
}

klvae_status_t kv_vae_encode_backward(klvae_model_t *m, kv_grads *g, kv_encoder_tape *t,
                                      const kv_tensor *d_moments)
{
    kv_backend *be = m->be;
    const kv_encoder *e = &m->enc;
    kv_encoder *ge = &g->enc;
    kv_tensor d = {0}, tmp = {0};
    /* d: a copy of d_moments that the layers below may consume */
    klvae_status_t st = kv_tensor_alloc_like(be, d_moments, &d);
    if (st == KLVAE_OK)
        st = be->ops->fill(be, &d, 0.0f);
    if (st == KLVAE_OK)
        st = be->ops->add(be, &d, d_moments, &d);
    if (st == KLVAE_OK && m->cfg.use_quant_conv) {
        st = conv_back(m, &m->quant_conv, &g->quant_conv, &t->quant_in, NULL, kv_pointwise, &d,
                       &tmp);
        kv_tensor_release(be, &d);
        d = tmp;
        memset(&tmp, 0, sizeof tmp);
    }
    kv_conv_prologue p = kv_norm_prologue(&t->out_norm, KV_ACT_SILU);
    if (st == KLVAE_OK) {
        st = conv_back(m, &e->conv_out, &ge->conv_out, &t->out_in, &p, kv_same_3x3, &d, &tmp);
        kv_tensor_release(be, &d);
        d = tmp;
        memset(&tmp, 0, sizeof tmp);
    }
    if (st == KLVAE_OK)
        st = norm_back(m, &e->norm_out, &ge->norm_out, &t->out_norm, KV_ACT_SILU, &t->out_in, &d);
    if (st == KLVAE_OK)
        st = mid_backward(m, &e->mid, &ge->mid, &t->mid, &d);
    for (int i = m->cfg.num_blocks - 1; st == KLVAE_OK && i >= 0; i--) {
        const kv_level *lv = &e->down[i];
        if (lv->has_sampler) {
            st = conv_back(m, &lv->sampler, &ge->down[i].sampler, &t->down[i].sampler_in, NULL,
                           kv_downsample, &d, &tmp);
            kv_tensor_release(be, &d);
            d = tmp;
            memset(&tmp, 0, sizeof tmp);
        }
        for (int j = lv->num_resnets - 1; st == KLVAE_OK && j >= 0; j--)
            st = resnet_backward(m, &lv->resnets[j], &ge->down[i].resnets[j], &t->down[i].res[j],
                                 &d);
    }
    if (st == KLVAE_OK) /* the images need no gradient */
        st = conv_back(m, &e->conv_in, &ge->conv_in, &t->images, NULL, kv_same_3x3, &d, NULL);
    kv_tensor_release(be, &d);
    kv_encoder_tape_free(be, t);
    return st;
}

/* ---- decoder ---- */

void kv_decoder_tape_free(kv_backend *be, kv_decoder_tape *t)
{
    if (t->conv_in_in.data != t->z.data)
        kv_tensor_release(be, &t->conv_in_in);
    mid_tape_free(be, &t->mid);
    for (int i = 0; i < KV_MAX_BLOCKS; i++)
        level_tape_free(be, &t->up[i]);
    kv_tensor_release(be, &t->out_in);
    kv_norm_state_free(be, &t->out_norm);
    memset(&t->z, 0, sizeof t->z);
    memset(&t->conv_in_in, 0, sizeof t->conv_in_in);
}

klvae_status_t kv_vae_decoder_last_weight_grad(klvae_model_t *m, const kv_decoder_tape *t,
                                               const kv_tensor *d_images, kv_tensor *dw)
{
    kv_backend *be = m->be;
    kv_conv_prologue p = kv_norm_prologue(&t->out_norm, KV_ACT_SILU);
    klvae_status_t st = be->ops->fill(be, dw, 0.0f);
    if (st == KLVAE_OK)
        st = be->ops->conv2d_backward_weight(be, &t->out_in, &p, d_images, kv_same_3x3, dw, NULL);
    return st;
}

klvae_status_t kv_vae_decode_backward(klvae_model_t *m, kv_grads *g, kv_decoder_tape *t,
                                      const kv_tensor *d_images, kv_tensor *d_z)
{
    kv_backend *be = m->be;
    const kv_decoder *dd = &m->dec;
    kv_decoder *gd = &g->dec;
    kv_tensor d = {0}, tmp = {0}, up = {0};
    if (d_z)
        memset(d_z, 0, sizeof *d_z);
    kv_conv_prologue p = kv_norm_prologue(&t->out_norm, KV_ACT_SILU);
    klvae_status_t st =
        conv_back(m, &dd->conv_out, &gd->conv_out, &t->out_in, &p, kv_same_3x3, d_images, &d);
    if (st == KLVAE_OK)
        st = norm_back(m, &dd->norm_out, &gd->norm_out, &t->out_norm, KV_ACT_SILU, &t->out_in, &d);
    for (int i = m->cfg.num_blocks - 1; st == KLVAE_OK && i >= 0; i--) {
        const kv_level *lv = &dd->up[i];
        if (lv->has_sampler) {
            const kv_tensor *in = &t->up[i].sampler_in;
            st = kv_tensor_alloc(be, in->shape[0], in->shape[1], 2 * in->shape[2],
                                 2 * in->shape[3], &up);
            if (st == KLVAE_OK) /* recomputed rather than kept */
                st = be->ops->upsample_nearest2x(be, in, &up);
            if (st == KLVAE_OK)
                st = conv_back(m, &lv->sampler, &gd->up[i].sampler, &up, NULL, kv_same_3x3, &d,
                               &tmp);
            kv_tensor_release(be, &up);
            kv_tensor_release(be, &d);
            if (st == KLVAE_OK)
                st = kv_tensor_alloc_like(be, in, &d);
            if (st == KLVAE_OK)
                st = be->ops->upsample_nearest2x_backward(be, &tmp, &d);
            kv_tensor_release(be, &tmp);
        }
        for (int j = lv->num_resnets - 1; st == KLVAE_OK && j >= 0; j--)
            st = resnet_backward(m, &lv->resnets[j], &gd->up[i].resnets[j], &t->up[i].res[j], &d);
    }
    if (st == KLVAE_OK)
        st = mid_backward(m, &dd->mid, &gd->mid, &t->mid, &d);
    if (st == KLVAE_OK) {
        bool want = d_z != NULL || m->cfg.use_post_quant_conv;
        st = conv_back(m, &dd->conv_in, &gd->conv_in, &t->conv_in_in, NULL, kv_same_3x3, &d,
                       want ? &tmp : NULL);
        kv_tensor_release(be, &d);
        d = tmp;
        memset(&tmp, 0, sizeof tmp);
    }
    if (st == KLVAE_OK && m->cfg.use_post_quant_conv) {
        st = conv_back(m, &m->post_quant_conv, &g->post_quant_conv, &t->z, NULL, kv_pointwise, &d,
                       d_z ? &tmp : NULL);
        kv_tensor_release(be, &d);
        d = tmp;
        memset(&tmp, 0, sizeof tmp);
    }
    if (st == KLVAE_OK && d_z) {
        *d_z = d;
        memset(&d, 0, sizeof d);
    }
    kv_tensor_release(be, &d);
    kv_decoder_tape_free(be, t);
    return st;
}
