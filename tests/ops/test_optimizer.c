/* test_optimizer.c — the optimizer family (src/backend/backend.h, "Family
 * optimizer"): Adam against PyTorch's update computed in double over four
 * steps, and the sum of squares against a float64 loop. */
#include "op_test_util.h"

START_TEST(adam_follows_pytorch_update)
{
    const size_t n = 100;
    test_rng rng = test_rng_new(1500);
    float *p = test_alloc(n), *g = test_alloc(n), *m = test_alloc(n), *v = test_alloc(n);
    double *pd = op_dalloc(n), *md = op_dalloc(n), *vd = op_dalloc(n);
    op_fill_both(pd, p, n, &rng, -1, 1);
    kv_backend *be = op_backend(2);
    kv_tensor tp = op_tensor1(p, (int)n), tg = op_tensor1(g, (int)n), tm = op_tensor1(m, (int)n),
              tv = op_tensor1(v, (int)n);
    const double lr = 1e-2, b1 = 0.5, b2 = 0.9, eps = 1e-8;
    for (int step = 1; step <= 4; step++) {
        test_fill(g, n, &rng, -1, 1);
        g[7] = 0.0f; /* zero gradients leave the parameter alone */
        ck_assert_ok(be->ops->adam(be, &tp, &tg, &tm, &tv, (float)lr, (float)b1, (float)b2,
                                   (float)eps, step));
        for (size_t i = 0; i < n; i++) {
            md[i] = b1 * md[i] + (1 - b1) * g[i];
            vd[i] = b2 * vd[i] + (1 - b2) * (double)g[i] * g[i];
            double denom = sqrt(vd[i]) / sqrt(1 - pow(b2, step)) + eps;
            pd[i] -= lr / (1 - pow(b1, step)) * md[i] / denom;
        }
    }
    for (size_t i = 0; i < n; i++)
        ck_assert_double_le(fabs(p[i] - pd[i]), 1e-6);
    kv_backend_destroy(be);
    free(p), free(g), free(m), free(v), free(pd), free(md), free(vd);
}
END_TEST

START_TEST(sum_squares_matches_float64_reference)
{
    /* an odd count over more than three chunks of the CPU's split, whose
     * partial sums are combined in a fixed order: 1 and 2 threads agree to
     * the bit; and a tensor smaller than one chunk */
    const int n = 3, c = 5, h = 97, w = 151;
    const size_t count = (size_t)n * c * h * w;
    test_rng rng = test_rng_new(2200);
    float *x = test_alloc(count);
    test_fill(x, count, &rng, -3, 3);
    double want = 0.0, want_small = 0.0;
    for (size_t i = 0; i < count; i++)
        want += (double)x[i] * x[i];
    for (size_t i = 0; i < 7; i++)
        want_small += (double)x[i] * x[i];
    kv_backend *one = op_backend(1), *two = op_backend(2);
    kv_tensor tx = op_tensor4(x, n, c, h, w), small = op_tensor1(x, 7);
    double sum1 = 0.0, sum2 = 0.0, sum_small = 0.0;
    ck_assert_ok(two->ops->sum_squares(two, &tx, &sum2));
    ck_assert_ok(one->ops->sum_squares(one, &tx, &sum1));
    ck_assert_ok(two->ops->sum_squares(two, &small, &sum_small));
    ck_assert_msg(fabs(sum2 - want) <= 1e-12 * want, "sum %.17g, want %.17g", sum2, want);
    ck_assert_msg(sum1 == sum2, "1 and 2 threads differ: %.17g and %.17g", sum1, sum2);
    ck_assert_msg(fabs(sum_small - want_small) <= 1e-12 * want_small, "sum %.17g, want %.17g",
                  sum_small, want_small);
    kv_backend_destroy(one);
    kv_backend_destroy(two);
    free(x);
}
END_TEST

Suite *suite_optimizer_ops(void)
{
    Suite *s = suite_create("optimizer");
    TCase *training = op_tcase(s, "training");
    tcase_add_test(training, adam_follows_pytorch_update);
    tcase_add_test(training, sum_squares_matches_float64_reference);
    return s;
}
