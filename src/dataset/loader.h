/* loader.h — a pool of threads that read, resize and crop the images of a
 * plan ahead of the encoder, handing them over in plan order.
 *
 * Jobs are plan items, given as a list of item indices in the order the
 * encoder wants them. Worker threads take jobs in that order and prepare
 * each into a slot of a ring; job j may start only once job j - capacity
 * has been released, so at most capacity images wait in memory. The
 * consumer takes them strictly in order (next, then release). */
#ifndef KV_DATASET_LOADER_H
#define KV_DATASET_LOADER_H

#include "dataset/plan.h"

typedef struct kv_ds_sample {
    uint32_t file;         /* the item's file */
    klvae_status_t status; /* not OK: the image could not be read; error says why */
    char *error;
    kv_geometry geometry;
    float *pixels; /* (3, h, w), followed by its mirror image with flip */
} kv_ds_sample;

typedef struct kv_ds_loader kv_ds_loader;

/* Starts threads workers (at least 1) over jobs[0 .. njobs) (item indices
 * of plan). s, files, plan and jobs must outlive the loader.
 * Errors: KLVAE_ERR_OUT_OF_MEMORY (threads that cannot be started count:
 * the loader runs with those that could, at least one). */
klvae_status_t kv_ds_loader_create(const kv_ds_settings *s, const kv_image_files *files,
                                   const kv_ds_plan *plan, const size_t *jobs, size_t njobs,
                                   int threads, int capacity, kv_ds_loader **out);

/* The next job's sample, waiting until it is ready; it stays valid until
 * kv_ds_loader_release. NULL when every job has been taken. */
const kv_ds_sample *kv_ds_loader_next(kv_ds_loader *L);
void kv_ds_loader_release(kv_ds_loader *L);

/* Stops the threads (a job in progress is finished first) and frees
 * everything. NULL is a no-op. */
void kv_ds_loader_free(kv_ds_loader *L);

#endif
