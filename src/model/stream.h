/* stream.h — streamed and tiled execution of encode and decode, for images
 * whose untiled forward does not fit in memory.
 *
 * Streamed ("exact") execution runs the network of vae.c layer by layer,
 * one sample at a time, each layer over bands of rows of its output: a
 * convolution reads its input band with the halo rows it needs, every
 * group norm takes its statistics over the whole activation (gathered band
 * by band as the activation is produced, then applied by the convolution
 * that reads it), and the mid-block attention attends over every position.
 * So the result is the untiled one up to float rounding. Between layers the
 * activations ("stores") live in host memory, or in the spill file when
 * memory_limit cannot hold them; a band that no later layer reads is freed
 * at once. Only ops of the backend interface compute, on band-sized
 * tensors, so any backend can run it (stores stay in host memory; a backend
 * without host memory gets its bands by upload and download).
 *
 * Blend tiling reproduces diffusers' tiled encode and decode: overlapping
 * tiles, each through the untiled forward, blended linearly. */
#ifndef KV_STREAM_H
#define KV_STREAM_H

#include "model/model.h"

typedef enum kv_forward_mode {
    KV_FORWARD_UNTILED = 0,
    KV_FORWARD_STREAMED,
    KV_FORWARD_BLEND
} kv_forward_mode;

/* How one klvae_encode or klvae_decode runs (kv_plan_forward). */
typedef struct kv_forward_plan {
    kv_forward_mode mode;
    bool encode;
    int n, h, w;              /* images of h x w pixels */
    uint64_t limit;           /* the budget it was planned for; 0: none */
    /* streamed: */
    size_t band_bytes;        /* target size of one band's buffers; 0: one row */
    uint64_t spill_threshold; /* activations of at least this many bytes are
                                 spilled; UINT64_MAX: none */
    uint64_t planned_bytes;   /* the most memory it holds at once, planned (on a
                                 backend without host memory: the device's) */
    uint64_t planned_host_bytes; /* a backend without host memory: the most host
                                    memory it holds at once (its stores), planned */
} kv_forward_plan;

/* What a streamed forward measured as it ran (for klvae_model_get's
 * "last_plan" and the tests). */
typedef struct kv_stream_report {
    uint64_t peak_bytes;    /* the most memory it held at once, by its own count
                               (a backend without host memory: the device's) */
    uint64_t host_peak_bytes; /* a backend without host memory: the most host
                                 memory (stores, staging) it held; else 0 */
    uint64_t spilled_bytes; /* the most the spill file held at once */
    int min_rows, max_rows; /* rows of the smallest and largest band */
    int bands;              /* bands computed, over every layer and sample */
} kv_stream_report;

/* Chooses how a forward of n images of h x w pixels runs, from the model's
 * settings (memory_limit, tiling): untiled when it fits in the budget,
 * else streamed with bands and spilling that fit, else
 * KLVAE_ERR_OUT_OF_MEMORY naming the least memory_limit that works.
 * device_arrays: the caller's arrays are device memory (klvae_*_device),
 * where only the untiled forward runs. */
klvae_status_t kv_plan_forward(const klvae_model_t *m, bool encode, int n, int h, int w,
                               bool device_arrays, kv_forward_plan *plan);

/* The streamed forward on the caller's host arrays (NCHW float32):
 * images (n, in_channels, h, w) to mean and logvar (logvar may be NULL),
 * or z to images. report may be NULL. */
klvae_status_t kv_stream_encode(klvae_model_t *m, const kv_forward_plan *plan,
                                const float *images, float *mean, float *logvar,
                                kv_stream_report *report);
klvae_status_t kv_stream_decode(klvae_model_t *m, const kv_forward_plan *plan, const float *z,
                                float *images, kv_stream_report *report);

/* The folder of the spill file: the option spill_dir, else TMPDIR, else
 * /var/tmp (/tmp is often in memory). */
const char *kv_spill_folder(const klvae_model_t *m);

/* Blend tiling (vae_blend.c) on the caller's host arrays. */
klvae_status_t kv_blend_encode(klvae_model_t *m, const kv_forward_plan *plan,
                               const float *images, float *mean, float *logvar);
klvae_status_t kv_blend_decode(klvae_model_t *m, const kv_forward_plan *plan, const float *z,
                               float *images);

/* ---- inside the streamed forward (vae_stream.c, stream_plan.c) ---- */

/* The memory an untiled forward of plan's images holds at most (its live
 * tensors and the CPU backend's temporaries), estimated. */
uint64_t kv_untiled_bytes(const klvae_model_t *m, bool encode, int n, int h, int w);

/* What a dry run found: the streamed forward run without computing
 * anything, only counting (the planner's tool). */
typedef struct kv_stream_dry {
    uint64_t peak_bytes;  /* the most it would hold at once */
    uint64_t host_peak_bytes; /* a backend without host memory: in host memory */
    bool thin;            /* some layer in bands of fewer than 16 rows */
    uint64_t sizes[64];   /* the sizes of the activations it stores (one
                             sample), without repeats: spill thresholds */
    int nsizes;
} kv_stream_dry;

/* One sample of plan's forward, with its band size and spill threshold. */
klvae_status_t kv_stream_dry_run(const klvae_model_t *m, const kv_forward_plan *plan,
                                 kv_stream_dry *out);

#endif /* KV_STREAM_H */
