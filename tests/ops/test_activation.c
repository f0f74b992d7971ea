/* test_activation.c — the activation family (src/backend/backend.h,
 * "Family activation"): the gradient of the piecewise-linear activations
 * against finite differences (op_test_util.h). */
#include "op_test_util.h"

/* ---- backward ---- */

typedef struct activation_grad_ctx {
    const op_unary_case *s;
    kv_activation act;
} activation_grad_ctx;

/* sum(r * act(x)) */
static double activation_loss(void *p)
{
    const activation_grad_ctx *a = p;
    double total = 0.0;
    for (size_t i = 0; i < a->s->nx; i++)
        total += op_activation_reference(a->act, a->s->xd[i]) * a->s->rd[i];
    return total;
}

START_TEST(activation_backward_matches_finite_differences)
{
    /* relu and leaky relu, the two activation_backward supports; dx is
     * computed from the forward's output y */
    const kv_activation act = _i == 0 ? KV_ACT_RELU : KV_ACT_LEAKY_RELU;
    op_unary_case s = op_unary_case_new(1002 + (uint64_t)_i, OP_OUTPUT_SAME);
    activation_grad_ctx ctx = {&s, act};
    kv_backend *be = op_backend(2);
    kv_tensor tx = op_tensor4(s.x, s.n, s.c, s.h, s.w), tdx = op_tensor4(s.dx, s.n, s.c, s.h, s.w);
    kv_tensor ty = op_tensor4(s.y, s.n, s.c, s.h, s.w), tr = op_tensor4(s.r, s.n, s.c, s.h, s.w);
    ck_assert_ok(be->ops->activation(be, &tx, act, &ty));
    ck_assert_ok(be->ops->activation_backward(be, &ty, &tr, act, &tdx));
    op_check_gradient(_i == 0 ? "relu" : "leaky relu", s.xd, s.nx, s.dx, activation_loss, &ctx);
    kv_backend_destroy(be);
    op_unary_case_free(&s);
}
END_TEST

Suite *suite_activation_ops(void)
{
    Suite *s = suite_create("activation");
    TCase *backward = op_tcase(s, "backward");
    tcase_add_loop_test(backward, activation_backward_matches_finite_differences, 0, 2);
    return s;
}
