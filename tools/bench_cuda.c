/* bench_cuda.c — times encode and decode of a random-weight model on the CUDA
 * backend, tensors already on the device (as diffusers is timed on tensors
 * already on the GPU), for tests/gpu/check.sh. Prints one line of JSON per
 * case:
 *   {"tool": "klvae", "op", "size", "batch", "precision", "config", "times_ms": [...],
 *    "median_ms", "first_ms", "peak_in_use_mb", "peak_reserved_mb", "pool_growth_mb",
 *    "variant"}
 * where variant names the plugin's settings from the environment that the
 * GPU check compares ("default", or e.g. "KLVAE_CUDA_FUSED=0").
 *
 *   bench_cuda OP:SIZE:BATCH[,OP:SIZE:BATCH...] [--precision fp32|tf32|bf16]
 *              [--runs R] [--warmup W] [--config NAME] [--plugin PATH] [--device D]
 *              [--lpips FILE]
 *
 * OP is encode, decode or train. train times klvae_trainer_step of the
 * model on a batch of random images, with the settings of
 * tools/bench_train_pytorch.py (pixel L1 + LPIPS from --lpips FILE + KL
 * 1e-6 + the PatchGAN from step 0 with the adaptive weight, Adam lr 1e-5
 * betas 0.5, 0.9): its line also has "images_per_s".
 *
 * OP quality (quality:SIZE:BATCH, with --steps S, default 400) trains the
 * model from its seeded weights for S steps on the built-in procedural
 * images (pixel L1 + KL, no LPIPS, no discriminator, Adam lr 2e-4) and
 * reports the held-out PSNR of the result, reconstructed on the CPU backend
 * in float32 ("psnr_db", "train_s", "rec_loss_first", "rec_loss_last"): the
 * same command in fp32 and bf16 compares mixed-precision training with
 * float32 training.
 *
 * OP stream (stream:SIZE:LIMIT) decodes one SIZE^2 latent as a user does
 * (klvae_decode on host arrays) with memory_limit LIMIT GiB, or none when
 * LIMIT is 0 (untiled): the streamed forward on the GPU (issue 13). The
 * latent is DIR/zSIZE.raw (raw float32 (1, 4, SIZE/8, SIZE/8)) with
 * --latents DIR, where the image is written too
 * (DIR/klvae_SIZE_LIMITg_PRECISION.raw, float32 (1, 3, SIZE, SIZE)). Its
 * line has "limit_gib", "plan" (last_plan), "peak_in_use_mb" (the device's
 * peak over the call, weights included) and "peak_rss_mb" (the process's).
 * --save-model DIR writes the model (its random weights) as a diffusers
 * folder first, for the PyTorch side to decode the same latent.
 *
 * One model serves every case (its creation, about a
 * second of CPU, is paid once); cuDNN's algorithm choices stay cached across
 * cases, as PyTorch's do. Per case: the first call (first_ms, with cuDNN's
 * algorithm search for shapes not seen yet), W more untimed calls, a trim
 * (the memory statistics restart), one more untimed call, and R timed calls,
 * each ended by a synchronize; then a trim. The peaks are the backend's
 * device memory over the last R + 1 calls: bytes in use (tensors, weights
 * and work buffers: what torch.cuda.max_memory_allocated counts) and bytes
 * its stream-ordered pool held (in use or free for reuse), read from the
 * plugin's KLVAE_CUDA_MEMSTATS file; pool_growth_mb is what the pool took
 * from the device during the timed calls (0 when repeated calls of one
 * shape allocate nothing, cuda/memory.cu). It links lib/libklvae.a
 * (the model is built on the plugin's backend with the library's internal
 * functions).
 *
 * Built alone (make build/bench_cuda) it is its own program; in the GPU
 * bundle (make gpu-binaries) it is `test_cuda bench ...`, so that only one
 * binary with OpenBLAS linked in travels. */
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "cli/cli.h" /* image_psnr, as klvae eval computes it */
#include "cuda_harness.h"
#include "train/procedural.h"

static int compare(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void usage(void)
{
    fprintf(stderr, "usage: bench_cuda OP:SIZE:BATCH[,...] [--precision P] [--runs R] "
                    "[--warmup W] [--config NAME] [--plugin PATH] [--device D] [--lpips FILE]\n"
                    "       [--latents DIR] [--save-model DIR] [--steps S]\n"
                    "(OP: encode, decode, train, quality, or stream with SIZE:LIMIT_GIB)\n");
    exit(2);
}

/* The last statistics line of the plugin's file (it writes one at every
 * synchronize and trim): peak bytes in use and held, bytes held now, in MiB. */
/* One statistics line's three figures in MiB; false for another line. */
static bool parse_stats(const char *line, double *in_use_mb, double *peak_held_mb,
                        double *held_mb)
{
    const char *a = strstr(line, "peak_in_use="), *b = strstr(line, "peak_reserved=");
    const char *c = strstr(line, " reserved=");
    if (!a || !b || !c)
        return false;
    *in_use_mb = strtod(a + 12, NULL) / 1048576.0;
    *peak_held_mb = strtod(b + 14, NULL) / 1048576.0;
    *held_mb = strtod(c + 10, NULL) / 1048576.0;
    return true;
}

static void read_last(const char *path, double *in_use_mb, double *peak_held_mb,
                      double *held_mb)
{
    *in_use_mb = *peak_held_mb = *held_mb = -1.0;
    FILE *fp = fopen(path, "r");
    if (!fp)
        return;
    char line[512];
    double a, b, c;
    while (fgets(line, sizeof line, fp))
        if (parse_stats(line, &a, &b, &c)) {
            *in_use_mb = a;
            *peak_held_mb = b;
            *held_mb = c;
        }
    fclose(fp);
}

/* The largest peaks (MiB in use, MiB the pool held) of the statistics lines
 * written after byte offset from of the file: the lines a training step
 * wrote (one per synchronize), whichever of them came after a reset. */
static void read_max_since(const char *path, long from, double *in_use_mb, double *held_mb)
{
    *in_use_mb = *held_mb = -1.0;
    FILE *fp = fopen(path, "r");
    if (!fp)
        return;
    char line[512];
    double u, h, unused;
    if (fseek(fp, from, SEEK_SET) == 0)
        while (fgets(line, sizeof line, fp))
            if (parse_stats(line, &u, &h, &unused)) {
                *in_use_mb = u > *in_use_mb ? u : *in_use_mb;
                *held_mb = h > *held_mb ? h : *held_mb;
            }
    fclose(fp);
}

/* The size of the statistics file now (0 when it cannot be read). */
static long stats_size(const char *path)
{
    FILE *fp = fopen(path, "r");
    long size = 0;
    if (fp && fseek(fp, 0, SEEK_END) == 0)
        size = ftell(fp);
    if (fp)
        fclose(fp);
    return size < 0 ? 0 : size;
}

typedef struct options {
    int runs, warmup, steps;
    const char *config, *precision, *lpips, *latents, *save_model;
} options;

/* The plugin settings this run has from the environment, for the JSON. */
static void variant(char *out, size_t size)
{
    static const char *names[] = {"KLVAE_CUDA_FUSED", "KLVAE_CUDA_LAYOUT", "KLVAE_CUDA_CONV_SEARCH",
                                  "KLVAE_CUDA_CONV_ALGO", "KLVAE_CUDA_CONV_BUDGET"};
    out[0] = '\0';
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        const char *v = getenv(names[i]);
        if (v && *v) {
            size_t used = strlen(out);
            snprintf(out + used, size - used, "%s%s=%s", used ? " " : "", names[i], v);
        }
    }
    if (!out[0])
        snprintf(out, size, "default");
}

/* The trainer of the train case (tools/bench_train_pytorch.py's step). */
static klvae_status_t bench_trainer(klvae_model_t *m, const options *o, klvae_trainer_t **t)
{
    static const char *const kv[][2] = {
        {"learning_rate", "1e-5"}, {"disc_learning_rate", "1e-5"}, {"adam_beta1", "0.5"},
        {"adam_beta2", "0.9"},     {"adam_eps", "1e-8"},           {"pixel_loss", "l1"},
        {"kl_weight", "1e-6"},     {"disc_start", "0"},            {"disc_factor", "1"},
        {"disc_weight", "0.5"},    {"disc_loss", "hinge"},         {"disc_update", "reuse"},
        {"posterior", "sample"},   {"ema_decay", "0"},
    };
    klvae_options_t *opts = NULL;
    klvae_status_t st = klvae_options_create(&opts);
    for (size_t i = 0; st == KLVAE_OK && i < sizeof kv / sizeof kv[0]; i++)
        st = klvae_options_set(opts, kv[i][0], kv[i][1]);
    if (st == KLVAE_OK)
        st = klvae_options_set(opts, "perceptual_weight", o->lpips ? "1" : "0");
    if (st == KLVAE_OK && o->lpips)
        st = klvae_options_set(opts, "lpips_weights", o->lpips);
    if (st == KLVAE_OK)
        st = klvae_trainer_create(m, opts, t);
    klvae_options_free(opts);
    return st;
}

/* The train case: steps of batch random images. */
static int run_train_case(klvae_model_t *m, const kv_plugin *plugin, const options *o,
                          const char *stats, int size, int batch)
{
    kv_backend *be = m->be;
    const size_t count = (size_t)batch * 3 * size * size;
    float *x = malloc(count * sizeof *x);
    double *times = malloc((size_t)o->runs * sizeof *times), first = 0.0;
    klvae_trainer_t *t = NULL;
    klvae_status_t st = x && times ? bench_trainer(m, o, &t) : KLVAE_ERR_OUT_OF_MEMORY;
    uint64_t state = 777;
    for (size_t i = 0; x && i < count; i++) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        x[i] = (float)((double)(state >> 11) / 9007199254740992.0 * 2.0 - 1.0);
    }
    /* The trim before the timed steps restarts the peaks; the steps do not
     * trim (src/train/trainer.c keeps a step's memory for the next), so the
     * timed steps' peaks are the largest of the lines they wrote
     * (read_max_since). */
    double in_use_mb = -1.0, reserved_mb = -1.0;
    for (int r = -o->warmup - 2; r < o->runs && st == KLVAE_OK; r++) {
        if (r == -1)
            be->ops->trim(be, true);
        const long from = stats_size(stats);
        double t0 = harness_now();
        st = klvae_trainer_step(t, x, batch, size, size, NULL);
        if (st == KLVAE_OK)
            st = plugin->synchronize(be);
        double ms = (harness_now() - t0) * 1e3;
        if (r == -o->warmup - 2)
            first = ms;
        if (r >= 0 && st == KLVAE_OK) {
            double a, b;
            times[r] = ms;
            read_max_since(stats, from, &a, &b);
            in_use_mb = a > in_use_mb ? a : in_use_mb;
            reserved_mb = b > reserved_mb ? b : reserved_mb;
        }
    }
    if (st != KLVAE_OK) {
        fprintf(stderr, "bench_cuda: train %d batch %d %s: %s\n", size, batch, o->precision,
                klvae_last_error());
    } else {
        char settings[256];
        variant(settings, sizeof settings);
        printf("{\"tool\": \"klvae\", \"op\": \"train\", \"size\": %d, \"batch\": %d, "
               "\"precision\": \"%s\", \"config\": \"%s\", \"lpips\": %s, \"times_ms\": [",
               size, batch, o->precision, o->config, o->lpips ? "true" : "false");
        for (int r = 0; r < o->runs; r++)
            printf("%s%.3f", r ? ", " : "", times[r]);
        qsort(times, (size_t)o->runs, sizeof *times, compare);
        int n = o->runs;
        double median = n % 2 ? times[n / 2] : 0.5 * (times[n / 2 - 1] + times[n / 2]);
        printf("], \"median_ms\": %.3f, \"first_ms\": %.1f, \"images_per_s\": %.3f, "
               "\"peak_in_use_mb\": %.1f, \"peak_reserved_mb\": %.1f, \"variant\": \"%s\"}\n",
               median, first, batch / (median / 1e3), in_use_mb, reserved_mb, settings);
        fflush(stdout);
    }
    klvae_trainer_free(t);
    free(x);
    free(times);
    be->ops->trim(be, true);
    return st == KLVAE_OK ? 0 : 1;
}

/* The stream case: klvae_decode of one size^2 latent from host arrays with
 * memory_limit limit_gib GiB (0: none), o->runs times. */
static int run_stream_case(klvae_model_t *m, const options *o, const char *stats, int size,
                           int limit_gib)
{
    const int f = kv_config_factor(&m->cfg), lat = size / f;
    const size_t n_lat = (size_t)m->cfg.latent_channels * lat * lat;
    const size_t n_img = (size_t)m->cfg.out_channels * size * size;
    float *z = malloc(n_lat * sizeof *z), *img = malloc(n_img * sizeof *img);
    double *times = malloc((size_t)o->runs * sizeof *times);
    char path[4096];
    if (!z || !img || !times) {
        fprintf(stderr, "bench_cuda: stream %d: out of host memory\n", size);
        free(z), free(img), free(times);
        return 1;
    }
    FILE *fp = NULL;
    if (o->latents) {
        snprintf(path, sizeof path, "%s/z%d.raw", o->latents, size);
        fp = fopen(path, "rb");
    }
    if (fp) {
        size_t got = fread(z, sizeof *z, n_lat, fp);
        fclose(fp);
        if (got != n_lat) {
            fprintf(stderr, "bench_cuda: %s holds %zu floats, not %zu\n", path, got, n_lat);
            free(z), free(img), free(times);
            return 1;
        }
    } else {
        uint64_t state = 12345;
        for (size_t i = 0; i < n_lat; i++) {
            state = state * 6364136223846793005ull + 1442695040888963407ull;
            z[i] = 6.0f * (float)((double)(state >> 11) / 9007199254740992.0 * 2.0 - 1.0);
        }
    }
    m->infer.limit_kind = limit_gib > 0 ? KV_LIMIT_BYTES : KV_LIMIT_NONE;
    m->infer.memory_limit = (uint64_t)limit_gib << 30;
    m->be->ops->trim(m->be, true); /* the statistics restart */
    double in_use_mb = -1.0, reserved_mb = -1.0;
    klvae_status_t st = KLVAE_OK;
    for (int r = 0; r < o->runs && st == KLVAE_OK; r++) {
        double t0 = harness_now();
        st = klvae_decode(m, z, 1, lat, lat, img); /* synchronous; trims at its end */
        times[r] = (harness_now() - t0) * 1e3;
        double a, b, unused;
        read_last(stats, &a, &b, &unused); /* this call's peaks */
        in_use_mb = a > in_use_mb ? a : in_use_mb;
        reserved_mb = b > reserved_mb ? b : reserved_mb;
    }
    char plan[600] = "";
    if (st == KLVAE_OK)
        klvae_model_get(m, "last_plan", plan, sizeof plan);
    if (st == KLVAE_OK && o->latents) {
        snprintf(path, sizeof path, "%s/klvae_%d_%dg_%s.raw", o->latents, size, limit_gib,
                 o->precision);
        fp = fopen(path, "wb");
        if (!fp || fwrite(img, sizeof *img, n_img, fp) != n_img || fclose(fp) != 0) {
            fprintf(stderr, "bench_cuda: cannot write %s\n", path);
            st = KLVAE_ERR_IO;
        }
    }
    if (st != KLVAE_OK) {
        fprintf(stderr, "bench_cuda: stream %d memory_limit %dG %s: %s\n", size, limit_gib,
                o->precision, klvae_last_error());
    } else {
        struct rusage ru;
        getrusage(RUSAGE_SELF, &ru);
        printf("{\"tool\": \"klvae\", \"op\": \"stream\", \"size\": %d, \"batch\": 1, "
               "\"limit_gib\": %d, \"precision\": \"%s\", \"config\": \"%s\", \"times_ms\": [",
               size, limit_gib, o->precision, o->config);
        for (int r = 0; r < o->runs; r++)
            printf("%s%.1f", r ? ", " : "", times[r]);
        qsort(times, (size_t)o->runs, sizeof *times, compare);
        int n = o->runs;
        double median = n % 2 ? times[n / 2] : 0.5 * (times[n / 2 - 1] + times[n / 2]);
        for (char *q = plan; *q; q++)
            if (*q == '"' || *q == '\\')
                *q = '\'';
        printf("], \"median_ms\": %.1f, \"peak_in_use_mb\": %.1f, \"peak_reserved_mb\": %.1f, "
               "\"peak_rss_mb\": %.0f, \"plan\": \"%s\"}\n",
               median, in_use_mb, reserved_mb, (double)ru.ru_maxrss / 1024.0, plan);
        fflush(stdout);
    }
    m->infer.limit_kind = KV_LIMIT_NONE;
    free(z), free(img), free(times);
    return st == KLVAE_OK ? 0 : 1;
}

/* One case; returns 0, or 1 after printing why on stderr. */
static int run_quality_case(klvae_model_t *m, const options *o, int size, int batch);

static int run_case(klvae_model_t *m, const kv_plugin *plugin, const options *o,
                    const char *stats, const char *op, int size, int batch)
{
    kv_backend *be = m->be;
    const int f = kv_config_factor(&m->cfg), lat = size / f, zc = m->cfg.latent_channels;
    const int in_c = m->cfg.in_channels, out_c = m->cfg.out_channels;
    const int decode = strcmp(op, "decode") == 0;
    if (strcmp(op, "train") == 0 && size > 0 && size % f == 0 && batch >= 1)
        return run_train_case(m, plugin, o, stats, size, batch);
    if (strcmp(op, "stream") == 0 && size > 0 && size % f == 0 && batch >= 0)
        return run_stream_case(m, o, stats, size, batch);
    if (strcmp(op, "quality") == 0 && size > 0 && size % f == 0 && batch >= 1)
        return run_quality_case(m, o, size, batch);
    if ((!decode && strcmp(op, "encode") != 0) || size <= 0 || size % f || batch < 1) {
        fprintf(stderr, "bench_cuda: bad case %s:%d:%d\n", op, size, batch);
        return 1;
    }
    size_t n_img = (size_t)batch * in_c * size * size, n_lat = (size_t)batch * zc * lat * lat;
    size_t n_in = decode ? n_lat : n_img;
    float *host = malloc(n_in * sizeof *host);
    double *times = malloc((size_t)o->runs * sizeof *times), first = 0.0;
    if (!host || !times) {
        fprintf(stderr, "bench_cuda: out of host memory\n");
        free(host);
        free(times);
        return 1;
    }
    uint64_t state = 12345;
    for (size_t i = 0; i < n_in; i++) {
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        host[i] = (float)((double)(state >> 11) / 9007199254740992.0 * 2.0 - 1.0);
        if (decode)
            host[i] *= 6.0f; /* latents of the scale an SD encoder gives */
    }
    kv_tensor in = {0}, out = {0}, out2 = {0};
    klvae_status_t st;
    if (decode) {
        st = kv_tensor_alloc(be, batch, zc, lat, lat, &in);
        if (st == KLVAE_OK)
            st = kv_tensor_alloc(be, batch, out_c, size, size, &out);
    } else {
        st = kv_tensor_alloc(be, batch, in_c, size, size, &in);
        if (st == KLVAE_OK)
            st = kv_tensor_alloc(be, batch, zc, lat, lat, &out);
        if (st == KLVAE_OK)
            st = kv_tensor_alloc(be, batch, zc, lat, lat, &out2);
    }
    if (st == KLVAE_OK)
        st = be->ops->upload(be, &in, host);
    free(host);
    double unused, held0 = -1.0, held1 = -1.0;
    for (int r = -o->warmup - 2; r < o->runs && st == KLVAE_OK; r++) {
        if (r == -1) /* the statistics of the last calls only */
            be->ops->trim(be, true);
        if (r == 0) /* after the call that refilled the pool */
            read_last(stats, &unused, &unused, &held0);
        double t0 = harness_now();
        st = decode ? kv_vae_decode(m, &in, NULL, &out) : kv_vae_encode(m, &in, &out, &out2);
        if (st == KLVAE_OK)
            st = plugin->synchronize(be);
        double ms = (harness_now() - t0) * 1e3;
        if (r == -o->warmup - 2)
            first = ms;
        if (r >= 0)
            times[r] = ms;
    }
    if (st != KLVAE_OK) {
        fprintf(stderr, "bench_cuda: %s %d batch %d %s: %s\n", op, size, batch, o->precision,
                klvae_last_error());
    } else {
        read_last(stats, &unused, &unused, &held1);
        be->ops->trim(be, true);
        double in_use_mb, reserved_mb;
        read_last(stats, &in_use_mb, &reserved_mb, &unused);
        double growth = held0 >= 0.0 && held1 >= 0.0 ? held1 - held0 : -1.0;
        printf("{\"tool\": \"klvae\", \"op\": \"%s\", \"size\": %d, \"batch\": %d, "
               "\"precision\": \"%s\", \"config\": \"%s\", \"times_ms\": [",
               op, size, batch, o->precision, o->config);
        for (int r = 0; r < o->runs; r++)
            printf("%s%.3f", r ? ", " : "", times[r]);
        qsort(times, (size_t)o->runs, sizeof *times, compare);
        int n = o->runs;
        double median = n % 2 ? times[n / 2] : 0.5 * (times[n / 2 - 1] + times[n / 2]);
        char settings[256];
        variant(settings, sizeof settings);
        printf("], \"median_ms\": %.3f, \"first_ms\": %.1f, \"peak_in_use_mb\": %.1f, "
               "\"peak_reserved_mb\": %.1f, \"pool_growth_mb\": %.1f, \"variant\": \"%s\"}\n",
               median, first, in_use_mb, reserved_mb, growth, settings);
        fflush(stdout);
    }
    free(times);
    kv_tensor_release(be, &in);
    kv_tensor_release(be, &out);
    kv_tensor_release(be, &out2);
    be->ops->trim(be, true);
    return st == KLVAE_OK ? 0 : 1;
}

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

#define QUALITY_HELD_OUT 16

/* Held-out PSNR of the model exported to dir, reconstructed on the CPU
 * backend in float32 from the posterior mean. */
static klvae_status_t held_out_psnr(const char *dir, int size, double *psnr)
{
    klvae_options_t *o = NULL;
    klvae_model_t *cm = NULL;
    klvae_status_t st = klvae_options_create(&o);
    if (st == KLVAE_OK)
        st = klvae_options_set(o, "backend", "cpu");
    if (st == KLVAE_OK)
        st = klvae_model_load(dir, o, &cm);
    klvae_options_free(o);
    if (st != KLVAE_OK)
        return st;
    const int n = QUALITY_HELD_OUT, f = klvae_model_downsampling_factor(cm), lat = size / f;
    const size_t per_image = (size_t)3 * size * size;
    const size_t n_lat = (size_t)n * klvae_model_latent_channels(cm) * lat * lat;
    float *x = malloc(n * per_image * sizeof *x), *rec = malloc(n * per_image * sizeof *rec);
    float *mean = malloc(n_lat * sizeof *mean), *logvar = malloc(n_lat * sizeof *logvar);
    if (!x || !rec || !mean || !logvar)
        st = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of host memory for the held-out images");
    for (int i = 0; st == KLVAE_OK && i < n; i++) /* seed 2: never trained on */
        kv_procedural_image(2, (uint64_t)i, size, x + i * per_image);
    if (st == KLVAE_OK)
        st = klvae_encode(cm, x, n, size, size, mean, logvar);
    if (st == KLVAE_OK)
        st = klvae_decode(cm, mean, n, lat, lat, rec);
    if (st == KLVAE_OK) {
        *psnr = 0.0;
        for (int i = 0; i < n; i++)
            *psnr += image_psnr(x + i * per_image, rec + i * per_image, size, size) / n;
    }
    free(x), free(rec), free(mean), free(logvar);
    klvae_model_free(cm);
    return st;
}

/* The quality case (quality:SIZE:BATCH): o->steps training steps of the
 * model from its seeded weights on the built-in procedural images (seed 1;
 * the demo's losses: pixel L1 + KL, no LPIPS, no discriminator; Adam lr
 * 2e-4), then the held-out PSNR of the exported weights (held_out_psnr). Run
 * in fp32 and in bf16, it measures what mixed precision costs a training
 * run: the same start, the same batches, the same number of steps. */
static int run_quality_case(klvae_model_t *m, const options *o, int size, int batch)
{
    static const char *const kv[][2] = {
        {"learning_rate", "2e-4"}, {"adam_beta1", "0.5"}, {"adam_beta2", "0.9"},
        {"pixel_loss", "l1"},      {"kl_weight", "1e-6"}, {"perceptual_weight", "0"},
        {"disc_start", "1000000000"}, {"posterior", "sample"}, {"ema_decay", "0"},
    };
    const size_t per_image = (size_t)3 * size * size;
    float *x = malloc((size_t)batch * per_image * sizeof *x);
    klvae_options_t *opts = NULL;
    klvae_trainer_t *t = NULL;
    klvae_status_t st = x ? klvae_options_create(&opts) : KLVAE_ERR_OUT_OF_MEMORY;
    for (size_t i = 0; st == KLVAE_OK && i < sizeof kv / sizeof kv[0]; i++)
        st = klvae_options_set(opts, kv[i][0], kv[i][1]);
    if (st == KLVAE_OK)
        st = klvae_trainer_create(m, opts, &t);
    klvae_options_free(opts);
    double t0 = harness_now(), first_rec = NAN, last_rec = NAN, psnr = NAN;
    for (int k = 0; k < o->steps && st == KLVAE_OK; k++) {
        for (int i = 0; i < batch; i++)
            kv_procedural_image(1, (uint64_t)k * batch + i, size, x + i * per_image);
        klvae_step_stats_t stats = KLVAE_STEP_STATS_INIT;
        st = klvae_trainer_step(t, x, batch, size, size, &stats);
        if (k == 0)
            first_rec = stats.rec_loss;
        last_rec = stats.rec_loss;
    }
    const double train_s = harness_now() - t0;
    char dir[] = "/tmp/klvae-quality-XXXXXX", path[64];
    int made = st == KLVAE_OK && mkdtemp(dir) != NULL;
    if (st == KLVAE_OK && !made)
        st = kv_error(KLVAE_ERR_IO, "cannot make a temporary folder");
    snprintf(path, sizeof path, "%s/model", dir);
    if (st == KLVAE_OK)
        st = klvae_trainer_export(t, path, 0);
    if (st == KLVAE_OK)
        st = held_out_psnr(path, size, &psnr);
    if (made)
        nftw(dir, remove_entry, 8, FTW_DEPTH | FTW_PHYS);
    if (st != KLVAE_OK) {
        fprintf(stderr, "bench_cuda: quality %d batch %d %s: %s\n", size, batch, o->precision,
                klvae_last_error());
    } else {
        printf("{\"tool\": \"klvae\", \"op\": \"quality\", \"size\": %d, \"batch\": %d, "
               "\"precision\": \"%s\", \"config\": \"%s\", \"steps\": %d, \"train_s\": %.2f, "
               "\"rec_loss_first\": %.5f, \"rec_loss_last\": %.5f, \"held_out\": %d, "
               "\"psnr_db\": %.3f}\n",
               size, batch, o->precision, o->config, o->steps, train_s, first_rec, last_rec,
               QUALITY_HELD_OUT, psnr);
        fflush(stdout);
    }
    klvae_trainer_free(t);
    free(x);
    return st == KLVAE_OK ? 0 : 1;
}

#ifdef KV_BENCH_NO_MAIN
int bench_cuda_main(int argc, char **argv)
#else
int main(int argc, char **argv)
#endif
{
    if (argc < 2)
        usage();
    const char *cases = argv[1], *plugin_path = NULL;
    options o = {.runs = 5, .warmup = 1, .steps = 400, .config = "sd", .precision = "bf16"};
    int device = 0;
    for (int i = 2; i < argc; i += 2) {
        if (i + 1 >= argc)
            usage();
        if (strcmp(argv[i], "--precision") == 0)
            o.precision = argv[i + 1];
        else if (strcmp(argv[i], "--runs") == 0)
            o.runs = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--warmup") == 0)
            o.warmup = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--config") == 0)
            o.config = argv[i + 1];
        else if (strcmp(argv[i], "--plugin") == 0)
            plugin_path = argv[i + 1];
        else if (strcmp(argv[i], "--device") == 0)
            device = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--lpips") == 0)
            o.lpips = argv[i + 1];
        else if (strcmp(argv[i], "--latents") == 0)
            o.latents = argv[i + 1];
        else if (strcmp(argv[i], "--save-model") == 0)
            o.save_model = argv[i + 1];
        else if (strcmp(argv[i], "--steps") == 0)
            o.steps = atoi(argv[i + 1]);
        else
            usage();
    }
    int precision = harness_precision_parse(o.precision);
    if (precision < 0 || o.runs < 1 || o.warmup < 0 || o.steps < 1)
        usage();

    char stats[64];
    snprintf(stats, sizeof stats, "/tmp/klvae-memstats-XXXXXX");
    int fd = mkstemp(stats);
    if (fd < 0) {
        perror("bench_cuda: mkstemp");
        return 1;
    }
    close(fd);
    setenv("KLVAE_CUDA_MEMSTATS", stats, 1);

    char why[1024];
    const kv_plugin *plugin = harness_open(plugin_path, why, sizeof why);
    if (!plugin) {
        fprintf(stderr, "bench_cuda: %s\n", why);
        unlink(stats);
        return 3;
    }
    kv_backend *be = NULL;
    klvae_model_t *m = NULL;
    klvae_status_t st = harness_backend(plugin, device, (kv_precision)precision, &be);
    if (st == KLVAE_OK)
        st = harness_model(be, o.config, 1, o.precision, &m);
    if (st != KLVAE_OK) {
        fprintf(stderr, "bench_cuda: creating the model: %s\n", klvae_last_error());
        unlink(stats);
        return 1;
    }
    if (o.save_model && klvae_model_save(m, o.save_model) != KLVAE_OK) {
        fprintf(stderr, "bench_cuda: saving the model: %s\n", klvae_last_error());
        kv_model_destroy(m);
        unlink(stats);
        return 1;
    }
    int failures = 0;
    char *list = strdup(cases), *save = NULL;
    for (char *c = list ? strtok_r(list, ",", &save) : NULL; c; c = strtok_r(NULL, ",", &save)) {
        char op[16];
        int size = 0, batch = 0;
        if (sscanf(c, "%15[a-z]:%d:%d", op, &size, &batch) != 3) {
            fprintf(stderr, "bench_cuda: bad case '%s' (expected OP:SIZE:BATCH)\n", c);
            failures++;
            continue;
        }
        failures += run_case(m, plugin, &o, stats, op, size, batch);
    }
    free(list);
    kv_model_destroy(m);
    unlink(stats);
    return failures ? 1 : 0;
}
