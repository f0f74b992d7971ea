/* weights.c — finding, checking and reading the parameters in a
 * safetensors file under any of the three naming schemes, and writing a
 * diffusers folder. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/io.h"
#include "formats/safetensors.h"
#include "model/model.h"

static const char *const known_prefixes[] = {"", "first_stage_model.", "vae."};

static const kv_st_tensor *find_prefixed(const kv_safetensors *st, const char *prefix,
                                         const char *name)
{
    return kv_st_find_prefixed(st, &prefix, 1, name);
}

klvae_status_t kv_weights_detect(const kv_safetensors *st, const char **prefix,
                                 kv_naming *naming)
{
    for (size_t i = 0; i < KV_ARRAY_LEN(known_prefixes); i++) {
        const char *p = known_prefixes[i];
        if (!find_prefixed(st, p, "encoder.conv_in.weight"))
            continue;
        *prefix = p;
        if (find_prefixed(st, p, "encoder.down_blocks.0.resnets.0.conv1.weight")) {
            *naming = KV_NAMING_DIFFUSERS;
            return KLVAE_OK;
        }
        if (find_prefixed(st, p, "encoder.down.0.block.0.conv1.weight")) {
            *naming = KV_NAMING_COMPVIS;
            return KLVAE_OK;
        }
        return kv_error(KLVAE_ERR_MISSING_TENSOR,
                        "%s: has %sencoder.conv_in.weight but neither "
                        "%sencoder.down_blocks.0.resnets.0.conv1.weight (diffusers) nor "
                        "%sencoder.down.0.block.0.conv1.weight (CompVis)",
                        st->path, p, p, p);
    }
    return kv_error(KLVAE_ERR_MISSING_TENSOR,
                    "%s: missing tensor 'encoder.conv_in.weight' (also looked for it under the "
                    "prefixes 'first_stage_model.' and 'vae.'): not an AutoencoderKL file",
                    st->path);
}

/* The tensor with a 4-D shape whose dims the inference reads. */
static klvae_status_t need_conv(const kv_safetensors *st, const char *prefix, const char *name,
                                const kv_st_tensor **out)
{
    const kv_st_tensor *t = find_prefixed(st, prefix, name);
    if (!t)
        return kv_error(KLVAE_ERR_MISSING_TENSOR, "%s: missing tensor '%s%s'", st->path, prefix,
                        name);
    if (t->ndim != 4 || t->shape[0] < 1 || t->shape[1] < 1 || t->shape[0] > 65536 ||
        t->shape[1] > 65536)
        return kv_error(KLVAE_ERR_SHAPE,
                        "%s: tensor '%s%s' should be a 4-D convolution weight, found %d-D",
                        st->path, prefix, name, t->ndim);
    *out = t;
    return KLVAE_OK;
}

klvae_status_t kv_weights_infer_config(const kv_safetensors *st, const char *prefix,
                                       kv_naming naming, kv_config *cfg)
{
    char name[KV_PARAM_NAME];
    const kv_st_tensor *t;
    klvae_status_t status;
    bool compvis = naming == KV_NAMING_COMPVIS;

    kv_config_class_defaults(cfg);
    cfg->sample_size = 512;
    if ((status = need_conv(st, prefix, "encoder.conv_in.weight", &t)) != KLVAE_OK)
        return status;
    cfg->in_channels = (int)t->shape[1];

    cfg->num_blocks = 0;
    for (int i = 0; i <= KV_MAX_BLOCKS; i++) {
        snprintf(name, sizeof name,
                 compvis ? "encoder.down.%d.block.0.conv1.weight"
                         : "encoder.down_blocks.%d.resnets.0.conv1.weight",
                 i);
        if (!find_prefixed(st, prefix, name))
            break;
        if (i == KV_MAX_BLOCKS)
            return kv_error(KLVAE_ERR_UNSUPPORTED, "%s: more than %d encoder levels", st->path,
                            KV_MAX_BLOCKS);
        if ((status = need_conv(st, prefix, name, &t)) != KLVAE_OK)
            return status;
        cfg->block_out_channels[i] = (int)t->shape[0];
        cfg->num_blocks = i + 1;
    }
    cfg->layers_per_block = 0;
    for (int j = 0; j <= KV_MAX_LAYERS; j++) {
        snprintf(name, sizeof name,
                 compvis ? "encoder.down.0.block.%d.conv1.weight"
                         : "encoder.down_blocks.0.resnets.%d.conv1.weight",
                 j);
        if (!find_prefixed(st, prefix, name))
            break;
        if (j == KV_MAX_LAYERS)
            return kv_error(KLVAE_ERR_UNSUPPORTED, "%s: more than %d resnets per level",
                            st->path, KV_MAX_LAYERS);
        cfg->layers_per_block = j + 1;
    }
    if ((status = need_conv(st, prefix, "decoder.conv_in.weight", &t)) != KLVAE_OK)
        return status;
    cfg->latent_channels = (int)t->shape[1];
    if ((status = need_conv(st, prefix, "decoder.conv_out.weight", &t)) != KLVAE_OK)
        return status;
    cfg->out_channels = (int)t->shape[0];
    cfg->use_quant_conv = find_prefixed(st, prefix, "quant_conv.weight") != NULL;
    cfg->use_post_quant_conv = find_prefixed(st, prefix, "post_quant_conv.weight") != NULL;
    cfg->mid_block_add_attention =
        find_prefixed(st, prefix,
                      compvis ? "encoder.mid.attn_1.norm.weight"
                              : "encoder.mid_block.attentions.0.group_norm.weight") != NULL;
    return KLVAE_OK;
}

/* The legacy diffusers spelling of an attention parameter, or NULL. */
static bool legacy_name(const char *name, char *out, size_t size)
{
    static const char *const from[] = {".to_q.", ".to_k.", ".to_v.", ".to_out.0."};
    static const char *const to[] = {".query.", ".key.", ".value.", ".proj_attn."};
    for (size_t i = 0; i < KV_ARRAY_LEN(from); i++) {
        const char *at = strstr(name, from[i]);
        if (at) {
            snprintf(out, size, "%.*s%s%s", (int)(at - name), name, to[i],
                     at + strlen(from[i]));
            return true;
        }
    }
    return false;
}

static void format_shape(char *buf, size_t size, int ndim, const int64_t *shape)
{
    size_t at = (size_t)snprintf(buf, size, "[");
    for (int d = 0; d < ndim && at < size; d++)
        at += (size_t)snprintf(buf + at, size - at, d ? ", %lld" : "%lld", (long long)shape[d]);
    if (at < size)
        snprintf(buf + at, size - at, "]");
}

static bool shape_matches(const kv_param *p, const kv_st_tensor *t)
{
    const kv_tensor *want = p->tensor;
    if (t->ndim == want->ndim) {
        for (int d = 0; d < t->ndim; d++)
            if (t->shape[d] != want->shape[d])
                return false;
        return true;
    }
    /* CompVis attention projections are 1x1 convs: (C, C, 1, 1). */
    return p->linear && want->ndim == 2 && t->ndim == 4 && t->shape[0] == want->shape[0] &&
           t->shape[1] == want->shape[1] && t->shape[2] == 1 && t->shape[3] == 1;
}

static klvae_status_t check_finite(const kv_safetensors *st, const kv_st_tensor *t,
                                   const float *values)
{
    size_t n = kv_st_numel(t);
    for (size_t i = 0; i < n; i++)
        if (!isfinite(values[i]))
            return kv_error(KLVAE_ERR_NONFINITE,
                            "%s: tensor '%s' holds a non-finite value (%g at element %zu); the "
                            "weights are damaged",
                            st->path, t->name, (double)values[i], i);
    return KLVAE_OK;
}

klvae_status_t kv_weights_check_finite(const kv_safetensors *st, const kv_st_tensor *t,
                                       float *staging)
{
    klvae_status_t status = kv_st_read_f32(st, t, staging);
    return status == KLVAE_OK ? check_finite(st, t, staging) : status;
}

klvae_status_t kv_weights_read(kv_backend *be, const kv_safetensors *st, const kv_st_tensor *t,
                               float *staging, kv_tensor *dst)
{
    float *host = be->host_memory ? dst->data : staging;
    klvae_status_t status = kv_st_read_f32(st, t, host);
    if (status == KLVAE_OK)
        status = check_finite(st, t, host);
    /* upload also when the values were read in place (host memory): the
     * CPU backend then forgets what it derived from the old ones (its
     * cached weight transforms) */
    if (status == KLVAE_OK)
        status = be->ops->upload(be, dst, host);
    return status;
}

/* A config.json that turns off a part whose weights the file has (a level,
 * a resnet, the attention, a quant conv) loaded, ignored those tensors and
 * computed without them (found by tests/fuzz/fuzz_config.c). So every key
 * the tensors show must agree with the config; the shapes of the tensors
 * the config does use are checked as they load. */
static klvae_status_t check_config_shows(const klvae_model_t *m, const kv_safetensors *st,
                                         const char *prefix, kv_naming naming)
{
    static const char *const keys[] = {"block_out_channels",  "layers_per_block",
                                       "use_quant_conv",      "use_post_quant_conv",
                                       "mid_block_add_attention", "in_channels",
                                       "out_channels",        "latent_channels"};
    kv_config shown;
    klvae_status_t status = kv_weights_infer_config(st, prefix, naming, &shown);
    for (size_t i = 0; status == KLVAE_OK && i < KV_ARRAY_LEN(keys); i++) {
        char said[96], seen[96];
        kv_config_get(&m->cfg, keys[i], said, sizeof said);
        kv_config_get(&shown, keys[i], seen, sizeof seen);
        if (strcmp(said, seen) != 0)
            status = kv_error(KLVAE_ERR_CONFIG,
                              "%s: config.json disagrees with the weights: it says %s is %s, but "
                              "the tensors show %s",
                              st->path, keys[i], said, seen);
    }
    return status;
}

klvae_status_t kv_weights_load(klvae_model_t *m, const kv_safetensors *st, const char *prefix,
                               kv_naming naming, bool config_from_json)
{
    size_t largest = 1;
    for (size_t i = 0; i < m->num_params; i++)
        largest = KV_MAX(largest, kv_tensor_numel(m->params[i].tensor));
    float *staging = malloc(largest * sizeof *staging);
    if (!staging)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory loading %s", st->path);
    klvae_status_t status = KLVAE_OK;
    for (size_t i = 0; i < m->num_params && status == KLVAE_OK; i++) {
        const kv_param *p = &m->params[i];
        const char *wanted = naming == KV_NAMING_COMPVIS ? p->ldm_name : p->name;
        const kv_st_tensor *t = find_prefixed(st, prefix, wanted);
        char legacy[KV_PARAM_NAME];
        if (!t && naming == KV_NAMING_DIFFUSERS && legacy_name(p->name, legacy, sizeof legacy))
            t = find_prefixed(st, prefix, legacy);
        if (!t) {
            status = kv_error(KLVAE_ERR_MISSING_TENSOR, "%s: missing tensor '%s%s'%s", st->path,
                              prefix, wanted,
                              config_from_json ? " (config.json says the model has it)" : "");
            break;
        }
        if (!shape_matches(p, t)) {
            char found[128], expected[128];
            int64_t want[4];
            for (int d = 0; d < p->tensor->ndim; d++)
                want[d] = p->tensor->shape[d];
            format_shape(found, sizeof found, t->ndim, t->shape);
            format_shape(expected, sizeof expected, p->tensor->ndim, want);
            if (config_from_json)
                status = kv_error(KLVAE_ERR_CONFIG,
                                  "%s: config.json disagrees with the weights: tensor '%s' has "
                                  "shape %s but the config needs %s",
                                  st->path, t->name, found, expected);
            else
                status = kv_error(KLVAE_ERR_SHAPE,
                                  "%s: tensor '%s' has shape %s, expected %s", st->path, t->name,
                                  found, expected);
            break;
        }
        status = kv_weights_read(m->be, st, t, staging, p->tensor);
    }
    free(staging);
    if (status == KLVAE_OK && config_from_json)
        status = check_config_shows(m, st, prefix, naming);
    return status;
}

typedef struct save_ctx {
    const klvae_model_t *m;
} save_ctx;

static klvae_status_t fetch_param(void *ctx, size_t index, float *dst)
{
    const klvae_model_t *m = ((save_ctx *)ctx)->m;
    const kv_tensor *t = m->params[index].tensor;
    return m->be->ops->download(m->be, dst, t);
}

/* What a saved folder holds (kv_folder_begin replaces only such folders). */
static const char *const saved_files[] = {"config.json", "diffusion_pytorch_model.safetensors",
                                          NULL};

/* Both files go into a new folder beside the target, which then takes the
 * target's place in one rename (kv_atomic_folder): a reader, or a crash at
 * any point, sees the old model or the new one, never new weights beside an
 * old config. */
klvae_status_t kv_weights_save(const klvae_model_t *m, const char *folder)
{
    kv_st_entry *entries = calloc(m->num_params ? m->num_params : 1, sizeof *entries);
    if (!entries)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory saving the model");
    for (size_t i = 0; i < m->num_params; i++) {
        const kv_tensor *t = m->params[i].tensor;
        entries[i].name = m->params[i].name;
        entries[i].ndim = t->ndim;
        for (int d = 0; d < t->ndim; d++)
            entries[i].shape[d] = t->shape[d];
    }
    kv_atomic_folder out;
    klvae_status_t status = kv_folder_begin(&out, folder, saved_files);
    if (status != KLVAE_OK) {
        free(entries);
        return status;
    }
    char *weights_path = kv_path_join(out.temp_path, saved_files[1]);
    char *config_path = kv_path_join(out.temp_path, saved_files[0]);
    if (!weights_path || !config_path) {
        status = KLVAE_ERR_OUT_OF_MEMORY;
    } else {
        kv_st_meta meta[] = {{"format", "pt"}};
        save_ctx ctx = {m};
        status = kv_st_write(weights_path, entries, m->num_params, meta, 1, fetch_param, &ctx,
                             NULL);
        if (status == KLVAE_OK)
            status = kv_config_write_json(&m->cfg, config_path);
    }
    if (status == KLVAE_OK)
        status = kv_folder_commit(&out);
    else
        kv_folder_abort(&out);
    free(weights_path);
    free(config_path);
    free(entries);
    return status;
}
