/* test_ops.c — every CPU op against a naive float64 loop written from the
 * op's specification in src/backend/backend.h, on small random tensors with odd
 * sizes and batch > 1. The float32 op must agree within 1e-5 relative to
 * the size of the values (float32 rounding over sums of at most a few
 * thousand terms stays near 1e-6). */
#include "backend/backend.h"
#include "backend/cpu/cpu_ops.h"
#include "test_util.h"

#define OP_TOLERANCE 1e-5

static kv_backend *backend_with_threads(int threads)
{
    kv_backend_settings settings = {threads, 0, KV_PRECISION_FP32};
    kv_backend *be = NULL;
    ck_assert_ok(kv_cpu_backend_create(&settings, &be));
    return be;
}

/* max |got - want| / max(1, max |want|) */
static double relative_error(const float *got, const double *want, size_t n)
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

static kv_tensor tensor4(float *data, int n, int c, int h, int w)
{
    return kv_tensor_wrap(data, n, c, h, w);
}

static kv_tensor tensor1(float *data, int n)
{
    kv_tensor t = kv_tensor_wrap(data, n, 1, 1, 1);
    t.ndim = 1;
    return t;
}

static double activate_reference(kv_activation act, double v);

/* ---- conv2d ---- */

typedef struct conv_case {
    int n, ci, h, w, co, k;
    kv_conv_geometry g;
    bool bias;
} conv_case;

static const conv_case conv_cases[] = {
    {2, 5, 7, 9, 6, 3, {1, 1, 1, 1, 1}, true},   /* 3x3 "same" */
    {2, 5, 7, 9, 6, 1, {1, 0, 0, 0, 0}, true},   /* 1x1 pointwise */
    {2, 4, 8, 10, 3, 3, {2, 0, 0, 1, 1}, true},  /* Downsample2D: pad right/bottom, stride 2 */
    {3, 3, 5, 6, 7, 3, {2, 1, 2, 1, 0}, false},  /* uneven padding, no bias */
    {1, 64, 64, 64, 40, 3, {1, 1, 1, 1, 1}, true}, /* several row bands */
    {2, 96, 4, 6, 64, 3, {1, 1, 1, 1, 1}, true},  /* Winograd, tiny image */
    {2, 33, 7, 9, 35, 3, {1, 1, 1, 1, 1}, true},  /* Winograd, odd sizes and channels */
    {1, 40, 90, 70, 32, 3, {1, 1, 1, 1, 1}, false}, /* Winograd, several bands, no bias */
    {2, 96, 4, 6, 64, 3, {2, 1, 1, 1, 1}, true},  /* im2col: few bands, channels split */
};

static void conv_reference(const conv_case *c, const float *x, const float *w, const float *b,
                           int ho, int wo, double *y)
{
    for (int n = 0; n < c->n; n++)
        for (int co = 0; co < c->co; co++)
            for (int oy = 0; oy < ho; oy++)
                for (int ox = 0; ox < wo; ox++) {
                    double acc = c->bias ? b[co] : 0.0;
                    for (int ci = 0; ci < c->ci; ci++)
                        for (int ky = 0; ky < c->k; ky++)
                            for (int kx = 0; kx < c->k; kx++) {
                                int iy = oy * c->g.stride - c->g.pad_top + ky;
                                int ix = ox * c->g.stride - c->g.pad_left + kx;
                                if (iy < 0 || iy >= c->h || ix < 0 || ix >= c->w)
                                    continue;
                                acc += (double)w[((co * c->ci + ci) * c->k + ky) * c->k + kx] *
                                       x[((size_t)(n * c->ci + ci) * c->h + iy) * c->w + ix];
                            }
                    y[((size_t)(n * c->co + co) * ho + oy) * wo + ox] = acc;
                }
}

START_TEST(conv2d_matches_float64_reference)
{
    const conv_case *c = &conv_cases[_i];
    test_rng rng = test_rng_new(100 + (uint64_t)_i);
    int ho = (c->h + c->g.pad_top + c->g.pad_bottom - c->k) / c->g.stride + 1;
    int wo = (c->w + c->g.pad_left + c->g.pad_right - c->k) / c->g.stride + 1;
    size_t nx = (size_t)c->n * c->ci * c->h * c->w, nw = (size_t)c->co * c->ci * c->k * c->k;
    size_t ny = (size_t)c->n * c->co * ho * wo;
    float *x = test_alloc(nx), *w = test_alloc(nw), *b = test_alloc((size_t)c->co);
    float *y1 = test_alloc(ny), *y2 = test_alloc(ny);
    double *ref = calloc(ny, sizeof *ref);
    test_fill(x, nx, &rng, -1.0f, 1.0f);
    test_fill(w, nw, &rng, -0.5f, 0.5f);
    test_fill(b, (size_t)c->co, &rng, -1.0f, 1.0f);
    kv_tensor tx = tensor4(x, c->n, c->ci, c->h, c->w), tw = tensor4(w, c->co, c->ci, c->k, c->k);
    kv_tensor tb = tensor1(b, c->co);
    kv_tensor ty1 = tensor4(y1, c->n, c->co, ho, wo), ty2 = tensor4(y2, c->n, c->co, ho, wo);
    kv_backend *one = backend_with_threads(1), *two = backend_with_threads(2);
    ck_assert_ok(one->ops->conv2d(one, &tx, NULL, &tw, c->bias ? &tb : NULL, c->g, &ty1));
    ck_assert_ok(two->ops->conv2d(two, &tx, NULL, &tw, c->bias ? &tb : NULL, c->g, &ty2));
    conv_reference(c, x, w, b, ho, wo, ref);
    double err = relative_error(y1, ref, ny);
    ck_assert_msg(err < OP_TOLERANCE, "case %d: relative error %g", _i, err);
    /* Work is split by shape only, so the thread count changes no bit. */
    ck_assert_msg(memcmp(y1, y2, ny * sizeof(float)) == 0, "case %d: 1 and 2 threads differ", _i);
    kv_backend_destroy(one);
    kv_backend_destroy(two);
    free(x), free(w), free(b), free(y1), free(y2), free(ref);
}
END_TEST

START_TEST(conv2d_prologue_matches_float64_reference)
{
    /* conv(act(x * scale[n,c] + shift[n,c])) with zero padding after the
     * prologue: case 0 goes through Winograd, case 1 through im2col (few
     * output channels), case 2 through im2col with stride 2. */
    static const conv_case cases[] = {
        {2, 40, 9, 11, 36, 3, {1, 1, 1, 1, 1}, true},
        {2, 8, 9, 11, 3, 3, {1, 1, 1, 1, 1}, true},
        {2, 6, 10, 12, 5, 3, {2, 0, 0, 1, 1}, false},
    };
    const conv_case *c = &cases[_i];
    const kv_activation act = _i == 2 ? KV_ACT_GELU : KV_ACT_SILU;
    test_rng rng = test_rng_new(150 + (uint64_t)_i);
    int ho = (c->h + c->g.pad_top + c->g.pad_bottom - c->k) / c->g.stride + 1;
    int wo = (c->w + c->g.pad_left + c->g.pad_right - c->k) / c->g.stride + 1;
    size_t plane = (size_t)c->h * c->w, nx = (size_t)c->n * c->ci * plane;
    size_t nw = (size_t)c->co * c->ci * c->k * c->k, ny = (size_t)c->n * c->co * ho * wo;
    size_t nsc = (size_t)c->n * c->ci;
    float *x = test_alloc(nx), *xn = test_alloc(nx), *w = test_alloc(nw),
          *b = test_alloc((size_t)c->co), *y = test_alloc(ny), *scale = test_alloc(nsc),
          *shift = test_alloc(nsc);
    double *ref = calloc(ny, sizeof *ref);
    test_fill(x, nx, &rng, -3, 3);
    test_fill(w, nw, &rng, -0.5f, 0.5f);
    test_fill(b, (size_t)c->co, &rng, -1, 1);
    test_fill(scale, nsc, &rng, 0.2f, 2.0f);
    test_fill(shift, nsc, &rng, -1, 1);
    for (size_t i = 0; i < nx; i++) {
        size_t nc = i / plane;
        xn[i] = (float)activate_reference(act, (double)x[i] * scale[nc] + shift[nc]);
    }
    conv_reference(c, xn, w, b, ho, wo, ref);
    kv_backend *be = backend_with_threads(2);
    kv_tensor tx = tensor4(x, c->n, c->ci, c->h, c->w), tw = tensor4(w, c->co, c->ci, c->k, c->k);
    kv_tensor tb = tensor1(b, c->co), ty = tensor4(y, c->n, c->co, ho, wo);
    kv_tensor ts = tensor4(scale, c->n, c->ci, 1, 1), tt = tensor4(shift, c->n, c->ci, 1, 1);
    kv_conv_prologue p = {&ts, &tt, act};
    ck_assert_ok(be->ops->conv2d(be, &tx, &p, &tw, c->bias ? &tb : NULL, c->g, &ty));
    double err = relative_error(y, ref, ny);
    ck_assert_msg(err < OP_TOLERANCE, "case %d: relative error %g", _i, err);
    kv_backend_destroy(be);
    free(x), free(xn), free(w), free(b), free(y), free(scale), free(shift), free(ref);
}
END_TEST

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
    kv_backend *be = backend_with_threads(2);
    kv_tensor tx = tensor4(x, n, c, h, w), tg = tensor1(gamma, c), tb = tensor1(beta, c);
    kv_tensor ts = tensor4(scale, n, c, 1, 1), tt = tensor4(shift, n, c, 1, 1);
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

/* ---- group norm ---- */

static double activate_reference(kv_activation act, double v)
{
    switch (act) {
    case KV_ACT_NONE: return v;
    case KV_ACT_SILU: return v / (1.0 + exp(-v));
    case KV_ACT_GELU: return 0.5 * v * (1.0 + erf(v / sqrt(2.0)));
    case KV_ACT_RELU: return v > 0 ? v : 0;
    case KV_ACT_MISH: return v * tanh(log1p(exp(v)));
    case KV_ACT_LEAKY_RELU: return v > 0 ? v : 0.2 * v;
    }
    return v;
}

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
                    ref[at] = activate_reference(act, v);
                }
        }
    kv_backend *be = backend_with_threads(2);
    kv_tensor tx = tensor4(x, n, c, h, w), ty = tensor4(in_place ? x : y, n, c, h, w);
    kv_tensor tg = tensor1(gamma, c), tb = tensor1(beta, c);
    ck_assert_ok(be->ops->group_norm(be, &tx, &tg, &tb, groups, 1e-6f, act, &ty));
    double err = relative_error(in_place ? x : y, ref, count);
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
    kv_backend *be = backend_with_threads(1);
    kv_tensor tx = tensor4(x, n, c, h, w), ty = tensor4(y, n, c, h, w);
    kv_tensor tg = tensor1(gamma, c), tb = tensor1(beta, c);
    ck_assert_ok(be->ops->group_norm(be, &tx, &tg, &tb, 2, 1e-6f, KV_ACT_NONE, &ty));
    for (int i = 0; i < 36; i++)
        ck_assert_float_eq_tol(y[i], beta[i / 9], 1e-6f);
    kv_backend_destroy(be);
}
END_TEST

/* ---- add, upsample ---- */

START_TEST(add_matches_reference_and_allows_aliasing)
{
    const size_t count = 2 * 3 * 129 * 257; /* more than one chunk */
    test_rng rng = test_rng_new(300);
    float *a = test_alloc(count), *b = test_alloc(count), *y = test_alloc(count);
    test_fill(a, count, &rng, -10, 10);
    test_fill(b, count, &rng, -10, 10);
    kv_backend *be = backend_with_threads(2);
    kv_tensor ta = tensor4(a, 2, 3, 129, 257), tb = tensor4(b, 2, 3, 129, 257),
              ty = tensor4(y, 2, 3, 129, 257);
    ck_assert_ok(be->ops->add(be, &ta, &tb, &ty));
    for (size_t i = 0; i < count; i++)
        ck_assert_float_eq(y[i], a[i] + b[i]);
    ck_assert_ok(be->ops->add(be, &ta, &tb, &tb)); /* y = b */
    ck_assert_int_eq(memcmp(b, y, count * sizeof(float)), 0);
    kv_backend_destroy(be);
    free(a), free(b), free(y);
}
END_TEST

START_TEST(upsample_nearest2x_repeats_each_pixel)
{
    const int n = 2, c = 3, h = 5, w = 7;
    test_rng rng = test_rng_new(400);
    float *x = test_alloc((size_t)n * c * h * w), *y = test_alloc((size_t)n * c * 4 * h * w);
    test_fill(x, (size_t)n * c * h * w, &rng, -1, 1);
    kv_backend *be = backend_with_threads(2);
    kv_tensor tx = tensor4(x, n, c, h, w), ty = tensor4(y, n, c, 2 * h, 2 * w);
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

/* ---- attention ---- */

START_TEST(attention_matches_float64_reference)
{
    /* 9 x 11 = 99 positions: more than one block of queries. */
    const int b = 2, c = 6, h = 9, w = 11, N = h * w;
    const size_t count = (size_t)b * c * N;
    const double scale = 1.0 / sqrt((double)c);
    test_rng rng = test_rng_new(500);
    float *q = test_alloc(count), *k = test_alloc(count), *v = test_alloc(count),
          *out = test_alloc(count);
    double *ref = calloc(count, sizeof *ref), *p = calloc((size_t)N, sizeof *p);
    test_fill(q, count, &rng, -2, 2);
    test_fill(k, count, &rng, -2, 2);
    test_fill(v, count, &rng, -1, 1);
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
    kv_backend *be = backend_with_threads(2);
    kv_tensor tq = tensor4(q, b, c, h, w), tk = tensor4(k, b, c, h, w), tv = tensor4(v, b, c, h, w),
              to = tensor4(out, b, c, h, w);
    ck_assert_ok(be->ops->attention(be, &tq, &tk, &tv, (float)scale, &to));
    double err = relative_error(out, ref, count);
    ck_assert_msg(err < OP_TOLERANCE, "relative error %g", err);
    kv_backend_destroy(be);
    free(q), free(k), free(v), free(out), free(ref), free(p);
}
END_TEST

/* ---- posterior ---- */

START_TEST(posterior_split_takes_halves_and_clamps_logvar)
{
    const int n = 2, z = 3, h = 2, w = 5, block = z * h * w;
    float moments[2 * 2 * 30], mean[60], logvar[60];
    test_rng rng = test_rng_new(600);
    test_fill(moments, 120, &rng, -50, 50); /* beyond both clamp limits */
    kv_backend *be = backend_with_threads(1);
    kv_tensor tm = tensor4(moments, n, 2 * z, h, w), tmu = tensor4(mean, n, z, h, w),
              tlv = tensor4(logvar, n, z, h, w);
    ck_assert_ok(be->ops->posterior_split(be, &tm, &tmu, &tlv));
    int clamped = 0;
    for (int b = 0; b < n; b++)
        for (int i = 0; i < block; i++) {
            ck_assert_float_eq(mean[b * block + i], moments[b * 2 * block + i]);
            float raw = moments[b * 2 * block + block + i];
            float want = raw < -30 ? -30 : raw > 20 ? 20 : raw;
            clamped += raw != want;
            ck_assert_float_eq(logvar[b * block + i], want);
        }
    ck_assert_int_gt(clamped, 0);
    kv_backend_destroy(be);
}
END_TEST

Suite *suite_ops(void)
{
    Suite *s = suite_create("ops");
    TCase *tc = tcase_create("cpu");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, conv2d_matches_float64_reference, 0,
                        (int)(sizeof conv_cases / sizeof conv_cases[0]));
    tcase_add_loop_test(tc, conv2d_prologue_matches_float64_reference, 0, 3);
    tcase_add_test(tc, group_norm_stats_give_scale_and_shift);
    tcase_add_loop_test(tc, group_norm_matches_float64_reference, 0, 10);
    tcase_add_test(tc, group_norm_of_constant_group_is_beta);
    tcase_add_test(tc, add_matches_reference_and_allows_aliasing);
    tcase_add_test(tc, upsample_nearest2x_repeats_each_pixel);
    tcase_add_test(tc, attention_matches_float64_reference);
    tcase_add_test(tc, posterior_split_takes_halves_and_clamps_logvar);
    suite_add_tcase(s, tc);
    return s;
}
