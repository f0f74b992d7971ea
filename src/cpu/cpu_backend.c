/* cpu_backend.c — the CPU reference backend: memory, threads and the op
 * table. Matrix products go to CBLAS; libklvae parallelises over its own
 * pool of threads, so it asks OpenBLAS (when that is the CBLAS) to stay
 * single-threaded instead of starting a second pool that would fight ours. */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "cpu_ops.h"

/* Present when the CBLAS is OpenBLAS; weak so that any other CBLAS links. */
extern void openblas_set_num_threads(int threads) __attribute__((weak));

/* Allocations at least this big are mapped directly, so that releasing them
 * returns the memory to the system at once and the peak resident size of a
 * forward pass is the peak of what is live, not of the heap's history. */
#define KV_CPU_MMAP_THRESHOLD ((size_t)1 << 20)
#define KV_CPU_HEADER 64 /* keeps data 64-byte aligned */

static klvae_status_t cpu_alloc(kv_backend *be, size_t bytes, void **out)
{
    (void)be;
    size_t total;
    *out = NULL;
    if (!kv_add_size(bytes, KV_CPU_HEADER, &total))
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "allocation of %zu bytes is too large", bytes);
    unsigned char *base;
    if (total >= KV_CPU_MMAP_THRESHOLD) {
        base = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (base == MAP_FAILED)
            base = NULL;
    } else {
        void *p = NULL;
        base = posix_memalign(&p, KV_CPU_HEADER, total) == 0 ? p : NULL;
    }
    if (!base)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory allocating %zu bytes", bytes);
    memcpy(base, &total, sizeof total);
    *out = base + KV_CPU_HEADER;
    return KLVAE_OK;
}

static void cpu_release(kv_backend *be, void *ptr)
{
    (void)be;
    if (!ptr)
        return;
    unsigned char *base = (unsigned char *)ptr - KV_CPU_HEADER;
    size_t total;
    memcpy(&total, base, sizeof total);
    if (total >= KV_CPU_MMAP_THRESHOLD)
        munmap(base, total);
    else
        free(base);
}

static klvae_status_t cpu_upload(kv_backend *be, void *dst, const float *src, size_t count)
{
    (void)be;
    if (dst != src)
        memmove(dst, src, count * sizeof(float));
    return KLVAE_OK;
}

static klvae_status_t cpu_download(kv_backend *be, float *dst, const void *src, size_t count)
{
    (void)be;
    if (dst != src)
        memmove(dst, src, count * sizeof(float));
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

static void cpu_destroy(kv_backend *be)
{
    kv_cpu *cpu = kv_cpu_of(be);
    if (cpu) {
        kv_pool_free(cpu->pool);
        if (cpu->scratch)
            for (int t = 0; t < cpu->threads; t++)
                free(cpu->scratch[t]);
        free(cpu->scratch);
        free(cpu->scratch_floats);
        free(cpu->shared);
        free(cpu);
    }
    free(be);
}

static const kv_backend_ops cpu_ops = {
    .name = "cpu",
    .destroy = cpu_destroy,
    .alloc = cpu_alloc,
    .release = cpu_release,
    .upload = cpu_upload,
    .download = cpu_download,
    .conv2d = kv_cpu_conv2d,
    .group_norm = kv_cpu_group_norm,
    .add = kv_cpu_add,
    .upsample_nearest2x = kv_cpu_upsample_nearest2x,
    .attention = kv_cpu_attention,
    .posterior_split = kv_cpu_posterior_split,
    .gaussian_sample = kv_cpu_gaussian_sample,
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
    cpu->scratch = calloc((size_t)cpu->threads, sizeof *cpu->scratch);
    cpu->scratch_floats = calloc((size_t)cpu->threads, sizeof *cpu->scratch_floats);
    if (!cpu->scratch || !cpu->scratch_floats) {
        cpu_destroy(be);
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory creating the CPU backend");
    }
    cpu->pool = kv_pool_create(cpu->threads);
    if (!cpu->pool) {
        cpu_destroy(be);
        return KLVAE_ERR_OUT_OF_MEMORY;
    }
    if (openblas_set_num_threads)
        openblas_set_num_threads(1);
    *out = be;
    return KLVAE_OK;
}
