/* test_group_norm.c — the group_norm family (src/backend/backend.h,
 * "Family group_norm"): the statistics, the norm with every activation (in
 * place too) against float64 loops, a constant group, and the backward
 * against finite differences (op_test_util.h). */
#include "op_test_util.h"

/* ---- forward ---- */

START_TEST(group_norm_stats_give_scale_and_shift)
{
    const int n = 3, c = 8, h = 5, w = 9, groups = 2, cpg = c / groups;
    const size_t plane = (size_t)h * w, count = (size_t)n * c * plane;
    test_rng rng = test_rng_new(250);
    float *x = test_alloc(count), gamma[8], beta[8], scale[24], shift[24];
    for (size_t i = 0; i < count; i++)
        x[i] = (float)(-2.0 + 5.0 * test_uniform(&rng));
    test_fill(gamma, c, &rng, 0.5f, 1.5f);
    test_fill(beta, c, &rng, -0.5f, 0.5f);
    kv_backend *be = op_backend(2);
    kv_tensor tx = op_tensor4(x, n, c, h, w), tg = op_tensor1(gamma, c), tb = op_tensor1(beta, c);
    kv_tensor ts = op_tensor4(scale, n, c, 1, 1), tt = op_tensor4(shift, n, c, 1, 1);
    ck_assert_ok(be->ops->group_norm_stats(be, &tx, &tg, &tb, groups, 1e-6f, &ts, &tt, NULL, NULL));
    for (int b = 0; b < n; b++)
        for (int g = 0; g < groups; g++) {
            const float *xs = x + ((size_t)b * c + (size_t)g * cpg) * plane;
            double mean = 0, var = 0;
            for (size_t i = 0; i < cpg * plane; i++)
                mean += xs[i];
            mean /= (double)(cpg * plane);
            for (size_t i = 0; i < cpg * plane; i++)
                var += (xs[i] - mean) * (xs[i] - mean);
            var /= (double)(cpg * plane);
            for (int ch = g * cpg; ch < (g + 1) * cpg; ch++) {
                double s = gamma[ch] / sqrt(var + 1e-6), t = beta[ch] - s * mean;
                ck_assert_double_le(fabs(scale[b * c + ch] - s), 1e-6 * fabs(s));
                ck_assert_double_le(fabs(shift[b * c + ch] - t), 1e-6 * (1 + fabs(t)));
            }
        }
    kv_backend_destroy(be);
    free(x);
}
END_TEST

START_TEST(group_norm_matches_float64_reference)
{
    const kv_activation act = (kv_activation)(_i % 5);
    const bool in_place = _i >= 5;
    const int n = 2, c = 12, h = 5, w = 7, groups = 4, cpg = c / groups;
    const size_t count = (size_t)n * c * h * w, plane = (size_t)h * w;
    test_rng rng = test_rng_new(200 + (uint64_t)_i);
    float *x = test_alloc(count), *y = test_alloc(count), *gamma = test_alloc(c),
          *beta = test_alloc(c);
    double *ref = calloc(count, sizeof *ref);
    /* An offset mean and a spread per channel test the statistics. */
    for (size_t i = 0; i < count; i++)
        x[i] = 3.0f + 2.0f * (float)(test_uniform(&rng) * 2.0 - 1.0) * (float)(1 + (i / plane) % 3);
    test_fill(gamma, c, &rng, 0.5f, 1.5f);
    test_fill(beta, c, &rng, -0.5f, 0.5f);
    for (int b = 0; b < n; b++)
        for (int g = 0; g < groups; g++) {
            const float *xs = x + ((size_t)b * c + (size_t)g * cpg) * plane;
            double mean = 0, var = 0;
            for (size_t i = 0; i < cpg * plane; i++)
                mean += xs[i];
            mean /= (double)(cpg * plane);
            for (size_t i = 0; i < cpg * plane; i++)
                var += (xs[i] - mean) * (xs[i] - mean);
            var /= (double)(cpg * plane); /* biased */
            for (int ch = g * cpg; ch < (g + 1) * cpg; ch++)
                for (size_t i = 0; i < plane; i++) {
                    size_t at = ((size_t)b * c + ch) * plane + i;
                    double v = (x[at] - mean) / sqrt(var + 1e-6) * gamma[ch] + beta[ch];
                    ref[at] = op_activation_reference(act, v);
                }
        }
    kv_backend *be = op_backend(2);
    kv_tensor tx = op_tensor4(x, n, c, h, w), ty = op_tensor4(in_place ? x : y, n, c, h, w);
    kv_tensor tg = op_tensor1(gamma, c), tb = op_tensor1(beta, c);
    ck_assert_ok(be->ops->group_norm(be, &tx, &tg, &tb, groups, 1e-6f, act, &ty));
    double err = op_relative_error(in_place ? x : y, ref, count);
    ck_assert_msg(err < OP_TOLERANCE, "activation %d%s: relative error %g", (int)act,
                  in_place ? " in place" : "", err);
    kv_backend_destroy(be);
    free(x), free(y), free(gamma), free(beta), free(ref);
}
END_TEST

START_TEST(group_norm_of_constant_group_is_beta)
{
    /* var = 0: y = beta exactly, no NaN from 0/0. */
    const int n = 1, c = 4, h = 3, w = 3;
    float x[36], y[36], gamma[4] = {1, 2, 3, 4}, beta[4] = {0.5f, -1, 2, 0};
    for (int i = 0; i < 36; i++)
        x[i] = 7.25f;
    kv_backend *be = op_backend(1);
    kv_tensor tx = op_tensor4(x, n, c, h, w), ty = op_tensor4(y, n, c, h, w);
    kv_tensor tg = op_tensor1(gamma, c), tb = op_tensor1(beta, c);
    ck_assert_ok(be->ops->group_norm(be, &tx, &tg, &tb, 2, 1e-6f, KV_ACT_NONE, &ty));
    for (int i = 0; i < 36; i++)
        ck_assert_float_eq_tol(y[i], beta[i / 9], 1e-6f);
    kv_backend_destroy(be);
}
END_TEST

/* ---- backward ---- */

typedef struct gn_ctx {
    int n, c, hw, groups;
    kv_activation act;
    double *x, *gamma, *beta, *r;
} gn_ctx;

static double gn_loss(void *p)
{
    gn_ctx *g = p;
    int cpg = g->c / g->groups;
    double total = 0.0;
    for (int n = 0; n < g->n; n++)
        for (int k = 0; k < g->groups; k++) {
            const double *x = g->x + ((size_t)n * g->c + (size_t)k * cpg) * g->hw;
            double mean = 0, var = 0;
            for (int i = 0; i < cpg * g->hw; i++)
                mean += x[i];
            mean /= cpg * g->hw;
            for (int i = 0; i < cpg * g->hw; i++)
                var += (x[i] - mean) * (x[i] - mean);
            var /= cpg * g->hw;
            for (int ch = 0; ch < cpg; ch++)
                for (int i = 0; i < g->hw; i++) {
                    int c = k * cpg + ch;
                    double u = (x[ch * g->hw + i] - mean) / sqrt(var + 1e-6) * g->gamma[c] + g->beta[c];
                    total += op_activation_reference(g->act, u) *
                             g->r[((size_t)n * g->c + c) * g->hw + i];
                }
        }
    return total;
}

START_TEST(group_norm_backward_matches_finite_differences)
{
    static const kv_activation acts[] = {KV_ACT_NONE, KV_ACT_SILU, KV_ACT_GELU, KV_ACT_MISH};
    gn_ctx g = {2, 6, 5 * 7, 3, acts[_i], NULL, NULL, NULL, NULL};
    size_t n = (size_t)g.n * g.c * g.hw;
    test_rng rng = test_rng_new(800 + (uint64_t)_i);
    float *x = test_alloc(n), *r = test_alloc(n), gamma[6], beta[6];
    g.x = op_dalloc(n), g.r = op_dalloc(n), g.gamma = op_dalloc(6), g.beta = op_dalloc(6);
    op_fill_both(g.x, x, n, &rng, -2, 3);
    op_fill_both(g.r, r, n, &rng, -1, 1);
    op_fill_both(g.gamma, gamma, 6, &rng, 0.5, 1.5);
    op_fill_both(g.beta, beta, 6, &rng, -0.5, 0.5);
    float scale[12], shift[12], mean[6], rstd[6], dgamma[6] = {0}, dbeta[6] = {0};
    float *dx = test_alloc(n);
    kv_backend *be = op_backend(2);
    kv_tensor tx = op_tensor4(x, g.n, g.c, 5, 7), tg = op_tensor1(gamma, 6),
              tb = op_tensor1(beta, 6);
    kv_tensor ts = op_tensor4(scale, g.n, g.c, 1, 1), tt = op_tensor4(shift, g.n, g.c, 1, 1);
    kv_tensor tm = op_tensor4(mean, g.n, g.groups, 1, 1),
              trs = op_tensor4(rstd, g.n, g.groups, 1, 1);
    kv_tensor tr = op_tensor4(r, g.n, g.c, 5, 7), tdx = op_tensor4(dx, g.n, g.c, 5, 7);
    kv_tensor tdg = op_tensor1(dgamma, 6), tdb = op_tensor1(dbeta, 6);
    ck_assert_ok(
        be->ops->group_norm_stats(be, &tx, &tg, &tb, g.groups, 1e-6f, &ts, &tt, &tm, &trs));
    ck_assert_ok(be->ops->group_norm_backward(be, &tx, &tg, &ts, &tt, &tm, &trs, g.groups, g.act,
                                              &tr, &tdx, &tdg, &tdb));
    op_check_gradient("group norm dx", g.x, n, dx, gn_loss, &g);
    op_check_gradient("group norm dgamma", g.gamma, 6, dgamma, gn_loss, &g);
    op_check_gradient("group norm dbeta", g.beta, 6, dbeta, gn_loss, &g);
    kv_backend_destroy(be);
    free(x), free(r), free(dx), free(g.x), free(g.r), free(g.gamma), free(g.beta);
}
END_TEST

Suite *suite_group_norm_ops(void)
{
    Suite *s = suite_create("group_norm");
    TCase *forward = op_tcase(s, "forward"), *backward = op_tcase(s, "backward");
    tcase_add_test(forward, group_norm_stats_give_scale_and_shift);
    tcase_add_loop_test(forward, group_norm_matches_float64_reference, 0, 10);
    tcase_add_test(forward, group_norm_of_constant_group_is_beta);
    tcase_add_loop_test(backward, group_norm_backward_matches_finite_differences, 0, 4);
    return s;
}
