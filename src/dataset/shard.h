/* shard.h — one shard of a latent dataset: its rows gathered in memory in
 * the stored dtype, its records and errors, the statistics of its values,
 * and the file that holds them all (docs/latents.md describes it).
 *
 * Tensors, each with one row per stored image:
 *   store=posterior: mean, logvar (n, C, h, w); with flip also mean_flip,
 *                    logvar_flip
 *   store=sample:    latent (n, C, h, w); with flip also latent_flip
 *   always:          original_size (n, 2) I32 (height, width of the file),
 *                    crop_top_left (n, 2) I32 (in the resized image)
 * Metadata: format, version, shard, part, bucket, rows, settings_hash,
 * plan_hash, store, dtype, scaled, scaling_factor, shift_factor, and JSON
 * texts: records (one object per row), errors (files of this shard that
 * could not be read) and stats (per channel: values, mean, m2 and, for the
 * posterior, the mean of exp(logvar)). A shard none of whose files could be
 * read has no tensors. */
#ifndef KV_DATASET_SHARD_H
#define KV_DATASET_SHARD_H

#include "dataset/plan.h"

typedef struct kv_ds_rows kv_ds_rows;

/* An empty shard of plan's shard index for up to shard->count rows. */
klvae_status_t kv_ds_rows_create(const kv_ds_settings *s, const kv_ds_plan *plan,
                                 size_t shard_index, kv_ds_rows **out);
void kv_ds_rows_free(kv_ds_rows *r);

/* Appends n encoded images: for row i, mean/logvar (or latent, logvar
 * NULL) image i, and with flip their mirrored twins at i + n of the same
 * arrays; geometry and file of each row. Values are converted to the
 * stored dtype (and scaled first with scale_latents). */
void kv_ds_rows_append(kv_ds_rows *r, int n, const float *mean, const float *logvar,
                       const kv_geometry *geometry, const uint32_t *files);

/* Records that the shard's file could not be read (reason copied). */
klvae_status_t kv_ds_rows_skip(kv_ds_rows *r, uint32_t file, const char *reason);

size_t kv_ds_rows_count(const kv_ds_rows *r);

/* Writes the shard to folder/name atomically. Errors: KLVAE_ERR_IO (the
 * message names the file and the OS error), KLVAE_ERR_OUT_OF_MEMORY;
 * nothing is left on error. */
klvae_status_t kv_ds_rows_write(const kv_ds_rows *r, const kv_image_files *files,
                                const char *folder, const char *settings_hash);

/* float32 to IEEE half, rounded to nearest even (overflow to infinity). */
uint16_t kv_half_from_float(float f);

#endif
