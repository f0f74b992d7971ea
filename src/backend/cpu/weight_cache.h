/* weight_cache.h — forms of weights (Winograd transforms, bf16 packings)
 * kept from one convolution to the next while the weights do not change.
 *
 * A convolution transforms or packs its weights before it multiplies: F(2x2,
 * 3x3) needs U = G g G^T, the bf16 products need the weights rounded and
 * packed. Frozen networks (LPIPS's VGG16) and weights used more than once
 * between two optimiser steps (the discriminator, the backward's flipped
 * kernels, repeated encodes and decodes) would redo that on every call. So
 * the CPU backend keeps those forms, keyed by the weight tensor's memory,
 * its shape and the form.
 *
 * Correctness rests on one rule: everything that writes backend memory
 * forgets the forms of what it overwrote. The ops that write a tensor that
 * may be a weight (elementwise, optimizer, activation), upload and release
 * call kv_weight_cache_forget for the bytes they write (kv_cpu_wrote in
 * cpu_ops.h). As a net under that rule, each entry also keeps a hash of 64
 * of the weights' values, checked on every hit: a write that bypassed the
 * rule and changed any of them drops the entry instead of using it.
 *
 * A form is stored at its second use with unchanged weights, so weights used
 * once per change (a trained network's forward between two Adam steps, a
 * single decode) cost no memory; the store holds at most budget bytes, first
 * come first served (a cyclic pass over more than that still hits on what
 * fits, where least-recently-used eviction would hit on nothing). Only the
 * calling thread touches the cache, outside parallel regions. */
#ifndef KV_WEIGHT_CACHE_H
#define KV_WEIGHT_CACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef enum kv_weight_form {
    KV_WEIGHT_WINOGRAD,              /* U, 16 x Co x Ci floats */
    KV_WEIGHT_WINOGRAD_FLIPPED,      /* U of the backward's flipped kernel (Ci x Co) */
    KV_WEIGHT_WINOGRAD_BF16,         /* U as 16 packed bf16 A matrices */
    KV_WEIGHT_WINOGRAD_BF16_FLIPPED, /* the same for the flipped kernel */
    KV_WEIGHT_GEMM_BF16              /* the Co x (Ci kh kw) matrix as packed bf16 A */
} kv_weight_form;

typedef struct kv_weight_entry {
    const void *weights; /* the weight tensor's memory, bytes long */
    size_t bytes;
    kv_weight_form form;
    int shape[4];
    void *data; /* the form, data_bytes long; NULL: seen once, not stored */
    size_t data_bytes;
    uint64_t sample; /* hash of 64 of the weights' values when stored */
    int sightings;   /* finds that missed since the weights last changed */
} kv_weight_entry;

typedef struct kv_weight_cache {
    kv_weight_entry *entries;
    int count, capacity;
    size_t stored_bytes, budget;
    bool disabled;                 /* tests compare against a backend without it */
    /* what happened, for tests: hits, forms stored, forms dropped, and of
     * those dropped by a hit whose weights had changed (the net) */
    uint64_t hits, stores, drops, stale;
} kv_weight_cache;

/* The byte budget of a backend's stored forms. */
#define KV_WEIGHT_CACHE_BUDGET ((size_t)256 << 20)

/* The stored form of the weights w (data, bytes, shape), or NULL. A miss
 * records that they were seen in that form. */
const void *kv_weight_cache_find(kv_weight_cache *c, const void *w, size_t bytes,
                                 const int shape[4], kv_weight_form form);

/* After a miss: memory of size bytes for the caller to compute the form
 * into, which later finds return, when the same weights were seen in that
 * form before and the budget allows; else NULL (compute into scratch).
 * The sample hash is taken now, from the weights as they are. */
void *kv_weight_cache_store(kv_weight_cache *c, const void *w, size_t bytes, const int shape[4],
                            kv_weight_form form, size_t size);

/* Drops every entry whose weights overlap [data, data + bytes). */
void kv_weight_cache_forget(kv_weight_cache *c, const void *data, size_t bytes);

/* Frees every stored form and the table. */
void kv_weight_cache_free(kv_weight_cache *c);

#endif
