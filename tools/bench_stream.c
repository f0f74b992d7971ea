/* bench_stream.c — times one decode or encode of a large image with the
 * inference options (memory_limit, tiling, ...), for tools/bench_stream.py.
 * Prints one line of JSON:
 *   {"op": ..., "size": ..., "options": ..., "times": [...], "median": ...,
 *    "peak_rss_mb": ..., "plan": ...}
 * Each case runs in its own process, so that the peak resident size is that
 * case's alone.
 *
 *   bench_stream decode|encode SIZE [--runs R] [--model DIR] [--input FILE]
 *                [--output FILE] [--OPTION VALUE ...]
 *   bench_stream save-model DIR     writes the random SD model (seed 0)
 *
 * The model is the sd config with random weights (seed 0), or DIR. The
 * input is FILE (raw float32: the latent (1, 4, SIZE/8, SIZE/8) for
 * decode, the image (1, 3, SIZE, SIZE) for encode), or pseudo-random
 * values. --output writes the last run's result (raw float32: the image,
 * or the mean). Every other --key value is a library option. */
#include <klvae.h>
#include <stdbool.h>
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

static void check(klvae_status_t st, const char *what)
{
    if (st != KLVAE_OK) {
        fprintf(stderr, "bench_stream: %s: %s\n", what, klvae_last_error());
        exit(1);
    }
}

static int compare(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static float *read_raw(const char *path, size_t count)
{
    float *data = malloc(count * sizeof *data);
    FILE *fp = fopen(path, "rb");
    if (!data || !fp || fread(data, sizeof *data, count, fp) != count) {
        fprintf(stderr, "bench_stream: cannot read %zu floats from %s\n", count, path);
        exit(1);
    }
    fclose(fp);
    return data;
}

static void write_raw(const char *path, const float *data, size_t count)
{
    FILE *fp = fopen(path, "wb");
    if (!fp || fwrite(data, sizeof *data, count, fp) != count || fclose(fp) != 0) {
        fprintf(stderr, "bench_stream: cannot write %s\n", path);
        exit(1);
    }
}

int main(int argc, char **argv)
{
    if (argc == 3 && strcmp(argv[1], "save-model") == 0) {
        klvae_model_t *m = NULL;
        check(klvae_model_create(NULL, &m), "create");
        check(klvae_model_save(m, argv[2]), "save");
        klvae_model_free(m);
        return 0;
    }
    if (argc < 3 || (strcmp(argv[1], "decode") != 0 && strcmp(argv[1], "encode") != 0)) {
        fprintf(stderr, "usage: bench_stream decode|encode SIZE [--runs R] [--model DIR] "
                        "[--input FILE] [--output FILE] [--OPTION VALUE ...]\n"
                        "       bench_stream save-model DIR\n");
        return 2;
    }
    const bool decode = strcmp(argv[1], "decode") == 0;
    const int size = atoi(argv[2]);
    int runs = 1;
    const char *model_dir = NULL, *input = NULL, *output = NULL;
    char options[1024] = "";
    klvae_options_t *o = NULL;
    check(klvae_options_create(&o), "options");
    for (int i = 3; i + 1 < argc; i += 2) {
        const char *key = argv[i] + 2, *value = argv[i + 1];
        if (strcmp(key, "runs") == 0)
            runs = atoi(value);
        else if (strcmp(key, "model") == 0)
            model_dir = value;
        else if (strcmp(key, "input") == 0)
            input = value;
        else if (strcmp(key, "output") == 0)
            output = value;
        else {
            check(klvae_options_set(o, key, value), key);
            size_t at = strlen(options);
            snprintf(options + at, sizeof options - at, "%s%s=%s", at ? " " : "", key, value);
        }
    }
    klvae_model_t *m = NULL;
    check(model_dir ? klvae_model_load(model_dir, o, &m) : klvae_model_create(o, &m), "model");
    const int f = klvae_model_downsampling_factor(m), lat = size / f;
    const size_t n_image = (size_t)3 * size * size, n_latent = (size_t)4 * lat * lat;
    const size_t n_in = decode ? n_latent : n_image, n_out = decode ? n_image : n_latent;
    float *in = input ? read_raw(input, n_in) : malloc(n_in * sizeof(float));
    float *out = malloc(n_out * sizeof(float)), *logvar = decode ? NULL : malloc(n_out * 4);
    if (!in || !out || (!decode && !logvar))
        return 1;
    if (!input) {
        uint64_t s = 88172645463325252ull;
        for (size_t i = 0; i < n_in; i++) {
            s ^= s << 13, s ^= s >> 7, s ^= s << 17;
            in[i] = (float)((double)(s >> 11) / 9007199254740992.0 * 2.0 - 1.0);
        }
    }
    double *times = calloc((size_t)runs, sizeof *times);
    for (int r = 0; r < runs; r++) {
        double t0 = now();
        check(decode ? klvae_decode(m, in, 1, lat, lat, out)
                     : klvae_encode(m, in, 1, size, size, out, logvar),
              argv[1]);
        times[r] = now() - t0;
    }
    char plan[600] = "";
    klvae_model_get(m, "last_plan", plan, sizeof plan);
    if (output)
        write_raw(output, out, n_out);
    double *sorted = malloc((size_t)runs * sizeof *sorted);
    memcpy(sorted, times, (size_t)runs * sizeof *sorted);
    qsort(sorted, (size_t)runs, sizeof *sorted, compare);
    const double median = runs % 2 ? sorted[runs / 2] : 0.5 * (sorted[runs / 2 - 1] + sorted[runs / 2]);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    printf("{\"op\": \"%s\", \"size\": %d, \"options\": \"%s\", \"times\": [", argv[1], size, options);
    for (int r = 0; r < runs; r++)
        printf("%s%.3f", r ? ", " : "", times[r]);
    printf("], \"median\": %.3f, \"peak_rss_mb\": %.0f, \"plan\": \"%s\"}\n", median,
           (double)ru.ru_maxrss / 1024.0, plan);
    free(times), free(sorted), free(in), free(out), free(logvar);
    klvae_model_free(m);
    klvae_options_free(o);
    return 0;
}
