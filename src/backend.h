/* backend.h — the interface between the network and the hardware.
 *
 * The network (src/vae.c) is written once against this table of function
 * pointers. A backend owns its memory and implements every op; the CPU
 * backend lives in src/cpu/ and the CUDA backend in cuda/, one file per op
 * family with the same names on both sides.
 *
 * Every op is specified here, once:
 *
 *   conv2d          y[n,co,oy,ox] = b[co] + sum_{ci,ky,kx} w[co,ci,ky,kx] *
 *                                   xpad[n,ci,oy*s+ky,ox*s+kx]
 *                   where xpad is x' with pad_top/left/bottom/right zero rows
 *                   and columns; w is (co, ci, kh, kw), b is (co) or absent
 *                   (NULL). Output size: (H + top + bottom - kh) / s + 1.
 *                   A 1x1 conv with no padding is a per-pixel linear layer.
 *                   x' = x, or with a prologue p:
 *                   x'[n,c,y,x] = p.act(x[n,c,y,x] * p.scale[n,c] + p.shift[n,c])
 *                   (padding stays zero): a group norm fused into the conv
 *                   that consumes it, so the normalised tensor is never
 *                   stored.
 *   group_norm_stats
 *                   per (n, group of C/G contiguous channels): mean and biased
 *                   variance over (C/G)*H*W values, accumulated in double;
 *                   scale[n,c] = gamma[c] / sqrt(var + eps) and
 *                   shift[n,c] = beta[c] - scale[n,c] * mean, (N, C) tensors.
 *   group_norm      y = act(x * scale[n,c] + shift[n,c]) with the statistics
 *                   above. y may be x (in place).
 *   add             y = a + b, elementwise. y may be a or b.
 *   upsample_nearest2x
 *                   y[n,c,y,x] = x[n,c,y/2,x/2] (integer division), y is
 *                   (N, C, 2H, 2W).
 *   attention       single-head self-attention over the N = H*W positions of
 *                   (B, C, H, W) tensors q, k, v (channel-major, so position
 *                   m of channel c is q[b, c, m]):
 *                   out[b,c,n] = sum_m softmax_m(scale * sum_c' q[b,c',n]
 *                   k[b,c',m]) v[b,c,m]; softmax subtracts the row maximum
 *                   and sums in double. out must not alias q, k or v.
 *   posterior_split moments (N, 2Z, H, W) -> mean = channels [0, Z),
 *                   logvar = clamp(channels [Z, 2Z), -30, 20).
 *   gaussian_sample z = mean + (float)exp(0.5 * (double)clamp(logvar)) * eps,
 *                   with eps from kv_philox_normal(seed, i) for element i of
 *                   the whole tensor (src/philox.h), so every backend gives
 *                   the same bits.
 *
 * Ops return KLVAE_OK or a status with kv_error set. Shapes are checked by
 * the caller (src/vae.c builds them); backends may assume they agree.
 */
#ifndef KV_BACKEND_H
#define KV_BACKEND_H

#include "common.h"

typedef enum kv_dtype {
    KV_F32 = 0
} kv_dtype;

/* A dense row-major tensor of up to 4 dimensions whose data lives in a
 * backend's memory. Activations are (N, C, H, W). */
typedef struct kv_tensor {
    void *data;
    int ndim;
    int shape[4];
    kv_dtype dtype;
    bool owned; /* allocated by the backend (released by kv_tensor_release) */
} kv_tensor;

typedef enum kv_activation {
    KV_ACT_NONE = 0,
    KV_ACT_SILU,
    KV_ACT_GELU, /* exact, with erf */
    KV_ACT_RELU,
    KV_ACT_MISH
} kv_activation;

typedef struct kv_conv_geometry {
    int stride;
    int pad_top, pad_left, pad_bottom, pad_right;
} kv_conv_geometry;

/* What conv2d applies to each input value before convolving (see above). */
typedef struct kv_conv_prologue {
    const struct kv_tensor *scale, *shift; /* (N, C) */
    kv_activation act;
} kv_conv_prologue;

typedef struct kv_backend kv_backend;

typedef struct kv_backend_ops {
    const char *name;
    void (*destroy)(kv_backend *be);

    /* memory */
    klvae_status_t (*alloc)(kv_backend *be, size_t bytes, void **out);
    void (*release)(kv_backend *be, void *ptr);
    /* Gives memory the backend keeps for reuse back to the system; called at
     * the end of every API call. */
    void (*trim)(kv_backend *be);
    klvae_status_t (*upload)(kv_backend *be, void *dst, const float *src, size_t count);
    klvae_status_t (*download)(kv_backend *be, float *dst, const void *src, size_t count);

    /* ops, specified above */
    klvae_status_t (*conv2d)(kv_backend *be, const kv_tensor *x, const kv_conv_prologue *prologue,
                             const kv_tensor *w, const kv_tensor *b, kv_conv_geometry geometry,
                             kv_tensor *y);
    klvae_status_t (*group_norm_stats)(kv_backend *be, const kv_tensor *x,
                                       const kv_tensor *gamma, const kv_tensor *beta, int groups,
                                       float eps, kv_tensor *scale, kv_tensor *shift);
    klvae_status_t (*group_norm)(kv_backend *be, const kv_tensor *x, const kv_tensor *gamma,
                                 const kv_tensor *beta, int groups, float eps,
                                 kv_activation act, kv_tensor *y);
    klvae_status_t (*add)(kv_backend *be, const kv_tensor *a, const kv_tensor *b, kv_tensor *y);
    klvae_status_t (*upsample_nearest2x)(kv_backend *be, const kv_tensor *x, kv_tensor *y);
    klvae_status_t (*attention)(kv_backend *be, const kv_tensor *q, const kv_tensor *k,
                                const kv_tensor *v, float scale, kv_tensor *out);
    klvae_status_t (*posterior_split)(kv_backend *be, const kv_tensor *moments, kv_tensor *mean,
                                      kv_tensor *logvar);
    klvae_status_t (*gaussian_sample)(kv_backend *be, const kv_tensor *mean,
                                      const kv_tensor *logvar, uint64_t seed, kv_tensor *z);
} kv_backend_ops;

struct kv_backend {
    const kv_backend_ops *ops;
    void *ctx;
    /* True when backend memory is ordinary host memory, so caller arrays can
     * be used as tensors without a copy. */
    bool host_memory;
};

/* Settings a backend is created with. */
typedef struct kv_backend_settings {
    int threads; /* CPU worker threads, >= 1 */
    int device;  /* GPU index */
} kv_backend_settings;

/* Creates the CPU backend (src/cpu/cpu_backend.c). */
klvae_status_t kv_cpu_backend_create(const kv_backend_settings *settings, kv_backend **out);

/* Picks and creates a backend by name: "cpu", "cuda" or "auto". */
klvae_status_t kv_backend_create(const char *name, const kv_backend_settings *settings,
                                 kv_backend **out);

void kv_backend_destroy(kv_backend *be);

/* Tensor helpers (src/tensor.c). */
size_t kv_tensor_numel(const kv_tensor *t);
kv_tensor kv_tensor_view4(const kv_tensor *t, int n, int c, int h, int w);
/* A non-owning tensor over memory the caller manages. */
kv_tensor kv_tensor_wrap(void *data, int n, int c, int h, int w);
/* Allocates an (n, c, h, w) float32 tensor in backend memory. */
klvae_status_t kv_tensor_alloc(kv_backend *be, int n, int c, int h, int w, kv_tensor *out);
/* Releases owned memory and clears the tensor; safe to call twice. */
void kv_tensor_release(kv_backend *be, kv_tensor *t);

#endif /* KV_BACKEND_H */
