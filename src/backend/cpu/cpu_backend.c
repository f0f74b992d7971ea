/* cpu_backend.c — the CPU reference backend: memory, threads and the op
 * table. Matrix products go to CBLAS; libklvae parallelises over its own
 * pool of threads, so it asks OpenBLAS (when that is the CBLAS) to stay
 * single-threaded instead of starting a second pool that would fight ours. */
#include <cblas.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "backend/cpu/bf16_gemm.h"
#include "backend/cpu/cpu_ops.h"

/* Present when the CBLAS is OpenBLAS; weak so that any other CBLAS links. */
extern void openblas_set_num_threads(int threads) __attribute__((weak));

/* Allocations at least this big are mapped directly, so that releasing them
 * can return the memory to the system and the peak resident size of a
 * forward pass is the peak of what is live, not of the heap's history. */
#define KV_CPU_MMAP_THRESHOLD ((size_t)1 << 20)
#define KV_CPU_HEADER 64 /* keeps data 64-byte aligned */
/* A forward pass releases and allocates tensors of the same few sizes over
 * and over; a fresh mapping costs a page fault and a zeroed page per 4 KB on
 * first touch, which made the memory-bound passes (group norm) twice as
 * slow. So released blocks wait in a cache: up to this many bytes always,
 * and beyond it as long as the blocks in use and in the cache together stay
 * within the most that was in use since the last trim (so the cache never
 * raises the peak by more than this). A training step allocates what the
 * last one released: between steps (the trainer trims when it is freed)
 * the whole step's memory is reused, without the kernel zeroing it again,
 * which was 13% of an SD training step at 256^2. cpu_trim(keep), at the
 * end of every API call, leaves the cache as that bound left it, so that
 * the next call of the same size maps nothing new either (page faults were
 * 10-12% of a 256^2 encode or decode), and what it keeps (in use + cached)
 * bounds the cache until the next trim as the peak does; cpu_trim(!keep)
 * empties it (option keep_memory=false, a trainer that is freed). */
#define KV_CPU_CACHE_BYTES ((size_t)256 << 20)

static void cache_evict_largest(kv_cpu *cpu);

/* Evicts the largest cached blocks until the cache fits its bytes' bound
 * (cpu_release makes room in the slots before it adds a block). */
static void cache_fit(kv_cpu *cpu)
{
    const size_t bound = KV_MAX(cpu->peak_live, cpu->kept);
    while (cpu->cached > 0 && cpu->cached_bytes > KV_CPU_CACHE_BYTES &&
           cpu->live_bytes + cpu->cached_bytes > bound)
        cache_evict_largest(cpu);
}

/* The largest cached block (of those the last trim kept, when only_kept),
 * or -1. */
static int cache_largest(const kv_cpu *cpu, bool only_kept)
{
    int largest = -1;
    for (int i = 0; i < cpu->cached; i++)
        if ((!only_kept || cpu->cache[i].kept) &&
            (largest < 0 || cpu->cache[i].total > cpu->cache[largest].total))
            largest = i;
    return largest;
}

static void cache_evict(kv_cpu *cpu, int i)
{
    munmap(cpu->cache[i].base, cpu->cache[i].total);
    cpu->cached_bytes -= cpu->cache[i].total;
    cpu->cache[i] = cpu->cache[--cpu->cached];
}

static void cache_evict_largest(kv_cpu *cpu)
{
    cache_evict(cpu, cache_largest(cpu, false));
}

/* Before a block of total bytes is mapped anew: blocks the last call kept
 * and this one has not used go (the largest first) rather than let in use +
 * cached pass the bound, so that what a call of other sizes does not use
 * does not stay beside it. */
static void cache_evict_kept(kv_cpu *cpu, size_t total)
{
    const size_t bound = KV_MAX(cpu->peak_live, cpu->kept);
    int largest;
    while (cpu->live_bytes + cpu->cached_bytes + total > bound &&
           (largest = cache_largest(cpu, true)) >= 0)
        cache_evict(cpu, largest);
}

/* A cached block of total bytes or up to a quarter more, or NULL. */
static unsigned char *cache_take(kv_cpu *cpu, size_t total)
{
    int best = -1;
    for (int i = 0; i < cpu->cached; i++) {
        size_t size = cpu->cache[i].total;
        if (size >= total && size - total <= total / 4 &&
            (best < 0 || size < cpu->cache[best].total))
            best = i;
    }
    if (best < 0)
        return NULL;
    unsigned char *base = cpu->cache[best].base;
    size_t size = cpu->cache[best].total;
    cpu->cached_bytes -= size;
    cpu->cache[best] = cpu->cache[--cpu->cached];
    memcpy(base, &size, sizeof size); /* the block keeps its own size */
    return base;
}

static klvae_status_t cpu_alloc(kv_backend *be, size_t bytes, kv_storage storage, void **out)
{
    (void)storage; /* the CPU computes and stores in float32 */
    kv_cpu *cpu = kv_cpu_of(be);
    size_t total;
    *out = NULL;
    if (!kv_add_size(bytes, KV_CPU_HEADER, &total))
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "allocation of %zu bytes is too large", bytes);
    unsigned char *base = NULL;
    if (total >= KV_CPU_MMAP_THRESHOLD) {
        base = cache_take(cpu, total);
        if (!base) {
            cache_evict_kept(cpu, total);
            base = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (base == MAP_FAILED)
                base = NULL;
            if (base) {
                memcpy(base, &total, sizeof total);
                cpu->mapped++;
            }
        }
        if (base) {
            memcpy(&total, base, sizeof total); /* a cached block may be larger */
            cpu->live_bytes += total;
            if (cpu->live_bytes > cpu->peak_live)
                cpu->peak_live = cpu->live_bytes;
            cache_fit(cpu);
        }
    } else {
        void *p = NULL;
        base = posix_memalign(&p, KV_CPU_HEADER, total) == 0 ? p : NULL;
        if (base)
            memcpy(base, &total, sizeof total);
    }
    if (!base)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory allocating %zu bytes", bytes);
    *out = base + KV_CPU_HEADER;
    return KLVAE_OK;
}

static void cpu_release(kv_backend *be, void *ptr)
{
    kv_cpu *cpu = kv_cpu_of(be);
    if (!ptr)
        return;
    unsigned char *base = (unsigned char *)ptr - KV_CPU_HEADER;
    size_t total;
    memcpy(&total, base, sizeof total);
    /* the memory may come back as another tensor: no form of its old
     * contents may be found there */
    if (cpu->weights.count > 0)
        kv_weight_cache_forget(&cpu->weights, ptr, total - KV_CPU_HEADER);
    if (total < KV_CPU_MMAP_THRESHOLD) {
        free(base);
        return;
    }
    cpu->live_bytes -= total;
    if (cpu->cached == KV_CPU_CACHE_SLOTS)
        cache_evict_largest(cpu);
    cpu->cache[cpu->cached].base = base;
    cpu->cache[cpu->cached].total = total;
    cpu->cache[cpu->cached].kept = false;
    cpu->cached++;
    cpu->cached_bytes += total;
    cache_fit(cpu);
}

/* The cache within the bound of the peak since the last trim (keep: the
 * cache_fit rule, so the call's blocks of every size stay even where sizes
 * that were never in use together add up beyond the peak, up to 256 MB), or
 * empty; then the next call's bound starts. */
static void cpu_trim(kv_backend *be, bool keep)
{
    kv_cpu *cpu = kv_cpu_of(be);
    if (keep) {
        cpu->kept = 0;
        cache_fit(cpu);
        for (int i = 0; i < cpu->cached; i++)
            cpu->cache[i].kept = true;
    } else {
        while (cpu->cached > 0)
            cache_evict_largest(cpu);
    }
    cpu->kept = cpu->live_bytes + cpu->cached_bytes;
    cpu->peak_live = cpu->live_bytes;
}

static klvae_status_t cpu_upload(kv_backend *be, kv_tensor *dst, const float *src)
{
    /* also when the data is already in place (written directly into host
     * memory, as weight loading does): the upload says it changed */
    kv_cpu_wrote(be, dst);
    if (dst->data != src)
        memmove(dst->data, src, kv_tensor_numel(dst) * sizeof(float));
    return KLVAE_OK;
}

static klvae_status_t cpu_download(kv_backend *be, float *dst, const kv_tensor *src)
{
    (void)be;
    if (dst != src->data)
        memmove(dst, src->data, kv_tensor_numel(src) * sizeof(float));
    return KLVAE_OK;
}

klvae_status_t kv_cpu_reserve_scratch(kv_cpu *cpu, size_t floats)
{
    for (int t = 0; t < cpu->threads; t++) {
        if (cpu->scratch_floats[t] >= floats)
            continue;
        size_t bytes;
        if (!kv_mul_size(floats, sizeof(float), &bytes))
            return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "scratch buffer of %zu floats is too large",
                            floats);
        void *p = NULL;
        if (posix_memalign(&p, 64, bytes) != 0)
            return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory allocating a %zu-byte scratch buffer",
                            bytes);
        free(cpu->scratch[t]);
        cpu->scratch[t] = p;
        cpu->scratch_floats[t] = floats;
    }
    return KLVAE_OK;
}

klvae_status_t kv_cpu_reserve_shared(kv_cpu *cpu, size_t floats)
{
    if (cpu->shared_floats >= floats)
        return KLVAE_OK;
    size_t bytes;
    void *p = NULL;
    if (!kv_mul_size(floats, sizeof(float), &bytes) || posix_memalign(&p, 64, bytes) != 0)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory allocating %zu floats of scratch",
                        floats);
    free(cpu->shared);
    cpu->shared = p;
    cpu->shared_floats = floats;
    return KLVAE_OK;
}

typedef struct gemm_job {
    CBLAS_TRANSPOSE ta, tb;
    int m, n, k, chunk;
    float alpha, beta;
    const float *a, *b;
    int lda, ldb, ldc;
    float *c;
} gemm_job;

static void gemm_task(void *arg, int task, int thread)
{
    (void)thread;
    const gemm_job *j = arg;
    int n0 = task * j->chunk, n1 = KV_MIN(j->n, n0 + j->chunk);
    const float *b = j->tb == CblasNoTrans ? j->b + n0 : j->b + (size_t)n0 * j->ldb;
    cblas_sgemm(CblasRowMajor, j->ta, j->tb, j->m, n1 - n0, j->k, j->alpha, j->a, j->lda, b,
                j->ldb, j->beta, j->c + n0, j->ldc);
}

void kv_cpu_gemm(kv_cpu *cpu, CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int m, int n, int k,
                 float alpha, const float *a, int lda, const float *b, int ldb, float beta,
                 float *c, int ldc)
{
    /* Column chunks of at least 64, at most 16 of them: sized from the shape
     * only, so the result does not depend on the thread count. */
    int chunks = KV_MAX(1, KV_MIN(16, n / 64));
    gemm_job j = {ta, tb, m, n, k, (n + chunks - 1) / chunks, alpha, beta, a, b, lda, ldb, ldc, c};
    kv_pool_run(cpu->pool, chunks, gemm_task, &j);
}

static void cpu_destroy(kv_backend *be)
{
    kv_cpu *cpu = kv_cpu_of(be);
    if (cpu) {
        cpu_trim(be, false);
        kv_pool_free(cpu->pool);
        if (cpu->scratch)
            for (int t = 0; t < cpu->threads; t++)
                free(cpu->scratch[t]);
        free(cpu->scratch);
        free(cpu->scratch_floats);
        free(cpu->shared);
        kv_weight_cache_free(&cpu->weights);
        free(cpu);
    }
    free(be);
}

static const kv_backend_ops cpu_ops = {
    .name = "cpu",
    .destroy = cpu_destroy,
    .alloc = cpu_alloc,
    .release = cpu_release,
    .trim = cpu_trim,
    .upload = cpu_upload,
    .download = cpu_download,
#define KV_CPU_OP(family, name, needed_by, params) .name = kv_cpu_##name,
    KV_BACKEND_OPS(KV_CPU_OP)
#undef KV_CPU_OP
};

klvae_status_t kv_cpu_backend_create(const kv_backend_settings *settings, kv_backend **out)
{
    *out = NULL;
    kv_backend *be = calloc(1, sizeof *be);
    kv_cpu *cpu = calloc(1, sizeof *cpu);
    if (!be || !cpu) {
        free(be);
        free(cpu);
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory creating the CPU backend");
    }
    be->ops = &cpu_ops;
    be->ctx = cpu;
    be->host_memory = true;
    cpu->threads = settings->threads > 0 ? settings->threads : kv_cpu_count();
    cpu->bf16 = settings->precision == KV_PRECISION_BF16 && kv_bf16_available(NULL, 0);
    cpu->weights.budget = KV_WEIGHT_CACHE_BUDGET;
    cpu->scratch = calloc((size_t)cpu->threads, sizeof *cpu->scratch);
    cpu->scratch_floats = calloc((size_t)cpu->threads, sizeof *cpu->scratch_floats);
    if (!cpu->scratch || !cpu->scratch_floats) {
        cpu_destroy(be);
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory creating the CPU backend");
    }
    cpu->pool = kv_pool_create(cpu->threads);
    if (!cpu->pool) {
        cpu_destroy(be);
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "cannot start %d worker threads", cpu->threads);
    }
    if (openblas_set_num_threads)
        openblas_set_num_threads(1);
    *out = be;
    return KLVAE_OK;
}
