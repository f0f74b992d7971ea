/* test_api.c — version, status strings, the thread-local error message,
 * and handles used from several threads (eight at once against a
 * sequential run). */
#include <pthread.h>
#include <sys/stat.h>

#include "model/model.h"
#include "test_util.h"
#include "train/trainer_state.h"

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
    const char *seen[KLVAE_ERR_COMM + 1];
    for (int s = KLVAE_OK; s <= KLVAE_ERR_COMM; s++) {
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
    ck_assert_int_eq(KLVAE_ERR_COMM, 16);
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

/* Every entry point that computes with a handle marks it in use; a call
 * on a marked handle is KLVAE_ERR_BUSY naming itself, and touches nothing. */
START_TEST(a_handle_in_use_answers_busy)
{
    klvae_model_t *m = test_tiny_model(1);
    klvae_trainer_t *t = NULL;
    ck_assert_ok(klvae_trainer_create(m, NULL, &t));
    const int f = klvae_model_downsampling_factor(m), zc = klvae_model_latent_channels(m);
    float *images = test_alloc((size_t)2 * 3 * 16 * 16), *lat = test_alloc((size_t)2 * zc * 4);
    float *out = test_alloc((size_t)2 * zc * 4);
    out[0] = 42.0f;
    atomic_store(&m->busy.flag, 1); /* as if another thread were inside */
    ck_assert_status(klvae_encode(m, images, 2, 2 * f, 2 * f, out, NULL), KLVAE_ERR_BUSY);
    ck_assert_error_mentions("klvae_encode");
    ck_assert_error_mentions("another thread");
    ck_assert_status(klvae_decode(m, lat, 2, 2, 2, images), KLVAE_ERR_BUSY);
    ck_assert_error_mentions("klvae_decode");
    ck_assert_status(klvae_sample(m, lat, lat, 2, 2, 2, 1, out), KLVAE_ERR_BUSY);
    ck_assert_error_mentions("klvae_sample");
    ck_assert_float_eq(out[0], 42.0f); /* untouched */
    /* a trainer's step and load use its model */
    ck_assert_status(klvae_trainer_step(t, images, 2, 16, 16, NULL), KLVAE_ERR_BUSY);
    ck_assert_error_mentions("its model");
    ck_assert_status(klvae_trainer_load(t, "/nonexistent"), KLVAE_ERR_BUSY);
    atomic_store(&m->busy.flag, 0);
    atomic_store(&t->busy.flag, 1);
    char buf[64];
    ck_assert_status(klvae_trainer_step(t, images, 2, 16, 16, NULL), KLVAE_ERR_BUSY);
    ck_assert_status(klvae_trainer_save(t, "/nonexistent/x"), KLVAE_ERR_BUSY);
    ck_assert_status(klvae_trainer_export(t, "/nonexistent/x", 0), KLVAE_ERR_BUSY);
    ck_assert_status(klvae_trainer_get(t, "learning_rate", buf, sizeof buf), KLVAE_ERR_BUSY);
    ck_assert_status(klvae_trainer_set_note(t, "k", "v"), KLVAE_ERR_BUSY);
    ck_assert_status(klvae_trainer_get_note(t, "k", buf, sizeof buf), KLVAE_ERR_BUSY);
    ck_assert_error_mentions("klvae_trainer_get_note");
    ck_assert_int_eq(klvae_trainer_step_count(t), 0);
    atomic_store(&t->busy.flag, 0);
    /* and once free, the calls work */
    ck_assert_ok(klvae_trainer_step(t, images, 2, 16, 16, NULL));
    ck_assert_ok(klvae_encode(m, images, 2, 2 * f, 2 * f, out, NULL));
    klvae_trainer_free(t);
    klvae_model_free(m);
    free(images);
    free(lat);
    free(out);
}
END_TEST

typedef struct hammer {
    klvae_model_t *m;
    const float *images;
    int runs, ok, busy, other;
    float *mean;
    const float *want; /* what a successful call must give */
    size_t count;
} hammer;

static void *hammer_encode(void *arg)
{
    hammer *h = arg;
    for (int i = 0; i < h->runs; i++) {
        klvae_status_t st = klvae_encode(h->m, h->images, 2, 24, 32, h->mean, NULL);
        if (st == KLVAE_OK && memcmp(h->mean, h->want, h->count * sizeof(float)) == 0)
            h->ok++;
        else if (st == KLVAE_ERR_BUSY)
            h->busy++;
        else
            h->other++;
    }
    return NULL;
}

/* Two threads on one model (against the rule): each call either runs alone
 * and gives the right answer, or is refused; no wrong result, no deadlock. */
START_TEST(one_model_on_two_threads_is_refused_not_corrupted)
{
    klvae_model_t *m = test_tiny_model(2);
    const int zc = klvae_model_latent_channels(m), f = klvae_model_downsampling_factor(m);
    const size_t count = (size_t)2 * zc * (24 / f) * (32 / f);
    float *images = test_alloc((size_t)2 * 3 * 24 * 32), *want = test_alloc(count);
    test_rng rng = test_rng_new(77);
    test_fill(images, (size_t)2 * 3 * 24 * 32, &rng, -1, 1);
    ck_assert_ok(klvae_encode(m, images, 2, 24, 32, want, NULL));
    int busy = 0;
    for (int round = 0; round < 50 && busy == 0; round++) {
        hammer h[2];
        pthread_t th[2];
        for (int k = 0; k < 2; k++) {
            h[k] = (hammer){m, images, 40, 0, 0, 0, test_alloc(count), want, count};
            ck_assert_int_eq(pthread_create(&th[k], NULL, hammer_encode, &h[k]), 0);
        }
        for (int k = 0; k < 2; k++) {
            ck_assert_int_eq(pthread_join(th[k], NULL), 0);
            ck_assert_int_eq(h[k].other, 0); /* never a wrong answer or another error */
            ck_assert_int_eq(h[k].ok + h[k].busy, h[k].runs);
            busy += h[k].busy;
            free(h[k].mean);
        }
    }
    ck_assert_int_gt(busy, 0); /* the threads did overlap, and were told */
    klvae_model_free(m);
    free(images);
    free(want);
}
END_TEST

/* NaN and infinity in the inputs of inference are defined behaviour: they
 * propagate to the outputs (the header says so), with no error and, under
 * UBSan (make check-asan), no undefined operation on the way. */
START_TEST(nonfinite_inputs_propagate_through_inference)
{
    klvae_model_t *m = test_tiny_model(2);
    const int zc = klvae_model_latent_channels(m), f = klvae_model_downsampling_factor(m);
    const int h = 3 * f, w = 5 * f, lh = 3, lw = 5;
    const size_t pixels = (size_t)2 * 3 * h * w, latents = (size_t)2 * zc * lh * lw;
    float *images = test_alloc(pixels), *mean = test_alloc(latents), *logvar = test_alloc(latents);
    float *z = test_alloc(latents), *out = test_alloc(pixels);
    const float bad[2] = {NAN, INFINITY};
    for (int k = 0; k < 2; k++) {
        test_rng rng = test_rng_new(5 + (uint64_t)k);
        test_fill(images, pixels, &rng, -1, 1);
        images[3 * h * w + 7] = bad[k]; /* in the second image only */
        ck_assert_ok(klvae_encode(m, images, 2, h, w, mean, logvar));
        /* the group norms spread it over its whole image, and only there */
        const size_t per = (size_t)zc * lh * lw;
        for (size_t i = 0; i < per; i++)
            ck_assert(isfinite(mean[i]));
        ck_assert(!isfinite(mean[per]));
        ck_assert_ok(klvae_sample(m, mean, logvar, 2, lh, lw, 3, z));
        ck_assert_ok(klvae_decode(m, z, 2, lh, lw, out));
        ck_assert(isfinite(out[0]));
        ck_assert(!isfinite(out[pixels - 1]));
    }
    klvae_model_free(m);
    free(images);
    free(mean);
    free(logvar);
    free(z);
    free(out);
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
    tcase_add_test(tc, a_handle_in_use_answers_busy);
    tcase_add_test(tc, nonfinite_inputs_propagate_through_inference);
    tcase_add_test(tc, one_model_on_two_threads_is_refused_not_corrupted);
    tcase_add_test(tc, eight_handles_match_a_sequential_run);
    suite_add_tcase(s, tc);
    return s;
}
