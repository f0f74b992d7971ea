/* finish.c — see finish.h. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "base/io.h"
#include "dataset/finish.h"
#include "formats/safetensors.h"

#define KV_DS_MAX_JSON ((size_t)1 << 30)

char *kv_ds_part_path(const char *out_dir, int part, int parts)
{
    char name[64];
    snprintf(name, sizeof name, "parts/part-%04d-of-%04d.json", part, parts);
    return kv_path_join(out_dir, name);
}

/* Writes json (compact, sorted keys, one trailing newline) to dir/name in one step. */
static klvae_status_t write_json(const char *dir, const char *name, const json_t *json,
                                 size_t indent)
{
    char *path = kv_path_join(dir, name);
    char *text = json_dumps(json, JSON_SORT_KEYS | (indent ? JSON_INDENT(indent) : JSON_COMPACT));
    klvae_status_t st = KLVAE_OK;
    if (!path || !text) {
        st = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory writing %s", name);
    } else {
        kv_atomic_file f;
        if ((st = kv_atomic_open(&f, path)) == KLVAE_OK &&
            (st = kv_atomic_write(&f, text, strlen(text))) == KLVAE_OK &&
            (st = kv_atomic_write(&f, "\n", 1)) == KLVAE_OK)
            st = kv_atomic_commit(&f);
    }
    free(text);
    free(path);
    return st;
}

/* Reads dir/name as JSON; KLVAE_ERR_IO when it does not exist. */
static klvae_status_t read_json(const char *path, json_t **out)
{
    *out = NULL;
    char *text = NULL;
    size_t len = 0;
    klvae_status_t st = kv_read_text_file(path, KV_DS_MAX_JSON, &text, &len);
    if (st != KLVAE_OK)
        return st;
    json_error_t err;
    *out = json_loadb(text, len, JSON_REJECT_DUPLICATES, &err);
    free(text);
    if (!*out)
        return kv_error(KLVAE_ERR_FORMAT, "%s: not valid JSON: %s (line %d)", path, err.text,
                        err.line);
    return KLVAE_OK;
}

/* The first key of a (or b) whose values differ, for the message. */
static const char *first_difference(const json_t *a, const json_t *b, char *buf, size_t size)
{
    const char *key;
    const json_t *value;
    json_object_foreach((json_t *)a, key, value) {
        const json_t *other = json_object_get(b, key);
        if (json_equal(value, other))
            continue;
        if (json_is_object(value) && json_is_object(other)) {
            char inner[200];
            snprintf(buf, size, "%s.%s", key, first_difference(value, other, inner, sizeof inner));
        } else {
            snprintf(buf, size, "%s", key);
        }
        return buf;
    }
    json_object_foreach((json_t *)b, key, value) {
        if (!json_object_get(a, key)) {
            snprintf(buf, size, "%s", key);
            return buf;
        }
    }
    return "?";
}

klvae_status_t kv_ds_folder_prepare(const char *out_dir, const json_t *settings)
{
    klvae_status_t st = kv_make_directory(out_dir);
    char *parts = st == KLVAE_OK ? kv_path_join(out_dir, "parts") : NULL;
    char *manifest = st == KLVAE_OK ? kv_path_join(out_dir, "manifest.json") : NULL;
    if (st == KLVAE_OK && (!parts || !manifest))
        st = KLVAE_ERR_OUT_OF_MEMORY;
    if (st == KLVAE_OK)
        st = kv_make_directory(parts);
    struct stat sb;
    if (st == KLVAE_OK && stat(manifest, &sb) == 0) {
        json_t *old = NULL;
        st = read_json(manifest, &old);
        const json_t *recorded = json_object_get(old, "settings");
        if (st == KLVAE_OK && !json_equal(recorded, settings)) {
            char key[256] = "settings";
            if (json_is_object(recorded))
                first_difference(recorded, settings, key, sizeof key);
            st = kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                          "%s holds a dataset made with other settings (they differ in '%s': "
                          "model, images or options); give another folder, or remove it",
                          out_dir, key);
        }
        json_decref(old);
    } else if (st == KLVAE_OK) {
        json_t *fresh = json_pack("{s:b, s:O}", "complete", 0, "settings", settings);
        st = fresh ? write_json(out_dir, "manifest.json", fresh, 2)
                   : kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory");
        json_decref(fresh);
    }
    free(parts);
    free(manifest);
    return st;
}

static json_t *header_errors_json(const kv_ds_plan *plan, const kv_image_files *files)
{
    json_t *a = json_array();
    for (size_t i = 0; a && i < plan->nerrors; i++)
        json_array_append_new(a, json_pack("{s:s, s:I, s:s}", "path",
                                           files->names[plan->errors[i].file], "file",
                                           (json_int_t)plan->errors[i].file, "reason",
                                           plan->errors[i].reason));
    return a;
}

klvae_status_t kv_ds_part_write(const char *out_dir, const kv_ds_settings *s,
                                const kv_ds_plan *plan, const kv_image_files *files,
                                const char *data)
{
    json_t *shards = json_array();
    for (size_t i = 0; shards && i < plan->nshards; i++)
        json_array_append_new(shards, json_string(plan->shards[i].name));
    json_t *record = json_pack("{s:i, s:i, s:[I, I], s:o, s:o, s:s, s:s}", "part", s->part,
                               "parts", s->parts, "files", (json_int_t)plan->file_begin,
                               (json_int_t)plan->file_end, "shards", shards, "header_errors",
                               header_errors_json(plan, files), "data", data, "model_name",
                               s->model_name);
    char name[64];
    snprintf(name, sizeof name, "parts/part-%04d-of-%04d.json", s->part, s->parts);
    klvae_status_t st = record ? write_json(out_dir, name, record, 0)
                               : kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory");
    json_decref(record);
    return st;
}

/* ---- the merge ---- */

typedef struct merge {
    const char *out_dir;
    json_t *settings;
    char settings_hash[17];
    int channels, parts;
    bool flip;
    json_t *shard_list; /* [{"file", "part", "rows", "bucket"}] */
    json_t *errors;     /* [{"path", "file", "reason"}], every part's */
    kv_atomic_file index;
    bool index_open;
    int64_t images, files;
    /* the stored values' statistics, per channel */
    double count, *mean, *m2, *pvar;
} merge;

static void merge_free(merge *m)
{
    json_decref(m->settings);
    json_decref(m->shard_list);
    json_decref(m->errors);
    if (m->index_open)
        kv_atomic_abort(&m->index);
    free(m->mean);
    free(m->m2);
    free(m->pvar);
}

/* Adds a shard's statistics (its "stats" metadata) to m. */
static klvae_status_t merge_stats(merge *m, const json_t *stats, const char *path)
{
    double n = json_number_value(json_object_get(stats, "values"));
    const json_t *mean = json_object_get(stats, "mean"), *m2 = json_object_get(stats, "m2");
    const json_t *pvar = json_object_get(stats, "posterior_variance");
    if (n <= 0)
        return KLVAE_OK; /* a shard of no image */
    if (json_array_size(mean) != (size_t)m->channels || json_array_size(m2) != (size_t)m->channels)
        return kv_error(KLVAE_ERR_FORMAT, "%s: its statistics are not of %d channels", path,
                        m->channels);
    double total = m->count + n;
    for (int c = 0; c < m->channels; c++) {
        double mu = json_number_value(json_array_get(mean, (size_t)c));
        double delta = mu - m->mean[c];
        m->mean[c] += delta * n / total;
        m->m2[c] += json_number_value(json_array_get(m2, (size_t)c)) +
                    delta * delta * m->count * n / total;
        m->pvar[c] += (json_number_value(json_array_get(pvar, (size_t)c)) - m->pvar[c]) * n / total;
    }
    m->count = total;
    return KLVAE_OK;
}

/* Appends a JSON text array's objects to list (errors), or (records) writes
 * each as an index line with the shard's own fields added. */
static klvae_status_t merge_records(merge *m, const char *text, const char *shard,
                                    const json_t *bucket, const char *path)
{
    json_error_t err;
    json_t *records = text ? json_loads(text, JSON_REJECT_DUPLICATES, &err) : NULL;
    if (!json_is_array(records)) {
        json_decref(records);
        return kv_error(KLVAE_ERR_FORMAT, "%s: its records are missing or not a JSON array", path);
    }
    klvae_status_t st = KLVAE_OK;
    size_t i;
    json_t *record;
    json_array_foreach(records, i, record) {
        json_object_set_new(record, "shard", json_string(shard));
        json_object_set(record, "bucket", (json_t *)bucket);
        json_object_set_new(record, "flip", json_boolean(m->flip));
        char *line = json_dumps(record, JSON_COMPACT | JSON_SORT_KEYS);
        if (!line) {
            st = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory writing index.jsonl");
            break;
        }
        st = kv_atomic_write(&m->index, line, strlen(line));
        if (st == KLVAE_OK)
            st = kv_atomic_write(&m->index, "\n", 1);
        free(line);
        if (st != KLVAE_OK) {
            m->index_open = false; /* kv_atomic_write aborted it */
            break;
        }
        m->images++;
    }
    json_decref(records);
    return st;
}

static klvae_status_t merge_errors(merge *m, const char *text, const char *path)
{
    json_error_t err;
    json_t *errors = text ? json_loads(text, JSON_REJECT_DUPLICATES, &err) : NULL;
    if (!json_is_array(errors)) {
        json_decref(errors);
        return kv_error(KLVAE_ERR_FORMAT, "%s: its error list is missing or not a JSON array",
                        path);
    }
    json_array_extend(m->errors, errors);
    json_decref(errors);
    return KLVAE_OK;
}

/* Reads one shard's header and merges what it records. */
static klvae_status_t merge_shard(merge *m, const char *name, int part)
{
    char *path = kv_path_join(m->out_dir, name);
    if (!path)
        return KLVAE_ERR_OUT_OF_MEMORY;
    kv_safetensors st;
    klvae_status_t status = kv_st_open(path, &st);
    if (status == KLVAE_ERR_IO)
        status = kv_error(KLVAE_ERR_IO, "%s is missing although its part is done: %s", name,
                          kv_error_message());
    if (status != KLVAE_OK) {
        free(path);
        return status;
    }
    const char *hash = kv_st_metadata(&st, "settings_hash");
    json_error_t err;
    json_t *bucket = json_loads(kv_st_metadata(&st, "bucket") ? kv_st_metadata(&st, "bucket")
                                                              : "null", 0, &err);
    json_t *stats = kv_st_metadata(&st, "stats") ? json_loads(kv_st_metadata(&st, "stats"), 0,
                                                              &err)
                                                 : NULL;
    if (!hash || strcmp(hash, m->settings_hash) != 0 || !json_is_array(bucket) || !stats)
        status = kv_error(KLVAE_ERR_FORMAT,
                          "%s was not made with the settings of manifest.json (or is damaged)",
                          path);
    int64_t before = m->images;
    if (status == KLVAE_OK)
        status = merge_records(m, kv_st_metadata(&st, "records"), name, bucket, path);
    if (status == KLVAE_OK)
        status = merge_errors(m, kv_st_metadata(&st, "errors"), path);
    if (status == KLVAE_OK)
        status = merge_stats(m, stats, path);
    if (status == KLVAE_OK)
        json_array_append_new(m->shard_list,
                              json_pack("{s:s, s:i, s:I, s:O}", "file", name, "part", part,
                                        "rows", (json_int_t)(m->images - before), "bucket",
                                        bucket));
    json_decref(bucket);
    json_decref(stats);
    kv_st_close(&st);
    free(path);
    return status;
}

/* Merges part i: its record's header errors and shards. *done is false
 * when the part has not finished. */
static klvae_status_t merge_part(merge *m, int i, bool *done, json_t **record)
{
    *record = NULL;
    char *path = kv_ds_part_path(m->out_dir, i, m->parts);
    if (!path)
        return KLVAE_ERR_OUT_OF_MEMORY;
    struct stat sb;
    *done = stat(path, &sb) == 0;
    klvae_status_t st = *done ? read_json(path, record) : KLVAE_OK;
    const json_t *shards = json_object_get(*record, "shards");
    const json_t *errors = json_object_get(*record, "header_errors");
    if (st == KLVAE_OK && *done && (!json_is_array(shards) || !json_is_array(errors)))
        st = kv_error(KLVAE_ERR_FORMAT, "%s: not a part record (no shards or header_errors)", path);
    if (st == KLVAE_OK && *done)
        json_array_extend(m->errors, (json_t *)errors);
    size_t k;
    const json_t *name;
    json_array_foreach(shards, k, name) {
        if (st != KLVAE_OK)
            break;
        st = json_is_string(name) ? merge_shard(m, json_string_value(name), i)
                                  : kv_error(KLVAE_ERR_FORMAT, "%s: a shard name is no string",
                                             path);
    }
    free(path);
    return st;
}

static int compare_errors(const void *x, const void *y)
{
    json_int_t a = json_integer_value(json_object_get(*(json_t *const *)x, "file"));
    json_int_t b = json_integer_value(json_object_get(*(json_t *const *)y, "file"));
    return a < b ? -1 : a > b;
}

/* errors.jsonl: every skipped file, in file-list order. */
static klvae_status_t write_errors(merge *m)
{
    size_t n = json_array_size(m->errors);
    json_t **items = malloc((n ? n : 1) * sizeof *items);
    char *path = kv_path_join(m->out_dir, "errors.jsonl");
    klvae_status_t st = items && path ? KLVAE_OK
                                      : kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory");
    for (size_t i = 0; items && i < n; i++)
        items[i] = json_array_get(m->errors, i);
    kv_atomic_file f;
    if (st == KLVAE_OK) {
        qsort(items, n, sizeof *items, compare_errors);
        st = kv_atomic_open(&f, path);
    }
    for (size_t i = 0; st == KLVAE_OK && i < n; i++) {
        char *line = json_dumps(items[i], JSON_COMPACT | JSON_SORT_KEYS);
        st = line ? kv_atomic_write(&f, line, strlen(line)) : KLVAE_ERR_OUT_OF_MEMORY;
        if (st == KLVAE_OK)
            st = kv_atomic_write(&f, "\n", 1);
        else if (!line)
            kv_atomic_abort(&f);
        free(line);
    }
    if (st == KLVAE_OK)
        st = kv_atomic_commit(&f);
    free(items);
    free(path);
    return st;
}

/* The statistics in the raw latent space, from the stored values'. */
static klvae_status_t compute_stats(const merge *m, kv_ds_stats *out)
{
    memset(out, 0, sizeof *out);
    const json_t *storage = json_object_get(m->settings, "storage");
    const json_t *config = json_object_get(json_object_get(m->settings, "model"), "config");
    const char *store = json_string_value(json_object_get(storage, "store"));
    bool posterior = !store || strcmp(store, "sample") != 0;
    bool scaled = json_is_true(json_object_get(storage, "scaled"));
    const char *scale_text = json_string_value(json_object_get(config, "scaling_factor"));
    const char *shift_text = json_string_value(json_object_get(config, "shift_factor"));
    double scale = scale_text ? strtod(scale_text, NULL) : 1.0;
    double shift = shift_text && strcmp(shift_text, "none") != 0 ? strtod(shift_text, NULL) : 0.0;
    out->channels = m->channels;
    out->mean = calloc((size_t)m->channels, sizeof(double));
    out->std = calloc((size_t)m->channels, sizeof(double));
    if (!out->mean || !out->std) {
        kv_ds_stats_free(out);
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory");
    }
    double mean_all = 0.0, var_all = 0.0;
    for (int c = 0; c < m->channels; c++) {
        double var = m->count > 0 ? m->m2[c] / m->count + (posterior ? m->pvar[c] : 0.0) : 0.0;
        out->mean[c] = scaled ? m->mean[c] / scale + shift : m->mean[c];
        out->std[c] = sqrt(scaled ? var / (scale * scale) : var);
        mean_all += out->mean[c] / m->channels;
    }
    for (int c = 0; c < m->channels; c++)
        var_all += (out->std[c] * out->std[c] + (out->mean[c] - mean_all) *
                                                    (out->mean[c] - mean_all)) / m->channels;
    out->mean_all = mean_all;
    out->std_all = sqrt(var_all);
    out->scaling_factor = out->std_all > 0 ? 1.0 / out->std_all : 0.0;
    out->shift_factor = mean_all;
    return KLVAE_OK;
}

void kv_ds_stats_free(kv_ds_stats *stats)
{
    free(stats->mean);
    free(stats->std);
    stats->mean = stats->std = NULL;
}

static json_t *double_array(const double *v, int n)
{
    json_t *a = json_array();
    for (int i = 0; a && i < n; i++)
        json_array_append_new(a, json_real(v[i]));
    return a;
}

static json_t *stats_json(const kv_ds_stats *s, const merge *m)
{
    return json_pack("{s:s, s:f, s:b, s:o, s:o, s:f, s:f, s:f, s:f}", "space",
                     "raw latents (scaling_factor and shift_factor not applied)",
                     "values_per_channel", m->count, "flipped_included", m->flip, "mean",
                     double_array(s->mean, s->channels), "std", double_array(s->std, s->channels),
                     "mean_all_channels", s->mean_all, "std_all_channels", s->std_all,
                     "scaling_factor", s->scaling_factor, "shift_factor", s->shift_factor);
}

/* The final manifest.json: settings, counts, shards, statistics. */
static klvae_status_t write_manifest(merge *m, const kv_ds_stats *stats, const json_t *first_part)
{
    int64_t skipped = (int64_t)json_array_size(m->errors);
    int64_t latents = m->images * (m->flip ? 2 : 1);
    json_t *counts = json_pack("{s:I, s:I, s:I, s:I, s:I}", "files", (json_int_t)m->files,
                               "images", (json_int_t)m->images, "skipped", (json_int_t)skipped,
                               "shards", (json_int_t)json_array_size(m->shard_list), "latents",
                               (json_int_t)latents);
    json_t *manifest = json_pack("{s:b, s:O, s:O, s:O, s:o, s:O, s:s, s:s, s:o}", "complete", 1,
                                 "settings", m->settings, "data",
                                 json_object_get(first_part, "data"), "model_name",
                                 json_object_get(first_part, "model_name"), "counts", counts,
                                 "shards", m->shard_list, "index", "index.jsonl", "errors",
                                 "errors.jsonl", "latent_stats", stats_json(stats, m));
    klvae_status_t st = manifest ? write_json(m->out_dir, "manifest.json", manifest, 2)
                                 : kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory");
    json_decref(manifest);
    return st;
}

/* Reads manifest.json into m: settings, their hash, channels, parts. */
static klvae_status_t merge_begin(merge *m, const char *out_dir)
{
    memset(m, 0, sizeof *m);
    m->out_dir = out_dir;
    char *path = kv_path_join(out_dir, "manifest.json");
    json_t *manifest = NULL;
    klvae_status_t st = path ? read_json(path, &manifest) : KLVAE_ERR_OUT_OF_MEMORY;
    if (st == KLVAE_ERR_IO)
        st = kv_error(KLVAE_ERR_IO, "%s is no latent dataset folder: %s", out_dir,
                      kv_error_message());
    m->settings = json_incref(json_object_get(manifest, "settings"));
    const json_t *model = json_object_get(m->settings, "model");
    m->channels = (int)json_integer_value(json_object_get(model, "latent_channels"));
    m->parts = (int)json_integer_value(json_object_get(m->settings, "parts"));
    m->files = json_integer_value(json_object_get(json_object_get(m->settings, "source"), "files"));
    m->flip = json_is_true(json_object_get(json_object_get(m->settings, "preprocessing"), "flip"));
    if (st == KLVAE_OK && (m->channels < 1 || m->channels > 1024 || m->parts < 1))
        st = kv_error(KLVAE_ERR_FORMAT, "%s: no settings of a latent dataset", path);
    char *text = st == KLVAE_OK ? json_dumps(m->settings, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
    if (text)
        kv_hash_hex(kv_hash_text(KV_HASH_START, text), m->settings_hash);
    m->shard_list = json_array();
    m->errors = json_array();
    m->mean = calloc((size_t)KV_MAX(m->channels, 1), sizeof(double));
    m->m2 = calloc((size_t)KV_MAX(m->channels, 1), sizeof(double));
    m->pvar = calloc((size_t)KV_MAX(m->channels, 1), sizeof(double));
    if (st == KLVAE_OK && (!text || !m->shard_list || !m->errors || !m->mean || !m->m2 || !m->pvar))
        st = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory");
    free(text);
    free(path);
    json_decref(manifest);
    return st;
}

klvae_status_t kv_ds_finish(const char *out_dir, bool require_complete, bool *complete,
                            kv_ds_stats *stats)
{
    *complete = false;
    if (stats)
        memset(stats, 0, sizeof *stats);
    merge m;
    klvae_status_t st = merge_begin(&m, out_dir);
    char *index = st == KLVAE_OK ? kv_path_join(out_dir, "index.jsonl") : NULL;
    if (st == KLVAE_OK)
        st = index ? kv_atomic_open(&m.index, index) : KLVAE_ERR_OUT_OF_MEMORY;
    m.index_open = st == KLVAE_OK;
    json_t *first = NULL;
    bool all_done = st == KLVAE_OK;
    for (int i = 0; st == KLVAE_OK && all_done && i < m.parts; i++) {
        json_t *record = NULL;
        st = merge_part(&m, i, &all_done, &record);
        if (!all_done && require_complete)
            st = kv_error(KLVAE_ERR_IO, "part %d of %d of %s is not finished (no "
                          "parts/part-%04d-of-%04d.json): run it first", i, m.parts, out_dir, i,
                          m.parts);
        if (i == 0)
            first = record;
        else
            json_decref(record);
    }
    kv_ds_stats local;
    if (st == KLVAE_OK && all_done && (st = compute_stats(&m, &local)) == KLVAE_OK) {
        local.images = m.images;
        local.skipped = (int64_t)json_array_size(m.errors);
        local.shards = (int64_t)json_array_size(m.shard_list);
        st = kv_atomic_commit(&m.index);
        m.index_open = false;
        if (st == KLVAE_OK)
            st = write_errors(&m);
        if (st == KLVAE_OK)
            st = write_manifest(&m, &local, first);
        if (st == KLVAE_OK && stats)
            *stats = local;
        else
            kv_ds_stats_free(&local);
        *complete = st == KLVAE_OK;
    }
    json_decref(first);
    free(index);
    merge_free(&m);
    return st;
}
