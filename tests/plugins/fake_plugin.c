/* fake_plugin.c — stand-ins for libklvae_cuda.so, to test the plugin loader
 * and the CUDA code paths of the core without a GPU (tests/test_plugin.c).
 *
 * The Makefile builds one shared object per mode, build/tests/plugins/
 * fake_MODE.so, compiled with -DFAKE_MODE_<mode>:
 *
 *   working     a plugin whose "device" memory is host memory (malloc): alloc,
 *               release, trim, upload, download work; gaussian_sample writes
 *               z = mean + logvar (a recognisable value, not a sample); every
 *               other op fails with KLVAE_ERR_BACKEND "fake plugin: OP is not
 *               implemented". It records what the core asked of it in
 *               fake_plugin_record (read by the tests with dlsym).
 *   no_entry    exports no klvae_plugin_entry;
 *   bad_abi     reports ABI version 7;
 *   no_driver   probe fails: KLVAE_ERR_BACKEND_UNAVAILABLE "no CUDA driver";
 *   create_oom  create fails: KLVAE_ERR_OUT_OF_MEMORY;
 *   incomplete  create returns a backend whose op table lacks adam.
 *
 * It includes the core's headers for the types only and links nothing of
 * libklvae, as the real plugin must not. */
#include <stdlib.h>
#include <string.h>

#include "backend/plugin.h"
#include "fake_plugin.h"

#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wunused-function" /* fake_adam in mode incomplete */
#pragma GCC diagnostic ignored "-Wunused-const-variable" /* fake_ops in mode create_oom */

#define FAKE_EXPORT __attribute__((visibility("default")))

FAKE_EXPORT fake_record fake_plugin_record;

static const kv_plugin_host *host;

/* Counters may be bumped from several threads at once (the thread test). */
#define BUMP(field) __atomic_add_fetch(&fake_plugin_record.field, 1, __ATOMIC_SEQ_CST)
#define DROP(field) __atomic_sub_fetch(&fake_plugin_record.field, 1, __ATOMIC_SEQ_CST)

static klvae_status_t fail(const char *op)
{
    char message[128];
    strcpy(message, "fake plugin: ");
    strcat(message, op);
    strcat(message, " is not implemented");
    return host->set_error(KLVAE_ERR_BACKEND, message);
}

static size_t numel(const kv_tensor *t)
{
    size_t n = 1;
    for (int i = 0; i < t->ndim; i++)
        n *= (size_t)t->shape[i];
    return n;
}

/* ---- memory: host memory behind the backend's interface ---- */

static void fake_destroy(kv_backend *be)
{
    BUMP(destroys);
    free(be);
}

static klvae_status_t fake_alloc(kv_backend *be, size_t bytes, void **out)
{
    *out = malloc(bytes ? bytes : 1);
    if (!*out)
        return host->set_error(KLVAE_ERR_OUT_OF_MEMORY, "fake plugin: out of memory");
    BUMP(live_allocations);
    return KLVAE_OK;
}

static void fake_release(kv_backend *be, void *ptr)
{
    if (ptr)
        DROP(live_allocations);
    free(ptr);
}

static void fake_trim(kv_backend *be)
{
}

static klvae_status_t fake_upload(kv_backend *be, void *dst, const float *src, size_t count)
{
    BUMP(uploads);
    memcpy(dst, src, count * sizeof(float));
    return KLVAE_OK;
}

static klvae_status_t fake_download(kv_backend *be, float *dst, const void *src, size_t count)
{
    BUMP(downloads);
    memcpy(dst, src, count * sizeof(float));
    return KLVAE_OK;
}

static klvae_status_t fake_gaussian_sample(kv_backend *be, const kv_tensor *mean,
                                           const kv_tensor *logvar, uint64_t seed, kv_tensor *z)
{
    const float *m = mean->data, *l = logvar->data;
    float *out = z->data;
    for (size_t i = 0, n = numel(z); i < n; i++)
        out[i] = m[i] + l[i];
    return KLVAE_OK;
}

/* ---- every other op fails ---- */

#define FAKE_OP(op, ...)                                                                        \
    static klvae_status_t fake_##op(kv_backend *be, __VA_ARGS__)                                \
    {                                                                                           \
        return fail(#op);                                                                       \
    }

FAKE_OP(conv2d, const kv_tensor *x, const kv_conv_prologue *prologue, const kv_tensor *w,
        const kv_tensor *b, kv_conv_geometry geometry, kv_tensor *y)
FAKE_OP(group_norm_stats, const kv_tensor *x, const kv_tensor *gamma, const kv_tensor *beta,
        int groups, float eps, kv_tensor *scale, kv_tensor *shift, kv_tensor *mean,
        kv_tensor *rstd)
FAKE_OP(group_norm, const kv_tensor *x, const kv_tensor *gamma, const kv_tensor *beta, int groups,
        float eps, kv_activation act, kv_tensor *y)
FAKE_OP(add, const kv_tensor *a, const kv_tensor *b, kv_tensor *y)
FAKE_OP(upsample_nearest2x, const kv_tensor *x, kv_tensor *y)
FAKE_OP(attention, const kv_tensor *q, const kv_tensor *k, const kv_tensor *v, float scale,
        kv_tensor *out)
FAKE_OP(posterior_split, const kv_tensor *moments, kv_tensor *mean, kv_tensor *logvar)
FAKE_OP(conv2d_backward_data, const kv_tensor *dy, const kv_tensor *w, kv_conv_geometry geometry,
        kv_tensor *dx)
FAKE_OP(conv2d_backward_weight, const kv_tensor *x, const kv_conv_prologue *prologue,
        const kv_tensor *dy, kv_conv_geometry geometry, kv_tensor *dw, kv_tensor *db)
FAKE_OP(group_norm_backward, const kv_tensor *x, const kv_tensor *gamma, const kv_tensor *scale,
        const kv_tensor *shift, const kv_tensor *mean, const kv_tensor *rstd, int groups,
        kv_activation act, const kv_tensor *da, kv_tensor *dx, kv_tensor *dgamma,
        kv_tensor *dbeta)
FAKE_OP(attention_backward, const kv_tensor *q, const kv_tensor *k, const kv_tensor *v,
        float scale, const kv_tensor *dout, kv_tensor *dq, kv_tensor *dk, kv_tensor *dv)
FAKE_OP(upsample_nearest2x_backward, const kv_tensor *dy, kv_tensor *dx)
FAKE_OP(activation, const kv_tensor *x, kv_activation act, kv_tensor *y)
FAKE_OP(activation_backward, const kv_tensor *y, const kv_tensor *dy, kv_activation act,
        kv_tensor *dx)
FAKE_OP(channel_affine, const kv_tensor *x, const float *a, const float *b, kv_tensor *y)
FAKE_OP(max_pool2x2, const kv_tensor *x, kv_tensor *y)
FAKE_OP(max_pool2x2_backward, const kv_tensor *x, const kv_tensor *dy, kv_tensor *dx)
FAKE_OP(unit_normalize, const kv_tensor *x, kv_tensor *y, kv_tensor *norms)
FAKE_OP(unit_normalize_backward, const kv_tensor *x, const kv_tensor *norms, const kv_tensor *dy,
        kv_tensor *dx)
FAKE_OP(lpips_distance, const kv_tensor *a, const kv_tensor *b, const kv_tensor *w, float dropout,
        uint64_t dropout_seed, double *values, const float *grad_scale, kv_tensor *db)
FAKE_OP(batch_norm, const kv_tensor *x, const kv_tensor *gamma, const kv_tensor *beta, float eps,
        float momentum, float *running_mean, float *running_var, kv_tensor *y, kv_tensor *mean,
        kv_tensor *invstd)
FAKE_OP(batch_norm_backward, const kv_tensor *x, const kv_tensor *gamma, const kv_tensor *mean,
        const kv_tensor *invstd, const kv_tensor *dy, kv_tensor *dx, kv_tensor *dgamma,
        kv_tensor *dbeta)
FAKE_OP(pixel_loss, const kv_tensor *x, const kv_tensor *xhat, kv_pixel_loss kind, float scale,
        double *sum, kv_tensor *grad)
FAKE_OP(logit_loss, const kv_tensor *logits, kv_logit_loss kind, float scale, double *mean,
        kv_tensor *grad)
FAKE_OP(posterior_backward, const kv_tensor *moments, const kv_tensor *dz, float kl_weight,
        bool sampled, uint64_t seed, kv_tensor *dmoments)
FAKE_OP(kl_sum, const kv_tensor *moments, double *sum)
FAKE_OP(adam, kv_tensor *param, const kv_tensor *grad, kv_tensor *m, kv_tensor *v, float lr,
        float beta1, float beta2, float eps, int64_t step)
FAKE_OP(sum_squares, const kv_tensor *x, double *sum)
FAKE_OP(scale, kv_tensor *x, float a)
FAKE_OP(lerp, kv_tensor *x, const kv_tensor *y, float t)
FAKE_OP(axpy, float a, const kv_tensor *x, kv_tensor *y)
FAKE_OP(fill, kv_tensor *x, float value)

static const kv_backend_ops fake_ops = {
    .name = "cuda",
    .destroy = fake_destroy,
    .alloc = fake_alloc,
    .release = fake_release,
    .trim = fake_trim,
    .upload = fake_upload,
    .download = fake_download,
    .conv2d = fake_conv2d,
    .group_norm_stats = fake_group_norm_stats,
    .group_norm = fake_group_norm,
    .add = fake_add,
    .upsample_nearest2x = fake_upsample_nearest2x,
    .attention = fake_attention,
    .posterior_split = fake_posterior_split,
    .gaussian_sample = fake_gaussian_sample,
    .conv2d_backward_data = fake_conv2d_backward_data,
    .conv2d_backward_weight = fake_conv2d_backward_weight,
    .group_norm_backward = fake_group_norm_backward,
    .attention_backward = fake_attention_backward,
    .upsample_nearest2x_backward = fake_upsample_nearest2x_backward,
    .activation = fake_activation,
    .activation_backward = fake_activation_backward,
    .channel_affine = fake_channel_affine,
    .max_pool2x2 = fake_max_pool2x2,
    .max_pool2x2_backward = fake_max_pool2x2_backward,
    .unit_normalize = fake_unit_normalize,
    .unit_normalize_backward = fake_unit_normalize_backward,
    .lpips_distance = fake_lpips_distance,
    .batch_norm = fake_batch_norm,
    .batch_norm_backward = fake_batch_norm_backward,
    .pixel_loss = fake_pixel_loss,
    .logit_loss = fake_logit_loss,
    .posterior_backward = fake_posterior_backward,
    .kl_sum = fake_kl_sum,
#if !defined(FAKE_MODE_incomplete)
    .adam = fake_adam,
#endif
    .sum_squares = fake_sum_squares,
    .scale = fake_scale,
    .lerp = fake_lerp,
    .axpy = fake_axpy,
    .fill = fake_fill,
};

/* ---- the plugin table ---- */

static klvae_status_t fake_probe(const kv_plugin_host *h, int device)
{
    __atomic_store_n(&host, h, __ATOMIC_SEQ_CST);
    BUMP(probes);
    fake_plugin_record.probe_device = device;
#if defined(FAKE_MODE_no_driver)
    return h->set_error(KLVAE_ERR_BACKEND_UNAVAILABLE, "no CUDA driver");
#else
    return KLVAE_OK;
#endif
}

static klvae_status_t fake_create(const kv_plugin_host *h, const kv_plugin_settings *settings,
                                  kv_backend **out)
{
    __atomic_store_n(&host, h, __ATOMIC_SEQ_CST);
    *out = NULL;
    BUMP(creates);
    fake_plugin_record.create_device = settings->device;
    fake_plugin_record.create_precision = (int)settings->precision;
#if defined(FAKE_MODE_create_oom)
    return h->set_error(KLVAE_ERR_OUT_OF_MEMORY,
                        "out of memory creating the cuDNN handle (fake plugin)");
#else
    kv_backend *be = calloc(1, sizeof *be);
    if (!be)
        return h->set_error(KLVAE_ERR_OUT_OF_MEMORY, "fake plugin: out of memory");
    be->ops = &fake_ops;
    be->host_memory = false; /* exercise the core's upload / download path */
    *out = be;
    return KLVAE_OK;
#endif
}

static klvae_status_t fake_set_stream(kv_backend *be, void *stream)
{
    if (fake_plugin_record.set_streams < 8)
        fake_plugin_record.streams[fake_plugin_record.set_streams] = stream;
    BUMP(set_streams);
    fake_plugin_record.last_stream = stream;
    return KLVAE_OK;
}

static klvae_status_t fake_synchronize(kv_backend *be)
{
    BUMP(synchronizes);
    return KLVAE_OK;
}

static const kv_plugin fake_plugin = {
#if defined(FAKE_MODE_bad_abi)
    .abi_version = 7,
#else
    .abi_version = KV_PLUGIN_ABI_VERSION,
#endif
    .struct_size = sizeof(kv_plugin),
    .name = "cuda",
    .version = "0.1.0-fake",
    .probe = fake_probe,
    .create = fake_create,
    .set_stream = fake_set_stream,
    .synchronize = fake_synchronize,
};

#if defined(FAKE_MODE_no_entry)
FAKE_EXPORT const kv_plugin *not_the_entry_point(void)
#else
FAKE_EXPORT const kv_plugin *klvae_plugin_entry(void)
#endif
{
    return &fake_plugin;
}
