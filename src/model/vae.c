/* vae.c — the AutoencoderKL forward pass, written once against the backend
 * interface (src/backend/backend.h), for inference and for training.
 *
 * Every block takes an optional tape. Without one (inference) each
 * intermediate tensor is released as soon as the next layer has consumed
 * it, so the memory held at any moment is the live set of the network, not
 * its history. With one (training) the block keeps, in the tape, what its
 * backward in vae_backward.c reads: its input and its group norms'
 * statistics. Both paths run the same ops in the same order, so a training
 * step's forward is bit for bit the forward of klvae_encode / klvae_decode. */
#include <math.h>
#include <string.h>

#include "model/vae.h"
#include "model/layers.h"

/* ---- tape helpers ---- */

/* Keeps *t in *slot when there is a tape, else releases it; *t is empty
 * afterwards either way. */
static void keep_or_release(kv_backend *be, bool taped, kv_tensor *slot, kv_tensor *t)
{
    if (taped)
        *slot = *t;
    else
        kv_tensor_release(be, t);
    memset(t, 0, sizeof *t);
}

/* The statistics of a group norm of x with the parameters of nm: scale and
 * shift for the prologue of the conv that reads the norm, and mean and rstd
 * too when the backward will need them (for_backward). */
static klvae_status_t norm_state_make(klvae_model_t *m, const kv_norm *nm, const kv_tensor *x,
                                      bool for_backward, kv_norm_state *n)
{
    kv_backend *be = m->be;
    const int batch = x->shape[0], c = x->shape[1], g = m->cfg.norm_num_groups;
    memset(n, 0, sizeof *n);
    /* statistics stay float32 whatever the backend computes in */
    klvae_status_t st = kv_tensor_alloc_f32(be, batch, c, 1, 1, &n->scale);
    if (st == KLVAE_OK)
        st = kv_tensor_alloc_f32(be, batch, c, 1, 1, &n->shift);
    if (st == KLVAE_OK && for_backward)
        st = kv_tensor_alloc_f32(be, batch, g, 1, 1, &n->mean);
    if (st == KLVAE_OK && for_backward)
        st = kv_tensor_alloc_f32(be, batch, g, 1, 1, &n->rstd);
    if (st == KLVAE_OK)
        st = be->ops->group_norm_stats(be, x, &nm->weight, &nm->bias, g, KV_GN_EPS, &n->scale,
                                       &n->shift, for_backward ? &n->mean : NULL,
                                       for_backward ? &n->rstd : NULL);
    if (st != KLVAE_OK)
        kv_norm_state_free(be, n);
    return st;
}

/* y = conv(act(group_norm(x))) in a new tensor, the norm fused into the
 * convolution as its prologue; the norm's statistics go to *kept (a tape's
 * slot) or are released. */
static klvae_status_t norm_conv_new(klvae_model_t *m, const kv_norm *nm, kv_activation act,
                                    const kv_conv *c, const kv_tensor *x,
                                    const kv_tensor *residual, kv_norm_state *kept, kv_tensor *y)
{
    kv_norm_state n;
    klvae_status_t st = norm_state_make(m, nm, x, kept != NULL, &n);
    kv_conv_prologue p = kv_norm_prologue(&n, act);
    if (st == KLVAE_OK)
        st = kv_conv_new(m->be, c, x, &p, residual, kv_same_3x3, y);
    if (kept && st == KLVAE_OK)
        *kept = n;
    else
        kv_norm_state_free(m->be, &n);
    return st;
}

/* ---- blocks ---- */

/* ResnetBlock2D: out = shortcut(x) + conv2(act(norm2(conv1(act(norm1(x)))))),
 * each norm fused into the conv after it, and the shortcut (x itself, or its
 * 1x1 conv) added by conv2 as its residual. Consumes *x (kept in the tape, or
 * released unless the caller owns it) and leaves the result in *x. */
static klvae_status_t resnet_forward(klvae_model_t *m, const kv_resnet *r, kv_resnet_tape *t,
                                     bool recompute, kv_tensor *x)
{
    kv_backend *be = m->be;
    const kv_activation act = kv_config_activation(&m->cfg);
    kv_tensor h = {0}, h2 = {0}, skip = {0};
    if (t)
        memset(t, 0, sizeof *t);
    klvae_status_t st =
        norm_conv_new(m, &r->norm1, act, &r->conv1, x, NULL, t ? &t->n1 : NULL, &h2);
    if (st == KLVAE_OK && r->has_shortcut)
        st = kv_conv_new(be, &r->shortcut, x, NULL, NULL, kv_pointwise, &skip);
    if (st == KLVAE_OK && r->has_shortcut) /* x has done its work */
        keep_or_release(be, t != NULL, t ? &t->x : NULL, x);
    const kv_tensor *residual = r->has_shortcut ? &skip : x;
    if (st == KLVAE_OK)
        st = norm_conv_new(m, &r->norm2, act, &r->conv2, &h2, residual, t ? &t->n2 : NULL, &h);
    if (st == KLVAE_OK)
        keep_or_release(be, t != NULL && !recompute, t ? &t->h2 : NULL, &h2);
    if (st == KLVAE_OK && !r->has_shortcut)
        keep_or_release(be, t != NULL, t ? &t->x : NULL, x);
    kv_tensor_release(be, &skip);
    if (st != KLVAE_OK) {
        kv_tensor_release(be, &h);
        kv_tensor_release(be, &h2);
        return st;
    }
    *x = h;
    return KLVAE_OK;
}

/* Mid-block attention: x + to_out(attention(to_q(n), to_k(n), to_v(n))) with
 * n = group_norm(x). The Linear projections act on channels, which in NCHW
 * is a 1x1 convolution; to_out adds x as its residual. Consumes *x and
 * leaves the result in it. */
static klvae_status_t attention_forward(klvae_model_t *m, const kv_attention *a,
                                        kv_attention_tape *t, kv_tensor *x)
{
    kv_backend *be = m->be;
    const int c = a->channels;
    kv_conv pq = kv_conv_as_1x1(&a->to_q, c), pk = kv_conv_as_1x1(&a->to_k, c),
            pv = kv_conv_as_1x1(&a->to_v, c), po = kv_conv_as_1x1(&a->to_out, c);
    kv_tensor n = {0}, q = {0}, k = {0}, v = {0}, o = {0};
    klvae_status_t st = KLVAE_OK;
    if (t) { /* the statistics, for the backward; the norm below recomputes them */
        memset(t, 0, sizeof *t);
        st = norm_state_make(m, &a->norm, x, true, &t->n);
    }
    if (st == KLVAE_OK)
        st = kv_tensor_alloc_like(be, x, &n);
    if (st == KLVAE_OK)
        st = be->ops->group_norm(be, x, &a->norm.weight, &a->norm.bias, m->cfg.norm_num_groups,
                                 KV_GN_EPS, KV_ACT_NONE, &n);
    if (st == KLVAE_OK)
        st = kv_conv_new(be, &pq, &n, NULL, NULL, kv_pointwise, &q);
    if (st == KLVAE_OK)
        st = kv_conv_new(be, &pk, &n, NULL, NULL, kv_pointwise, &k);
    if (st == KLVAE_OK)
        st = kv_conv_new(be, &pv, &n, NULL, NULL, kv_pointwise, &v);
    if (st == KLVAE_OK)
        keep_or_release(be, t != NULL, t ? &t->normed : NULL, &n);
    /* The attended values: (B, C, H, W), like n. */
    if (st == KLVAE_OK)
        st = kv_tensor_alloc_like(be, x, &n);
    if (st == KLVAE_OK)
        st = be->ops->attention(be, &q, &k, &v, (float)(1.0 / sqrt((double)c)), &n);
    if (st == KLVAE_OK) {
        keep_or_release(be, t != NULL, t ? &t->q : NULL, &q);
        keep_or_release(be, t != NULL, t ? &t->k : NULL, &k);
        keep_or_release(be, t != NULL, t ? &t->v : NULL, &v);
        st = kv_conv_new(be, &po, &n, NULL, x, kv_pointwise, &o);
    }
    if (st == KLVAE_OK)
        keep_or_release(be, t != NULL, t ? &t->a : NULL, &n);
    if (st == KLVAE_OK)
        keep_or_release(be, t != NULL, t ? &t->x : NULL, x);
    kv_tensor *left[] = {&n, &q, &k, &v};
    for (size_t i = 0; i < KV_ARRAY_LEN(left); i++)
        kv_tensor_release(be, left[i]);
    if (st != KLVAE_OK) {
        kv_tensor_release(be, &o);
        return st;
    }
    *x = o;
    return KLVAE_OK;
}

static klvae_status_t mid_block_forward(klvae_model_t *m, const kv_mid_block *mid, kv_mid_tape *t,
                                        bool recompute, kv_tensor *x)
{
    klvae_status_t st = resnet_forward(m, &mid->resnets[0], t ? &t->res[0] : NULL, recompute, x);
    if (st == KLVAE_OK && mid->has_attention)
        st = attention_forward(m, &mid->attention, t ? &t->attn : NULL, x);
    if (st == KLVAE_OK)
        st = resnet_forward(m, &mid->resnets[1], t ? &t->res[1] : NULL, recompute, x);
    return st;
}

/* Replaces *x by conv(*x); the old *x goes to *kept, or is released. */
static klvae_status_t conv_replace(kv_backend *be, const kv_conv *c, kv_conv_geometry g,
                                   kv_tensor *kept, kv_tensor *x)
{
    kv_tensor y;
    klvae_status_t st = kv_conv_new(be, c, x, NULL, NULL, g, &y);
    if (st != KLVAE_OK)
        return st;
    keep_or_release(be, kept != NULL, kept, x);
    *x = y;
    return KLVAE_OK;
}

/* ---- encoder ---- */

klvae_status_t kv_vae_encode_moments(klvae_model_t *m, const kv_tensor *images,
                                     kv_encoder_tape *t, kv_tensor *moments)
{
    kv_backend *be = m->be;
    const kv_encoder *e = &m->enc;
    memset(moments, 0, sizeof *moments);
    const bool recompute = t && t->recompute;
    if (t) {
        memset(t, 0, sizeof *t);
        t->recompute = recompute;
        t->images = *images;
        t->images.owned = false;
    }
    kv_tensor h = {0};
    klvae_status_t st = kv_conv_new(be, &e->conv_in, images, NULL, NULL, kv_same_3x3, &h);
    for (int i = 0; st == KLVAE_OK && i < m->cfg.num_blocks; i++) {
        const kv_level *lv = &e->down[i];
        kv_level_tape *lt = t ? &t->down[i] : NULL;
        for (int j = 0; st == KLVAE_OK && j < lv->num_resnets; j++)
            st = resnet_forward(m, &lv->resnets[j], lt ? &lt->res[j] : NULL, recompute, &h);
        if (st == KLVAE_OK && lv->has_sampler)
            st = conv_replace(be, &lv->sampler, kv_downsample, lt ? &lt->sampler_in : NULL, &h);
    }
    if (st == KLVAE_OK)
        st = mid_block_forward(m, &e->mid, t ? &t->mid : NULL, recompute, &h);
    if (st == KLVAE_OK) { /* conv_norm_out, SiLU, conv_out */
        kv_tensor out;
        st = norm_conv_new(m, &e->norm_out, KV_ACT_SILU, &e->conv_out, &h, NULL,
                           t ? &t->out_norm : NULL, &out);
        if (st == KLVAE_OK) {
            keep_or_release(be, t != NULL, t ? &t->out_in : NULL, &h);
            h = out;
        }
    }
    if (st == KLVAE_OK && m->cfg.use_quant_conv)
        st = conv_replace(be, &m->quant_conv, kv_pointwise, t ? &t->quant_in : NULL, &h);
    if (st != KLVAE_OK) {
        kv_tensor_release(be, &h);
        if (t)
            kv_encoder_tape_free(be, t);
        return st;
    }
    *moments = h;
    return KLVAE_OK;
}

klvae_status_t kv_vae_encode(klvae_model_t *m, const kv_tensor *images, kv_tensor *mean,
                             kv_tensor *logvar)
{
    kv_tensor moments = {0};
    klvae_status_t st = kv_vae_encode_moments(m, images, NULL, &moments);
    if (st == KLVAE_OK)
        st = m->be->ops->posterior_split(m->be, &moments, mean, logvar);
    kv_tensor_release(m->be, &moments);
    return st;
}

/* ---- decoder ---- */

/* The decoder's Upsample2D: nearest 2x, then a 3x3 conv, which reads the
 * upsample through its prologue (the upsampled tensor is not stored).
 * Consumes *x (kept in *kept, or released) and leaves the result in it. */
static klvae_status_t upsample_forward(kv_backend *be, const kv_conv *c, kv_tensor *kept,
                                       kv_tensor *x)
{
    kv_tensor y;
    klvae_status_t st = kv_conv_new(be, c, x, &kv_upsample_prologue, NULL, kv_same_3x3, &y);
    if (st != KLVAE_OK)
        return st;
    keep_or_release(be, kept != NULL, kept, x);
    *x = y;
    return KLVAE_OK;
}

klvae_status_t kv_vae_decode(klvae_model_t *m, const kv_tensor *z, kv_decoder_tape *t,
                             kv_tensor *images)
{
    kv_backend *be = m->be;
    const kv_decoder *d = &m->dec;
    kv_tensor h = {0}, zq = {0};
    klvae_status_t st = KLVAE_OK;
    const bool recompute = t && t->recompute;
    if (t) {
        memset(t, 0, sizeof *t);
        t->recompute = recompute;
        t->z = *z;
        t->z.owned = false;
    }
    const kv_tensor *in = z;
    if (m->cfg.use_post_quant_conv) {
        st = kv_conv_new(be, &m->post_quant_conv, z, NULL, NULL, kv_pointwise, &zq);
        in = &zq;
    }
    if (st == KLVAE_OK)
        st = kv_conv_new(be, &d->conv_in, in, NULL, NULL, kv_same_3x3, &h);
    if (t)
        t->conv_in_in = m->cfg.use_post_quant_conv ? zq : t->z;
    else
        kv_tensor_release(be, &zq);
    if (st == KLVAE_OK)
        st = mid_block_forward(m, &d->mid, t ? &t->mid : NULL, recompute, &h);
    for (int i = 0; st == KLVAE_OK && i < m->cfg.num_blocks; i++) {
        const kv_level *lv = &d->up[i];
        kv_level_tape *lt = t ? &t->up[i] : NULL;
        for (int j = 0; st == KLVAE_OK && j < lv->num_resnets; j++)
            st = resnet_forward(m, &lv->resnets[j], lt ? &lt->res[j] : NULL, recompute, &h);
        if (st == KLVAE_OK && lv->has_sampler)
            st = upsample_forward(be, &lv->sampler, lt ? &lt->sampler_in : NULL, &h);
    }
    if (st == KLVAE_OK) { /* conv_norm_out, SiLU, conv_out into the output */
        kv_norm_state n;
        st = norm_state_make(m, &d->norm_out, &h, t != NULL, &n);
        kv_conv_prologue p = kv_norm_prologue(&n, KV_ACT_SILU);
        if (st == KLVAE_OK)
            st = kv_conv_into(be, &d->conv_out, &h, &p, NULL, kv_same_3x3, images);
        if (t && st == KLVAE_OK)
            t->out_norm = n;
        else
            kv_norm_state_free(be, &n);
    }
    if (st == KLVAE_OK)
        keep_or_release(be, t != NULL, t ? &t->out_in : NULL, &h);
    kv_tensor_release(be, &h);
    if (st != KLVAE_OK && t)
        kv_decoder_tape_free(be, t);
    return st;
}
