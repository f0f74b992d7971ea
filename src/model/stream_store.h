/* stream_store.h — the pieces of a streamed forward (stream.h): its
 * context and memory count, and the stores that hold one sample's
 * activation between two layers as a list of row bands. */
#ifndef KV_STREAM_STORE_H
#define KV_STREAM_STORE_H

#include "base/spill.h"
#include "model/stream.h"

/* A streamed forward in progress. With dry set it only counts: stores
 * and buffers get sizes but no memory, and no op runs (the planner's
 * dry run walks the same code as the forward). */
typedef struct kv_stream {
    klvae_model_t *m;
    kv_backend *be;
    bool dry;
    size_t band_bytes;        /* the plan's */
    uint64_t spill_threshold; /* the plan's */
    int max_rows;             /* the model's max_band_rows: 0, or the most rows of a band */
    kv_spill *spill;          /* opened by the first spilled store */
    uint64_t held, peak;      /* bytes held now (stores in memory, buffers, mapped
                                 windows) and at most */
    /* On a backend without host memory (CUDA), held and peak count the
     * device's memory (its band buffers, tensors and scratch) and these the
     * host memory of the stores, mapped windows and staging: memory_limit
     * bounds the device's. With host memory both are one count (held). */
    uint64_t host_held, host_peak;
    /* The backend's own buffers, estimated: one shared and one per thread,
     * each as large as the largest layer needs. The backend keeps them from
     * then on (for its life), so they count for the whole forward. */
    uint64_t scratch_shared, scratch_thread;
    kv_stream_report report;
    bool thin;                /* some layer had bands of fewer than 16 rows (and
                                 more than one band) */
    uint64_t *sizes;          /* a dry run: the sizes of the stores it makes */
    int nsizes, max_sizes;
} kv_stream;

/* Counts bytes taken and given back: the backend's memory, and host
 * memory (the same count when the backend's memory is the host's). */
void kv_stream_take(kv_stream *s, uint64_t bytes);
void kv_stream_give(kv_stream *s, uint64_t bytes);
void kv_stream_take_host(kv_stream *s, uint64_t bytes);
void kv_stream_give_host(kv_stream *s, uint64_t bytes);
/* Counts the backend's scratch a layer needs: shared bytes, and bytes for
 * each thread. */
void kv_stream_scratch(kv_stream *s, uint64_t shared, uint64_t per_thread);
/* The most the forward holds at once: its peak with the whole scratch. */
uint64_t kv_stream_peak(const kv_stream *s);

/* What the backend holds for one conv2d of a band (stream_plan.c): its
 * temporaries, counted for the length of the call, and its scratch. x is
 * (ci, rows, cols) before the upsample; the output has out_rows x out_cols. */
void kv_stream_conv_memory(kv_stream *s, const kv_conv *conv, int rows, int cols, bool upsample,
                           bool prologue, kv_conv_geometry g, int out_rows, int out_cols);
/* The attention's scratch per thread, for positions keys. */
uint64_t kv_attention_thread_bytes(int positions);

typedef struct kv_band {
    int r0, r1;      /* rows [r0, r1) */
    float *data;     /* (C, r1 - r0, W): host memory, or NULL (spilled, freed, dry) */
    uint64_t offset; /* in the spill file when the store is spilled */
    bool live;
} kv_band;

/* One sample's (C, H, W) activation in bands of rows, written in order of
 * rows by the layer that produces it. */
typedef struct kv_store {
    int c, h, w;
    kv_band *bands;
    int nbands, capbands;
    int first_live;   /* bands before it are freed */
    bool spilled;     /* its bands are in the spill file */
    bool external;    /* the caller's array: one band, never freed */
    kv_band outside;  /* that band */
    /* Group statistics of the values written, for the group norm that reads
     * the store (groups > 0): per group the count, mean and sum of squared
     * deviations, merged band by band in double (Chan, Golub and LeVeque). */
    int groups;
    double *count, *mean, *m2;
    /* When one band held all of it: the scale and shift (C each) of the
     * norm that reads it, as group_norm_stats gave them for the whole
     * tensor (so bit for bit the untiled forward's). */
    float *affine;
} kv_store;

/* A store of (c, h, w), in the spill file when its size reaches the
 * plan's threshold; groups > 0 gathers statistics for a norm of that
 * many groups. Release it with kv_store_free. */
klvae_status_t kv_store_init(kv_stream *s, kv_store *st, int c, int h, int w, int groups);
/* The caller's (c, h, w) array as a store that is only read or written. */
void kv_store_external(kv_store *st, float *data, int c, int h, int w);
void kv_store_free(kv_stream *s, kv_store *st);
size_t kv_store_bytes(const kv_store *st);

/* Appends the band [r0, r1) (r0 is the end of the last band) and makes
 * *data point at its memory (mapped when spilled; NULL in a dry run).
 * kv_store_end_band ends the write (unmaps). */
klvae_status_t kv_store_begin_band(kv_stream *s, kv_store *st, int r0, int r1, float **data);
void kv_store_end_band(kv_stream *s, kv_store *st, float *data);

/* Frees the bands that end at or before row: no later read needs them. */
void kv_store_free_below(kv_stream *s, kv_store *st, int row);

/* Copies rows [r0, r1) of st into dst, (C, r1 - r0, W); the memory of
 * spilled bands is mapped one band at a time. */
klvae_status_t kv_store_read(kv_stream *s, const kv_store *st, int r0, int r1, float *dst);
/* Copies src (C, r1 - r0, W) into rows [r0, r1) of an external store. */
void kv_store_write_rows(kv_store *st, int r0, int r1, const float *src);
/* The memory of rows [r0, r1) when one band in host memory holds exactly
 * them (a tensor can use it as it is), else NULL. */
float *kv_store_exact_band(const kv_store *st, int r0, int r1);

/* Merges the statistics of one band of n values per group: its mean and
 * rstd = 1 / sqrt(var + eps) per group (what group_norm_stats gives). */
void kv_store_add_moments(kv_store *st, const float *mean, const float *rstd, double n,
                          float eps);
/* scale and shift (C) of the group norm (gamma, beta, eps) of the values
 * written, as group_norm_stats computes them (backend.h). */
void kv_store_norm_affine(const kv_store *st, const float *gamma, const float *beta, float eps,
                          float *scale, float *shift);

#endif /* KV_STREAM_STORE_H */
