/* model.h — the AutoencoderKL network's parameters and the model handle.
 *
 * The structs mirror diffusers' module tree. Every parameter is also listed
 * once in the registry (model->params), in diffusers' state_dict order with
 * its diffusers and CompVis names; loading, saving, initialising and
 * counting all walk the registry, so none of them repeats the tree. */
#ifndef KV_MODEL_H
#define KV_MODEL_H

#include "backend/backend.h"
#include "model/config.h"

typedef struct kv_conv {
    kv_tensor weight, bias;
} kv_conv;

typedef struct kv_norm {
    kv_tensor weight, bias;
} kv_norm;

typedef struct kv_resnet {
    int in_channels, out_channels;
    kv_norm norm1;
    kv_conv conv1;
    kv_norm norm2;
    kv_conv conv2;
    bool has_shortcut; /* 1x1 conv when in != out */
    kv_conv shortcut;
} kv_resnet;

typedef struct kv_attention {
    int channels;
    kv_norm norm;
    kv_conv to_q, to_k, to_v, to_out; /* Linear (C, C) weights, used as 1x1 convs */
} kv_attention;

typedef struct kv_mid_block {
    kv_resnet resnets[2];
    bool has_attention;
    kv_attention attention;
} kv_mid_block;

typedef struct kv_level {
    int num_resnets;
    kv_resnet resnets[KV_MAX_LAYERS + 1];
    bool has_sampler; /* downsample (encoder) or upsample (decoder) conv */
    kv_conv sampler;
} kv_level;

typedef struct kv_encoder {
    kv_conv conv_in;
    kv_level down[KV_MAX_BLOCKS];
    kv_mid_block mid;
    kv_norm norm_out;
    kv_conv conv_out;
} kv_encoder;

typedef struct kv_decoder {
    kv_conv conv_in;
    kv_mid_block mid;
    kv_level up[KV_MAX_BLOCKS];
    kv_norm norm_out;
    kv_conv conv_out;
} kv_decoder;

typedef enum kv_param_kind {
    KV_PARAM_WEIGHT,      /* conv or linear weight: uniform(+-1/sqrt(fan_in)) */
    KV_PARAM_BIAS,        /* conv or linear bias: the same bound */
    KV_PARAM_NORM_WEIGHT, /* ones */
    KV_PARAM_NORM_BIAS    /* zeros */
} kv_param_kind;

#define KV_PARAM_NAME 112

typedef struct kv_param {
    char name[KV_PARAM_NAME];     /* current diffusers name */
    char ldm_name[KV_PARAM_NAME]; /* original CompVis name */
    kv_tensor *tensor;            /* its slot in the module tree */
    kv_param_kind kind;
    int fan_in;
    bool linear; /* a Linear weight that CompVis stores as a 1x1 conv */
} kv_param;

typedef enum kv_naming {
    KV_NAMING_DIFFUSERS = 0, /* current or legacy attention names */
    KV_NAMING_COMPVIS = 1
} kv_naming;

/* The inference options (docs/options.md): how klvae_encode and
 * klvae_decode run images that need much memory (src/model/stream.h). */
typedef enum kv_limit_kind {
    KV_LIMIT_AUTO = 0, /* the memory the system has available */
    KV_LIMIT_NONE,     /* always untiled */
    KV_LIMIT_BYTES     /* memory_limit bytes */
} kv_limit_kind;

typedef struct kv_inference_settings {
    kv_limit_kind limit_kind;
    uint64_t memory_limit; /* KV_LIMIT_BYTES */
    bool keep_memory;      /* between calls (kv_model_end_call) */
    char *spill_dir;       /* owned; NULL: TMPDIR, else /var/tmp */
    bool blend;            /* tiling=blend */
    int tile_size;         /* pixels; 0: the config's sample_size */
    double tile_overlap;
    /* For the tests: the most rows a streamed band may have (0: as
     * planned), so that small images meet every boundary case. */
    int max_band_rows;
    char last_plan[512]; /* how the last encode or decode ran */
} kv_inference_settings;

struct klvae_model {
    kv_busy busy; /* klvae_encode, decode, sample and a trainer's step */
    kv_config cfg;
    kv_backend *be;
    const struct kv_plugin *plugin; /* the CUDA plugin of be; NULL on the CPU */
    char backend_name[8];
    char backend_reason[1024]; /* why backend=auto did not use CUDA, or "" */
    char precision[8];
    char precision_reason[256]; /* why the CPU computes in fp32 though asked otherwise, or "" */
    int threads;
    kv_inference_settings infer;
    kv_encoder enc;
    kv_decoder dec;
    kv_conv quant_conv, post_quant_conv;
    kv_param *params;
    size_t num_params;
    int64_t parameter_count;
    /* Set by a trainer of this model: kv_vae_encode_backward and
     * kv_vae_decode_backward report each parameter gradient (the tensor of
     * the gradient tree) as soon as they have finished writing it, so that
     * data-parallel training can sum it over the ranks while the backward
     * goes on. NULL: nobody listens. */
    klvae_status_t (*grad_written)(void *ctx, const kv_tensor *grad);
    void *grad_written_ctx;
};

/* Fills the module tree's shapes from model->cfg and builds the registry
 * (no memory for the tensors yet). */
klvae_status_t kv_model_build(klvae_model_t *m);

/* Allocates every parameter in backend memory, stored as storage says (a
 * model's weights: the compute format; a trainer's gradients and optimiser
 * state: float32). */
klvae_status_t kv_model_alloc_params(klvae_model_t *m, kv_storage storage);

/* PyTorch's default initialisation from a seed (see klvae_model_create). */
klvae_status_t kv_model_init_params(klvae_model_t *m, uint64_t seed);

/* Releases parameters, registry and backend. */
void kv_model_destroy(klvae_model_t *m);

/* The end of an encode or decode (host or device arrays): the backend keeps
 * the call's memory for the next one, or with keep_memory=false gives back
 * all it holds beyond what is in use. */
void kv_model_end_call(klvae_model_t *m);

/* The calls on a caller's device arrays (klvae_*_device,
 * klvae_trainer_step_device). kv_model_stream_enter puts the model's plugin
 * backend on the caller's stream (KLVAE_ERR_INVALID_ARGUMENT naming fn and
 * host_fn, the host call to use instead, when the model runs on the CPU);
 * kv_model_stream_leave, given the status of the work, waits for the
 * stream, puts the backend back on its own one, trims (keeping the memory
 * for a trainer's step, which the next step reuses whatever keep_memory
 * says; else as kv_model_end_call), and returns the
 * first error with its message. kv_plugin_status makes a plugin's status a
 * valid klvae_status_t. */
klvae_status_t kv_model_stream_enter(klvae_model_t *m, const char *fn, const char *host_fn,
                                     void *stream);
klvae_status_t kv_model_stream_leave(klvae_model_t *m, klvae_status_t st,
                                      bool trainer_step);
klvae_status_t kv_plugin_status(klvae_status_t st);

/* src/model/weights.c: reading and writing weight files. */
struct kv_safetensors;
struct kv_st_tensor;
/* Finds the weights in st: sets *prefix ("", "first_stage_model." or
 * "vae.") and *naming. */
klvae_status_t kv_weights_detect(const struct kv_safetensors *st, const char **prefix,
                                 kv_naming *naming);
/* Infers the structural config from tensor shapes (single files). */
klvae_status_t kv_weights_infer_config(const struct kv_safetensors *st, const char *prefix,
                                       kv_naming naming, kv_config *cfg);
/* Reads every registry parameter from st into backend memory. config_from_json
 * turns shape mismatches into KLVAE_ERR_CONFIG (config.json disagrees). */
klvae_status_t kv_weights_load(klvae_model_t *m, const struct kv_safetensors *st,
                               const char *prefix, kv_naming naming, bool config_from_json);
/* Reads tensor t of st (any float dtype) into dst, a float32 tensor of as
 * many elements in backend memory, through staging (host memory for at
 * least that many floats; unused when the backend computes in host
 * memory). A NaN or infinity is KLVAE_ERR_NONFINITE naming the file and the
 * tensor; dst may then hold part of the values. Every weight the library
 * loads (model, LPIPS, discriminator, checkpoints) comes through here. */
klvae_status_t kv_weights_read(kv_backend *be, const struct kv_safetensors *st,
                               const struct kv_st_tensor *t, float *staging, kv_tensor *dst);
/* The same check without a destination: reads t into staging and
 * KLVAE_ERR_NONFINITE when a value is not finite (for loads that must check
 * everything before they change anything). */
klvae_status_t kv_weights_check_finite(const struct kv_safetensors *st,
                                       const struct kv_st_tensor *t, float *staging);
/* Writes the diffusers folder. */
klvae_status_t kv_weights_save(const klvae_model_t *m, const char *folder);

#endif
