/* weight_cache.c — see weight_cache.h. */
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/weight_cache.h"

#define KV_WEIGHT_SAMPLES 64

/* FNV-1a over 64 words spread evenly over the weights (all of them when
 * there are fewer), and the byte count. */
static uint64_t sample_hash(const void *w, size_t bytes)
{
    const unsigned char *p = w;
    const size_t words = bytes / 4;
    uint64_t h = 1469598103934665603ull ^ bytes;
    for (size_t i = 0; i < KV_WEIGHT_SAMPLES && i < words; i++) {
        size_t at = words <= KV_WEIGHT_SAMPLES ? i : i * (words - 1) / (KV_WEIGHT_SAMPLES - 1);
        uint32_t v;
        memcpy(&v, p + at * 4, 4);
        h = (h ^ v) * 1099511628211ull;
    }
    return h;
}

static kv_weight_entry *lookup(kv_weight_cache *c, const void *w, size_t bytes,
                               const int shape[4], kv_weight_form form)
{
    for (int i = 0; i < c->count; i++) {
        kv_weight_entry *e = &c->entries[i];
        if (e->weights == w && e->bytes == bytes && e->form == form &&
            memcmp(e->shape, shape, sizeof e->shape) == 0)
            return e;
    }
    return NULL;
}

static void drop(kv_weight_cache *c, int i)
{
    kv_weight_entry *e = &c->entries[i];
    if (e->data) {
        free(e->data);
        c->stored_bytes -= e->data_bytes;
        c->drops++;
    }
    *e = c->entries[--c->count];
}

const void *kv_weight_cache_find(kv_weight_cache *c, const void *w, size_t bytes,
                                 const int shape[4], kv_weight_form form)
{
    if (c->disabled)
        return NULL;
    kv_weight_entry *e = lookup(c, w, bytes, shape, form);
    if (e && e->data) {
        if (sample_hash(w, bytes) == e->sample) {
            c->hits++;
            return e->data;
        }
        drop(c, (int)(e - c->entries)); /* written behind the cache's back */
        c->stale++;
        e = NULL;
    }
    if (e) {
        e->sightings++;
        return NULL;
    }
    if (c->count == c->capacity) { /* record the sighting; no room is no harm */
        int capacity = c->capacity ? 2 * c->capacity : 64;
        kv_weight_entry *grown = realloc(c->entries, (size_t)capacity * sizeof *grown);
        if (!grown)
            return NULL;
        c->entries = grown;
        c->capacity = capacity;
    }
    e = &c->entries[c->count++];
    memset(e, 0, sizeof *e);
    e->weights = w;
    e->bytes = bytes;
    e->form = form;
    memcpy(e->shape, shape, sizeof e->shape);
    e->sightings = 1;
    return NULL;
}

void *kv_weight_cache_store(kv_weight_cache *c, const void *w, size_t bytes, const int shape[4],
                            kv_weight_form form, size_t size)
{
    if (c->disabled)
        return NULL;
    kv_weight_entry *e = lookup(c, w, bytes, shape, form);
    /* stored at the second sighting: weights used once per change cost
     * nothing */
    if (!e || e->data || e->sightings < 2 || size > c->budget - c->stored_bytes)
        return NULL;
    void *data = NULL;
    if (posix_memalign(&data, 64, size) != 0)
        return NULL;
    e->data = data;
    e->data_bytes = size;
    e->sample = sample_hash(w, bytes);
    c->stored_bytes += size;
    c->stores++;
    return data;
}

void kv_weight_cache_forget(kv_weight_cache *c, const void *data, size_t bytes)
{
    const unsigned char *lo = data, *hi = lo + bytes;
    for (int i = c->count - 1; i >= 0; i--) {
        const unsigned char *w = c->entries[i].weights;
        if (w < hi && lo < w + c->entries[i].bytes)
            drop(c, i);
    }
}

void kv_weight_cache_free(kv_weight_cache *c)
{
    for (int i = 0; i < c->count; i++)
        free(c->entries[i].data);
    free(c->entries);
    memset(c, 0, sizeof *c);
}
