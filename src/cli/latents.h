/* latents.h — the klvae tool's latent files: safetensors files with the
 * tensors mean, logvar and latent, each (N, C, h, w), and the image size in
 * their metadata. A function of its own so that tests and the fuzzing
 * harness (tests/fuzz/fuzz_latents.c) reach the reader. */
#ifndef KLVAE_CLI_LATENTS_H
#define KLVAE_CLI_LATENTS_H

#include <stdbool.h>
#include <stdint.h>

#include "formats/safetensors.h"

typedef struct latent_tensor {
    const char *name;
    int64_t shape[4];
    const float *data;
} latent_tensor;

/* Writes count (at most 8) float32 tensors of 4 dimensions and metadata
 * to path, atomically. */
klvae_status_t write_latents(const char *path, const latent_tensor *tensors, size_t count,
                             const kv_st_meta *meta, size_t nmeta);

typedef struct latents {
    int n, c, h, w;
    int image_height, image_width; /* 0 when the file does not say */
    bool scaled;
    float *data; /* n * c * h * w floats, malloc'ed; the caller frees it */
} latents;

/* Reads the tensor "latent" (or the file's only tensor), shaped (C, h, w)
 * or (N, C, h, w) with C = channels, N <= 4096, h and w <= 65536, of a float
 * dtype. Errors: those of kv_st_open, KLVAE_ERR_MISSING_TENSOR,
 * KLVAE_ERR_SHAPE, KLVAE_ERR_UNSUPPORTED (not a float dtype),
 * KLVAE_ERR_OUT_OF_MEMORY; on error *out is all zero (data NULL). */
klvae_status_t read_latents(const char *path, int channels, latents *out);

#endif
