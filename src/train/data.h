/* data.h — training images: a dataset over a folder tree of PNG and JPEG
 * files, or the built-in procedural generator, and a loader thread that
 * prepares batches ahead of the training step.
 *
 * Every image comes out as (3, size, size) float32 in [-1, 1].
 *
 * Determinism: the image at stream position p (0, 1, 2, ...) depends only on
 * (seed, p) and the dataset's contents. For a folder of N files, epoch
 * e = p / N visits the files in a permutation drawn from (seed, e); the
 * random crop and flip of position p are drawn from (seed, p). So a run that
 * restarts at position p sees exactly what it would have seen. */
#ifndef KV_DATA_H
#define KV_DATA_H

#include "base/common.h"

typedef struct kv_dataset kv_dataset;

/* A dataset over every *.png, *.jpg and *.jpeg file (any letter case) under
 * dir, searched recursively, in byte order of their paths (so the same tree
 * gives the same order on every machine): the list kv_image_files_walk
 * (formats/image_files.h) makes, which encode-dataset walks too. Files are
 * not opened here.
 * Each image: if its shorter side is below size, it is first resized
 * (bilinear, torch align_corners=False) so that the shorter side equals
 * size and the longer side is scaled in proportion, rounded to nearest; then a size x size crop
 * at a random position; then a horizontal flip with probability 1/2.
 * Errors: KLVAE_ERR_INVALID_ARGUMENT (NULL, size < 8 or > 8192),
 * KLVAE_ERR_IO (dir missing or unreadable; no image file under it). */
klvae_status_t kv_dataset_open_folder(const char *dir, int size, uint64_t seed,
                                      kv_dataset **out);

/* The pixel budget of each file kv_dataset_get reads (the option
 * max_image_pixels; its default until this is called): a larger image is
 * refused from its header, like any unreadable file. Call it before a
 * loader uses the dataset. */
void kv_dataset_set_max_pixels(kv_dataset *ds, uint64_t max_pixels);

/* The built-in procedural images (kv_procedural_image), unbounded: position
 * p gives procedural image number p of the seed. Same size range as above
 * (kv_procedural_image itself takes any size >= 1). */
klvae_status_t kv_dataset_open_procedural(int size, uint64_t seed, kv_dataset **out);

/* Number of files, or 0 for the procedural dataset (unbounded). */
size_t kv_dataset_count(const kv_dataset *ds);

int kv_dataset_size(const kv_dataset *ds);

/* The image at stream position p, into out (3 * size * size floats).
 * Returns the status of reading that file (the message names it) so that
 * the caller can skip it. Thread-safe for different out buffers: the
 * per-epoch permutation is cached inside the dataset under a mutex, so
 * the const here means "the contents do not change", not "no writes". */
klvae_status_t kv_dataset_get(const kv_dataset *ds, uint64_t position, float *out);

/* The path of the file at stream position p ("" for procedural). */
const char *kv_dataset_path(const kv_dataset *ds, uint64_t position);

void kv_dataset_free(kv_dataset *ds);

/* Called once per file that cannot be read, with a message naming it, on
 * the thread that calls kv_loader_next (so it need not be thread-safe). */
typedef void (*kv_data_warning_fn)(void *ctx, const char *message);

typedef struct kv_loader kv_loader;

/* Starts a thread that reads batches of n images from position start on,
 * depth batches ahead. A file that cannot be read is reported once through
 * warn (NULL: a line on stderr "klvae: skipping <path>: <reason>") and
 * skipped: its position is consumed and the next one is used instead.
 * The dataset must outlive the loader.
 * Errors: KLVAE_ERR_INVALID_ARGUMENT, KLVAE_ERR_OUT_OF_MEMORY. */
klvae_status_t kv_loader_create(const kv_dataset *ds, int n, uint64_t start, int depth,
                                kv_data_warning_fn warn, void *warn_ctx, kv_loader **out);

/* One rank's share of the global batches of a data-parallel run (klvae.h,
 * "Data-parallel training"): the global batch of batch images starts at
 * stream position p and the next one at p + batch; with accum micro-batches,
 * rank r of ranks takes, of each micro-batch of batch / accum images, the
 * share r of batch / (accum * ranks) images, so that the ranks' shares make
 * the single-process batch in its order. batch must be a multiple of
 * accum * ranks. */
typedef struct kv_loader_share {
    int batch, accum, rank, ranks;
} kv_loader_share;

/* A loader of this rank's batch / ranks images per global batch, from
 * position start on. A file that cannot be read is reported once, as
 * above, and its place takes the next readable file of the same epoch's
 * order (positions e N + (i + 1) mod N, e N + (i + 2) mod N, ... for place i
 * of epoch e): the global batches stay where they are, whatever each rank
 * failed to read, so every rank agrees on them and on the position after
 * them, for any number of ranks. Errors: those of kv_loader_create, and
 * KLVAE_ERR_INVALID_ARGUMENT for a share that does not divide. */
klvae_status_t kv_loader_create_share(const kv_dataset *ds, const kv_loader_share *share,
                                      uint64_t start, int depth, kv_data_warning_fn warn,
                                      void *warn_ctx, kv_loader **out);

/* Copies the next batch (n, 3, size, size) into batch and, when position is
 * not NULL, the stream position after it. Blocks until the batch is ready.
 * Fails with KLVAE_ERR_IO (naming the folder) once every file of the
 * dataset has failed since the last successful read, and keeps failing on
 * later calls. (Not "N failures in a row": with one good file among N, a
 * reshuffled epoch boundary can put up to 2N-2 failures in a row.) */
klvae_status_t kv_loader_next(kv_loader *loader, float *batch, uint64_t *position);

/* Stops the thread and frees everything. NULL is a no-op. */
void kv_loader_free(kv_loader *loader);

#endif
