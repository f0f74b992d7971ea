/* tensor_table.cuh — what the CUDA backend knows about each block of device
 * memory it handed out: its size and its dtype. Plain C, so
 * tests/test_cuda_host.c checks it on the CPU.
 *
 * Memory itself comes from a stream-ordered pool (cudaMallocFromPoolAsync on
 * the backend's stream, memory.cu): a block released by one op is reused by
 * the next without any synchronisation, small blocks share the pool's large
 * ones (no rounding of each weight to 2 MiB), and repeated calls of the same
 * shape take no new device memory. The core asks for every tensor as float32
 * bytes; in bf16 mode the backend stores its compute tensors as bf16 and the
 * core's KV_STORAGE_FLOAT32 blocks as float32, so each op looks an operand's
 * dtype up by its pointer here. The table also counts the bytes in use and
 * their peak, which trim keeps in the pool for the next call.
 *
 * An open-addressed hash table keyed by the block's address, with backward
 * shift deletion, so lookups of the exact pointer (every tensor the core
 * passes) are O(1); a pointer inside a block is found by a scan. */
#ifndef KV_TENSOR_TABLE_CUH
#define KV_TENSOR_TABLE_CUH

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct kv_block_info {
    void *ptr; /* NULL: an empty slot */
    size_t bytes;
    unsigned char bf16; /* elements are bf16 (else float32) */
} kv_block_info;

typedef struct kv_tensor_table {
    kv_block_info *slots;
    size_t capacity; /* a power of two, or 0 */
    size_t count;
    size_t in_use, peak; /* bytes handed out, now and at most since the last reset */
} kv_tensor_table;

static inline size_t kv_ttable_hash(const void *ptr, size_t capacity)
{
    uint64_t h = (uint64_t)(uintptr_t)ptr >> 8;
    h *= 0x9E3779B97F4A7C15ull;
    return (size_t)(h >> 20) & (capacity - 1);
}

static inline long kv_ttable_slot(const kv_tensor_table *t, const void *ptr)
{
    if (!t->capacity || !ptr)
        return -1;
    for (size_t i = kv_ttable_hash(ptr, t->capacity);; i = (i + 1) & (t->capacity - 1)) {
        if (!t->slots[i].ptr)
            return -1;
        if (t->slots[i].ptr == ptr)
            return (long)i;
    }
}

static inline void kv_ttable_put(kv_block_info *slots, size_t capacity, kv_block_info b)
{
    size_t i = kv_ttable_hash(b.ptr, capacity);
    while (slots[i].ptr)
        i = (i + 1) & (capacity - 1);
    slots[i] = b;
}

/* Records a block; 0, or -1 when the table cannot grow (out of host memory). */
static inline int kv_ttable_insert(kv_tensor_table *t, kv_block_info b)
{
    if ((t->count + 1) * 2 > t->capacity) {
        size_t capacity = t->capacity ? t->capacity * 2 : 64;
        kv_block_info *slots = (kv_block_info *)calloc(capacity, sizeof *slots);
        if (!slots)
            return -1;
        for (size_t i = 0; i < t->capacity; i++)
            if (t->slots[i].ptr)
                kv_ttable_put(slots, capacity, t->slots[i]);
        free(t->slots);
        t->slots = slots;
        t->capacity = capacity;
    }
    kv_ttable_put(t->slots, t->capacity, b);
    t->count++;
    t->in_use += b.bytes;
    if (t->in_use > t->peak)
        t->peak = t->in_use;
    return 0;
}

/* Forgets the block at ptr and returns its size; 0 when ptr is not one. */
static inline size_t kv_ttable_remove(kv_tensor_table *t, const void *ptr)
{
    long found = kv_ttable_slot(t, ptr);
    if (found < 0)
        return 0;
    size_t i = (size_t)found, mask = t->capacity - 1, bytes = t->slots[i].bytes;
    t->slots[i].ptr = NULL;
    t->count--;
    t->in_use -= bytes;
    /* backward shift: an entry may move to the hole unless its home lies in (i, j] */
    for (size_t j = (i + 1) & mask; t->slots[j].ptr; j = (j + 1) & mask) {
        size_t home = kv_ttable_hash(t->slots[j].ptr, t->capacity);
        int stays = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (!stays) {
            t->slots[i] = t->slots[j];
            t->slots[j].ptr = NULL;
            i = j;
        }
    }
    return bytes;
}

/* The block holding ptr (its start or any byte inside it), or NULL: memory
 * the backend did not hand out. */
static inline const kv_block_info *kv_ttable_find(const kv_tensor_table *t, const void *ptr)
{
    long i = kv_ttable_slot(t, ptr);
    if (i >= 0)
        return &t->slots[i];
    if (!ptr)
        return NULL;
    const char *p = (const char *)ptr;
    for (size_t j = 0; j < t->capacity; j++) {
        const char *base = (const char *)t->slots[j].ptr;
        if (base && p > base && p < base + t->slots[j].bytes)
            return &t->slots[j];
    }
    return NULL;
}

static inline void kv_ttable_free(kv_tensor_table *t)
{
    free(t->slots);
    memset(t, 0, sizeof *t);
}

#endif /* KV_TENSOR_TABLE_CUH */
