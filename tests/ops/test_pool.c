/* test_pool.c — the pool family (src/backend/backend.h, "Family pool"):
 * 2x2 max pooling against a float64 loop on odd sizes (the last row and
 * column are dropped), its backward against finite differences
 * (op_test_util.h), and the backward's rule for ties. */
#include "op_test_util.h"

/* ---- forward ---- */

START_TEST(max_pool2x2_matches_float64_reference)
{
    /* odd sizes: the floor drops the last row and column of each plane */
    const int n = 3, c = 5, h = 9, w = 11, ho = h / 2, wo = w / 2;
    const size_t nx = (size_t)n * c * h * w, ny = (size_t)n * c * ho * wo;
    test_rng rng = test_rng_new(1600);
    float *x = test_alloc(nx), *y = test_alloc(ny);
    double *ref = op_dalloc(ny);
    test_fill(x, nx, &rng, -2, 2);
    for (int p = 0; p < n * c; p++)
        for (int r = 0; r < ho; r++)
            for (int q = 0; q < wo; q++) {
                double m = -INFINITY;
                for (int dy = 0; dy < 2; dy++)
                    for (int dx = 0; dx < 2; dx++)
                        m = fmax(m, x[((size_t)p * h + 2 * r + dy) * w + 2 * q + dx]);
                ref[((size_t)p * ho + r) * wo + q] = m;
            }
    kv_backend *be = op_backend(2);
    kv_tensor tx = op_tensor4(x, n, c, h, w), ty = op_tensor4(y, n, c, ho, wo);
    ck_assert_ok(be->ops->max_pool2x2(be, &tx, &ty));
    for (size_t i = 0; i < ny; i++) /* a maximum is one of the inputs: exact */
        ck_assert_msg(y[i] == ref[i], "element %zu: %.9g, want %.9g", i, (double)y[i], ref[i]);
    kv_backend_destroy(be);
    free(x), free(y), free(ref);
}
END_TEST

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

START_TEST(max_pool2x2_backward_routes_ties_to_the_first_maximum)
{
    /* Values from {0, 1, 2} make most windows tie; finite differences say
     * nothing there, so the rule of the specification is checked directly:
     * dy goes to the first maximum in row-major order, 0 elsewhere. */
    const int n = 2, c = 3, h = 7, w = 9, ho = h / 2, wo = w / 2;
    const size_t nx = (size_t)n * c * h * w, ny = (size_t)n * c * ho * wo;
    test_rng rng = test_rng_new(1601);
    float *x = test_alloc(nx), *dy = test_alloc(ny), *dx = test_alloc(nx);
    double *ref = op_dalloc(nx);
    for (size_t i = 0; i < nx; i++)
        x[i] = (float)(int)(3 * test_uniform(&rng));
    test_fill(dy, ny, &rng, 0.5f, 1.5f);
    test_fill(dx, nx, &rng, -9, 9); /* dx is overwritten */
    for (int p = 0; p < n * c; p++)
        for (int r = 0; r < ho; r++)
            for (int q = 0; q < wo; q++) {
                const size_t at = ((size_t)p * h + 2 * r) * w + 2 * q;
                const size_t window[4] = {at, at + 1, at + (size_t)w, at + (size_t)w + 1};
                size_t best = at;
                for (int k = 1; k < 4; k++)
                    if (x[window[k]] > x[best])
                        best = window[k];
                ref[best] += dy[((size_t)p * ho + r) * wo + q];
            }
    kv_backend *be = op_backend(2);
    kv_tensor tx = op_tensor4(x, n, c, h, w), tdy = op_tensor4(dy, n, c, ho, wo),
              tdx = op_tensor4(dx, n, c, h, w);
    ck_assert_ok(be->ops->max_pool2x2_backward(be, &tx, &tdy, &tdx));
    for (size_t i = 0; i < nx; i++)
        ck_assert_msg(dx[i] == ref[i], "element %zu: %.9g, want %.9g", i, (double)dx[i], ref[i]);
    kv_backend_destroy(be);
    free(x), free(dy), free(dx), free(ref);
}
END_TEST

Suite *suite_pool_ops(void)
{
    Suite *s = suite_create("pool");
    TCase *forward = op_tcase(s, "forward"), *backward = op_tcase(s, "backward");
    tcase_add_test(forward, max_pool2x2_matches_float64_reference);
    tcase_add_test(backward, max_pool2x2_backward_matches_finite_differences);
    tcase_add_test(backward, max_pool2x2_backward_routes_ties_to_the_first_maximum);
    return s;
}
