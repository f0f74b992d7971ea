/* vae_stream.c — the streamed forward (stream.h): vae.c's network, layer by
 * layer over row bands, one sample at a time.
 *
 * Every layer is a "pass": a convolution over the bands of its output rows
 * (with the group norm of its input as the prologue, the residual added,
 * the statistics of its output gathered for the norm that reads it next),
 * or the mid-block attention (which attends over every position, so it
 * holds its input, q, k, v and output whole: they are at the latent
 * resolution). A pass frees the bands of its inputs that no later read
 * needs as soon as it is past them. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model/layers.h"
#include "model/stream_store.h"

/* ---- tensors of the forward: counted, and only counted in a dry run ---- */

/* The bytes of a backend tensor: float32 ones (statistics), or the
 * backend's compute format (bf16 on a lossy backend: 2 bytes). */
static uint64_t tensor_bytes(const kv_stream *s, const kv_tensor *t, bool f32)
{
    return kv_tensor_numel(t) * (f32 || !s->be->lossy_storage ? sizeof(float) : 2);
}

static klvae_status_t take_tensor(kv_stream *s, int c, int h, int w, bool f32, kv_tensor *t)
{
    memset(t, 0, sizeof *t);
    t->shape[0] = 1, t->shape[1] = c, t->shape[2] = h, t->shape[3] = w, t->ndim = 4;
    if (!s->dry) {
        klvae_status_t st = f32 ? kv_tensor_alloc_f32(s->be, 1, c, h, w, t)
                                : kv_tensor_alloc(s->be, 1, c, h, w, t);
        if (st != KLVAE_OK)
            return st;
    }
    kv_stream_take(s, tensor_bytes(s, t, f32));
    return KLVAE_OK;
}

/* Gives back a tensor take_tensor made (with the same f32). */
static void give_tensor(kv_stream *s, kv_tensor *t, bool f32)
{
    if (t->ndim == 0)
        return;
    kv_stream_give(s, tensor_bytes(s, t, f32));
    kv_tensor_release(s->be, t);
    memset(t, 0, sizeof *t);
}

/* A (1, c, rows, w) view of buffer's memory. */
static kv_tensor view(const kv_tensor *buffer, int c, int rows, int w)
{
    return kv_tensor_view4(buffer, 1, c, rows, w);
}

/* Host copies of a backend's float32 tensor (gamma, beta, statistics). */
static klvae_status_t host_floats(kv_stream *s, const kv_tensor *t, float *out)
{
    if (s->be->host_memory) {
        memcpy(out, t->data, kv_tensor_numel(t) * sizeof(float));
        return KLVAE_OK;
    }
    return s->be->ops->download(s->be, out, t);
}

/* ---- the prologue: a group norm with the statistics of its input ---- */

typedef struct prologue {
    kv_tensor scale, shift; /* (1, C) */
    kv_conv_prologue p;
    bool active;
} prologue;

/* The norm nm of the values written to x, then act, as a prologue. */
static klvae_status_t prologue_make(kv_stream *s, const kv_store *x, const kv_norm *nm,
                                    kv_activation act, bool upsample, prologue *pr)
{
    memset(pr, 0, sizeof *pr);
    pr->p.upsample2x = upsample;
    pr->active = nm || upsample;
    if (!nm)
        return KLVAE_OK;
    const int c = x->c;
    klvae_status_t st = take_tensor(s, c, 1, 1, true, &pr->scale);
    if (st == KLVAE_OK)
        st = take_tensor(s, c, 1, 1, true, &pr->shift);
    if (st != KLVAE_OK || s->dry)
        return st;
    float *host = malloc((size_t)c * 4 * sizeof(float));
    if (!host)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory for a norm's statistics");
    float *gamma = host, *beta = host + c, *scale = host + 2 * c, *shift = host + 3 * c;
    st = host_floats(s, &nm->weight, gamma);
    if (st == KLVAE_OK)
        st = host_floats(s, &nm->bias, beta);
    if (st == KLVAE_OK && x->affine) {
        memcpy(scale, x->affine, (size_t)c * sizeof(float));
        memcpy(shift, x->affine + c, (size_t)c * sizeof(float));
    } else if (st == KLVAE_OK) {
        kv_store_norm_affine(x, gamma, beta, KV_GN_EPS, scale, shift);
    }
    if (st == KLVAE_OK)
        st = s->be->ops->upload(s->be, &pr->scale, scale);
    if (st == KLVAE_OK)
        st = s->be->ops->upload(s->be, &pr->shift, shift);
    free(host);
    pr->p = (kv_conv_prologue){&pr->scale, &pr->shift, act, upsample};
    return st;
}

static void prologue_free(kv_stream *s, prologue *pr)
{
    give_tensor(s, &pr->scale, true);
    give_tensor(s, &pr->shift, true);
}

/* ---- statistics of an output band ---- */

typedef struct band_stats {
    kv_tensor scale, shift, mean, rstd; /* what group_norm_stats writes */
    float *host;                        /* mean and rstd, (2, groups) */
} band_stats;

static klvae_status_t band_stats_make(kv_stream *s, const kv_store *y, band_stats *b)
{
    memset(b, 0, sizeof *b);
    if (!y->groups)
        return KLVAE_OK;
    klvae_status_t st = take_tensor(s, y->c, 1, 1, true, &b->scale);
    if (st == KLVAE_OK)
        st = take_tensor(s, y->c, 1, 1, true, &b->shift);
    if (st == KLVAE_OK)
        st = take_tensor(s, y->groups, 1, 1, true, &b->mean);
    if (st == KLVAE_OK)
        st = take_tensor(s, y->groups, 1, 1, true, &b->rstd);
    if (st == KLVAE_OK && !(b->host = malloc((size_t)y->groups * 2 * sizeof(float))))
        st = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory for a norm's statistics");
    return st;
}

static void band_stats_free(kv_stream *s, band_stats *b)
{
    give_tensor(s, &b->scale, true);
    give_tensor(s, &b->shift, true);
    give_tensor(s, &b->mean, true);
    give_tensor(s, &b->rstd, true);
    free(b->host);
    b->host = NULL;
}

/* Merges the statistics of yt, rows of y, into y's; nm (any norm of y's
 * width) only gives group_norm_stats the shapes it wants. */
static klvae_status_t gather_stats(kv_stream *s, kv_store *y, const kv_norm *nm,
                                   const kv_tensor *yt, band_stats *b)
{
    if (!y->groups || s->dry)
        return KLVAE_OK;
    kv_backend *be = s->be;
    klvae_status_t st = be->ops->group_norm_stats(be, yt, &nm->weight, &nm->bias, y->groups,
                                                  KV_GN_EPS, &b->scale, &b->shift, &b->mean,
                                                  &b->rstd);
    if (st == KLVAE_OK)
        st = host_floats(s, &b->mean, b->host);
    if (st == KLVAE_OK)
        st = host_floats(s, &b->rstd, b->host + y->groups);
    if (st == KLVAE_OK) {
        double n = (double)(y->c / y->groups) * yt->shape[2] * yt->shape[3];
        kv_store_add_moments(y, b->host, b->host + y->groups, n, KV_GN_EPS);
    }
    if (st == KLVAE_OK && yt->shape[2] == y->h) { /* the whole tensor: keep the exact affine */
        if (!(y->affine = malloc((size_t)y->c * 2 * sizeof(float))))
            return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory for a norm's statistics");
        st = host_floats(s, &b->scale, y->affine);
        if (st == KLVAE_OK)
            st = host_floats(s, &b->shift, y->affine + y->c);
    }
    return st;
}

/* ---- a convolution pass ---- */

typedef struct conv_pass {
    const kv_conv *conv;
    kv_conv_geometry g;      /* the layer's geometry in the untiled forward */
    bool upsample;           /* x is read through the nearest 2x upsample */
    kv_store *x;
    const kv_norm *norm;     /* x is read through this group norm, then act */
    kv_activation act;
    kv_store *residual;      /* added to the output (its rows), or NULL */
    const kv_conv *shortcut; /* the residual is shortcut(rows of residual) */
    bool last_x, last_residual; /* no later pass reads them: free as we go */
    kv_store *y;             /* written in bands of rows */
    const kv_norm *y_norm;   /* the norm that reads y (y->groups > 0) */
    /* A second output: side_y = side(rows of x), a 1x1 convolution of the
     * band's own rows (a resnet's shortcut, computed while x is read anyway
     * so that x can be freed as the pass goes). */
    const kv_conv *side;
    kv_store *side_y;
} conv_pass;

static int kernel_rows(const kv_conv *c)
{
    return c->weight.ndim == 4 ? c->weight.shape[2] : 1;
}

/* Rows of x the output rows [o0, o1) read, [*a, *b), and the padding rows
 * the band's convolution adds above and below in place of halo rows that
 * the image does not have. */
static void input_rows(const conv_pass *p, int o0, int o1, int *a, int *b, kv_conv_geometry *g)
{
    const int k = kernel_rows(p->conv), s = p->g.stride, up = p->upsample ? 2 : 1;
    const int h = p->x->h * up; /* rows as the convolution sees them */
    int lo = o0 * s - p->g.pad_top, hi = (o1 - 1) * s - p->g.pad_top + k;
    *g = p->g;
    g->pad_top = lo < 0 ? -lo : 0;
    g->pad_bottom = hi > h ? hi - h : 0;
    lo = KV_MAX(lo, 0);
    hi = KV_MIN(hi, h);
    /* with the upsample, lo and hi are even (band_end sees to it) */
    *a = lo / up;
    *b = hi / up;
}

static int output_rows(const conv_pass *p)
{
    const int up = p->upsample ? 2 : 1;
    return (p->x->h * up + p->g.pad_top + p->g.pad_bottom - kernel_rows(p->conv)) / p->g.stride +
           1;
}

static int output_cols(const conv_pass *p)
{
    const int up = p->upsample ? 2 : 1, k = p->conv->weight.ndim == 4 ? p->conv->weight.shape[3] : 1;
    return (p->x->w * up + p->g.pad_left + p->g.pad_right - k) / p->g.stride + 1;
}

/* Output rows per band: the plan's band size over what one row costs. */
static int band_rows(const kv_stream *s, const conv_pass *p)
{
    const size_t co = (size_t)p->conv->weight.shape[0], wo = (size_t)output_cols(p);
    const size_t ci = (size_t)p->x->c, wi = (size_t)p->x->w;
    size_t row = co * wo * (p->residual ? 3 : 2); /* output, residual, copy */
    row += p->upsample ? ci * wi * 5 / 2 : ci * wi * (size_t)p->g.stride; /* input (+ upsampled) */
    row *= sizeof(float);
    return (int)KV_MIN((size_t)output_rows(p), KV_MAX((size_t)1, s->band_bytes / row));
}

/* The end of the band that starts at o0. Behind the upsample a band must
 * read whole rows of x: its halo rows o0 - 1 and o1 must be even, so its
 * ends are odd (or the image's). */
static int band_end(const conv_pass *p, int rows, int o0)
{
    const int ho = output_rows(p);
    int o1 = KV_MIN(ho, o0 + rows);
    if (p->upsample && o1 < ho && o1 % 2 == 0)
        o1 = o1 - 1 > o0 ? o1 - 1 : o1 + 1;
    return o1;
}

/* The band buffers of a pass, in backend memory: the input rows, the
 * residual (and the shortcut's input), and the output where it cannot be
 * written where it is stored; host staging for a backend without host
 * memory. */
typedef struct pass_buffers {
    kv_tensor in, res, aux, out, side;
    float *staging;
    size_t staging_floats;
} pass_buffers;

static bool writes_in_place(const kv_stream *s, const conv_pass *p)
{
    return s->be->host_memory && !p->y->external;
}

/* The largest band of each buffer over the pass's bands. */
static klvae_status_t buffers_make(kv_stream *s, const conv_pass *p, int rows, pass_buffers *b)
{
    memset(b, 0, sizeof *b);
    int most_in = 0, most_out = 0;
    for (int o0 = 0, ho = output_rows(p); o0 < ho;) {
        int o1 = band_end(p, rows, o0), a, z;
        kv_conv_geometry g;
        input_rows(p, o0, o1, &a, &z, &g);
        most_in = KV_MAX(most_in, z - a);
        most_out = KV_MAX(most_out, o1 - o0);
        o0 = o1;
    }
    const int co = p->conv->weight.shape[0], wo = output_cols(p);
    klvae_status_t st = take_tensor(s, p->x->c, most_in, p->x->w, false, &b->in);
    if (st == KLVAE_OK && p->residual)
        st = take_tensor(s, co, most_out, wo, false, &b->res);
    if (st == KLVAE_OK && p->shortcut)
        st = take_tensor(s, p->residual->c, most_out, p->residual->w, false, &b->aux);
    if (st == KLVAE_OK && p->side)
        st = take_tensor(s, p->x->c, most_out, p->x->w, false, &b->aux);
    if (st == KLVAE_OK && p->side && !s->be->host_memory)
        st = take_tensor(s, p->side_y->c, most_out, p->side_y->w, false, &b->side);
    if (st == KLVAE_OK && !writes_in_place(s, p))
        st = take_tensor(s, co, most_out, wo, false, &b->out);
    if (st == KLVAE_OK && !s->be->host_memory) {
        size_t n = KV_MAX(kv_tensor_numel(&b->in), kv_tensor_numel(&b->out));
        n = KV_MAX(n, kv_tensor_numel(&b->res));
        n = KV_MAX(n, kv_tensor_numel(&b->aux));
        n = KV_MAX(n, kv_tensor_numel(&b->side));
        b->staging_floats = n;
        kv_stream_take_host(s, n * sizeof(float));
        if (!s->dry && !(b->staging = malloc(n * sizeof(float))))
            st = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory for a staging buffer");
    }
    return st;
}

static void buffers_free(kv_stream *s, pass_buffers *b)
{
    give_tensor(s, &b->in, false);
    give_tensor(s, &b->res, false);
    give_tensor(s, &b->aux, false);
    give_tensor(s, &b->out, false);
    give_tensor(s, &b->side, false);
    if (b->staging_floats)
        kv_stream_give_host(s, b->staging_floats * sizeof(float));
    free(b->staging);
    memset(b, 0, sizeof *b);
}

/* t (a view of buffer) = rows [r0, r1) of st: the store's own memory when
 * one band holds exactly them, else a copy. */
static klvae_status_t load_rows(kv_stream *s, const kv_store *st, int r0, int r1,
                                const kv_tensor *buffer, float *staging, kv_tensor *t)
{
    *t = view(buffer, st->c, r1 - r0, st->w);
    if (s->dry)
        return kv_store_read(s, st, r0, r1, NULL);
    if (s->be->host_memory) {
        float *own = kv_store_exact_band(st, r0, r1);
        if (own) {
            *t = kv_tensor_wrap(own, 1, st->c, r1 - r0, st->w);
            return KLVAE_OK;
        }
        return kv_store_read(s, st, r0, r1, t->data);
    }
    klvae_status_t status = kv_store_read(s, st, r0, r1, staging);
    return status == KLVAE_OK ? s->be->ops->upload(s->be, t, staging) : status;
}

/* The residual of output rows [o0, o1): rows of p->residual, or their
 * shortcut convolution. */
static klvae_status_t load_residual(kv_stream *s, const conv_pass *p, int o0, int o1,
                                    pass_buffers *b, kv_tensor *r)
{
    if (!p->shortcut)
        return load_rows(s, p->residual, o0, o1, &b->res, b->staging, r);
    kv_tensor in;
    klvae_status_t st = load_rows(s, p->residual, o0, o1, &b->aux, b->staging, &in);
    *r = view(&b->res, p->shortcut->weight.shape[0], o1 - o0, p->residual->w);
    if (st == KLVAE_OK && !s->dry)
        st = kv_conv_into(s->be, p->shortcut, &in, NULL, NULL, kv_pointwise, r);
    return st;
}

/* Writes the output band yt (rows [o0, o1)) where it belongs: into the
 * store band begun for it, or the caller's array. */
static klvae_status_t store_output(kv_stream *s, const conv_pass *p, int o0, int o1,
                                   const kv_tensor *yt, float *band, pass_buffers *b)
{
    if (s->dry || writes_in_place(s, p))
        return KLVAE_OK;
    if (!s->be->host_memory && !p->y->external) /* straight into the band */
        return s->be->ops->download(s->be, band, yt);
    const float *host = yt->data;
    if (!s->be->host_memory) {
        klvae_status_t st = s->be->ops->download(s->be, b->staging, yt);
        if (st != KLVAE_OK)
            return st;
        host = b->staging;
    }
    if (p->y->external)
        kv_store_write_rows(p->y, o0, o1, host);
    else
        memcpy(band, host, kv_tensor_numel(yt) * sizeof(float));
    return KLVAE_OK;
}

/* The side output of rows [o0, o1): side(rows of x) into a new band of
 * side_y. */
static klvae_status_t run_side(kv_stream *s, const conv_pass *p, int o0, int o1,
                               pass_buffers *b)
{
    const int co = p->side->weight.shape[0], w = p->side_y->w;
    kv_tensor in, y;
    float *band = NULL;
    klvae_status_t st = load_rows(s, p->x, o0, o1, &b->aux, b->staging, &in);
    if (st == KLVAE_OK)
        st = kv_store_begin_band(s, p->side_y, o0, o1, &band);
    if (st != KLVAE_OK)
        return st;
    const bool in_place = s->be->host_memory;
    y = in_place ? kv_tensor_wrap(band, 1, co, o1 - o0, w) : view(&b->side, co, o1 - o0, w);
    if (!s->dry)
        st = kv_conv_into(s->be, p->side, &in, NULL, NULL, kv_pointwise, &y);
    if (st == KLVAE_OK && !s->dry && !in_place)
        st = s->be->ops->download(s->be, band, &y);
    kv_store_end_band(s, p->side_y, band);
    return st;
}

/* One band of output rows [o0, o1). */
static klvae_status_t run_band(kv_stream *s, const conv_pass *p, const prologue *pr, int o0,
                               int o1, pass_buffers *b, band_stats *bs)
{
    const int co = p->conv->weight.shape[0], wo = output_cols(p);
    int a, z;
    kv_conv_geometry g;
    input_rows(p, o0, o1, &a, &z, &g);
    kv_tensor r = {0}, x, y;
    klvae_status_t st = p->residual ? load_residual(s, p, o0, o1, b, &r) : KLVAE_OK;
    if (st == KLVAE_OK && p->side)
        st = run_side(s, p, o0, o1, b);
    if (st == KLVAE_OK)
        st = load_rows(s, p->x, a, z, &b->in, b->staging, &x);
    float *band = NULL;
    if (st == KLVAE_OK && !p->y->external)
        st = kv_store_begin_band(s, p->y, o0, o1, &band);
    if (st != KLVAE_OK)
        return st;
    y = writes_in_place(s, p) ? kv_tensor_wrap(band, 1, co, o1 - o0, wo)
                              : view(&b->out, co, o1 - o0, wo);
    kv_stream_conv_memory(s, p->conv, x.shape[2], x.shape[3], p->upsample, p->norm != NULL, g,
                          o1 - o0, wo);
    if (!s->dry)
        st = kv_conv_into(s->be, p->conv, &x, pr->active ? &pr->p : NULL,
                          p->residual ? &r : NULL, g, &y);
    if (st == KLVAE_OK)
        st = gather_stats(s, p->y, p->y_norm, &y, bs);
    if (st == KLVAE_OK)
        st = store_output(s, p, o0, o1, &y, band, b);
    if (!p->y->external)
        kv_store_end_band(s, p->y, band);
    s->report.bands++;
    s->report.min_rows = s->report.min_rows ? KV_MIN(s->report.min_rows, o1 - o0) : o1 - o0;
    s->report.max_rows = KV_MAX(s->report.max_rows, o1 - o0);
    return st;
}

/* Runs the pass over every band of its output. Inputs it reads last are
 * freed band by band, and whole at its end. */
static klvae_status_t run_conv(kv_stream *s, const conv_pass *p)
{
    const int ho = output_rows(p), planned = band_rows(s, p);
    const int rows = s->max_rows > 0 ? KV_MIN(planned, s->max_rows) : planned;
    if (planned < KV_MIN(16, ho)) /* the halo rows cost more than an eighth */
        s->thin = true;
    prologue pr;
    pass_buffers b;
    band_stats bs;
    klvae_status_t st = prologue_make(s, p->x, p->norm, p->act, p->upsample, &pr);
    if (st == KLVAE_OK)
        st = buffers_make(s, p, rows, &b);
    if (st == KLVAE_OK)
        st = band_stats_make(s, p->y, &bs);
    for (int o0 = 0; st == KLVAE_OK && o0 < ho;) {
        const int o1 = band_end(p, rows, o0);
        st = run_band(s, p, &pr, o0, o1, &b, &bs);
        if (st == KLVAE_OK && o1 < ho && p->last_x) {
            int a, z;
            kv_conv_geometry g;
            input_rows(p, o1, band_end(p, rows, o1), &a, &z, &g);
            kv_store_free_below(s, p->x, a);
        }
        if (st == KLVAE_OK && p->last_residual)
            kv_store_free_below(s, p->residual, o1);
        o0 = o1;
    }
    band_stats_free(s, &bs);
    buffers_free(s, &b);
    prologue_free(s, &pr);
    /* The layer's temporaries go back: all of them in host memory, where
     * the plan counts each layer's own; a GPU's pool keeps the layer's peak
     * (what the next layer's bands most likely need again). */
    if (!s->dry)
        s->be->ops->trim(s->be, !s->be->host_memory);
    if (st == KLVAE_OK && p->last_x)
        kv_store_free(s, p->x);
    if (st == KLVAE_OK && p->last_residual)
        kv_store_free(s, p->residual);
    return st;
}

/* ---- blocks ---- */

static int groups_of(const kv_stream *s, const kv_norm *reader)
{
    return reader ? s->m->cfg.norm_num_groups : 0;
}

/* *x = conv(x) for a layer without a norm before it (post_quant_conv,
 * quant_conv, the samplers, conv_in); next is the norm that reads the
 * result, or NULL. x is freed unless it is the caller's. */
static klvae_status_t conv_step(kv_stream *s, const kv_conv *c, kv_conv_geometry g,
                                bool upsample, kv_store *x, const kv_norm *next)
{
    conv_pass p = {.conv = c, .g = g, .upsample = upsample, .x = x, .last_x = !x->external,
                   .y_norm = next};
    kv_store y;
    const int co = c->weight.shape[0];
    klvae_status_t st = kv_store_init(s, &y, co, output_rows(&p), output_cols(&p),
                                      groups_of(s, next));
    p.y = &y;
    if (st == KLVAE_OK)
        st = run_conv(s, &p);
    if (st != KLVAE_OK) {
        kv_store_free(s, &y);
        return st;
    }
    *x = y;
    return KLVAE_OK;
}

/* ResnetBlock2D: h = conv1(act(norm1(x))), then
 * out = conv2(act(norm2(h))) + (x, or its 1x1 shortcut); *x becomes out. */
static klvae_status_t resnet_step(kv_stream *s, const kv_resnet *r, kv_store *x,
                                  const kv_norm *next)
{
    const kv_activation act = kv_config_activation(&s->m->cfg);
    const int g = s->m->cfg.norm_num_groups;
    /* A shortcut narrower than x (the decoder's) is computed in the first
     * pass, which then frees x as it goes: x and conv1's output never need
     * to be held whole together. */
    const bool early = r->has_shortcut && r->out_channels < r->in_channels;
    const int rows = x->h, cols = x->w; /* x is freed by the first pass when early */
    kv_store h, skip, out;
    memset(&skip, 0, sizeof skip);
    memset(&out, 0, sizeof out);
    klvae_status_t st = kv_store_init(s, &h, r->out_channels, rows, cols, g);
    if (st == KLVAE_OK && early)
        st = kv_store_init(s, &skip, r->out_channels, rows, cols, 0);
    conv_pass p1 = {.conv = &r->conv1, .g = kv_same_3x3, .x = x, .norm = &r->norm1, .act = act,
                    .last_x = early, .y = &h, .y_norm = &r->norm2,
                    .side = early ? &r->shortcut : NULL, .side_y = early ? &skip : NULL};
    if (st == KLVAE_OK)
        st = run_conv(s, &p1);
    if (st == KLVAE_OK)
        st = kv_store_init(s, &out, r->out_channels, rows, cols, groups_of(s, next));
    conv_pass p2 = {.conv = &r->conv2, .g = kv_same_3x3, .x = &h, .norm = &r->norm2, .act = act,
                    .residual = early ? &skip : x,
                    .shortcut = r->has_shortcut && !early ? &r->shortcut : NULL,
                    .last_x = true, .last_residual = true, .y = &out, .y_norm = next};
    if (st == KLVAE_OK)
        st = run_conv(s, &p2);
    kv_store_free(s, &h);
    kv_store_free(s, &skip);
    if (st != KLVAE_OK) {
        kv_store_free(s, &out);
        return st;
    }
    *x = out; /* the first pass or the second freed x */
    return KLVAE_OK;
}

/* The whole of x in one tensor t. */
static klvae_status_t load_whole(kv_stream *s, const kv_store *x, kv_tensor *t)
{
    klvae_status_t st = take_tensor(s, x->c, x->h, x->w, false, t);
    if (st != KLVAE_OK)
        return st;
    if (s->be->host_memory)
        return kv_store_read(s, x, 0, x->h, s->dry ? NULL : t->data);
    /* through host memory (counted in a dry run too) */
    const uint64_t bytes = kv_tensor_numel(t) * sizeof(float);
    float *host = NULL;
    if (!s->dry && !(host = malloc(bytes)))
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory staging the attention's input");
    kv_stream_take_host(s, bytes);
    st = kv_store_read(s, x, 0, x->h, host);
    if (st == KLVAE_OK && !s->dry)
        st = s->be->ops->upload(s->be, t, host);
    free(host);
    kv_stream_give_host(s, bytes);
    return st;
}

/* o = attention(q, k, v) over every position of x, with q, k and v the
 * projections of group_norm(x) (the norm is their prologue). */
static klvae_status_t attend(kv_stream *s, const kv_attention *a, const kv_store *x,
                             kv_tensor *o)
{
    const int c = a->channels;
    const kv_conv proj[3] = {kv_conv_as_1x1(&a->to_q, c), kv_conv_as_1x1(&a->to_k, c),
                             kv_conv_as_1x1(&a->to_v, c)};
    kv_tensor xt, qkv[3];
    memset(qkv, 0, sizeof qkv);
    prologue pr;
    klvae_status_t st = prologue_make(s, x, &a->norm, KV_ACT_NONE, false, &pr);
    if (st == KLVAE_OK)
        st = load_whole(s, x, &xt);
    for (int i = 0; st == KLVAE_OK && i < 3; i++) {
        st = take_tensor(s, c, x->h, x->w, false, &qkv[i]);
        if (st == KLVAE_OK && !s->dry)
            st = kv_conv_into(s->be, &proj[i], &xt, &pr.p, NULL, kv_pointwise, &qkv[i]);
    }
    give_tensor(s, &xt, false);
    prologue_free(s, &pr);
    if (st == KLVAE_OK)
        st = take_tensor(s, c, x->h, x->w, false, o);
    kv_stream_scratch(s, 0, kv_attention_thread_bytes(x->h * x->w));
    if (st == KLVAE_OK && !s->dry)
        st = s->be->ops->attention(s->be, &qkv[0], &qkv[1], &qkv[2],
                                   (float)(1.0 / sqrt((double)c)), o);
    for (int i = 0; i < 3; i++)
        give_tensor(s, &qkv[i], false);
    return st;
}

/* The mid-block attention: x + to_out(attention(q, k, v)); *x becomes the
 * result. The attention holds its q, k, v and output whole; to_out and the
 * residual go by bands. */
static klvae_status_t attention_step(kv_stream *s, const kv_attention *a, kv_store *x,
                                     const kv_norm *next)
{
    const int c = a->channels, h = x->h, w = x->w;
    const kv_conv po = kv_conv_as_1x1(&a->to_out, c);
    kv_tensor o;
    memset(&o, 0, sizeof o);
    float *host = NULL; /* o in host memory */
    const uint64_t host_bytes = (uint64_t)c * h * w * sizeof(float);
    bool staged = false;
    kv_store os, y;
    memset(&y, 0, sizeof y);
    klvae_status_t st = attend(s, a, x, &o);
    if (st == KLVAE_OK && !s->be->host_memory) {
        /* o moves to host memory (also in a dry run, which counts it) */
        staged = true;
        kv_stream_take_host(s, host_bytes);
        if (!s->dry)
            st = (host = malloc(host_bytes))
                     ? s->be->ops->download(s->be, host, &o)
                     : kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory staging the attention");
        give_tensor(s, &o, false);
        o.data = host;
    }
    if (st == KLVAE_OK)
        st = kv_store_init(s, &y, c, h, w, groups_of(s, next));
    kv_store_external(&os, o.data, c, h, w);
    conv_pass out = {.conv = &po, .g = kv_pointwise, .x = &os, .residual = x,
                     .last_residual = true, .y = &y, .y_norm = next};
    if (st == KLVAE_OK)
        st = run_conv(s, &out);
    if (staged) {
        free(host);
        kv_stream_give_host(s, host_bytes);
    } else {
        give_tensor(s, &o, false);
    }
    if (st != KLVAE_OK) {
        kv_store_free(s, &y);
        return st;
    }
    *x = y;
    return KLVAE_OK;
}

static klvae_status_t mid_step(kv_stream *s, const kv_mid_block *mid, kv_store *x,
                               const kv_norm *next)
{
    const kv_norm *after0 = mid->has_attention ? &mid->attention.norm : &mid->resnets[1].norm1;
    klvae_status_t st = resnet_step(s, &mid->resnets[0], x, after0);
    if (st == KLVAE_OK && mid->has_attention)
        st = attention_step(s, &mid->attention, x, &mid->resnets[1].norm1);
    if (st == KLVAE_OK)
        st = resnet_step(s, &mid->resnets[1], x, next);
    return st;
}

/* A level's resnets, then its sampler (when it has one): next_level is
 * the norm that reads the level's result. */
static klvae_status_t level_step(kv_stream *s, const kv_level *lv, bool upsample, kv_store *x,
                                 const kv_norm *next_level)
{
    klvae_status_t st = KLVAE_OK;
    for (int j = 0; st == KLVAE_OK && j < lv->num_resnets; j++) {
        const kv_norm *next = j + 1 < lv->num_resnets ? &lv->resnets[j + 1].norm1
                              : lv->has_sampler       ? NULL
                                                      : next_level;
        st = resnet_step(s, &lv->resnets[j], x, next);
    }
    if (st == KLVAE_OK && lv->has_sampler)
        st = conv_step(s, &lv->sampler, upsample ? kv_same_3x3 : kv_downsample, upsample, x,
                       next_level);
    return st;
}

/* ---- encoder and decoder, one sample ---- */

static klvae_status_t decode_sample(kv_stream *s, const float *z, int lat_h, int lat_w,
                                    float *image)
{
    const klvae_model_t *m = s->m;
    const kv_decoder *d = &m->dec;
    const int f = kv_config_factor(&m->cfg);
    kv_store zin, img;
    kv_store_external(&zin, (float *)z, m->cfg.latent_channels, lat_h, lat_w);
    kv_store_external(&img, image, m->cfg.out_channels, lat_h * f, lat_w * f);
    kv_store h = zin; /* the caller's latents: read, never freed */
    klvae_status_t st = KLVAE_OK;
    if (m->cfg.use_post_quant_conv)
        st = conv_step(s, &m->post_quant_conv, kv_pointwise, false, &h, NULL);
    if (st == KLVAE_OK)
        st = conv_step(s, &d->conv_in, kv_same_3x3, false, &h, &d->mid.resnets[0].norm1);
    if (st == KLVAE_OK)
        st = mid_step(s, &d->mid, &h, &d->up[0].resnets[0].norm1);
    for (int i = 0; st == KLVAE_OK && i < m->cfg.num_blocks; i++) {
        const kv_norm *next =
            i + 1 < m->cfg.num_blocks ? &d->up[i + 1].resnets[0].norm1 : &d->norm_out;
        st = level_step(s, &d->up[i], true, &h, next);
    }
    conv_pass out = {.conv = &d->conv_out, .g = kv_same_3x3, .x = &h, .norm = &d->norm_out,
                     .act = KV_ACT_SILU, .last_x = true, .y = &img};
    if (st == KLVAE_OK)
        st = run_conv(s, &out);
    kv_store_free(s, &h);
    return st;
}

/* mean and logvar (the caller's (Z, h, w) arrays; logvar may be NULL) of
 * the moments, whole: they are at the latent resolution. Frees moments. */
static klvae_status_t posterior_step(kv_stream *s, kv_store *moments, float *mean,
                                     float *logvar)
{
    kv_backend *be = s->be;
    const int z = moments->c / 2, h = moments->h, w = moments->w;
    const bool in_place = be->host_memory;
    kv_tensor mt, mu, lv;
    memset(&mu, 0, sizeof mu);
    memset(&lv, 0, sizeof lv);
    klvae_status_t st = load_whole(s, moments, &mt);
    kv_store_free(s, moments);
    if (st == KLVAE_OK && in_place) {
        mu = kv_tensor_wrap(mean, 1, z, h, w);
        lv = kv_tensor_wrap(logvar, 1, z, h, w);
    } else if (st == KLVAE_OK) {
        st = take_tensor(s, z, h, w, false, &mu);
        if (st == KLVAE_OK && logvar)
            st = take_tensor(s, z, h, w, false, &lv);
    }
    if (st == KLVAE_OK && !s->dry)
        st = be->ops->posterior_split(be, &mt, &mu, logvar ? &lv : NULL);
    if (st == KLVAE_OK && !in_place && !s->dry)
        st = be->ops->download(be, mean, &mu);
    if (st == KLVAE_OK && !in_place && !s->dry && logvar)
        st = be->ops->download(be, logvar, &lv);
    if (!in_place) {
        give_tensor(s, &mu, false);
        give_tensor(s, &lv, false);
    }
    give_tensor(s, &mt, false);
    return st;
}

static klvae_status_t encode_sample(kv_stream *s, const float *image, int h, int w, float *mean,
                                    float *logvar)
{
    const klvae_model_t *m = s->m;
    const kv_encoder *e = &m->enc;
    kv_store x;
    kv_store_external(&x, (float *)image, m->cfg.in_channels, h, w);
    kv_store cur = x; /* the caller's image: read, never freed */
    klvae_status_t st =
        conv_step(s, &e->conv_in, kv_same_3x3, false, &cur, &e->down[0].resnets[0].norm1);
    for (int i = 0; st == KLVAE_OK && i < m->cfg.num_blocks; i++) {
        const kv_norm *next =
            i + 1 < m->cfg.num_blocks ? &e->down[i + 1].resnets[0].norm1 : &e->mid.resnets[0].norm1;
        st = level_step(s, &e->down[i], false, &cur, next);
    }
    if (st == KLVAE_OK)
        st = mid_step(s, &e->mid, &cur, &e->norm_out);
    kv_store moments;
    memset(&moments, 0, sizeof moments);
    if (st == KLVAE_OK)
        st = kv_store_init(s, &moments, 2 * m->cfg.latent_channels, cur.h, cur.w, 0);
    conv_pass out = {.conv = &e->conv_out, .g = kv_same_3x3, .x = &cur, .norm = &e->norm_out,
                     .act = KV_ACT_SILU, .last_x = true, .y = &moments};
    if (st == KLVAE_OK)
        st = run_conv(s, &out);
    if (st == KLVAE_OK && m->cfg.use_quant_conv)
        st = conv_step(s, &m->quant_conv, kv_pointwise, false, &moments, NULL);
    if (st == KLVAE_OK)
        st = posterior_step(s, &moments, mean, logvar);
    kv_store_free(s, &moments);
    if (!cur.external)
        kv_store_free(s, &cur);
    return st;
}

/* ---- entry points ---- */

static void stream_begin(kv_stream *s, klvae_model_t *m, const kv_forward_plan *plan, bool dry)
{
    memset(s, 0, sizeof *s);
    s->m = m;
    s->be = m->be;
    s->dry = dry;
    s->band_bytes = plan->band_bytes;
    s->spill_threshold = plan->spill_threshold;
    s->max_rows = m->infer.max_band_rows;
}

static klvae_status_t stream_end(kv_stream *s, klvae_status_t st, kv_stream_report *report)
{
    s->report.peak_bytes = kv_stream_peak(s);
    s->report.host_peak_bytes = s->host_peak;
    s->report.spilled_bytes = s->spill ? kv_spill_peak(s->spill) : 0;
    kv_spill_close(s->spill);
    s->spill = NULL;
    if (report)
        *report = s->report;
    return st;
}

klvae_status_t kv_stream_encode(klvae_model_t *m, const kv_forward_plan *plan,
                                const float *images, float *mean, float *logvar,
                                kv_stream_report *report)
{
    const int f = kv_config_factor(&m->cfg), c = m->cfg.in_channels, z = m->cfg.latent_channels;
    const size_t in = (size_t)c * plan->h * plan->w, out = (size_t)z * (plan->h / f) * (plan->w / f);
    kv_stream s;
    stream_begin(&s, m, plan, false);
    klvae_status_t st = KLVAE_OK;
    for (int n = 0; st == KLVAE_OK && n < plan->n; n++)
        st = encode_sample(&s, images + n * in, plan->h, plan->w, mean + n * out,
                           logvar ? logvar + n * out : NULL);
    return stream_end(&s, st, report);
}

klvae_status_t kv_stream_decode(klvae_model_t *m, const kv_forward_plan *plan, const float *z,
                                float *images, kv_stream_report *report)
{
    const int f = kv_config_factor(&m->cfg), c = m->cfg.out_channels;
    const int lat_h = plan->h / f, lat_w = plan->w / f;
    const size_t in = (size_t)m->cfg.latent_channels * lat_h * lat_w;
    const size_t out = (size_t)c * plan->h * plan->w;
    kv_stream s;
    stream_begin(&s, m, plan, false);
    klvae_status_t st = KLVAE_OK;
    for (int n = 0; st == KLVAE_OK && n < plan->n; n++)
        st = decode_sample(&s, z + n * in, lat_h, lat_w, images + n * out);
    return stream_end(&s, st, report);
}

klvae_status_t kv_stream_dry_run(const klvae_model_t *m, const kv_forward_plan *plan,
                                 kv_stream_dry *out)
{
    kv_stream s;
    stream_begin(&s, (klvae_model_t *)m, plan, true);
    s.sizes = out->sizes;
    s.max_sizes = KV_ARRAY_LEN(out->sizes);
    const int f = kv_config_factor(&m->cfg);
    klvae_status_t st = plan->encode
                            ? encode_sample(&s, NULL, plan->h, plan->w, NULL, NULL)
                            : decode_sample(&s, NULL, plan->h / f, plan->w / f, NULL);
    out->peak_bytes = kv_stream_peak(&s);
    out->host_peak_bytes = s.host_peak;
    out->thin = s.thin;
    out->nsizes = s.nsizes;
    return st;
}
