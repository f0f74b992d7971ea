/* device_cache.cuh — the CUDA backend's caching allocator, in plain C with
 * the device calls passed in, so that tests/test_cuda_host.c runs it over
 * malloc on the CPU.
 *
 * Every block the backend holds is in one hash table keyed by its address,
 * with its size, whether it is in use, and whether it holds bf16 (in bf16
 * mode every tensor the core allocates does: see cuda/README.md). A
 * released block stays cached for the next request of the same rounded
 * size, because cudaMalloc and cudaFree are slow and cudaFree waits for the
 * device. A forward pass releases and requests the same few sizes over and
 * over, so after the first layers of a level every request is a hit. When a
 * request for a large block misses, the cached large blocks are given back
 * first, so that the memory held follows the live set as the network moves
 * to a level with other sizes, instead of keeping every size it has ever
 * used (keep_on_miss turns that off: faster when memory is plentiful, as
 * PyTorch's allocator). A failed allocation gives back everything cached and
 * tries again.
 * trim gives back every cached block. All work runs on one stream, so a
 * block released while kernels that use it are still queued is only reused
 * by work queued after them (set_stream waits for the old stream first). */
#ifndef KV_DEVICE_CACHE_CUH
#define KV_DEVICE_CACHE_CUH

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define KV_DCACHE_OK 0
#define KV_DCACHE_OOM 1  /* the device (or the host table) is out of memory */
#define KV_DCACHE_FAIL 2 /* the device call failed otherwise */

#define KV_DCACHE_LARGE ((size_t)1 << 20)  /* blocks from 1 MiB up are "large" */
#define KV_DCACHE_SMALL_ROUND ((size_t)512)
#define KV_DCACHE_LARGE_ROUND ((size_t)2 << 20)

typedef struct kv_dcache_block {
    void *ptr; /* NULL: an empty slot */
    size_t size;
    unsigned char in_use, bf16;
} kv_dcache_block;

typedef struct kv_dcache {
    kv_dcache_block *slots;
    size_t capacity; /* a power of two, or 0 */
    size_t count;    /* occupied slots */
    size_t reserved, in_use, cached, cached_large; /* bytes */
    size_t peak_reserved, peak_in_use;
    size_t device_allocs, device_frees; /* calls made, for tests and statistics */
    int keep_on_miss; /* 1: a large miss gives nothing back (only a failure does) */
    /* the device */
    void *ctx;
    int (*dev_malloc)(void *ctx, size_t bytes, void **ptr); /* KV_DCACHE_OK / OOM / FAIL */
    void (*dev_free)(void *ctx, void *ptr);
    void (*before_free)(void *ctx); /* once before a batch of frees (a stream sync) */
} kv_dcache;

/* The size a request of bytes takes: a multiple of 512 bytes below 1 MiB,
 * of 2 MiB from there; 0 when it cannot be represented. */
static inline size_t kv_dcache_round(size_t bytes)
{
    size_t unit = bytes < KV_DCACHE_LARGE ? KV_DCACHE_SMALL_ROUND : KV_DCACHE_LARGE_ROUND;
    if (bytes == 0)
        return KV_DCACHE_SMALL_ROUND;
    if (bytes > SIZE_MAX - unit)
        return 0;
    return (bytes + unit - 1) / unit * unit;
}

static inline size_t kv_dcache_hash(const void *ptr, size_t capacity)
{
    uint64_t h = (uint64_t)(uintptr_t)ptr >> 8;
    h *= 0x9E3779B97F4A7C15ull;
    return (size_t)(h >> 20) & (capacity - 1);
}

/* The slot holding ptr exactly, or -1. */
static inline long kv_dcache_slot(const kv_dcache *c, const void *ptr)
{
    if (!c->capacity || !ptr)
        return -1;
    for (size_t i = kv_dcache_hash(ptr, c->capacity);; i = (i + 1) & (c->capacity - 1)) {
        if (!c->slots[i].ptr)
            return -1;
        if (c->slots[i].ptr == ptr)
            return (long)i;
    }
}

static inline void kv_dcache_put(kv_dcache_block *slots, size_t capacity, kv_dcache_block b)
{
    size_t i = kv_dcache_hash(b.ptr, capacity);
    while (slots[i].ptr)
        i = (i + 1) & (capacity - 1);
    slots[i] = b;
}

/* Rebuilds the table with capacity slots (at least twice the count). */
static inline int kv_dcache_rehash(kv_dcache *c, size_t capacity)
{
    kv_dcache_block *slots = (kv_dcache_block *)calloc(capacity, sizeof *slots);
    if (!slots)
        return KV_DCACHE_OOM;
    for (size_t i = 0; i < c->capacity; i++)
        if (c->slots[i].ptr)
            kv_dcache_put(slots, capacity, c->slots[i]);
    free(c->slots);
    c->slots = slots;
    c->capacity = capacity;
    return KV_DCACHE_OK;
}

static inline int kv_dcache_insert(kv_dcache *c, kv_dcache_block b)
{
    if ((c->count + 1) * 2 > c->capacity) {
        int rc = kv_dcache_rehash(c, c->capacity ? c->capacity * 2 : 64);
        if (rc != KV_DCACHE_OK)
            return rc;
    }
    kv_dcache_put(c->slots, c->capacity, b);
    c->count++;
    return KV_DCACHE_OK;
}

/* Removes slot i (backward-shift deletion keeps every probe chain whole). */
static inline void kv_dcache_remove_at(kv_dcache *c, size_t i)
{
    size_t mask = c->capacity - 1;
    c->slots[i].ptr = NULL;
    c->count--;
    for (size_t j = (i + 1) & mask; c->slots[j].ptr; j = (j + 1) & mask) {
        size_t home = kv_dcache_hash(c->slots[j].ptr, c->capacity);
        /* the entry at j may move to the hole at i unless its home lies in (i, j] */
        int stays = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (!stays) {
            c->slots[i] = c->slots[j];
            c->slots[j].ptr = NULL;
            i = j;
        }
    }
}

/* The block holding ptr (its start or any byte inside it), or NULL: memory
 * the backend did not allocate, such as a caller's array. */
static inline const kv_dcache_block *kv_dcache_lookup(const kv_dcache *c, const void *ptr)
{
    long i = kv_dcache_slot(c, ptr);
    if (i >= 0)
        return &c->slots[i];
    if (!ptr)
        return NULL;
    const char *p = (const char *)ptr;
    for (size_t j = 0; j < c->capacity; j++) {
        const char *base = (const char *)c->slots[j].ptr;
        if (base && p > base && p < base + c->slots[j].size)
            return &c->slots[j];
    }
    return NULL;
}

static inline void kv_dcache_note_peaks(kv_dcache *c)
{
    if (c->reserved > c->peak_reserved)
        c->peak_reserved = c->reserved;
    if (c->in_use > c->peak_in_use)
        c->peak_in_use = c->in_use;
}

/* Gives the cached blocks back to the device: all of them, or (large_only)
 * those of at least KV_DCACHE_LARGE bytes. */
static inline void kv_dcache_free_cached(kv_dcache *c, int large_only)
{
    if (!c->cached || (large_only && !c->cached_large))
        return;
    c->before_free(c->ctx);
    int removed = 0;
    for (size_t i = 0; i < c->capacity; i++) {
        kv_dcache_block *b = &c->slots[i];
        if (!b->ptr || b->in_use || (large_only && b->size < KV_DCACHE_LARGE))
            continue;
        c->dev_free(c->ctx, b->ptr);
        c->device_frees++;
        c->reserved -= b->size;
        c->cached -= b->size;
        if (b->size >= KV_DCACHE_LARGE)
            c->cached_large -= b->size;
        b->ptr = NULL;
        c->count--;
        removed = 1;
    }
    if (removed) /* the probe chains have holes now: rebuild (same capacity, cannot fail often) */
        if (kv_dcache_rehash(c, c->capacity) != KV_DCACHE_OK) {
            /* no memory for a new table: rebuild in place by reinserting each entry */
            for (size_t i = 0; i < c->capacity; i++) {
                kv_dcache_block b = c->slots[i];
                if (!b.ptr)
                    continue;
                c->slots[i].ptr = NULL;
                kv_dcache_put(c->slots, c->capacity, b);
            }
        }
}

/* A block of at least bytes; bf16 records what it holds. */
static inline int kv_dcache_alloc(kv_dcache *c, size_t bytes, int bf16, void **out)
{
    *out = NULL;
    size_t size = kv_dcache_round(bytes);
    if (!size)
        return KV_DCACHE_OOM;
    for (size_t i = 0; i < c->capacity; i++) {
        kv_dcache_block *b = &c->slots[i];
        if (b->ptr && !b->in_use && b->size == size) {
            b->in_use = 1;
            b->bf16 = (unsigned char)(bf16 != 0);
            c->cached -= size;
            if (size >= KV_DCACHE_LARGE)
                c->cached_large -= size;
            c->in_use += size;
            kv_dcache_note_peaks(c);
            *out = b->ptr;
            return KV_DCACHE_OK;
        }
    }
    if (size >= KV_DCACHE_LARGE && !c->keep_on_miss)
        kv_dcache_free_cached(c, 1);
    /* room in the table first, so that a failure there leaks nothing */
    if ((c->count + 1) * 2 > c->capacity &&
        kv_dcache_rehash(c, c->capacity ? c->capacity * 2 : 64) != KV_DCACHE_OK)
        return KV_DCACHE_OOM;
    void *ptr = NULL;
    int rc = c->dev_malloc(c->ctx, size, &ptr);
    if (rc == KV_DCACHE_OOM && c->cached) {
        kv_dcache_free_cached(c, 0);
        rc = c->dev_malloc(c->ctx, size, &ptr);
    }
    if (rc != KV_DCACHE_OK)
        return rc;
    c->device_allocs++;
    kv_dcache_block b;
    b.ptr = ptr;
    b.size = size;
    b.in_use = 1;
    b.bf16 = (unsigned char)(bf16 != 0);
    kv_dcache_insert(c, b); /* cannot fail: room was made above */
    c->reserved += size;
    c->in_use += size;
    kv_dcache_note_peaks(c);
    *out = ptr;
    return KV_DCACHE_OK;
}

/* Puts a block back in the cache; -1 when ptr is not a block in use. */
static inline int kv_dcache_release(kv_dcache *c, void *ptr)
{
    long i = kv_dcache_slot(c, ptr);
    if (i < 0 || !c->slots[i].in_use)
        return -1;
    kv_dcache_block *b = &c->slots[i];
    b->in_use = 0;
    c->in_use -= b->size;
    c->cached += b->size;
    if (b->size >= KV_DCACHE_LARGE)
        c->cached_large += b->size;
    return 0;
}

/* Gives a block in use back to the device at once (the backend's own
 * buffers, when they grow); -1 when ptr is not a block in use. */
static inline int kv_dcache_drop(kv_dcache *c, void *ptr)
{
    long i = kv_dcache_slot(c, ptr);
    if (i < 0 || !c->slots[i].in_use)
        return -1;
    size_t size = c->slots[i].size;
    c->before_free(c->ctx);
    c->dev_free(c->ctx, ptr);
    c->device_frees++;
    c->reserved -= size;
    c->in_use -= size;
    kv_dcache_remove_at(c, (size_t)i);
    return 0;
}

/* Gives every block back, in use or not, and frees the table. */
static inline void kv_dcache_destroy(kv_dcache *c)
{
    if (c->count)
        c->before_free(c->ctx);
    for (size_t i = 0; i < c->capacity; i++)
        if (c->slots[i].ptr) {
            c->dev_free(c->ctx, c->slots[i].ptr);
            c->device_frees++;
        }
    free(c->slots);
    c->slots = NULL;
    c->capacity = c->count = 0;
    c->reserved = c->in_use = c->cached = c->cached_large = 0;
}

#endif /* KV_DEVICE_CACHE_CUH */
