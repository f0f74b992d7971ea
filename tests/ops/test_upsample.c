/* test_upsample.c — the upsample family (src/backend/backend.h, "Family
 * upsample"): nearest 2x upsampling repeats each pixel, and its backward
 * sums the four copies (against finite differences, op_test_util.h). */
#include "op_test_util.h"

/* ---- forward ---- */

START_TEST(upsample_nearest2x_repeats_each_pixel)
{
    const int n = 2, c = 3, h = 5, w = 7;
    test_rng rng = test_rng_new(400);
    float *x = test_alloc((size_t)n * c * h * w), *y = test_alloc((size_t)n * c * 4 * h * w);
    test_fill(x, (size_t)n * c * h * w, &rng, -1, 1);
    kv_backend *be = op_backend(2);
    kv_tensor tx = op_tensor4(x, n, c, h, w), ty = op_tensor4(y, n, c, 2 * h, 2 * w);
    ck_assert_ok(be->ops->upsample_nearest2x(be, &tx, &ty));
    for (int p = 0; p < n * c; p++)
        for (int r = 0; r < 2 * h; r++)
            for (int q = 0; q < 2 * w; q++)
                ck_assert_float_eq(y[((size_t)p * 2 * h + r) * 2 * w + q],
                                   x[((size_t)p * h + r / 2) * w + q / 2]);
    kv_backend_destroy(be);
    free(x), free(y);
}
END_TEST

/* ---- backward ---- */

/* sum(r * upsample(x)) */
static double upsample_loss(void *p)
{
    const op_unary_case *s = p;
    double total = 0.0;
    const int planes = s->n * s->c;
    for (int q = 0; q < planes; q++)
        for (int y = 0; y < 2 * s->h; y++)
            for (int x = 0; x < 2 * s->w; x++)
                total += s->xd[((size_t)q * s->h + y / 2) * s->w + x / 2] *
                         s->rd[((size_t)q * 2 * s->h + y) * 2 * s->w + x];
    return total;
}

START_TEST(upsample_nearest2x_backward_matches_finite_differences)
{
    op_unary_case s = op_unary_case_new(1000, OP_OUTPUT_DOUBLED);
    kv_backend *be = op_backend(2);
    kv_tensor tr = op_tensor4(s.r, s.n, s.c, 2 * s.h, 2 * s.w);
    kv_tensor tdx = op_tensor4(s.dx, s.n, s.c, s.h, s.w);
    ck_assert_ok(be->ops->upsample_nearest2x_backward(be, &tr, &tdx));
    op_check_gradient("upsample", s.xd, s.nx, s.dx, upsample_loss, &s);
    kv_backend_destroy(be);
    op_unary_case_free(&s);
}
END_TEST

Suite *suite_upsample_ops(void)
{
    Suite *s = suite_create("upsample");
    TCase *forward = op_tcase(s, "forward"), *backward = op_tcase(s, "backward");
    tcase_add_test(forward, upsample_nearest2x_repeats_each_pixel);
    tcase_add_test(backward, upsample_nearest2x_backward_matches_finite_differences);
    return s;
}
