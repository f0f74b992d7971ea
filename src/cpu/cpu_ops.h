/* cpu_ops.h — the CPU backend's context and its ops (one file per op
 * family: conv2d.c, group_norm.c, elementwise.c, attention.c,
 * posterior.c). The math of each op is specified in src/backend.h. */
#ifndef KV_CPU_OPS_H
#define KV_CPU_OPS_H

#include "../backend.h"
#include "threadpool.h"

#define KV_CPU_CACHE_SLOTS 16

typedef struct kv_cpu {
    kv_pool *pool;
    int threads;
    /* One scratch buffer per thread (im2col columns, attention scores),
     * grown by kv_cpu_reserve_scratch before a parallel region starts. */
    float **scratch;
    size_t *scratch_floats;
    /* One buffer all threads read during a parallel region (Winograd's
     * transformed weights), filled before the region starts. */
    float *shared;
    size_t shared_floats;
    /* Recently released large blocks, reused by later allocations of about
     * the same size (see cpu_alloc). Touched only by the calling thread. */
    struct kv_cpu_block {
        unsigned char *base;
        size_t total;
    } cache[KV_CPU_CACHE_SLOTS];
    int cached;
    size_t cached_bytes;
} kv_cpu;

static inline kv_cpu *kv_cpu_of(kv_backend *be)
{
    return (kv_cpu *)be->ctx;
}

/* Makes every thread's scratch buffer hold at least floats values. */
klvae_status_t kv_cpu_reserve_scratch(kv_cpu *cpu, size_t floats);
/* Makes the shared buffer hold at least floats values. */
klvae_status_t kv_cpu_reserve_shared(kv_cpu *cpu, size_t floats);

klvae_status_t kv_cpu_conv2d(kv_backend *be, const kv_tensor *x, const kv_conv_prologue *prologue,
                             const kv_tensor *w, const kv_tensor *b, kv_conv_geometry geometry,
                             kv_tensor *y);
klvae_status_t kv_cpu_group_norm_stats(kv_backend *be, const kv_tensor *x, const kv_tensor *gamma,
                                       const kv_tensor *beta, int groups, float eps,
                                       kv_tensor *scale, kv_tensor *shift);
klvae_status_t kv_cpu_group_norm(kv_backend *be, const kv_tensor *x, const kv_tensor *gamma,
                                 const kv_tensor *beta, int groups, float eps, kv_activation act,
                                 kv_tensor *y);
/* y = act(x * s + t) over n values: the group norm's apply step, shared with
 * the convolutions' prologue. */
void kv_cpu_scale_shift_act(const float *x, float *y, size_t n, float s, float t,
                            kv_activation act);
klvae_status_t kv_cpu_add(kv_backend *be, const kv_tensor *a, const kv_tensor *b, kv_tensor *y);
klvae_status_t kv_cpu_upsample_nearest2x(kv_backend *be, const kv_tensor *x, kv_tensor *y);
klvae_status_t kv_cpu_attention(kv_backend *be, const kv_tensor *q, const kv_tensor *k,
                                const kv_tensor *v, float scale, kv_tensor *out);
klvae_status_t kv_cpu_posterior_split(kv_backend *be, const kv_tensor *moments, kv_tensor *mean,
                                      kv_tensor *logvar);
klvae_status_t kv_cpu_gaussian_sample(kv_backend *be, const kv_tensor *mean,
                                      const kv_tensor *logvar, uint64_t seed, kv_tensor *z);

/* Applies an activation to one value (shared by group_norm and tests). */
float kv_cpu_activate(kv_activation act, float x);

#endif
