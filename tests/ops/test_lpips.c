/* test_lpips.c — the lpips family (src/backend/backend.h, "Family lpips"):
 * the unit normalisation over channels against a float64 loop, its
 * backward against finite differences (op_test_util.h) and at a zero
 * vector, and the weighted distance with its gradient and dropout. */
#include "op_test_util.h"

/* ---- forward ---- */

START_TEST(unit_normalize_matches_float64_reference)
{
    const int n = 3, c = 5, h = 7, w = 9;
    const size_t plane = (size_t)h * w, count = (size_t)n * c * plane;
    test_rng rng = test_rng_new(2000);
    float *x = test_alloc(count), *y = test_alloc(count), *norms = test_alloc((size_t)n * plane);
    double *ref = op_dalloc(count), *ref_norms = op_dalloc((size_t)n * plane);
    test_fill(x, count, &rng, -3, 3);
    for (int b = 0; b < n; b++)
        for (size_t p = 0; p < plane; p++) {
            double ss = 0.0;
            for (int ch = 0; ch < c; ch++) {
                double v = x[((size_t)b * c + ch) * plane + p];
                ss += v * v;
            }
            double r = sqrt(ss);
            ref_norms[(size_t)b * plane + p] = r;
            for (int ch = 0; ch < c; ch++) {
                size_t at = ((size_t)b * c + ch) * plane + p;
                ref[at] = x[at] / (r + 1e-10);
            }
        }
    kv_backend *be = op_backend(2);
    kv_tensor tx = op_tensor4(x, n, c, h, w), ty = op_tensor4(y, n, c, h, w);
    kv_tensor tn = op_tensor4(norms, n, 1, h, w);
    ck_assert_ok(be->ops->unit_normalize(be, &tx, &ty, &tn));
    double err = op_relative_error(y, ref, count);
    ck_assert_msg(err < OP_TOLERANCE, "y: relative error %g", err);
    err = op_relative_error(norms, ref_norms, (size_t)n * plane);
    ck_assert_msg(err < OP_TOLERANCE, "norms: relative error %g", err);
    kv_backend_destroy(be);
    free(x), free(y), free(norms), free(ref), free(ref_norms);
}
END_TEST

/* ---- backward ---- */

/* sum(r * unit_normalize(x)) */
static double unit_normalize_loss(void *p)
{
    const op_unary_case *s = p;
    double total = 0.0;
    size_t plane = (size_t)s->h * s->w;
    for (int n = 0; n < s->n; n++)
        for (size_t p = 0; p < plane; p++) {
            double ss = 0;
            for (int c = 0; c < s->c; c++)
                ss += s->xd[((size_t)n * s->c + c) * plane + p] *
                      s->xd[((size_t)n * s->c + c) * plane + p];
            double inv = 1.0 / (sqrt(ss) + 1e-10);
            for (int c = 0; c < s->c; c++)
                total += s->xd[((size_t)n * s->c + c) * plane + p] * inv *
                         s->rd[((size_t)n * s->c + c) * plane + p];
        }
    return total;
}

START_TEST(unit_normalize_backward_matches_finite_differences)
{
    op_unary_case s = op_unary_case_new(1004, OP_OUTPUT_SAME);
    kv_backend *be = op_backend(2);
    kv_tensor tx = op_tensor4(s.x, s.n, s.c, s.h, s.w), tdx = op_tensor4(s.dx, s.n, s.c, s.h, s.w);
    kv_tensor ty = op_tensor4(s.y, s.n, s.c, s.h, s.w), tr = op_tensor4(s.r, s.n, s.c, s.h, s.w);
    kv_tensor tn = op_tensor4(s.norms, s.n, 1, s.h, s.w);
    ck_assert_ok(be->ops->unit_normalize(be, &tx, &ty, &tn));
    ck_assert_ok(be->ops->unit_normalize_backward(be, &tx, &tn, &tr, &tdx));
    op_check_gradient("unit normalize", s.xd, s.nx, s.dx, unit_normalize_loss, &s);
    kv_backend_destroy(be);
    op_unary_case_free(&s);
}
END_TEST

START_TEST(unit_normalize_gradient_is_zero_for_a_zero_vector)
{
    /* PyTorch gives NaN here; libklvae gives 0. */
    float x[2 * 3 * 2] = {0, 1, 0, -2, 0, 0.5f, 0, 1, 0, 3, 0, -1}; /* pixel 0 all zero */
    float y[12], norms[4], dy[12], dx[12];
    for (int i = 0; i < 12; i++)
        dy[i] = 1.0f + (float)i;
    kv_backend *be = op_backend(2);
    kv_tensor tx = op_tensor4(x, 2, 3, 1, 2), ty = op_tensor4(y, 2, 3, 1, 2),
              tn = op_tensor4(norms, 2, 1, 1, 2);
    kv_tensor tdy = op_tensor4(dy, 2, 3, 1, 2), tdx = op_tensor4(dx, 2, 3, 1, 2);
    ck_assert_ok(be->ops->unit_normalize(be, &tx, &ty, &tn));
    ck_assert_ok(be->ops->unit_normalize_backward(be, &tx, &tn, &tdy, &tdx));
    for (int n = 0; n < 2; n++)
        for (int c = 0; c < 3; c++) {
            ck_assert(isfinite(dx[(n * 3 + c) * 2 + 1]));
            ck_assert_float_eq(dx[(n * 3 + c) * 2 + 0], 0.0f);
            ck_assert_float_eq(y[(n * 3 + c) * 2 + 0], 0.0f);
        }
    kv_backend_destroy(be);
}
END_TEST

/* ---- LPIPS distance ---- */

typedef struct lpips_ctx {
    int n, c, hw;
    double *a, *b, *w;
    const float *gscale;
} lpips_ctx;

static double lpips_loss(void *p)
{
    lpips_ctx *l = p;
    double total = 0.0;
    for (int n = 0; n < l->n; n++) {
        double v = 0;
        for (int c = 0; c < l->c; c++)
            for (int i = 0; i < l->hw; i++) {
                size_t at = ((size_t)n * l->c + c) * l->hw + i;
                double d = l->a[at] - l->b[at];
                v += l->w[c] * d * d;
            }
        total += l->gscale[n] * v / l->hw;
    }
    return total;
}

START_TEST(lpips_distance_matches_definition_and_gradient)
{
    const int n = 2, c = 4, h = 3, w = 5;
    const size_t count = (size_t)n * c * h * w;
    test_rng rng = test_rng_new(1100);
    float *a = test_alloc(count), *b = test_alloc(count), *db = test_alloc(count), wl[4];
    lpips_ctx l = {n, c, h * w, op_dalloc(count), op_dalloc(count), op_dalloc(4), NULL};
    op_fill_both(l.a, a, count, &rng, -1, 1);
    op_fill_both(l.b, b, count, &rng, -1, 1);
    op_fill_both(l.w, wl, 4, &rng, 0.1, 1);
    const float gscale[2] = {0.7f, -1.3f};
    l.gscale = gscale;
    double values[2];
    kv_backend *be = op_backend(2);
    kv_tensor ta = op_tensor4(a, n, c, h, w), tb = op_tensor4(b, n, c, h, w),
              tw = op_tensor4(wl, 1, c, 1, 1), tdb = op_tensor4(db, n, c, h, w);
    ck_assert_ok(be->ops->lpips_distance(be, &ta, &tb, &tw, 0.0f, 0, 0, values, gscale, &tdb));
    for (int k = 0; k < n; k++) {
        lpips_ctx one = l;
        float unit[2] = {0, 0};
        unit[k] = 1.0f;
        one.gscale = unit;
        ck_assert_double_le(fabs(values[k] - lpips_loss(&one)), 1e-6 * fabs(values[k]));
    }
    op_check_gradient("lpips db", l.b, count, db, lpips_loss, &l);
    /* dropout: about half the terms vanish, the rest double; same seed, same mask */
    double dropped[2], again[2];
    ck_assert_ok(be->ops->lpips_distance(be, &ta, &tb, &tw, 0.5f, 42, 0, dropped, NULL, NULL));
    ck_assert_ok(be->ops->lpips_distance(be, &ta, &tb, &tw, 0.5f, 42, 0, again, NULL, NULL));
    ck_assert_double_eq(dropped[0], again[0]);
    ck_assert_double_ne(dropped[0], values[0]);
    ck_assert_double_lt(fabs(dropped[0] / values[0] - 1.0), 0.6);
    /* image 1 alone, placed by first after image 0, draws the whole batch's
     * mask for image 1 (and another one without first) */
    const size_t image = (size_t)c * h * w;
    kv_tensor ta1 = op_tensor4(a + image, 1, c, h, w), tb1 = op_tensor4(b + image, 1, c, h, w);
    double alone;
    ck_assert_ok(be->ops->lpips_distance(be, &ta1, &tb1, &tw, 0.5f, 42, image, &alone, NULL, NULL));
    ck_assert_double_eq(alone, dropped[1]);
    ck_assert_ok(be->ops->lpips_distance(be, &ta1, &tb1, &tw, 0.5f, 42, 0, &alone, NULL, NULL));
    ck_assert_double_ne(alone, dropped[1]);
    kv_backend_destroy(be);
    free(a), free(b), free(db), free(l.a), free(l.b), free(l.w);
}
END_TEST

Suite *suite_lpips_ops(void)
{
    Suite *s = suite_create("lpips");
    TCase *forward = op_tcase(s, "forward"), *backward = op_tcase(s, "backward");
    tcase_add_test(forward, unit_normalize_matches_float64_reference);
    tcase_add_test(backward, unit_normalize_backward_matches_finite_differences);
    tcase_add_test(backward, unit_normalize_gradient_is_zero_for_a_zero_vector);
    tcase_add_test(backward, lpips_distance_matches_definition_and_gradient);
    return s;
}
