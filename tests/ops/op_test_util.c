/* op_test_util.c — the helpers the op tests of tests/ops/ share
 * (op_test_util.h says how the tests use them). */
#include "op_test_util.h"

#include "backend/cpu/bf16_gemm.h"

kv_backend *op_backend(int threads)
{
    kv_backend_settings settings = {threads, 0, KV_PRECISION_FP32};
    kv_backend *be = NULL;
    ck_assert_ok(kv_cpu_backend_create(&settings, &be));
    return be;
}

kv_backend *op_backend_bf16(int threads)
{
    kv_backend_settings settings = {threads, 0, KV_PRECISION_BF16};
    kv_backend *be = NULL;
    ck_assert_ok(kv_cpu_backend_create(&settings, &be));
    return be;
}

bool op_bf16(void)
{
    return kv_bf16_available(NULL, 0);
}

double op_relative_l2(const float *got, const double *want, size_t n)
{
    double diff = 0.0, norm = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i]))
            return INFINITY;
        double d = (double)got[i] - want[i];
        diff += d * d;
        norm += want[i] * want[i];
    }
    return sqrt(diff / norm);
}

kv_tensor op_tensor4(float *data, int n, int c, int h, int w)
{
    return kv_tensor_wrap(data, n, c, h, w);
}

kv_tensor op_tensor1(float *data, int n)
{
    kv_tensor t = kv_tensor_wrap(data, n, 1, 1, 1);
    t.ndim = 1;
    return t;
}

TCase *op_tcase(Suite *s, const char *name)
{
    TCase *tc = tcase_create(name);
    tcase_set_timeout(tc, 60);
    tcase_set_tags(tc, "ops");
    suite_add_tcase(s, tc);
    return tc;
}

double op_relative_error(const float *got, const double *want, size_t n)
{
    double scale = 1.0, worst = 0.0;
    for (size_t i = 0; i < n; i++)
        scale = fmax(scale, fabs(want[i]));
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)got[i] - want[i]);
        if (d != d)
            return INFINITY;
        worst = fmax(worst, d);
    }
    return worst / scale;
}

double op_activation_reference(kv_activation act, double v)
{
    switch (act) {
    case KV_ACT_NONE: return v;
    case KV_ACT_SILU: return v / (1.0 + exp(-v));
    case KV_ACT_GELU: return 0.5 * v * (1.0 + erf(v / sqrt(2.0)));
    case KV_ACT_RELU: return v > 0 ? v : 0;
    case KV_ACT_MISH: return v * tanh(v > 20 ? v : log1p(exp(v)));
    case KV_ACT_LEAKY_RELU: return v > 0 ? v : 0.2 * v;
    }
    return v;
}

/* ---- finite differences ---- */

static double numeric_derivative(double *x, op_loss_fn f, void *ctx)
{
    double old = *x;
    *x = old + FD_STEP;
    double plus = f(ctx);
    *x = old - FD_STEP;
    double minus = f(ctx);
    *x = old;
    return (plus - minus) / (2.0 * FD_STEP);
}

void op_check_gradient(const char *what, double *x, size_t n, const float *analytic, op_loss_fn f,
                       void *ctx)
{
    /* every element, or FD_SAMPLES of them chosen by a fixed generator */
    test_rng rng = test_rng_new(n * 31 + 7);
    size_t checks = n <= 2 * FD_SAMPLES ? n : FD_SAMPLES;
    double worst = 0.0, scale = 0.0;
    size_t worst_at = 0;
    double worst_num = 0.0;
    for (size_t k = 0; k < checks; k++) {
        size_t i = checks == n ? k : (size_t)(test_uniform(&rng) * (double)n);
        double num = numeric_derivative(&x[i], f, ctx);
        scale = fmax(scale, fabs(num));
        double err = fabs(num - (double)analytic[i]);
        if (err > worst || err != err) {
            worst = err != err ? INFINITY : err;
            worst_at = i;
            worst_num = num;
        }
    }
    ck_assert_msg(scale > 0.0, "%s: the numeric gradient is zero everywhere checked", what);
    ck_assert_msg(worst <= GRAD_TOLERANCE * scale,
                  "%s: element %zu: analytic %.9g, numeric %.9g (largest |gradient| %.3g)", what,
                  worst_at, (double)analytic[worst_at], worst_num, scale);
}

void op_fill_both(double *d, float *f, size_t n, test_rng *rng, double lo, double hi)
{
    for (size_t i = 0; i < n; i++) {
        f[i] = (float)(lo + (hi - lo) * test_uniform(rng));
        d[i] = f[i];
    }
}

double *op_dalloc(size_t n)
{
    double *p = calloc(n ? n : 1, sizeof *p);
    ck_assert_ptr_nonnull(p);
    return p;
}

op_unary_case op_unary_case_new(uint64_t seed, op_unary_output output)
{
    op_unary_case s = {2, 3, 5, 7, 0, 0, NULL, NULL, NULL, NULL, NULL, NULL, NULL};
    s.nx = (size_t)s.n * s.c * s.h * s.w;
    s.ny = output == OP_OUTPUT_DOUBLED  ? 4 * s.nx
           : output == OP_OUTPUT_HALVED ? (size_t)s.n * s.c * (s.h / 2) * (s.w / 2)
                                        : s.nx;
    test_rng rng = test_rng_new(seed);
    s.x = test_alloc(s.nx), s.r = test_alloc(s.ny), s.y = test_alloc(s.ny);
    s.dx = test_alloc(s.nx), s.norms = test_alloc((size_t)s.n * s.h * s.w);
    s.xd = op_dalloc(s.nx), s.rd = op_dalloc(s.ny);
    op_fill_both(s.xd, s.x, s.nx, &rng, -1, 1);
    op_fill_both(s.rd, s.r, s.ny, &rng, -1, 1);
    /* keep values away from the kinks so that the differences are smooth */
    for (size_t i = 0; i < s.nx; i++)
        if (fabs(s.xd[i]) < 0.02)
            s.xd[i] = s.x[i] = 0.5f;
    return s;
}

void op_unary_case_free(op_unary_case *s)
{
    free(s->x), free(s->r), free(s->y), free(s->dx), free(s->norms), free(s->xd), free(s->rd);
    memset(s, 0, sizeof *s);
}
