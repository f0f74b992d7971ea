/* config.h — the AutoencoderKL configuration: defaults, named configs,
 * config.json reading and writing, and validation. */
#ifndef KV_CONFIG_H
#define KV_CONFIG_H

#include "backend/backend.h"
#include "base/options.h"

#define KV_MAX_BLOCKS 8
#define KV_MAX_LAYERS 15 /* layers_per_block; the decoder has one more */

typedef struct kv_config {
    int in_channels, out_channels, latent_channels;
    int num_blocks;
    int block_out_channels[KV_MAX_BLOCKS];
    int layers_per_block;
    int norm_num_groups;
    char act_fn[8]; /* as written in config.json: silu, swish, gelu, relu, mish */
    bool use_quant_conv, use_post_quant_conv, mid_block_add_attention;
    double scaling_factor;
    bool has_shift_factor;
    double shift_factor;
    int sample_size;
    /* Other config.json keys (force_upcast, latents_mean, ...) kept as a JSON
     * object text so that saving writes them back; NULL when none. Owned. */
    char *extra_json;
} kv_config;

/* diffusers' AutoencoderKL class defaults: what a config.json key that is
 * missing means. */
void kv_config_class_defaults(kv_config *cfg);

/* A named config: "sd", "small", "tiny". */
klvae_status_t kv_config_named(const char *name, kv_config *cfg);

/* For klvae_model_create: the named config of option "config", then every
 * model key that is set. Validated. */
klvae_status_t kv_config_from_options(const klvae_options_t *opts, kv_config *cfg);

/* For klvae_model_load: applies scaling/shift overrides, and for single files
 * (from_file_shapes) norm_num_groups and act_fn; any other model key that is
 * set must agree with cfg. */
klvae_status_t kv_config_apply_load_options(const klvae_options_t *opts, bool from_file_shapes,
                                            kv_config *cfg);

/* Checks every invariant (channel counts divisible by the groups, ...). */
klvae_status_t kv_config_validate(const kv_config *cfg);

klvae_status_t kv_config_read_json(const char *path, kv_config *cfg);
/* Writes config.json atomically. */
klvae_status_t kv_config_write_json(const kv_config *cfg, const char *path);

/* The value of a model-config key as its option string. */
klvae_status_t kv_config_get(const kv_config *cfg, const char *key, char *buf, size_t size);

kv_activation kv_config_activation(const kv_config *cfg);
int kv_config_factor(const kv_config *cfg);

/* Deep copy and release (extra_json is the only owned member). */
klvae_status_t kv_config_copy(kv_config *dst, const kv_config *src);
void kv_config_free(kv_config *cfg);

#endif
