/* stream_store.c — see stream_store.h. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "model/stream_store.h"

void kv_stream_take(kv_stream *s, uint64_t bytes)
{
    s->held += bytes;
    if (s->held > s->peak)
        s->peak = s->held;
}

void kv_stream_give(kv_stream *s, uint64_t bytes)
{
    s->held -= bytes;
}

void kv_stream_take_host(kv_stream *s, uint64_t bytes)
{
    if (s->be->host_memory) {
        kv_stream_take(s, bytes);
        return;
    }
    s->host_held += bytes;
    if (s->host_held > s->host_peak)
        s->host_peak = s->host_held;
}

void kv_stream_give_host(kv_stream *s, uint64_t bytes)
{
    if (s->be->host_memory)
        kv_stream_give(s, bytes);
    else
        s->host_held -= bytes;
}

void kv_stream_scratch(kv_stream *s, uint64_t shared, uint64_t per_thread)
{
    s->scratch_shared = KV_MAX(s->scratch_shared, shared);
    s->scratch_thread = KV_MAX(s->scratch_thread, per_thread);
}

uint64_t kv_stream_peak(const kv_stream *s)
{
    return s->peak + s->scratch_shared + (uint64_t)KV_MAX(1, s->m->threads) * s->scratch_thread;
}

/* A dry run lists the size of every store, once. */
static void note_size(kv_stream *s, uint64_t bytes)
{
    for (int i = 0; i < s->nsizes; i++)
        if (s->sizes[i] == bytes)
            return;
    if (s->nsizes < s->max_sizes)
        s->sizes[s->nsizes++] = bytes;
}

size_t kv_store_bytes(const kv_store *st)
{
    return (size_t)st->c * st->h * st->w * sizeof(float);
}

static size_t band_bytes(const kv_store *st, const kv_band *b)
{
    return (size_t)st->c * (size_t)(b->r1 - b->r0) * st->w * sizeof(float);
}

const char *kv_spill_folder(const klvae_model_t *m)
{
    if (m->infer.spill_dir)
        return m->infer.spill_dir;
    const char *tmp = getenv("TMPDIR");
    return tmp && *tmp ? tmp : "/var/tmp";
}

klvae_status_t kv_store_init(kv_stream *s, kv_store *st, int c, int h, int w, int groups)
{
    memset(st, 0, sizeof *st);
    st->c = c;
    st->h = h;
    st->w = w;
    st->spilled = kv_store_bytes(st) >= s->spill_threshold;
    if (s->sizes)
        note_size(s, kv_store_bytes(st));
    if (st->spilled && !s->dry && !s->spill) {
        klvae_status_t status = kv_spill_open(kv_spill_folder(s->m), &s->spill);
        if (status != KLVAE_OK)
            return status;
    }
    if (groups > 0) {
        st->groups = groups;
        st->count = calloc((size_t)groups * 3, sizeof(double));
        if (!st->count)
            return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory for group statistics");
        st->mean = st->count + groups;
        st->m2 = st->mean + groups;
    }
    return KLVAE_OK;
}

void kv_store_external(kv_store *st, float *data, int c, int h, int w)
{
    memset(st, 0, sizeof *st);
    st->c = c;
    st->h = h;
    st->w = w;
    st->external = true;
    st->outside = (kv_band){0, h, data, 0, true};
    st->bands = &st->outside;
    st->nbands = 1;
}

/* Gives the memory of band i back. */
static void drop_band(kv_stream *s, kv_store *st, int i)
{
    kv_band *b = &st->bands[i];
    if (!b->live || st->external)
        return;
    if (st->spilled) {
        if (!s->dry)
            kv_spill_free(s->spill, b->offset, band_bytes(st, b));
    } else {
        kv_host_block_free(b->data, band_bytes(st, b));
        kv_stream_give_host(s, band_bytes(st, b));
    }
    b->data = NULL;
    b->live = false;
}

void kv_store_free(kv_stream *s, kv_store *st)
{
    for (int i = 0; i < st->nbands; i++)
        drop_band(s, st, i);
    if (!st->external)
        free(st->bands);
    free(st->count);
    free(st->affine);
    memset(st, 0, sizeof *st);
}

void kv_store_free_below(kv_stream *s, kv_store *st, int row)
{
    while (st->first_live < st->nbands && st->bands[st->first_live].r1 <= row)
        drop_band(s, st, st->first_live++);
}

klvae_status_t kv_store_begin_band(kv_stream *s, kv_store *st, int r0, int r1, float **data)
{
    *data = NULL;
    if (st->nbands == st->capbands) {
        int cap = st->capbands ? 2 * st->capbands : 16;
        kv_band *grown = realloc(st->bands, (size_t)cap * sizeof *grown);
        if (!grown)
            return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory for a band list");
        st->bands = grown;
        st->capbands = cap;
    }
    kv_band *b = &st->bands[st->nbands];
    *b = (kv_band){r0, r1, NULL, 0, false};
    const size_t bytes = band_bytes(st, b);
    klvae_status_t status = KLVAE_OK;
    if (!s->dry && st->spilled) {
        status = kv_spill_alloc(s->spill, bytes, &b->offset);
        if (status == KLVAE_OK && (status = kv_spill_map(s->spill, b->offset, bytes,
                                                         (void **)&b->data)) != KLVAE_OK)
            kv_spill_free(s->spill, b->offset, bytes);
    } else if (!s->dry) {
        b->data = kv_host_block_alloc(bytes);
        if (!b->data)
            status = KLVAE_ERR_OUT_OF_MEMORY;
    }
    if (status != KLVAE_OK)
        return status;
    kv_stream_take_host(s, bytes); /* a spilled band: its window, until end_band */
    b->live = true;
    st->nbands++;
    *data = b->data;
    return KLVAE_OK;
}

void kv_store_end_band(kv_stream *s, kv_store *st, float *data)
{
    if (!st->spilled)
        return;
    kv_band *b = &st->bands[st->nbands - 1];
    kv_spill_unmap(data, band_bytes(st, b));
    b->data = NULL;
    kv_stream_give_host(s, band_bytes(st, b));
}

/* Copies the rows [r0, r1) that band b holds of the region [a, b) that
 * dst (C, rows, W) holds, from band memory src. */
static void copy_rows(const kv_store *st, const kv_band *b, const float *src, int r0, int r1,
                      int a, int rows, float *dst)
{
    const size_t w = (size_t)st->w, band_rows = (size_t)(b->r1 - b->r0);
    for (int c = 0; c < st->c; c++)
        memcpy(dst + ((size_t)c * rows + (size_t)(r0 - a)) * w,
               src + ((size_t)c * band_rows + (size_t)(r0 - b->r0)) * w,
               (size_t)(r1 - r0) * w * sizeof(float));
}

klvae_status_t kv_store_read(kv_stream *s, const kv_store *st, int r0, int r1, float *dst)
{
    for (int i = st->first_live; i < st->nbands && st->bands[i].r0 < r1; i++) {
        const kv_band *b = &st->bands[i];
        if (b->r1 <= r0)
            continue;
        if (!b->live)
            return kv_error(KLVAE_ERR_INTERNAL, "streamed forward: rows %d to %d were freed "
                                                "before they were read", b->r0, b->r1);
        const int lo = KV_MAX(r0, b->r0), hi = KV_MIN(r1, b->r1);
        if (!st->spilled) {
            if (!s->dry)
                copy_rows(st, b, b->data, lo, hi, r0, r1 - r0, dst);
            continue;
        }
        const size_t bytes = band_bytes(st, b);
        kv_stream_take_host(s, bytes); /* the mapped window */
        if (!s->dry) {
            void *window;
            klvae_status_t status = kv_spill_map(s->spill, b->offset, bytes, &window);
            if (status != KLVAE_OK) {
                kv_stream_give_host(s, bytes);
                return status;
            }
            copy_rows(st, b, window, lo, hi, r0, r1 - r0, dst);
            kv_spill_unmap(window, bytes);
        }
        kv_stream_give_host(s, bytes);
    }
    return KLVAE_OK;
}

void kv_store_write_rows(kv_store *st, int r0, int r1, const float *src)
{
    const size_t w = (size_t)st->w, rows = (size_t)(r1 - r0);
    float *dst = st->bands[0].data;
    for (int c = 0; c < st->c; c++)
        memcpy(dst + ((size_t)c * st->h + (size_t)r0) * w, src + (size_t)c * rows * w,
               rows * w * sizeof(float));
}

float *kv_store_exact_band(const kv_store *st, int r0, int r1)
{
    if (st->spilled)
        return NULL;
    for (int i = st->first_live; i < st->nbands; i++)
        if (st->bands[i].r0 == r0 && st->bands[i].r1 == r1 && st->bands[i].live)
            return st->bands[i].data;
    return NULL;
}

void kv_store_add_moments(kv_store *st, const float *mean, const float *rstd, double n,
                          float eps)
{
    for (int g = 0; g < st->groups; g++) {
        /* the band's variance back from rstd = 1 / sqrt(var + eps) */
        double r = rstd[g], var = 1.0 / (r * r) - (double)eps;
        if (var < 0.0)
            var = 0.0;
        double total = st->count[g] + n, delta = (double)mean[g] - st->mean[g];
        st->mean[g] += delta * n / total;
        st->m2[g] += var * n + delta * delta * st->count[g] * n / total;
        st->count[g] = total;
    }
}

void kv_store_norm_affine(const kv_store *st, const float *gamma, const float *beta, float eps,
                          float *scale, float *shift)
{
    const int per_group = st->c / st->groups;
    for (int c = 0; c < st->c; c++) {
        const int g = c / per_group;
        const double mean = st->mean[g], rstd = 1.0 / sqrt(st->m2[g] / st->count[g] + (double)eps);
        /* the same roundings as group_norm_stats (src/backend/backend.h) */
        scale[c] = (float)(rstd * (double)gamma[c]);
        shift[c] = (float)((double)beta[c] - (double)scale[c] * mean);
    }
}
