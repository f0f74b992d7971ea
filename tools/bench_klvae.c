/* bench_klvae.c — times encode and decode of a model at one size, for
 * tools/bench.py. Prints one line of JSON:
 *   {"op": ..., "size": ..., "batch": ..., "threads": ..., "times": [...],
 *    "median": ..., "peak_rss_mb": ...}
 * Each case runs in its own process so that the peak resident size belongs
 * to that case alone.
 *
 *   bench_klvae encode|decode|both SIZE [--batch N] [--threads T] [--runs R]
 *               [--model PATH] [--config sd]
 */
#include <klvae.h>
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

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: bench_klvae encode|decode|both SIZE [--batch N] [--threads T] "
                        "[--runs R] [--model PATH] [--config NAME]\n");
        return 2;
    }
    const char *op = argv[1];
    int size = atoi(argv[2]), batch = 1, runs = 3;
    const char *threads = "0", *model_path = NULL, *config = "sd";
    for (int i = 3; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--batch")) batch = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--threads")) threads = argv[i + 1];
        else if (!strcmp(argv[i], "--runs")) runs = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--model")) model_path = argv[i + 1];
        else if (!strcmp(argv[i], "--config")) config = argv[i + 1];
    }
    klvae_options_t *o = NULL;
    klvae_model_t *m = NULL;
    check(klvae_options_create(&o));
    check(klvae_options_set(o, "threads", threads));
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
    for (size_t i = 0; i < n_img; i++)
        img[i] = (float)((i * 2654435761u) % 2001) / 1000.0f - 1.0f;
    for (size_t i = 0; i < n_lat; i++)
        mean[i] = (float)((i * 40503u) % 2001) / 1000.0f - 1.0f;
    double *times = calloc((size_t)runs + 1, sizeof *times);
    for (int r = -1; r < runs; r++) { /* run -1 warms up */
        double t0 = now();
        if (!strcmp(op, "encode") || !strcmp(op, "both"))
            check(klvae_encode(m, img, batch, size, size, mean, logvar));
        if (!strcmp(op, "decode") || !strcmp(op, "both"))
            check(klvae_decode(m, mean, batch, lat, lat, out));
        if (r >= 0)
            times[r] = now() - t0;
    }
    double sorted[64];
    int n = runs < 64 ? runs : 64;
    memcpy(sorted, times, (size_t)n * sizeof(double));
    qsort(sorted, (size_t)n, sizeof(double), compare);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    char used_threads[16];
    klvae_model_get(m, "threads", used_threads, sizeof used_threads);
    printf("{\"impl\": \"libklvae\", \"op\": \"%s\", \"size\": %d, \"batch\": %d, \"threads\": %s, "
           "\"times\": [", op, size, batch, used_threads);
    for (int r = 0; r < runs; r++)
        printf(r ? ", %.4f" : "%.4f", times[r]);
    printf("], \"median\": %.4f, \"peak_rss_mb\": %.1f}\n", sorted[n / 2],
           (double)ru.ru_maxrss / 1024.0);
    free(img), free(mean), free(logvar), free(out), free(times);
    klvae_model_free(m);
    klvae_options_free(o);
    return 0;
}
