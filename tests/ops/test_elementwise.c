/* test_elementwise.c — the elementwise family (src/backend/backend.h,
 * "Family elementwise"): add (with aliasing), the per-channel affine map
 * with and without each of its arrays, and the trainer's vector ops scale,
 * axpy, lerp and fill, against float64 loops on odd sizes; the ops the CPU
 * backend splits into chunks of values get more than one chunk. */
#include "op_test_util.h"

START_TEST(add_matches_reference_and_allows_aliasing)
{
    const size_t count = 2 * 3 * 129 * 257; /* more than one chunk */
    test_rng rng = test_rng_new(300);
    float *a = test_alloc(count), *b = test_alloc(count), *y = test_alloc(count);
    test_fill(a, count, &rng, -10, 10);
    test_fill(b, count, &rng, -10, 10);
    kv_backend *be = op_backend(2);
    kv_tensor ta = op_tensor4(a, 2, 3, 129, 257), tb = op_tensor4(b, 2, 3, 129, 257),
              ty = op_tensor4(y, 2, 3, 129, 257);
    ck_assert_ok(be->ops->add(be, &ta, &tb, &ty));
    for (size_t i = 0; i < count; i++)
        ck_assert_float_eq(y[i], a[i] + b[i]);
    ck_assert_ok(be->ops->add(be, &ta, &tb, &tb)); /* y = b */
    ck_assert_int_eq(memcmp(b, y, count * sizeof(float)), 0);
    kv_backend_destroy(be);
    free(a), free(b), free(y);
}
END_TEST

START_TEST(channel_affine_matches_float64_reference)
{
    /* _i bit 0: a given (else 1), bit 1: b given (else 0) */
    const bool has_a = _i & 1, has_b = _i & 2;
    const int n = 3, c = 5, h = 7, w = 9;
    const size_t plane = (size_t)h * w, count = (size_t)n * c * plane;
    test_rng rng = test_rng_new(1800 + (uint64_t)_i);
    float *x = test_alloc(count), *y = test_alloc(count), a[5], b[5];
    double *ref = op_dalloc(count);
    test_fill(x, count, &rng, -2, 2);
    test_fill(y, count, &rng, -9, 9); /* y is overwritten */
    test_fill(a, c, &rng, -2, 2);
    test_fill(b, c, &rng, -1, 1);
    for (size_t i = 0; i < count; i++) {
        int ch = (int)(i / plane % (size_t)c);
        ref[i] = (double)x[i] * (has_a ? a[ch] : 1.0) + (has_b ? b[ch] : 0.0);
    }
    kv_backend *be = op_backend(2);
    kv_tensor tx = op_tensor4(x, n, c, h, w), ty = op_tensor4(y, n, c, h, w);
    ck_assert_ok(be->ops->channel_affine(be, &tx, has_a ? a : NULL, has_b ? b : NULL, &ty));
    double err = op_relative_error(y, ref, count);
    ck_assert_msg(err < OP_TOLERANCE, "a %s, b %s: relative error %g", has_a ? "given" : "NULL",
                  has_b ? "given" : "NULL", err);
    kv_backend_destroy(be);
    free(x), free(y), free(ref);
}
END_TEST

/* The vector ops' tensors: 3 x 5 x 97 x 151 = 219705 values, more than
 * three chunks of the CPU backend's split and not a multiple of one. */
#define VECTOR_N 3
#define VECTOR_C 5
#define VECTOR_H 97
#define VECTOR_W 151
#define VECTOR_COUNT ((size_t)VECTOR_N * VECTOR_C * VECTOR_H * VECTOR_W)

static kv_tensor vector_tensor(float *data)
{
    return op_tensor4(data, VECTOR_N, VECTOR_C, VECTOR_H, VECTOR_W);
}

START_TEST(scale_matches_float64_reference)
{
    const float a = -0.37f;
    test_rng rng = test_rng_new(1810);
    float *x = test_alloc(VECTOR_COUNT);
    double *ref = op_dalloc(VECTOR_COUNT);
    test_fill(x, VECTOR_COUNT, &rng, -10, 10);
    for (size_t i = 0; i < VECTOR_COUNT; i++)
        ref[i] = (double)x[i] * a;
    kv_backend *be = op_backend(2);
    kv_tensor tx = vector_tensor(x);
    ck_assert_ok(be->ops->scale(be, &tx, a));
    double err = op_relative_error(x, ref, VECTOR_COUNT);
    ck_assert_msg(err < OP_TOLERANCE, "relative error %g", err);
    kv_backend_destroy(be);
    free(x), free(ref);
}
END_TEST

START_TEST(axpy_matches_float64_reference)
{
    const float a = 1.7f;
    test_rng rng = test_rng_new(1811);
    float *x = test_alloc(VECTOR_COUNT), *y = test_alloc(VECTOR_COUNT);
    double *ref = op_dalloc(VECTOR_COUNT);
    test_fill(x, VECTOR_COUNT, &rng, -10, 10);
    test_fill(y, VECTOR_COUNT, &rng, -10, 10);
    for (size_t i = 0; i < VECTOR_COUNT; i++)
        ref[i] = y[i] + (double)a * x[i];
    kv_backend *be = op_backend(2);
    kv_tensor tx = vector_tensor(x), ty = vector_tensor(y);
    ck_assert_ok(be->ops->axpy(be, a, &tx, &ty));
    double err = op_relative_error(y, ref, VECTOR_COUNT);
    ck_assert_msg(err < OP_TOLERANCE, "relative error %g", err);
    kv_backend_destroy(be);
    free(x), free(y), free(ref);
}
END_TEST

START_TEST(lerp_matches_float64_reference)
{
    const float t = 0.23f;
    test_rng rng = test_rng_new(1812);
    float *x = test_alloc(VECTOR_COUNT), *y = test_alloc(VECTOR_COUNT);
    double *ref = op_dalloc(VECTOR_COUNT);
    test_fill(x, VECTOR_COUNT, &rng, -10, 10);
    test_fill(y, VECTOR_COUNT, &rng, -10, 10);
    for (size_t i = 0; i < VECTOR_COUNT; i++)
        ref[i] = x[i] + (double)t * ((double)y[i] - x[i]);
    kv_backend *be = op_backend(2);
    kv_tensor tx = vector_tensor(x), ty = vector_tensor(y);
    ck_assert_ok(be->ops->lerp(be, &tx, &ty, t));
    double err = op_relative_error(x, ref, VECTOR_COUNT);
    ck_assert_msg(err < OP_TOLERANCE, "relative error %g", err);
    kv_backend_destroy(be);
    free(x), free(y), free(ref);
}
END_TEST

START_TEST(fill_sets_every_value)
{
    const float v = -3.25f;
    test_rng rng = test_rng_new(1813);
    float *x = test_alloc(VECTOR_COUNT);
    test_fill(x, VECTOR_COUNT, &rng, -10, 10);
    kv_backend *be = op_backend(2);
    kv_tensor tx = vector_tensor(x);
    ck_assert_ok(be->ops->fill(be, &tx, v));
    for (size_t i = 0; i < VECTOR_COUNT; i++)
        ck_assert_msg(x[i] == v, "element %zu is %.9g", i, (double)x[i]);
    kv_backend_destroy(be);
    free(x);
}
END_TEST

Suite *suite_elementwise_ops(void)
{
    Suite *s = suite_create("elementwise");
    TCase *forward = op_tcase(s, "forward");
    tcase_add_test(forward, add_matches_reference_and_allows_aliasing);
    tcase_add_loop_test(forward, channel_affine_matches_float64_reference, 0, 4);
    tcase_add_test(forward, scale_matches_float64_reference);
    tcase_add_test(forward, axpy_matches_float64_reference);
    tcase_add_test(forward, lerp_matches_float64_reference);
    tcase_add_test(forward, fill_sets_every_value);
    return s;
}
