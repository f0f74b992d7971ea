/* api.c — the public model entry points: argument checking, backend choice,
 * moving tensors between caller memory and backend memory. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/plugin.h"
#include "base/io.h"
#include "formats/safetensors.h"
#include "model/stream.h"
#include "model/vae.h"

#define DIFFUSERS_WEIGHTS "diffusion_pytorch_model.safetensors"

/* backend and precision from options and the environment. */
static klvae_status_t choose_backend(const klvae_options_t *opts, klvae_model_t *m)
{
    const char *name = kv_options_value(opts, "backend");
    if (!name) {
        const char *env = getenv("KLVAE_BACKEND");
        if (env && *env) {
            if (strcmp(env, "auto") != 0 && strcmp(env, "cpu") != 0 && strcmp(env, "cuda") != 0)
                return kv_error(KLVAE_ERR_OPTION,
                                "bad value '%s' in environment variable KLVAE_BACKEND: expected "
                                "auto, cpu or cuda",
                                env);
            name = env;
        } else {
            name = "auto";
        }
    }
    const char *precision = kv_options_string(opts, "precision");
    kv_backend_settings settings = {kv_options_int(opts, "threads"), kv_options_int(opts, "device"),
                                    KV_PRECISION_FP32};
    if (strcmp(precision, "tf32") == 0)
        settings.precision = KV_PRECISION_TF32;
    else if (strcmp(precision, "bf16") == 0)
        settings.precision = KV_PRECISION_BF16;
    if (settings.threads <= 0)
        settings.threads = kv_cpu_count();
    kv_backend_info info;
    klvae_status_t st = kv_backend_create(name, &settings, &m->be, &info);
    if (st != KLVAE_OK)
        return st;
    m->plugin = info.plugin;
    snprintf(m->backend_reason, sizeof m->backend_reason, "%s", info.reason);
    snprintf(m->backend_name, sizeof m->backend_name, "%s",
             info.plugin ? info.plugin->name : m->be->ops->name);
    m->threads = settings.threads;
    snprintf(m->precision_reason, sizeof m->precision_reason, "%s", info.precision_reason);
    if (!m->plugin && strcmp(precision, "tf32") == 0) {
        if (strcmp(name, "cpu") == 0)
            return kv_error(KLVAE_ERR_UNSUPPORTED,
                            "precision=tf32 needs the CUDA backend; the CPU backend computes in "
                            "fp32 or bf16");
        snprintf(m->precision_reason, sizeof m->precision_reason,
                 "precision=tf32 needs the CUDA backend; the CPU computes in fp32");
    }
    if (!m->plugin) /* bf16 where the CPU has it (info says), else fp32 */
        precision = info.precision == KV_PRECISION_BF16 ? "bf16" : "fp32";
    snprintf(m->precision, sizeof m->precision, "%s", precision);
    return KLVAE_OK;
}

/* memory_limit, keep_memory, spill_dir and the tiling keys: how images run. */
static klvae_status_t read_inference_options(const klvae_options_t *opts, klvae_model_t *m)
{
    kv_inference_settings *set = &m->infer;
    const char *limit = kv_options_string(opts, "memory_limit");
    set->keep_memory = kv_options_bool(opts, "keep_memory");
    set->limit_kind = strcmp(limit, "auto") == 0   ? KV_LIMIT_AUTO
                      : strcmp(limit, "none") == 0 ? KV_LIMIT_NONE
                                                   : KV_LIMIT_BYTES;
    if (set->limit_kind == KV_LIMIT_BYTES)
        kv_parse_bytes(limit, &set->memory_limit);
    const char *dir = kv_options_value(opts, "spill_dir");
    if (dir && !(set->spill_dir = kv_strdup(dir)))
        return KLVAE_ERR_OUT_OF_MEMORY;
    set->blend = strcmp(kv_options_string(opts, "tiling"), "blend") == 0;
    set->tile_size = kv_options_int(opts, "tile_size");
    set->tile_overlap = kv_options_double(opts, "tile_overlap");
    const int f = kv_config_factor(&m->cfg);
    if (set->tile_size % f != 0)
        return kv_error(KLVAE_ERR_OPTION,
                        "tile_size %d is not a multiple of the model's downsampling factor %d",
                        set->tile_size, f);
    snprintf(set->last_plan, sizeof set->last_plan, "none yet");
    return KLVAE_OK;
}

static klvae_model_t *model_new(void)
{
    klvae_model_t *m = calloc(1, sizeof *m);
    if (!m)
        kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory creating a model");
    return m;
}

KLVAE_API klvae_status_t klvae_model_create(const klvae_options_t *opts, klvae_model_t **out)
{
    kv_error_clear();
    if (!out)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "klvae_model_create: out is NULL");
    *out = NULL;
    klvae_model_t *m = model_new();
    if (!m)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory creating the model");
    klvae_status_t st = kv_config_from_options(opts, &m->cfg);
    if (st == KLVAE_OK)
        st = choose_backend(opts, m);
    if (st == KLVAE_OK)
        st = read_inference_options(opts, m);
    if (st == KLVAE_OK)
        st = kv_model_build(m);
    if (st == KLVAE_OK)
        st = kv_model_alloc_params(m, KV_STORAGE_COMPUTE);
    if (st == KLVAE_OK)
        st = kv_model_init_params(m, kv_options_uint64(opts, "seed"));
    if (st != KLVAE_OK) {
        kv_model_destroy(m);
        return st;
    }
    *out = m;
    return KLVAE_OK;
}

/* Resolves path to the weights file and, for a folder, its config.json. */
static klvae_status_t locate_files(const char *path, char **weights, char **config)
{
    *weights = NULL;
    *config = NULL;
    if (!kv_is_directory(path)) {
        *weights = kv_strdup(path);
        return *weights ? KLVAE_OK : KLVAE_ERR_OUT_OF_MEMORY;
    }
    *config = kv_path_join(path, "config.json");
    *weights = kv_path_join(path, DIFFUSERS_WEIGHTS);
    if (!*config || !*weights)
        return KLVAE_ERR_OUT_OF_MEMORY;
    FILE *fp = fopen(*config, "rb");
    if (!fp)
        return kv_error(KLVAE_ERR_IO,
                        "%s is a folder without config.json; a diffusers model folder holds "
                        "config.json and " DIFFUSERS_WEIGHTS,
                        path);
    fclose(fp);
    fp = fopen(*weights, "rb");
    if (!fp) {
        /* Some repositories ship only the fp16 variant. */
        char *variant = kv_path_join(path, "diffusion_pytorch_model.fp16.safetensors");
        if (!variant)
            return KLVAE_ERR_OUT_OF_MEMORY;
        fp = fopen(variant, "rb");
        if (!fp) {
            free(variant);
            return kv_error(KLVAE_ERR_IO, "%s has config.json but no " DIFFUSERS_WEIGHTS, path);
        }
        free(*weights);
        *weights = variant;
    }
    fclose(fp);
    return KLVAE_OK;
}

KLVAE_API klvae_status_t klvae_model_load(const char *path, const klvae_options_t *opts,
                                          klvae_model_t **out)
{
    kv_error_clear();
    if (!out)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "klvae_model_load: out is NULL");
    *out = NULL;
    if (!path)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "klvae_model_load: path is NULL");
    char *weights = NULL, *config = NULL;
    kv_safetensors st;
    memset(&st, 0, sizeof st);
    st.fd = -1;
    klvae_model_t *m = model_new();
    klvae_status_t status =
        m ? locate_files(path, &weights, &config)
          : kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory loading %s", path);
    if (status == KLVAE_OK)
        status = kv_st_open(weights, &st);
    const char *prefix = "";
    kv_naming naming = KV_NAMING_DIFFUSERS;
    if (status == KLVAE_OK)
        status = kv_weights_detect(&st, &prefix, &naming);
    if (status == KLVAE_OK)
        status = config ? kv_config_read_json(config, &m->cfg)
                        : kv_weights_infer_config(&st, prefix, naming, &m->cfg);
    if (status == KLVAE_OK)
        status = kv_config_apply_load_options(opts, config == NULL, &m->cfg);
    if (status == KLVAE_OK)
        status = choose_backend(opts, m);
    if (status == KLVAE_OK)
        status = read_inference_options(opts, m);
    if (status == KLVAE_OK)
        status = kv_model_build(m);
    if (status == KLVAE_OK)
        status = kv_model_alloc_params(m, KV_STORAGE_COMPUTE);
    if (status == KLVAE_OK)
        status = kv_weights_load(m, &st, prefix, naming, config != NULL);
    kv_st_close(&st);
    free(weights);
    free(config);
    if (status != KLVAE_OK) {
        kv_model_destroy(m);
        return status;
    }
    *out = m;
    return KLVAE_OK;
}

KLVAE_API klvae_status_t klvae_model_save(const klvae_model_t *model, const char *path)
{
    kv_error_clear();
    if (!model || !path)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "klvae_model_save: %s is NULL",
                        !model ? "model" : "path");
    return kv_weights_save(model, path);
}

KLVAE_API void klvae_model_free(klvae_model_t *model)
{
    kv_model_destroy(model);
}

KLVAE_API int klvae_model_in_channels(const klvae_model_t *m)
{
    return m ? m->cfg.in_channels : 0;
}

KLVAE_API int klvae_model_out_channels(const klvae_model_t *m)
{
    return m ? m->cfg.out_channels : 0;
}

KLVAE_API int klvae_model_latent_channels(const klvae_model_t *m)
{
    return m ? m->cfg.latent_channels : 0;
}

KLVAE_API int klvae_model_downsampling_factor(const klvae_model_t *m)
{
    return m ? kv_config_factor(&m->cfg) : 0;
}

KLVAE_API float klvae_model_scaling_factor(const klvae_model_t *m)
{
    return m ? (float)m->cfg.scaling_factor : 0.0f;
}

KLVAE_API float klvae_model_shift_factor(const klvae_model_t *m)
{
    return m && m->cfg.has_shift_factor ? (float)m->cfg.shift_factor : 0.0f;
}

KLVAE_API int64_t klvae_model_parameter_count(const klvae_model_t *m)
{
    return m ? m->parameter_count : 0;
}

KLVAE_API const char *klvae_model_backend(const klvae_model_t *m)
{
    return !m ? "" : m->plugin ? "cuda" : "cpu";
}

KLVAE_API klvae_status_t klvae_model_get(const klvae_model_t *m, const char *key, char *buf,
                                         size_t size)
{
    kv_error_clear();
    if (!m || !key || (!buf && size))
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "klvae_model_get: %s is NULL",
                        !m ? "model" : !key ? "key" : "buf");
    char normal[64], text[32];
    size_t len = strlen(key);
    if (len >= sizeof normal)
        return kv_error(KLVAE_ERR_OPTION, "'%s' is not a model key", key);
    for (size_t i = 0; i <= len; i++)
        normal[i] = key[i] == '-' ? '_' : key[i];
    key = normal;
    const char *runtime = NULL;
    if (strcmp(key, "config") == 0)
        return kv_error(KLVAE_ERR_OPTION, "'config' names a starting point of "
                                          "klvae_model_create; a model has no value for it");
    if (strcmp(key, "backend") == 0) {
        runtime = m->backend_name;
    } else if (strcmp(key, "backend_reason") == 0) {
        runtime = m->backend_reason;
    } else if (strcmp(key, "precision") == 0) {
        runtime = m->precision;
    } else if (strcmp(key, "precision_reason") == 0) {
        runtime = m->precision_reason;
    } else if (strcmp(key, "threads") == 0) {
        snprintf(text, sizeof text, "%d", m->threads);
        runtime = text;
    } else if (strcmp(key, "memory_limit") == 0) {
        const kv_inference_settings *set = &m->infer;
        snprintf(text, sizeof text, "%llu", (unsigned long long)set->memory_limit);
        runtime = set->limit_kind == KV_LIMIT_AUTO   ? "auto"
                  : set->limit_kind == KV_LIMIT_NONE ? "none"
                                                     : text;
    } else if (strcmp(key, "keep_memory") == 0) {
        runtime = m->infer.keep_memory ? "true" : "false";
    } else if (strcmp(key, "spill_dir") == 0) {
        runtime = m->infer.spill_dir ? m->infer.spill_dir : "";
    } else if (strcmp(key, "tiling") == 0) {
        runtime = m->infer.blend ? "blend" : "exact";
    } else if (strcmp(key, "tile_size") == 0) {
        snprintf(text, sizeof text, "%d", m->infer.tile_size);
        runtime = text;
    } else if (strcmp(key, "tile_overlap") == 0) {
        kv_format_double(m->infer.tile_overlap, text, sizeof text);
        runtime = text;
    } else if (strcmp(key, "last_plan") == 0) {
        runtime = m->infer.last_plan;
    }
    if (!runtime)
        return kv_config_get(&m->cfg, key, buf, size);
    return kv_copy_out("klvae_model_get", key, runtime, buf, size);
}

/* ---- inference ---- */

static bool overlaps(const float *a, size_t na, const float *b, size_t nb)
{
    return a && b && a < b + nb && b < a + na;
}

/* Where the caller's arrays meet the backend: host arrays through upload
 * and download (or as they are, when the backend computes in host memory),
 * a caller's device arrays (klvae_*_device) through the plugin's
 * import_device and export_device. */
typedef struct caller_arrays {
    kv_backend *be;
    const kv_plugin *device; /* the plugin for device arrays; NULL: host arrays */
} caller_arrays;


/* A tensor holding caller data (copied in when copy_in), stored as storage
 * says. */
static klvae_status_t take_in(const caller_arrays *io, float *array, int n, int c, int h, int w,
                              bool copy_in, kv_storage storage, kv_tensor *t)
{
    kv_backend *be = io->be;
    if (!io->device && be->host_memory) {
        *t = kv_tensor_wrap(array, n, c, h, w);
        return KLVAE_OK;
    }
    klvae_status_t st = storage == KV_STORAGE_FLOAT32 ? kv_tensor_alloc_f32(be, n, c, h, w, t)
                                                      : kv_tensor_alloc(be, n, c, h, w, t);
    if (st == KLVAE_OK && copy_in)
        st = io->device ? kv_plugin_status(io->device->import_device(be, t, array))
                        : be->ops->upload(be, t, array);
    if (st != KLVAE_OK)
        kv_tensor_release(be, t);
    return st;
}

/* Copies t out to the caller's array when the work (st) succeeded, and
 * releases it. */
static klvae_status_t give_out(const caller_arrays *io, kv_tensor *t, float *array,
                               klvae_status_t st)
{
    kv_backend *be = io->be;
    if (st == KLVAE_OK && t->owned && array)
        st = io->device ? kv_plugin_status(io->device->export_device(be, array, t))
                        : be->ops->download(be, array, t);
    kv_tensor_release(be, t);
    return st;
}

static klvae_status_t check_sizes(const char *fn, int n, int h, int w, const char *hname,
                                  const char *wname)
{
    if (n <= 0)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "%s: n is %d; it must be at least 1", fn, n);
    if (h <= 0 || w <= 0)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "%s: %s x %s is %d x %d; both must be positive",
                        fn, hname, wname, h, w);
    return KLVAE_OK;
}

/* The arguments of klvae_encode and klvae_encode_device (fn). */
static klvae_status_t check_encode(const char *fn, const klvae_model_t *m, const float *images,
                                   int n, int h, int w, const float *mean, const float *logvar)
{
    if (!m || !images || !mean)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "%s: %s is NULL", fn,
                        !m ? "model" : !images ? "images" : "mean");
    klvae_status_t st = check_sizes(fn, n, h, w, "h", "w");
    if (st != KLVAE_OK)
        return st;
    const int f = kv_config_factor(&m->cfg);
    if (h % f != 0 || w % f != 0)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "%s: image size %d x %d is not a multiple of the downsampling "
                        "factor %d (pad or crop it first)",
                        fn, h, w, f);
    const int c = m->cfg.in_channels, z = m->cfg.latent_channels;
    size_t n_in, n_out;
    if (!kv_numel4(n, c, h, w, &n_in) || !kv_numel4(n, z, h / f, w / f, &n_out))
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "%s: %d images of %d x %d are too large to address", fn, n, h, w);
    if (overlaps(images, n_in, mean, n_out) || overlaps(images, n_in, logvar, n_out) ||
        overlaps(mean, n_out, logvar, n_out))
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "%s: images, mean and logvar must not overlap", fn);
    return KLVAE_OK;
}

/* The arguments of klvae_decode and klvae_decode_device (fn). */
static klvae_status_t check_decode(const char *fn, const klvae_model_t *m, const float *z, int n,
                                   int lat_h, int lat_w, const float *images)
{
    if (!m || !z || !images)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "%s: %s is NULL", fn,
                        !m ? "model" : !z ? "z" : "images");
    klvae_status_t st = check_sizes(fn, n, lat_h, lat_w, "lat_h", "lat_w");
    if (st != KLVAE_OK)
        return st;
    const int f = kv_config_factor(&m->cfg);
    const int zc = m->cfg.latent_channels, c = m->cfg.out_channels;
    size_t n_in, n_out;
    if (lat_h > (1 << 28) / f || lat_w > (1 << 28) / f || !kv_numel4(n, zc, lat_h, lat_w, &n_in) ||
        !kv_numel4(n, c, lat_h * f, lat_w * f, &n_out))
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "%s: %d latents of %d x %d are too large to address", fn, n, lat_h,
                        lat_w);
    if (overlaps(z, n_in, images, n_out))
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "%s: z and images must not overlap", fn);
    return KLVAE_OK;
}

/* The arguments of klvae_sample and klvae_sample_device (fn). */
static klvae_status_t check_sample(const char *fn, const klvae_model_t *m, const float *mean,
                                   const float *logvar, int n, int lat_h, int lat_w,
                                   const float *z)
{
    if (!m || !mean || !logvar || !z)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "%s: %s is NULL", fn,
                        !m ? "model" : !mean ? "mean" : !logvar ? "logvar" : "z");
    klvae_status_t st = check_sizes(fn, n, lat_h, lat_w, "lat_h", "lat_w");
    if (st != KLVAE_OK)
        return st;
    const int zc = m->cfg.latent_channels;
    size_t count;
    if (!kv_numel4(n, zc, lat_h, lat_w, &count))
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "%s: %d latents of %d x %d are too large to address", fn, n, lat_h,
                        lat_w);
    /* z may be mean or logvar exactly (elementwise in place), never a part. */
    if ((overlaps(z, count, mean, count) && z != mean) ||
        (overlaps(z, count, logvar, count) && z != logvar))
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "%s: z must be mean, logvar or a separate array, not a partly "
                        "overlapping one",
                        fn);
    return KLVAE_OK;
}

static void format_gib(uint64_t bytes, char *buf, size_t size)
{
    if (bytes >= ((uint64_t)1 << 30))
        snprintf(buf, size, "%.2f GiB", (double)bytes / (double)((uint64_t)1 << 30));
    else
        snprintf(buf, size, "%.1f MiB", (double)bytes / (double)((uint64_t)1 << 20));
}

/* Records how the forward ran, for klvae_model_get's "last_plan". */
static void note_plan(klvae_model_t *m, const kv_forward_plan *plan,
                      const kv_stream_report *report)
{
    char *text = m->infer.last_plan, limit[32], planned[32], peak[32], spilled[32], host[32];
    const size_t size = sizeof m->infer.last_plan;
    format_gib(plan->limit, limit, sizeof limit);
    format_gib(plan->planned_bytes, planned, sizeof planned);
    if (plan->mode == KV_FORWARD_UNTILED && plan->limit)
        snprintf(text, size, "untiled (about %s, within memory_limit %s)", planned, limit);
    else if (plan->mode == KV_FORWARD_UNTILED)
        snprintf(text, size, "untiled");
    else if (plan->mode == KV_FORWARD_BLEND)
        snprintf(text, size, "blend: tiles of %d pixels, overlap %g",
                 m->infer.tile_size ? m->infer.tile_size : m->cfg.sample_size,
                 m->infer.tile_overlap);
    else {
        format_gib(report->peak_bytes, peak, sizeof peak);
        format_gib(report->spilled_bytes, spilled, sizeof spilled);
        int at = snprintf(text, size,
                          "streamed: %d bands of %d to %d rows; %s held at most (planned %s, "
                          "memory_limit %s)",
                          report->bands, report->min_rows, report->max_rows, peak, planned, limit);
        if (!m->be->host_memory && at > 0 && (size_t)at < size) {
            /* a GPU: the above is its memory; the stores are in host memory */
            format_gib(report->host_peak_bytes, host, sizeof host);
            at += snprintf(text + at, size - (size_t)at, " on the device; %s in host memory",
                           host);
        }
        if (report->spilled_bytes && at > 0 && (size_t)at < size)
            snprintf(text + at, size - (size_t)at, "; %s spilled to a file in %s", spilled,
                     kv_spill_folder(m));
    }
}

/* A streamed or blended encode (the caller's host arrays). */
static klvae_status_t encode_planned(klvae_model_t *m, const kv_forward_plan *plan,
                                     const float *images, float *mean, float *logvar)
{
    kv_stream_report report;
    memset(&report, 0, sizeof report);
    klvae_status_t st = plan->mode == KV_FORWARD_BLEND
                            ? kv_blend_encode(m, plan, images, mean, logvar)
                            : kv_stream_encode(m, plan, images, mean, logvar, &report);
    if (st == KLVAE_OK)
        note_plan(m, plan, &report);
    return st;
}

static klvae_status_t decode_planned(klvae_model_t *m, const kv_forward_plan *plan,
                                     const float *z, float *images)
{
    kv_stream_report report;
    memset(&report, 0, sizeof report);
    klvae_status_t st = plan->mode == KV_FORWARD_BLEND
                            ? kv_blend_decode(m, plan, z, images)
                            : kv_stream_decode(m, plan, z, images, &report);
    if (st == KLVAE_OK)
        note_plan(m, plan, &report);
    return st;
}

/* The work of klvae_encode and klvae_encode_device, arguments checked. */
static klvae_status_t encode_arrays(klvae_model_t *m, const caller_arrays *io,
                                    const float *images, int n, int h, int w, float *mean,
                                    float *logvar)
{
    const int f = kv_config_factor(&m->cfg);
    const int c = m->cfg.in_channels, z = m->cfg.latent_channels;
    kv_forward_plan plan;
    klvae_status_t st = kv_plan_forward(m, true, n, h, w, io->device != NULL, &plan);
    if (st != KLVAE_OK || plan.mode != KV_FORWARD_UNTILED)
        return st == KLVAE_OK ? encode_planned(m, &plan, images, mean, logvar) : st;
    note_plan(m, &plan, NULL);
    kv_tensor x = {0}, mu = {0}, lv = {0};
    st = take_in(io, (float *)images, n, c, h, w, true, KV_STORAGE_COMPUTE, &x);
    if (st == KLVAE_OK)
        st = take_in(io, mean, n, z, h / f, w / f, false, KV_STORAGE_COMPUTE, &mu);
    if (st == KLVAE_OK && logvar)
        st = take_in(io, logvar, n, z, h / f, w / f, false, KV_STORAGE_COMPUTE, &lv);
    if (st == KLVAE_OK)
        st = kv_vae_encode(m, &x, &mu, logvar ? &lv : NULL);
    kv_tensor_release(io->be, &x);
    st = give_out(io, &mu, mean, st);
    return give_out(io, &lv, logvar, st);
}

/* The work of klvae_decode and klvae_decode_device. */
static klvae_status_t decode_arrays(klvae_model_t *m, const caller_arrays *io, const float *z,
                                    int n, int lat_h, int lat_w, float *images)
{
    const int f = kv_config_factor(&m->cfg);
    const int zc = m->cfg.latent_channels, c = m->cfg.out_channels;
    kv_forward_plan plan;
    klvae_status_t st =
        kv_plan_forward(m, false, n, lat_h * f, lat_w * f, io->device != NULL, &plan);
    if (st != KLVAE_OK || plan.mode != KV_FORWARD_UNTILED)
        return st == KLVAE_OK ? decode_planned(m, &plan, z, images) : st;
    note_plan(m, &plan, NULL);
    kv_tensor zt = {0}, out = {0};
    st = take_in(io, (float *)z, n, zc, lat_h, lat_w, true, KV_STORAGE_COMPUTE, &zt);
    if (st == KLVAE_OK)
        st = take_in(io, images, n, c, lat_h * f, lat_w * f, false, KV_STORAGE_COMPUTE, &out);
    if (st == KLVAE_OK)
        st = kv_vae_decode(m, &zt, NULL, &out);
    kv_tensor_release(io->be, &zt);
    return give_out(io, &out, images, st);
}

/* The work of klvae_sample and klvae_sample_device: in float32 whatever the
 * backend computes in, so that z is the CPU's bit for bit. */
static klvae_status_t sample_arrays(klvae_model_t *m, const caller_arrays *io, const float *mean,
                                    const float *logvar, int n, int lat_h, int lat_w,
                                    uint64_t seed, float *z)
{
    const int zc = m->cfg.latent_channels;
    kv_backend *be = io->be;
    kv_tensor mu = {0}, lv = {0}, zt = {0};
    klvae_status_t st =
        take_in(io, (float *)mean, n, zc, lat_h, lat_w, true, KV_STORAGE_FLOAT32, &mu);
    if (st == KLVAE_OK)
        st = take_in(io, (float *)logvar, n, zc, lat_h, lat_w, true, KV_STORAGE_FLOAT32, &lv);
    if (st == KLVAE_OK)
        st = take_in(io, z, n, zc, lat_h, lat_w, false, KV_STORAGE_FLOAT32, &zt);
    if (st == KLVAE_OK)
        st = be->ops->gaussian_sample(be, &mu, &lv, seed, 0, &zt);
    kv_tensor_release(be, &mu);
    kv_tensor_release(be, &lv);
    return give_out(io, &zt, z, st);
}

KLVAE_API klvae_status_t klvae_encode(klvae_model_t *m, const float *images, int n, int h, int w,
                                      float *mean, float *logvar)
{
    kv_error_clear();
    klvae_status_t st = check_encode("klvae_encode", m, images, n, h, w, mean, logvar);
    if (st == KLVAE_OK)
        st = kv_busy_enter(&m->busy, "klvae_encode");
    if (st != KLVAE_OK)
        return st;
    const caller_arrays io = {m->be, NULL};
    st = encode_arrays(m, &io, images, n, h, w, mean, logvar);
    kv_model_end_call(m);
    return kv_busy_leave(&m->busy, st);
}

KLVAE_API klvae_status_t klvae_decode(klvae_model_t *m, const float *z, int n, int lat_h,
                                      int lat_w, float *images)
{
    kv_error_clear();
    klvae_status_t st = check_decode("klvae_decode", m, z, n, lat_h, lat_w, images);
    if (st == KLVAE_OK)
        st = kv_busy_enter(&m->busy, "klvae_decode");
    if (st != KLVAE_OK)
        return st;
    const caller_arrays io = {m->be, NULL};
    st = decode_arrays(m, &io, z, n, lat_h, lat_w, images);
    kv_model_end_call(m);
    return kv_busy_leave(&m->busy, st);
}

KLVAE_API klvae_status_t klvae_sample(klvae_model_t *m, const float *mean, const float *logvar,
                                      int n, int lat_h, int lat_w, uint64_t seed, float *z)
{
    kv_error_clear();
    klvae_status_t st = check_sample("klvae_sample", m, mean, logvar, n, lat_h, lat_w, z);
    if (st == KLVAE_OK)
        st = kv_busy_enter(&m->busy, "klvae_sample");
    if (st != KLVAE_OK)
        return st;
    const caller_arrays io = {m->be, NULL};
    st = sample_arrays(m, &io, mean, logvar, n, lat_h, lat_w, seed, z);
    return kv_busy_leave(&m->busy, st);
}

/* ---- inference on device memory ---- */

/* Starts a klvae_*_device call: the model must run on a plugin's backend,
 * which then works on the caller's stream; marks the model in use until
 * device_end. */
static klvae_status_t device_begin(const char *fn, const char *host_fn, klvae_model_t *m,
                                   void *stream)
{
    klvae_status_t st = kv_busy_enter(&m->busy, fn);
    if (st == KLVAE_OK && (st = kv_model_stream_enter(m, fn, host_fn, stream)) != KLVAE_OK)
        kv_busy_leave(&m->busy, st);
    return st;
}

/* Ends a klvae_*_device call whose work returned st (kv_model_stream_leave)
 * and leaves the model. */
static klvae_status_t device_end(klvae_model_t *m, klvae_status_t st)
{
    st = kv_model_stream_leave(m, st, false);
    return kv_busy_leave(&m->busy, st);
}

KLVAE_API klvae_status_t klvae_encode_device(klvae_model_t *m, const float *images, int n, int h,
                                             int w, float *mean, float *logvar, void *stream)
{
    kv_error_clear();
    klvae_status_t st = check_encode("klvae_encode_device", m, images, n, h, w, mean, logvar);
    if (st == KLVAE_OK)
        st = device_begin("klvae_encode_device", "klvae_encode", m, stream);
    if (st != KLVAE_OK)
        return st;
    const caller_arrays io = {m->be, m->plugin};
    return device_end(m, encode_arrays(m, &io, images, n, h, w, mean, logvar));
}

KLVAE_API klvae_status_t klvae_decode_device(klvae_model_t *m, const float *z, int n, int lat_h,
                                             int lat_w, float *images, void *stream)
{
    kv_error_clear();
    klvae_status_t st = check_decode("klvae_decode_device", m, z, n, lat_h, lat_w, images);
    if (st == KLVAE_OK)
        st = device_begin("klvae_decode_device", "klvae_decode", m, stream);
    if (st != KLVAE_OK)
        return st;
    const caller_arrays io = {m->be, m->plugin};
    return device_end(m, decode_arrays(m, &io, z, n, lat_h, lat_w, images));
}

KLVAE_API klvae_status_t klvae_sample_device(klvae_model_t *m, const float *mean,
                                             const float *logvar, int n, int lat_h, int lat_w,
                                             uint64_t seed, float *z, void *stream)
{
    kv_error_clear();
    klvae_status_t st =
        check_sample("klvae_sample_device", m, mean, logvar, n, lat_h, lat_w, z);
    if (st == KLVAE_OK)
        st = device_begin("klvae_sample_device", "klvae_sample", m, stream);
    if (st != KLVAE_OK)
        return st;
    const caller_arrays io = {m->be, m->plugin};
    return device_end(m, sample_arrays(m, &io, mean, logvar, n, lat_h, lat_w, seed, z));
}
