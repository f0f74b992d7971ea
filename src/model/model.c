/* model.c — building the module tree and its parameter registry from a
 * config, allocating and initialising the parameters. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/plugin.h"
#include "base/philox.h"
#include "model/model.h"

/* Builds a parameter name; names are far shorter than KV_PARAM_NAME. */
static void fmt_name(char out[KV_PARAM_NAME], const char *fmt, ...) KV_PRINTF(2, 3);
static void fmt_name(char out[KV_PARAM_NAME], const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(out, KV_PARAM_NAME, fmt, ap);
    va_end(ap);
}

typedef struct registry_builder {
    klvae_model_t *m;
    size_t capacity;
    klvae_status_t status;
} registry_builder;

static void set_shape(kv_tensor *t, int ndim, int d0, int d1, int d2, int d3)
{
    memset(t, 0, sizeof *t);
    t->ndim = ndim;
    t->shape[0] = d0;
    t->shape[1] = d1;
    t->shape[2] = d2;
    t->shape[3] = d3;
    t->dtype = KV_F32;
}

static void add_param(registry_builder *b, kv_tensor *t, kv_param_kind kind, int fan_in,
                      bool linear, const char *name, const char *ldm_name)
{
    if (b->status != KLVAE_OK)
        return;
    klvae_model_t *m = b->m;
    if (m->num_params == b->capacity) {
        size_t capacity = b->capacity ? 2 * b->capacity : 256;
        kv_param *grown = realloc(m->params, capacity * sizeof *grown);
        if (!grown) {
            b->status = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory building the model");
            return;
        }
        m->params = grown;
        b->capacity = capacity;
    }
    kv_param *p = &m->params[m->num_params++];
    memset(p, 0, sizeof *p);
    snprintf(p->name, sizeof p->name, "%s", name);
    snprintf(p->ldm_name, sizeof p->ldm_name, "%s", ldm_name);
    p->tensor = t;
    p->kind = kind;
    p->fan_in = fan_in;
    p->linear = linear;
}

/* Registers name.weight and name.bias of a conv (k x k, ci -> co). */
static void add_conv(registry_builder *b, kv_conv *c, int ci, int co, int k, const char *name,
                     const char *ldm)
{
    char n[KV_PARAM_NAME], l[KV_PARAM_NAME];
    set_shape(&c->weight, 4, co, ci, k, k);
    set_shape(&c->bias, 1, co, 0, 0, 0);
    fmt_name(n, "%s.weight", name);
    fmt_name(l, "%s.weight", ldm);
    add_param(b, &c->weight, KV_PARAM_WEIGHT, ci * k * k, false, n, l);
    fmt_name(n, "%s.bias", name);
    fmt_name(l, "%s.bias", ldm);
    add_param(b, &c->bias, KV_PARAM_BIAS, ci * k * k, false, n, l);
}

/* A Linear (c -> c) layer: a 2-D weight here, a 1x1 conv in CompVis files. */
static void add_linear(registry_builder *b, kv_conv *c, int channels, const char *name,
                       const char *ldm)
{
    char n[KV_PARAM_NAME], l[KV_PARAM_NAME];
    set_shape(&c->weight, 2, channels, channels, 0, 0);
    set_shape(&c->bias, 1, channels, 0, 0, 0);
    fmt_name(n, "%s.weight", name);
    fmt_name(l, "%s.weight", ldm);
    add_param(b, &c->weight, KV_PARAM_WEIGHT, channels, true, n, l);
    fmt_name(n, "%s.bias", name);
    fmt_name(l, "%s.bias", ldm);
    add_param(b, &c->bias, KV_PARAM_BIAS, channels, true, n, l);
}

static void add_norm(registry_builder *b, kv_norm *nm, int channels, const char *name,
                     const char *ldm)
{
    char n[KV_PARAM_NAME], l[KV_PARAM_NAME];
    set_shape(&nm->weight, 1, channels, 0, 0, 0);
    set_shape(&nm->bias, 1, channels, 0, 0, 0);
    fmt_name(n, "%s.weight", name);
    fmt_name(l, "%s.weight", ldm);
    add_param(b, &nm->weight, KV_PARAM_NORM_WEIGHT, 0, false, n, l);
    fmt_name(n, "%s.bias", name);
    fmt_name(l, "%s.bias", ldm);
    add_param(b, &nm->bias, KV_PARAM_NORM_BIAS, 0, false, n, l);
}

/* ResnetBlock2D in diffusers' registration order: norm1, conv1, norm2,
 * conv2, conv_shortcut. */
static void add_resnet(registry_builder *b, kv_resnet *r, int ci, int co, const char *name,
                       const char *ldm)
{
    char n[KV_PARAM_NAME], l[KV_PARAM_NAME];
    r->in_channels = ci;
    r->out_channels = co;
    fmt_name(n, "%s.norm1", name);
    fmt_name(l, "%s.norm1", ldm);
    add_norm(b, &r->norm1, ci, n, l);
    fmt_name(n, "%s.conv1", name);
    fmt_name(l, "%s.conv1", ldm);
    add_conv(b, &r->conv1, ci, co, 3, n, l);
    fmt_name(n, "%s.norm2", name);
    fmt_name(l, "%s.norm2", ldm);
    add_norm(b, &r->norm2, co, n, l);
    fmt_name(n, "%s.conv2", name);
    fmt_name(l, "%s.conv2", ldm);
    add_conv(b, &r->conv2, co, co, 3, n, l);
    r->has_shortcut = ci != co;
    if (r->has_shortcut) {
        fmt_name(n, "%s.conv_shortcut", name);
        fmt_name(l, "%s.nin_shortcut", ldm);
        add_conv(b, &r->shortcut, ci, co, 1, n, l);
    }
}

/* UNetMidBlock2D: attention registered before the resnets. */
static void add_mid_block(registry_builder *b, kv_mid_block *mid, int channels, bool attention,
                          const char *coder)
{
    char n[KV_PARAM_NAME], l[KV_PARAM_NAME];
    mid->has_attention = attention;
    if (attention) {
        kv_attention *a = &mid->attention;
        a->channels = channels;
        fmt_name(n, "%s.mid_block.attentions.0.group_norm", coder);
        fmt_name(l, "%s.mid.attn_1.norm", coder);
        add_norm(b, &a->norm, channels, n, l);
        static const char *const dif[] = {"to_q", "to_k", "to_v", "to_out.0"};
        static const char *const ldm[] = {"q", "k", "v", "proj_out"};
        kv_conv *proj[] = {&a->to_q, &a->to_k, &a->to_v, &a->to_out};
        for (int i = 0; i < 4; i++) {
            fmt_name(n, "%s.mid_block.attentions.0.%s", coder, dif[i]);
            fmt_name(l, "%s.mid.attn_1.%s", coder, ldm[i]);
            add_linear(b, proj[i], channels, n, l);
        }
    }
    for (int i = 0; i < 2; i++) {
        fmt_name(n, "%s.mid_block.resnets.%d", coder, i);
        fmt_name(l, "%s.mid.block_%d", coder, i + 1);
        add_resnet(b, &mid->resnets[i], channels, channels, n, l);
    }
}

static void build_encoder(registry_builder *b, const kv_config *cfg, kv_encoder *e)
{
    char n[KV_PARAM_NAME], l[KV_PARAM_NAME];
    const int nb = cfg->num_blocks, *ch = cfg->block_out_channels;
    add_conv(b, &e->conv_in, cfg->in_channels, ch[0], 3, "encoder.conv_in", "encoder.conv_in");
    for (int i = 0; i < nb; i++) {
        kv_level *lv = &e->down[i];
        int ci = i == 0 ? ch[0] : ch[i - 1];
        lv->num_resnets = cfg->layers_per_block;
        for (int j = 0; j < lv->num_resnets; j++) {
            fmt_name(n, "encoder.down_blocks.%d.resnets.%d", i, j);
            fmt_name(l, "encoder.down.%d.block.%d", i, j);
            add_resnet(b, &lv->resnets[j], j == 0 ? ci : ch[i], ch[i], n, l);
        }
        lv->has_sampler = i < nb - 1;
        if (lv->has_sampler) {
            fmt_name(n, "encoder.down_blocks.%d.downsamplers.0.conv", i);
            fmt_name(l, "encoder.down.%d.downsample.conv", i);
            add_conv(b, &lv->sampler, ch[i], ch[i], 3, n, l);
        }
    }
    add_mid_block(b, &e->mid, ch[nb - 1], cfg->mid_block_add_attention, "encoder");
    add_norm(b, &e->norm_out, ch[nb - 1], "encoder.conv_norm_out", "encoder.norm_out");
    add_conv(b, &e->conv_out, ch[nb - 1], 2 * cfg->latent_channels, 3, "encoder.conv_out",
             "encoder.conv_out");
}

static void build_decoder(registry_builder *b, const kv_config *cfg, kv_decoder *d)
{
    char n[KV_PARAM_NAME], l[KV_PARAM_NAME];
    const int nb = cfg->num_blocks, *ch = cfg->block_out_channels;
    add_conv(b, &d->conv_in, cfg->latent_channels, ch[nb - 1], 3, "decoder.conv_in",
             "decoder.conv_in");
    /* up_blocks are registered before the mid block in diffusers' Decoder. */
    for (int i = 0; i < nb; i++) {
        kv_level *lv = &d->up[i];
        int co = ch[nb - 1 - i];
        int ci = i == 0 ? ch[nb - 1] : ch[nb - i];
        int ldm_level = nb - 1 - i; /* CompVis numbers decoder levels the other way */
        lv->num_resnets = cfg->layers_per_block + 1;
        for (int j = 0; j < lv->num_resnets; j++) {
            fmt_name(n, "decoder.up_blocks.%d.resnets.%d", i, j);
            fmt_name(l, "decoder.up.%d.block.%d", ldm_level, j);
            add_resnet(b, &lv->resnets[j], j == 0 ? ci : co, co, n, l);
        }
        lv->has_sampler = i < nb - 1;
        if (lv->has_sampler) {
            fmt_name(n, "decoder.up_blocks.%d.upsamplers.0.conv", i);
            fmt_name(l, "decoder.up.%d.upsample.conv", ldm_level);
            add_conv(b, &lv->sampler, co, co, 3, n, l);
        }
    }
    add_mid_block(b, &d->mid, ch[nb - 1], cfg->mid_block_add_attention, "decoder");
    add_norm(b, &d->norm_out, ch[0], "decoder.conv_norm_out", "decoder.norm_out");
    add_conv(b, &d->conv_out, ch[0], cfg->out_channels, 3, "decoder.conv_out",
             "decoder.conv_out");
}

klvae_status_t kv_model_build(klvae_model_t *m)
{
    registry_builder b = {m, 0, KLVAE_OK};
    const kv_config *cfg = &m->cfg;
    build_encoder(&b, cfg, &m->enc);
    build_decoder(&b, cfg, &m->dec);
    int z = cfg->latent_channels;
    if (cfg->use_quant_conv)
        add_conv(&b, &m->quant_conv, 2 * z, 2 * z, 1, "quant_conv", "quant_conv");
    if (cfg->use_post_quant_conv)
        add_conv(&b, &m->post_quant_conv, z, z, 1, "post_quant_conv", "post_quant_conv");
    if (b.status != KLVAE_OK)
        return b.status;
    m->parameter_count = 0;
    for (size_t i = 0; i < m->num_params; i++)
        m->parameter_count += (int64_t)kv_tensor_numel(m->params[i].tensor);
    return KLVAE_OK;
}

klvae_status_t kv_model_alloc_params(klvae_model_t *m, kv_storage storage)
{
    for (size_t i = 0; i < m->num_params; i++) {
        kv_tensor *t = m->params[i].tensor;
        size_t bytes = kv_tensor_numel(t) * sizeof(float);
        klvae_status_t st = m->be->ops->alloc(m->be, bytes, storage, &t->data);
        if (st != KLVAE_OK)
            return kv_error_prefix(st, "allocating %s", m->params[i].name);
        t->owned = true;
    }
    return KLVAE_OK;
}

klvae_status_t kv_model_init_params(klvae_model_t *m, uint64_t seed)
{
    size_t largest = 0;
    for (size_t i = 0; i < m->num_params; i++)
        largest = KV_MAX(largest, kv_tensor_numel(m->params[i].tensor));
    float *host = malloc(KV_MAX(largest, 1) * sizeof *host);
    if (!host)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory initialising the model");
    klvae_status_t st = KLVAE_OK;
    for (size_t i = 0; i < m->num_params && st == KLVAE_OK; i++) {
        const kv_param *p = &m->params[i];
        size_t n = kv_tensor_numel(p->tensor);
        /* Each parameter draws from its own range of counters (by its place
         * in the registry), so no parameter's values depend on another's
         * size. */
        uint64_t base = (uint64_t)i << 36;
        float bound = p->fan_in > 0 ? (float)(1.0 / sqrt((double)p->fan_in)) : 0.0f;
        for (size_t e = 0; e < n; e++) {
            switch (p->kind) {
            case KV_PARAM_WEIGHT:
            case KV_PARAM_BIAS:
                host[e] = (2.0f * kv_philox_uniform(seed, base + e) - 1.0f) * bound;
                break;
            case KV_PARAM_NORM_WEIGHT: host[e] = 1.0f; break;
            case KV_PARAM_NORM_BIAS: host[e] = 0.0f; break;
            }
        }
        st = m->be->ops->upload(m->be, p->tensor, host);
    }
    free(host);
    return st;
}

void kv_model_destroy(klvae_model_t *m)
{
    if (!m)
        return;
    for (size_t i = 0; i < m->num_params; i++)
        if (m->be)
            kv_tensor_release(m->be, m->params[i].tensor);
    free(m->params);
    kv_backend_destroy(m->be);
    kv_config_free(&m->cfg);
    free(m->infer.spill_dir);
    free(m);
}

void kv_model_end_call(klvae_model_t *m)
{
    m->be->ops->trim(m->be, m->infer.keep_memory);
}

/* ---- device calls ---- */

klvae_status_t kv_plugin_status(klvae_status_t st)
{
    return st == KLVAE_OK || (st > KLVAE_OK && st <= KLVAE_ERR_BUFFER_TOO_SMALL)
               ? st
               : KLVAE_ERR_BACKEND;
}

klvae_status_t kv_model_stream_enter(klvae_model_t *m, const char *fn, const char *host_fn,
                                     void *stream)
{
    if (!m->plugin)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "%s: the model runs on the %s backend, which has no device memory; use "
                        "%s with host arrays (or load the model with backend=cuda)",
                        fn, m->backend_name, host_fn);
    return kv_plugin_status(m->plugin->set_stream(m->be, stream));
}

klvae_status_t kv_model_stream_leave(klvae_model_t *m, klvae_status_t st, bool trainer_step)
{
    char saved[1024] = "";
    if (st != KLVAE_OK)
        snprintf(saved, sizeof saved, "%s", kv_error_message());
    klvae_status_t sync = kv_plugin_status(m->plugin->synchronize(m->be));
    if (st == KLVAE_OK && sync != KLVAE_OK) {
        st = sync;
        snprintf(saved, sizeof saved, "%s", kv_error_message());
    }
    klvae_status_t reset = kv_plugin_status(m->plugin->set_stream(m->be, NULL));
    if (st == KLVAE_OK && reset != KLVAE_OK) {
        st = reset;
        snprintf(saved, sizeof saved, "%s", kv_error_message());
    }
    if (trainer_step)
        m->be->ops->trim(m->be, true);
    else
        kv_model_end_call(m);
    if (st != KLVAE_OK)
        return kv_error(st, "%s", saved);
    kv_error_clear();
    return KLVAE_OK;
}
