/* test_cpu_memory.c — the CPU backend's block cache (src/backend/cpu/
 * cpu_backend.c): released large blocks come back to later allocations of
 * their size, also beyond 256 MB as long as the blocks in use and cached
 * stay within the most in use since the last trim (a training step reuses
 * the last one's memory), never raising that peak by more than 256 MB; a
 * trim keeps what was in use at the most since the last trim (the end of an
 * encode or decode: the next call of its size maps nothing new) and a trim
 * without keep gives everything back. Blocks are mapped and never
 * touched, so those tests cost address space, not memory; the last ones run
 * a model with keep_memory on and off. */
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/cpu_ops.h"
#include "model/model.h"
#include "test_util.h"

#define MB ((size_t)1 << 20)

static kv_backend *cpu_backend(void)
{
    kv_backend_settings settings = {1, 0, KV_PRECISION_FP32};
    kv_backend *be = NULL;
    ck_assert_ok(kv_cpu_backend_create(&settings, &be));
    return be;
}

static bool holds(void *const *set, int n, const void *p)
{
    for (int i = 0; i < n; i++)
        if (set[i] == p)
            return true;
    return false;
}

/* The bound: beyond 256 MB the cache holds only what keeps the blocks in
 * use and cached within the peak. */
static void assert_within_bound(const kv_cpu *cpu)
{
    const size_t bound = cpu->peak_live > cpu->kept ? cpu->peak_live : cpu->kept;
    ck_assert_msg(cpu->cached_bytes <= 256 * MB || cpu->live_bytes + cpu->cached_bytes <= bound,
                  "cached %zu MB with %zu MB in use, peak %zu MB, kept %zu MB",
                  cpu->cached_bytes / MB, cpu->live_bytes / MB, cpu->peak_live / MB,
                  cpu->kept / MB);
}

START_TEST(a_steps_blocks_come_back_to_the_next_step)
{
    kv_backend *be = cpu_backend();
    kv_cpu *cpu = kv_cpu_of(be);
    /* a "step": seven blocks of three sizes, 860 MB in all, released */
    const size_t sizes[] = {100 * MB, 100 * MB, 160 * MB, 100 * MB, 160 * MB, 40 * MB, 200 * MB};
    enum { N = sizeof sizes / sizeof sizes[0] };
    void *first[N], *second[N];
    for (int i = 0; i < N; i++)
        ck_assert_ok(be->ops->alloc(be, sizes[i], KV_STORAGE_FLOAT32, &first[i]));
    for (int i = N - 1; i >= 0; i--)
        be->ops->release(be, first[i]);
    ck_assert_int_eq(cpu->cached, N); /* all of it, past 256 MB: within the peak */
    ck_assert_uint_eq(cpu->live_bytes, 0);
    assert_within_bound(cpu);
    /* the next "step" gets every block back, mapping nothing new */
    for (int i = 0; i < N; i++) {
        ck_assert_ok(be->ops->alloc(be, sizes[i], KV_STORAGE_FLOAT32, &second[i]));
        ck_assert_msg(holds(first, N, second[i]), "block %d of %zu MB was mapped anew", i,
                      sizes[i] / MB);
    }
    ck_assert_int_eq(cpu->cached, 0);
    for (int i = 0; i < N; i++)
        be->ops->release(be, second[i]);
    /* trim keeps the step's blocks (all within its peak), and the peak
     * starts again; trim without keep gives everything back */
    be->ops->trim(be, true);
    ck_assert_int_eq(cpu->cached, N);
    ck_assert_uint_eq(cpu->peak_live, 0);
    be->ops->trim(be, false);
    ck_assert_int_eq(cpu->cached, 0);
    ck_assert_uint_eq(cpu->cached_bytes, 0);
    ck_assert_uint_eq(cpu->kept, 0);
    kv_backend_destroy(be);
}
END_TEST

START_TEST(the_cache_never_raises_the_peak_past_its_256_mb)
{
    kv_backend *be = cpu_backend();
    kv_cpu *cpu = kv_cpu_of(be);
    void *a[4], *big = NULL;
    for (int i = 0; i < 4; i++)
        ck_assert_ok(be->ops->alloc(be, 100 * MB, KV_STORAGE_FLOAT32, &a[i]));
    for (int i = 0; i < 4; i++)
        be->ops->release(be, a[i]);
    ck_assert_uint_ge(cpu->cached_bytes, 400 * MB); /* a 400 MB step's memory, kept */
    /* a block no cached one fits: mapped anew, and cached blocks go so that
     * in use + cached stays within the peak (or the cache within 256 MB) */
    ck_assert_ok(be->ops->alloc(be, 300 * MB, KV_STORAGE_FLOAT32, &big));
    ck_assert(!holds(a, 4, big));
    assert_within_bound(cpu);
    ck_assert_uint_lt(cpu->cached_bytes, 400 * MB);
    be->ops->release(be, big);
    assert_within_bound(cpu);
    /* small blocks never enter it */
    void *small = NULL;
    const size_t before = cpu->cached_bytes;
    ck_assert_ok(be->ops->alloc(be, 1000, KV_STORAGE_FLOAT32, &small));
    be->ops->release(be, small);
    ck_assert_uint_eq(cpu->cached_bytes, before);
    kv_backend_destroy(be);
}
END_TEST

/* A call of 600 MB, then one of 240 MB: each trim keeps what its call
 * needed at most (in use included), and what the first kept bounds the
 * cache during the second. */
START_TEST(a_trim_keeps_what_the_last_call_needed_and_no_more)
{
    kv_backend *be = cpu_backend();
    kv_cpu *cpu = kv_cpu_of(be);
    void *weights = NULL, *a[3], *b = NULL, *c = NULL;
    ck_assert_ok(be->ops->alloc(be, 30 * MB, KV_STORAGE_FLOAT32, &weights)); /* stays in use */
    for (int i = 0; i < 3; i++)
        ck_assert_ok(be->ops->alloc(be, 200 * MB, KV_STORAGE_FLOAT32, &a[i]));
    for (int i = 0; i < 3; i++)
        be->ops->release(be, a[i]);
    be->ops->trim(be, true);
    ck_assert_uint_eq(cpu->cached_bytes / MB, 600); /* the headers round down */
    ck_assert_uint_eq(cpu->kept, cpu->live_bytes + cpu->cached_bytes);
    /* the second call: one 200 MB block back from the cache and a 40 MB one
     * anew, for which a cached 200 MB block goes (in use + cached stay
     * within what the first call kept) */
    const size_t mapped = cpu->mapped;
    ck_assert_ok(be->ops->alloc(be, 200 * MB, KV_STORAGE_FLOAT32, &b));
    ck_assert(holds(a, 3, b));
    ck_assert_uint_eq(cpu->mapped, mapped);
    ck_assert_ok(be->ops->alloc(be, 40 * MB, KV_STORAGE_FLOAT32, &c));
    ck_assert_uint_eq(cpu->mapped, mapped + 1);
    assert_within_bound(cpu);
    ck_assert_int_eq(cpu->cached, 1);
    be->ops->release(be, c);
    be->ops->release(be, b);
    assert_within_bound(cpu);
    ck_assert_int_eq(cpu->cached, 3);
    /* its trim keeps 240 MB at most beside the weights: the other 200 MB
     * block goes */
    be->ops->trim(be, true);
    ck_assert_uint_le(cpu->live_bytes + cpu->cached_bytes, (30 + 240 + 1) * MB);
    ck_assert_uint_ge(cpu->cached_bytes / MB, 200);
    ck_assert_int_eq(cpu->cached, 2);
    be->ops->trim(be, false);
    ck_assert_int_eq(cpu->cached, 0);
    ck_assert_uint_eq(cpu->live_bytes / MB, 30);
    be->ops->release(be, weights);
    kv_backend_destroy(be);
}
END_TEST

/* After a call of 100 MB blocks, one of 200 MB blocks: the kept blocks it
 * cannot use go before it maps beyond what the last call kept, so that
 * they do not stay beside the new ones (a dataset encode's batch-1 warm-up
 * before its batches of 4); the new call's own released blocks are not
 * touched by that rule. */
START_TEST(kept_blocks_a_call_cannot_use_go_before_it_maps_more)
{
    kv_backend *be = cpu_backend();
    kv_cpu *cpu = kv_cpu_of(be);
    void *a[2], *b[2], *c = NULL;
    for (int i = 0; i < 2; i++)
        ck_assert_ok(be->ops->alloc(be, 100 * MB, KV_STORAGE_FLOAT32, &a[i]));
    for (int i = 0; i < 2; i++)
        be->ops->release(be, a[i]);
    be->ops->trim(be, true);
    ck_assert_int_eq(cpu->cached, 2);
    const size_t kept = cpu->kept;
    /* the first 200 MB block: with the 200 MB kept it would pass what was
     * kept, and still with one of them: both go */
    ck_assert_ok(be->ops->alloc(be, 200 * MB, KV_STORAGE_FLOAT32, &b[0]));
    ck_assert_int_eq(cpu->cached, 0);
    ck_assert_uint_le(cpu->live_bytes, kept + MB);
    ck_assert_ok(be->ops->alloc(be, 200 * MB, KV_STORAGE_FLOAT32, &b[1]));
    be->ops->release(be, b[0]);
    /* a block of this call's own stays for reuse within the call */
    ck_assert_ok(be->ops->alloc(be, 50 * MB, KV_STORAGE_FLOAT32, &c));
    ck_assert_int_eq(cpu->cached, 1);
    be->ops->release(be, c);
    be->ops->release(be, b[1]);
    assert_within_bound(cpu);
    be->ops->trim(be, false);
    ck_assert_int_eq(cpu->cached, 0);
    kv_backend_destroy(be);
}
END_TEST

/* A tiny model on the CPU with keep_memory as given. */
static klvae_model_t *tiny_model(const char *keep)
{
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    ck_assert_ok(klvae_options_set(o, "config", "tiny"));
    ck_assert_ok(klvae_options_set(o, "backend", "cpu"));
    ck_assert_ok(klvae_options_set(o, "threads", "2"));
    ck_assert_ok(klvae_options_set(o, "seed", "7"));
    if (keep)
        ck_assert_ok(klvae_options_set(o, "keep-memory", keep));
    klvae_model_t *m = NULL;
    ck_assert_ok(klvae_model_create(o, &m));
    klvae_options_free(o);
    return m;
}

/* keep_memory (default true): the second decode and encode of a size map no
 * block anew and give the same bits as the first (the reused blocks hold the
 * first call's values, not zeros); keep_memory=false gives every block back
 * after each call, so each call maps its blocks again. Random latents,
 * batch 2, an odd latent size (activations of several MB). */
START_TEST(keep_memory_reuses_a_calls_memory_in_the_next)
{
    const int n = 2, lat_h = 61, lat_w = 67, f = 2;
    const size_t zc = (size_t)n * 4 * lat_h * lat_w, xc = (size_t)n * 3 * lat_h * f * lat_w * f;
    float *z = malloc(zc * sizeof *z), *img[2][2], *mean[2][2];
    ck_assert_ptr_nonnull(z);
    uint64_t s = 12345;
    for (size_t i = 0; i < zc; i++) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        z[i] = (float)((double)(s >> 11) / 9007199254740992.0 * 6.0 - 3.0);
    }
    const char *keep[2] = {NULL, "false"};
    char buf[16];
    for (int k = 0; k < 2; k++) {
        klvae_model_t *m = tiny_model(keep[k]);
        ck_assert_int_eq(klvae_model_latent_channels(m), 4);
        ck_assert_int_eq(klvae_model_downsampling_factor(m), f);
        ck_assert_ok(klvae_model_get(m, "keep_memory", buf, sizeof buf));
        ck_assert_str_eq(buf, k == 0 ? "true" : "false");
        kv_cpu *cpu = kv_cpu_of(m->be);
        size_t maps[2];
        for (int call = 0; call < 2; call++) {
            img[k][call] = malloc(xc * sizeof(float));
            mean[k][call] = malloc(zc * sizeof(float));
            ck_assert(img[k][call] && mean[k][call]);
            const size_t before = cpu->mapped;
            ck_assert_ok(klvae_decode(m, z, n, lat_h, lat_w, img[k][call]));
            ck_assert_ok(klvae_encode(m, img[k][call], n, lat_h * f, lat_w * f, mean[k][call],
                                      NULL));
            maps[call] = cpu->mapped - before;
            if (k == 0)
                ck_assert_uint_gt(cpu->cached_bytes, 4 * MB); /* kept for the next call */
            else
                ck_assert_uint_eq(cpu->cached_bytes, 0);
        }
        ck_assert_uint_gt(maps[0], 2); /* the activations are large blocks */
        if (k == 0)
            ck_assert_uint_eq(maps[1], 0);
        else
            ck_assert_uint_eq(maps[1], maps[0]);
        klvae_model_free(m);
    }
    for (int k = 0; k < 2; k++)
        for (int call = 0; call < 2; call++) {
            ck_assert_msg(memcmp(img[k][call], img[0][0], xc * sizeof(float)) == 0,
                          "keep_memory %s, decode %d: other bits", k ? "false" : "true", call);
            ck_assert_msg(memcmp(mean[k][call], mean[0][0], zc * sizeof(float)) == 0,
                          "keep_memory %s, encode %d: other bits", k ? "false" : "true", call);
        }
    for (int k = 0; k < 2; k++)
        for (int call = 0; call < 2; call++) {
            free(img[k][call]);
            free(mean[k][call]);
        }
    free(z);
}
END_TEST

/* The option's values: booleans only, the error names the key. */
START_TEST(keep_memory_takes_a_boolean)
{
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    const char *bad[] = {"", "yes", "2", "truee", "-1"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ck_assert_status(klvae_options_set(o, "keep_memory", bad[i]), KLVAE_ERR_OPTION);
        ck_assert_error_mentions("keep_memory");
    }
    char buf[16];
    ck_assert_ok(klvae_options_get(o, "keep_memory", buf, sizeof buf));
    ck_assert_str_eq(buf, "true");
    ck_assert_ok(klvae_options_set(o, "keep_memory", "0"));
    ck_assert_ok(klvae_options_get(o, "keep_memory", buf, sizeof buf));
    ck_assert_str_eq(buf, "0");
    klvae_options_free(o);
}
END_TEST

Suite *suite_cpu_memory(void)
{
    Suite *s = suite_create("cpu_memory");
    TCase *tc = tcase_create("cache");
    tcase_add_test(tc, a_steps_blocks_come_back_to_the_next_step);
    tcase_add_test(tc, the_cache_never_raises_the_peak_past_its_256_mb);
    tcase_add_test(tc, a_trim_keeps_what_the_last_call_needed_and_no_more);
    tcase_add_test(tc, kept_blocks_a_call_cannot_use_go_before_it_maps_more);
    tcase_add_test(tc, keep_memory_reuses_a_calls_memory_in_the_next);
    tcase_add_test(tc, keep_memory_takes_a_boolean);
    suite_add_tcase(s, tc);
    return s;
}
