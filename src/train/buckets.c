/* buckets.c — see buckets.h. */
#include <stdlib.h>
#include <string.h>

#include "train/buckets.h"

void kv_buckets_free(kv_buckets *b)
{
    free(b->bytes);
    free(b->use);
    free(b->order);
    free(b->start);
    free(b->bucket_of);
    free(b->pending);
    free(b->written);
    memset(b, 0, sizeof *b);
}

klvae_status_t kv_buckets_init(kv_buckets *b, size_t params, const size_t *bytes,
                               const bool *use, size_t cap)
{
    memset(b, 0, sizeof *b);
    if (cap == 0)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "gradient buckets of 0 bytes");
    const size_t n = params ? params : 1;
    b->params = params;
    b->cap = cap;
    b->bytes = malloc(n * sizeof *b->bytes);
    b->use = malloc(n * sizeof *b->use);
    b->order = malloc(n * sizeof *b->order);
    b->start = malloc((n + 1) * sizeof *b->start);
    b->bucket_of = malloc(n * sizeof *b->bucket_of);
    b->pending = malloc(n * sizeof *b->pending);
    b->written = malloc(n * sizeof *b->written);
    if (!b->bytes || !b->use || !b->order || !b->start || !b->bucket_of || !b->pending ||
        !b->written) {
        kv_buckets_free(b);
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory planning gradient buckets");
    }
    for (size_t p = 0; p < params; p++) {
        b->bytes[p] = bytes[p];
        b->use[p] = use ? use[p] : true;
    }
    kv_buckets_begin(b);
    return KLVAE_OK;
}

void kv_buckets_begin(kv_buckets *b)
{
    b->next = 0;
    if (!b->planned)
        b->recorded = 0;
    for (size_t p = 0; p < b->params; p++)
        b->written[p] = false;
    for (size_t k = 0; b->planned && k < b->count; k++)
        b->pending[k] = kv_buckets_size(b, k);
}

klvae_status_t kv_buckets_written(kv_buckets *b, size_t p)
{
    if (p >= b->params || !b->use[p])
        return KLVAE_OK;
    if (b->written[p]) {
        if (b->planned && b->bucket_of[p] < b->next)
            return kv_error(KLVAE_ERR_INTERNAL,
                            "gradient %zu written again after its bucket's sum started", p);
        return KLVAE_OK;
    }
    b->written[p] = true;
    if (b->planned)
        b->pending[b->bucket_of[p]]--;
    else
        b->order[b->recorded++] = p;
    return KLVAE_OK;
}

/* The buckets from the recorded order: consecutive gradients while they
 * fit in cap bytes. */
static void plan(kv_buckets *b)
{
    size_t n = b->recorded;
    for (size_t p = 0; p < b->params; p++) /* summed but never written: last */
        if (b->use[p] && !b->written[p])
            b->order[n++] = p;
    b->count = 0;
    size_t filled = 0;
    for (size_t i = 0; i < n; i++) {
        const size_t bytes = b->bytes[b->order[i]];
        if (i == 0 || filled + bytes > b->cap) {
            b->start[b->count++] = i;
            filled = 0;
        }
        filled += bytes;
        b->bucket_of[b->order[i]] = b->count - 1;
    }
    b->start[b->count] = n;
    b->planned = true;
    for (size_t k = 0; k < b->count; k++) { /* as if this backward had been planned */
        b->pending[k] = 0;
        for (size_t i = b->start[k]; i < b->start[k + 1]; i++)
            b->pending[k] += !b->written[b->order[i]];
    }
}

bool kv_buckets_next(kv_buckets *b, bool at_end, size_t *bucket)
{
    if (!b->planned) {
        if (!at_end)
            return false; /* the first backward only records */
        plan(b);
    }
    if (b->next >= b->count || (!at_end && b->pending[b->next] != 0))
        return false;
    *bucket = b->next++;
    return true;
}
