/* settings.c — see settings.h. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/options.h"
#include "dataset/settings.h"
#include "model/model.h"

uint64_t kv_hash_bytes(uint64_t h, const void *data, size_t n)
{
    const unsigned char *p = data;
    const uint64_t prime = 0x100000001b3ull;
    for (; n >= 8; n -= 8, p += 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        h = (h ^ word) * prime;
        h ^= h >> 29;
    }
    for (; n > 0; n--, p++)
        h = (h ^ *p) * prime;
    return h;
}

uint64_t kv_hash_text(uint64_t h, const char *text)
{
    return kv_hash_bytes(h, text, strlen(text) + 1);
}

void kv_hash_hex(uint64_t h, char out[17])
{
    snprintf(out, 17, "%016llx", (unsigned long long)h);
}

uint64_t kv_ds_sample_seed(uint64_t seed, uint32_t file, int copy)
{
    uint64_t z = seed + 0x9E3779B97F4A7C15ull * ((uint64_t)file * 2 + (uint64_t)copy + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

const char *kv_ds_dtype_name(kv_ds_dtype dtype)
{
    return dtype == KV_DS_BF16 ? "BF16" : dtype == KV_DS_F16 ? "F16" : "F32";
}

int kv_ds_dtype_size(kv_ds_dtype dtype)
{
    return dtype == KV_DS_F32 ? 4 : 2;
}

void kv_ds_settings_free(kv_ds_settings *s)
{
    free(s->buckets);
    free(s->model_name);
    json_decref(s->model_config);
    memset(s, 0, sizeof *s);
}

/* Rank and size from a launcher's two variables, when both are set. */
static klvae_status_t part_from_env(const char *rank_var, const char *size_var,
                                    kv_ds_settings *s, bool *found)
{
    const char *rank = getenv(rank_var), *size = getenv(size_var);
    *found = rank && size;
    if (!*found)
        return KLVAE_OK;
    char text[64];
    snprintf(text, sizeof text, "%s/%s", rank, size);
    if (!kv_parse_part(text, &s->part, &s->parts))
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "option part is auto, and the environment's %s=%s and %s=%s are no rank "
                        "and size (0 <= rank < size); give --part I/N",
                        rank_var, rank, size_var, size);
    s->part_source = rank_var[0] == 'O' ? "OMPI_COMM_WORLD_RANK/SIZE" : "PMI_RANK/SIZE";
    return KLVAE_OK;
}

static klvae_status_t resolve_part(const klvae_options_t *opts, kv_ds_settings *s)
{
    const char *text = kv_options_string(opts, "part");
    s->part = 0;
    s->parts = 1;
    if (strcmp(text, "auto") != 0) {
        kv_parse_part(text, &s->part, &s->parts); /* validated when set */
        s->part_source = "option";
        return KLVAE_OK;
    }
    bool found;
    klvae_status_t st = part_from_env("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", s, &found);
    if (st != KLVAE_OK || found)
        return st;
    st = part_from_env("PMI_RANK", "PMI_SIZE", s, &found);
    if (st == KLVAE_OK && !found)
        s->part_source = "default";
    return st;
}

/* The buckets option, or the one square bucket of size. */
static klvae_status_t resolve_buckets(const klvae_options_t *opts, kv_ds_settings *s)
{
    const char *text = kv_options_string(opts, "buckets");
    s->use_buckets = strcmp(text, "none") != 0;
    if (!s->use_buckets) {
        if (s->size % s->factor != 0)
            return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                            "option size %d is not a multiple of the model's downsampling "
                            "factor %d", s->size, s->factor);
        s->buckets = malloc(sizeof *s->buckets);
        if (!s->buckets)
            return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory");
        s->buckets[0].h = s->buckets[0].w = s->size;
        s->nbuckets = 1;
        return KLVAE_OK;
    }
    kv_parse_buckets(text, &s->bucket_side, &s->bucket_step, &s->bucket_ratio);
    if (s->bucket_step % s->factor != 0)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "option buckets %s: the step %d is not a multiple of the model's "
                        "downsampling factor %d", text, s->bucket_step, s->factor);
    return kv_buckets_make(s->bucket_side, s->bucket_step, s->bucket_ratio, &s->buckets,
                           &s->nbuckets);
}

/* The model's config keys as option text, and their hash. */
static klvae_status_t hash_config(klvae_model_t *model, kv_ds_settings *s)
{
    static const char *const keys[] = {
        "in_channels",      "out_channels",        "latent_channels",
        "block_out_channels", "layers_per_block",  "norm_num_groups",
        "act_fn",           "use_quant_conv",      "use_post_quant_conv",
        "mid_block_add_attention", "scaling_factor", "shift_factor"};
    s->model_config = json_object();
    uint64_t h = KV_HASH_START;
    for (size_t i = 0; s->model_config && i < KV_ARRAY_LEN(keys); i++) {
        char value[256];
        klvae_status_t st = klvae_model_get(model, keys[i], value, sizeof value);
        if (st != KLVAE_OK)
            return st;
        h = kv_hash_text(kv_hash_text(h, keys[i]), value);
        json_object_set_new(s->model_config, keys[i], json_string(value));
    }
    if (!s->model_config)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory");
    kv_hash_hex(h, s->config_hash);
    return KLVAE_OK;
}

/* The encoder's weights (all that decides a latent) as float32, hashed. */
static klvae_status_t hash_encoder(klvae_model_t *m, kv_ds_settings *s)
{
    size_t largest = 1;
    for (size_t i = 0; i < m->num_params; i++)
        largest = KV_MAX(largest, kv_tensor_numel(m->params[i].tensor));
    float *host = malloc(largest * sizeof *host);
    if (!host)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory hashing the model's weights");
    klvae_status_t st = kv_busy_enter(&m->busy, "klvae_encode_dataset");
    if (st != KLVAE_OK) {
        free(host);
        return st;
    }
    uint64_t h = KV_HASH_START;
    for (size_t i = 0; st == KLVAE_OK && i < m->num_params; i++) {
        const kv_param *p = &m->params[i];
        if (strncmp(p->name, "encoder.", 8) != 0 && strncmp(p->name, "quant_conv.", 11) != 0)
            continue;
        st = m->be->ops->download(m->be, host, p->tensor);
        h = kv_hash_bytes(kv_hash_text(h, p->name), host,
                          kv_tensor_numel(p->tensor) * sizeof *host);
    }
    st = kv_busy_leave(&m->busy, st);
    free(host);
    kv_hash_hex(h, s->weights_hash);
    return st;
}

static klvae_status_t read_options(const klvae_options_t *opts, kv_ds_settings *s)
{
    s->size = kv_options_int(opts, "size");
    s->random_crop = strcmp(kv_options_string(opts, "crop"), "random") == 0;
    s->flip = kv_options_bool(opts, "flip");
    s->store_sample = strcmp(kv_options_string(opts, "store"), "sample") == 0;
    const char *dtype = kv_options_string(opts, "dtype");
    s->dtype = strcmp(dtype, "bf16") == 0 ? KV_DS_BF16 : strcmp(dtype, "fp16") == 0 ? KV_DS_F16
                                                                                      : KV_DS_F32;
    s->scale = kv_options_bool(opts, "scale_latents");
    s->shard_size = kv_options_int(opts, "shard_size");
    s->encode_batch = kv_options_int(opts, "encode_batch");
    s->loader_threads = kv_options_int(opts, "loader_threads");
    s->seed = kv_options_uint64(opts, "seed");
    s->max_pixels = kv_options_uint64(opts, "max_image_pixels");
    s->model_name = kv_strdup(kv_options_string(opts, "model_name"));
    return s->model_name ? KLVAE_OK : KLVAE_ERR_OUT_OF_MEMORY;
}

klvae_status_t kv_ds_settings_make(klvae_model_t *model, const klvae_options_t *opts,
                                   kv_ds_settings *out)
{
    memset(out, 0, sizeof *out);
    kv_ds_settings *s = out;
    s->in_channels = klvae_model_in_channels(model);
    s->latent_channels = klvae_model_latent_channels(model);
    s->factor = klvae_model_downsampling_factor(model);
    s->scaling_factor = klvae_model_scaling_factor(model);
    s->shift_factor = klvae_model_shift_factor(model);
    s->has_shift = model->cfg.has_shift_factor;
    klvae_status_t st = read_options(opts, s);
    if (st == KLVAE_OK && s->in_channels != 3)
        st = kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                      "klvae_encode_dataset: the model takes %d input channels; images are RGB",
                      s->in_channels);
    if (st == KLVAE_OK)
        st = resolve_part(opts, s);
    if (st == KLVAE_OK)
        st = resolve_buckets(opts, s);
    if (st == KLVAE_OK && s->loader_threads == 0) {
        int cpus = kv_cpu_count();
        bool gpu = strcmp(klvae_model_backend(model), "cpu") != 0;
        s->loader_threads = gpu ? cpus : KV_MAX(1, cpus / 8);
    }
    if (st == KLVAE_OK)
        st = hash_config(model, s);
    if (st == KLVAE_OK)
        st = hash_encoder(model, s);
    if (st != KLVAE_OK)
        kv_ds_settings_free(s);
    return st;
}

static json_t *int_pair(int a, int b)
{
    return json_pack("[i, i]", a, b);
}

static json_t *preprocessing_json(const kv_ds_settings *s)
{
    json_t *buckets = json_array();
    for (int i = 0; buckets && i < s->nbuckets; i++)
        json_array_append_new(buckets, int_pair(s->buckets[i].h, s->buckets[i].w));
    json_t *p = json_pack("{s:o, s:s, s:b, s:I, s:I}", "buckets", buckets, "crop",
                          s->random_crop ? "random" : "center", "flip", s->flip, "seed",
                          (json_int_t)s->seed, "max_image_pixels", (json_int_t)s->max_pixels);
    if (p && s->use_buckets)
        json_object_set_new(p, "bucket_spec", json_pack("{s:i, s:i, s:f}", "side", s->bucket_side,
                                                        "step", s->bucket_step, "max_ratio",
                                                        s->bucket_ratio));
    else if (p)
        json_object_set_new(p, "size", json_integer(s->size));
    return p;
}

json_t *kv_ds_settings_json(const kv_ds_settings *s, const kv_image_files *files)
{
    uint64_t h = KV_HASH_START;
    for (size_t i = 0; i < files->count; i++)
        h = kv_hash_text(h, files->names[i]);
    char files_hash[17];
    kv_hash_hex(h, files_hash);
    json_t *model = json_pack("{s:O, s:s, s:s, s:i, s:i}", "config", s->model_config,
                              "config_hash", s->config_hash, "weights_hash", s->weights_hash,
                              "latent_channels", s->latent_channels, "downsampling_factor",
                              s->factor);
    json_t *storage = json_pack("{s:s, s:s, s:b, s:i}", "store",
                                s->store_sample ? "sample" : "posterior", "dtype",
                                kv_ds_dtype_name(s->dtype), "scaled", s->scale, "shard_size",
                                s->shard_size);
    json_t *source = json_pack("{s:I, s:s}", "files", (json_int_t)files->count, "names_hash",
                               files_hash);
    return json_pack("{s:s, s:i, s:o, s:o, s:o, s:o, s:i}", "format", "klvae-latents", "version",
                     1, "model", model, "preprocessing", preprocessing_json(s), "storage",
                     storage, "source", source, "parts", s->parts);
}
