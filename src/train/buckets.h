/* buckets.h — the gradient buckets of data-parallel training: which of a
 * network's gradients are summed over the ranks together, and when.
 *
 * The backward writes a network's parameter gradients one after another,
 * in the same order in every step. The first backward records that order
 * (and everything is summed at its end); from then on the gradients are
 * grouped, in that order, into buckets of about cap bytes (a larger
 * gradient makes a bucket alone), and bucket b is launched as soon as the
 * backward has written all of its gradients and buckets 0 .. b-1 are
 * launched. So the sum of one bucket runs while the backward computes the
 * layers before it, and every rank launches the same buckets in the same
 * order, as collectives need (the ranks run the same code).
 *
 * Pure bookkeeping on indices: tests/test_buckets.c checks it without a
 * communicator; src/train/dp.c launches the buckets. */
#ifndef KV_BUCKETS_H
#define KV_BUCKETS_H

#include "base/common.h"

typedef struct kv_buckets {
    size_t params;   /* gradients 0 .. params - 1 of the network */
    size_t *bytes;   /* per gradient */
    bool *use;       /* per gradient: summed at all (frozen ones are not) */
    size_t cap;      /* bytes a bucket aims at */
    bool planned;    /* false until the first backward has ended */
    size_t *order;   /* the gradients summed, in the order the backward writes them */
    size_t recorded; /* while not planned: how many of order the backward wrote */
    size_t count;    /* buckets (once planned) */
    size_t *start;   /* bucket b is order[start[b] .. start[b + 1]) */
    size_t *bucket_of;
    size_t *pending; /* per bucket: gradients not written yet in this backward */
    bool *written;   /* per gradient, in this backward */
    size_t next;     /* the first bucket not launched in this backward */
} kv_buckets;

/* For a network of params gradients of bytes[p] bytes each, of which use[p]
 * are summed (use NULL: all). Errors: KLVAE_ERR_INVALID_ARGUMENT (cap 0),
 * KLVAE_ERR_OUT_OF_MEMORY. */
klvae_status_t kv_buckets_init(kv_buckets *b, size_t params, const size_t *bytes,
                               const bool *use, size_t cap);
void kv_buckets_free(kv_buckets *b);

/* A new backward: nothing written, nothing launched. */
void kv_buckets_begin(kv_buckets *b);

/* The backward has written gradient p. Writing it again is harmless until
 * its bucket is launched, and then a bug (the sum would race with the
 * write): KLVAE_ERR_INTERNAL. Gradients that are not summed are ignored. */
klvae_status_t kv_buckets_written(kv_buckets *b, size_t p);

/* The next bucket to launch, if there is one: true with *bucket, which then
 * counts as launched. With at_end (the backward is over) every bucket not
 * launched yet is, in order, written or not; at the end of the first
 * backward the buckets are planned first, from the recorded order (then the
 * summed gradients it never wrote, by index). */
bool kv_buckets_next(kv_buckets *b, bool at_end, size_t *bucket);

/* Bucket k's gradients: b->order[kv_buckets_first(b, k) .. + kv_buckets_size(b, k)). */
static inline size_t kv_buckets_first(const kv_buckets *b, size_t k)
{
    return b->start[k];
}

static inline size_t kv_buckets_size(const kv_buckets *b, size_t k)
{
    return b->start[k + 1] - b->start[k];
}

#endif
