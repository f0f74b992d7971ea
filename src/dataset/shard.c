/* shard.c — see shard.h. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/numerics.h"
#include "base/options.h"
#include "base/philox.h"
#include "dataset/shard.h"
#include "formats/safetensors.h"

#define KV_MAX_LATENT_TENSORS 4

typedef struct skipped {
    uint32_t file;
    char *reason;
} skipped;

struct kv_ds_rows {
    const kv_ds_settings *s;
    const kv_ds_shard *shard;
    int channels, lh, lw;
    size_t values;  /* per image and tensor: channels * lh * lw */
    size_t rows, cap;
    int ntensors;   /* latent tensors: 1 or 2, times 2 with flip */
    unsigned char *data[KV_MAX_LATENT_TENSORS];
    int32_t *original_size, *crop_top_left;
    uint32_t *files;
    kv_geometry *geometry;
    skipped *errors;
    size_t nerrors;
    float log_scale2; /* 2 ln scaling_factor, added to logvar with scale_latents */
    float *scratch;   /* one image's stored mean and logvar */
    /* statistics of the stored values, per channel */
    double count;     /* values per channel so far */
    double *mean, *m2, *var_sum;
};

uint16_t kv_half_from_float(float f)
{
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    const uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
    const uint32_t a = x & 0x7FFFFFFFu;
    if (a > 0x7F800000u) /* NaN: keep it quiet, keep the top payload bits */
        return (uint16_t)(sign | 0x7E00u | ((a >> 13) & 0x3FFu));
    if (a >= 0x477FF000u) /* 65520 and above round to infinity */
        return (uint16_t)(sign | 0x7C00u);
    if (a < 0x38800000u) { /* below 2^-14: a subnormal half (or zero) */
        float v;
        memcpy(&v, &a, sizeof v);
        return (uint16_t)(sign | (uint16_t)nearbyintf(v * 16777216.0f)); /* exact, then even */
    }
    uint32_t h = ((a >> 23) - 112u) << 10 | ((a >> 13) & 0x3FFu);
    uint32_t rest = a & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u)))
        h++; /* a carry moves into the exponent, as it should */
    return (uint16_t)(sign | h);
}

/* Stores v in the dtype at element i of buf, and returns the stored value. */
static float store(kv_ds_dtype dtype, unsigned char *buf, size_t i, float v)
{
    if (dtype == KV_DS_F32) {
        memcpy(buf + 4 * i, &v, 4);
        return v;
    }
    uint16_t bits = dtype == KV_DS_BF16 ? kv_bf16_from_float(v) : kv_half_from_float(v);
    memcpy(buf + 2 * i, &bits, 2);
    return dtype == KV_DS_BF16 ? kv_bf16_to_float(bits) : kv_half_to_float(bits);
}

void kv_ds_rows_free(kv_ds_rows *r)
{
    if (!r)
        return;
    for (int t = 0; t < KV_MAX_LATENT_TENSORS; t++)
        free(r->data[t]);
    free(r->original_size);
    free(r->crop_top_left);
    free(r->files);
    free(r->geometry);
    for (size_t i = 0; i < r->nerrors; i++)
        free(r->errors[i].reason);
    free(r->errors);
    free(r->mean);
    free(r->m2);
    free(r->var_sum);
    free(r->scratch);
    free(r);
}

klvae_status_t kv_ds_rows_create(const kv_ds_settings *s, const kv_ds_plan *plan,
                                 size_t shard_index, kv_ds_rows **out)
{
    *out = NULL;
    kv_ds_rows *r = calloc(1, sizeof *r);
    if (!r)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory for a shard");
    const kv_ds_shard *shard = &plan->shards[shard_index];
    const kv_bucket *b = &s->buckets[shard->bucket];
    r->s = s;
    r->shard = shard;
    r->channels = s->latent_channels;
    r->lh = b->h / s->factor;
    r->lw = b->w / s->factor;
    r->values = (size_t)r->channels * (size_t)r->lh * (size_t)r->lw;
    r->cap = shard->count;
    r->ntensors = (s->store_sample ? 1 : 2) * (s->flip ? 2 : 1);
    r->log_scale2 = (float)(2.0 * kv_det_log((double)s->scaling_factor));
    bool ok = true;
    size_t bytes = r->cap * r->values * (size_t)kv_ds_dtype_size(s->dtype);
    for (int t = 0; t < r->ntensors; t++)
        ok &= (r->data[t] = malloc(bytes ? bytes : 1)) != NULL;
    r->original_size = malloc((r->cap * 2 + 1) * sizeof(int32_t));
    r->crop_top_left = malloc((r->cap * 2 + 1) * sizeof(int32_t));
    r->files = malloc((r->cap + 1) * sizeof *r->files);
    r->geometry = malloc((r->cap + 1) * sizeof *r->geometry);
    r->errors = calloc(r->cap + 1, sizeof *r->errors);
    r->mean = calloc((size_t)r->channels, sizeof(double));
    r->m2 = calloc((size_t)r->channels, sizeof(double));
    r->var_sum = calloc((size_t)r->channels, sizeof(double));
    r->scratch = malloc(2 * r->values * sizeof *r->scratch);
    if (!ok || !r->scratch || !r->original_size || !r->crop_top_left || !r->files || !r->geometry ||
        !r->errors || !r->mean || !r->m2 || !r->var_sum) {
        kv_ds_rows_free(r);
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY,
                        "out of memory for a shard of %zu rows of %zu values (option "
                        "shard_size)", shard->count, r->values);
    }
    *out = r;
    return KLVAE_OK;
}

size_t kv_ds_rows_count(const kv_ds_rows *r)
{
    return r->rows;
}

klvae_status_t kv_ds_rows_skip(kv_ds_rows *r, uint32_t file, const char *reason)
{
    char *copy = kv_strdup(reason);
    if (!copy)
        return KLVAE_ERR_OUT_OF_MEMORY;
    r->errors[r->nerrors].file = file;
    r->errors[r->nerrors++].reason = copy;
    return KLVAE_OK;
}

/* Merges the values of one stored image's channel into the statistics
 * (Chan et al.'s pairwise update: one image's mean and M2 first). */
static void add_channel_stats(kv_ds_rows *r, int c, const float *v, size_t n)
{
    double sum = 0.0;
    for (size_t i = 0; i < n; i++)
        sum += v[i];
    double m = sum / (double)n, m2 = 0.0;
    for (size_t i = 0; i < n; i++)
        m2 += ((double)v[i] - m) * ((double)v[i] - m);
    double total = r->count + (double)n, delta = m - r->mean[c];
    r->mean[c] += delta * (double)n / total;
    r->m2[c] += m2 + delta * delta * r->count * (double)n / total;
}

/* Stores one image's tensor (values floats of src) at row of tensor t,
 * scaled as the settings say; kind 0 = mean or latent, 1 = logvar.
 * stored receives the values as stored (for the statistics). */
static void store_image(kv_ds_rows *r, int t, size_t row, const float *src, int kind,
                        float *stored)
{
    const kv_ds_settings *s = r->s;
    const size_t base = row * r->values;
    for (size_t i = 0; i < r->values; i++) {
        float v = src[i];
        if (s->scale)
            v = kind == 0 ? (v - s->shift_factor) * s->scaling_factor : v + r->log_scale2;
        stored[i] = store(s->dtype, r->data[t], base + i, v);
    }
}

/* One image (plain, or its flipped twin: copy 1) into row, with stats. */
static void append_image(kv_ds_rows *r, size_t row, int copy, const float *mean,
                         const float *logvar, float *scratch)
{
    const size_t plane = (size_t)r->lh * (size_t)r->lw;
    const int per_copy = r->s->store_sample ? 1 : 2;
    const int t0 = copy * per_copy;
    store_image(r, t0, row, mean, 0, scratch);
    if (!r->s->store_sample)
        store_image(r, t0 + 1, row, logvar, 1, scratch + r->values);
    for (int c = 0; c < r->channels; c++) {
        add_channel_stats(r, c, scratch + (size_t)c * plane, plane);
        if (!r->s->store_sample)
            for (size_t i = 0; i < plane; i++)
                r->var_sum[c] += kv_det_exp((double)scratch[r->values + (size_t)c * plane + i]);
    }
    r->count += (double)plane;
}

void kv_ds_rows_append(kv_ds_rows *r, int n, const float *mean, const float *logvar,
                       const kv_geometry *geometry, const uint32_t *files)
{
    for (int i = 0; i < n; i++) {
        const size_t row = r->rows++;
        for (int copy = 0; copy < (r->s->flip ? 2 : 1); copy++) {
            size_t image = (size_t)i + (size_t)copy * (size_t)n;
            append_image(r, row, copy, mean + image * r->values,
                         logvar ? logvar + image * r->values : NULL, r->scratch);
        }
        const kv_geometry *g = &geometry[i];
        r->original_size[2 * row] = g->src_h;
        r->original_size[2 * row + 1] = g->src_w;
        r->crop_top_left[2 * row] = g->top;
        r->crop_top_left[2 * row + 1] = g->left;
        r->files[row] = files[i];
        r->geometry[row] = *g;
    }
}

/* ---- the file ---- */

static json_t *row_record(const kv_ds_rows *r, const kv_image_files *files, size_t row)
{
    const kv_geometry *g = &r->geometry[row];
    uint32_t file = r->files[row];
    return json_pack("{s:s, s:I, s:I, s:[i, i], s:[i, i], s:[i, i, i, i]}", "path",
                     files->names[file], "file", (json_int_t)file, "row", (json_int_t)row,
                     "original_size", g->src_h, g->src_w, "resized_size", g->resized_h,
                     g->resized_w, "crop", g->top, g->left, g->h, g->w);
}

static json_t *doubles(const double *v, int n, double divide)
{
    json_t *a = json_array();
    for (int i = 0; a && i < n; i++)
        json_array_append_new(a, json_real(divide > 0 ? v[i] / divide : 0.0));
    return a;
}

/* The JSON texts of the metadata: records, errors, stats (NULL: no memory). */
static char *records_text(const kv_ds_rows *r, const kv_image_files *files)
{
    json_t *a = json_array();
    for (size_t i = 0; a && i < r->rows; i++)
        json_array_append_new(a, row_record(r, files, i));
    char *text = a ? json_dumps(a, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
    json_decref(a);
    return text;
}

static char *errors_text(const kv_ds_rows *r, const kv_image_files *files)
{
    json_t *a = json_array();
    for (size_t i = 0; a && i < r->nerrors; i++)
        json_array_append_new(a, json_pack("{s:s, s:I, s:s}", "path",
                                           files->names[r->errors[i].file], "file",
                                           (json_int_t)r->errors[i].file, "reason",
                                           r->errors[i].reason));
    char *text = a ? json_dumps(a, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
    json_decref(a);
    return text;
}

static char *stats_text(const kv_ds_rows *r)
{
    json_t *o = json_pack("{s:f, s:o, s:o}", "values", r->count, "mean",
                          doubles(r->mean, r->channels, 1.0), "m2",
                          doubles(r->m2, r->channels, 1.0));
    if (o && !r->s->store_sample)
        json_object_set_new(o, "posterior_variance", doubles(r->var_sum, r->channels, r->count));
    char *text = o ? json_dumps(o, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
    json_decref(o);
    return text;
}

/* The tensors of the file, in a fixed order. */
static size_t shard_tensors(const kv_ds_rows *r, kv_st_raw *t)
{
    static const char *const posterior[] = {"mean", "logvar", "mean_flip", "logvar_flip"};
    static const char *const sample[] = {"latent", "latent_flip"};
    if (r->rows == 0)
        return 0;
    size_t n = 0;
    for (int i = 0; i < r->ntensors; i++, n++) {
        t[n].name = r->s->store_sample ? sample[i] : posterior[i];
        t[n].dtype = kv_ds_dtype_name(r->s->dtype);
        t[n].ndim = 4;
        t[n].shape[0] = (int64_t)r->rows;
        t[n].shape[1] = r->channels;
        t[n].shape[2] = r->lh;
        t[n].shape[3] = r->lw;
        t[n].data = r->data[i];
    }
    const char *names[2] = {"original_size", "crop_top_left"};
    const int32_t *data[2] = {r->original_size, r->crop_top_left};
    for (int i = 0; i < 2; i++, n++) {
        t[n].name = names[i];
        t[n].dtype = "I32";
        t[n].ndim = 2;
        t[n].shape[0] = (int64_t)r->rows;
        t[n].shape[1] = 2;
        t[n].data = data[i];
    }
    return n;
}

klvae_status_t kv_ds_rows_write(const kv_ds_rows *r, const kv_image_files *files,
                                const char *folder, const char *settings_hash)
{
    const kv_ds_settings *s = r->s;
    const kv_bucket *b = &s->buckets[r->shard->bucket];
    char part[32], bucket[32], rows[32], scale[40], shift[40];
    snprintf(part, sizeof part, "%d/%d", s->part, s->parts);
    snprintf(bucket, sizeof bucket, "[%d,%d]", b->h, b->w);
    snprintf(rows, sizeof rows, "%zu", r->rows);
    kv_format_double((double)s->scaling_factor, scale, sizeof scale);
    if (s->has_shift)
        kv_format_double((double)s->shift_factor, shift, sizeof shift);
    else
        snprintf(shift, sizeof shift, "none");
    char *records = records_text(r, files), *errors = errors_text(r, files);
    char *stats = stats_text(r), *path = kv_path_join(folder, r->shard->name);
    klvae_status_t st = KLVAE_OK;
    if (!records || !errors || !stats || !path) {
        st = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory writing %s", r->shard->name);
    } else {
        const kv_st_meta meta[] = {
            {"format", "klvae-latents"}, {"version", "1"}, {"producer", "klvae " KLVAE_VERSION_STRING},
            {"shard", (char *)r->shard->name}, {"part", part}, {"bucket", bucket}, {"rows", rows},
            {"settings_hash", (char *)settings_hash}, {"plan_hash", (char *)r->shard->plan_hash},
            {"store", s->store_sample ? "sample" : "posterior"},
            {"dtype", (char *)kv_ds_dtype_name(s->dtype)}, {"scaled", s->scale ? "true" : "false"},
            {"scaling_factor", scale}, {"shift_factor", shift},
            {"records", records}, {"errors", errors}, {"stats", stats}};
        kv_st_raw tensors[KV_MAX_LATENT_TENSORS + 2];
        size_t n = shard_tensors(r, tensors);
        st = kv_st_write_raw(path, tensors, n, meta, KV_ARRAY_LEN(meta));
    }
    free(records);
    free(errors);
    free(stats);
    free(path);
    return st;
}
