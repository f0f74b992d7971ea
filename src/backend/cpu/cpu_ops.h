/* cpu_ops.h — the CPU backend's context and its ops, one file per op family
 * (FAMILY.c for each family of src/backend/backend.h, which specifies every
 * op's math). */
#ifndef KV_CPU_OPS_H
#define KV_CPU_OPS_H

#include <cblas.h>

#include "backend/backend.h"
#include "backend/cpu/threadpool.h"
#include "backend/cpu/weight_cache.h"

#define KV_CPU_CACHE_SLOTS 256

typedef struct kv_cpu {
    kv_pool *pool;
    int threads;
    /* One scratch buffer per thread (im2col columns, attention scores),
     * grown by kv_cpu_reserve_scratch before a parallel region starts. */
    float **scratch;
    size_t *scratch_floats;
    /* One buffer all threads read during a parallel region (Winograd's
     * transformed weights; the im2col columns of an image whose bands are
     * split by output channel), filled before the region starts. */
    float *shared;
    size_t shared_floats;
    /* Recently released large blocks, reused by later allocations of about
     * the same size (see cpu_alloc). Touched only by the calling thread.
     * live: bytes of large blocks in use; peak_live: their most since the
     * last trim; kept: live + cached as the last trim left them (what the
     * last call needed). The larger of the two bounds live + cached beyond
     * KV_CPU_CACHE_BYTES. */
    struct kv_cpu_block {
        unsigned char *base;
        size_t total;
        bool kept; /* by the last trim, not used since */
    } cache[KV_CPU_CACHE_SLOTS];
    int cached;
    size_t cached_bytes, live_bytes, peak_live, kept;
    size_t mapped; /* blocks mapped anew, ever (for the tests) */
    /* precision=bf16 on a CPU with AVX512-BF16: convolutions, attention
     * and linear layers multiply bf16 operands with float32 accumulation
     * (bf16_gemm.h); storage stays float32. */
    bool bf16;
    /* Transformed and packed weights kept between calls (weight_cache.h). */
    kv_weight_cache weights;
} kv_cpu;

static inline kv_cpu *kv_cpu_of(kv_backend *be)
{
    return (kv_cpu *)be->ctx;
}

/* Every op that writes a tensor that may hold weights calls this first, so
 * that no stored form of the old values outlives them (weight_cache.h). */
static inline void kv_cpu_wrote(kv_backend *be, const kv_tensor *t)
{
    kv_cpu *cpu = kv_cpu_of(be);
    if (cpu->weights.count > 0)
        kv_weight_cache_forget(&cpu->weights, t->data, kv_tensor_numel(t) * sizeof(float));
}

/* Elementwise ops split their work into chunks of KV_CPU_CHUNK values: a
 * split chosen from the tensor's size alone, never from the thread count,
 * so every value is computed the same way for any number of threads. */
#define KV_CPU_CHUNK 65536

static inline int kv_cpu_chunks(size_t count)
{
    return (int)((count + KV_CPU_CHUNK - 1) / KV_CPU_CHUNK);
}

/* The values [*begin, *end) of chunk task. */
static inline void kv_cpu_chunk_range(size_t count, int task, size_t *begin, size_t *end)
{
    *begin = (size_t)task * KV_CPU_CHUNK;
    *end = KV_MIN(count, *begin + KV_CPU_CHUNK);
}

/* Makes every thread's scratch buffer hold at least floats values. */
klvae_status_t kv_cpu_reserve_scratch(kv_cpu *cpu, size_t floats);
/* Makes the shared buffer hold at least floats values. */
klvae_status_t kv_cpu_reserve_shared(kv_cpu *cpu, size_t floats);

/* Row-major sgemm C = alpha op(A) op(B) + beta C, split over column chunks
 * of C across the pool (chunks chosen from the shape only). */
void kv_cpu_gemm(kv_cpu *cpu, CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int m, int n, int k,
                 float alpha, const float *a, int lda, const float *b, int ldb, float beta,
                 float *c, int ldc);

/* The ops, kv_cpu_NAME for every NAME of KV_BACKEND_OPS (src/backend/backend.h),
 * each in the file of its family. */
#define KV_CPU_DECLARE(family, name, needed_by, params) klvae_status_t kv_cpu_##name params;
KV_BACKEND_OPS(KV_CPU_DECLARE)
#undef KV_CPU_DECLARE

/* y = act(x * s + t) over n values: the group norm's apply step, shared with
 * the convolutions' prologue. */
void kv_cpu_scale_shift_act(const float *x, float *y, size_t n, float s, float t,
                            kv_activation act);

#endif
