/* settings.h — what a latent dataset is made with: the options of
 * klvae_encode_dataset resolved against the model, and their JSON record.
 *
 * The "settings" object of manifest.json holds everything that decides the
 * bytes of the shards (model config and encoder weights, preprocessing,
 * storage, the file list, the number of parts). A later run into the same
 * folder must have equal settings: that is what makes a resumed dataset the
 * dataset an uninterrupted run would have made. */
#ifndef KV_DATASET_SETTINGS_H
#define KV_DATASET_SETTINGS_H

#include <jansson.h>

#include "dataset/geometry.h"
#include "formats/image_files.h"

typedef enum kv_ds_dtype { KV_DS_F32 = 0, KV_DS_BF16, KV_DS_F16 } kv_ds_dtype;

typedef struct kv_ds_settings {
    /* preprocessing */
    int size;             /* without buckets: the square target */
    int bucket_side, bucket_step;
    double bucket_ratio;
    kv_bucket *buckets; /* without buckets: one, size x size */
    int nbuckets;
    bool use_buckets, random_crop, flip;
    uint64_t seed, max_pixels;
    /* storage */
    bool store_sample, scale;
    kv_ds_dtype dtype;
    int shard_size;
    /* work */
    int part, parts, encode_batch, loader_threads;
    const char *part_source; /* "option", "OMPI_COMM_WORLD_*", "PMI_*" or "default" */
    /* the model */
    int in_channels, latent_channels, factor;
    float scaling_factor, shift_factor; /* shift 0 when the model has none */
    bool has_shift;
    char *model_name;
    char config_hash[17], weights_hash[17];
    json_t *model_config; /* every config key of the model, as option text */
} kv_ds_settings;

/* Reads the dataset options of opts (docs/options.md) and checks them
 * against the model: the size or bucket step a multiple of its
 * downsampling factor, 3 input channels; part "auto" resolved from the
 * environment. Hashes the model's config and encoder weights.
 * Errors: KLVAE_ERR_INVALID_ARGUMENT (naming the option), KLVAE_ERR_OPTION
 * (an MPI variable that is not a rank), KLVAE_ERR_OUT_OF_MEMORY, and the
 * backend's when the weights are read for the hash. */
klvae_status_t kv_ds_settings_make(klvae_model_t *model, const klvae_options_t *opts,
                                   kv_ds_settings *out);
void kv_ds_settings_free(kv_ds_settings *s);

/* The settings object (new reference) for the file list files: model,
 * preprocessing, storage, source (count and hash of the names) and parts. */
json_t *kv_ds_settings_json(const kv_ds_settings *s, const kv_image_files *files);

/* The seed of klvae_sample for the image of file number file (copy 0) or
 * its mirror image (copy 1) with store=sample: splitmix64 of the three, so
 * every image has its own noise, whatever batch it is encoded in. */
uint64_t kv_ds_sample_seed(uint64_t seed, uint32_t file, int copy);

/* "F32", "BF16" or "F16"; bytes per value. */
const char *kv_ds_dtype_name(kv_ds_dtype dtype);
int kv_ds_dtype_size(kv_ds_dtype dtype);

/* A 64-bit hash (FNV-1a style, 8 bytes a step) of bytes, continued from h
 * (start with KV_HASH_START), and as 16 hex digits. */
#define KV_HASH_START 0xcbf29ce484222325ull
uint64_t kv_hash_bytes(uint64_t h, const void *data, size_t n);
uint64_t kv_hash_text(uint64_t h, const char *text); /* the text and its end */
void kv_hash_hex(uint64_t h, char out[17]);

#endif
