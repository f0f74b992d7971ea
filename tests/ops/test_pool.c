/* test_pool.c — the pool family (src/backend/backend.h, "Family pool"):
 * the backward of 2x2 max pooling against finite differences
 * (op_test_util.h). */
#include "op_test_util.h"

/* ---- backward ---- */

/* sum(r * max_pool(x)) */
static double max_pool_loss(void *p)
{
    const op_unary_case *s = p;
    double total = 0.0;
    const int planes = s->n * s->c;
    int ho = s->h / 2, wo = s->w / 2;
    for (int q = 0; q < planes; q++)
        for (int y = 0; y < ho; y++)
            for (int x = 0; x < wo; x++) {
                const double *a = s->xd + ((size_t)q * s->h + 2 * y) * s->w + 2 * x;
                double m = fmax(fmax(a[0], a[1]), fmax(a[s->w], a[s->w + 1]));
                total += m * s->rd[((size_t)q * ho + y) * wo + x];
            }
    return total;
}

START_TEST(max_pool2x2_backward_matches_finite_differences)
{
    op_unary_case s = op_unary_case_new(1001, OP_OUTPUT_HALVED);
    kv_backend *be = op_backend(2);
    kv_tensor tx = op_tensor4(s.x, s.n, s.c, s.h, s.w), tdx = op_tensor4(s.dx, s.n, s.c, s.h, s.w);
    kv_tensor tr = op_tensor4(s.r, s.n, s.c, s.h / 2, s.w / 2);
    ck_assert_ok(be->ops->max_pool2x2_backward(be, &tx, &tr, &tdx));
    op_check_gradient("max pool", s.xd, s.nx, s.dx, max_pool_loss, &s);
    kv_backend_destroy(be);
    op_unary_case_free(&s);
}
END_TEST

Suite *suite_pool_ops(void)
{
    Suite *s = suite_create("pool");
    TCase *backward = op_tcase(s, "backward");
    tcase_add_test(backward, max_pool2x2_backward_matches_finite_differences);
    return s;
}
