/* test_buckets.c — the gradient buckets of data-parallel training
 * (src/train/buckets.h): the plan from the first backward's order, launches
 * as soon as a bucket is complete and in order, frozen gradients left out,
 * and the bug of a gradient written after its bucket's sum started. Host
 * logic only: the CUDA path (NCCL) launches the same buckets. */
#include "test_util.h"
#include "train/buckets.h"

/* The buckets launched right after writing gradient p, as a string of
 * bucket numbers ("" when none). */
static void write_and_launch(kv_buckets *b, size_t p, char *launched, size_t size)
{
    ck_assert_ok(kv_buckets_written(b, p));
    launched[0] = '\0';
    size_t k;
    while (kv_buckets_next(b, false, &k)) {
        size_t len = strlen(launched);
        snprintf(launched + len, size - len, "%s%zu", len ? "," : "", k);
    }
}

/* The gradients of bucket k, as "p,p,...". */
static void members(const kv_buckets *b, size_t k, char *out, size_t size)
{
    out[0] = '\0';
    for (size_t i = 0; i < kv_buckets_size(b, k); i++) {
        size_t len = strlen(out);
        snprintf(out + len, size - len, "%s%zu", i ? "," : "", b->order[kv_buckets_first(b, k) + i]);
    }
}

START_TEST(first_backward_records_then_buckets_follow_its_order)
{
    /* 6 gradients; 3 is frozen; the backward writes them last to first */
    const size_t bytes[6] = {40, 40, 100, 8, 30, 30};
    const bool use[6] = {true, true, true, false, true, true};
    kv_buckets b;
    ck_assert_ok(kv_buckets_init(&b, 6, bytes, use, 64));
    char launched[64], m[64];
    kv_buckets_begin(&b);
    for (int p = 5; p >= 0; p--) { /* the first backward only records */
        write_and_launch(&b, (size_t)p, launched, sizeof launched);
        ck_assert_str_eq(launched, "");
    }
    size_t k, order[8], n = 0;
    while (kv_buckets_next(&b, true, &k))
        order[n++] = k;
    /* in write order 5,4 (60 bytes) | 2 (100: alone) | 1 | 0 — 3 is frozen */
    ck_assert_uint_eq(b.count, 4);
    ck_assert_uint_eq(n, 4);
    for (size_t i = 0; i < n; i++)
        ck_assert_uint_eq(order[i], i);
    members(&b, 0, m, sizeof m);
    ck_assert_str_eq(m, "5,4");
    members(&b, 1, m, sizeof m);
    ck_assert_str_eq(m, "2");
    members(&b, 2, m, sizeof m);
    ck_assert_str_eq(m, "1");
    members(&b, 3, m, sizeof m);
    ck_assert_str_eq(m, "0");

    /* the next backward launches each bucket as soon as it is complete */
    kv_buckets_begin(&b);
    write_and_launch(&b, 5, launched, sizeof launched);
    ck_assert_str_eq(launched, "");
    write_and_launch(&b, 3, launched, sizeof launched); /* frozen: nothing */
    ck_assert_str_eq(launched, "");
    write_and_launch(&b, 4, launched, sizeof launched);
    ck_assert_str_eq(launched, "0");
    write_and_launch(&b, 2, launched, sizeof launched);
    ck_assert_str_eq(launched, "1");
    write_and_launch(&b, 1, launched, sizeof launched);
    ck_assert_str_eq(launched, "2");
    write_and_launch(&b, 0, launched, sizeof launched);
    ck_assert_str_eq(launched, "3");
    ck_assert(!kv_buckets_next(&b, true, &k)); /* nothing left for the end */
    kv_buckets_free(&b);
}
END_TEST

START_TEST(buckets_launch_in_order_whatever_the_write_order)
{
    const size_t bytes[4] = {10, 10, 10, 10};
    kv_buckets b;
    ck_assert_ok(kv_buckets_init(&b, 4, bytes, NULL, 10)); /* one gradient per bucket */
    kv_buckets_begin(&b);
    for (size_t p = 0; p < 4; p++)
        ck_assert_ok(kv_buckets_written(&b, p));
    size_t k;
    while (kv_buckets_next(&b, true, &k))
        ;
    ck_assert_uint_eq(b.count, 4);
    /* bucket 1 complete first: it waits for bucket 0, then both go */
    char launched[64];
    kv_buckets_begin(&b);
    write_and_launch(&b, 1, launched, sizeof launched);
    ck_assert_str_eq(launched, "");
    write_and_launch(&b, 3, launched, sizeof launched);
    ck_assert_str_eq(launched, "");
    write_and_launch(&b, 0, launched, sizeof launched);
    ck_assert_str_eq(launched, "0,1");
    /* a gradient that is never written: its bucket goes at the end */
    size_t rest[4], n = 0;
    while (kv_buckets_next(&b, true, &k))
        rest[n++] = k;
    ck_assert_uint_eq(n, 2);
    ck_assert_uint_eq(rest[0], 2);
    ck_assert_uint_eq(rest[1], 3);
    kv_buckets_free(&b);
}
END_TEST

START_TEST(writing_a_gradient_after_its_sum_started_is_a_bug)
{
    const size_t bytes[3] = {4, 4, 4};
    kv_buckets b;
    ck_assert_ok(kv_buckets_init(&b, 3, bytes, NULL, 8));
    kv_buckets_begin(&b);
    for (size_t p = 0; p < 3; p++)
        ck_assert_ok(kv_buckets_written(&b, p));
    size_t k;
    while (kv_buckets_next(&b, true, &k))
        ;
    ck_assert_uint_eq(b.count, 2); /* {0, 1}, {2} */
    kv_buckets_begin(&b);
    ck_assert_ok(kv_buckets_written(&b, 0));
    ck_assert_ok(kv_buckets_written(&b, 0)); /* again, bucket not launched: harmless */
    ck_assert(!kv_buckets_next(&b, false, &k));
    ck_assert_ok(kv_buckets_written(&b, 1));
    ck_assert(kv_buckets_next(&b, false, &k));
    ck_assert_uint_eq(k, 0);
    ck_assert_status(kv_buckets_written(&b, 1), KLVAE_ERR_INTERNAL);
    ck_assert_error_mentions("gradient 1 written again");
    kv_buckets_free(&b);
    /* and buckets of 0 bytes are refused */
    ck_assert_status(kv_buckets_init(&b, 3, bytes, NULL, 0), KLVAE_ERR_INVALID_ARGUMENT);
}
END_TEST

Suite *suite_buckets(void)
{
    Suite *s = suite_create("buckets");
    TCase *c = tcase_create("buckets");
    tcase_add_test(c, first_backward_records_then_buckets_follow_its_order);
    tcase_add_test(c, buckets_launch_in_order_whatever_the_write_order);
    tcase_add_test(c, writing_a_gradient_after_its_sum_started_is_a_bug);
    suite_add_tcase(s, c);
    return s;
}
