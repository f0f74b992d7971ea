/* cpu_ops.h — the CPU backend's context and its ops (one file per op
 * family: conv2d.c, group_norm.c, elementwise.c, attention.c,
 * posterior.c). The math of each op is specified in src/backend/backend.h. */
#ifndef KV_CPU_OPS_H
#define KV_CPU_OPS_H

#include <cblas.h>

#include "backend/backend.h"
#include "backend/cpu/threadpool.h"

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

/* Row-major sgemm C = alpha op(A) op(B) + beta C, split over column chunks
 * of C across the pool (chunks chosen from the shape only). */
void kv_cpu_gemm(kv_cpu *cpu, CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int m, int n, int k,
                 float alpha, const float *a, int lda, const float *b, int ldb, float beta,
                 float *c, int ldc);

klvae_status_t kv_cpu_conv2d_backward_data(kv_backend *be, const kv_tensor *dy, const kv_tensor *w,
                                           kv_conv_geometry g, kv_tensor *dx);
klvae_status_t kv_cpu_conv2d_backward_weight(kv_backend *be, const kv_tensor *x,
                                             const kv_conv_prologue *prologue,
                                             const kv_tensor *dy, kv_conv_geometry g,
                                             kv_tensor *dw, kv_tensor *db);
klvae_status_t kv_cpu_attention_backward(kv_backend *be, const kv_tensor *q, const kv_tensor *k,
                                         const kv_tensor *v, float scale, const kv_tensor *dout,
                                         kv_tensor *dq, kv_tensor *dk, kv_tensor *dv);
klvae_status_t kv_cpu_upsample_nearest2x_backward(kv_backend *be, const kv_tensor *dy,
                                                  kv_tensor *dx);
klvae_status_t kv_cpu_activation(kv_backend *be, const kv_tensor *x, kv_activation act,
                                 kv_tensor *y);
klvae_status_t kv_cpu_activation_backward(kv_backend *be, const kv_tensor *y,
                                          const kv_tensor *dy, kv_activation act, kv_tensor *dx);
klvae_status_t kv_cpu_channel_affine(kv_backend *be, const kv_tensor *x, const float *a,
                                     const float *b, kv_tensor *y);
klvae_status_t kv_cpu_max_pool2x2(kv_backend *be, const kv_tensor *x, kv_tensor *y);
klvae_status_t kv_cpu_max_pool2x2_backward(kv_backend *be, const kv_tensor *x,
                                           const kv_tensor *dy, kv_tensor *dx);
klvae_status_t kv_cpu_unit_normalize(kv_backend *be, const kv_tensor *x, kv_tensor *y,
                                     kv_tensor *norms);
klvae_status_t kv_cpu_unit_normalize_backward(kv_backend *be, const kv_tensor *x,
                                              const kv_tensor *norms, const kv_tensor *dy,
                                              kv_tensor *dx);
klvae_status_t kv_cpu_lpips_distance(kv_backend *be, const kv_tensor *a, const kv_tensor *b,
                                     const kv_tensor *w, float dropout, uint64_t dropout_seed,
                                     double *values, const float *grad_scale, kv_tensor *db);
klvae_status_t kv_cpu_batch_norm(kv_backend *be, const kv_tensor *x, const kv_tensor *gamma,
                                 const kv_tensor *beta, float eps, float momentum,
                                 float *running_mean, float *running_var, kv_tensor *y,
                                 kv_tensor *mean, kv_tensor *invstd);
klvae_status_t kv_cpu_batch_norm_backward(kv_backend *be, const kv_tensor *x,
                                          const kv_tensor *gamma, const kv_tensor *mean,
                                          const kv_tensor *invstd, const kv_tensor *dy,
                                          kv_tensor *dx, kv_tensor *dgamma, kv_tensor *dbeta);
klvae_status_t kv_cpu_pixel_loss(kv_backend *be, const kv_tensor *x, const kv_tensor *xhat,
                                 kv_pixel_loss kind, float scale, double *sum, kv_tensor *grad);
klvae_status_t kv_cpu_logit_loss(kv_backend *be, const kv_tensor *logits, kv_logit_loss kind,
                                 float scale, double *mean, kv_tensor *grad);
klvae_status_t kv_cpu_posterior_backward(kv_backend *be, const kv_tensor *moments,
                                         const kv_tensor *dz, float kl_weight, bool sampled,
                                         uint64_t seed, kv_tensor *dmoments);
klvae_status_t kv_cpu_kl_sum(kv_backend *be, const kv_tensor *moments, double *sum);
klvae_status_t kv_cpu_adam(kv_backend *be, kv_tensor *param, const kv_tensor *grad, kv_tensor *m,
                           kv_tensor *v, float lr, float beta1, float beta2, float eps,
                           int64_t step);
klvae_status_t kv_cpu_sum_squares(kv_backend *be, const kv_tensor *x, double *sum);
klvae_status_t kv_cpu_scale(kv_backend *be, kv_tensor *x, float a);
klvae_status_t kv_cpu_lerp(kv_backend *be, kv_tensor *x, const kv_tensor *y, float t);
klvae_status_t kv_cpu_axpy(kv_backend *be, float a, const kv_tensor *x, kv_tensor *y);
klvae_status_t kv_cpu_fill(kv_backend *be, kv_tensor *x, float value);

klvae_status_t kv_cpu_conv2d(kv_backend *be, const kv_tensor *x, const kv_conv_prologue *prologue,
                             const kv_tensor *w, const kv_tensor *b, kv_conv_geometry geometry,
                             kv_tensor *y);
klvae_status_t kv_cpu_group_norm_stats(kv_backend *be, const kv_tensor *x, const kv_tensor *gamma,
                                       const kv_tensor *beta, int groups, float eps,
                                       kv_tensor *scale, kv_tensor *shift, kv_tensor *mean,
                                       kv_tensor *rstd);
klvae_status_t kv_cpu_group_norm_backward(kv_backend *be, const kv_tensor *x,
                                          const kv_tensor *gamma, const kv_tensor *scale,
                                          const kv_tensor *shift, const kv_tensor *mean,
                                          const kv_tensor *rstd, int groups, kv_activation act,
                                          const kv_tensor *da, kv_tensor *dx, kv_tensor *dgamma,
                                          kv_tensor *dbeta);
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

/* An activation and its derivative at one value. */
float kv_cpu_activate(kv_activation act, float x);
float kv_cpu_activate_grad(kv_activation act, float x);

#endif
