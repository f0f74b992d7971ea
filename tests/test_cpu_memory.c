/* test_cpu_memory.c — the CPU backend's block cache (src/backend/cpu/
 * cpu_backend.c): released large blocks come back to later allocations of
 * their size, also beyond 256 MB as long as the blocks in use and cached
 * stay within the most in use since the last trim (a training step reuses
 * the last one's memory), never raising that peak by more than 256 MB, and
 * trim gives them all back. Blocks are mapped and never touched, so the
 * test costs address space, not memory. */
#include "backend/cpu/cpu_ops.h"
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
    ck_assert_msg(cpu->cached_bytes <= 256 * MB ||
                      cpu->live_bytes + cpu->cached_bytes <= cpu->peak_live,
                  "cached %zu MB with %zu MB in use, peak %zu MB", cpu->cached_bytes / MB,
                  cpu->live_bytes / MB, cpu->peak_live / MB);
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
    /* trim gives everything back, and the peak starts again */
    be->ops->trim(be);
    ck_assert_int_eq(cpu->cached, 0);
    ck_assert_uint_eq(cpu->cached_bytes, 0);
    ck_assert_uint_eq(cpu->peak_live, 0);
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

Suite *suite_cpu_memory(void)
{
    Suite *s = suite_create("cpu_memory");
    TCase *tc = tcase_create("cache");
    tcase_add_test(tc, a_steps_blocks_come_back_to_the_next_step);
    tcase_add_test(tc, the_cache_never_raises_the_peak_past_its_256_mb);
    suite_add_tcase(s, tc);
    return s;
}
