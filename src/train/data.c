/* data.c — see data.h: folder and procedural datasets, and the loader
 * thread that prepares batches ahead of the training step.
 *
 * Randomness. Everything random is Philox-4x32-10 (philox.h) keyed by the
 * dataset's seed, with a 128-bit counter (block, tag, lo32(id), hi32(id)):
 * the tag separates the uses (the epoch permutations, the crops and flips
 * here; the procedural images in procedural.c) and id is the epoch or the
 * stream position. A draw therefore depends on (seed, epoch) or
 * (seed, position) only, never on threads or time. Bounded integers use
 * Lemire's multiply-shift with rejection, so they are exactly uniform.
 *
 * Thread safety of the permutation. The order of epoch e is a
 * Fisher-Yates shuffle of the sorted file list driven by Philox keyed on
 * (seed, e). It is computed lazily, the first time a position of epoch e is
 * asked for, and cached. The cache has two slots, allocated when the dataset
 * is opened (so a lookup cannot fail), and is guarded by a mutex: a lookup
 * locks it, reads one entry of the order (computing the order first into the
 * least recently used slot on a miss) and unlocks. Two slots make the usual
 * pattern cheap: the loader thread reading into epoch e + 1 while another
 * thread still reads epoch e. Threads that wander over more epochs at once
 * stay correct; they only recompute orders more often. Decoding happens
 * outside the lock, so kv_dataset_get runs in parallel on different buffers.
 *
 * Resizing and cropping. An image whose shorter side is below size is
 * scaled by size / shorter side (the longer side rounded to the nearest
 * integer) with bilinear interpolation, pixel centres aligned as in PIL and
 * torch's interpolate(align_corners=False): source coordinate
 * (dst + 0.5) * in / out - 0.5, clamped at 0 and at the last pixel. Only the
 * size x size window that the crop keeps is computed. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/options.h"
#include "base/philox.h"
#include "formats/image.h"
#include "formats/image_files.h"
#include "train/data.h"
#include "train/procedural.h"

#define KV_DATA_MIN_SIZE 8
#define KV_DATA_MAX_SIZE 8192
#define KV_PERM_SLOTS 2

/* Counter tags ("perm", "crop"; procedural.c uses "proc"). */
#define KV_TAG_PERM 0x7065726Du
#define KV_TAG_CROP 0x63726F70u

/* ---- the dataset ---- */

typedef struct perm_slot {
    bool valid;
    uint64_t epoch;
    uint64_t last_use;
    uint32_t *order; /* count entries: file index of each place of the epoch */
} perm_slot;

struct kv_dataset {
    int size;
    uint64_t seed;
    uint64_t max_pixels; /* the pixel budget of each file read */
    bool procedural;
    char *root;
    size_t count;
    char **paths; /* sorted by strcmp */

    pthread_mutex_t lock; /* guards use_clock and slots */
    uint64_t use_clock;
    perm_slot slots[KV_PERM_SLOTS];
};

static bool size_valid(int size)
{
    return size >= KV_DATA_MIN_SIZE && size <= KV_DATA_MAX_SIZE;
}

static kv_dataset *dataset_new(int size, uint64_t seed)
{
    kv_dataset *ds = calloc(1, sizeof *ds);
    if (!ds)
        return NULL;
    ds->size = size;
    ds->seed = seed;
    ds->max_pixels = kv_options_uint64(NULL, "max_image_pixels");
    pthread_mutex_init(&ds->lock, NULL);
    return ds;
}

void kv_dataset_set_max_pixels(kv_dataset *ds, uint64_t max_pixels)
{
    ds->max_pixels = max_pixels;
}

void kv_dataset_free(kv_dataset *ds)
{
    if (!ds)
        return;
    for (size_t i = 0; i < ds->count; i++)
        free(ds->paths[i]);
    free(ds->paths);
    for (int s = 0; s < KV_PERM_SLOTS; s++)
        free(ds->slots[s].order);
    free(ds->root);
    pthread_mutex_destroy(&ds->lock);
    free(ds);
}

klvae_status_t kv_dataset_open_folder(const char *dir, int size, uint64_t seed, kv_dataset **out)
{
    kv_error_clear();
    if (out)
        *out = NULL;
    if (!dir || !out)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "kv_dataset_open_folder: %s is NULL",
                        !dir ? "dir" : "out");
    if (!size_valid(size))
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "kv_dataset_open_folder: image size %d is not between %d and %d", size,
                        KV_DATA_MIN_SIZE, KV_DATA_MAX_SIZE);
    /* the walk and its order are encode-dataset's too (formats/image_files.h) */
    kv_image_files list;
    klvae_status_t st = kv_image_files_walk(dir, &list);
    if (st != KLVAE_OK)
        return st;
    if (list.count > UINT32_MAX)
        st = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "%s holds %zu image files; at most %u are supported",
                      dir, list.count, (unsigned)UINT32_MAX);
    kv_dataset *ds = NULL;
    if (st == KLVAE_OK) {
        ds = dataset_new(size, seed);
        if (!ds) {
            st = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory opening %s", dir);
        } else {
            ds->paths = list.paths; /* taken over, already sorted */
            ds->count = list.count;
            list.paths = NULL;
            ds->root = kv_strdup(dir);
            if (!ds->root)
                st = KLVAE_ERR_OUT_OF_MEMORY;
            for (int s = 0; st == KLVAE_OK && s < KV_PERM_SLOTS; s++) {
                ds->slots[s].order = malloc(ds->count * sizeof(uint32_t));
                if (!ds->slots[s].order)
                    st = kv_error(KLVAE_ERR_OUT_OF_MEMORY,
                                  "out of memory opening %s (%zu files)", dir, ds->count);
            }
        }
    }
    if (list.paths) {
        kv_image_files_free(&list);
    } else {
        for (size_t i = 0; i < list.count; i++)
            free(list.names[i]);
        free(list.names);
    }
    if (st != KLVAE_OK) {
        kv_dataset_free(ds);
        return st;
    }
    *out = ds;
    return KLVAE_OK;
}

klvae_status_t kv_dataset_open_procedural(int size, uint64_t seed, kv_dataset **out)
{
    kv_error_clear();
    if (out)
        *out = NULL;
    if (!out)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "kv_dataset_open_procedural: out is NULL");
    if (!size_valid(size))
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "kv_dataset_open_procedural: image size %d is not between %d and %d",
                        size, KV_DATA_MIN_SIZE, KV_DATA_MAX_SIZE);
    kv_dataset *ds = dataset_new(size, seed);
    if (!ds)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory opening the procedural dataset");
    ds->procedural = true;
    *out = ds;
    return KLVAE_OK;
}

size_t kv_dataset_count(const kv_dataset *ds)
{
    return ds && !ds->procedural ? ds->count : 0;
}

int kv_dataset_size(const kv_dataset *ds)
{
    return ds ? ds->size : 0;
}

/* ---- epoch permutations ---- */

static void shuffle(uint32_t *order, size_t count, uint64_t seed, uint64_t epoch)
{
    for (size_t i = 0; i < count; i++)
        order[i] = (uint32_t)i;
    kv_philox_stream s = kv_philox_stream_start(seed, KV_TAG_PERM, epoch);
    for (size_t i = count; i > 1; i--) {
        uint32_t j = kv_philox_stream_below(&s, (uint32_t)i); /* in [0, i - 1] */
        uint32_t t = order[i - 1];
        order[i - 1] = order[j];
        order[j] = t;
    }
}

/* The index into ds->paths of the file at a stream position (folder
 * datasets only). */
static size_t file_at(const kv_dataset *cds, uint64_t position)
{
    /* The dataset is always allocated non-const; the cache and its lock are
     * the only state a lookup changes. */
    kv_dataset *ds = (kv_dataset *)cds;
    uint64_t epoch = position / ds->count;
    size_t place = (size_t)(position % ds->count);
    pthread_mutex_lock(&ds->lock);
    perm_slot *slot = NULL;
    for (int s = 0; s < KV_PERM_SLOTS; s++)
        if (ds->slots[s].valid && ds->slots[s].epoch == epoch)
            slot = &ds->slots[s];
    if (!slot) {
        slot = &ds->slots[0];
        for (int s = 1; s < KV_PERM_SLOTS; s++) {
            perm_slot *c = &ds->slots[s];
            if (!c->valid || (slot->valid && c->last_use < slot->last_use))
                slot = c;
        }
        shuffle(slot->order, ds->count, ds->seed, epoch);
        slot->epoch = epoch;
        slot->valid = true;
    }
    slot->last_use = ++ds->use_clock;
    size_t index = slot->order[place];
    pthread_mutex_unlock(&ds->lock);
    return index;
}

const char *kv_dataset_path(const kv_dataset *ds, uint64_t position)
{
    if (!ds || ds->procedural || ds->count == 0)
        return "";
    return ds->paths[file_at(ds, position)];
}

/* ---- resize, crop, flip ---- */

typedef struct tap {
    int i0, i1;
    float f; /* weight of i1 */
} tap;

/* The source taps of resized coordinate dst (0 <= dst < out) of an axis of in
 * pixels scaled to out pixels (out >= in). */
static tap axis_tap(uint64_t dst, int in, uint64_t out)
{
    double scale = (double)in / (double)out;
    double s = ((double)dst + 0.5) * scale - 0.5;
    if (s < 0.0)
        s = 0.0;
    int i0 = (int)s;
    if (i0 > in - 1)
        i0 = in - 1;
    tap t;
    t.i0 = i0;
    t.i1 = i0 + 1 < in ? i0 + 1 : in - 1;
    t.f = (float)(s - (double)i0);
    return t;
}

static float clamp_unit(float v)
{
    return v < -1.0f ? -1.0f : (v > 1.0f ? 1.0f : v);
}

/* Crops (and resizes and flips) src (3, h, w) into out (3, size, size) as
 * position's draws say. */
static klvae_status_t crop_image(const kv_dataset *ds, uint64_t position, const char *path,
                                 const float *src, int h, int w, float *out)
{
    const int size = ds->size;
    const uint64_t usize = (uint64_t)size;
    uint64_t nh = (uint64_t)h, nw = (uint64_t)w;
    bool resize = h < size || w < size;
    if (resize) {
        if (h <= w) {
            nh = usize;
            nw = ((uint64_t)w * usize * 2 + (uint64_t)h) / (2 * (uint64_t)h);
        } else {
            nw = usize;
            nh = ((uint64_t)h * usize * 2 + (uint64_t)w) / (2 * (uint64_t)w);
        }
        nh = KV_MAX(nh, usize);
        nw = KV_MAX(nw, usize);
    }
    /* nh, nw <= 65536 * 8192 = 2^29: the ranges fit in 32 bits. */
    kv_philox_stream s = kv_philox_stream_start(ds->seed, KV_TAG_CROP, position);
    bool flip = (kv_philox_stream_next(&s) >> 31) != 0;
    uint64_t ox = kv_philox_stream_below(&s, (uint32_t)(nw - usize + 1));
    uint64_t oy = kv_philox_stream_below(&s, (uint32_t)(nh - usize + 1));

    const size_t in_plane = (size_t)h * (size_t)w;
    const size_t out_plane = (size_t)size * (size_t)size;
    if (!resize) {
        for (int c = 0; c < 3; c++)
            for (int y = 0; y < size; y++) {
                const float *row = src + c * in_plane + (size_t)(oy + (uint64_t)y) * (size_t)w + ox;
                float *dst = out + c * out_plane + (size_t)y * (size_t)size;
                if (flip)
                    for (int x = 0; x < size; x++)
                        dst[x] = row[size - 1 - x];
                else
                    memcpy(dst, row, (size_t)size * sizeof *dst);
            }
        return KLVAE_OK;
    }
    tap *cols = malloc((size_t)size * sizeof *cols);
    if (!cols)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory resizing %s", path);
    for (int x = 0; x < size; x++)
        cols[flip ? size - 1 - x : x] = axis_tap(ox + (uint64_t)x, w, nw);
    for (int y = 0; y < size; y++) {
        tap r = axis_tap(oy + (uint64_t)y, h, nh);
        const float fy1 = r.f, fy0 = 1.0f - r.f;
        for (int c = 0; c < 3; c++) {
            const float *row0 = src + c * in_plane + (size_t)r.i0 * (size_t)w;
            const float *row1 = src + c * in_plane + (size_t)r.i1 * (size_t)w;
            float *dst = out + c * out_plane + (size_t)y * (size_t)size;
            for (int x = 0; x < size; x++) {
                const tap t = cols[x];
                const float fx1 = t.f, fx0 = 1.0f - t.f;
                float top = fx0 * row0[t.i0] + fx1 * row0[t.i1];
                float bottom = fx0 * row1[t.i0] + fx1 * row1[t.i1];
                dst[x] = clamp_unit(fy0 * top + fy1 * bottom);
            }
        }
    }
    free(cols);
    return KLVAE_OK;
}

klvae_status_t kv_dataset_get(const kv_dataset *ds, uint64_t position, float *out)
{
    kv_error_clear();
    if (!ds || !out)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "kv_dataset_get: %s is NULL",
                        !ds ? "dataset" : "out");
    if (ds->procedural) {
        kv_procedural_image(ds->seed, position, ds->size, out);
        return KLVAE_OK;
    }
    const char *path = ds->paths[file_at(ds, position)];
    float *pixels = NULL;
    int h = 0, w = 0;
    klvae_status_t st = kv_image_read("kv_dataset_get", path, ds->max_pixels, &pixels, &h, &w);
    if (st != KLVAE_OK)
        return st; /* the message names the file */
    st = crop_image(ds, position, path, pixels, h, w, out);
    klvae_free(pixels);
    return st;
}

/* ---- the loader ---- */

typedef struct loader_slot {
    float *batch;
    uint64_t end;          /* the stream position after the batch */
    klvae_status_t status; /* not OK: the dataset failed; error says why */
    char *error;
    char **warnings; /* files skipped while this batch was read */
    size_t nwarnings, cap_warnings;
} loader_slot;

struct kv_loader {
    const kv_dataset *ds;
    int n, depth;
    bool shared;           /* a rank's share (kv_loader_create_share) */
    kv_loader_share share; /* with shared */
    size_t image_floats, batch_floats;
    kv_data_warning_fn warn;
    void *warn_ctx;

    pthread_mutex_t lock;
    pthread_cond_t ready; /* a slot was filled */
    pthread_cond_t space; /* a slot was emptied, or stop */
    loader_slot *slots;
    int head, filled; /* guarded by lock */
    atomic_bool stop;
    bool thread_started;
    pthread_t thread;

    /* The loader thread's own state. */
    uint64_t next;
    unsigned char *reported; /* per file: already reported */
    uint64_t *failed_in;     /* per file: the run of failures it last failed in */
    uint64_t run;            /* the current run of failures (since a success) */
    size_t run_failed;       /* distinct files that failed in the current run */

    /* The consumer's own state: set once the dataset failed as a whole. */
    klvae_status_t fatal;
    char *fatal_message;
};

static void print_warning(const char *message)
{
    fprintf(stderr, "klvae: %s\n", message);
}

/* Records "skipping <path>: <reason>" on the slot, to be delivered by
 * kv_loader_next on the consumer's thread with the batch. */
static void queue_warning(loader_slot *slot, const char *path, const char *reason)
{
    int len = snprintf(NULL, 0, "skipping %s: %s", path, reason);
    char *message = len >= 0 ? malloc((size_t)len + 1) : NULL;
    if (message)
        snprintf(message, (size_t)len + 1, "skipping %s: %s", path, reason);
    if (message && slot->nwarnings == slot->cap_warnings) {
        size_t cap = slot->cap_warnings ? slot->cap_warnings * 2 : 4;
        char **w = realloc(slot->warnings, cap * sizeof *w);
        if (w) {
            slot->warnings = w;
            slot->cap_warnings = cap;
        }
    }
    if (message && slot->nwarnings < slot->cap_warnings) {
        slot->warnings[slot->nwarnings++] = message;
        return;
    }
    /* Out of memory: say it now, on this thread, rather than not at all. */
    free(message);
    fprintf(stderr, "klvae: skipping %s: %s\n", path, reason);
}

static void slot_clear_warnings(loader_slot *slot)
{
    for (size_t i = 0; i < slot->nwarnings; i++)
        free(slot->warnings[i]);
    slot->nwarnings = 0;
}

enum fill_result { FILL_OK, FILL_STOPPED, FILL_FAILED };

/* Reads the next n good images into slot. */
static enum fill_result fill_slot(kv_loader *L, loader_slot *slot)
{
    const kv_dataset *ds = L->ds;
    for (int k = 0; k < L->n; k++) {
        float *dst = slot->batch + (size_t)k * L->image_floats;
        for (;;) {
            if (atomic_load(&L->stop))
                return FILL_STOPPED;
            uint64_t p = L->next++;
            klvae_status_t st = kv_dataset_get(ds, p, dst);
            if (st == KLVAE_OK) {
                if (L->run_failed > 0) {
                    L->run++;
                    L->run_failed = 0;
                }
                break;
            }
            if (ds->procedural) {
                /* Cannot happen (the generator does not fail); fail cleanly. */
                slot->status = st;
                slot->error = kv_strdup(kv_error_message());
                return FILL_FAILED;
            }
            size_t file = file_at(ds, p);
            const char *path = ds->paths[file];
            if (!L->reported[file]) {
                L->reported[file] = 1;
                queue_warning(slot, path, kv_error_message());
            }
            if (L->failed_in[file] != L->run) {
                L->failed_in[file] = L->run;
                L->run_failed++;
            }
            if (L->run_failed == ds->count) {
                const char *fmt = "none of the %zu image files under %s can be read "
                                  "(the last one tried: %s)";
                int len = snprintf(NULL, 0, fmt, ds->count, ds->root, kv_error_message());
                slot->status = KLVAE_ERR_IO;
                slot->error = len >= 0 ? malloc((size_t)len + 1) : NULL;
                if (slot->error)
                    snprintf(slot->error, (size_t)len + 1, fmt, ds->count, ds->root,
                             kv_error_message());
                return FILL_FAILED;
            }
        }
    }
    slot->end = L->next;
    slot->status = KLVAE_OK;
    return FILL_OK;
}

/* ---- a rank's share (kv_loader_create_share) ---- */

/* The stream position of this rank's image j of the global batch at base. */
static uint64_t share_position(const kv_loader *L, uint64_t base, int j)
{
    const kv_loader_share *s = &L->share;
    const int part = s->batch / (s->accum * s->ranks); /* per rank and micro-batch */
    const int m = j / part, k = j % part;
    return base + (uint64_t)m * (uint64_t)(s->batch / s->accum) + (uint64_t)s->rank * part +
           (uint64_t)k;
}

/* A failure to read the file at position p, reported once per file. */
static void report_failure(kv_loader *L, loader_slot *slot, uint64_t p)
{
    size_t file = file_at(L->ds, p);
    if (!L->reported[file]) {
        L->reported[file] = 1;
        queue_warning(slot, L->ds->paths[file], kv_error_message());
    }
}

/* The image at position p into dst or, when its file cannot be read, the
 * next readable file of the same epoch's order. */
static enum fill_result read_or_substitute(kv_loader *L, loader_slot *slot, uint64_t p,
                                           float *dst)
{
    const kv_dataset *ds = L->ds;
    klvae_status_t st = kv_dataset_get(ds, p, dst);
    if (st == KLVAE_OK)
        return FILL_OK;
    if (ds->procedural) { /* cannot happen (the generator does not fail); fail cleanly */
        slot->status = st;
        slot->error = kv_strdup(kv_error_message());
        return FILL_FAILED;
    }
    const uint64_t count = ds->count, epoch = p - p % count, place = p % count;
    report_failure(L, slot, p);
    for (uint64_t j = 1; j < count; j++) {
        if (atomic_load(&L->stop))
            return FILL_STOPPED;
        const uint64_t q = epoch + (place + j) % count;
        if (kv_dataset_get(ds, q, dst) == KLVAE_OK)
            return FILL_OK;
        report_failure(L, slot, q);
    }
    const char *fmt = "none of the %zu image files under %s can be read (the last one tried: %s)";
    int len = snprintf(NULL, 0, fmt, ds->count, ds->root, kv_error_message());
    slot->status = KLVAE_ERR_IO;
    slot->error = len >= 0 ? malloc((size_t)len + 1) : NULL;
    if (slot->error)
        snprintf(slot->error, (size_t)len + 1, fmt, ds->count, ds->root, kv_error_message());
    return FILL_FAILED;
}

/* This rank's share of the next global batch into slot. */
static enum fill_result fill_share(kv_loader *L, loader_slot *slot)
{
    for (int j = 0; j < L->n; j++) {
        if (atomic_load(&L->stop))
            return FILL_STOPPED;
        enum fill_result r = read_or_substitute(L, slot, share_position(L, L->next, j),
                                                slot->batch + (size_t)j * L->image_floats);
        if (r != FILL_OK)
            return r;
    }
    L->next += (uint64_t)L->share.batch;
    slot->end = L->next;
    slot->status = KLVAE_OK;
    return FILL_OK;
}

static void *loader_main(void *arg)
{
    kv_loader *L = arg;
    pthread_mutex_lock(&L->lock);
    for (;;) {
        while (!atomic_load(&L->stop) && L->filled == L->depth)
            pthread_cond_wait(&L->space, &L->lock);
        if (atomic_load(&L->stop))
            break;
        loader_slot *slot = &L->slots[(L->head + L->filled) % L->depth];
        pthread_mutex_unlock(&L->lock);
        /* The consumer only touches filled slots: this one is ours. */
        enum fill_result r = L->shared ? fill_share(L, slot) : fill_slot(L, slot);
        pthread_mutex_lock(&L->lock);
        if (r == FILL_STOPPED)
            break;
        L->filled++;
        pthread_cond_signal(&L->ready);
        if (r == FILL_FAILED)
            break; /* the consumer reports it; nothing more to read */
    }
    pthread_mutex_unlock(&L->lock);
    return NULL;
}

void kv_loader_free(kv_loader *loader)
{
    if (!loader)
        return;
    if (loader->thread_started) {
        pthread_mutex_lock(&loader->lock);
        atomic_store(&loader->stop, true);
        pthread_cond_broadcast(&loader->space);
        pthread_mutex_unlock(&loader->lock);
        pthread_join(loader->thread, NULL);
    }
    if (loader->slots) {
        for (int i = 0; i < loader->depth; i++) {
            loader_slot *slot = &loader->slots[i];
            free(slot->batch);
            free(slot->error);
            slot_clear_warnings(slot);
            free(slot->warnings);
        }
        free(loader->slots);
    }
    free(loader->reported);
    free(loader->failed_in);
    free(loader->fatal_message);
    pthread_cond_destroy(&loader->ready);
    pthread_cond_destroy(&loader->space);
    pthread_mutex_destroy(&loader->lock);
    free(loader);
}

static klvae_status_t loader_start(const kv_dataset *ds, int n, const kv_loader_share *share,
                                   uint64_t start, int depth, kv_data_warning_fn warn,
                                   void *warn_ctx, kv_loader **out);

klvae_status_t kv_loader_create(const kv_dataset *ds, int n, uint64_t start, int depth,
                                kv_data_warning_fn warn, void *warn_ctx, kv_loader **out)
{
    kv_error_clear();
    return loader_start(ds, n, NULL, start, depth, warn, warn_ctx, out);
}

klvae_status_t kv_loader_create_share(const kv_dataset *ds, const kv_loader_share *share,
                                      uint64_t start, int depth, kv_data_warning_fn warn,
                                      void *warn_ctx, kv_loader **out)
{
    kv_error_clear();
    if (out)
        *out = NULL;
    if (!share)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "kv_loader_create_share: share is NULL");
    const kv_loader_share *s = share;
    if (s->ranks < 1 || s->rank < 0 || s->rank >= s->ranks || s->accum < 1 || s->batch < 1 ||
        s->batch % s->accum != 0 || (s->batch / s->accum) % s->ranks != 0)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "kv_loader_create_share: a global batch of %d images cannot be shared "
                        "by %d ranks in %d micro-batches (rank %d): it must be a multiple of "
                        "ranks x micro-batches",
                        s->batch, s->ranks, s->accum, s->rank);
    return loader_start(ds, s->batch / s->ranks, share, start, depth, warn, warn_ctx, out);
}

static klvae_status_t loader_start(const kv_dataset *ds, int n, const kv_loader_share *share,
                                   uint64_t start, int depth, kv_data_warning_fn warn,
                                   void *warn_ctx, kv_loader **out)
{
    if (out)
        *out = NULL;
    if (!ds || !out)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "kv_loader_create: %s is NULL",
                        !ds ? "dataset" : "out");
    if (n <= 0 || depth <= 0)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "kv_loader_create: the batch size (%d) and depth (%d) must be positive",
                        n, depth);
    size_t image_floats, batch_floats, batch_bytes;
    if (!kv_numel4(1, 3, ds->size, ds->size, &image_floats) ||
        !kv_numel4(n, 3, ds->size, ds->size, &batch_floats) ||
        !kv_mul_size(batch_floats, sizeof(float), &batch_bytes))
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY,
                        "kv_loader_create: a batch of %d images of %d x %d is too large", n,
                        ds->size, ds->size);
    kv_loader *L = calloc(1, sizeof *L);
    if (!L)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory creating the data loader");
    L->ds = ds;
    L->n = n;
    L->depth = depth;
    if (share) {
        L->shared = true;
        L->share = *share;
    }
    L->image_floats = image_floats;
    L->batch_floats = batch_floats;
    L->warn = warn;
    L->warn_ctx = warn_ctx;
    L->next = start;
    L->run = 1; /* failed_in starts at 0: no file has failed in run 1 */
    atomic_init(&L->stop, false);
    pthread_mutex_init(&L->lock, NULL);
    pthread_cond_init(&L->ready, NULL);
    pthread_cond_init(&L->space, NULL);
    L->slots = calloc((size_t)depth, sizeof *L->slots);
    bool ok = L->slots != NULL;
    for (int i = 0; ok && i < depth; i++) {
        L->slots[i].batch = malloc(batch_bytes);
        ok = L->slots[i].batch != NULL;
    }
    if (ok && !ds->procedural) {
        L->reported = calloc(ds->count, 1);
        L->failed_in = calloc(ds->count, sizeof *L->failed_in);
        ok = L->reported && L->failed_in;
    }
    if (!ok) {
        kv_loader_free(L);
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY,
                        "out of memory creating a data loader of %d batches of %d images", depth,
                        n);
    }
    int rc = pthread_create(&L->thread, NULL, loader_main, L);
    if (rc != 0) {
        kv_loader_free(L);
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "cannot start the data loader thread: %s",
                        strerror(rc));
    }
    L->thread_started = true;
    *out = L;
    return KLVAE_OK;
}

klvae_status_t kv_loader_next(kv_loader *loader, float *batch, uint64_t *position)
{
    kv_error_clear();
    if (!loader || !batch)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "kv_loader_next: %s is NULL",
                        !loader ? "loader" : "batch");
    if (loader->fatal != KLVAE_OK)
        return kv_error(loader->fatal, "%s", loader->fatal_message ? loader->fatal_message
                                                                   : "the data loader failed");
    pthread_mutex_lock(&loader->lock);
    while (loader->filled == 0)
        pthread_cond_wait(&loader->ready, &loader->lock);
    loader_slot *slot = &loader->slots[loader->head];
    pthread_mutex_unlock(&loader->lock);

    /* The slot stays ours until it is handed back below. */
    for (size_t i = 0; i < slot->nwarnings; i++) {
        if (loader->warn)
            loader->warn(loader->warn_ctx, slot->warnings[i]);
        else
            print_warning(slot->warnings[i]);
    }
    slot_clear_warnings(slot);
    if (slot->status != KLVAE_OK) {
        /* The loader thread has ended; the slot is never handed back. */
        loader->fatal = slot->status;
        loader->fatal_message = slot->error;
        slot->error = NULL;
        return kv_error(loader->fatal, "%s", loader->fatal_message ? loader->fatal_message
                                                                   : "the data loader failed");
    }
    memcpy(batch, slot->batch, loader->batch_floats * sizeof(float));
    if (position)
        *position = slot->end;

    pthread_mutex_lock(&loader->lock);
    loader->head = (loader->head + 1) % loader->depth;
    loader->filled--;
    pthread_cond_signal(&loader->space);
    pthread_mutex_unlock(&loader->lock);
    return KLVAE_OK;
}
