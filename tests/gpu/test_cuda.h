/* test_cuda.h — what the GPU checks share (tests/gpu/test_cuda.c: inference
 * ops and models; test_cuda_train.c: training ops and steps): the suite's
 * counters and lines, random inputs, tensors on a backend, tolerances. */
#ifndef KV_TEST_CUDA_H
#define KV_TEST_CUDA_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_harness.h"

typedef struct rng {
    uint64_t state;
} rng;

/* A uniform double in [0, 1). */
double uniform(rng *r);
/* x[i] uniform in [lo, hi). */
void fill(float *x, size_t n, rng *r, float lo, float hi);
/* n zeroed floats, or exit(2). */
float *alloc_floats(size_t n);

typedef struct suite {
    const kv_plugin *plugin;
    int device;
    kv_backend *cpu;
    kv_backend *mem; /* an fp32 NCHW CUDA backend: its tensors serve as a caller's float32
                      * device arrays for klvae_*_device */
    rng r;
    int quick, tiny;
    int measuring; /* lines say INFO, counted nowhere (measurements, not checks) */
    int passed, failed, skipped;
} suite;

extern const double fp32_tol, low_tol;
/* A single op's bound: fp32 1e-5, tf32 and bf16 1e-2. */
double tolerance(kv_precision p);
/* A whole model's bound (bf16: 1.5 x PyTorch's own bf16 error). */
double model_tolerance(kv_precision p, const char *op, int size);
/* ||got - want|| / ||want||; infinite when got holds a NaN or an Inf. */
double rel_l2(const float *got, const float *want, size_t n);
/* One line: PASS or FAIL (INFO while measuring), counted. */
void verdict(suite *s, const char *what, kv_precision p, double err, double tol);
void failed_call(suite *s, const char *what, kv_precision p, klvae_status_t st);
void skip(suite *s, const char *what, const char *why);

/* An (n, c, h, w) tensor of be holding host (NaN when host is NULL), in the
 * compute format (put) or float32 (put_f32); get downloads it. */
klvae_status_t put_as(kv_backend *be, int n, int c, int h, int w, const float *host,
                      kv_storage storage, kv_tensor *t);
klvae_status_t put(kv_backend *be, int n, int c, int h, int w, const float *host, kv_tensor *t);
klvae_status_t put_f32(kv_backend *be, int n, int c, int h, int w, const float *host,
                       kv_tensor *t);
klvae_status_t get(kv_backend *be, const kv_tensor *t, float *host);
/* st of an op that ran on gpu, once gpu's stream has finished it. */
klvae_status_t done(suite *s, kv_backend *gpu, klvae_status_t st);
/* A backend of precision p created with the environment variable name set
 * to value (NULL: as it is). */
klvae_status_t backend_with(suite *s, kv_precision p, const char *name, const char *value,
                            kv_backend **out);

/* test_cuda_train.c: every training op against the CPU backend, then
 * whole training steps (run_training_steps, after the model checks). */
void run_training_ops(suite *s, kv_precision p);
void run_training_steps(suite *s, uint64_t seed, const char *plugin_path);

#endif
