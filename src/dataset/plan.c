/* plan.c — see plan.h. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dataset/plan.h"
#include "formats/image.h"

/* ---- a parallel loop ---- */

typedef struct parallel_job {
    size_t n;
    atomic_size_t next;
    void (*fn)(void *ctx, size_t i);
    void *ctx;
} parallel_job;

static void *parallel_worker(void *arg)
{
    parallel_job *job = arg;
    for (size_t i; (i = atomic_fetch_add(&job->next, 1)) < job->n;)
        job->fn(job->ctx, i);
    return NULL;
}

void kv_ds_parallel(size_t n, int threads, void (*fn)(void *ctx, size_t i), void *ctx)
{
    parallel_job job = {n, 0, fn, ctx};
    atomic_init(&job.next, 0);
    int extra = threads > 1 ? threads - 1 : 0;
    pthread_t *ids = extra ? malloc((size_t)extra * sizeof *ids) : NULL;
    int started = 0;
    for (int t = 0; ids && t < extra; t++)
        if (pthread_create(&ids[t], NULL, parallel_worker, &job) == 0)
            started++;
    parallel_worker(&job); /* with no thread started, the caller does it all */
    for (int t = 0; t < started; t++)
        pthread_join(ids[t], NULL);
    free(ids);
}

/* ---- headers ---- */

typedef struct header_job {
    const kv_ds_settings *s;
    const kv_image_files *files;
    size_t first;
    kv_ds_item *items; /* one per file of the part */
    char **reasons;    /* NULL where the header was read */
} header_job;

static void read_header(void *ctx, size_t i)
{
    header_job *job = ctx;
    kv_ds_item *item = &job->items[i];
    int h, w;
    klvae_status_t st = kv_image_read_size(job->files->paths[job->first + i],
                                           job->s->max_pixels, &h, &w);
    if (st != KLVAE_OK) {
        /* NULL when out of memory: the caller reports that */
        job->reasons[i] = strdup(kv_error_message()[0] ? kv_error_message() : "unreadable");
        item->bucket = -1;
        return;
    }
    item->src_h = h;
    item->src_w = w;
    item->bucket = kv_bucket_nearest(job->s->buckets, job->s->nbuckets, h, w);
}

/* Reads the part's headers and keeps the readable files' items; the
 * others become errors. */
static klvae_status_t bucket_items(const kv_ds_settings *s, const kv_image_files *files,
                                   kv_ds_plan *plan, kv_ds_item *all, size_t n)
{
    char **reasons = calloc(n ? n : 1, sizeof *reasons);
    if (!reasons)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory planning the dataset");
    header_job job = {s, files, plan->file_begin, all, reasons};
    kv_ds_parallel(n, s->loader_threads, read_header, &job);
    size_t bad = 0;
    klvae_status_t st = KLVAE_OK;
    for (size_t i = 0; i < n; i++)
        if (all[i].bucket < 0) {
            bad++;
            if (!reasons[i])
                st = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory planning the dataset");
        }
    plan->errors = calloc(bad ? bad : 1, sizeof *plan->errors);
    if (!plan->errors && st == KLVAE_OK)
        st = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory planning the dataset");
    for (size_t i = 0; i < n; i++) {
        if (all[i].bucket >= 0) {
            plan->items[plan->nitems++] = all[i];
        } else if (st == KLVAE_OK) {
            plan->errors[plan->nerrors].file = all[i].file;
            plan->errors[plan->nerrors++].reason = reasons[i];
            reasons[i] = NULL;
        }
        free(reasons[i]);
    }
    free(reasons);
    return st;
}

/* ---- shards ---- */

static int compare_items(const void *x, const void *y)
{
    const kv_ds_item *a = x, *b = y;
    if (a->bucket != b->bucket)
        return a->bucket < b->bucket ? -1 : 1;
    return a->file < b->file ? -1 : a->file > b->file;
}

static void shard_hash(const kv_ds_settings *s, const kv_image_files *files,
                       const kv_ds_plan *plan, const char *settings_hash, kv_ds_shard *shard)
{
    const kv_bucket *b = &s->buckets[shard->bucket];
    char text[96];
    snprintf(text, sizeof text, "%s %s %dx%d", settings_hash, shard->name, b->h, b->w);
    uint64_t h = kv_hash_text(KV_HASH_START, text);
    for (size_t i = 0; i < shard->count; i++) {
        const kv_ds_item *item = &plan->items[shard->first + i];
        h = kv_hash_bytes(h, &item->file, sizeof item->file);
        h = kv_hash_text(h, files->names[item->file]);
    }
    kv_hash_hex(h, shard->plan_hash);
}

/* Cuts the items (sorted by bucket) into shards. */
static klvae_status_t cut_shards(const kv_ds_settings *s, const kv_image_files *files,
                                 const char *settings_hash, kv_ds_plan *plan)
{
    size_t max_shards = plan->nitems / (size_t)s->shard_size + (size_t)s->nbuckets + 1;
    plan->shards = calloc(max_shards, sizeof *plan->shards);
    if (!plan->shards)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory planning the dataset");
    for (size_t i = 0; i < plan->nitems;) {
        kv_ds_shard *shard = &plan->shards[plan->nshards];
        shard->first = i;
        shard->bucket = plan->items[i].bucket;
        while (i < plan->nitems && plan->items[i].bucket == shard->bucket &&
               shard->count < (size_t)s->shard_size) {
            shard->count++;
            i++;
        }
        snprintf(shard->name, sizeof shard->name, "shard-%04d-%06zu.safetensors", s->part,
                 plan->nshards);
        shard_hash(s, files, plan, settings_hash, shard);
        plan->nshards++;
    }
    return KLVAE_OK;
}

void kv_ds_plan_free(kv_ds_plan *plan)
{
    for (size_t i = 0; i < plan->nerrors; i++)
        free(plan->errors[i].reason);
    free(plan->errors);
    free(plan->items);
    free(plan->shards);
    memset(plan, 0, sizeof *plan);
}

klvae_status_t kv_ds_plan_make(const kv_ds_settings *s, const kv_image_files *files,
                               const char *settings_hash, kv_ds_plan *out)
{
    memset(out, 0, sizeof *out);
    const uint64_t count = files->count;
    out->file_begin = (size_t)(count * (uint64_t)s->part / (uint64_t)s->parts);
    out->file_end = (size_t)(count * (uint64_t)(s->part + 1) / (uint64_t)s->parts);
    size_t n = out->file_end - out->file_begin;
    kv_ds_item *all = calloc(n ? n : 1, sizeof *all);
    out->items = calloc(n ? n : 1, sizeof *out->items);
    klvae_status_t st = KLVAE_OK;
    if (!all || !out->items)
        st = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory planning %zu images", n);
    for (size_t i = 0; st == KLVAE_OK && i < n; i++)
        all[i].file = (uint32_t)(out->file_begin + i);
    if (st == KLVAE_OK && s->use_buckets) {
        st = bucket_items(s, files, out, all, n);
        if (st == KLVAE_OK)
            qsort(out->items, out->nitems, sizeof *out->items, compare_items);
    } else if (st == KLVAE_OK) {
        memcpy(out->items, all, n * sizeof *all);
        out->nitems = n;
    }
    free(all);
    if (st == KLVAE_OK)
        st = cut_shards(s, files, settings_hash, out);
    if (st != KLVAE_OK)
        kv_ds_plan_free(out);
    return st;
}
