/* test_batch_norm.c — the batch_norm family (src/backend/backend.h,
 * "Family batch_norm"): training-mode batch normalisation (output, saved
 * statistics, running statistics) against a float64 loop, and its backward
 * against finite differences (op_test_util.h). */
#include "op_test_util.h"

/* ---- forward ---- */

START_TEST(batch_norm_matches_float64_reference)
{
    const int n = 3, c = 5, h = 7, w = 9;
    const size_t plane = (size_t)h * w, count = (size_t)n * c * plane;
    const double cnt = (double)n * (double)plane;
    const float eps = 1e-5f, momentum = 0.3f;
    test_rng rng = test_rng_new(2100);
    float *x = test_alloc(count), *y = test_alloc(count);
    float gamma[5], beta[5], mean[5], invstd[5], rmean[5], rvar[5];
    double *ref = op_dalloc(count), ref_mean[5], ref_invstd[5], ref_rmean[5], ref_rvar[5];
    test_fill(x, count, &rng, -2, 2);
    for (size_t i = 0; i < count; i++) /* a different mean and spread per channel */
        x[i] = x[i] * (float)(1 + i / plane % 3) + (float)(i / plane % (size_t)c) - 2.0f;
    test_fill(gamma, c, &rng, 0.5f, 1.5f);
    test_fill(beta, c, &rng, -0.5f, 0.5f);
    test_fill(rmean, c, &rng, -1, 1);
    test_fill(rvar, c, &rng, 0.5f, 2);
    for (int ch = 0; ch < c; ch++) {
        double sum = 0, var = 0;
        for (int b = 0; b < n; b++)
            for (size_t i = 0; i < plane; i++)
                sum += x[((size_t)b * c + ch) * plane + i];
        double m = sum / cnt;
        for (int b = 0; b < n; b++)
            for (size_t i = 0; i < plane; i++)
                var += pow(x[((size_t)b * c + ch) * plane + i] - m, 2);
        var /= cnt; /* biased for the output, unbiased for the running variance */
        ref_mean[ch] = m;
        ref_invstd[ch] = 1.0 / sqrt(var + eps);
        ref_rmean[ch] = (1 - momentum) * (double)rmean[ch] + momentum * m;
        ref_rvar[ch] = (1 - momentum) * (double)rvar[ch] + momentum * var * cnt / (cnt - 1);
        for (int b = 0; b < n; b++)
            for (size_t i = 0; i < plane; i++) {
                size_t at = ((size_t)b * c + ch) * plane + i;
                ref[at] = (x[at] - m) * ref_invstd[ch] * gamma[ch] + beta[ch];
            }
    }
    kv_backend *be = op_backend(2);
    kv_tensor tx = op_tensor4(x, n, c, h, w), ty = op_tensor4(y, n, c, h, w);
    kv_tensor tg = op_tensor1(gamma, c), tb = op_tensor1(beta, c), tm = op_tensor1(mean, c),
              ti = op_tensor1(invstd, c);
    double sums[10];
    ck_assert_ok(be->ops->batch_norm_stats(be, &tx, sums));
    ck_assert_ok(be->ops->batch_norm(be, &tx, &tg, &tb, sums, cnt, eps, momentum, rmean, rvar, &ty,
                                     &tm, &ti));
    double err = op_relative_error(y, ref, count);
    ck_assert_msg(err < OP_TOLERANCE, "y: relative error %g", err);
    err = op_relative_error(mean, ref_mean, (size_t)c);
    ck_assert_msg(err < OP_TOLERANCE, "mean: relative error %g", err);
    err = op_relative_error(invstd, ref_invstd, (size_t)c);
    ck_assert_msg(err < OP_TOLERANCE, "invstd: relative error %g", err);
    err = op_relative_error(rmean, ref_rmean, (size_t)c);
    ck_assert_msg(err < OP_TOLERANCE, "running mean: relative error %g", err);
    err = op_relative_error(rvar, ref_rvar, (size_t)c);
    ck_assert_msg(err < OP_TOLERANCE, "running variance: relative error %g", err);
    kv_backend_destroy(be);
    free(x), free(y), free(ref);
}
END_TEST

/* ---- backward ---- */

typedef struct bn_ctx {
    int n, c, hw;
    double *x, *gamma, *beta, *r;
} bn_ctx;

static double bn_loss(void *p)
{
    bn_ctx *b = p;
    double total = 0.0;
    for (int c = 0; c < b->c; c++) {
        double mean = 0, var = 0;
        for (int n = 0; n < b->n; n++)
            for (int i = 0; i < b->hw; i++)
                mean += b->x[((size_t)n * b->c + c) * b->hw + i];
        mean /= b->n * b->hw;
        for (int n = 0; n < b->n; n++)
            for (int i = 0; i < b->hw; i++) {
                double d = b->x[((size_t)n * b->c + c) * b->hw + i] - mean;
                var += d * d;
            }
        var /= b->n * b->hw;
        for (int n = 0; n < b->n; n++)
            for (int i = 0; i < b->hw; i++) {
                size_t at = ((size_t)n * b->c + c) * b->hw + i;
                double y = (b->x[at] - mean) / sqrt(var + 1e-5) * b->gamma[c] + b->beta[c];
                total += y * b->r[at];
            }
    }
    return total;
}

START_TEST(batch_norm_backward_matches_finite_differences)
{
    bn_ctx b = {3, 4, 2 * 5, NULL, NULL, NULL, NULL};
    size_t n = (size_t)b.n * b.c * b.hw;
    test_rng rng = test_rng_new(1200);
    float *x = test_alloc(n), *r = test_alloc(n), *y = test_alloc(n), *dx = test_alloc(n);
    float gamma[4], beta[4], mean[4], invstd[4], dgamma[4] = {0}, dbeta[4] = {0};
    float rmean[4] = {0, 0, 0, 0}, rvar[4] = {1, 1, 1, 1};
    b.x = op_dalloc(n), b.r = op_dalloc(n), b.gamma = op_dalloc(4), b.beta = op_dalloc(4);
    op_fill_both(b.x, x, n, &rng, -2, 3);
    op_fill_both(b.r, r, n, &rng, -1, 1);
    op_fill_both(b.gamma, gamma, 4, &rng, 0.5, 1.5);
    op_fill_both(b.beta, beta, 4, &rng, -0.5, 0.5);
    kv_backend *be = op_backend(2);
    kv_tensor tx = op_tensor4(x, 3, 4, 2, 5), ty = op_tensor4(y, 3, 4, 2, 5),
              tr = op_tensor4(r, 3, 4, 2, 5), tdx = op_tensor4(dx, 3, 4, 2, 5);
    kv_tensor tg = op_tensor1(gamma, 4), tb = op_tensor1(beta, 4), tm = op_tensor1(mean, 4),
              ti = op_tensor1(invstd, 4), tdg = op_tensor1(dgamma, 4), tdb = op_tensor1(dbeta, 4);
    double sums[8], dsums[8];
    ck_assert_ok(be->ops->batch_norm_stats(be, &tx, sums));
    ck_assert_ok(be->ops->batch_norm(be, &tx, &tg, &tb, sums, 30.0, 1e-5f, 0.1f, rmean, rvar, &ty,
                                     &tm, &ti));
    ck_assert_ok(be->ops->batch_norm_backward_stats(be, &tx, &tm, &ti, &tr, dsums, &tdg, &tdb));
    ck_assert_ok(be->ops->batch_norm_backward(be, &tx, &tg, &tm, &ti, &tr, dsums, 30.0, &tdx));
    op_check_gradient("batch norm dx", b.x, n, dx, bn_loss, &b);
    op_check_gradient("batch norm dgamma", b.gamma, 4, dgamma, bn_loss, &b);
    op_check_gradient("batch norm dbeta", b.beta, 4, dbeta, bn_loss, &b);
    /* running statistics: momentum 0.1 towards the mean and the unbiased variance */
    for (int c = 0; c < 4; c++) {
        double m = 0, v = 0;
        for (int k = 0; k < 3; k++)
            for (int i = 0; i < 10; i++)
                m += b.x[((size_t)k * 4 + c) * 10 + i];
        m /= 30;
        for (int k = 0; k < 3; k++)
            for (int i = 0; i < 10; i++)
                v += pow(b.x[((size_t)k * 4 + c) * 10 + i] - m, 2);
        ck_assert_double_le(fabs(rmean[c] - 0.1 * m), 1e-6);
        ck_assert_double_le(fabs(rvar[c] - (0.9 + 0.1 * v / 29)), 1e-6);
        ck_assert_double_le(fabs(y[c * 10] - ((x[c * 10] - m) / sqrt(v / 30 + 1e-5) * gamma[c] + beta[c])), 1e-5);
    }
    kv_backend_destroy(be);
    free(x), free(r), free(y), free(dx), free(b.x), free(b.r), free(b.gamma), free(b.beta);
}
END_TEST

/* Data-parallel use: the batch in two parts, each part's sums added before
 * they are used, gives every output of the whole batch (y, saved and
 * running statistics, dx), and the parts' dgamma and dbeta add up to the
 * whole batch's. */
START_TEST(batch_norm_sums_of_parts_give_the_whole_batch)
{
    enum { N = 5, C = 3, H = 4, W = 6, FIRST = 2 };
    const size_t plane = (size_t)H * W, count = (size_t)N * C * plane;
    const size_t first = (size_t)FIRST * C * plane;
    test_rng rng = test_rng_new(2101);
    float *x = test_alloc(count), *dy = test_alloc(count);
    float *y_whole = test_alloc(count), *y_parts = test_alloc(count);
    float *dx_whole = test_alloc(count), *dx_parts = test_alloc(count);
    test_fill(x, count, &rng, -2, 3);
    test_fill(dy, count, &rng, -1, 1);
    float gamma[C], beta[C];
    test_fill(gamma, C, &rng, 0.5f, 1.5f);
    test_fill(beta, C, &rng, -0.5f, 0.5f);
    kv_backend *be = op_backend(2);
    kv_tensor tg = op_tensor1(gamma, C), tb = op_tensor1(beta, C);

    /* the whole batch */
    float mean[C], invstd[C], rm[C] = {0}, rv[C] = {1, 1, 1}, dg[C] = {0}, db[C] = {0};
    kv_tensor tm = op_tensor1(mean, C), ti = op_tensor1(invstd, C);
    kv_tensor tdg = op_tensor1(dg, C), tdb = op_tensor1(db, C);
    kv_tensor tx = op_tensor4(x, N, C, H, W), ty = op_tensor4(y_whole, N, C, H, W),
              tdy = op_tensor4(dy, N, C, H, W), tdx = op_tensor4(dx_whole, N, C, H, W);
    double sums[2 * C], dsums[2 * C];
    ck_assert_ok(be->ops->batch_norm_stats(be, &tx, sums));
    ck_assert_ok(be->ops->batch_norm(be, &tx, &tg, &tb, sums, (double)N * plane, 1e-5f, 0.1f, rm,
                                     rv, &ty, &tm, &ti));
    ck_assert_ok(be->ops->batch_norm_backward_stats(be, &tx, &tm, &ti, &tdy, dsums, &tdg, &tdb));
    ck_assert_ok(be->ops->batch_norm_backward(be, &tx, &tg, &tm, &ti, &tdy, dsums,
                                              (double)N * plane, &tdx));

    /* the parts: images [0, FIRST) and [FIRST, N), as two processes */
    float pmean[2][C], pinvstd[2][C], prm[2][C] = {{0}}, prv[2][C] = {{1, 1, 1}, {1, 1, 1}};
    float pdg[2][C] = {{0}}, pdb[2][C] = {{0}};
    double psums[2][2 * C], pdsums[2][2 * C], added[2 * C], dadded[2 * C];
    kv_tensor px[2], py[2], pdy[2], pdx[2], pm[2], pi[2], pdgt[2], pdbt[2];
    const int part_n[2] = {FIRST, N - FIRST};
    const size_t at[2] = {0, first};
    for (int p = 0; p < 2; p++) {
        px[p] = op_tensor4(x + at[p], part_n[p], C, H, W);
        py[p] = op_tensor4(y_parts + at[p], part_n[p], C, H, W);
        pdy[p] = op_tensor4(dy + at[p], part_n[p], C, H, W);
        pdx[p] = op_tensor4(dx_parts + at[p], part_n[p], C, H, W);
        pm[p] = op_tensor1(pmean[p], C);
        pi[p] = op_tensor1(pinvstd[p], C);
        pdgt[p] = op_tensor1(pdg[p], C);
        pdbt[p] = op_tensor1(pdb[p], C);
        ck_assert_ok(be->ops->batch_norm_stats(be, &px[p], psums[p]));
    }
    for (int k = 0; k < 2 * C; k++)
        added[k] = psums[0][k] + psums[1][k];
    for (int p = 0; p < 2; p++) {
        ck_assert_ok(be->ops->batch_norm(be, &px[p], &tg, &tb, added, (double)N * plane, 1e-5f,
                                         0.1f, prm[p], prv[p], &py[p], &pm[p], &pi[p]));
        ck_assert_ok(be->ops->batch_norm_backward_stats(be, &px[p], &pm[p], &pi[p], &pdy[p],
                                                        pdsums[p], &pdgt[p], &pdbt[p]));
    }
    for (int k = 0; k < 2 * C; k++)
        dadded[k] = pdsums[0][k] + pdsums[1][k];
    for (int p = 0; p < 2; p++)
        ck_assert_ok(be->ops->batch_norm_backward(be, &px[p], &tg, &pm[p], &pi[p], &pdy[p], dadded,
                                                  (double)N * plane, &pdx[p]));
    /* the sums differ from the whole batch's only in the order of addition */
    double ydiff = 0, dxdiff = 0, ymax = 0, dxmax = 0;
    for (size_t i = 0; i < count; i++) {
        ydiff = fmax(ydiff, fabs(y_parts[i] - y_whole[i]));
        dxdiff = fmax(dxdiff, fabs(dx_parts[i] - dx_whole[i]));
        ymax = fmax(ymax, fabs(y_whole[i]));
        dxmax = fmax(dxmax, fabs(dx_whole[i]));
    }
    ck_assert_msg(ydiff <= 1e-6 * ymax, "y of the parts differs by %g", ydiff);
    ck_assert_msg(dxdiff <= 1e-6 * dxmax, "dx of the parts differs by %g", dxdiff);
    for (int c = 0; c < C; c++)
        for (int p = 0; p < 2; p++) {
            ck_assert_float_eq_tol(pmean[p][c], mean[c], 1e-6f);
            ck_assert_float_eq_tol(pinvstd[p][c], invstd[c], 1e-6f * invstd[c]);
            ck_assert_float_eq_tol(prm[p][c], rm[c], 1e-6f);
            ck_assert_float_eq_tol(prv[p][c], rv[c], 1e-6f);
            ck_assert_float_eq_tol(pdg[0][c] + pdg[1][c], dg[c], 1e-5f);
            ck_assert_float_eq_tol(pdb[0][c] + pdb[1][c], db[c], 1e-5f);
        }
    /* and a part's own statistics are not the whole batch's (the test can fail) */
    ck_assert_ok(be->ops->batch_norm(be, &px[0], &tg, &tb, psums[0], (double)FIRST * plane, 1e-5f,
                                     0.1f, NULL, NULL, &py[0], &pm[0], &pi[0]));
    ck_assert_double_gt(fabs(pmean[0][0] - mean[0]) + fabs(pmean[0][1] - mean[1]), 1e-3);
    kv_backend_destroy(be);
    free(x), free(dy), free(y_whole), free(y_parts), free(dx_whole), free(dx_parts);
}
END_TEST

Suite *suite_batch_norm_ops(void)
{
    Suite *s = suite_create("batch_norm");
    TCase *forward = op_tcase(s, "forward"), *backward = op_tcase(s, "backward");
    tcase_add_test(forward, batch_norm_matches_float64_reference);
    tcase_add_test(backward, batch_norm_backward_matches_finite_differences);
    tcase_add_test(backward, batch_norm_sums_of_parts_give_the_whole_batch);
    return s;
}
