/* test_api.c — version, status strings, the thread-local error message,
 * and handles used from several threads (eight at once against a
 * sequential run). */
#include <pthread.h>
#include <sys/stat.h>

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

/* One job of eight_handles_match_a_sequential_run: encode, sample and
 * decode its own images with its own handle, then save the model beside the
 * other threads' and load it back. */
typedef struct job {
    int index;
    klvae_model_t *model;
    const char *dir;
    float *x, *mean, *logvar, *z, *y, *y_saved;
    klvae_status_t status;
} job;

enum { JOBS = 8, JN = 2, JH = 16, JW = 24 };

static void run_job(job *j)
{
    const int f = klvae_model_downsampling_factor(j->model);
    const int lh = JH / f, lw = JW / f;
    klvae_status_t st = klvae_encode(j->model, j->x, JN, JH, JW, j->mean, j->logvar);
    if (st == KLVAE_OK)
        st = klvae_sample(j->model, j->mean, j->logvar, JN, lh, lw, 1000 + j->index, j->z);
    if (st == KLVAE_OK)
        st = klvae_decode(j->model, j->z, JN, lh, lw, j->y);
    char path[4200];
    snprintf(path, sizeof path, "%s/model-%d", j->dir, j->index);
    klvae_model_t *back = NULL;
    if (st == KLVAE_OK)
        st = klvae_model_save(j->model, path);
    if (st == KLVAE_OK)
        st = klvae_model_load(path, NULL, &back);
    if (st == KLVAE_OK)
        st = klvae_decode(back, j->z, JN, lh, lw, j->y_saved);
    klvae_model_free(back);
    j->status = st;
}

static void *job_thread(void *arg)
{
    run_job(arg);
    return NULL;
}

static void job_alloc(job *j, int index, const char *dir, int zc, int f)
{
    const size_t nx = (size_t)JN * 3 * JH * JW, nz = (size_t)JN * zc * (JH / f) * (JW / f);
    j->index = index;
    j->dir = dir;
    j->x = test_alloc(nx), j->y = test_alloc(nx), j->y_saved = test_alloc(nx);
    j->mean = test_alloc(nz), j->logvar = test_alloc(nz), j->z = test_alloc(nz);
    test_rng rng = test_rng_new(100 + (uint64_t)index);
    test_fill(j->x, nx, &rng, -1, 1);
}

static void job_free(job *j)
{
    free(j->x), free(j->y), free(j->y_saved), free(j->mean), free(j->logvar), free(j->z);
}

START_TEST(eight_handles_match_a_sequential_run)
{
    /* Eight threads, each with its own handle (two worker threads each),
     * encode, sample, decode, save into one folder and load back at once:
     * every output equals, bit for bit, the same jobs run one after another
     * on one handle. */
    char *dir = test_tmpdir(), *seq_dir = test_join(dir, "sequential");
    ck_assert_int_eq(mkdir(seq_dir, 0755), 0);
    klvae_model_t *one = test_tiny_model(1);
    const int zc = klvae_model_latent_channels(one), f = klvae_model_downsampling_factor(one);
    job want[JOBS], got[JOBS];
    for (int i = 0; i < JOBS; i++) {
        job_alloc(&want[i], i, seq_dir, zc, f);
        want[i].model = one;
        run_job(&want[i]);
        ck_assert_msg(want[i].status == KLVAE_OK, "job %d: %s", i, klvae_last_error());
        job_alloc(&got[i], i, dir, zc, f);
        got[i].model = test_tiny_model(2);
    }
    pthread_t threads[JOBS];
    for (int i = 0; i < JOBS; i++)
        ck_assert_int_eq(pthread_create(&threads[i], NULL, job_thread, &got[i]), 0);
    for (int i = 0; i < JOBS; i++)
        pthread_join(threads[i], NULL);
    const size_t nx = (size_t)JN * 3 * JH * JW, nz = (size_t)JN * zc * (JH / f) * (JW / f);
    for (int i = 0; i < JOBS; i++) {
        ck_assert_msg(got[i].status == KLVAE_OK, "thread %d failed: %s", i,
                      klvae_status_string(got[i].status));
        ck_assert_int_eq(memcmp(got[i].mean, want[i].mean, nz * sizeof(float)), 0);
        ck_assert_int_eq(memcmp(got[i].logvar, want[i].logvar, nz * sizeof(float)), 0);
        ck_assert_int_eq(memcmp(got[i].z, want[i].z, nz * sizeof(float)), 0);
        ck_assert_int_eq(memcmp(got[i].y, want[i].y, nx * sizeof(float)), 0);
        ck_assert_int_eq(memcmp(got[i].y_saved, want[i].y, nx * sizeof(float)), 0);
        klvae_model_free(got[i].model);
        job_free(&got[i]);
        job_free(&want[i]);
    }
    /* the eight saves in one folder left nothing but the eight models */
    int tmp_found;
    ck_assert_int_eq(test_count_entries(dir, &tmp_found), JOBS + 1);
    ck_assert_int_eq(tmp_found, 0);
    klvae_model_free(one);
    test_rmtree(dir);
    free(seq_dir);
    free(dir);
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
    tcase_add_test(tc, eight_handles_match_a_sequential_run);
    suite_add_tcase(s, tc);
    return s;
}
