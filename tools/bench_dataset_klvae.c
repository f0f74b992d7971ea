/* bench_dataset_klvae.c — times klvae_encode_dataset for tools/bench.py, as
 * tools/bench_dataset_pytorch.py times its peer. Prints one JSON line:
 *   {"impl": "libklvae", "op": "dataset", "size": ..., "batch": ..., "threads": ...,
 *    "images": ..., "times": [...], "median": ..., "images_per_second": ...,
 *    "peak_rss_mb": ...}
 *
 *   bench_dataset_klvae MODEL_DIR DATA_DIR SIZE [--batch N] [--threads T] [--runs R]
 *                       [--shard-size N] [--backend B] [--precision P] [--dtype D]
 *   bench_dataset_klvae --create-model MODEL_DIR [--config NAME]
 *
 * Each run encodes DATA_DIR (--size SIZE, centre crop, posterior in float32,
 * the default shard size; --dtype for the stored values) into a fresh temporary
 * folder, removed afterwards;
 * the time is the call's, model loading and one warm-up encode excluded (as on
 * the PyTorch side). --create-model writes a seeded random model of the named
 * config (default sd) as a diffusers folder that both sides load. */
#define _XOPEN_SOURCE 700
#include <ftw.h>
#include <klvae.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

static void check(klvae_status_t st)
{
    if (st != KLVAE_OK) {
        fprintf(stderr, "bench_dataset_klvae: %s\n", klvae_last_error());
        exit(1);
    }
}

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

static int compare(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int create_model(const char *dir, const char *config)
{
    klvae_options_t *o = NULL;
    klvae_model_t *m = NULL;
    check(klvae_options_create(&o));
    check(klvae_options_set(o, "config", config));
    check(klvae_options_set(o, "backend", "cpu"));
    check(klvae_model_create(o, &m));
    check(klvae_model_save(m, dir));
    klvae_model_free(m);
    klvae_options_free(o);
    return 0;
}

static void usage(void)
{
    fprintf(stderr, "usage: bench_dataset_klvae MODEL_DIR DATA_DIR SIZE [--batch N] [--threads T] "
                    "[--runs R] [--shard-size N] [--backend B] [--precision P] [--dtype D]\n"
                    "       bench_dataset_klvae --create-model MODEL_DIR [--config NAME]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    if (argc >= 3 && !strcmp(argv[1], "--create-model"))
        return create_model(argv[2], argc >= 5 && !strcmp(argv[3], "--config") ? argv[4] : "sd");
    if (argc < 4)
        usage();
    const char *model_dir = argv[1], *data = argv[2], *size = argv[3];
    const char *batch = "4", *threads = "0", *shard_size = "512", *backend = "cpu";
    const char *precision = "fp32", *dtype = "fp32";
    int runs = 3;
    for (int i = 4; i < argc; i += 2) {
        if (i + 1 >= argc)
            usage();
        if (!strcmp(argv[i], "--batch")) batch = argv[i + 1];
        else if (!strcmp(argv[i], "--threads")) threads = argv[i + 1];
        else if (!strcmp(argv[i], "--runs")) runs = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--shard-size")) shard_size = argv[i + 1];
        else if (!strcmp(argv[i], "--backend")) backend = argv[i + 1];
        else if (!strcmp(argv[i], "--precision")) precision = argv[i + 1];
        else if (!strcmp(argv[i], "--dtype")) dtype = argv[i + 1];
        else usage();
    }
    if (runs <= 0)
        usage();
    klvae_options_t *o = NULL;
    klvae_model_t *m = NULL;
    check(klvae_options_create(&o));
    check(klvae_options_set(o, "threads", threads));
    check(klvae_options_set(o, "size", size));
    check(klvae_options_set(o, "encode_batch", batch));
    check(klvae_options_set(o, "shard_size", shard_size));
    check(klvae_options_set(o, "backend", backend));
    check(klvae_options_set(o, "precision", precision));
    check(klvae_options_set(o, "dtype", dtype));
    check(klvae_model_load(model_dir, o, &m));
    const int s = atoi(size), f = klvae_model_downsampling_factor(m);
    const size_t n_img = (size_t)3 * s * s, n_lat = (size_t)4 * (s / f) * (s / f);
    float *img = calloc(n_img, sizeof *img), *mean = malloc(n_lat * 4 * sizeof *mean);
    double *times = calloc((size_t)runs, sizeof *times);
    if (!img || !mean || !times)
        return 1;
    check(klvae_encode(m, img, 1, s, s, mean, NULL)); /* warm-up */
    long long images = 0;
    for (int r = 0; r < runs; r++) {
        char out[] = "/tmp/klvae-bench-dataset-XXXXXX";
        if (!mkdtemp(out))
            return 1;
        klvae_dataset_progress_t summary = KLVAE_DATASET_PROGRESS_INIT;
        check(klvae_encode_dataset(m, data, out, o, NULL, NULL, &summary));
        times[r] = summary.seconds;
        images = summary.images_done;
        nftw(out, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    }
    double sorted[64];
    int n = runs < 64 ? runs : 64;
    memcpy(sorted, times, (size_t)n * sizeof *sorted);
    qsort(sorted, (size_t)n, sizeof *sorted, compare);
    double med = n % 2 ? sorted[n / 2] : 0.5 * (sorted[n / 2 - 1] + sorted[n / 2]);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    char used_threads[16];
    klvae_model_get(m, "threads", used_threads, sizeof used_threads);
    printf("{\"impl\": \"libklvae\", \"op\": \"dataset\", \"size\": %d, \"batch\": %s, "
           "\"threads\": %s, \"backend\": \"%s\", \"precision\": \"%s\", \"images\": %lld, "
           "\"times\": [", s, batch, used_threads, klvae_model_backend(m), precision, images);
    for (int r = 0; r < runs; r++)
        printf(r ? ", %.3f" : "%.3f", times[r]);
    printf("], \"median\": %.3f, \"images_per_second\": %.4f, \"peak_rss_mb\": %.1f}\n", med,
           (double)images / med, (double)ru.ru_maxrss / 1024.0);
    free(img), free(mean), free(times);
    klvae_model_free(m);
    klvae_options_free(o);
    return 0;
}
