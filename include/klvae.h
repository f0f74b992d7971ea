/*
 * klvae.h — libklvae, the Stable Diffusion KL-f8 autoencoder as a C library.
 *
 * This header is the manual. Every function below says what it takes, what it
 * returns, who owns what, and what happens on error.
 *
 * ---------------------------------------------------------------------------
 * Conventions that hold for the whole API
 * ---------------------------------------------------------------------------
 *
 * Status and errors
 *   Every function that can fail returns a klvae_status_t. KLVAE_OK (0) means
 *   success; anything else is an error, and klvae_last_error() then returns a
 *   message for the calling thread that names what was wrong: the file, the
 *   tensor, the expected and found shape, the option key, the byte offset.
 *   On error, output pointers are set to NULL (handles, allocations) and no
 *   file is left half-written. Status numbers are fixed and only ever
 *   appended to.
 *
 * Ownership
 *   Handles (klvae_model_t, klvae_options_t) are created by the library and
 *   released by their own *_free function, which accepts NULL. Memory the
 *   library allocates for you (klvae_image_read) is released with klvae_free.
 *   Arrays you pass in stay yours: the library reads or writes them only for
 *   the duration of the call and never keeps a pointer to them.
 *
 * Tensors at the boundary
 *   float32, contiguous, NCHW (batch, channel, row, column; column fastest).
 *   Images are in [-1, 1] with 3 channels (RGB) for the published models;
 *   latents are (n, latent_channels, h / f, w / f) where f is the
 *   downsampling factor (8 for SD). Latents are the raw posterior values:
 *   the library never applies scaling_factor or shift_factor (see
 *   klvae_model_scaling_factor for what diffusion pipelines do with them).
 *   Sizes are int; every size product is checked for overflow.
 *
 * Threads
 *   Functions without a handle (version, status strings, option
 *   descriptions, images) may be called from any thread at any time.
 *   Different handles (models, trainers, options objects) may be used from
 *   different threads at the same time. One handle must not be used by two
 *   threads at once; it may move between threads. Models and trainers check
 *   this: a call that computes with a model or a trainer while another
 *   thread is inside a call on the same handle returns KLVAE_ERR_BUSY and
 *   does nothing (options objects and the queries that return a value
 *   directly are not checked). A trainer uses its model: while a
 *   klvae_trainer_step or klvae_trainer_load runs, calls on the model from
 *   another thread are KLVAE_ERR_BUSY, and the other way round. A model
 *   computes with its own pool of worker threads (option "threads").
 *
 * Options objects
 *   Every function that takes a klvae_options_t reads it during the call
 *   and keeps nothing of it: the object may be changed or freed as soon as
 *   the call returns (a model or trainer has copied what it needs).
 *
 * Options
 *   Settings travel in a klvae_options_t: string keys and string values,
 *   parsed strictly ("1e-4", "true", "128,256,512,512"). The same keys are the
 *   command-line flags of the klvae tool (--block-out-channels ↔
 *   block_out_channels) and are listed in docs/options.md. Passing NULL
 *   wherever options are taken means "all defaults".
 */
#ifndef KLVAE_H
#define KLVAE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#  define KLVAE_API __declspec(dllimport)
#elif defined(__GNUC__)
#  define KLVAE_API __attribute__((visibility("default")))
#else
#  define KLVAE_API
#endif

/* ------------------------------------------------------------------------ */
/* Version                                                                   */
/* ------------------------------------------------------------------------ */

#define KLVAE_VERSION_MAJOR 0
#define KLVAE_VERSION_MINOR 2
#define KLVAE_VERSION_PATCH 0
#define KLVAE_VERSION_NUMBER \
    (KLVAE_VERSION_MAJOR * 10000 + KLVAE_VERSION_MINOR * 100 + KLVAE_VERSION_PATCH)
#define KLVAE_VERSION_STRING "0.2.0"

/* The version of the library actually loaded, as MAJOR*10000 + MINOR*100 +
 * PATCH. Compare it with KLVAE_VERSION_NUMBER to detect a header/library
 * mismatch: the major numbers must be equal, the library's minor at least
 * the header's. */
KLVAE_API unsigned klvae_version(void);

/* The same as a static string such as "0.1.0". Never NULL. */
KLVAE_API const char *klvae_version_string(void);

/* ------------------------------------------------------------------------ */
/* Status codes and errors                                                   */
/* ------------------------------------------------------------------------ */

typedef enum klvae_status {
    KLVAE_OK = 0,
    /* A NULL pointer, a count or size <= 0, an image size that is not a
     * multiple of the downsampling factor, an impossible size. */
    KLVAE_ERR_INVALID_ARGUMENT = 1,
    /* An allocation failed, or a size does not fit in memory at all. */
    KLVAE_ERR_OUT_OF_MEMORY = 2,
    /* A file could not be opened, read, written or renamed (the OS error is
     * in the message). */
    KLVAE_ERR_IO = 3,
    /* A file is malformed: a truncated or invalid safetensors header, bad
     * JSON, overlapping tensor data, a corrupt PNG. */
    KLVAE_ERR_FORMAT = 4,
    /* A tensor has the wrong shape (the message names tensor, expected and
     * found shape). */
    KLVAE_ERR_SHAPE = 5,
    /* A weight the configuration needs is not in the file (the message
     * names it). */
    KLVAE_ERR_MISSING_TENSOR = 6,
    /* A configuration is invalid or disagrees with the weights. */
    KLVAE_ERR_CONFIG = 7,
    /* An unknown option key, or a value that does not parse or is out of
     * range (the message names the key and the value). */
    KLVAE_ERR_OPTION = 8,
    /* Valid input this build cannot handle (for example an integer tensor
     * dtype where weights are expected). */
    KLVAE_ERR_UNSUPPORTED = 9,
    /* The requested backend cannot be used here; the message says why
     * (not built, plugin not found, no driver, no device). */
    KLVAE_ERR_BACKEND_UNAVAILABLE = 10,
    /* The backend failed while computing (a CUDA, cuDNN or cuBLAS error;
     * the library's own text is in the message). */
    KLVAE_ERR_BACKEND = 11,
    /* A bug in libklvae. Please report it with the message. */
    KLVAE_ERR_INTERNAL = 12,
    /* A NaN or infinity where a finite value is needed: in a training
     * batch, a training loss, or weights being loaded (the message names
     * which). Nothing was changed. */
    KLVAE_ERR_NONFINITE = 13,
    /* The handle is being used by another thread at this moment (one handle
     * is used by one thread at a time; see "Threads" above). Nothing was
     * done; the call may be retried once the other thread's call returns. */
    KLVAE_ERR_BUSY = 14,
    /* A *_get function's buffer is too small for the value;
     * klvae_last_needed_size() gives the size it needs. */
    KLVAE_ERR_BUFFER_TOO_SMALL = 15,
    /* Data-parallel training: a communicator callback failed, or another
     * rank failed (the message names the rank). See klvae_comm_t. */
    KLVAE_ERR_COMM = 16
} klvae_status_t;

/* A short, static, English description of a status ("invalid argument").
 * Unknown values give "unknown status". Never NULL. */
KLVAE_API const char *klvae_status_string(klvae_status_t status);

/* The message describing the most recent failure of a libklvae call on the
 * calling thread. Every function that returns a klvae_status_t empties it
 * when it succeeds, so after such a call it is "" on success; functions that
 * cannot fail (versions, status strings, queries, *_free) leave it alone.
 * The string is owned by the library and stays valid until the next libklvae
 * call on the same thread. Never NULL. */
KLVAE_API const char *klvae_last_error(void);

/* After a *_get function (klvae_options_get, klvae_model_get,
 * klvae_trainer_get, klvae_trainer_get_note) returned
 * KLVAE_ERR_BUFFER_TOO_SMALL on the calling thread: the buffer size in bytes
 * that the value needs, terminating NUL included; 0 after one succeeded.
 * Each *_get also accepts buf == NULL with size 0, to ask for that size:
 *
 *     if (klvae_model_get(m, "backend_reason", NULL, 0) ==
 *         KLVAE_ERR_BUFFER_TOO_SMALL) {
 *         char *text = malloc(klvae_last_needed_size());
 *         klvae_model_get(m, "backend_reason", text, klvae_last_needed_size());
 *     } */
KLVAE_API size_t klvae_last_needed_size(void);

/* Releases memory that the library allocated for the caller (the pixels of
 * klvae_image_read). NULL is a no-op. */
KLVAE_API void klvae_free(void *ptr);

/* ------------------------------------------------------------------------ */
/* Options                                                                   */
/* ------------------------------------------------------------------------ */

typedef struct klvae_options klvae_options_t;

/* Creates an empty options object (every key at its default).
 * Returns KLVAE_ERR_INVALID_ARGUMENT if out is NULL, KLVAE_ERR_OUT_OF_MEMORY
 * if allocation fails; *out is NULL on error. */
KLVAE_API klvae_status_t klvae_options_create(klvae_options_t **out);

/* Sets key to value, both NUL-terminated UTF-8, both copied. The value is
 * parsed and range-checked now: an unknown key or a bad value returns
 * KLVAE_ERR_OPTION with a message naming both, and leaves the object
 * unchanged. Setting a key again replaces the earlier value. Dashes in keys
 * are accepted as underscores ("latent-channels" = "latent_channels"). */
KLVAE_API klvae_status_t klvae_options_set(klvae_options_t *opts, const char *key,
                                           const char *value);

/* Copies the value of key (the one set, or else its default; "" for keys
 * with no default) into buf, NUL-terminated. Returns KLVAE_ERR_OPTION for an
 * unknown key, KLVAE_ERR_INVALID_ARGUMENT when key is NULL or buf is NULL
 * with size > 0, and KLVAE_ERR_BUFFER_TOO_SMALL when the value does not fit
 * (size must exceed its length; klvae_last_needed_size() tells the size,
 * and buf = NULL, size = 0 asks for it). buf is unchanged on error. opts may
 * be NULL: defaults. */
KLVAE_API klvae_status_t klvae_options_get(const klvae_options_t *opts, const char *key,
                                           char *buf, size_t size);

/* Releases the object. NULL is a no-op. */
KLVAE_API void klvae_options_free(klvae_options_t *opts);

/* Describes the index-th option key the library accepts (0-based, stable
 * order). The strings are static. Returns KLVAE_ERR_INVALID_ARGUMENT when
 * index is out of range; any out-pointer may be NULL. default_value is ""
 * for keys without a default. */
KLVAE_API klvae_status_t klvae_option_describe(int index, const char **key,
                                               const char **default_value,
                                               const char **help);

/* ------------------------------------------------------------------------ */
/* Models                                                                    */
/* ------------------------------------------------------------------------ */

typedef struct klvae_model klvae_model_t;

/* Loads a model.
 *
 * path is either
 *   - a diffusers folder holding config.json and
 *     diffusion_pytorch_model.safetensors, or
 *   - one .safetensors file with current diffusers names, legacy diffusers
 *     attention names (query/key/value/proj_attn) or original CompVis/LDM
 *     names (encoder.down.N.block.M...), with or without a
 *     "first_stage_model." or "vae." prefix. A single file carries no
 *     config: it is inferred from the tensor shapes, and what shapes cannot
 *     show (norm_num_groups, act_fn, scaling_factor, shift_factor) comes
 *     from opts, defaulting to the SD values (32, silu, 0.18215, none).
 * Tensors may be F32, F16, BF16 or F64; they are converted to float32.
 * Tensors the model does not use are ignored.
 *
 * opts (may be NULL) gives runtime keys (backend, threads, ...) and may give
 * model config keys: scaling_factor and shift_factor override the file's
 * values; norm_num_groups and act_fn apply to single files (for a folder
 * they must agree with config.json); any structural key
 * (block_out_channels, latent_channels, ...) that disagrees with the weights
 * is an error. The key "config" only matters to klvae_model_create.
 *
 * Errors: KLVAE_ERR_IO (missing or unreadable path), KLVAE_ERR_FORMAT
 * (malformed file), KLVAE_ERR_MISSING_TENSOR, KLVAE_ERR_SHAPE,
 * KLVAE_ERR_CONFIG, KLVAE_ERR_OPTION, KLVAE_ERR_UNSUPPORTED,
 * KLVAE_ERR_NONFINITE (a weight is NaN or infinite: the message names the
 * tensor), KLVAE_ERR_BACKEND_UNAVAILABLE, KLVAE_ERR_BACKEND,
 * KLVAE_ERR_OUT_OF_MEMORY. *out is NULL on error and nothing is leaked. */
KLVAE_API klvae_status_t klvae_model_load(const char *path, const klvae_options_t *opts,
                                          klvae_model_t **out);

/* Creates a freshly initialised model from the config keys of opts (a named
 * "config" such as "sd", "small" or "tiny", then any individual key on top).
 * Weights follow PyTorch's default initialisation (uniform in
 * ±1/sqrt(fan_in) for convolution and linear weights and biases, ones and
 * zeros for norms), drawn from the option "seed" (default 0): the same seed
 * gives the same weights on every machine and backend.
 * Errors: KLVAE_ERR_INVALID_ARGUMENT (out is NULL), KLVAE_ERR_CONFIG (the
 * config keys together describe no valid model, e.g. widths not divisible
 * by norm_num_groups), KLVAE_ERR_UNSUPPORTED (a precision the backend does
 * not compute in), KLVAE_ERR_BACKEND_UNAVAILABLE and KLVAE_ERR_BACKEND (as
 * for klvae_model_load), KLVAE_ERR_OUT_OF_MEMORY. *out is NULL on error and
 * nothing is leaked. */
KLVAE_API klvae_status_t klvae_model_create(const klvae_options_t *opts, klvae_model_t **out);

/* Writes the model as a diffusers folder (config.json and
 * diffusion_pytorch_model.safetensors, float32, current diffusers names) that
 * diffusers' AutoencoderKL.from_pretrained loads, in one step: both files go
 * into a new folder PATH.tmp.klvae-XXXXXX beside PATH, which then takes
 * PATH's place in one rename (swapped with an existing PATH by renameat2
 * RENAME_EXCHANGE, after which the old folder is removed). So a reader, a
 * failure or a crash at any point sees the old model or the new one, never
 * the files of two. An existing PATH must be a folder holding only those two
 * files (an earlier save, or an empty folder): anything else in it is
 * refused with KLVAE_ERR_IO naming it, as replacing the folder would take it
 * along. The parent folder must exist and be writable; a symbolic link PATH
 * is followed. On error PATH is as it was and no temporary folder is left;
 * what a crashed save left (temporary folders no live writer holds) is
 * removed by the next save to PATH. Where the filesystem cannot swap folders
 * (NFS, some FUSE), PATH is renamed aside to PATH.old.klvae-XXXXXX and the
 * new folder renamed in: a crash between the two leaves no PATH, and the
 * next save to PATH renames the old one back first. Errors:
 * KLVAE_ERR_INVALID_ARGUMENT (NULL, or a path ending in "/", "." or ".."),
 * KLVAE_ERR_IO, KLVAE_ERR_OUT_OF_MEMORY. */
KLVAE_API klvae_status_t klvae_model_save(const klvae_model_t *model, const char *path);

/* Releases the model, its worker threads and the memory it kept between
 * calls (option keep_memory). NULL is a no-op. */
KLVAE_API void klvae_model_free(klvae_model_t *model);

/* Config queries. Each returns 0 (0.0f) when model is NULL. */
KLVAE_API int klvae_model_in_channels(const klvae_model_t *model);
KLVAE_API int klvae_model_out_channels(const klvae_model_t *model);
KLVAE_API int klvae_model_latent_channels(const klvae_model_t *model);
/* 2^(number of blocks - 1): 8 for SD. Image sizes given to klvae_encode must
 * be multiples of it. */
KLVAE_API int klvae_model_downsampling_factor(const klvae_model_t *model);
/* Diffusion pipelines feed the denoiser (z - shift_factor) * scaling_factor
 * and decode z / scaling_factor + shift_factor. shift_factor is 0 when the
 * config has none. */
KLVAE_API float klvae_model_scaling_factor(const klvae_model_t *model);
KLVAE_API float klvae_model_shift_factor(const klvae_model_t *model);
/* Number of scalar parameters (83,653,863 for SD). */
KLVAE_API int64_t klvae_model_parameter_count(const klvae_model_t *model);
/* The backend in use: "cpu" or "cuda" (with backend=auto, "cuda" when the
 * CUDA plugin loads and finds the device, else "cpu": klvae_model_get's key
 * "backend_reason" says why). A static string; "" for NULL. */
KLVAE_API const char *klvae_model_backend(const klvae_model_t *model);

/* Copies the model's value of a key into buf, as option text: any model
 * config key of docs/options.md except "config" (e.g. "block_out_channels"
 * gives "128,256,512,512", "shift_factor" gives "none" when there is none),
 * one of the runtime keys "backend", "precision" and "threads" (what the
 * model actually uses), the inference keys "memory_limit" ("auto", "none"
 * or the number of bytes), "keep_memory" ("true" or "false"), "spill_dir",
 * "tiling", "tile_size" and "tile_overlap", or the read-only keys
 * "backend_reason": why backend=auto chose the CPU (for example "CUDA
 * plugin not found (looked in: ...)"), ""
 * when the model runs on CUDA or the CPU was asked for; "precision_reason":
 * why the model computes in fp32 though another precision was asked for
 * (precision=bf16 on a CPU without AVX512-BF16, tf32 on the CPU), else "";
 * and "last_plan": how the last klvae_encode or klvae_decode ran, for
 * example "untiled" or "streamed: 121 bands of 2 to 256 rows; 2.50 GiB held
 * at most (planned 2.50 GiB, memory_limit 3.00 GiB); 4.00 GiB spilled to a
 * file in /var/tmp" ("none yet" before the first). Dashes work as
 * underscores. Errors: KLVAE_ERR_INVALID_ARGUMENT (model or key
 * NULL, buf NULL with size > 0), KLVAE_ERR_BUFFER_TOO_SMALL (the value does
 * not fit: klvae_last_needed_size() tells the size needed; buf = NULL,
 * size = 0 asks for it), KLVAE_ERR_OPTION (a key the model has no value
 * for). buf is unchanged on error. */
KLVAE_API klvae_status_t klvae_model_get(const klvae_model_t *model, const char *key,
                                         char *buf, size_t size);

/* ------------------------------------------------------------------------ */
/* Inference                                                                 */
/* ------------------------------------------------------------------------ */

/* Encodes n images (n, in_channels, h, w), values in [-1, 1], into the
 * diagonal Gaussian posterior: mean and logvar, each
 * (n, latent_channels, h / f, w / f). logvar is clamped to [-30, 20] as in
 * diffusers. h and w must be positive multiples of the downsampling factor f.
 * logvar may be NULL when it is not wanted. mean and logvar must not
 * overlap images. The memory the call used stays with the model for the
 * next call (option keep_memory; klvae_model_free gives it back).
 *
 * Large images: the model's option memory_limit (docs/options.md) bounds
 * the memory the call takes beyond the weights and your arrays. When the
 * untiled forward would need more, the call runs streamed (layer by layer
 * over row bands, one image at a time, every group norm and the attention
 * still over the whole image: the untiled result within float rounding),
 * with what does not fit in a temporary file in spill_dir that nothing
 * outlives. tiling=blend runs diffusers' tiled forward instead (not the
 * same result). The same holds for klvae_decode; klvae_model_get's
 * "last_plan" says how the call ran.
 *
 * Errors: KLVAE_ERR_INVALID_ARGUMENT (NULL pointer, n <= 0, bad size, the
 * message says which), KLVAE_ERR_OUT_OF_MEMORY (also: memory_limit is too
 * small even for streaming; the message names the least limit that works),
 * KLVAE_ERR_IO (the spill file cannot be created or grow: the message names
 * the folder), KLVAE_ERR_OPTION (tile_size and tile_overlap do not tile the
 * image), KLVAE_ERR_BACKEND. On error the contents of mean and logvar are
 * unspecified. A NaN or infinity in
 * images is not an error: it propagates (through the group norms, to the
 * whole latent of its image and no other), as in PyTorch; the same holds for
 * klvae_sample and klvae_decode. */
KLVAE_API klvae_status_t klvae_encode(klvae_model_t *model, const float *images, int n,
                                      int h, int w, float *mean, float *logvar);

/* Draws z = mean + exp(logvar / 2) * eps for tensors of shape
 * (n, latent_channels, lat_h, lat_w). logvar is clamped to [-30, 20] first;
 * exp is evaluated in double and rounded to float, then z = mean + std * eps
 * in float. eps ~ N(0, 1) comes from a counter-based generator
 * (Philox-4x32-10 with Box-Muller): element i of the batch tensor depends
 * only on seed and i, so the same seed gives the same z on every backend and
 * for every thread count. z may be the same array as mean or logvar, but
 * must not overlap them otherwise.
 * Errors: KLVAE_ERR_INVALID_ARGUMENT (NULL pointer, size <= 0, overflowing
 * sizes, z partly overlapping an input). */
KLVAE_API klvae_status_t klvae_sample(klvae_model_t *model, const float *mean,
                                      const float *logvar, int n, int lat_h, int lat_w,
                                      uint64_t seed, float *z);

/* Decodes n latents (n, latent_channels, lat_h, lat_w) into images
 * (n, out_channels, lat_h * f, lat_w * f). The output is not clamped; its
 * nominal range is [-1, 1]. images must not overlap z.
 * Errors: as klvae_encode. */
KLVAE_API klvae_status_t klvae_decode(klvae_model_t *model, const float *z, int n,
                                      int lat_h, int lat_w, float *images);

/* ------------------------------------------------------------------------ */
/* Inference on GPU memory                                                   */
/* ------------------------------------------------------------------------ */

/* The same three operations on arrays in the GPU memory of a model whose
 * backend is "cuda" (klvae_model_backend), without copies to or from the
 * host. Shapes, argument rules, results and errors are those of
 * klvae_encode, klvae_decode and klvae_sample; what differs:
 *
 *   - Every array pointer is device memory on the model's GPU (option
 *     "device"): from cudaMalloc, cudaMallocAsync or managed memory, or a
 *     framework's tensor (torch.Tensor.data_ptr(), float32, contiguous).
 *   - stream is a cudaStream_t passed as void *. The work runs on that
 *     stream, so it starts after the work the caller queued there before (no
 *     extra synchronisation needed to produce the inputs). NULL means the
 *     model's own stream, which is not ordered with the caller's streams: the
 *     inputs must then be complete (e.g. after cudaStreamSynchronize) when
 *     the call is made.
 *   - The call returns when the work is complete on that stream: the outputs
 *     can be read at once, from any stream, and the inputs reused. (It
 *     synchronises that stream; other work queued there before the call is
 *     waited for too.)
 *   - The model still must not be used by two threads at once; the call
 *     leaves the model on its own stream again.
 *
 *   - They run the untiled forward: streaming and tiling work on host
 *     arrays. With memory_limit a size that the untiled forward exceeds, or
 *     tiling=blend on an image larger than a tile, they return
 *     KLVAE_ERR_UNSUPPORTED (klvae_encode and klvae_decode stream it).
 *
 * Errors: those of the host functions; KLVAE_ERR_INVALID_ARGUMENT when the
 * model runs on the CPU backend ("the model runs on the cpu backend, which
 * has no device memory; use klvae_encode ..."); KLVAE_ERR_BACKEND when the
 * device reports an error (an invalid pointer or stream, a failed kernel:
 * the CUDA text is in the message). Pointers are not checked to be device
 * memory: host pointers are undefined behaviour, as in CUDA itself. */
KLVAE_API klvae_status_t klvae_encode_device(klvae_model_t *model, const float *images, int n,
                                             int h, int w, float *mean, float *logvar,
                                             void *stream);
KLVAE_API klvae_status_t klvae_decode_device(klvae_model_t *model, const float *z, int n,
                                             int lat_h, int lat_w, float *images, void *stream);
KLVAE_API klvae_status_t klvae_sample_device(klvae_model_t *model, const float *mean,
                                             const float *logvar, int n, int lat_h, int lat_w,
                                             uint64_t seed, float *z, void *stream);

/* ------------------------------------------------------------------------ */
/* Training                                                                  */
/* ------------------------------------------------------------------------ */

/* The LDM training step (latent-diffusion's AutoencoderKL with
 * LPIPSWithDiscriminator): per image x and reconstruction x' = decode(z),
 * z drawn from the posterior,
 *
 *   nll   = sum over pixels of pixel_weight |x - x'| (or squared, pixel_loss
 *           l2) + perceptual_weight LPIPS(x, x') per pixel, divided by
 *           exp(logvar) and plus logvar, averaged over the batch;
 *   kl    = the posterior's KL divergence summed per image, batch average;
 *   g     = -mean D(x') of the PatchGAN discriminator D;
 *   total = nll + kl_weight kl + d_weight f g,
 *
 * with f = disc_factor from step disc_start on (else 0) and d_weight the
 * adaptive weight disc_weight ||grad nll|| / (||grad g|| + 1e-4) (gradients
 * at decoder.conv_out.weight, clamped to [0, 1e4]). One step updates the
 * autoencoder with Adam, then the discriminator on the hinge (or vanilla)
 * loss f 0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x'))). Options (docs/
 * options.md, trainer group) choose every weight and switch; preset=ldm
 * reproduces the reference exactly (see docs/training.md). */

typedef struct klvae_trainer klvae_trainer_t;

/* What one step did. Set struct_size to sizeof(klvae_step_stats_t) before
 * the call (KLVAE_STEP_STATS_INIT does): the library writes only the fields
 * that fit, so later versions can append fields. */
typedef struct klvae_step_stats {
    uint32_t struct_size;
    uint32_t reserved;
    int64_t step;           /* the optimizer step just made, from 0 */
    double total_loss;      /* nll + kl_weight kl + d_weight f g */
    double rec_loss;        /* mean over pixels of the weighted pixel + LPIPS terms */
    double perceptual_loss; /* mean LPIPS over the batch (unweighted; 0 without LPIPS) */
    double nll_loss;        /* the nll above */
    double kl_loss;         /* KL summed per image, batch mean (unweighted) */
    double g_loss;          /* -mean D(x') (0 while the GAN is off) */
    double d_weight;        /* the adaptive weight, disc_weight included */
    double disc_factor;     /* f */
    double d_loss;          /* the discriminator loss, f included */
    double logits_real;     /* mean D(x) in the discriminator step */
    double logits_fake;     /* mean D(x') in the discriminator step */
    double logvar;          /* the loss' log-variance */
    double seconds;         /* wall time of the step */
    /* Since 0.2.0: */
    uint32_t skipped;       /* 1: this call made no update (nonfinite=skip and a
                               non-finite value); its losses may be NaN */
    uint32_t spare;
    int64_t skipped_steps;  /* steps skipped so far (saved in checkpoints) */
} klvae_step_stats_t;

#define KLVAE_STEP_STATS_INIT                                                                \
    {sizeof(klvae_step_stats_t), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}

/* Creates a trainer for model, which it borrows: the model must outlive the
 * trainer, and while the trainer exists the model's weights change with
 * every step (encode and decode may still be called between steps). The
 * trainer owns the gradients, both Adam states, the discriminator, LPIPS (when
 * lpips_weights is given) and the EMA weights (when ema_decay > 0).
 * Errors: KLVAE_ERR_INVALID_ARGUMENT, KLVAE_ERR_UNSUPPORTED (the model's
 * backend lacks an op training needs: the message names the backend and
 * the op, and nothing was allocated), KLVAE_ERR_OPTION, and loading errors
 * of lpips_weights or disc_weights (KLVAE_ERR_NONFINITE for a NaN or
 * infinite weight among them). *out is NULL on error. */
KLVAE_API klvae_status_t klvae_trainer_create(klvae_model_t *model, const klvae_options_t *opts,
                                              klvae_trainer_t **out);

/* One optimizer step on n images (n, in_channels, h, w) in [-1, 1]: h and w
 * multiples of the downsampling factor and at least 16 (for LPIPS), and
 * when the discriminator runs in this step (from disc_start on, or always
 * with preset=ldm) at least its minimum (24 for the default 3 layers);
 * n divisible by grad_accum. stats may be NULL; it is written on success.
 *
 * Non-finite values: a NaN or infinity in images is KLVAE_ERR_NONFINITE
 * (the message names the image and position) before anything runs. A
 * non-finite loss or gradient is found before any update: with option
 * nonfinite=refuse (the default) the call returns KLVAE_ERR_NONFINITE naming
 * it, and weights, both optimisers, EMA, the discriminator's BatchNorm
 * statistics and the step counter are unchanged; with nonfinite=skip it
 * returns KLVAE_OK with stats->skipped = 1, changes nothing either but
 * counts the step in stats->skipped_steps (the step counter does not move).
 * One exception: with disc_update=fresh the discriminator runs on the
 * updated autoencoder, so a value that only that pass makes non-finite is
 * found after the autoencoder's update; then the autoencoder's update
 * stands and the step counts, the discriminator is unchanged, and the call
 * returns KLVAE_ERR_NONFINITE (refuse) or KLVAE_OK with skipped = 1 (skip).
 *
 * On any other error the weights may be partly updated; reload a checkpoint
 * to continue. Errors: KLVAE_ERR_INVALID_ARGUMENT, KLVAE_ERR_NONFINITE,
 * KLVAE_ERR_OUT_OF_MEMORY, KLVAE_ERR_BACKEND. */
KLVAE_API klvae_status_t klvae_trainer_step(klvae_trainer_t *trainer, const float *images, int n,
                                            int h, int w, klvae_step_stats_t *stats);

/* klvae_trainer_step on a batch already in GPU memory: images is a device
 * pointer to n float32 NCHW images in [-1, 1], read on the CUDA stream
 * stream (a cudaStream_t; NULL: the model's own stream), which the step
 * runs on; the call returns when that work is done (stats filled). The
 * images are copied into the trainer's memory first and checked for NaN and
 * infinity on the device (KLVAE_ERR_NONFINITE, nothing changed). Needs a
 * model on the CUDA backend (KLVAE_ERR_INVALID_ARGUMENT otherwise); the
 * same arguments, results and errors as klvae_trainer_step. Host pointers
 * are undefined behaviour, as in CUDA itself. */
KLVAE_API klvae_status_t klvae_trainer_step_device(klvae_trainer_t *trainer, const float *images,
                                                   int n, int h, int w, void *stream,
                                                   klvae_step_stats_t *stats);

/* Writes a checkpoint: one safetensors file with the autoencoder, the
 * discriminator (with its BatchNorm statistics), both Adam states, the EMA
 * weights, the loss' logvar, and in its metadata the step, the random state,
 * the options and the notes (klvae_trainer_set_note). Written to a temporary
 * file (PATH.tmp.klvae-XXXXXX), flushed and renamed: a failure or a crash
 * leaves any earlier checkpoint intact, and the next save to PATH removes the
 * temporary files crashed saves left.
 * Errors: KLVAE_ERR_INVALID_ARGUMENT, KLVAE_ERR_IO, KLVAE_ERR_OUT_OF_MEMORY. */
KLVAE_API klvae_status_t klvae_trainer_save(const klvae_trainer_t *trainer, const char *path);

/* Resumes from a checkpoint of a trainer with the same model config and
 * discriminator shape: training continues exactly as if it had not
 * stopped (on the CPU, bit for bit). The whole file is checked first
 * (every tensor's name, shape, dtype and values) and only then read in.
 * Errors: those of klvae_model_load (KLVAE_ERR_UNSUPPORTED for a tensor of
 * a non-float dtype, KLVAE_ERR_NONFINITE for a NaN or infinite value, each
 * naming the tensor), and KLVAE_ERR_CONFIG when the checkpoint belongs to
 * another architecture. On error the trainer (weights, both optimisers,
 * EMA, discriminator, step counter, notes) is unchanged. */
KLVAE_API klvae_status_t klvae_trainer_load(klvae_trainer_t *trainer, const char *path);

/* Writes the trained autoencoder as a diffusers folder, in one step as
 * klvae_model_save does (the same code): the EMA weights when use_ema is non-zero (ema_decay
 * must be > 0), else the current weights. */
KLVAE_API klvae_status_t klvae_trainer_export(const klvae_trainer_t *trainer, const char *path,
                                              int use_ema);

/* Optimizer steps made so far (after a load: those of the checkpoint). */
KLVAE_API int64_t klvae_trainer_step_count(const klvae_trainer_t *trainer);

/* The value the trainer uses for a trainer option key (after presets and
 * defaults; "perceptual_weight" is "0" when no LPIPS weights were given), as
 * option text. Errors as klvae_model_get. */
KLVAE_API klvae_status_t klvae_trainer_get(const klvae_trainer_t *trainer, const char *key,
                                           char *buf, size_t size);

/* Notes: small key/value strings saved in checkpoints and restored by
 * klvae_trainer_load, for the caller's own state (the klvae tool keeps its
 * data position there). Keys and values up to 255 bytes, at most 32 notes.
 * get copies the value into buf; a missing key is KLVAE_ERR_OPTION, and a
 * buffer that is too small is handled as by klvae_model_get. */
KLVAE_API klvae_status_t klvae_trainer_set_note(klvae_trainer_t *trainer, const char *key,
                                                const char *value);
KLVAE_API klvae_status_t klvae_trainer_get_note(const klvae_trainer_t *trainer, const char *key,
                                                char *buf, size_t size);

/* Releases the trainer (not the model), and the memory its steps kept for
 * the next step (a step reuses what the last one released; the backend
 * holds it between steps, never more than a step's peak). Free every
 * trainer of a model before the model: the trainer uses the model's weights
 * and backend until then. NULL is a no-op. */
KLVAE_API void klvae_trainer_free(klvae_trainer_t *trainer);

/* ------------------------------------------------------------------------ */
/* Data-parallel training                                                    */
/* ------------------------------------------------------------------------ */

/* libklvae links no MPI and no NCCL. A program that trains on several
 * processes ("ranks", say one per GPU) gives each rank's trainer its
 * communicator as two callbacks (klvae_comm_t; examples/mpi/ wraps
 * MPI_COMM_WORLD), and the trainers then make each step together:
 *
 *   - Each rank passes klvae_trainer_step (or klvae_trainer_step_device)
 *     its own n images, the same n, h and w on every rank: the global batch
 *     is n * size images. With grad_accum A, micro-batch m of the global
 *     batch is every rank's micro-batch m (its images m n/A .. (m+1) n/A -
 *     1), rank 0's first.
 *     The random numbers (posterior noise, LPIPS dropout) are those of each
 *     image's place in that global batch.
 *   - The gradients of both networks are summed over the ranks before the
 *     optimisers step (clipping uses the global norm), so every rank holds
 *     the same weights after every step. The losses in klvae_step_stats_t
 *     are the global batch's, on every rank.
 *   - Option data_parallel=exact (the default): the step is the
 *     single-process step on the global batch, up to float rounding: the
 *     adaptive GAN weight comes from the summed last-layer gradients and the
 *     discriminator's BatchNorm normalises with the global batch's
 *     statistics. data_parallel=ddp (the default of preset=ldm) is Lightning
 *     DDP's step: each rank's own BatchNorm statistics and adaptive weight,
 *     and rank 0's BatchNorm running statistics (docs/training.md).
 *   - On the CUDA backend the gradients are summed on the GPUs with NCCL
 *     (option allreduce): the plugin loads libnccl.so.2 (or the file named
 *     by the environment variable KLVAE_NCCL_LIBRARY), rank 0 makes the
 *     ncclUniqueId and the broadcast callback sends it to the other ranks.
 *     The sums of gradient buckets (allreduce_bucket_mb) start while the
 *     backward still runs. Elsewhere they go through allreduce_sum.
 *
 * Every callback is a collective: every rank calls it in the same order
 * with the same count, and the library makes its calls so as long as every
 * rank calls the library the same way (the same functions, in the same
 * order, with the same sizes). A callback returns 0 on success; anything
 * else fails the library call with KLVAE_ERR_COMM. Callbacks run on the
 * thread that called the library. */

typedef enum klvae_comm_type {
    KLVAE_COMM_FLOAT32 = 0, /* float */
    KLVAE_COMM_FLOAT64 = 1  /* double */
} klvae_comm_type_t;

typedef struct klvae_comm {
    uint32_t struct_size; /* sizeof(klvae_comm_t) */
    int rank;             /* this process, 0 .. size - 1 */
    int size;             /* the number of processes, at least 1 */
    void *ctx;            /* given back to every callback */
    /* data[0 .. count) = the elementwise sum over all ranks of their
     * data[0 .. count), in place, in host memory, with the same bits on
     * every rank (MPI_Allreduce with MPI_IN_PLACE and MPI_SUM does this;
     * the library never passes more than 2^28 elements at once). */
    int (*allreduce_sum)(void *ctx, void *data, size_t count, klvae_comm_type_t type);
    /* bytes bytes at data on rank root, copied to data on every other rank
     * (MPI_Bcast). */
    int (*broadcast)(void *ctx, void *data, size_t bytes, int root);
} klvae_comm_t;

/* Makes trainer rank comm->rank of a data-parallel run of comm->size ranks
 * (see above), or with comm NULL a single process again. Collective: every
 * rank calls it, with trainers of the same model config and trainer options
 * (backend, device and threads may differ). It checks that they agree, then
 * copies rank 0's whole state (weights, both optimisers, EMA, the
 * discriminator and its BatchNorm statistics, the step counter) to every
 * rank, as DDP does when it wraps a model: load a checkpoint before, on
 * rank 0 at least. Later klvae_trainer_load calls are not collective: make
 * them on every rank with the same file. klvae_trainer_save and
 * klvae_trainer_export are not collective either: every rank holds the same
 * state, so rank 0 alone usually writes.
 *
 * *comm is copied; ctx and the callbacks must stay usable until the trainer
 * is freed or another klvae_trainer_set_comm call replaces them.
 *
 * Failures during a step: a rank whose klvae_trainer_step refuses its
 * arguments (a size, images that differ in number or size from the other
 * ranks', a NaN in its images) makes every rank's call return that status,
 * with a message naming the rank, before anything runs. Any later failure
 * (out of memory, a backend error, KLVAE_ERR_COMM) returns on the rank it
 * happened on while the others may be waiting in a callback: the program
 * must then abort its communicator (MPI_Abort), as the klvae tool does.
 * (KLVAE_ERR_BUSY and a NULL trainer return at once on that rank only: they
 * are program errors.) A non-finite loss or gradient is the same on every
 * rank (losses and gradients are global), so every rank refuses or skips
 * the step together.
 *
 * Errors: KLVAE_ERR_INVALID_ARGUMENT (NULL trainer, struct_size too small,
 * size < 1, rank outside 0 .. size - 1, a NULL callback), KLVAE_ERR_CONFIG
 * (the ranks' trainers differ: the message names the first rank and what
 * differs), KLVAE_ERR_COMM (a callback failed), KLVAE_ERR_BACKEND_UNAVAILABLE
 * (allreduce=nccl and NCCL cannot be used here: the message says why),
 * KLVAE_ERR_OUT_OF_MEMORY, KLVAE_ERR_BUSY (on that rank only). On every
 * error but KLVAE_ERR_COMM the trainer is unchanged; after KLVAE_ERR_COMM
 * the ranks' states may differ (the copy may have stopped halfway) and the
 * trainer is a single process. */
KLVAE_API klvae_status_t klvae_trainer_set_comm(klvae_trainer_t *trainer,
                                                const klvae_comm_t *comm);

/* ------------------------------------------------------------------------ */
/* Encoding datasets                                                         */
/* ------------------------------------------------------------------------ */

/* What klvae_encode_dataset has done, given to its progress function and
 * in its summary. Set struct_size to sizeof(klvae_dataset_progress_t)
 * before the call (KLVAE_DATASET_PROGRESS_INIT does): the library writes
 * only the fields that fit, so later versions can append fields. Counts
 * are of this call's part, and include what earlier runs into the same
 * folder finished (a resumed run starts where they stopped). */
typedef struct klvae_dataset_progress {
    uint32_t struct_size;
    uint32_t reserved;
    int32_t part, parts;     /* this call encodes part `part` of `parts` (from 0) */
    int64_t images_total;    /* image files of this part */
    int64_t images_done;     /* encoded into shards (resumed ones included) */
    int64_t images_skipped;  /* files that could not be read (resumed ones included) */
    int64_t images_resumed;  /* of images_done: found in shards of an earlier run */
    int64_t shards_total;
    int64_t shards_done;
    double seconds;          /* since the call started */
    double images_per_second; /* images encoded by this call per second of it */
    double eta_seconds;      /* at that rate, for the rest of the part; -1 while unknown */
    /* In one call per skipped file, the file (as listed) and why it was
     * skipped; NULL otherwise. Valid during the call only. */
    const char *skipped_path;
    const char *skipped_reason;
    int32_t finished;         /* 1 when the part is complete (the last call, the summary) */
    int32_t dataset_complete; /* 1 when every part is, and the manifest is final */
} klvae_dataset_progress_t;

#define KLVAE_DATASET_PROGRESS_INIT                                                          \
    {sizeof(klvae_dataset_progress_t), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, NULL, NULL, 0, 0}

/* Called by klvae_encode_dataset on the calling thread: after every batch
 * of images, once per skipped file, and once at the end. A non-zero return
 * stops the work at once: the shard being filled is not written, those
 * written stay (a later call continues from them), and the call returns
 * KLVAE_OK with finished = 0. */
typedef int (*klvae_dataset_progress_fn)(void *user, const klvae_dataset_progress_t *progress);

/* Encodes a whole dataset of images into latents for diffusion training:
 * shards of safetensors files in out_dir, with an index and a manifest
 * (docs/latents.md describes the folder; any safetensors reader opens it).
 *
 * data is a folder, whose PNG and JPEG files (recursively, in byte order of
 * their paths, as `klvae train` reads them) are the dataset, or a text file
 * listing image paths, one per line (relative ones are relative to the
 * list's folder). Each image is read, resized and cropped to the options'
 * size (or to its aspect-ratio bucket, option buckets), encoded, and its
 * posterior mean and logvar (or a sample, store=sample) stored in the
 * dtype chosen, optionally scaled by the model's factors (scale_latents)
 * and with the latents of its mirror image (flip). The dataset options
 * (size, crop, buckets, flip, store, dtype, scale_latents, shard_size,
 * part, encode_batch, loader_threads, seed, max_image_pixels, model_name)
 * are in docs/options.md; opts may be NULL (all defaults). Threads read and
 * resize images while the model encodes, images of one bucket at a time.
 *
 * Work is split for clusters: option part I/N encodes a disjoint,
 * deterministic part of the file list (under mpirun, part "auto" takes the
 * MPI rank and size from the environment, Open MPI's or MPICH's, without
 * linking MPI). Parts write into the same out_dir; the part that finishes
 * last merges them into one dataset (index.jsonl, errors.jsonl and the final
 * manifest.json with the latents' statistics, as klvae_latent_stats).
 *
 * Resuming: shards are written whole or not at all (a temporary file
 * renamed into place). Calling again with the same model, data and options
 * after a crash or a kill keeps the shards already written and encodes the
 * missing ones; the finished folder is byte for byte the one an
 * uninterrupted run makes (for the same backend and precision). out_dir
 * may exist; its manifest.json, when present, must record the same settings
 * (model config and encoder weights, data files, options), else the call is
 * refused before anything is written.
 *
 * Unreadable images (missing, truncated, not an image, over the pixel
 * budget) are skipped, reported through progress and listed with the reason
 * in out_dir/errors.jsonl; they are no error of the call. An error of the
 * output (a full disk, no permission) stops the call: no shard is left half
 * written, and the message names the file and the OS error.
 *
 * progress (may be NULL) is called as klvae_dataset_progress_fn says, with
 * user. summary (may be NULL; its struct_size set) receives the final
 * counts. The model is used by this thread throughout (see "Threads").
 * Errors: KLVAE_ERR_INVALID_ARGUMENT (NULL model, data or out_dir; a size
 * or bucket step that is no multiple of the downsampling factor; a model
 * without 3 input channels; out_dir holding a dataset made otherwise),
 * KLVAE_ERR_IO (data or out_dir cannot be read or written, no image file
 * under data), KLVAE_ERR_FORMAT (a damaged shard in out_dir, a bad list
 * file), KLVAE_ERR_OUT_OF_MEMORY, KLVAE_ERR_BACKEND. */
KLVAE_API klvae_status_t klvae_encode_dataset(klvae_model_t *model, const char *data,
                                              const char *out_dir, const klvae_options_t *opts,
                                              klvae_dataset_progress_fn progress, void *user,
                                              klvae_dataset_progress_t *summary);

/* The statistics of a finished latent dataset (out_dir of
 * klvae_encode_dataset, every part done): per latent channel the mean and
 * standard deviation of the latents over every stored image (flipped
 * copies included), in the model's raw latent space (stored values
 * unscaled when scale_latents was on). For a stored posterior they are
 * those of z drawn from it: the mean of the means, and the standard
 * deviation from the variance of the means plus the mean of exp(logvar).
 * scaling_factor is 1 / the standard deviation over all channels, and
 * shift_factor the mean over all channels: (z - shift_factor) *
 * scaling_factor has mean 0 and variance 1, as SD3 and FLUX use them (SD
 * uses the scaling factor alone). The statistics are also written to
 * shards_dir/manifest.json, with index.jsonl and errors.jsonl (the merge
 * of the parts), by a temporary file and a rename each.
 *
 * mean and std receive min(channels, capacity) values each (either may be
 * NULL); *channels the number of latent channels; the other outputs may
 * be NULL. Errors: KLVAE_ERR_INVALID_ARGUMENT (shards_dir NULL, capacity
 * < 0), KLVAE_ERR_IO (no manifest.json, a part or shard missing: the
 * message names it), KLVAE_ERR_FORMAT (a damaged file),
 * KLVAE_ERR_OUT_OF_MEMORY. */
KLVAE_API klvae_status_t klvae_latent_stats(const char *shards_dir, int capacity, int *channels,
                                            double *mean, double *std, double *scaling_factor,
                                            double *shift_factor);

/* ------------------------------------------------------------------------ */
/* Images                                                                    */
/* ------------------------------------------------------------------------ */

/* Reads a PNG or JPEG image (the format is recognised from the file's first
 * bytes) into a newly allocated (3, h, w) float array with values in
 * [-1, 1]. PNGs of any bit depth work; grey, palette and alpha are
 * converted to RGB (alpha is dropped) and 16-bit samples keep their
 * precision. JPEGs may be grey, RGB or CMYK. Free the array with klvae_free.
 * Images of more than 67108864 pixels (the default of the option
 * max_image_pixels; klvae_image_read_opts takes another budget) are refused
 * from their header, before anything their size is allocated.
 * Errors: KLVAE_ERR_INVALID_ARGUMENT (NULL pointer), KLVAE_ERR_IO (cannot
 * open, or not a regular file), KLVAE_ERR_FORMAT (neither PNG nor JPEG,
 * corrupt or truncated image data, which is never padded with grey; more
 * than 65536 pixels on a side),
 * KLVAE_ERR_UNSUPPORTED (more pixels than the budget; the message names the
 * file, its size, the budget and the option), KLVAE_ERR_OUT_OF_MEMORY. On
 * error *pixels is NULL and *h, *w are 0 (for each of them that is not
 * NULL). */
KLVAE_API klvae_status_t klvae_image_read(const char *path, float **pixels, int *h, int *w);

/* klvae_image_read with options: the pixel budget is opts' max_image_pixels
 * (1 to 2^40; docs/options.md). opts may be NULL (all defaults), and is only
 * read during the call. Same ownership, errors and outputs on error as
 * klvae_image_read. */
KLVAE_API klvae_status_t klvae_image_read_opts(const char *path, const klvae_options_t *opts,
                                               float **pixels, int *h, int *w);

/* Writes a (3, h, w) float image with values in [-1, 1] as an 8-bit RGB PNG:
 * each value v becomes round(255 * clamp(v * 0.5 + 0.5, 0, 1)), as diffusers
 * post-processes; NaN becomes 0. The file is written to a temporary name and
 * renamed, so a failure leaves no partial file. Errors:
 * KLVAE_ERR_INVALID_ARGUMENT (NULL pointer, h or w not in 1..65536),
 * KLVAE_ERR_IO, KLVAE_ERR_OUT_OF_MEMORY. */
KLVAE_API klvae_status_t klvae_image_write_png(const char *path, const float *pixels,
                                               int h, int w);

#ifdef __cplusplus
}
#endif

#endif /* KLVAE_H */
