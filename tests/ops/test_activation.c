/* test_activation.c — the activation family (src/backend/backend.h,
 * "Family activation"): every activation on its own against a float64
 * loop (in place too), and the gradient of the piecewise-linear ones
 * against finite differences (op_test_util.h). */
#include "op_test_util.h"

/* ---- forward ---- */

START_TEST(activation_matches_float64_reference)
{
    /* every kv_activation, out of place (_i < 6) and in place; more values
     * than one chunk of the CPU's split, some beyond Mish's threshold of 20 */
    const kv_activation act = (kv_activation)(_i % 6);
    const bool in_place = _i >= 6;
    const int n = 2, c = 3, h = 101, w = 113;
    const size_t count = (size_t)n * c * h * w;
    test_rng rng = test_rng_new(1700 + (uint64_t)_i);
    float *x = test_alloc(count), *y = test_alloc(count), *y1 = test_alloc(count);
    double *ref = op_dalloc(count);
    test_fill(x, count, &rng, -6, 6);
    for (size_t i = 0; i < count; i += 997)
        x[i] = i % 2 ? 25.0f : -25.0f;
    for (size_t i = 0; i < count; i++)
        ref[i] = op_activation_reference(act, x[i]);
    kv_backend *two = op_backend(2);
    kv_tensor tx = op_tensor4(x, n, c, h, w), ty = op_tensor4(in_place ? x : y, n, c, h, w);
    ck_assert_ok(two->ops->activation(two, &tx, act, &ty));
    const float *got = in_place ? x : y;
    double worst = 0.0; /* relative to max(1, |want|) element by element: the values span 0..25 */
    size_t worst_at = 0;
    for (size_t i = 0; i < count; i++) {
        double err = fabs(got[i] - ref[i]) / fmax(1.0, fabs(ref[i]));
        if (err > worst || err != err) {
            worst = err != err ? INFINITY : err;
            worst_at = i;
        }
    }
    ck_assert_msg(worst < OP_TOLERANCE, "activation %d%s: element %zu: %.9g, want %.9g", (int)act,
                  in_place ? " in place" : "", worst_at, (double)got[worst_at], ref[worst_at]);
    if (!in_place) { /* the work is split by size only: the thread count changes no bit */
        kv_backend *one = op_backend(1);
        kv_tensor ty1 = op_tensor4(y1, n, c, h, w);
        ck_assert_ok(one->ops->activation(one, &tx, act, &ty1));
        ck_assert_msg(memcmp(y, y1, count * sizeof(float)) == 0, "1 and 2 threads differ");
        kv_backend_destroy(one);
    }
    kv_backend_destroy(two);
    free(x), free(y), free(y1), free(ref);
}
END_TEST

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
    TCase *forward = op_tcase(s, "forward"), *backward = op_tcase(s, "backward");
    tcase_add_loop_test(forward, activation_matches_float64_reference, 0, 12);
    tcase_add_loop_test(backward, activation_backward_matches_finite_differences, 0, 2);
    return s;
}
