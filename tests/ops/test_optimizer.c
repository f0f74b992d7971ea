/* test_optimizer.c — the optimizer family (src/backend/backend.h, "Family
 * optimizer"): Adam against PyTorch's update computed in double over four
 * steps. */
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

Suite *suite_optimizer_ops(void)
{
    Suite *s = suite_create("optimizer");
    TCase *training = op_tcase(s, "training");
    tcase_add_test(training, adam_follows_pytorch_update);
    return s;
}
