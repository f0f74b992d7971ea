/* test_elementwise.c — the elementwise family (src/backend/backend.h,
 * "Family elementwise"): add, with aliasing. */
#include "op_test_util.h"

START_TEST(add_matches_reference_and_allows_aliasing)
{
    const size_t count = 2 * 3 * 129 * 257; /* more than one chunk */
    test_rng rng = test_rng_new(300);
    float *a = test_alloc(count), *b = test_alloc(count), *y = test_alloc(count);
    test_fill(a, count, &rng, -10, 10);
    test_fill(b, count, &rng, -10, 10);
    kv_backend *be = op_backend(2);
    kv_tensor ta = op_tensor4(a, 2, 3, 129, 257), tb = op_tensor4(b, 2, 3, 129, 257),
              ty = op_tensor4(y, 2, 3, 129, 257);
    ck_assert_ok(be->ops->add(be, &ta, &tb, &ty));
    for (size_t i = 0; i < count; i++)
        ck_assert_float_eq(y[i], a[i] + b[i]);
    ck_assert_ok(be->ops->add(be, &ta, &tb, &tb)); /* y = b */
    ck_assert_int_eq(memcmp(b, y, count * sizeof(float)), 0);
    kv_backend_destroy(be);
    free(a), free(b), free(y);
}
END_TEST

Suite *suite_elementwise_ops(void)
{
    Suite *s = suite_create("elementwise");
    TCase *forward = op_tcase(s, "forward");
    tcase_add_test(forward, add_matches_reference_and_allows_aliasing);
    return s;
}
