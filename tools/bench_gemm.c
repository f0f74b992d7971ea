/* bench_gemm.c — the machine's matrix-product rates, for tools/bench.py:
 * float32 through OpenBLAS's sgemm (its own threads), and bf16 products with
 * float32 accumulation through libklvae's kernel (src/backend/cpu/bf16_gemm.h,
 * one thread per column range, operands packed beforehand, as the Winograd
 * convolutions use it). Square products of SIZE (default 2048), the best of
 * --runs. Prints one line of JSON:
 *   {"threads": T, "size": S, "fp32_gflops": ..., "bf16_gflops": ... or null,
 *    "bf16_reason": "..."}
 *
 *   bench_gemm [--threads T] [--size S] [--runs R]
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cblas.h>

#include "backend/cpu/bf16_gemm.h"

extern void openblas_set_num_threads(int threads) __attribute__((weak));

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct slice {
    int size, j0, j1;
    const uint32_t *a, *b;
    float *c;
} slice;

/* Columns [j0, j1) of C = A B (whole kernel blocks). */
static void *bf16_slice(void *p)
{
    const slice *s = p;
    const int pairs = kv_bf16_pairs(s->size);
    kv_bf16_gemm(s->size, s->j1 - s->j0, pairs, s->a, s->b + (size_t)s->j0 * pairs,
                 s->c + s->j0, (size_t)s->size, false);
    return NULL;
}

static double bf16_rate(int size, int threads, int runs)
{
    const size_t n = (size_t)size * size;
    float *x = malloc(n * sizeof(float)), *c = malloc(n * sizeof(float));
    uint32_t *a = malloc(kv_bf16_a_words(size, size) * 4), *b = malloc(kv_bf16_b_words(size, size) * 4);
    pthread_t *tid = malloc((size_t)threads * sizeof *tid);
    slice *parts = malloc((size_t)threads * sizeof *parts);
    if (!x || !c || !a || !b || !tid || !parts) {
        fprintf(stderr, "bench_gemm: out of memory\n");
        exit(1);
    }
    for (size_t i = 0; i < n; i++)
        x[i] = (float)(i % 17) / 17.0f - 0.5f;
    kv_bf16_pack_a(x, (size_t)size, 1, size, size, a);
    kv_bf16_pack_b(x, (size_t)size, 1, size, size, b);
    const int blocks = (size + KV_BF16_NR - 1) / KV_BF16_NR;
    double best = 1e30;
    for (int r = 0; r < runs; r++) {
        double t0 = now();
        for (int t = 0; t < threads; t++) {
            int b0 = blocks * t / threads, b1 = blocks * (t + 1) / threads;
            parts[t] = (slice){size, b0 * KV_BF16_NR, (b1 * KV_BF16_NR < size ? b1 * KV_BF16_NR : size), a, b, c};
            pthread_create(&tid[t], NULL, bf16_slice, &parts[t]);
        }
        for (int t = 0; t < threads; t++)
            pthread_join(tid[t], NULL);
        double dt = now() - t0;
        if (dt < best)
            best = dt;
    }
    free(x), free(c), free(a), free(b), free(tid), free(parts);
    return 2.0 * size * size * (double)size / best / 1e9;
}

static double fp32_rate(int size, int threads, int runs)
{
    const size_t n = (size_t)size * size;
    float *a = malloc(n * sizeof(float)), *b = malloc(n * sizeof(float)), *c = malloc(n * sizeof(float));
    if (!a || !b || !c) {
        fprintf(stderr, "bench_gemm: out of memory\n");
        exit(1);
    }
    for (size_t i = 0; i < n; i++)
        a[i] = b[i] = (float)(i % 17) / 17.0f - 0.5f;
    if (openblas_set_num_threads)
        openblas_set_num_threads(threads);
    double best = 1e30;
    for (int r = 0; r < runs; r++) {
        double t0 = now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, size, size, size, 1.0f, a, size, b,
                    size, 0.0f, c, size);
        double dt = now() - t0;
        if (dt < best)
            best = dt;
    }
    free(a), free(b), free(c);
    return 2.0 * size * size * (double)size / best / 1e9;
}

int main(int argc, char **argv)
{
    int threads = 1, size = 2048, runs = 5;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--threads")) threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--size")) size = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--runs")) runs = atoi(argv[i + 1]);
    }
    if (threads < 1 || size < 1 || runs < 1 || argc % 2 == 0) {
        fprintf(stderr, "usage: bench_gemm [--threads T] [--size S] [--runs R]\n");
        return 2;
    }
    char why[256];
    const bool bf16 = kv_bf16_available(why, sizeof why);
    printf("{\"threads\": %d, \"size\": %d, \"fp32_gflops\": %.1f, ", threads, size,
           fp32_rate(size, threads, runs));
    if (bf16)
        printf("\"bf16_gflops\": %.1f, \"bf16_reason\": \"\"}\n", bf16_rate(size, threads, runs));
    else
        printf("\"bf16_gflops\": null, \"bf16_reason\": \"%s\"}\n", why);
    return 0;
}
