/* test_api.c — version, status strings, the thread-local error message,
 * and handles used from several threads. */
#include <pthread.h>

#include "test_util.h"

START_TEST(version_macros_match_the_library)
{
    ck_assert_uint_eq(klvae_version(), KLVAE_VERSION_NUMBER);
    ck_assert_str_eq(klvae_version_string(), KLVAE_VERSION_STRING);
    char built[32];
    snprintf(built, sizeof built, "%d.%d.%d", KLVAE_VERSION_MAJOR, KLVAE_VERSION_MINOR,
             KLVAE_VERSION_PATCH);
    ck_assert_str_eq(built, KLVAE_VERSION_STRING);
    ck_assert_uint_eq(KLVAE_VERSION_NUMBER,
                      KLVAE_VERSION_MAJOR * 10000 + KLVAE_VERSION_MINOR * 100 + KLVAE_VERSION_PATCH);
}
END_TEST

START_TEST(every_status_has_its_own_string)
{
    const char *seen[KLVAE_ERR_BUFFER_TOO_SMALL + 1];
    for (int s = KLVAE_OK; s <= KLVAE_ERR_BUFFER_TOO_SMALL; s++) {
        seen[s] = klvae_status_string((klvae_status_t)s);
        ck_assert_ptr_nonnull(seen[s]);
        ck_assert_str_ne(seen[s], "unknown status");
        for (int t = 0; t < s; t++)
            ck_assert_str_ne(seen[s], seen[t]);
    }
    ck_assert_str_eq(klvae_status_string((klvae_status_t)999), "unknown status");
    ck_assert_str_eq(klvae_status_string((klvae_status_t)-1), "unknown status");
    /* The numbers are part of the ABI. */
    ck_assert_int_eq(KLVAE_ERR_INVALID_ARGUMENT, 1);
    ck_assert_int_eq(KLVAE_ERR_BACKEND_UNAVAILABLE, 10);
    ck_assert_int_eq(KLVAE_ERR_INTERNAL, 12);
    ck_assert_int_eq(KLVAE_ERR_NONFINITE, 13);
    ck_assert_int_eq(KLVAE_ERR_BUSY, 14);
    ck_assert_int_eq(KLVAE_ERR_BUFFER_TOO_SMALL, 15);
}
END_TEST

START_TEST(last_error_is_cleared_by_a_successful_call)
{
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    ck_assert_status(klvae_options_set(o, "no_such_key", "1"), KLVAE_ERR_OPTION);
    ck_assert_str_ne(klvae_last_error(), "");
    ck_assert_ok(klvae_options_set(o, "threads", "1"));
    ck_assert_str_eq(klvae_last_error(), "");
    klvae_options_free(o);
}
END_TEST

static void *fail_in_thread(void *arg)
{
    (void)arg;
    klvae_model_t *m = NULL;
    klvae_model_load("/nonexistent/in-thread.safetensors", NULL, &m);
    return strstr(klvae_last_error(), "in-thread") ? (void *)1 : NULL;
}

START_TEST(last_error_is_per_thread)
{
    klvae_model_t *m = NULL;
    ck_assert_status(klvae_model_load("/nonexistent/main-thread.safetensors", NULL, &m),
                     KLVAE_ERR_IO);
    pthread_t t;
    void *other_saw_its_own = NULL;
    pthread_create(&t, NULL, fail_in_thread, NULL);
    pthread_join(t, &other_saw_its_own);
    ck_assert_ptr_nonnull(other_saw_its_own);
    ck_assert_error_mentions("main-thread");
}
END_TEST

typedef struct worker {
    klvae_model_t *model;
    const float *x;
    float *mean;
    klvae_status_t status;
} worker;

static void *encode_in_thread(void *arg)
{
    worker *w = arg;
    for (int i = 0; i < 5 && w->status == KLVAE_OK; i++)
        w->status = klvae_encode(w->model, w->x, 2, 16, 24, w->mean, NULL);
    return NULL;
}

START_TEST(two_models_run_on_two_threads)
{
    klvae_model_t *a = test_tiny_model(2), *b = test_tiny_model(2);
    const size_t nx = 2 * 3 * 16 * 24, nm = 2 * 4 * 8 * 12;
    test_rng rng = test_rng_new(31);
    float *x = test_alloc(nx), *ma = test_alloc(nm), *mb = test_alloc(nm), *want = test_alloc(nm);
    test_fill(x, nx, &rng, -1, 1);
    ck_assert_ok(klvae_encode(a, x, 2, 16, 24, want, NULL));
    worker wa = {a, x, ma, KLVAE_OK}, wb = {b, x, mb, KLVAE_OK};
    pthread_t ta, tb;
    pthread_create(&ta, NULL, encode_in_thread, &wa);
    pthread_create(&tb, NULL, encode_in_thread, &wb);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    ck_assert_int_eq(wa.status, KLVAE_OK);
    ck_assert_int_eq(wb.status, KLVAE_OK);
    ck_assert_int_eq(memcmp(ma, want, nm * sizeof(float)), 0);
    ck_assert_int_eq(memcmp(mb, want, nm * sizeof(float)), 0);
    free(x), free(ma), free(mb), free(want);
    klvae_model_free(a), klvae_model_free(b);
}
END_TEST

Suite *suite_api(void)
{
    Suite *s = suite_create("api");
    TCase *tc = tcase_create("basics");
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, version_macros_match_the_library);
    tcase_add_test(tc, every_status_has_its_own_string);
    tcase_add_test(tc, last_error_is_cleared_by_a_successful_call);
    tcase_add_test(tc, last_error_is_per_thread);
    tcase_add_test(tc, two_models_run_on_two_threads);
    suite_add_tcase(s, tc);
    return s;
}
