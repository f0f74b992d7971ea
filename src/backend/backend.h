/* backend.h — the interface between the network and the hardware.
 *
 * The network (src/model/vae.c, src/train/) is written once against a table
 * of ops; a backend owns its memory and implements the ops. The CPU backend
 * lives in src/backend/cpu/, the CUDA backend in cuda/. Ops come in
 * families, and each family FAMILY has its specification below, its CPU code
 * in src/backend/cpu/FAMILY.c (conv2d also in conv2d_*.c), its CUDA code in
 * cuda/FAMILY.cu where the CUDA backend has it, and its test in
 * tests/ops/test_FAMILY.c. The list of ops, KV_BACKEND_OPS below, is the
 * only place that names them all: it generates the table's members, the CPU
 * backend's table and declarations, the CUDA plugin's declarations, and the
 * query kv_backend_missing_op. An op a backend lacks is NULL in its table,
 * never a stub: whoever needs an op asks the table up front (the trainer
 * asks for every training op before it allocates anything).
 *
 * Family conv2d
 *   conv2d          y[n,co,oy,ox] = b[co] + sum_{ci,ky,kx} w[co,ci,ky,kx] *
 *                                   xpad[n,ci,oy*s+ky,ox*s+kx] + r[n,co,oy,ox]
 *                   where xpad is x' with pad_top/left/bottom/right zero rows
 *                   and columns; w is (co, ci, kh, kw), b is (co) or absent
 *                   (NULL), r (the residual, y's shape) is absent or a tensor
 *                   that is not y, added last. Output size:
 *                   (H' + top + bottom - kh) / s + 1 for x' of H' rows.
 *                   A 1x1 conv with no padding is a per-pixel linear layer.
 *                   x' = x, or with a prologue p: with p.scale and p.shift,
 *                   x'[n,c,y,x] = p.act(x[n,c,y,x] * p.scale[n,c] + p.shift[n,c])
 *                   (padding stays zero): a group norm fused into the conv
 *                   that consumes it, so the normalised tensor is never
 *                   stored; with p.upsample2x, x' is then read through the
 *                   nearest 2x upsample, x'[n,c,y,x] -> x'[n,c,y/2,x/2] for
 *                   (2H, 2W): the decoder's Upsample2D, whose upsampled
 *                   tensor is never stored either.
 *   conv2d_backward_data
 *                   dx = d/dx' of sum(dy * conv2d(x')): the transposed
 *                   convolution of dy with w for the forward geometry; dx has
 *                   the forward input's shape (rows and columns the forward
 *                   never read get 0).
 *   conv2d_backward_weight
 *                   dw += sum_{n,oy,ox} dy[n,co,oy,ox] * xpad[n,ci,oy*s+ky,ox*s+kx]
 *                   and db[co] += sum dy[n,co,:,:] (db may be absent), with
 *                   xpad from x' = prologue(x) as in the forward (a prologue
 *                   without upsample2x).
 *
 * Family group_norm
 *   group_norm_stats
 *                   per (n, group of C/G contiguous channels): mean and biased
 *                   variance over (C/G)*H*W values, accumulated in double;
 *                   scale[n,c] = gamma[c] / sqrt(var + eps) and
 *                   shift[n,c] = beta[c] - scale[n,c] * mean, (N, C) tensors;
 *                   also mean[n,g] and rstd[n,g] = 1/sqrt(var + eps) when
 *                   those outputs are present (for the backward).
 *   group_norm      y = act(x * scale[n,c] + shift[n,c]) with the statistics
 *                   above. y may be x (in place).
 *   group_norm_backward
 *                   for u = x*scale + shift (the norm's output) and da the
 *                   gradient of act(u): du = da * act'(u),
 *                   dgamma[c] += sum du * xhat, dbeta[c] += sum du, and
 *                   dx = rstd * (dxh - mean_g(dxh) - xhat * mean_g(dxh * xhat))
 *                   with xhat = (x - mean) * rstd and dxh = du * gamma[c]; dx =.
 *
 * Family batch_norm (training mode; split in statistics and their use, so
 * that data-parallel training can add the statistics of every process's
 * batch in between: src/train/discriminator.c)
 *   batch_norm_stats
 *                   per channel, over (N, H, W) in double: sums[c] = sum x
 *                   and sums[C + c] = sum x^2, into a host array of 2C (=).
 *   batch_norm      from sums over count values (this batch's, or the sums
 *                   of several batches): mean = sums[c] / count, biased
 *                   variance var = max(sums[C + c] / count - mean^2, 0);
 *                   y = (x - mean) * invstd * gamma + beta with invstd =
 *                   1/sqrt(var + eps); saves mean and invstd; running_mean/
 *                   var (host arrays) move by momentum towards the mean and
 *                   the unbiased variance var * count / (count - 1).
 *   batch_norm_backward_stats
 *                   per channel over (N, H, W), in double, for the saved
 *                   mean and invstd and xhat = (x - mean) * invstd:
 *                   sums[c] = sum dy and sums[C + c] = sum dy * xhat into a
 *                   host array of 2C (=); dbeta += sums[c] and dgamma +=
 *                   sums[C + c] when present (this batch's share of the
 *                   parameter gradients).
 *   batch_norm_backward
 *                   dx = invstd * (dy * gamma - m1 - xhat * m2) with
 *                   m1 = sums[c] * gamma / count, m2 = sums[C + c] * gamma /
 *                   count from the sums over the count values the forward
 *                   normalised (=): the full training-mode gradient, through
 *                   the batch statistics.
 *
 * Family attention
 *   attention       single-head self-attention over the N = H*W positions of
 *                   (B, C, H, W) tensors q, k, v (channel-major, so position
 *                   m of channel c is q[b, c, m]):
 *                   out[b,c,n] = sum_m softmax_m(scale * sum_c' q[b,c',n]
 *                   k[b,c',m]) v[b,c,m]; softmax subtracts the row maximum
 *                   and sums in double. out must not alias q, k or v.
 *   attention_backward
 *                   dq, dk, dv = of sum(dout * attention(q, k, v)); all =.
 *
 * Family upsample
 *   upsample_nearest2x
 *                   y[n,c,y,x] = x[n,c,y/2,x/2] (integer division), y is
 *                   (N, C, 2H, 2W).
 *   upsample_nearest2x_backward
 *                   dx[n,c,y,x] = sum of the four dy values it was copied to.
 *
 * Family pool
 *   max_pool2x2     y = max over each 2x2 window, stride 2 (floor sizes);
 *   max_pool2x2_backward
 *                   dx = dy routed to the first maximum of each window in
 *                   row-major order (as PyTorch), 0 elsewhere; dx =.
 *
 * Family activation (base/numerics.h defines each activation)
 *   activation      y = act(x) elementwise (y may be x);
 *   activation_backward
 *                   dx = dy * act'(x) for act in {relu, leaky_relu(0.2)}
 *                   computed from the output y (y > 0 exactly where x > 0);
 *                   dx may be dy.
 *
 * Family elementwise
 *   add             y = a + b, elementwise. y may be a or b.
 *   channel_affine  y[n,c] = x[n,c] * a[c] + b[c] with host arrays a, b
 *                   (either may be NULL: 1 and 0).
 *   scale           x *= a.
 *   axpy            y += a x.
 *   lerp            x += t (y - x).
 *   fill            x = v.
 *
 * Family posterior (the clamp of logvar is kv_clamp_logvar, base/numerics.h)
 *   posterior_split moments (N, 2Z, H, W) -> mean = channels [0, Z),
 *                   logvar = clamp(channels [Z, 2Z), -30, 20). logvar may be
 *                   absent.
 *   gaussian_sample z = mean + (float)exp(0.5 * (double)clamp(logvar)) * eps,
 *                   with eps from kv_philox_normal(seed, first + i) for
 *                   element i of the whole tensor (src/base/philox.h), so
 *                   every backend gives the same bits; first places the
 *                   tensor in a larger one (a process's share of a batch
 *                   split over processes draws that share's numbers).
 *   posterior_backward
 *                   from moments (N, 2Z, H, W) (mean mu, raw logvar l), the
 *                   gradient dz of z and the KL weight k:
 *                   s = clamp(l), ds = k * 0.5 * (exp(s) - 1) + (sampled ?
 *                   dz * 0.5 * exp(0.5 s) * eps : 0), dmu = dz + k * mu,
 *                   dl = ds where -30 <= l <= 20, else 0; eps regenerated
 *                   from the sampling seed and first; dmoments =.
 *   kl_sum          sum over the batch of 0.5 * (mu^2 + exp(s) - 1 - s), in
 *                   double.
 *
 * Family lpips (the network is src/train/lpips.c)
 *   unit_normalize  y[n,c,p] = x[n,c,p] / (r[n,p] + 1e-10),
 *                   r = sqrt(sum_c x[n,c,p]^2);
 *   unit_normalize_backward
 *                   dx = dy/(r+e) - x * sum_c(dy*x) / ((r+e)^2 r), and 0 where
 *                   r = 0 (PyTorch gives NaN there).
 *   lpips_distance  value[n] = mean_p sum_c w[c] m[n,c,p] (a - b)^2 for unit
 *                   normalised a, b and a dropout mask m (1, or 0 / 1/(1-p)
 *                   drawn from Philox(seed) at index first + the element's
 *                   index in a); with grad_scale[n] != 0 also
 *                   db = grad_scale[n] * 2/P * w[c] m (b - a) (=).
 *
 * Family losses
 *   pixel_loss      sum over all elements of |xhat - x| (l1) or (xhat - x)^2
 *                   (l2), returned in double; with grad present,
 *                   grad = scale * sign(xhat - x) (sign(0) = 0) or
 *                   scale * 2 (xhat - x) (=).
 *   logit_loss      the PatchGAN losses over a logits tensor, mean over its
 *                   elements, returned in double: hinge_real mean relu(1 - l),
 *                   hinge_fake mean relu(1 + l), vanilla_real mean softplus(-l),
 *                   vanilla_fake mean softplus(l), generator -mean(l); with
 *                   grad present, grad = scale * d(mean)/dl (=).
 *
 * Family optimizer
 *   adam            m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
 *                   p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
 *                   (PyTorch's Adam) for one tensor.
 *   sum_squares     sum of x^2 in double (gradient norms).
 *
 * "+=" accumulates into an output, "=" overwrites it. Ops return KLVAE_OK
 * or a status with kv_error set. Shapes are checked by the caller (the
 * network builds them); backends may assume they agree.
 */
#ifndef KV_BACKEND_H
#define KV_BACKEND_H

#include "base/common.h"
#include "base/numerics.h" /* kv_activation */

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

typedef enum kv_pixel_loss {
    KV_LOSS_L1 = 0,
    KV_LOSS_L2
} kv_pixel_loss;

typedef enum kv_logit_loss {
    KV_LOGITS_HINGE_REAL = 0,
    KV_LOGITS_HINGE_FAKE,
    KV_LOGITS_VANILLA_REAL,
    KV_LOGITS_VANILLA_FAKE,
    KV_LOGITS_GENERATOR
} kv_logit_loss;

typedef struct kv_conv_geometry {
    int stride;
    int pad_top, pad_left, pad_bottom, pad_right;
} kv_conv_geometry;

/* What conv2d applies to its input before convolving (see above). */
typedef struct kv_conv_prologue {
    const struct kv_tensor *scale, *shift; /* (N, C), or both NULL */
    kv_activation act;                     /* with scale and shift */
    bool upsample2x;                       /* read x' through a nearest 2x upsample */
} kv_conv_prologue;

/* How a backend stores a tensor it allocates. A backend that computes in
 * another format than float32 NCHW (the CUDA backend in bf16: bf16 NHWC)
 * stores activations and weights in that format; what must stay exact
 * (group-norm statistics, losses' gradients, optimiser state) asks for
 * float32. The CPU backend stores everything as float32. */
typedef enum kv_storage {
    KV_STORAGE_COMPUTE = 0, /* the backend's compute format */
    KV_STORAGE_FLOAT32      /* float32, exactly */
} kv_storage;

typedef struct kv_backend kv_backend;

/* Who needs an op: inference (encode, sample, decode) or training. */
#define KV_OP_INFERENCE 1u
#define KV_OP_TRAINING 2u

/* Every op of the interface, once, in the table's order:
 * X(family, name, who needs it, parameters). The return type is always
 * klvae_status_t. */
#define KV_BACKEND_OPS(X)                                                                       \
    X(conv2d, conv2d, KV_OP_INFERENCE,                                                          \
      (kv_backend *be, const kv_tensor *x, const kv_conv_prologue *prologue, const kv_tensor *w, \
       const kv_tensor *b, const kv_tensor *residual, kv_conv_geometry geometry, kv_tensor *y)) \
    X(group_norm, group_norm_stats, KV_OP_INFERENCE,                                            \
      (kv_backend *be, const kv_tensor *x, const kv_tensor *gamma, const kv_tensor *beta,      \
       int groups, float eps, kv_tensor *scale, kv_tensor *shift, kv_tensor *mean,              \
       kv_tensor *rstd))                                                                        \
    X(group_norm, group_norm, KV_OP_INFERENCE,                                                  \
      (kv_backend *be, const kv_tensor *x, const kv_tensor *gamma, const kv_tensor *beta,      \
       int groups, float eps, kv_activation act, kv_tensor *y))                                 \
    X(elementwise, add, KV_OP_INFERENCE,                                                        \
      (kv_backend *be, const kv_tensor *a, const kv_tensor *b, kv_tensor *y))                  \
    X(upsample, upsample_nearest2x, KV_OP_INFERENCE,                                            \
      (kv_backend *be, const kv_tensor *x, kv_tensor *y))                                      \
    X(attention, attention, KV_OP_INFERENCE,                                                    \
      (kv_backend *be, const kv_tensor *q, const kv_tensor *k, const kv_tensor *v, float scale, \
       kv_tensor *out))                                                                         \
    X(posterior, posterior_split, KV_OP_INFERENCE,                                              \
      (kv_backend *be, const kv_tensor *moments, kv_tensor *mean, kv_tensor *logvar))          \
    X(posterior, gaussian_sample, KV_OP_INFERENCE,                                              \
      (kv_backend *be, const kv_tensor *mean, const kv_tensor *logvar, uint64_t seed,          \
       uint64_t first, kv_tensor *z))                                                           \
    X(conv2d, conv2d_backward_data, KV_OP_TRAINING,                                             \
      (kv_backend *be, const kv_tensor *dy, const kv_tensor *w, kv_conv_geometry geometry,     \
       kv_tensor *dx))                                                                          \
    X(conv2d, conv2d_backward_weight, KV_OP_TRAINING,                                           \
      (kv_backend *be, const kv_tensor *x, const kv_conv_prologue *prologue,                   \
       const kv_tensor *dy, kv_conv_geometry geometry, kv_tensor *dw, kv_tensor *db))           \
    X(group_norm, group_norm_backward, KV_OP_TRAINING,                                          \
      (kv_backend *be, const kv_tensor *x, const kv_tensor *gamma, const kv_tensor *scale,     \
       const kv_tensor *shift, const kv_tensor *mean, const kv_tensor *rstd, int groups,        \
       kv_activation act, const kv_tensor *da, kv_tensor *dx, kv_tensor *dgamma,                \
       kv_tensor *dbeta))                                                                       \
    X(attention, attention_backward, KV_OP_TRAINING,                                            \
      (kv_backend *be, const kv_tensor *q, const kv_tensor *k, const kv_tensor *v, float scale, \
       const kv_tensor *dout, kv_tensor *dq, kv_tensor *dk, kv_tensor *dv))                     \
    X(upsample, upsample_nearest2x_backward, KV_OP_TRAINING,                                    \
      (kv_backend *be, const kv_tensor *dy, kv_tensor *dx))                                    \
    X(activation, activation, KV_OP_TRAINING,                                                   \
      (kv_backend *be, const kv_tensor *x, kv_activation act, kv_tensor *y))                   \
    X(activation, activation_backward, KV_OP_TRAINING,                                          \
      (kv_backend *be, const kv_tensor *y, const kv_tensor *dy, kv_activation act,             \
       kv_tensor *dx))                                                                          \
    X(elementwise, channel_affine, KV_OP_TRAINING,                                              \
      (kv_backend *be, const kv_tensor *x, const float *a, const float *b, kv_tensor *y))      \
    X(pool, max_pool2x2, KV_OP_TRAINING, (kv_backend *be, const kv_tensor *x, kv_tensor *y))   \
    X(pool, max_pool2x2_backward, KV_OP_TRAINING,                                               \
      (kv_backend *be, const kv_tensor *x, const kv_tensor *dy, kv_tensor *dx))                \
    X(lpips, unit_normalize, KV_OP_TRAINING,                                                    \
      (kv_backend *be, const kv_tensor *x, kv_tensor *y, kv_tensor *norms))                    \
    X(lpips, unit_normalize_backward, KV_OP_TRAINING,                                           \
      (kv_backend *be, const kv_tensor *x, const kv_tensor *norms, const kv_tensor *dy,        \
       kv_tensor *dx))                                                                          \
    X(lpips, lpips_distance, KV_OP_TRAINING,                                                    \
      (kv_backend *be, const kv_tensor *a, const kv_tensor *b, const kv_tensor *w,             \
       float dropout, uint64_t dropout_seed, uint64_t first, double *values,                    \
       const float *grad_scale, kv_tensor *db))                                                 \
    X(batch_norm, batch_norm_stats, KV_OP_TRAINING,                                             \
      (kv_backend *be, const kv_tensor *x, double *sums))                                      \
    X(batch_norm, batch_norm, KV_OP_TRAINING,                                                   \
      (kv_backend *be, const kv_tensor *x, const kv_tensor *gamma, const kv_tensor *beta,      \
       const double *sums, double count, float eps, float momentum, float *running_mean,        \
       float *running_var, kv_tensor *y, kv_tensor *mean, kv_tensor *invstd))                   \
    X(batch_norm, batch_norm_backward_stats, KV_OP_TRAINING,                                    \
      (kv_backend *be, const kv_tensor *x, const kv_tensor *mean, const kv_tensor *invstd,     \
       const kv_tensor *dy, double *sums, kv_tensor *dgamma, kv_tensor *dbeta))                 \
    X(batch_norm, batch_norm_backward, KV_OP_TRAINING,                                          \
      (kv_backend *be, const kv_tensor *x, const kv_tensor *gamma, const kv_tensor *mean,      \
       const kv_tensor *invstd, const kv_tensor *dy, const double *sums, double count,          \
       kv_tensor *dx))                                                                          \
    X(losses, pixel_loss, KV_OP_TRAINING,                                                       \
      (kv_backend *be, const kv_tensor *x, const kv_tensor *xhat, kv_pixel_loss kind,          \
       float scale, double *sum, kv_tensor *grad))                                              \
    X(losses, logit_loss, KV_OP_TRAINING,                                                       \
      (kv_backend *be, const kv_tensor *logits, kv_logit_loss kind, float scale, double *mean, \
       kv_tensor *grad))                                                                        \
    X(posterior, posterior_backward, KV_OP_TRAINING,                                            \
      (kv_backend *be, const kv_tensor *moments, const kv_tensor *dz, float kl_weight,         \
       bool sampled, uint64_t seed, uint64_t first, kv_tensor *dmoments))                       \
    X(posterior, kl_sum, KV_OP_TRAINING,                                                        \
      (kv_backend *be, const kv_tensor *moments, double *sum))                                 \
    X(optimizer, adam, KV_OP_TRAINING,                                                          \
      (kv_backend *be, kv_tensor *param, const kv_tensor *grad, kv_tensor *m, kv_tensor *v,    \
       float lr, float beta1, float beta2, float eps, int64_t step))                            \
    X(optimizer, sum_squares, KV_OP_TRAINING,                                                   \
      (kv_backend *be, const kv_tensor *x, double *sum))                                       \
    X(elementwise, scale, KV_OP_TRAINING, (kv_backend *be, kv_tensor *x, float a))             \
    X(elementwise, lerp, KV_OP_TRAINING,                                                        \
      (kv_backend *be, kv_tensor *x, const kv_tensor *y, float t))                             \
    X(elementwise, axpy, KV_OP_TRAINING,                                                        \
      (kv_backend *be, float a, const kv_tensor *x, kv_tensor *y))                             \
    X(elementwise, fill, KV_OP_TRAINING, (kv_backend *be, kv_tensor *x, float value))

typedef struct kv_backend_ops {
    const char *name;
    void (*destroy)(kv_backend *be);

    /* memory: blocks for tensors of bytes / 4 float32 elements, stored as
     * storage says */
    klvae_status_t (*alloc)(kv_backend *be, size_t bytes, kv_storage storage, void **out);
    void (*release)(kv_backend *be, void *ptr);
    /* Ends a call's use of memory (ABI 5: keep). keep: holds for the next
     * call what this one used, about the most it had in use at once since the
     * last trim, so that a call like it maps nothing new, and gives the rest
     * back to the system; !keep: gives back everything not in use. Called at
     * the end of every API call (option keep_memory) and when a trainer is
     * freed (!keep). */
    void (*trim)(kv_backend *be, bool keep);
    /* dst (a tensor of this backend, or a caller's device array) = the
     * numel(dst) float32 values of src, in NCHW order; download the other
     * way. Whatever the backend's storage format, the host side is float32
     * NCHW. */
    klvae_status_t (*upload)(kv_backend *be, kv_tensor *dst, const float *src);
    klvae_status_t (*download)(kv_backend *be, float *dst, const kv_tensor *src);

    /* the ops of KV_BACKEND_OPS, by name; NULL where the backend lacks one */
#define KV_OP_MEMBER(family, name, needed_by, params) klvae_status_t(*name) params;
    KV_BACKEND_OPS(KV_OP_MEMBER)
#undef KV_OP_MEMBER
} kv_backend_ops;

struct kv_backend {
    const kv_backend_ops *ops;
    void *ctx;
    /* True when backend memory is ordinary host memory, so caller arrays can
     * be used as tensors without a copy. */
    bool host_memory;
    /* True when the backend's compute format holds fewer bits than float32
     * (bf16), so that a trainer keeps float32 master weights for Adam. */
    bool lossy_storage;
};

/* Numerical mode of the backend (option precision). */
typedef enum kv_precision {
    KV_PRECISION_FP32 = 0, /* strict float32 */
    KV_PRECISION_TF32,     /* float32 storage, TF32 tensor-core products */
    KV_PRECISION_BF16      /* bf16 activations, fp32 accumulation and statistics */
} kv_precision;

/* Settings a backend is created with (the core's own struct: a plugin gets
 * kv_plugin_settings, src/backend/plugin.h). */
typedef struct kv_backend_settings {
    int threads;            /* CPU worker threads, >= 1 */
    int device;             /* GPU index */
    kv_precision precision; /* the CPU backend: bf16 products where the CPU has them, else fp32 */
} kv_backend_settings;

/* The name of the first op of KV_BACKEND_OPS needed by any of who
 * (KV_OP_INFERENCE, KV_OP_TRAINING, or both) that be's table lacks, or NULL
 * when it has them all. */
static inline const char *kv_backend_missing_op(const kv_backend *be, unsigned who)
{
#define KV_CHECK_OP(family, name, needed_by, params)                                            \
    if (((needed_by) & who) && !be->ops->name)                                                  \
        return #name;
    KV_BACKEND_OPS(KV_CHECK_OP)
#undef KV_CHECK_OP
    return NULL;
}

/* Creates the CPU backend (src/backend/cpu/cpu_backend.c). */
klvae_status_t kv_cpu_backend_create(const kv_backend_settings *settings, kv_backend **out);

struct kv_plugin;

/* What kv_backend_create chose, besides the backend (core only). */
typedef struct kv_backend_info {
    /* The plugin whose backend it is (it stays loaded for the life of the
     * process), or NULL for the CPU backend. */
    const struct kv_plugin *plugin;
    /* Why "auto" did not use CUDA ("" when it did, or for "cpu"). */
    char reason[1024];
    /* What the backend computes in: the precision asked for, except on the
     * CPU, which computes bf16 only where the CPU has bf16 instructions
     * (else fp32, and precision_reason says why; "" otherwise). */
    kv_precision precision;
    char precision_reason[256];
} kv_backend_info;

/* Picks and creates a backend by name (src/backend/selection.c):
 *   "cpu"   the CPU backend;
 *   "cuda"  the CUDA plugin's backend on settings->device: the plugin is
 *           loaded (once per process, src/backend/plugin_loader.c), probed and asked
 *           to create it; every reason it cannot be used is an error
 *           (KLVAE_ERR_BACKEND_UNAVAILABLE, or the plugin's
 *           KLVAE_ERR_OUT_OF_MEMORY / KLVAE_ERR_BACKEND from create), never a
 *           switch to the CPU;
 *   "auto"  "cuda" when that succeeds, else the CPU backend with the reason
 *           in info->reason.
 * info may be NULL. */
klvae_status_t kv_backend_create(const char *name, const kv_backend_settings *settings,
                                 kv_backend **out, kv_backend_info *info);

void kv_backend_destroy(kv_backend *be);

/* Tensor helpers (src/backend/tensor.c). */
size_t kv_tensor_numel(const kv_tensor *t);
kv_tensor kv_tensor_view4(const kv_tensor *t, int n, int c, int h, int w);
/* A non-owning tensor over memory the caller manages. */
kv_tensor kv_tensor_wrap(void *data, int n, int c, int h, int w);
/* Allocates an (n, c, h, w) tensor in backend memory, in the backend's
 * compute format. */
klvae_status_t kv_tensor_alloc(kv_backend *be, int n, int c, int h, int w, kv_tensor *out);
/* The same, kept in float32 whatever the backend computes in (statistics,
 * gradients of losses, optimiser state). */
klvae_status_t kv_tensor_alloc_f32(kv_backend *be, int n, int c, int h, int w, kv_tensor *out);
/* Allocates a tensor of like's (4-D) shape. */
klvae_status_t kv_tensor_alloc_like(kv_backend *be, const kv_tensor *like, kv_tensor *out);
/* Allocates y with the shape of conv2d(x, w) for geometry g (w (co, ci, kh,
 * kw), or 2-D for a 1x1), of the upsampled x when upsample2x;
 * KLVAE_ERR_INVALID_ARGUMENT when x is too small. */
klvae_status_t kv_conv_output_alloc(kv_backend *be, const kv_tensor *x, bool upsample2x,
                                    const kv_tensor *w, kv_conv_geometry g, kv_tensor *y);
/* Releases owned memory and clears the tensor; safe to call twice. */
void kv_tensor_release(kv_backend *be, kv_tensor *t);

#endif /* KV_BACKEND_H */
