/* encode.c — klvae_encode_dataset and klvae_latent_stats: the run of one
 * part, from the file list to its shards, and the merge of the parts.
 *
 *   settings (options + model)  ->  file list  ->  manifest.json checked or
 *   written  ->  plan  ->  shards already on disk kept  ->  the loader's
 *   threads prepare the missing shards' images in plan order while this
 *   thread encodes them a batch at a time (one bucket per shard, so one
 *   shape per batch) and writes each shard when it is full  ->  the part's
 *   record  ->  the merge, when every part is done. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "base/io.h"
#include "dataset/finish.h"
#include "dataset/loader.h"
#include "dataset/shard.h"
#include "formats/safetensors.h"

typedef struct run {
    klvae_model_t *model;
    const char *data, *out_dir;
    kv_ds_settings s;
    kv_image_files files;
    json_t *settings_json;
    char settings_hash[17];
    kv_ds_plan plan;
    bool *shard_done;    /* per plan shard: on disk at the start */
    size_t *jobs, njobs; /* items of the missing shards, in order */
    kv_ds_loader *loader;
    klvae_dataset_progress_fn progress;
    void *user;
    klvae_dataset_progress_t p;
    double start;
    int64_t encoded_now; /* images encoded by this call */
    bool stopped;        /* the progress function asked to stop */
    /* one batch */
    int batch;           /* images per batch, flipped copies not counted */
    float *images, *mean, *logvar, *latent;
    kv_geometry *geometry;
    uint32_t *files_of;
} run;

/* ---- progress ---- */

static void report(run *r, const char *skipped_path, const char *skipped_reason)
{
    klvae_dataset_progress_t *p = &r->p;
    p->seconds = kv_now_seconds() - r->start;
    p->images_per_second = p->seconds > 0 ? (double)r->encoded_now / p->seconds : 0.0;
    int64_t left = p->images_total - p->images_done - p->images_skipped;
    p->eta_seconds = p->images_per_second > 0 ? (double)left / p->images_per_second
                                              : (left == 0 ? 0.0 : -1.0);
    p->skipped_path = skipped_path;
    p->skipped_reason = skipped_reason;
    if (r->progress && !r->stopped && r->progress(r->user, p) != 0)
        r->stopped = true;
    p->skipped_path = p->skipped_reason = NULL;
}

/* ---- shards already there ---- */

/* Whether plan shard i is on disk, made by this plan; its counts when so. */
static klvae_status_t check_existing(run *r, size_t i, bool *done)
{
    const kv_ds_shard *shard = &r->plan.shards[i];
    char *path = kv_path_join(r->out_dir, shard->name);
    if (!path)
        return KLVAE_ERR_OUT_OF_MEMORY;
    struct stat sb;
    *done = stat(path, &sb) == 0;
    klvae_status_t st = KLVAE_OK;
    kv_safetensors file;
    if (*done && (st = kv_st_open(path, &file)) == KLVAE_OK) {
        const char *hash = kv_st_metadata(&file, "plan_hash");
        const char *rows = kv_st_metadata(&file, "rows");
        if (!hash || strcmp(hash, shard->plan_hash) != 0 || !rows)
            st = kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                          "%s holds other images than this run puts there (did the files "
                          "change since it was written?); remove it to encode it again",
                          path);
        else {
            int64_t n = strtoll(rows, NULL, 10);
            r->p.images_done += n;
            r->p.images_resumed += n;
            r->p.images_skipped += (int64_t)shard->count - n;
            r->p.shards_done++;
        }
        kv_st_close(&file);
    } else if (*done) {
        st = kv_error_prefix(st, "%s is damaged (remove it to encode it again)", shard->name);
    }
    free(path);
    return st;
}

/* ---- encoding ---- */

/* Encodes the n images of the batch (n plain ones, then with flip their n
 * mirror images) and appends them to rows. */
static klvae_status_t encode_batch(run *r, kv_ds_rows *rows, int n, const kv_bucket *b)
{
    const kv_ds_settings *s = &r->s;
    const int copies = s->flip ? 2 : 1;
    const size_t image = (size_t)3 * (size_t)b->h * (size_t)b->w;
    const int lh = b->h / s->factor, lw = b->w / s->factor;
    const size_t latent = (size_t)s->latent_channels * (size_t)lh * (size_t)lw;
    if (s->flip && n < r->batch) /* the mirror images sit at r->batch: move them down */
        memmove(r->images + (size_t)n * image, r->images + (size_t)r->batch * image,
                (size_t)n * image * sizeof *r->images);
    klvae_status_t st = klvae_encode(r->model, r->images, n * copies, b->h, b->w, r->mean,
                                     r->logvar);
    for (int i = 0; st == KLVAE_OK && s->store_sample && i < n * copies; i++)
        st = klvae_sample(r->model, r->mean + (size_t)i * latent, r->logvar + (size_t)i * latent,
                          1, lh, lw, kv_ds_sample_seed(s->seed, r->files_of[i % n], i / n),
                          r->latent + (size_t)i * latent);
    if (st != KLVAE_OK)
        return st;
    if (s->store_sample)
        kv_ds_rows_append(rows, n, r->latent, NULL, r->geometry, r->files_of);
    else
        kv_ds_rows_append(rows, n, r->mean, r->logvar, r->geometry, r->files_of);
    r->encoded_now += n;
    r->p.images_done += n;
    report(r, NULL, NULL);
    return KLVAE_OK;
}

/* Puts a prepared image in batch place k (its mirror image at
 * r->batch + k). */
static void place_image(run *r, const kv_ds_sample *sample, int k, const kv_bucket *b)
{
    const size_t image = (size_t)3 * (size_t)b->h * (size_t)b->w;
    memcpy(r->images + (size_t)k * image, sample->pixels, image * sizeof *r->images);
    if (r->s.flip)
        memcpy(r->images + (size_t)(r->batch + k) * image, sample->pixels + image,
               image * sizeof *r->images);
    r->geometry[k] = sample->geometry;
    r->files_of[k] = sample->file;
}

/* Encodes plan shard si, whose images the loader delivers next, and writes
 * it; nothing is written when the progress function stops the run. */
static klvae_status_t encode_shard(run *r, size_t si)
{
    const kv_ds_shard *shard = &r->plan.shards[si];
    const kv_bucket *b = &r->s.buckets[shard->bucket];
    kv_ds_rows *rows = NULL;
    klvae_status_t st = kv_ds_rows_create(&r->s, &r->plan, si, &rows);
    int k = 0;
    for (size_t i = 0; st == KLVAE_OK && !r->stopped && i < shard->count; i++) {
        const kv_ds_sample *sample = kv_ds_loader_next(r->loader);
        if (sample->status == KLVAE_OK) {
            place_image(r, sample, k++, b);
        } else {
            const char *why = sample->error ? sample->error : "out of memory reading it";
            st = kv_ds_rows_skip(rows, sample->file, why);
            r->p.images_skipped++;
            report(r, r->files.names[sample->file], why);
        }
        kv_ds_loader_release(r->loader);
        if (st == KLVAE_OK && k == r->batch) {
            st = encode_batch(r, rows, k, b);
            k = 0;
        }
    }
    if (st == KLVAE_OK && !r->stopped && k > 0)
        st = encode_batch(r, rows, k, b);
    if (st == KLVAE_OK && !r->stopped) {
        st = kv_ds_rows_write(rows, &r->files, r->out_dir, r->settings_hash);
        if (st == KLVAE_OK) {
            r->p.shards_done++;
            report(r, NULL, NULL);
        }
    }
    kv_ds_rows_free(rows);
    return st;
}

/* The batch buffers, for the largest bucket. */
static klvae_status_t alloc_batch(run *r)
{
    const kv_ds_settings *s = &r->s;
    size_t pixels = 1;
    for (int i = 0; i < s->nbuckets; i++)
        pixels = KV_MAX(pixels, (size_t)s->buckets[i].h * (size_t)s->buckets[i].w);
    const int copies = s->flip ? 2 : 1;
    r->batch = KV_MAX(1, s->encode_batch / copies);
    const size_t images = (size_t)r->batch * (size_t)copies;
    const size_t latent = (size_t)s->latent_channels * (pixels / (size_t)s->factor / (size_t)s->factor);
    r->images = malloc(images * 3 * pixels * sizeof *r->images);
    r->mean = malloc(images * latent * sizeof *r->mean);
    r->logvar = malloc(images * latent * sizeof *r->logvar);
    r->latent = s->store_sample ? malloc(images * latent * sizeof *r->latent) : NULL;
    r->geometry = malloc((size_t)r->batch * sizeof *r->geometry);
    r->files_of = malloc((size_t)r->batch * sizeof *r->files_of);
    if (!r->images || !r->mean || !r->logvar || (s->store_sample && !r->latent) ||
        !r->geometry || !r->files_of)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory for a batch of %zu images of "
                        "%zu pixels (option encode_batch)", images, pixels);
    return KLVAE_OK;
}

/* ---- the run ---- */

static void run_free(run *r)
{
    kv_ds_loader_free(r->loader);
    free(r->images);
    free(r->mean);
    free(r->logvar);
    free(r->latent);
    free(r->geometry);
    free(r->files_of);
    free(r->jobs);
    free(r->shard_done);
    kv_ds_plan_free(&r->plan);
    json_decref(r->settings_json);
    kv_image_files_free(&r->files);
    kv_ds_settings_free(&r->s);
}

/* Settings, file list, folder, plan. */
static klvae_status_t run_prepare(run *r, const klvae_options_t *opts)
{
    klvae_status_t st = kv_ds_settings_make(r->model, opts, &r->s);
    if (st != KLVAE_OK)
        return st;
    st = kv_is_directory(r->data) ? kv_image_files_walk(r->data, &r->files)
                                  : kv_image_files_read_list(r->data, &r->files);
    if (st == KLVAE_OK && r->files.count > UINT32_MAX)
        st = kv_error(KLVAE_ERR_INVALID_ARGUMENT, "%s holds %zu images; at most %u are supported",
                      r->data, r->files.count, (unsigned)UINT32_MAX);
    if (st != KLVAE_OK)
        return st;
    r->settings_json = kv_ds_settings_json(&r->s, &r->files);
    char *text = r->settings_json ? json_dumps(r->settings_json, JSON_COMPACT | JSON_SORT_KEYS)
                                  : NULL;
    if (!text)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory");
    kv_hash_hex(kv_hash_text(KV_HASH_START, text), r->settings_hash);
    free(text);
    st = kv_ds_folder_prepare(r->out_dir, r->settings_json);
    if (st == KLVAE_OK)
        st = kv_ds_plan_make(&r->s, &r->files, r->settings_hash, &r->plan);
    return st;
}

/* Which shards are there already; the jobs of the others. */
static klvae_status_t run_schedule(run *r)
{
    r->shard_done = calloc(r->plan.nshards + 1, sizeof *r->shard_done);
    r->jobs = malloc((r->plan.nitems + 1) * sizeof *r->jobs);
    if (!r->shard_done || !r->jobs)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory");
    r->p.part = r->s.part;
    r->p.parts = r->s.parts;
    r->p.images_total = (int64_t)(r->plan.file_end - r->plan.file_begin);
    r->p.images_skipped = (int64_t)r->plan.nerrors;
    r->p.shards_total = (int64_t)r->plan.nshards;
    for (size_t i = 0; i < r->plan.nerrors && !r->stopped; i++) /* headers that failed */
        report(r, r->files.names[r->plan.errors[i].file], r->plan.errors[i].reason);
    for (size_t i = 0; i < r->plan.nshards; i++) {
        klvae_status_t st = check_existing(r, i, &r->shard_done[i]);
        if (st != KLVAE_OK)
            return st;
        const kv_ds_shard *shard = &r->plan.shards[i];
        for (size_t k = 0; !r->shard_done[i] && k < shard->count; k++)
            r->jobs[r->njobs++] = shard->first + k;
    }
    return KLVAE_OK;
}

/* Encodes the missing shards, writes the part's record and merges. */
static klvae_status_t run_encode(run *r)
{
    klvae_status_t st = KLVAE_OK;
    if (r->njobs > 0) {
        st = alloc_batch(r);
        int capacity = KV_MAX(2 * r->batch, 2 * r->s.loader_threads);
        if (st == KLVAE_OK)
            st = kv_ds_loader_create(&r->s, &r->files, &r->plan, r->jobs, r->njobs,
                                     r->s.loader_threads, capacity, &r->loader);
    }
    for (size_t i = 0; st == KLVAE_OK && !r->stopped && i < r->plan.nshards; i++)
        if (!r->shard_done[i])
            st = encode_shard(r, i);
    kv_ds_loader_free(r->loader); /* the images prepared beyond a stop are dropped */
    r->loader = NULL;
    if (st != KLVAE_OK || r->stopped)
        return st;
    st = kv_ds_part_write(r->out_dir, &r->s, &r->plan, &r->files, r->data);
    bool complete = false;
    if (st == KLVAE_OK)
        st = kv_ds_finish(r->out_dir, false, &complete, NULL);
    r->p.finished = st == KLVAE_OK;
    r->p.dataset_complete = complete;
    return st;
}

KLVAE_API klvae_status_t klvae_encode_dataset(klvae_model_t *model, const char *data,
                                              const char *out_dir, const klvae_options_t *opts,
                                              klvae_dataset_progress_fn progress, void *user,
                                              klvae_dataset_progress_t *summary)
{
    kv_error_clear();
    if (!model || !data || !out_dir)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "klvae_encode_dataset: %s is NULL",
                        !model ? "model" : !data ? "data" : "out_dir");
    if (summary && summary->struct_size < 8)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "klvae_encode_dataset: summary->struct_size is %u; set it to "
                        "sizeof(klvae_dataset_progress_t)", (unsigned)summary->struct_size);
    run r;
    memset(&r, 0, sizeof r);
    r.model = model;
    r.data = data;
    r.out_dir = out_dir;
    r.progress = progress;
    r.user = user;
    r.start = kv_now_seconds();
    r.p.struct_size = sizeof r.p;
    klvae_status_t st = run_prepare(&r, opts);
    if (st == KLVAE_OK)
        st = run_schedule(&r);
    if (st == KLVAE_OK)
        st = run_encode(&r);
    if (st == KLVAE_OK && !r.stopped)
        report(&r, NULL, NULL); /* the last call: finished */
    if (st == KLVAE_OK && summary) {
        size_t size = KV_MIN((size_t)summary->struct_size, sizeof r.p);
        memcpy(summary, &r.p, size);
        summary->struct_size = (uint32_t)size;
    }
    run_free(&r);
    if (st == KLVAE_OK)
        kv_error_clear();
    return st;
}

KLVAE_API klvae_status_t klvae_latent_stats(const char *shards_dir, int capacity, int *channels,
                                            double *mean, double *std, double *scaling_factor,
                                            double *shift_factor)
{
    kv_error_clear();
    if (!shards_dir || capacity < 0)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "klvae_latent_stats: %s",
                        !shards_dir ? "shards_dir is NULL" : "capacity is negative");
    kv_ds_stats stats;
    bool complete;
    klvae_status_t st = kv_ds_finish(shards_dir, true, &complete, &stats);
    if (st != KLVAE_OK)
        return st;
    for (int c = 0; c < stats.channels && c < capacity; c++) {
        if (mean)
            mean[c] = stats.mean[c];
        if (std)
            std[c] = stats.std[c];
    }
    if (channels)
        *channels = stats.channels;
    if (scaling_factor)
        *scaling_factor = stats.scaling_factor;
    if (shift_factor)
        *shift_factor = stats.shift_factor;
    kv_ds_stats_free(&stats);
    return KLVAE_OK;
}
