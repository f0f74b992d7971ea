/* test_losses.c — the losses family (src/backend/backend.h, "Family
 * losses"): the pixel losses and the PatchGAN logit losses, values and
 * gradients, against their definitions. */
#include "op_test_util.h"

START_TEST(pixel_and_logit_losses_match_their_definitions)
{
    const size_t n = 2 * 3 * 4 * 5;
    test_rng rng = test_rng_new(1300);
    float *x = test_alloc(n), *xh = test_alloc(n), *g = test_alloc(n);
    test_fill(x, n, &rng, -1, 1);
    test_fill(xh, n, &rng, -1, 1);
    xh[3] = x[3]; /* sign(0) = 0 */
    kv_backend *be = op_backend(2);
    kv_tensor tx = op_tensor4(x, 2, 3, 4, 5), txh = op_tensor4(xh, 2, 3, 4, 5),
              tg = op_tensor4(g, 2, 3, 4, 5);
    double sum, want = 0;
    ck_assert_ok(be->ops->pixel_loss(be, &tx, &txh, KV_LOSS_L1, 0.5f, &sum, &tg));
    for (size_t i = 0; i < n; i++) {
        want += fabs((double)xh[i] - x[i]);
        float s = xh[i] > x[i] ? 0.5f : (xh[i] < x[i] ? -0.5f : 0.0f);
        ck_assert_float_eq(g[i], s);
    }
    ck_assert_double_le(fabs(sum - want), 1e-6 * want); /* differences taken in float */
    ck_assert_ok(be->ops->pixel_loss(be, &tx, &txh, KV_LOSS_L2, 0.5f, &sum, &tg));
    want = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)xh[i] - x[i];
        want += d * d;
        ck_assert_double_le(fabs(g[i] - d), 1e-6);
    }
    ck_assert_double_le(fabs(sum - want), 1e-6 * want);
    /* logits: values on both sides of the hinge and beyond softplus' threshold */
    float l[8] = {-2.5f, -1.0f, -0.3f, 0.0f, 0.7f, 1.0f, 1.5f, 25.0f}, gl[8];
    kv_tensor tl = op_tensor4(l, 2, 1, 2, 2), tgl = op_tensor4(gl, 2, 1, 2, 2);
    double mean;
    ck_assert_ok(be->ops->logit_loss(be, &tl, KV_LOGITS_HINGE_REAL, 2.0f, &mean, &tgl));
    ck_assert_double_le(fabs(mean - (3.5 + 2 + 1.3 + 1 + 0.3) / 8), 1e-7);
    ck_assert_float_eq(gl[5], 0.0f); /* exactly 1: relu'(0) = 0 */
    ck_assert_float_eq(gl[4], -0.25f);
    ck_assert_ok(be->ops->logit_loss(be, &tl, KV_LOGITS_HINGE_FAKE, 2.0f, &mean, &tgl));
    ck_assert_double_le(fabs(mean - (0 + 0 + 0.7 + 1 + 1.7 + 2 + 2.5 + 26) / 8), 1e-6);
    ck_assert_float_eq(gl[1], 0.0f); /* exactly -1 */
    ck_assert_float_eq(gl[2], 0.25f);
    ck_assert_ok(be->ops->logit_loss(be, &tl, KV_LOGITS_VANILLA_FAKE, 1.0f, &mean, &tgl));
    ck_assert_float_eq(gl[7], 0.125f); /* linear above 20 */
    ck_assert_double_le(fabs(gl[3] - 0.5 / 8), 1e-7);
    ck_assert_ok(be->ops->logit_loss(be, &tl, KV_LOGITS_GENERATOR, 1.0f, &mean, &tgl));
    ck_assert_double_le(fabs(mean + (-2.5 - 1 - 0.3 + 0 + 0.7 + 1 + 1.5 + 25) / 8), 1e-6);
    ck_assert_float_eq(gl[0], -0.125f);
    kv_backend_destroy(be);
    free(x), free(xh), free(g);
}
END_TEST

Suite *suite_losses_ops(void)
{
    Suite *s = suite_create("losses");
    TCase *training = op_tcase(s, "training");
    tcase_add_test(training, pixel_and_logit_losses_match_their_definitions);
    return s;
}
