/* test_attention.c — the attention family (src/backend/backend.h, "Family
 * attention"): single-head self-attention against a float64 loop over more
 * than one block of queries, and its backward against finite differences
 * (op_test_util.h). */
#include "op_test_util.h"

/* ---- forward ---- */

/* out = attention(q, k, v) in float64 for b images of c channels and n
 * positions. */
static void attention_reference(int b, int c, int N, double scale, const float *q, const float *k,
                                const float *v, double *ref)
{
    double *p = calloc((size_t)N, sizeof *p);
    for (int bb = 0; bb < b; bb++) {
        const float *Q = q + (size_t)bb * c * N, *K = k + (size_t)bb * c * N,
                    *V = v + (size_t)bb * c * N;
        for (int n = 0; n < N; n++) {
            double max = -INFINITY, sum = 0;
            for (int m = 0; m < N; m++) {
                double s = 0;
                for (int ch = 0; ch < c; ch++)
                    s += (double)Q[ch * N + n] * K[ch * N + m];
                p[m] = s * scale;
                max = fmax(max, p[m]);
            }
            for (int m = 0; m < N; m++)
                sum += p[m] = exp(p[m] - max);
            for (int ch = 0; ch < c; ch++) {
                double acc = 0;
                for (int m = 0; m < N; m++)
                    acc += p[m] / sum * V[ch * N + m];
                ref[(size_t)bb * c * N + (size_t)ch * N + n] = acc;
            }
        }
    }
    free(p);
}

START_TEST(attention_matches_float64_reference)
{
    /* 9 x 11 = 99 positions: more than one block of queries. */
    const int b = 2, c = 6, h = 9, w = 11, N = h * w;
    const size_t count = (size_t)b * c * N;
    const double scale = 1.0 / sqrt((double)c);
    test_rng rng = test_rng_new(500);
    float *q = test_alloc(count), *k = test_alloc(count), *v = test_alloc(count),
          *out = test_alloc(count);
    double *ref = calloc(count, sizeof *ref);
    test_fill(q, count, &rng, -2, 2);
    test_fill(k, count, &rng, -2, 2);
    test_fill(v, count, &rng, -1, 1);
    attention_reference(b, c, N, scale, q, k, v, ref);
    kv_backend *be = op_backend(2);
    kv_tensor tq = op_tensor4(q, b, c, h, w), tk = op_tensor4(k, b, c, h, w);
    kv_tensor tv = op_tensor4(v, b, c, h, w), to = op_tensor4(out, b, c, h, w);
    ck_assert_ok(be->ops->attention(be, &tq, &tk, &tv, (float)scale, &to));
    double err = op_relative_error(out, ref, count);
    ck_assert_msg(err < OP_TOLERANCE, "relative error %g", err);
    kv_backend_destroy(be);
    free(q), free(k), free(v), free(out), free(ref);
}
END_TEST

/* With bf16 products (precision=bf16): 11 x 19 = 209 positions (three
 * blocks of queries, the last partial, an odd number of positions summed
 * in pairs) and 37 channels. Within the single-op bound of float64,
 * visibly rounded, the same bits for 1 and 2 threads; without AVX512-BF16
 * the bits of the fp32 backend. */
START_TEST(attention_bf16_matches_float64_reference)
{
    const int b = 2, c = 37, h = 11, w = 19, N = h * w;
    const size_t count = (size_t)b * c * N;
    const double scale = 1.0 / sqrt((double)c);
    test_rng rng = test_rng_new(510);
    float *q = test_alloc(count), *k = test_alloc(count), *v = test_alloc(count),
          *out1 = test_alloc(count), *out2 = test_alloc(count), *out32 = test_alloc(count);
    double *ref = calloc(count, sizeof *ref);
    test_fill(q, count, &rng, -2, 2);
    test_fill(k, count, &rng, -2, 2);
    test_fill(v, count, &rng, -1, 1);
    attention_reference(b, c, N, scale, q, k, v, ref);
    kv_backend *one = op_backend_bf16(1), *two = op_backend_bf16(2), *fp32 = op_backend(2);
    kv_tensor tq = op_tensor4(q, b, c, h, w), tk = op_tensor4(k, b, c, h, w);
    kv_tensor tv = op_tensor4(v, b, c, h, w), t1 = op_tensor4(out1, b, c, h, w);
    kv_tensor t2 = op_tensor4(out2, b, c, h, w), t32 = op_tensor4(out32, b, c, h, w);
    ck_assert_ok(one->ops->attention(one, &tq, &tk, &tv, (float)scale, &t1));
    ck_assert_ok(two->ops->attention(two, &tq, &tk, &tv, (float)scale, &t2));
    ck_assert_ok(fp32->ops->attention(fp32, &tq, &tk, &tv, (float)scale, &t32));
    if (op_bf16()) {
        double l2 = op_relative_l2(out1, ref, count);
        ck_assert_msg(l2 < OP_BF16_TOLERANCE && l2 > OP_BF16_ROUNDED,
                      "relative L2 error %g outside (%g, %g)", l2, OP_BF16_ROUNDED,
                      OP_BF16_TOLERANCE);
    } else {
        ck_assert(memcmp(out1, out32, count * sizeof(float)) == 0);
    }
    ck_assert_msg(memcmp(out1, out2, count * sizeof(float)) == 0, "1 and 2 threads differ");
    kv_backend_destroy(one);
    kv_backend_destroy(two);
    kv_backend_destroy(fp32);
    free(q), free(k), free(v), free(out1), free(out2), free(out32), free(ref);
}
END_TEST

/* ---- backward ---- */

typedef struct attn_ctx {
    int b, c, n;
    double scale;
    double *q, *k, *v, *r;
} attn_ctx;

static double attn_loss(void *p)
{
    attn_ctx *a = p;
    double total = 0.0;
    double *s = calloc((size_t)a->n, sizeof *s);
    for (int b = 0; b < a->b; b++) {
        size_t off = (size_t)b * a->c * a->n;
        for (int i = 0; i < a->n; i++) {
            double max = -INFINITY, sum = 0;
            for (int m = 0; m < a->n; m++) {
                double dot = 0;
                for (int c = 0; c < a->c; c++)
                    dot += a->q[off + (size_t)c * a->n + i] * a->k[off + (size_t)c * a->n + m];
                s[m] = dot * a->scale;
                max = fmax(max, s[m]);
            }
            for (int m = 0; m < a->n; m++)
                sum += s[m] = exp(s[m] - max);
            for (int c = 0; c < a->c; c++) {
                double o = 0;
                for (int m = 0; m < a->n; m++)
                    o += s[m] / sum * a->v[off + (size_t)c * a->n + m];
                total += o * a->r[off + (size_t)c * a->n + i];
            }
        }
    }
    free(s);
    return total;
}

START_TEST(attention_backward_matches_finite_differences)
{
    attn_ctx a = {2, 5, 3 * 4, 1.0 / sqrt(5.0), NULL, NULL, NULL, NULL};
    size_t n = (size_t)a.b * a.c * a.n;
    test_rng rng = test_rng_new(900);
    float *q = test_alloc(n), *k = test_alloc(n), *v = test_alloc(n), *r = test_alloc(n);
    float *dq = test_alloc(n), *dk = test_alloc(n), *dv = test_alloc(n);
    a.q = op_dalloc(n), a.k = op_dalloc(n), a.v = op_dalloc(n), a.r = op_dalloc(n);
    op_fill_both(a.q, q, n, &rng, -1.5, 1.5);
    op_fill_both(a.k, k, n, &rng, -1.5, 1.5);
    op_fill_both(a.v, v, n, &rng, -1, 1);
    op_fill_both(a.r, r, n, &rng, -1, 1);
    kv_backend *be = op_backend(2);
    kv_tensor tq = op_tensor4(q, 2, 5, 3, 4), tk = op_tensor4(k, 2, 5, 3, 4),
              tv = op_tensor4(v, 2, 5, 3, 4), tr = op_tensor4(r, 2, 5, 3, 4);
    kv_tensor tdq = op_tensor4(dq, 2, 5, 3, 4), tdk = op_tensor4(dk, 2, 5, 3, 4),
              tdv = op_tensor4(dv, 2, 5, 3, 4);
    ck_assert_ok(be->ops->attention_backward(be, &tq, &tk, &tv, (float)a.scale, &tr, &tdq, &tdk,
                                             &tdv));
    op_check_gradient("attention dq", a.q, n, dq, attn_loss, &a);
    op_check_gradient("attention dk", a.k, n, dk, attn_loss, &a);
    op_check_gradient("attention dv", a.v, n, dv, attn_loss, &a);
    kv_backend_destroy(be);
    free(q), free(k), free(v), free(r), free(dq), free(dk), free(dv);
    free(a.q), free(a.k), free(a.v), free(a.r);
}
END_TEST

Suite *suite_attention_ops(void)
{
    Suite *s = suite_create("attention");
    TCase *forward = op_tcase(s, "forward"), *backward = op_tcase(s, "backward");
    tcase_add_test(forward, attention_matches_float64_reference);
    tcase_add_test(forward, attention_bf16_matches_float64_reference);
    tcase_add_test(backward, attention_backward_matches_finite_differences);
    return s;
}
