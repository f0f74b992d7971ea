/* bench_klvae.c — times encode and decode of a model at one size, or one
 * training step, for tools/bench.py. Prints one line of JSON:
 *   {"op": ..., "size": ..., "batch": ..., "threads": ..., "times": [...],
 *    "median": ..., "peak_rss_mb": ...}
 * (op "train" adds "config", "gan" and "lpips"). Each case runs in its own
 * process so that the peak resident size belongs to that case alone.
 *
 *   bench_klvae encode|decode|both SIZE [--batch N] [--threads T] [--runs R]
 *               [--model PATH] [--config NAME] [--precision fp32|bf16]
 *   bench_klvae train SIZE [--batch N] [--threads T] [--runs R] [--config NAME]
 *               [--model PATH] [--lpips FILE] [--gan 0|1] [--verbose 1]
 *               [--precision fp32|bf16]
 *
 * train: one klvae_trainer_step per run (1 warm-up + R timed) on a fixed
 * pseudo-random batch (N, 3, SIZE, SIZE) in [-1, 1], learning rate 1e-5,
 * posterior sample, the other trainer options at their defaults
 * (disc_update=reuse). --lpips FILE: the LPIPS-VGG16 weights (perceptual
 * weight 1); without it no perceptual term. --gan 1: disc_start 0, so the
 * GAN (discriminator forward/backward, adaptive weight, discriminator Adam)
 * is on from the first step; --gan 0 (default): disc_start keeps its default
 * and the GAN is off. --verbose 1 prints each step's losses to stderr.
 * --precision: the model's option (default fp32); the JSON says what the
 * model computes in ("precision") and, on a CPU without bf16 instructions,
 * why not ("precision_reason").
 */
#include <klvae.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int compare(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void check(klvae_status_t st)
{
    if (st != KLVAE_OK) {
        fprintf(stderr, "bench_klvae: %s\n", klvae_last_error());
        exit(1);
    }
}

/* The median of times[0..n) (the mean of the middle two for even n, as
 * Python's statistics.median, which tools/bench_pytorch.py uses). */
static double median(const double *times, int n)
{
    double *s = malloc((size_t)n * sizeof *s);
    if (!s)
        exit(1);
    memcpy(s, times, (size_t)n * sizeof *s);
    qsort(s, (size_t)n, sizeof *s, compare);
    double m = n % 2 ? s[n / 2] : 0.5 * (s[n / 2 - 1] + s[n / 2]);
    free(s);
    return m;
}

static void usage(void)
{
    fprintf(stderr, "usage: bench_klvae encode|decode|both SIZE [--batch N] [--threads T] "
                    "[--runs R] [--model PATH] [--config NAME] [--precision fp32|bf16]\n"
                    "       bench_klvae train SIZE [--batch N] [--threads T] [--runs R] "
                    "[--model PATH] [--config NAME] [--lpips FILE] [--gan 0|1] [--verbose 1]\n"
                    "                   [--precision fp32|bf16]\n");
    exit(2);
}

static void verbose_stats(const klvae_step_stats_t *s)
{
    fprintf(stderr,
            "bench_klvae: step %lld total %.6g rec %.6g perceptual %.6g nll %.6g kl %.6g "
            "g %.6g d_weight %.6g disc_factor %.6g d_loss %.6g logits_real %.6g "
            "logits_fake %.6g (%.3f s)\n",
            (long long)s->step, s->total_loss, s->rec_loss, s->perceptual_loss, s->nll_loss,
            s->kl_loss, s->g_loss, s->d_weight, s->disc_factor, s->d_loss, s->logits_real,
            s->logits_fake, s->seconds);
    const double v[] = {s->total_loss, s->rec_loss, s->nll_loss, s->kl_loss, s->g_loss,
                        s->d_weight, s->d_loss};
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++)
        if (!isfinite(v[i])) {
            fprintf(stderr, "bench_klvae: a loss is not finite\n");
            exit(1);
        }
}

int main(int argc, char **argv)
{
    if (argc < 3)
        usage();
    const char *op = argv[1];
    const int train = !strcmp(op, "train");
    if (!train && strcmp(op, "encode") && strcmp(op, "decode") && strcmp(op, "both"))
        usage();
    int size = atoi(argv[2]), batch = 1, runs = 3, gan = 0, verbose = 0;
    const char *threads = "0", *model_path = NULL, *config = "sd", *lpips = NULL;
    const char *precision = "fp32";
    for (int i = 3; i < argc; i += 2) {
        if (i + 1 >= argc)
            usage();
        if (!strcmp(argv[i], "--batch")) batch = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--threads")) threads = argv[i + 1];
        else if (!strcmp(argv[i], "--runs")) runs = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--model")) model_path = argv[i + 1];
        else if (!strcmp(argv[i], "--config")) config = argv[i + 1];
        else if (!strcmp(argv[i], "--lpips")) lpips = argv[i + 1];
        else if (!strcmp(argv[i], "--gan")) gan = atoi(argv[i + 1]) != 0;
        else if (!strcmp(argv[i], "--verbose")) verbose = atoi(argv[i + 1]) != 0;
        else if (!strcmp(argv[i], "--precision")) precision = argv[i + 1];
        else usage();
    }
    if (size <= 0 || batch <= 0 || runs <= 0)
        usage();
    klvae_options_t *o = NULL;
    klvae_model_t *m = NULL;
    check(klvae_options_create(&o));
    check(klvae_options_set(o, "threads", threads));
    check(klvae_options_set(o, "precision", precision));
    if (model_path) {
        check(klvae_model_load(model_path, o, &m));
    } else {
        check(klvae_options_set(o, "config", config));
        check(klvae_model_create(o, &m)); /* speed does not depend on the values */
    }
    const int f = klvae_model_downsampling_factor(m), z = klvae_model_latent_channels(m);
    const int lat = size / f;
    size_t n_img = (size_t)batch * 3 * size * size, n_lat = (size_t)batch * z * lat * lat;
    float *img = malloc(n_img * sizeof(float)), *mean = malloc(n_lat * sizeof(float)),
          *logvar = malloc(n_lat * sizeof(float)), *out = malloc(n_img * sizeof(float));
    double *times = calloc((size_t)runs, sizeof *times);
    if (!img || !mean || !logvar || !out || !times) {
        fprintf(stderr, "bench_klvae: out of memory\n");
        return 1;
    }
    for (size_t i = 0; i < n_img; i++)
        img[i] = (float)((i * 2654435761u) % 2001) / 1000.0f - 1.0f;
    for (size_t i = 0; i < n_lat; i++)
        mean[i] = (float)((i * 40503u) % 2001) / 1000.0f - 1.0f;

    klvae_trainer_t *t = NULL;
    char perceptual[32] = "0";
    if (train) {
        klvae_options_t *to = NULL;
        check(klvae_options_create(&to));
        check(klvae_options_set(to, "learning_rate", "1e-5"));
        check(klvae_options_set(to, "posterior", "sample"));
        if (lpips)
            check(klvae_options_set(to, "lpips_weights", lpips));
        else
            check(klvae_options_set(to, "perceptual_weight", "0"));
        if (gan)
            check(klvae_options_set(to, "disc_start", "0"));
        check(klvae_trainer_create(m, to, &t));
        klvae_options_free(to);
        check(klvae_trainer_get(t, "perceptual_weight", perceptual, sizeof perceptual));
    }
    for (int r = -1; r < runs; r++) { /* run -1 warms up */
        klvae_step_stats_t stats = KLVAE_STEP_STATS_INIT;
        double t0 = now();
        if (train)
            check(klvae_trainer_step(t, img, batch, size, size, &stats));
        if (!strcmp(op, "encode") || !strcmp(op, "both"))
            check(klvae_encode(m, img, batch, size, size, mean, logvar));
        if (!strcmp(op, "decode") || !strcmp(op, "both"))
            check(klvae_decode(m, mean, batch, lat, lat, out));
        if (r >= 0)
            times[r] = now() - t0;
        if (train && verbose)
            verbose_stats(&stats);
    }
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    char used_threads[16], used_precision[16], reason[256];
    klvae_model_get(m, "threads", used_threads, sizeof used_threads);
    klvae_model_get(m, "precision", used_precision, sizeof used_precision);
    klvae_model_get(m, "precision_reason", reason, sizeof reason);
    for (char *c = reason; *c; c++) /* the reason is plain text: keep the JSON valid */
        if (*c == '"' || *c == '\\')
            *c = '\'';
    printf("{\"impl\": \"libklvae\", \"op\": \"%s\", \"size\": %d, \"batch\": %d, \"threads\": %s, ",
           op, size, batch, used_threads);
    printf("\"precision\": \"%s\", \"precision_reason\": \"%s\", ", used_precision, reason);
    if (train)
        printf("\"config\": \"%s\", \"gan\": %d, \"lpips\": %s, ", model_path ? "model" : config,
               gan, strtod(perceptual, NULL) > 0.0 ? "true" : "false");
    printf("\"times\": [");
    for (int r = 0; r < runs; r++)
        printf(r ? ", %.4f" : "%.4f", times[r]);
    printf("], \"median\": %.4f, \"peak_rss_mb\": %.1f}\n", median(times, runs),
           (double)ru.ru_maxrss / 1024.0);
    klvae_trainer_free(t);
    free(img), free(mean), free(logvar), free(out), free(times);
    klvae_model_free(m);
    klvae_options_free(o);
    return 0;
}
