/* config.c — see config.h. JSON goes through jansson. */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/io.h"
#include "model/config.h"

void kv_config_class_defaults(kv_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->in_channels = 3;
    cfg->out_channels = 3;
    cfg->latent_channels = 4;
    cfg->num_blocks = 1;
    cfg->block_out_channels[0] = 64;
    cfg->layers_per_block = 1;
    cfg->norm_num_groups = 32;
    strcpy(cfg->act_fn, "silu");
    cfg->use_quant_conv = true;
    cfg->use_post_quant_conv = true;
    cfg->mid_block_add_attention = true;
    cfg->scaling_factor = 0.18215;
    cfg->has_shift_factor = false;
    cfg->sample_size = 32;
}

static void set_blocks(kv_config *cfg, int n, const int *channels)
{
    cfg->num_blocks = n;
    for (int i = 0; i < n; i++)
        cfg->block_out_channels[i] = channels[i];
}

klvae_status_t kv_config_named(const char *name, kv_config *cfg)
{
    kv_config_class_defaults(cfg);
    if (strcmp(name, "sd") == 0) {
        static const int ch[] = {128, 256, 512, 512};
        set_blocks(cfg, 4, ch);
        cfg->layers_per_block = 2;
        cfg->sample_size = 512;
    } else if (strcmp(name, "small") == 0) {
        static const int ch[] = {32, 64, 128, 128};
        set_blocks(cfg, 4, ch);
        cfg->layers_per_block = 1;
        cfg->norm_num_groups = 16;
        cfg->sample_size = 256;
    } else if (strcmp(name, "tiny") == 0) {
        static const int ch[] = {16, 32};
        set_blocks(cfg, 2, ch);
        cfg->layers_per_block = 1;
        cfg->norm_num_groups = 8;
        cfg->sample_size = 64;
    } else {
        return kv_error(KLVAE_ERR_OPTION, "unknown config '%s' (expected sd, small or tiny)",
                        name);
    }
    return KLVAE_OK;
}

kv_activation kv_config_activation(const kv_config *cfg)
{
    if (strcmp(cfg->act_fn, "gelu") == 0)
        return KV_ACT_GELU;
    if (strcmp(cfg->act_fn, "relu") == 0)
        return KV_ACT_RELU;
    if (strcmp(cfg->act_fn, "mish") == 0)
        return KV_ACT_MISH;
    return KV_ACT_SILU;
}

int kv_config_factor(const kv_config *cfg)
{
    return 1 << (cfg->num_blocks - 1);
}

static bool known_activation(const char *name)
{
    return strcmp(name, "silu") == 0 || strcmp(name, "swish") == 0 ||
           strcmp(name, "gelu") == 0 || strcmp(name, "relu") == 0 || strcmp(name, "mish") == 0;
}

klvae_status_t kv_config_validate(const kv_config *cfg)
{
    if (cfg->num_blocks < 1 || cfg->num_blocks > KV_MAX_BLOCKS)
        return kv_error(KLVAE_ERR_CONFIG, "block_out_channels has %d entries; 1 to %d are supported",
                        cfg->num_blocks, KV_MAX_BLOCKS);
    if (cfg->layers_per_block < 1 || cfg->layers_per_block > KV_MAX_LAYERS)
        return kv_error(KLVAE_ERR_CONFIG, "layers_per_block is %d; 1 to %d are supported",
                        cfg->layers_per_block, KV_MAX_LAYERS);
    if (cfg->in_channels < 1 || cfg->out_channels < 1 || cfg->latent_channels < 1)
        return kv_error(KLVAE_ERR_CONFIG, "in_channels, out_channels and latent_channels must be "
                                          "positive (got %d, %d, %d)",
                        cfg->in_channels, cfg->out_channels, cfg->latent_channels);
    if (cfg->norm_num_groups < 1)
        return kv_error(KLVAE_ERR_CONFIG, "norm_num_groups must be positive (got %d)",
                        cfg->norm_num_groups);
    for (int i = 0; i < cfg->num_blocks; i++) {
        int c = cfg->block_out_channels[i];
        if (c < 1)
            return kv_error(KLVAE_ERR_CONFIG, "block_out_channels[%d] is %d; it must be positive",
                            i, c);
        if (c % cfg->norm_num_groups != 0)
            return kv_error(KLVAE_ERR_CONFIG,
                            "block_out_channels[%d] = %d is not divisible by norm_num_groups = %d",
                            i, c, cfg->norm_num_groups);
    }
    if (!known_activation(cfg->act_fn))
        return kv_error(KLVAE_ERR_CONFIG, "act_fn '%s' is not supported (silu, swish, gelu, relu, mish)",
                        cfg->act_fn);
    if (!isfinite(cfg->scaling_factor) || (cfg->has_shift_factor && !isfinite(cfg->shift_factor)))
        return kv_error(KLVAE_ERR_CONFIG, "scaling_factor and shift_factor must be finite");
    return KLVAE_OK;
}

/* Copies the set model keys of opts into cfg. */
static void apply_model_keys(const klvae_options_t *opts, kv_config *cfg)
{
    if (kv_options_is_set(opts, "in_channels"))
        cfg->in_channels = kv_options_int(opts, "in_channels");
    if (kv_options_is_set(opts, "out_channels"))
        cfg->out_channels = kv_options_int(opts, "out_channels");
    if (kv_options_is_set(opts, "latent_channels"))
        cfg->latent_channels = kv_options_int(opts, "latent_channels");
    if (kv_options_is_set(opts, "block_out_channels")) {
        kv_int_list list = kv_options_int_list(opts, "block_out_channels");
        int n = KV_MIN(list.count, KV_MAX_BLOCKS);
        set_blocks(cfg, n, list.values);
        if (list.count > KV_MAX_BLOCKS)
            cfg->num_blocks = list.count; /* rejected by validation */
    }
    if (kv_options_is_set(opts, "layers_per_block"))
        cfg->layers_per_block = kv_options_int(opts, "layers_per_block");
    if (kv_options_is_set(opts, "norm_num_groups"))
        cfg->norm_num_groups = kv_options_int(opts, "norm_num_groups");
    if (kv_options_is_set(opts, "act_fn"))
        snprintf(cfg->act_fn, sizeof cfg->act_fn, "%s", kv_options_string(opts, "act_fn"));
    if (kv_options_is_set(opts, "use_quant_conv"))
        cfg->use_quant_conv = kv_options_bool(opts, "use_quant_conv");
    if (kv_options_is_set(opts, "use_post_quant_conv"))
        cfg->use_post_quant_conv = kv_options_bool(opts, "use_post_quant_conv");
    if (kv_options_is_set(opts, "mid_block_add_attention"))
        cfg->mid_block_add_attention = kv_options_bool(opts, "mid_block_add_attention");
    if (kv_options_is_set(opts, "scaling_factor"))
        cfg->scaling_factor = kv_options_double(opts, "scaling_factor");
    if (kv_options_is_set(opts, "shift_factor"))
        cfg->has_shift_factor =
            kv_options_optional_double(opts, "shift_factor", &cfg->shift_factor);
}

klvae_status_t kv_config_from_options(const klvae_options_t *opts, kv_config *cfg)
{
    klvae_status_t st = kv_config_named(kv_options_string(opts, "config"), cfg);
    if (st != KLVAE_OK)
        return st;
    apply_model_keys(opts, cfg);
    return kv_config_validate(cfg);
}

/* The model keys that describe structure: given at load time, they must
 * agree with the model found. */
static const char *const structural_keys[] = {
    "in_channels",        "out_channels",   "latent_channels",
    "block_out_channels", "layers_per_block", "use_quant_conv",
    "use_post_quant_conv", "mid_block_add_attention",
};

klvae_status_t kv_config_apply_load_options(const klvae_options_t *opts, bool from_file_shapes,
                                            kv_config *cfg)
{
    for (size_t i = 0; i < KV_ARRAY_LEN(structural_keys); i++) {
        const char *key = structural_keys[i];
        if (!kv_options_is_set(opts, key))
            continue;
        char found[128];
        kv_config_get(cfg, key, found, sizeof found);
        kv_config probe = *cfg;
        probe.extra_json = NULL;
        apply_model_keys(opts, &probe);
        char wanted[128];
        kv_config_get(&probe, key, wanted, sizeof wanted);
        if (strcmp(found, wanted) != 0)
            return kv_error(KLVAE_ERR_CONFIG,
                            "option %s=%s disagrees with the model, which has %s=%s", key,
                            kv_options_value(opts, key), key, found);
    }
    static const char *const file_keys[] = {"norm_num_groups", "act_fn"};
    for (size_t i = 0; i < KV_ARRAY_LEN(file_keys); i++) {
        const char *key = file_keys[i];
        if (!kv_options_is_set(opts, key) || from_file_shapes)
            continue;
        char found[64], wanted[64];
        kv_config_get(cfg, key, found, sizeof found);
        snprintf(wanted, sizeof wanted, "%s", kv_options_value(opts, key));
        if (strcmp(found, "swish") == 0) /* one activation, two names */
            strcpy(found, "silu");
        if (strcmp(wanted, "swish") == 0)
            strcpy(wanted, "silu");
        if (strcmp(found, wanted) != 0)
            return kv_error(KLVAE_ERR_CONFIG,
                            "option %s=%s disagrees with config.json, which has %s=%s", key,
                            wanted, key, found);
    }
    if (from_file_shapes) {
        if (kv_options_is_set(opts, "norm_num_groups"))
            cfg->norm_num_groups = kv_options_int(opts, "norm_num_groups");
        if (kv_options_is_set(opts, "act_fn"))
            snprintf(cfg->act_fn, sizeof cfg->act_fn, "%s", kv_options_string(opts, "act_fn"));
    }
    if (kv_options_is_set(opts, "scaling_factor"))
        cfg->scaling_factor = kv_options_double(opts, "scaling_factor");
    if (kv_options_is_set(opts, "shift_factor"))
        cfg->has_shift_factor =
            kv_options_optional_double(opts, "shift_factor", &cfg->shift_factor);
    return kv_config_validate(cfg);
}

klvae_status_t kv_config_get(const kv_config *cfg, const char *key, char *buf, size_t size)
{
    char text[256];
    if (strcmp(key, "in_channels") == 0)
        snprintf(text, sizeof text, "%d", cfg->in_channels);
    else if (strcmp(key, "out_channels") == 0)
        snprintf(text, sizeof text, "%d", cfg->out_channels);
    else if (strcmp(key, "latent_channels") == 0)
        snprintf(text, sizeof text, "%d", cfg->latent_channels);
    else if (strcmp(key, "block_out_channels") == 0) {
        kv_int_list list;
        list.count = cfg->num_blocks;
        for (int i = 0; i < cfg->num_blocks && i < KV_MAX_LIST; i++)
            list.values[i] = cfg->block_out_channels[i];
        kv_format_int_list(&list, text, sizeof text);
    } else if (strcmp(key, "layers_per_block") == 0)
        snprintf(text, sizeof text, "%d", cfg->layers_per_block);
    else if (strcmp(key, "norm_num_groups") == 0)
        snprintf(text, sizeof text, "%d", cfg->norm_num_groups);
    else if (strcmp(key, "act_fn") == 0)
        snprintf(text, sizeof text, "%s", cfg->act_fn);
    else if (strcmp(key, "use_quant_conv") == 0)
        snprintf(text, sizeof text, "%s", cfg->use_quant_conv ? "true" : "false");
    else if (strcmp(key, "use_post_quant_conv") == 0)
        snprintf(text, sizeof text, "%s", cfg->use_post_quant_conv ? "true" : "false");
    else if (strcmp(key, "mid_block_add_attention") == 0)
        snprintf(text, sizeof text, "%s", cfg->mid_block_add_attention ? "true" : "false");
    else if (strcmp(key, "scaling_factor") == 0)
        kv_format_double(cfg->scaling_factor, text, sizeof text);
    else if (strcmp(key, "shift_factor") == 0) {
        if (cfg->has_shift_factor)
            kv_format_double(cfg->shift_factor, text, sizeof text);
        else
            snprintf(text, sizeof text, "none");
    } else
        return kv_error(KLVAE_ERR_OPTION, "'%s' is not a model config key", key);
    return kv_copy_out("klvae_model_get", key, text, buf, size);
}

klvae_status_t kv_config_copy(kv_config *dst, const kv_config *src)
{
    *dst = *src;
    dst->extra_json = NULL;
    if (src->extra_json) {
        dst->extra_json = kv_strdup(src->extra_json);
        if (!dst->extra_json)
            return KLVAE_ERR_OUT_OF_MEMORY;
    }
    return KLVAE_OK;
}

void kv_config_free(kv_config *cfg)
{
    free(cfg->extra_json);
    cfg->extra_json = NULL;
}

/* ---- config.json ---- */

static klvae_status_t json_int(json_t *root, const char *key, const char *path, int min, int max,
                               int *out)
{
    json_t *v = json_object_get(root, key);
    if (!v)
        return KLVAE_OK;
    if (!json_is_integer(v) || json_integer_value(v) < min || json_integer_value(v) > max)
        return kv_error(KLVAE_ERR_CONFIG, "%s: \"%s\" must be an integer from %d to %d", path,
                        key, min, max);
    *out = (int)json_integer_value(v);
    return KLVAE_OK;
}

static klvae_status_t json_bool(json_t *root, const char *key, const char *path, bool *out)
{
    json_t *v = json_object_get(root, key);
    if (!v)
        return KLVAE_OK;
    if (!json_is_boolean(v))
        return kv_error(KLVAE_ERR_CONFIG, "%s: \"%s\" must be true or false", path, key);
    *out = json_is_true(v);
    return KLVAE_OK;
}

static klvae_status_t json_block_types(json_t *root, const char *key, const char *expected,
                                       const char *path, int *count)
{
    json_t *v = json_object_get(root, key);
    if (!v) {
        *count = -1;
        return KLVAE_OK;
    }
    if (!json_is_array(v))
        return kv_error(KLVAE_ERR_CONFIG, "%s: \"%s\" must be a list", path, key);
    for (size_t i = 0; i < json_array_size(v); i++) {
        json_t *item = json_array_get(v, i);
        if (!json_is_string(item) || strcmp(json_string_value(item), expected) != 0)
            return kv_error(KLVAE_ERR_CONFIG,
                            "%s: %s[%zu] is %s%s%s; AutoencoderKL supports only %s", path, key, i,
                            json_is_string(item) ? "\"" : "",
                            json_is_string(item) ? json_string_value(item) : "not a string",
                            json_is_string(item) ? "\"" : "", expected);
    }
    *count = (int)json_array_size(v);
    return KLVAE_OK;
}

static bool is_known_key(const char *key)
{
    static const char *const known[] = {
        "_class_name",     "_diffusers_version", "_name_or_path",   "in_channels",
        "out_channels",    "down_block_types",   "up_block_types",  "block_out_channels",
        "layers_per_block", "act_fn",            "latent_channels", "norm_num_groups",
        "sample_size",     "scaling_factor",     "shift_factor",    "use_quant_conv",
        "use_post_quant_conv", "mid_block_add_attention",
    };
    for (size_t i = 0; i < KV_ARRAY_LEN(known); i++)
        if (strcmp(known[i], key) == 0)
            return true;
    return false;
}

static klvae_status_t parse_config_object(json_t *root, const char *path, kv_config *cfg)
{
    klvae_status_t st;
    json_t *cls = json_object_get(root, "_class_name");
    if (cls && (!json_is_string(cls) || strcmp(json_string_value(cls), "AutoencoderKL") != 0))
        return kv_error(KLVAE_ERR_CONFIG, "%s describes a %s, not an AutoencoderKL", path,
                        json_is_string(cls) ? json_string_value(cls) : "(non-string class)");
    if ((st = json_int(root, "in_channels", path, 1, 64, &cfg->in_channels)) ||
        (st = json_int(root, "out_channels", path, 1, 64, &cfg->out_channels)) ||
        (st = json_int(root, "latent_channels", path, 1, 1024, &cfg->latent_channels)) ||
        (st = json_int(root, "layers_per_block", path, 1, KV_MAX_LAYERS, &cfg->layers_per_block)) ||
        (st = json_int(root, "norm_num_groups", path, 1, 8192, &cfg->norm_num_groups)) ||
        (st = json_int(root, "sample_size", path, 1, 1 << 20, &cfg->sample_size)) ||
        (st = json_bool(root, "use_quant_conv", path, &cfg->use_quant_conv)) ||
        (st = json_bool(root, "use_post_quant_conv", path, &cfg->use_post_quant_conv)) ||
        (st = json_bool(root, "mid_block_add_attention", path, &cfg->mid_block_add_attention)))
        return st;

    json_t *channels = json_object_get(root, "block_out_channels");
    if (channels) {
        if (!json_is_array(channels) || json_array_size(channels) < 1 ||
            json_array_size(channels) > KV_MAX_BLOCKS)
            return kv_error(KLVAE_ERR_CONFIG,
                            "%s: \"block_out_channels\" must be a list of 1 to %d integers", path,
                            KV_MAX_BLOCKS);
        cfg->num_blocks = (int)json_array_size(channels);
        for (int i = 0; i < cfg->num_blocks; i++) {
            json_t *c = json_array_get(channels, (size_t)i);
            if (!json_is_integer(c) || json_integer_value(c) < 1 || json_integer_value(c) > 8192)
                return kv_error(KLVAE_ERR_CONFIG,
                                "%s: block_out_channels[%d] must be an integer from 1 to 8192",
                                path, i);
            cfg->block_out_channels[i] = (int)json_integer_value(c);
        }
    }
    int down, up;
    if ((st = json_block_types(root, "down_block_types", "DownEncoderBlock2D", path, &down)) ||
        (st = json_block_types(root, "up_block_types", "UpDecoderBlock2D", path, &up)))
        return st;
    if ((down >= 0 && down != cfg->num_blocks) || (up >= 0 && up != cfg->num_blocks))
        return kv_error(KLVAE_ERR_CONFIG,
                        "%s: block_out_channels has %d entries but down_block_types has %d and "
                        "up_block_types %d",
                        path, cfg->num_blocks, down < 0 ? 1 : down, up < 0 ? 1 : up);

    json_t *act = json_object_get(root, "act_fn");
    if (act) {
        if (!json_is_string(act) || !known_activation(json_string_value(act)))
            return kv_error(KLVAE_ERR_CONFIG,
                            "%s: act_fn must be one of silu, swish, gelu, relu, mish", path);
        snprintf(cfg->act_fn, sizeof cfg->act_fn, "%s", json_string_value(act));
    }
    json_t *scale = json_object_get(root, "scaling_factor");
    if (scale) {
        if (!json_is_number(scale))
            return kv_error(KLVAE_ERR_CONFIG, "%s: scaling_factor must be a number", path);
        cfg->scaling_factor = json_number_value(scale);
    }
    json_t *shift = json_object_get(root, "shift_factor");
    if (shift && !json_is_null(shift)) {
        if (!json_is_number(shift))
            return kv_error(KLVAE_ERR_CONFIG, "%s: shift_factor must be a number or null", path);
        cfg->has_shift_factor = true;
        cfg->shift_factor = json_number_value(shift);
    }

    /* Keep what we do not interpret, for saving. */
    json_t *extra = json_object();
    if (!extra)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory reading %s", path);
    const char *key;
    json_t *value;
    json_object_foreach(root, key, value)
    {
        if (!is_known_key(key))
            json_object_set(extra, key, value);
    }
    if (json_object_size(extra) > 0) {
        char *text = json_dumps(extra, JSON_COMPACT);
        if (!text) {
            json_decref(extra);
            return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory reading %s", path);
        }
        cfg->extra_json = kv_strdup(text);
        free(text);
        if (!cfg->extra_json) {
            json_decref(extra);
            return KLVAE_ERR_OUT_OF_MEMORY;
        }
    }
    json_decref(extra);
    return KLVAE_OK;
}

klvae_status_t kv_config_read_json(const char *path, kv_config *cfg)
{
    kv_config_class_defaults(cfg);
    char *text = NULL;
    size_t len = 0;
    klvae_status_t st = kv_read_text_file(path, 1 << 20, &text, &len);
    if (st != KLVAE_OK)
        return st;
    json_error_t jerr;
    json_t *root = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    free(text);
    if (!root)
        return kv_error(KLVAE_ERR_FORMAT, "%s: invalid JSON at line %d, column %d: %s", path,
                        jerr.line, jerr.column, jerr.text);
    if (!json_is_object(root)) {
        json_decref(root);
        return kv_error(KLVAE_ERR_FORMAT, "%s: expected a JSON object", path);
    }
    st = parse_config_object(root, path, cfg);
    json_decref(root);
    if (st == KLVAE_OK) {
        st = kv_config_validate(cfg);
        if (st != KLVAE_OK)
            kv_error_prefix(st, "%s", path);
    }
    if (st != KLVAE_OK)
        kv_config_free(cfg);
    return st;
}

/* The fewest significant digits that print every real in the document so
 * that it reads back exactly (0.18215, not 0.18215000000000001). */
static int real_precision(json_t *node, int at_least)
{
    if (json_is_real(node)) {
        double v = json_real_value(node);
        for (int p = at_least; p < 17; p++) {
            char text[64];
            snprintf(text, sizeof text, "%.*g", p, v);
            if (strtod(text, NULL) == v)
                return p;
        }
        return 17;
    }
    if (json_is_array(node)) {
        for (size_t i = 0; i < json_array_size(node); i++)
            at_least = real_precision(json_array_get(node, i), at_least);
    } else if (json_is_object(node)) {
        const char *key;
        json_t *value;
        json_object_foreach(node, key, value)
        {
            at_least = real_precision(value, at_least);
        }
    }
    return at_least;
}

klvae_status_t kv_config_write_json(const kv_config *cfg, const char *path)
{
    json_t *root = json_object();
    json_t *down = json_array(), *up = json_array(), *channels = json_array();
    if (!root || !down || !up || !channels) {
        json_decref(root);
        json_decref(down);
        json_decref(up);
        json_decref(channels);
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory writing %s", path);
    }
    for (int i = 0; i < cfg->num_blocks; i++) {
        json_array_append_new(down, json_string("DownEncoderBlock2D"));
        json_array_append_new(up, json_string("UpDecoderBlock2D"));
        json_array_append_new(channels, json_integer(cfg->block_out_channels[i]));
    }
    json_object_set_new(root, "_class_name", json_string("AutoencoderKL"));
    json_object_set_new(root, "_diffusers_version", json_string("0.30.0"));
    json_object_set_new(root, "act_fn", json_string(cfg->act_fn));
    json_object_set_new(root, "block_out_channels", channels);
    json_object_set_new(root, "down_block_types", down);
    json_object_set_new(root, "force_upcast", json_true());
    json_object_set_new(root, "in_channels", json_integer(cfg->in_channels));
    json_object_set_new(root, "latent_channels", json_integer(cfg->latent_channels));
    json_object_set_new(root, "latents_mean", json_null());
    json_object_set_new(root, "latents_std", json_null());
    json_object_set_new(root, "layers_per_block", json_integer(cfg->layers_per_block));
    json_object_set_new(root, "mid_block_add_attention", json_boolean(cfg->mid_block_add_attention));
    json_object_set_new(root, "norm_num_groups", json_integer(cfg->norm_num_groups));
    json_object_set_new(root, "out_channels", json_integer(cfg->out_channels));
    json_object_set_new(root, "sample_size", json_integer(cfg->sample_size));
    json_object_set_new(root, "scaling_factor", json_real(cfg->scaling_factor));
    json_object_set_new(root, "shift_factor",
                        cfg->has_shift_factor ? json_real(cfg->shift_factor) : json_null());
    json_object_set_new(root, "up_block_types", up);
    json_object_set_new(root, "use_post_quant_conv", json_boolean(cfg->use_post_quant_conv));
    json_object_set_new(root, "use_quant_conv", json_boolean(cfg->use_quant_conv));
    if (cfg->extra_json) {
        json_t *extra = json_loads(cfg->extra_json, 0, NULL);
        if (extra && json_is_object(extra))
            json_object_update(root, extra);
        json_decref(extra);
    }
    char *text = json_dumps(root, JSON_INDENT(2) | JSON_SORT_KEYS |
                                      JSON_REAL_PRECISION(real_precision(root, 1)));
    json_decref(root);
    if (!text)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory writing %s", path);
    kv_atomic_file f;
    klvae_status_t st = kv_atomic_open(&f, path);
    if (st == KLVAE_OK)
        st = kv_atomic_write(&f, text, strlen(text));
    if (st == KLVAE_OK)
        st = kv_atomic_write(&f, "\n", 1);
    if (st == KLVAE_OK)
        st = kv_atomic_commit(&f);
    free(text);
    return st;
}
