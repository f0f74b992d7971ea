/* options.c — the table of option keys and the options object. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "base/options.h"

typedef enum {
    OPT_INT,
    OPT_UINT64,
    OPT_FLOAT,
    OPT_OPTIONAL_FLOAT, /* a number or "none" */
    OPT_BOOL,
    OPT_CHOICE,
    OPT_INT_LIST,
    OPT_PATH,
    OPT_BYTES, /* a size in bytes (kv_parse_bytes), or one of choices */
    OPT_TEXT   /* free text, or what its checker (text_checks) accepts */
} opt_type;

typedef struct opt_def {
    const char *key;
    opt_type type;
    const char *default_value;
    double min, max;     /* numbers and list items */
    const char *choices; /* OPT_CHOICE, OPT_BYTES' words: '|'-separated */
    const char *help;
} opt_def;

static bool check_buckets(const char *value, char *why, size_t why_size);
static bool check_part(const char *value, char *why, size_t why_size);

/* The OPT_TEXT keys whose values have a syntax. */
static const struct {
    const char *key;
    bool (*check)(const char *value, char *why, size_t why_size);
} text_checks[] = {{"buckets", check_buckets}, {"part", check_part}};

/* The order here is the order of klvae_option_describe and docs/options.md. */
static const opt_def option_table[] = {
    /* runtime */
    {"backend", OPT_CHOICE, "auto", 0, 0, "auto|cpu|cuda",
     "Where to compute: auto picks CUDA when it is usable and the CPU otherwise. The "
     "environment variable KLVAE_BACKEND sets it when the option is not given."},
    {"device", OPT_INT, "0", 0, 1024, NULL, "GPU index for the CUDA backend."},
    {"threads", OPT_INT, "0", 0, 4096, NULL,
     "CPU worker threads; 0 uses every core this process may run on."},
    {"precision", OPT_CHOICE, "fp32", 0, 0, "fp32|tf32|bf16",
     "Arithmetic: fp32 (strict float32), tf32 (TF32 tensor-core products; CUDA only, "
     "refused when backend=cpu is explicit, fp32 when auto falls back to the CPU) or bf16 "
     "(bf16 products with float32 accumulation; on the CPU where it has AVX512-BF16, else "
     "fp32, and precision_reason says why)."},
    {"seed", OPT_UINT64, "0", 0, 0, NULL,
     "Seed of klvae_model_create's initialisation and of the trainer's random numbers "
     "(posterior noise, dropout, the discriminator's initialisation)."},
    {"max_image_pixels", OPT_UINT64, "67108864", 1, 1099511627776.0, NULL,
     "Largest image, in pixels (width x height), that klvae_image_read_opts, the klvae tool "
     "and the training data reader decode. The size is read from the file's header and a "
     "larger image is refused before its pixels are allocated."},
    {"memory_limit", OPT_BYTES, "auto", 1048576, 0, "auto|none",
     "Most memory one klvae_encode or klvae_decode may take beyond the weights and the "
     "caller's arrays, in bytes with an optional K, M, G or T (4G, 1.5G, 3000000000). A "
     "forward that needs more runs streamed: layer by layer over row bands, with every group "
     "norm and the attention over the whole image, so the result is the untiled one within "
     "float rounding. auto: 85% of the memory the system has available (on the CPU backend; "
     "untiled on CUDA); none: always untiled."},
    {"keep_memory", OPT_BOOL, "true", 0, 0, NULL,
     "true: after each klvae_encode or klvae_decode the backend keeps the memory the call "
     "used (about its peak) for the next call, which then maps nothing new (on the CPU the "
     "page faults and zeroing of fresh memory were 10-12% of a 256x256 call); false: gives "
     "back at the end of every call all but the weights. klvae_model_free gives all back."},
    {"spill_dir", OPT_PATH, "", 0, 0, NULL,
     "Folder of the temporary file that holds a streamed forward's activations when they do "
     "not fit in memory_limit (created without a name, so nothing is left behind). Unset: "
     "TMPDIR, else /var/tmp."},
    {"tiling", OPT_CHOICE, "exact", 0, 0, "exact|blend",
     "exact: large images run streamed when memory_limit asks for it, with the untiled "
     "result. blend: diffusers' tiled encode and decode (overlapping tiles, each with its own "
     "group-norm statistics, blended linearly), for comparison: faster, not the same picture."},
    {"tile_size", OPT_INT, "0", 0, 65536, NULL,
     "tiling=blend: tile size in image pixels, a multiple of the downsampling factor; 0 uses "
     "the config's sample_size, as diffusers does."},
    {"tile_overlap", OPT_FLOAT, "0.25", 0, 0.875, NULL,
     "tiling=blend: the part of a tile that overlaps the next one (diffusers' "
     "tile_overlap_factor)."},
    /* model config */
    {"config", OPT_CHOICE, "sd", 0, 0, "sd|small|tiny",
     "Named starting config for klvae_model_create: sd is the Stable Diffusion KL-f8 VAE, "
     "small and tiny are narrower versions of the same architecture for quick training and "
     "tests. The individual keys below override it."},
    {"in_channels", OPT_INT, "3", 1, 64, NULL, "Image channels going into the encoder."},
    {"out_channels", OPT_INT, "3", 1, 64, NULL, "Image channels coming out of the decoder."},
    {"latent_channels", OPT_INT, "4", 1, 1024, NULL, "Channels of the latent z."},
    {"block_out_channels", OPT_INT_LIST, "128,256,512,512", 1, 8192, NULL,
     "Channel width of each resolution level; the downsampling factor is 2^(count-1)."},
    {"layers_per_block", OPT_INT, "2", 1, 15, NULL,
     "Resnets per encoder level (the decoder has one more)."},
    {"norm_num_groups", OPT_INT, "32", 1, 8192, NULL,
     "Groups of every GroupNorm; must divide every channel width."},
    {"act_fn", OPT_CHOICE, "silu", 0, 0, "silu|swish|gelu|relu|mish",
     "Activation inside the resnets (swish is silu)."},
    {"use_quant_conv", OPT_BOOL, "true", 0, 0, NULL, "Whether the 1x1 quant_conv exists."},
    {"use_post_quant_conv", OPT_BOOL, "true", 0, 0, NULL,
     "Whether the 1x1 post_quant_conv exists."},
    {"mid_block_add_attention", OPT_BOOL, "true", 0, 0, NULL,
     "Whether the mid blocks have their self-attention."},
    {"scaling_factor", OPT_FLOAT, "0.18215", -1e30, 1e30, NULL,
     "Latent scale used by diffusion pipelines (not applied by libklvae)."},
    {"shift_factor", OPT_OPTIONAL_FLOAT, "none", -1e30, 1e30, NULL,
     "Latent shift used by diffusion pipelines, or none."},
    /* dataset encoding (klvae_encode_dataset, klvae encode-dataset) */
    {"size", OPT_INT, "256", 8, 16384, NULL,
     "klvae_encode_dataset without buckets: each image is resized (antialiased bilinear) so "
     "that its shorter side is size, then cropped to size x size. A multiple of the model's "
     "downsampling factor."},
    {"crop", OPT_CHOICE, "center", 0, 0, "center|random",
     "klvae_encode_dataset: where the crop is taken from the resized image: its centre, or "
     "a position drawn from seed and the image's place in the file list."},
    {"buckets", OPT_TEXT, "none", 0, 0, NULL,
     "klvae_encode_dataset: none, or SIDE,STEP[,MAX_RATIO] for aspect-ratio buckets of about "
     "SIDE x SIDE pixels whose sides are multiples of STEP (a multiple of the downsampling "
     "factor) and whose aspect ratio is at most MAX_RATIO (default 4): each image goes to the "
     "bucket nearest its aspect ratio, is resized to cover it and cropped."},
    {"flip", OPT_BOOL, "false", 0, 0, NULL,
     "klvae_encode_dataset: also store the latents of each image mirrored left to right, "
     "beside the plain ones."},
    {"store", OPT_CHOICE, "posterior", 0, 0, "posterior|sample",
     "klvae_encode_dataset: store the posterior (mean and logvar, so that training can draw "
     "a fresh sample each epoch) or one sample drawn from it with seed."},
    {"dtype", OPT_CHOICE, "fp32", 0, 0, "fp32|bf16|fp16",
     "klvae_encode_dataset: the number format of the stored latents."},
    {"scale_latents", OPT_BOOL, "false", 0, 0, NULL,
     "klvae_encode_dataset: store (z - shift_factor) * scaling_factor, the model's factors "
     "(logvar + 2 ln scaling_factor for the posterior), instead of the raw latents; recorded "
     "in the manifest."},
    {"shard_size", OPT_INT, "512", 1, 100000, NULL,
     "klvae_encode_dataset: images per shard file (fewer where images are skipped or a "
     "bucket ends). A shard is held in memory until it is written."},
    {"part", OPT_TEXT, "auto", 0, 0, NULL,
     "klvae_encode_dataset: I/N encodes part I (0 to N-1) of N disjoint parts of the file "
     "list; auto takes the rank and size of an MPI launch from OMPI_COMM_WORLD_RANK and "
     "OMPI_COMM_WORLD_SIZE (Open MPI) or PMI_RANK and PMI_SIZE (MPICH, Intel MPI), else 0/1."},
    {"encode_batch", OPT_INT, "4", 1, 4096, NULL,
     "klvae_encode_dataset: images per klvae_encode call (flipped copies count too); the "
     "images of one call come from one bucket."},
    {"loader_threads", OPT_INT, "0", 0, 256, NULL,
     "klvae_encode_dataset: threads that read and resize images ahead of the encoder; 0 "
     "picks one per 8 CPUs (at least 1) on the CPU backend and one per CPU on CUDA."},
    {"model_name", OPT_TEXT, "", 0, 0, NULL,
     "klvae_encode_dataset: the model's name or path, recorded in the manifest (the klvae "
     "tool gives the MODEL argument)."},
    /* trainer */
    {"preset", OPT_CHOICE, "default", 0, 0, "default|ldm",
     "ldm reproduces the latent-diffusion reference's observable behaviour: a second "
     "autoencoder forward for the discriminator step, the discriminator's Adam stepping on zero "
     "gradients before disc_start, the adaptive weight computed before disc_start, LPIPS "
     "dropout 0.5 and data_parallel=ddp. Keys set explicitly override the preset."},
    {"learning_rate", OPT_FLOAT, "4.5e-6", 0, 10, NULL,
     "Adam learning rate of the autoencoder (the LDM base rate; LDM multiplies it by the batch "
     "size, libklvae does not)."},
    {"disc_learning_rate", OPT_OPTIONAL_FLOAT, "none", 0, 10, NULL,
     "Adam learning rate of the discriminator; none uses learning_rate."},
    {"adam_beta1", OPT_FLOAT, "0.5", 0, 0.999999, NULL, "Adam beta1 of both optimisers."},
    {"adam_beta2", OPT_FLOAT, "0.9", 0, 0.999999, NULL, "Adam beta2 of both optimisers."},
    {"adam_eps", OPT_FLOAT, "1e-8", 0, 1, NULL, "Adam epsilon of both optimisers."},
    {"pixel_loss", OPT_CHOICE, "l1", 0, 0, "l1|l2",
     "Reconstruction loss: l1 (LDM) or l2 (sd-vae-ft-mse), summed over pixels."},
    {"pixel_weight", OPT_FLOAT, "1", 0, 1e6, NULL, "Weight of the pixel loss."},
    {"perceptual_weight", OPT_FLOAT, "1", 0, 1e6, NULL,
     "Weight of the LPIPS term. Without lpips_weights it is 0 (and the trainer says so)."},
    {"lpips_weights", OPT_PATH, "", 0, 0, NULL,
     "safetensors file with the VGG16 trunk (features.N.*) and LPIPS lin weights "
     "(linK.model.1.weight); tools/export_lpips.py makes it."},
    {"lpips_dropout", OPT_FLOAT, "0", 0, 0.99, NULL,
     "Dropout probability in LPIPS' lin layers during training (the reference trains with 0.5)."},
    {"kl_weight", OPT_FLOAT, "1e-6", 0, 1e6, NULL, "Weight of the KL term (summed per image)."},
    {"logvar_init", OPT_FLOAT, "0", -30, 30, NULL, "Initial value of the loss' log-variance."},
    {"learn_logvar", OPT_BOOL, "false", 0, 0, NULL,
     "Train the loss' log-variance with the autoencoder (the reference keeps it frozen)."},
    {"disc_start", OPT_INT, "50001", 0, 2147483647, NULL,
     "Optimizer step from which the GAN loss is on."},
    {"disc_factor", OPT_FLOAT, "1", 0, 1e6, NULL, "Factor of the GAN losses once they are on."},
    {"disc_weight", OPT_FLOAT, "0.5", 0, 1e6, NULL,
     "Multiplier of the adaptive generator weight."},
    {"disc_loss", OPT_CHOICE, "hinge", 0, 0, "hinge|vanilla", "Discriminator loss."},
    {"disc_layers", OPT_INT, "3", 1, 6, NULL, "Layers of the PatchGAN discriminator."},
    {"disc_channels", OPT_INT, "64", 1, 1024, NULL, "Channels of its first layer (ndf)."},
    {"disc_weights", OPT_PATH, "", 0, 0, NULL,
     "safetensors file with discriminator weights (taming names main.N.*, optionally under "
     "loss.discriminator.); without it the discriminator is initialised from seed."},
    {"disc_update", OPT_CHOICE, "reuse", 0, 0, "fresh|reuse",
     "fresh: the discriminator step runs the autoencoder again on the updated weights, as the "
     "reference; reuse: it reuses the generator step's reconstruction (faster)."},
    {"posterior", OPT_CHOICE, "sample", 0, 0, "sample|mode",
     "Decode a posterior sample (the reference) or its mean during training."},
    {"ema_decay", OPT_FLOAT, "0", 0, 0.999999999, NULL,
     "Decay of an exponential moving average of the autoencoder weights; 0 keeps none."},
    {"train_encoder", OPT_BOOL, "true", 0, 0, NULL,
     "false fine-tunes the decoder only (encoder and quant_conv frozen), the recipe of "
     "sd-vae-ft-mse."},
    {"recompute", OPT_BOOL, "false", 0, 0, NULL,
     "true keeps only each resnet block's input and norm statistics for the backward, which "
     "recomputes the block's first convolution: about one activation less per block, for one "
     "convolution more (the same results, bit for bit)."},
    {"grad_accum", OPT_INT, "1", 1, 4096, NULL,
     "Micro-batches per optimizer step: a step's batch is split into this many parts, run one "
     "after another."},
    {"grad_clip", OPT_FLOAT, "0", 0, 1e30, NULL,
     "Clip each network's gradient to this global L2 norm; 0 does not clip."},
    {"nonfinite", OPT_CHOICE, "refuse", 0, 0, "refuse|skip",
     "A NaN or infinity in a training batch, loss or gradient: refuse returns "
     "KLVAE_ERR_NONFINITE and changes nothing; skip makes no update, counts the step as "
     "skipped and carries on."},
    {"data_parallel", OPT_CHOICE, "exact", 0, 0, "exact|ddp",
     "With a communicator (klvae_trainer_set_comm; klvae train under mpirun): exact makes each "
     "step the single-process step on the global batch (the discriminator's BatchNorm "
     "statistics and the adaptive weight over the global batch); ddp is Lightning DDP's step "
     "(each rank's own). preset=ldm defaults to ddp."},
    {"allreduce", OPT_CHOICE, "auto", 0, 0, "auto|host|nccl",
     "How a data-parallel trainer sums gradients over the ranks: nccl on the GPUs (CUDA "
     "backend; the plugin loads libnccl.so.2), host through the communicator's allreduce_sum "
     "callback; auto is nccl on the CUDA backend when NCCL loads, host otherwise."},
    {"allreduce_bucket_mb", OPT_FLOAT, "25", 0.0009765625, 65536, NULL,
     "Gradients are summed over the ranks in buckets of about this many MiB, each as soon as "
     "the backward has written all of its gradients."},
};

#define OPTION_COUNT ((int)KV_ARRAY_LEN(option_table))

struct klvae_options {
    char *values[KV_ARRAY_LEN(option_table)];
};

/* Finds a key, accepting '-' for '_'. */
static int find_option(const char *key)
{
    char normal[64];
    size_t len = strlen(key);
    if (len == 0 || len >= sizeof normal)
        return -1;
    for (size_t i = 0; i <= len; i++)
        normal[i] = key[i] == '-' ? '_' : key[i];
    for (int i = 0; i < OPTION_COUNT; i++)
        if (strcmp(option_table[i].key, normal) == 0)
            return i;
    return -1;
}

static int must_find(const char *key)
{
    int index = find_option(key);
    if (index < 0) {
        fprintf(stderr, "libklvae: internal error: unknown option key '%s'\n", key);
        abort();
    }
    return index;
}

static bool parse_long(const char *text, long long *out)
{
    if (!text || !*text)
        return false;
    errno = 0;
    char *end;
    long long v = strtoll(text, &end, 10);
    if (errno != 0 || *end != '\0' || end == text)
        return false;
    *out = v;
    return true;
}

static bool parse_uint64(const char *text, uint64_t *out)
{
    if (!text || !*text || text[0] == '-' || text[0] == '+' || text[0] == ' ')
        return false;
    errno = 0;
    char *end;
    unsigned long long v = strtoull(text, &end, 10);
    if (errno != 0 || *end != '\0' || end == text)
        return false;
    *out = v;
    return true;
}

static bool parse_double(const char *text, double *out)
{
    if (!text || !*text)
        return false;
    errno = 0;
    char *end;
    double v = strtod(text, &end);
    if (errno != 0 || *end != '\0' || end == text || !isfinite(v))
        return false;
    *out = v;
    return true;
}

static bool parse_bool(const char *text, bool *out)
{
    if (strcmp(text, "true") == 0 || strcmp(text, "1") == 0) {
        *out = true;
        return true;
    }
    if (strcmp(text, "false") == 0 || strcmp(text, "0") == 0) {
        *out = false;
        return true;
    }
    return false;
}

static bool is_none(const char *text)
{
    return strcmp(text, "none") == 0 || strcmp(text, "null") == 0;
}

static bool choice_matches(const char *choices, const char *value)
{
    size_t len = strlen(value);
    const char *p = choices;
    while (*p) {
        const char *bar = strchr(p, '|');
        size_t n = bar ? (size_t)(bar - p) : strlen(p);
        if (n == len && strncmp(p, value, n) == 0)
            return true;
        if (!bar)
            break;
        p = bar + 1;
    }
    return false;
}

bool kv_parse_int_list(const char *text, kv_int_list *out)
{
    kv_int_list list = {0, {0}};
    const char *p = text;
    if (!*p)
        return false;
    for (;;) {
        char item[32];
        const char *comma = strchr(p, ',');
        size_t n = comma ? (size_t)(comma - p) : strlen(p);
        if (n == 0 || n >= sizeof item || list.count == KV_MAX_LIST)
            return false;
        memcpy(item, p, n);
        item[n] = '\0';
        long long v;
        if (!parse_long(item, &v) || v < -2147483647LL || v > 2147483647LL)
            return false;
        list.values[list.count++] = (int)v;
        if (!comma)
            break;
        p = comma + 1;
    }
    *out = list;
    return true;
}

void kv_format_int_list(const kv_int_list *list, char *buf, size_t size)
{
    size_t at = 0;
    if (size)
        buf[0] = '\0';
    for (int i = 0; i < list->count && at < size; i++) {
        int n = snprintf(buf + at, size - at, i ? ",%d" : "%d", list->values[i]);
        if (n < 0)
            break;
        at += (size_t)n;
    }
}

void kv_format_double(double v, char *buf, size_t size)
{
    for (int p = 1; p <= 17; p++) {
        snprintf(buf, size, "%.*g", p, v);
        if (strtod(buf, NULL) == v)
            return;
    }
}

bool kv_parse_bytes(const char *text, uint64_t *out)
{
    if (!text || !*text || !(text[0] >= '0' && text[0] <= '9'))
        return false;
    errno = 0;
    char *end;
    double v = strtod(text, &end);
    if (errno != 0 || end == text || !isfinite(v))
        return false;
    static const char units[] = "KMGT";
    const char *unit = *end ? strchr(units, *end >= 'a' ? *end - 'a' + 'A' : *end) : NULL;
    if (*end && !unit)
        return false;
    if (unit) {
        v *= pow(1024.0, (double)(unit - units + 1));
        end++;
        if (strcasecmp(end, "iB") == 0 || strcasecmp(end, "B") == 0)
            end += strlen(end);
    }
    if (*end || v < 1.0 || v >= 18446744073709551616.0)
        return false;
    *out = (uint64_t)v;
    return true;
}

/* Validates value for option def; on failure describes why in why. */
static bool validate(const opt_def *def, const char *value, char *why, size_t why_size)
{
    switch (def->type) {
    case OPT_INT: {
        long long v;
        if (!parse_long(value, &v)) {
            snprintf(why, why_size, "expected an integer");
            return false;
        }
        if (v < (long long)def->min || v > (long long)def->max) {
            snprintf(why, why_size, "expected an integer from %.0f to %.0f", def->min, def->max);
            return false;
        }
        return true;
    }
    case OPT_UINT64: {
        uint64_t v;
        if (!parse_uint64(value, &v)) {
            snprintf(why, why_size, "expected a non-negative integer below 2^64");
            return false;
        }
        /* min = max = 0: any 64-bit value (seed) */
        if (def->max > def->min && (v < (uint64_t)def->min || v > (uint64_t)def->max)) {
            snprintf(why, why_size, "expected an integer from %.0f to %.0f", def->min, def->max);
            return false;
        }
        return true;
    }
    case OPT_OPTIONAL_FLOAT:
        if (is_none(value))
            return true;
        /* fall through */
    case OPT_FLOAT: {
        double v;
        if (!parse_double(value, &v)) {
            snprintf(why, why_size, def->type == OPT_FLOAT ? "expected a finite number"
                                                           : "expected a finite number or none");
            return false;
        }
        if (v < def->min || v > def->max) {
            snprintf(why, why_size, "expected a number from %g to %g", def->min, def->max);
            return false;
        }
        return true;
    }
    case OPT_BOOL: {
        bool b;
        if (!parse_bool(value, &b)) {
            snprintf(why, why_size, "expected true or false");
            return false;
        }
        return true;
    }
    case OPT_CHOICE:
        if (!choice_matches(def->choices, value)) {
            snprintf(why, why_size, "expected one of %s", def->choices);
            return false;
        }
        return true;
    case OPT_INT_LIST: {
        kv_int_list list;
        if (!kv_parse_int_list(value, &list)) {
            snprintf(why, why_size, "expected 1 to %d comma-separated integers", KV_MAX_LIST);
            return false;
        }
        for (int i = 0; i < list.count; i++) {
            if (list.values[i] < def->min || list.values[i] > def->max) {
                snprintf(why, why_size, "item %d is outside %.0f to %.0f", i + 1, def->min,
                         def->max);
                return false;
            }
        }
        return true;
    }
    case OPT_BYTES: {
        uint64_t v;
        if (choice_matches(def->choices, value))
            return true;
        if (!kv_parse_bytes(value, &v)) {
            snprintf(why, why_size,
                     "expected %s or a size in bytes with an optional K, M, G or T (4G)",
                     def->choices);
            return false;
        }
        if (v < (uint64_t)def->min) {
            snprintf(why, why_size, "expected at least %.0f bytes", def->min);
            return false;
        }
        return true;
    }
    case OPT_PATH:
        if (!*value) {
            snprintf(why, why_size, "expected a path");
            return false;
        }
        return true;
    case OPT_TEXT:
        for (size_t i = 0; i < KV_ARRAY_LEN(text_checks); i++)
            if (strcmp(text_checks[i].key, def->key) == 0)
                return text_checks[i].check(value, why, why_size);
        return true;
    }
    return false;
}

/* "I/N" with 0 <= I < N <= 2^20. */
bool kv_parse_part(const char *text, int *index, int *count)
{
    const char *slash = strchr(text, '/');
    char head[24];
    if (!slash || (size_t)(slash - text) >= sizeof head)
        return false;
    memcpy(head, text, (size_t)(slash - text));
    head[slash - text] = '\0';
    long long i, n;
    if (!parse_long(head, &i) || !parse_long(slash + 1, &n) || head[0] == '+' ||
        slash[1] == '+' || i < 0 || n < 1 || i >= n || n > (1 << 20))
        return false;
    *index = (int)i;
    *count = (int)n;
    return true;
}

static bool check_part(const char *value, char *why, size_t why_size)
{
    int i, n;
    if (strcmp(value, "auto") == 0 || kv_parse_part(value, &i, &n))
        return true;
    snprintf(why, why_size, "expected auto or I/N with 0 <= I < N (part 0/4 is the first of 4)");
    return false;
}

bool kv_parse_buckets(const char *text, int *side, int *step, double *max_ratio)
{
    char copy[64];
    if (strlen(text) >= sizeof copy)
        return false;
    strcpy(copy, text);
    char *first = strtok(copy, ","), *second = strtok(NULL, ","), *third = strtok(NULL, ",");
    long long a, b;
    double r = 4.0;
    if (!first || !second || strtok(NULL, ",") || !parse_long(first, &a) ||
        !parse_long(second, &b) || (third && !parse_double(third, &r)))
        return false;
    if (a < 8 || a > 16384 || b < 1 || b > a || r < 1.0 || r > 16.0)
        return false;
    *side = (int)a;
    *step = (int)b;
    *max_ratio = r;
    return true;
}

static bool check_buckets(const char *value, char *why, size_t why_size)
{
    int side, step;
    double ratio;
    if (strcmp(value, "none") == 0 || kv_parse_buckets(value, &side, &step, &ratio))
        return true;
    snprintf(why, why_size, "expected none or SIDE,STEP[,MAX_RATIO] with SIDE from 8 to 16384, "
             "STEP from 1 to SIDE and MAX_RATIO from 1 to 16 (1024,64 is near SDXL's)");
    return false;
}

KLVAE_API klvae_status_t klvae_options_create(klvae_options_t **out)
{
    kv_error_clear();
    if (!out)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "klvae_options_create: out is NULL");
    *out = calloc(1, sizeof **out);
    if (!*out)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory creating options");
    return KLVAE_OK;
}

KLVAE_API klvae_status_t klvae_options_set(klvae_options_t *opts, const char *key,
                                           const char *value)
{
    kv_error_clear();
    if (!opts || !key || !value)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "klvae_options_set: %s is NULL",
                        !opts ? "opts" : !key ? "key" : "value");
    int index = find_option(key);
    if (index < 0)
        return kv_error(KLVAE_ERR_OPTION, "unknown option '%s' (docs/options.md lists them)",
                        key);
    const opt_def *def = &option_table[index];
    char why[160];
    if (!validate(def, value, why, sizeof why))
        return kv_error(KLVAE_ERR_OPTION, "bad value '%s' for option '%s': %s", value, def->key,
                        why);
    char *copy = kv_strdup(value);
    if (!copy)
        return KLVAE_ERR_OUT_OF_MEMORY;
    free(opts->values[index]);
    opts->values[index] = copy;
    return KLVAE_OK;
}

KLVAE_API klvae_status_t klvae_options_get(const klvae_options_t *opts, const char *key,
                                           char *buf, size_t size)
{
    kv_error_clear();
    if (!key || (!buf && size))
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "klvae_options_get: %s is NULL",
                        !key ? "key" : "buf");
    int index = find_option(key);
    if (index < 0)
        return kv_error(KLVAE_ERR_OPTION, "unknown option '%s'", key);
    const char *value = opts && opts->values[index] ? opts->values[index]
                                                    : option_table[index].default_value;
    return kv_copy_out("klvae_options_get", key, value, buf, size);
}

KLVAE_API void klvae_options_free(klvae_options_t *opts)
{
    if (!opts)
        return;
    for (int i = 0; i < OPTION_COUNT; i++)
        free(opts->values[i]);
    free(opts);
}

KLVAE_API klvae_status_t klvae_option_describe(int index, const char **key,
                                               const char **default_value, const char **help)
{
    kv_error_clear();
    if (index < 0 || index >= OPTION_COUNT)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "klvae_option_describe: index %d is outside 0 to %d", index,
                        OPTION_COUNT - 1);
    if (key)
        *key = option_table[index].key;
    if (default_value)
        *default_value = option_table[index].default_value;
    if (help)
        *help = option_table[index].help;
    return KLVAE_OK;
}

/* ---- internal typed access ---- */

const char *kv_options_value(const klvae_options_t *opts, const char *key)
{
    int index = must_find(key);
    return opts ? opts->values[index] : NULL;
}

bool kv_options_is_set(const klvae_options_t *opts, const char *key)
{
    return kv_options_value(opts, key) != NULL;
}

static const char *value_or_default(const klvae_options_t *opts, const char *key)
{
    int index = must_find(key);
    return opts && opts->values[index] ? opts->values[index] : option_table[index].default_value;
}

int kv_options_int(const klvae_options_t *opts, const char *key)
{
    long long v = 0;
    parse_long(value_or_default(opts, key), &v);
    return (int)v;
}

double kv_options_double(const klvae_options_t *opts, const char *key)
{
    double v = 0.0;
    parse_double(value_or_default(opts, key), &v);
    return v;
}

bool kv_options_optional_double(const klvae_options_t *opts, const char *key, double *out)
{
    const char *text = value_or_default(opts, key);
    if (is_none(text))
        return false;
    return parse_double(text, out);
}

bool kv_options_bool(const klvae_options_t *opts, const char *key)
{
    bool v = false;
    parse_bool(value_or_default(opts, key), &v);
    return v;
}

uint64_t kv_options_uint64(const klvae_options_t *opts, const char *key)
{
    uint64_t v = 0;
    parse_uint64(value_or_default(opts, key), &v);
    return v;
}

const char *kv_options_string(const klvae_options_t *opts, const char *key)
{
    return value_or_default(opts, key);
}

kv_int_list kv_options_int_list(const klvae_options_t *opts, const char *key)
{
    kv_int_list list = {0, {0}};
    kv_parse_int_list(value_or_default(opts, key), &list);
    return list;
}
