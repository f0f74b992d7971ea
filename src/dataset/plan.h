/* plan.h — which images of the file list a part encodes, into which
 * shard and row. The plan depends only on the settings and the files, never
 * on threads, timing or earlier runs: that makes a resumed run write the
 * shards an uninterrupted one would have, and the parts of one dataset
 * disjoint.
 *
 *   - Part I of N takes files [F I / N, F (I + 1) / N) of the F listed.
 *   - Without buckets its shards are runs of shard_size consecutive files.
 *   - With buckets every file's header is read first (its size decides its
 *     bucket): files whose header cannot be read are errors of the part;
 *     the others are grouped by bucket (buckets in their order, files in
 *     list order within one), and each bucket's run cut into shards of
 *     shard_size.
 *   - Shard k of part I is "shard-IIII-KKKKKK.safetensors".
 * A file whose image turns out unreadable only when it is decoded keeps its
 * place in the plan: its shard has a row fewer. */
#ifndef KV_DATASET_PLAN_H
#define KV_DATASET_PLAN_H

#include "dataset/settings.h"

typedef struct kv_ds_item {
    uint32_t file;         /* index in the file list */
    int32_t bucket;        /* index in settings.buckets */
    int32_t src_h, src_w;  /* from the header with buckets; else 0 (known when read) */
} kv_ds_item;

typedef struct kv_ds_shard {
    size_t first, count; /* plan items [first, first + count) */
    int bucket;
    char name[48];
    char plan_hash[17]; /* of the settings and the shard's files, recorded in it */
} kv_ds_shard;

typedef struct kv_ds_error {
    uint32_t file;
    char *reason;
} kv_ds_error;

typedef struct kv_ds_plan {
    size_t file_begin, file_end; /* the part's files */
    kv_ds_item *items;
    size_t nitems;
    kv_ds_shard *shards;
    size_t nshards;
    kv_ds_error *errors; /* files whose header could not be read, by file */
    size_t nerrors;
} kv_ds_plan;

/* Makes the plan of s's part. settings_hash is the hash of the settings
 * object (it enters each shard's plan_hash). threads read headers in
 * parallel. Errors: KLVAE_ERR_OUT_OF_MEMORY (an unreadable file is no
 * error here). */
klvae_status_t kv_ds_plan_make(const kv_ds_settings *s, const kv_image_files *files,
                               const char *settings_hash, kv_ds_plan *out);
void kv_ds_plan_free(kv_ds_plan *plan);

/* Runs fn(ctx, i) for i in [0, n) on threads threads (the caller being one
 * of them); each index once, handed out in order as threads come free. */
void kv_ds_parallel(size_t n, int threads, void (*fn)(void *ctx, size_t i), void *ctx);

#endif
