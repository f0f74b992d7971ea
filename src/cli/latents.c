/* latents.c — see latents.h. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/latents.h"

static klvae_status_t fetch_latent(void *ctx, size_t index, float *dst)
{
    const latent_tensor *t = (const latent_tensor *)ctx + index;
    size_t n = (size_t)(t->shape[0] * t->shape[1] * t->shape[2] * t->shape[3]);
    memcpy(dst, t->data, n * sizeof(float));
    return KLVAE_OK;
}

klvae_status_t write_latents(const char *path, const latent_tensor *tensors, size_t count,
                             const kv_st_meta *meta, size_t nmeta)
{
    kv_st_entry entries[8];
    for (size_t i = 0; i < count; i++) {
        entries[i].name = tensors[i].name;
        entries[i].ndim = 4;
        memcpy(entries[i].shape, tensors[i].shape, sizeof tensors[i].shape);
    }
    return kv_st_write(path, entries, count, meta, nmeta, fetch_latent, (void *)tensors, NULL);
}

/* The (C, h, w) or (N, C, h, w) tensor to decode: "latent", or the file's
 * only tensor. */
static klvae_status_t find_latent(const kv_safetensors *st, const char *path,
                                  const kv_st_tensor **out)
{
    *out = kv_st_find(st, "latent");
    if (!*out && st->count == 1)
        *out = &st->tensors[0];
    if (!*out)
        return kv_error(KLVAE_ERR_MISSING_TENSOR,
                        "%s has no tensor named 'latent' and more than one tensor", path);
    return KLVAE_OK;
}

/* t's shape as (N, C, h, w) into out, if it is one the model decodes. */
static klvae_status_t latent_shape(const kv_st_tensor *t, const char *path, int channels,
                                   latents *out)
{
    int64_t s[4] = {1, 0, 0, 0};
    if (t->ndim == 3 || t->ndim == 4) {
        for (int d = 0; d < t->ndim; d++)
            s[4 - t->ndim + d] = t->shape[d];
    }
    if ((t->ndim != 3 && t->ndim != 4) || s[1] != channels || s[0] < 1 || s[2] < 1 || s[3] < 1 ||
        s[0] > 4096 || s[2] > 65536 || s[3] > 65536) {
        char found[64] = "";
        for (int d = 0; d < t->ndim && d < 4; d++)
            snprintf(found + strlen(found), sizeof found - strlen(found), d ? ", %lld" : "%lld",
                     (long long)t->shape[d]);
        return kv_error(KLVAE_ERR_SHAPE,
                        "%s: tensor '%s' has shape [%s]; the model decodes (N, %d, h, w) or "
                        "(%d, h, w)",
                        path, t->name, found, channels, channels);
    }
    out->n = (int)s[0];
    out->c = (int)s[1];
    out->h = (int)s[2];
    out->w = (int)s[3];
    return KLVAE_OK;
}

/* A positive image side from the metadata, or 0 when absent or not one
 * (the caller then takes the latent's own size). */
static int metadata_side(const kv_safetensors *st, const char *key)
{
    const char *text = kv_st_metadata(st, key);
    if (!text)
        return 0;
    char *end;
    errno = 0;
    long v = strtol(text, &end, 10);
    return errno == 0 && end != text && *end == '\0' && v > 0 && v <= 65536 * 8 ? (int)v : 0;
}

klvae_status_t read_latents(const char *path, int channels, latents *out)
{
    memset(out, 0, sizeof *out);
    kv_safetensors st;
    klvae_status_t status = kv_st_open(path, &st);
    if (status != KLVAE_OK)
        return status;
    const kv_st_tensor *t = NULL;
    status = find_latent(&st, path, &t);
    if (status == KLVAE_OK)
        status = latent_shape(t, path, channels, out);
    if (status == KLVAE_OK && !kv_st_is_float(t)) /* before allocating for it */
        status = kv_error(KLVAE_ERR_UNSUPPORTED, "%s: tensor '%s' has dtype %s; latents must be "
                          "F32, F16, BF16 or F64", path, t->name, t->dtype);
    if (status == KLVAE_OK) {
        out->data = malloc(kv_st_numel(t) * sizeof(float) + 1);
        status = out->data ? kv_st_read_f32(&st, t, out->data)
                           : kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory reading %s", path);
    }
    if (status == KLVAE_OK) {
        out->image_height = metadata_side(&st, "image_height");
        out->image_width = metadata_side(&st, "image_width");
        const char *scaled = kv_st_metadata(&st, "scaled");
        out->scaled = scaled && strcmp(scaled, "true") == 0;
    }
    kv_st_close(&st);
    if (status != KLVAE_OK) {
        free(out->data);
        memset(out, 0, sizeof *out);
    }
    return status;
}
