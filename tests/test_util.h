/* test_util.h — helpers shared by the Check suites. Tests run from the
 * tests/ folder (make check does that), so fixtures are "fixtures/...". */
#ifndef KV_TEST_UTIL_H
#define KV_TEST_UTIL_H

#include <check.h>
#include <stdbool.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "klvae.h"

/* Asserts a status and shows the library's message when it differs. */
#define ck_assert_status(expr, expected)                                                        \
    do {                                                                                        \
        klvae_status_t st_ = (expr);                                                            \
        ck_assert_msg(st_ == (expected), "%s returned %d (%s), expected %d (%s); message: %s",  \
                      #expr, (int)st_, klvae_status_string(st_), (int)(expected),               \
                      klvae_status_string(expected), klvae_last_error());                       \
    } while (0)

#define ck_assert_ok(expr) ck_assert_status(expr, KLVAE_OK)

/* Asserts that the last error message contains text. */
#define ck_assert_error_mentions(text)                                                          \
    ck_assert_msg(strstr(klvae_last_error(), (text)) != NULL,                                   \
                  "message \"%s\" does not mention \"%s\"", klvae_last_error(), (text))

/* Deterministic random numbers for test data (xorshift64*). */
typedef struct test_rng {
    uint64_t state;
} test_rng;

static inline test_rng test_rng_new(uint64_t seed)
{
    test_rng r = {seed * 2654435761u + 0x9E3779B97F4A7C15ull};
    return r;
}

static inline double test_uniform(test_rng *r) /* [0, 1) */
{
    r->state ^= r->state >> 12;
    r->state ^= r->state << 25;
    r->state ^= r->state >> 27;
    return (double)((r->state * 2685821657736338717ull) >> 11) * (1.0 / 9007199254740992.0);
}

/* Fills with uniform values in [lo, hi). */
static inline void test_fill(float *x, size_t n, test_rng *r, float lo, float hi)
{
    for (size_t i = 0; i < n; i++)
        x[i] = lo + (hi - lo) * (float)test_uniform(r);
}

static inline float *test_alloc(size_t n)
{
    float *p = calloc(n ? n : 1, sizeof *p);
    ck_assert_ptr_nonnull(p);
    return p;
}

static inline double test_max_abs_diff(const float *a, const float *b, size_t n)
{
    double worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (d > worst || d != d)
            worst = d != d ? INFINITY : d;
    }
    return worst;
}

/* A fresh empty folder under $TMPDIR (or /tmp); the caller frees the path
 * and removes the folder with test_rmtree. */
char *test_tmpdir(void);
void test_rmtree(const char *path);
/* dir/name, newly allocated. */
char *test_join(const char *dir, const char *name);
bool test_path_exists(const char *path);
/* Entries of dir other than . and ..; *tmp_found is set when one is the
 * temporary file of an atomic write (".tmp." in its name). */
int test_count_entries(const char *dir, int *tmp_found);
/* The whole file, NUL-terminated (not counted in *len); free() it. */
unsigned char *test_read_file(const char *path, size_t *len);

/* Writes bytes to path (replacing it). */
void test_write_file(const char *path, const void *data, size_t len);

/* Writes a safetensors file whose header is exactly header_json, followed by
 * data_len bytes of data (pattern-filled). */
void test_write_safetensors(const char *path, const char *header_json, size_t data_len);

/* Damages one F32 tensor of a safetensors file in place: its last value
 * becomes NaN, or its dtype becomes I32 (same size, so the file stays
 * well-formed). */
typedef enum test_damage { TEST_DAMAGE_NAN, TEST_DAMAGE_DTYPE_I32 } test_damage;
void test_damage_tensor(const char *path, const char *tensor, test_damage how);

/* Loads a float32 tensor of a fixture io.safetensors; returns a malloc'ed
 * array and its shape (n, c, h, w). */
float *test_load_fixture_tensor(const char *path, const char *name, int shape[4]);

/* A model of config "tiny" (fresh, seeded) for tests that need one. */
klvae_model_t *test_tiny_model(int threads);

/* Suites, one per file. */
Suite *suite_api(void);
Suite *suite_options(void);
Suite *suite_config(void);
Suite *suite_safetensors(void);
Suite *suite_model(void);
Suite *suite_sample(void);
Suite *suite_image(void);
Suite *suite_errors(void);
Suite *suite_data(void);
Suite *suite_train(void);
Suite *suite_cli(void);
Suite *suite_plugin(void);
Suite *suite_cuda_host(void);
Suite *suite_golden(void);
Suite *suite_save(void);
Suite *suite_stream(void);
Suite *suite_buckets(void);
Suite *suite_dp(void);
Suite *suite_dataset(void);
Suite *suite_weight_cache(void);
Suite *suite_cpu_memory(void);
Suite *suite_bf16(void);

/* The op tests, one suite per op family of src/backend/backend.h, each in
 * tests/ops/test_FAMILY.c and named FAMILY (CK_RUN_SUITE=conv2d). */
Suite *suite_conv2d_ops(void);
Suite *suite_group_norm_ops(void);
Suite *suite_batch_norm_ops(void);
Suite *suite_attention_ops(void);
Suite *suite_upsample_ops(void);
Suite *suite_pool_ops(void);
Suite *suite_activation_ops(void);
Suite *suite_elementwise_ops(void);
Suite *suite_posterior_ops(void);
Suite *suite_lpips_ops(void);
Suite *suite_losses_ops(void);
Suite *suite_optimizer_ops(void);

#endif
