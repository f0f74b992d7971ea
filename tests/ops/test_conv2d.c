/* test_conv2d.c — the conv2d family (src/backend/backend.h, "Family
 * conv2d"): conv2d against a float64 loop in every geometry and code path
 * (im2col, channel split, Winograd, the fused prologue), and its two
 * backward ops against finite differences (op_test_util.h). */
#include "op_test_util.h"

/* ---- forward ---- */

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
    /* Winograd on the row bands of streamed execution: halo rows instead of
     * the padding row above, below, or both (odd row counts) */
    {1, 40, 9, 11, 36, 3, {1, 0, 1, 1, 1}, true},
    {2, 33, 8, 7, 35, 3, {1, 1, 1, 0, 1}, true},
    {1, 40, 11, 9, 32, 3, {1, 0, 1, 0, 1}, false},
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
    kv_tensor tx = op_tensor4(x, c->n, c->ci, c->h, c->w);
    kv_tensor tw = op_tensor4(w, c->co, c->ci, c->k, c->k);
    kv_tensor tb = op_tensor1(b, c->co);
    kv_tensor ty1 = op_tensor4(y1, c->n, c->co, ho, wo), ty2 = op_tensor4(y2, c->n, c->co, ho, wo);
    kv_backend *one = op_backend(1), *two = op_backend(2);
    ck_assert_ok(one->ops->conv2d(one, &tx, NULL, &tw, c->bias ? &tb : NULL, NULL, c->g, &ty1));
    ck_assert_ok(two->ops->conv2d(two, &tx, NULL, &tw, c->bias ? &tb : NULL, NULL, c->g, &ty2));
    conv_reference(c, x, w, b, ho, wo, ref);
    double err = op_relative_error(y1, ref, ny);
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
     * output channels), case 2 through im2col with stride 2, case 3 through
     * Winograd on an interior row band (no padding rows). */
    static const conv_case cases[] = {
        {2, 40, 9, 11, 36, 3, {1, 1, 1, 1, 1}, true},
        {2, 8, 9, 11, 3, 3, {1, 1, 1, 1, 1}, true},
        {2, 6, 10, 12, 5, 3, {2, 0, 0, 1, 1}, false},
        {2, 40, 7, 11, 36, 3, {1, 0, 1, 0, 1}, true},
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
        xn[i] = (float)op_activation_reference(act, (double)x[i] * scale[nc] + shift[nc]);
    }
    conv_reference(c, xn, w, b, ho, wo, ref);
    kv_backend *be = op_backend(2);
    kv_tensor tx = op_tensor4(x, c->n, c->ci, c->h, c->w);
    kv_tensor tw = op_tensor4(w, c->co, c->ci, c->k, c->k);
    kv_tensor tb = op_tensor1(b, c->co), ty = op_tensor4(y, c->n, c->co, ho, wo);
    kv_tensor ts = op_tensor4(scale, c->n, c->ci, 1, 1), tt = op_tensor4(shift, c->n, c->ci, 1, 1);
    kv_conv_prologue p = {&ts, &tt, act, false};
    ck_assert_ok(be->ops->conv2d(be, &tx, &p, &tw, c->bias ? &tb : NULL, NULL, c->g, &ty));
    double err = op_relative_error(y, ref, ny);
    ck_assert_msg(err < OP_TOLERANCE, "case %d: relative error %g", _i, err);
    kv_backend_destroy(be);
    free(x), free(xn), free(w), free(b), free(y), free(scale), free(shift), free(ref);
}
END_TEST

START_TEST(conv2d_residual_and_upsample_match_float64_reference)
{
    /* y = conv(x') + b + r, with x' read through the nearest 2x upsample
     * (the decoder's Upsample2D) and/or a group-norm prologue, and the
     * residual added last (the resnet's shortcut, attention's input).
     * Cases: residual on Winograd and im2col, upsample alone on Winograd and
     * im2col, upsample after a prologue, all three with an odd stride-2
     * geometry. The case's h and w are x's; x' is twice that when upsampled. */
    static const struct {
        conv_case c;
        bool residual, upsample, prologue;
    } cases[] = {
        {{2, 40, 9, 11, 36, 3, {1, 1, 1, 1, 1}, true}, true, false, true},
        {{3, 7, 5, 6, 3, 3, {1, 1, 1, 1, 1}, false}, true, false, false},
        {{2, 40, 5, 7, 33, 3, {1, 1, 1, 1, 1}, true}, false, true, false},
        {{2, 6, 4, 5, 5, 3, {1, 1, 1, 1, 1}, true}, false, true, false},
        {{2, 9, 5, 3, 4, 3, {1, 1, 1, 1, 1}, true}, true, true, true},
        {{1, 5, 3, 5, 6, 3, {2, 0, 1, 1, 0}, false}, true, true, false},
        /* a row band of the upsample conv in Winograd: no padding rows */
        {{2, 40, 5, 7, 33, 3, {1, 0, 1, 0, 1}, true}, true, true, true},
        {{1, 40, 4, 5, 32, 3, {1, 0, 1, 1, 1}, false}, false, true, false},
    };
    const conv_case *c = &cases[_i].c;
    const bool has_r = cases[_i].residual, up = cases[_i].upsample, pro = cases[_i].prologue;
    test_rng rng = test_rng_new(170 + (uint64_t)_i);
    const int u = up ? 2 : 1;
    conv_case cu = *c; /* the convolution as it sees x' */
    cu.h *= u, cu.w *= u;
    int ho = (cu.h + c->g.pad_top + c->g.pad_bottom - c->k) / c->g.stride + 1;
    int wo = (cu.w + c->g.pad_left + c->g.pad_right - c->k) / c->g.stride + 1;
    size_t plane = (size_t)c->h * c->w, nx = (size_t)c->n * c->ci * plane;
    size_t nxu = nx * u * u, nsc = (size_t)c->n * c->ci;
    size_t nw = (size_t)c->co * c->ci * c->k * c->k, ny = (size_t)c->n * c->co * ho * wo;
    float *x = test_alloc(nx), *xu = test_alloc(nxu), *w = test_alloc(nw),
          *b = test_alloc((size_t)c->co), *r = test_alloc(ny), *y = test_alloc(ny),
          *scale = test_alloc(nsc), *shift = test_alloc(nsc);
    double *ref = calloc(ny, sizeof *ref);
    test_fill(x, nx, &rng, -3, 3);
    test_fill(w, nw, &rng, -0.5f, 0.5f);
    test_fill(b, (size_t)c->co, &rng, -1, 1);
    test_fill(r, ny, &rng, -2, 2);
    test_fill(scale, nsc, &rng, 0.2f, 2.0f);
    test_fill(shift, nsc, &rng, -1, 1);
    for (size_t i = 0; i < nxu; i++) {
        size_t nc = i / (plane * u * u), rest = i % (plane * u * u);
        size_t yy = rest / (size_t)cu.w / u, xx = rest % (size_t)cu.w / u;
        double v = x[nc * plane + yy * c->w + xx];
        if (pro)
            v = op_activation_reference(KV_ACT_SILU, v * scale[nc] + shift[nc]);
        xu[i] = (float)v;
    }
    conv_reference(&cu, xu, w, b, ho, wo, ref);
    if (has_r)
        for (size_t i = 0; i < ny; i++)
            ref[i] += r[i];
    kv_backend *be = op_backend(2);
    kv_tensor tx = op_tensor4(x, c->n, c->ci, c->h, c->w);
    kv_tensor tw = op_tensor4(w, c->co, c->ci, c->k, c->k);
    kv_tensor tb = op_tensor1(b, c->co), ty = op_tensor4(y, c->n, c->co, ho, wo);
    kv_tensor tr = op_tensor4(r, c->n, c->co, ho, wo);
    kv_tensor ts = op_tensor4(scale, c->n, c->ci, 1, 1), tt = op_tensor4(shift, c->n, c->ci, 1, 1);
    kv_conv_prologue p = {pro ? &ts : NULL, pro ? &tt : NULL, KV_ACT_SILU, up};
    ck_assert_ok(be->ops->conv2d(be, &tx, pro || up ? &p : NULL, &tw, c->bias ? &tb : NULL,
                                 has_r ? &tr : NULL, c->g, &ty));
    double err = op_relative_error(y, ref, ny);
    ck_assert_msg(err < OP_TOLERANCE, "case %d: relative error %g", _i, err);
    kv_backend_destroy(be);
    free(x), free(xu), free(w), free(b), free(r), free(y), free(scale), free(shift), free(ref);
}
END_TEST

/* ---- bf16 products (precision=bf16) ---- */

/* Winograd (odd sizes and channels, a tiny image, a larger one whose tasks'
 * chunks of tile blocks end inside tile rows, one block split by output
 * channels with a partial last split), 1x1, im2col with a channel split and
 * a partial kernel panel, and a layer with fewer than 8 outputs, which
 * stays float32. */
static const conv_case bf16_cases[] = {
    {2, 40, 9, 11, 36, 3, {1, 1, 1, 1, 1}, true},
    {2, 33, 7, 9, 35, 3, {1, 1, 1, 1, 1}, true},
    {2, 96, 4, 6, 64, 3, {1, 1, 1, 1, 1}, true},
    {1, 48, 50, 45, 40, 3, {1, 1, 1, 1, 1}, false},
    {2, 40, 10, 11, 136, 3, {1, 1, 1, 1, 1}, true},
    {2, 21, 7, 9, 24, 1, {1, 0, 0, 0, 0}, true},
    {2, 96, 4, 6, 64, 3, {2, 1, 1, 1, 1}, true},
    {2, 12, 8, 10, 10, 3, {2, 0, 0, 1, 1}, true},
    {2, 5, 7, 9, 6, 3, {1, 1, 1, 1, 1}, true},
    /* Winograd on the row bands of a streamed forward: halo rows instead of
     * the top, the bottom or both paddings */
    {2, 40, 9, 11, 36, 3, {1, 0, 1, 1, 1}, true},
    {1, 48, 8, 10, 40, 3, {1, 1, 1, 0, 1}, true},
    {2, 40, 7, 9, 36, 3, {1, 0, 1, 0, 1}, true},
};

/* The checks every bf16 result gets: against float64 on the unrounded
 * inputs, within the single-op bound and visibly rounded (or float32
 * exact where the op stays float32: rounded false), and with the bits of
 * the fp32 backend on a CPU without bf16 instructions. */
static void check_bf16_result(const char *what, int i, const float *got, const double *ref,
                              const float *fp32, size_t n, bool rounded)
{
    if (!op_bf16()) {
        ck_assert_msg(memcmp(got, fp32, n * sizeof(float)) == 0,
                      "%s %d: precision=bf16 without bf16 instructions is not fp32", what, i);
        return;
    }
    double l2 = op_relative_l2(got, ref, n), max = op_relative_error(got, ref, n);
    if (rounded)
        ck_assert_msg(l2 < OP_BF16_TOLERANCE && l2 > OP_BF16_ROUNDED,
                      "%s %d: relative L2 error %g outside (%g, %g)", what, i, l2,
                      OP_BF16_ROUNDED, OP_BF16_TOLERANCE);
    else
        ck_assert_msg(max < OP_TOLERANCE, "%s %d: float32 layer, relative error %g", what, i, max);
}

START_TEST(conv2d_bf16_matches_float64_reference)
{
    const conv_case *c = &bf16_cases[_i];
    test_rng rng = test_rng_new(1300 + (uint64_t)_i);
    int ho = (c->h + c->g.pad_top + c->g.pad_bottom - c->k) / c->g.stride + 1;
    int wo = (c->w + c->g.pad_left + c->g.pad_right - c->k) / c->g.stride + 1;
    size_t nx = (size_t)c->n * c->ci * c->h * c->w, nw = (size_t)c->co * c->ci * c->k * c->k;
    size_t ny = (size_t)c->n * c->co * ho * wo;
    float *x = test_alloc(nx), *w = test_alloc(nw), *b = test_alloc((size_t)c->co);
    float *y1 = test_alloc(ny), *y2 = test_alloc(ny), *y32 = test_alloc(ny);
    double *ref = calloc(ny, sizeof *ref);
    test_fill(x, nx, &rng, -1.0f, 1.0f);
    test_fill(w, nw, &rng, -0.5f, 0.5f);
    test_fill(b, (size_t)c->co, &rng, -1.0f, 1.0f);
    kv_tensor tx = op_tensor4(x, c->n, c->ci, c->h, c->w);
    kv_tensor tw = op_tensor4(w, c->co, c->ci, c->k, c->k);
    kv_tensor tb = op_tensor1(b, c->co), *bias = c->bias ? &tb : NULL;
    kv_tensor ty1 = op_tensor4(y1, c->n, c->co, ho, wo), ty2 = op_tensor4(y2, c->n, c->co, ho, wo);
    kv_tensor ty32 = op_tensor4(y32, c->n, c->co, ho, wo);
    kv_backend *one = op_backend_bf16(1), *two = op_backend_bf16(2), *fp32 = op_backend(2);
    ck_assert_ok(one->ops->conv2d(one, &tx, NULL, &tw, bias, NULL, c->g, &ty1));
    ck_assert_ok(two->ops->conv2d(two, &tx, NULL, &tw, bias, NULL, c->g, &ty2));
    ck_assert_ok(fp32->ops->conv2d(fp32, &tx, NULL, &tw, bias, NULL, c->g, &ty32));
    conv_reference(c, x, w, b, ho, wo, ref);
    check_bf16_result("conv2d", _i, y1, ref, y32, ny, c->co >= 8);
    ck_assert_msg(memcmp(y1, y2, ny * sizeof(float)) == 0, "case %d: 1 and 2 threads differ", _i);
    kv_backend_destroy(one);
    kv_backend_destroy(two);
    kv_backend_destroy(fp32);
    free(x), free(w), free(b), free(y1), free(y2), free(y32), free(ref);
}
END_TEST

/* The prologue (SiLU of a group norm's scale and shift), the 2x upsample
 * and the residual with bf16 products: Winograd (case 0) and im2col
 * (case 1, stride 2). */
START_TEST(conv2d_bf16_prologue_upsample_residual)
{
    static const conv_case cases[] = {
        {2, 40, 5, 7, 36, 3, {1, 1, 1, 1, 1}, true},
        {2, 16, 5, 6, 12, 3, {2, 0, 0, 1, 1}, true},
    };
    const conv_case *c = &cases[_i];
    test_rng rng = test_rng_new(1350 + (uint64_t)_i);
    conv_case cu = *c; /* as the convolution sees x: upsampled */
    cu.h *= 2, cu.w *= 2;
    int ho = (cu.h + c->g.pad_top + c->g.pad_bottom - c->k) / c->g.stride + 1;
    int wo = (cu.w + c->g.pad_left + c->g.pad_right - c->k) / c->g.stride + 1;
    size_t plane = (size_t)c->h * c->w, nx = (size_t)c->n * c->ci * plane, nsc = (size_t)c->n * c->ci;
    size_t nw = (size_t)c->co * c->ci * 9, ny = (size_t)c->n * c->co * ho * wo;
    float *x = test_alloc(nx), *xu = test_alloc(4 * nx), *w = test_alloc(nw),
          *b = test_alloc((size_t)c->co), *r = test_alloc(ny), *y = test_alloc(ny),
          *y32 = test_alloc(ny), *scale = test_alloc(nsc), *shift = test_alloc(nsc);
    double *ref = calloc(ny, sizeof *ref);
    test_fill(x, nx, &rng, -3, 3);
    test_fill(w, nw, &rng, -0.5f, 0.5f);
    test_fill(b, (size_t)c->co, &rng, -1, 1);
    test_fill(r, ny, &rng, -2, 2);
    test_fill(scale, nsc, &rng, 0.2f, 2.0f);
    test_fill(shift, nsc, &rng, -1, 1);
    for (size_t i = 0; i < 4 * nx; i++) {
        size_t nc = i / (4 * plane), rest = i % (4 * plane);
        size_t yy = rest / (size_t)cu.w / 2, xx = rest % (size_t)cu.w / 2;
        xu[i] = (float)op_activation_reference(
            KV_ACT_SILU, (double)x[nc * plane + yy * c->w + xx] * scale[nc] + shift[nc]);
    }
    conv_reference(&cu, xu, w, b, ho, wo, ref);
    for (size_t i = 0; i < ny; i++)
        ref[i] += r[i];
    kv_backend *be = op_backend_bf16(2), *fp32 = op_backend(2);
    kv_tensor tx = op_tensor4(x, c->n, c->ci, c->h, c->w);
    kv_tensor tw = op_tensor4(w, c->co, c->ci, 3, 3), tb = op_tensor1(b, c->co);
    kv_tensor ty = op_tensor4(y, c->n, c->co, ho, wo), tr = op_tensor4(r, c->n, c->co, ho, wo);
    kv_tensor ty32 = op_tensor4(y32, c->n, c->co, ho, wo);
    kv_tensor ts = op_tensor4(scale, c->n, c->ci, 1, 1), tt = op_tensor4(shift, c->n, c->ci, 1, 1);
    kv_conv_prologue p = {&ts, &tt, KV_ACT_SILU, true};
    ck_assert_ok(be->ops->conv2d(be, &tx, &p, &tw, &tb, &tr, c->g, &ty));
    ck_assert_ok(fp32->ops->conv2d(fp32, &tx, &p, &tw, &tb, &tr, c->g, &ty32));
    check_bf16_result("prologue", _i, y, ref, y32, ny, true);
    kv_backend_destroy(be);
    kv_backend_destroy(fp32);
    free(x), free(xu), free(w), free(b), free(r), free(y), free(y32), free(scale), free(shift);
    free(ref);
}
END_TEST

/* conv2d_backward_data with bf16 products: the flipped kernel through
 * Winograd (case 0), the transposed 1x1 (case 1); the strided col2im path
 * (case 2) stays float32. */
START_TEST(conv2d_bf16_backward_data)
{
    static const conv_case cases[] = {
        {2, 36, 7, 9, 40, 3, {1, 1, 1, 1, 1}, false},
        {2, 24, 5, 7, 21, 1, {1, 0, 0, 0, 0}, false},
        {2, 12, 8, 10, 10, 3, {2, 0, 0, 1, 1}, false},
    };
    const conv_case *c = &cases[_i]; /* the forward convolution */
    test_rng rng = test_rng_new(1380 + (uint64_t)_i);
    int ho = (c->h + c->g.pad_top + c->g.pad_bottom - c->k) / c->g.stride + 1;
    int wo = (c->w + c->g.pad_left + c->g.pad_right - c->k) / c->g.stride + 1;
    size_t nx = (size_t)c->n * c->ci * c->h * c->w, nw = (size_t)c->co * c->ci * c->k * c->k;
    size_t ny = (size_t)c->n * c->co * ho * wo;
    float *dy = test_alloc(ny), *w = test_alloc(nw), *dx = test_alloc(nx), *dx32 = test_alloc(nx);
    double *ref = calloc(nx, sizeof *ref);
    test_fill(dy, ny, &rng, -1, 1);
    test_fill(w, nw, &rng, -0.5f, 0.5f);
    /* dx[n,i,iy,ix] = sum over the outputs each input reached */
    for (int n = 0; n < c->n; n++)
        for (int o = 0; o < c->co; o++)
            for (int oy = 0; oy < ho; oy++)
                for (int ox = 0; ox < wo; ox++)
                    for (int i = 0; i < c->ci; i++)
                        for (int ky = 0; ky < c->k; ky++)
                            for (int kx = 0; kx < c->k; kx++) {
                                int iy = oy * c->g.stride - c->g.pad_top + ky;
                                int ix = ox * c->g.stride - c->g.pad_left + kx;
                                if (iy < 0 || iy >= c->h || ix < 0 || ix >= c->w)
                                    continue;
                                ref[((size_t)(n * c->ci + i) * c->h + iy) * c->w + ix] +=
                                    (double)w[((o * c->ci + i) * c->k + ky) * c->k + kx] *
                                    dy[((size_t)(n * c->co + o) * ho + oy) * wo + ox];
                            }
    kv_backend *be = op_backend_bf16(2), *fp32 = op_backend(2);
    kv_tensor tdy = op_tensor4(dy, c->n, c->co, ho, wo), tw = op_tensor4(w, c->co, c->ci, c->k, c->k);
    kv_tensor tdx = op_tensor4(dx, c->n, c->ci, c->h, c->w);
    kv_tensor tdx32 = op_tensor4(dx32, c->n, c->ci, c->h, c->w);
    ck_assert_ok(be->ops->conv2d_backward_data(be, &tdy, &tw, c->g, &tdx));
    ck_assert_ok(fp32->ops->conv2d_backward_data(fp32, &tdy, &tw, c->g, &tdx32));
    check_bf16_result("backward data", _i, dx, ref, dx32, nx, c->g.stride == 1);
    kv_backend_destroy(be);
    kv_backend_destroy(fp32);
    free(dy), free(w), free(dx), free(dx32), free(ref);
}
END_TEST

/* ---- backward ---- */

typedef struct conv_ctx {
    int n, ci, h, w, co, kh, kw, ho, wo;
    kv_conv_geometry g;
    double *x, *wt, *b, *r, *scale, *shift; /* scale/shift: prologue or NULL */
    kv_activation act;
} conv_ctx;

static double conv_loss(void *p)
{
    conv_ctx *c = p;
    double total = 0.0;
    for (int n = 0; n < c->n; n++)
        for (int o = 0; o < c->co; o++)
            for (int oy = 0; oy < c->ho; oy++)
                for (int ox = 0; ox < c->wo; ox++) {
                    double acc = c->b[o];
                    for (int i = 0; i < c->ci; i++)
                        for (int ky = 0; ky < c->kh; ky++)
                            for (int kx = 0; kx < c->kw; kx++) {
                                int iy = oy * c->g.stride - c->g.pad_top + ky;
                                int ix = ox * c->g.stride - c->g.pad_left + kx;
                                if (iy < 0 || iy >= c->h || ix < 0 || ix >= c->w)
                                    continue;
                                double v = c->x[((size_t)(n * c->ci + i) * c->h + iy) * c->w + ix];
                                if (c->scale) {
                                    int nc = n * c->ci + i;
                                    v = op_activation_reference(c->act,
                                                                v * c->scale[nc] + c->shift[nc]);
                                }
                                acc += c->wt[((size_t)(o * c->ci + i) * c->kh + ky) * c->kw + kx] * v;
                            }
                    total += acc * c->r[((size_t)(n * c->co + o) * c->ho + oy) * c->wo + ox];
                }
    return total;
}

typedef struct conv_grad_case {
    int n, ci, h, w, co, k;
    kv_conv_geometry g;
    bool prologue;
} conv_grad_case;

static const conv_grad_case conv_grad_cases[] = {
    {2, 3, 5, 6, 4, 3, {1, 1, 1, 1, 1}, false},   /* 3x3 same, im2col */
    {2, 33, 5, 7, 34, 3, {1, 1, 1, 1, 1}, true},  /* Winograd for the data gradient */
    {2, 5, 4, 6, 3, 1, {1, 0, 0, 0, 0}, false},   /* 1x1 */
    {2, 4, 6, 8, 3, 3, {2, 0, 0, 1, 1}, true},    /* Downsample2D */
    {2, 3, 8, 10, 4, 4, {2, 1, 1, 1, 1}, false},  /* PatchGAN, stride 2 */
    {1, 4, 5, 6, 1, 4, {1, 1, 1, 1, 1}, false},   /* PatchGAN, stride 1, one output */
};

START_TEST(conv2d_gradients_match_finite_differences)
{
    const conv_grad_case *k = &conv_grad_cases[_i];
    conv_ctx c;
    memset(&c, 0, sizeof c);
    c.n = k->n, c.ci = k->ci, c.h = k->h, c.w = k->w, c.co = k->co, c.kh = c.kw = k->k;
    c.g = k->g;
    c.ho = (c.h + c.g.pad_top + c.g.pad_bottom - c.kh) / c.g.stride + 1;
    c.wo = (c.w + c.g.pad_left + c.g.pad_right - c.kw) / c.g.stride + 1;
    c.act = KV_ACT_SILU;
    size_t nx = (size_t)c.n * c.ci * c.h * c.w, nw = (size_t)c.co * c.ci * c.kh * c.kw;
    size_t ny = (size_t)c.n * c.co * c.ho * c.wo, ns = (size_t)c.n * c.ci;
    test_rng rng = test_rng_new(700 + (uint64_t)_i);
    float *x = test_alloc(nx), *w = test_alloc(nw), *b = test_alloc((size_t)c.co),
          *r = test_alloc(ny), *sc = test_alloc(ns), *sh = test_alloc(ns);
    c.x = op_dalloc(nx), c.wt = op_dalloc(nw), c.b = op_dalloc((size_t)c.co), c.r = op_dalloc(ny);
    op_fill_both(c.x, x, nx, &rng, -1, 1);
    op_fill_both(c.wt, w, nw, &rng, -0.5, 0.5);
    op_fill_both(c.b, b, (size_t)c.co, &rng, -0.5, 0.5);
    op_fill_both(c.r, r, ny, &rng, -1, 1);
    kv_tensor tsc = op_tensor4(sc, c.n, c.ci, 1, 1), tsh = op_tensor4(sh, c.n, c.ci, 1, 1);
    kv_conv_prologue pro = {&tsc, &tsh, c.act, false};
    if (k->prologue) {
        c.scale = op_dalloc(ns), c.shift = op_dalloc(ns);
        op_fill_both(c.scale, sc, ns, &rng, 0.5, 1.5);
        op_fill_both(c.shift, sh, ns, &rng, -0.5, 0.5);
    }
    float *dw = test_alloc(nw), *db = test_alloc((size_t)c.co), *dx = test_alloc(nx);
    kv_backend *be = op_backend(2);
    kv_tensor tx = op_tensor4(x, c.n, c.ci, c.h, c.w), tr = op_tensor4(r, c.n, c.co, c.ho, c.wo);
    kv_tensor tw = op_tensor4(w, c.co, c.ci, c.kh, c.kw);
    kv_tensor tdw = op_tensor4(dw, c.co, c.ci, c.kh, c.kw);
    kv_tensor tdb = op_tensor1(db, c.co), tdx = op_tensor4(dx, c.n, c.ci, c.h, c.w);
    /* accumulation: start from ones and subtract them afterwards */
    for (size_t i = 0; i < nw; i++)
        dw[i] = 1.0f;
    ck_assert_ok(be->ops->conv2d_backward_weight(be, &tx, k->prologue ? &pro : NULL, &tr, c.g,
                                                 &tdw, &tdb));
    for (size_t i = 0; i < nw; i++)
        dw[i] -= 1.0f;
    op_check_gradient("conv dw", c.wt, nw, dw, conv_loss, &c);
    op_check_gradient("conv db", c.b, (size_t)c.co, db, conv_loss, &c);
    if (!k->prologue) { /* dx is the gradient of the conv's own input */
        ck_assert_ok(be->ops->conv2d_backward_data(be, &tr, &tw, c.g, &tdx));
        op_check_gradient("conv dx", c.x, nx, dx, conv_loss, &c);
    }
    kv_backend_destroy(be);
    free(x), free(w), free(b), free(r), free(sc), free(sh), free(dw), free(db), free(dx);
    free(c.x), free(c.wt), free(c.b), free(c.r), free(c.scale), free(c.shift);
}
END_TEST

/* The weight gradient against a float64 loop, accumulated onto random
 * values as the op does: the Winograd path (3x3 "same", 32+ channels) with
 * odd sizes, the prologue, several bands of tile rows, batch 2; the im2col
 * path beside it for shapes Winograd leaves alone. 1 and 2 threads give the
 * same bits. */
typedef struct wgrad_case {
    int n, ci, h, w, co, k;
    kv_conv_geometry g;
    bool prologue;
} wgrad_case;

static const wgrad_case wgrad_cases[] = {
    {2, 32, 9, 11, 40, 3, {1, 1, 1, 1, 1}, true},   /* Winograd, odd sizes, prologue */
    {2, 33, 6, 5, 35, 3, {1, 1, 1, 1, 1}, false},   /* Winograd, odd channels, tiny */
    {1, 64, 70, 66, 32, 3, {1, 1, 1, 1, 1}, true},  /* Winograd, two bands of tile rows */
    {2, 96, 3, 3, 64, 3, {1, 1, 1, 1, 1}, false},   /* Winograd, one partial tile per row */
    {2, 31, 9, 11, 40, 3, {1, 1, 1, 1, 1}, true},   /* im2col: too few channels in */
    {2, 40, 9, 11, 36, 3, {2, 1, 1, 1, 1}, false},  /* im2col: stride 2 */
};

START_TEST(conv2d_weight_gradient_matches_float64_reference)
{
    const wgrad_case *k = &wgrad_cases[_i];
    const int ho = (k->h + k->g.pad_top + k->g.pad_bottom - k->k) / k->g.stride + 1;
    const int wo = (k->w + k->g.pad_left + k->g.pad_right - k->k) / k->g.stride + 1;
    const size_t nx = (size_t)k->n * k->ci * k->h * k->w, ny = (size_t)k->n * k->co * ho * wo;
    const size_t nw = (size_t)k->co * k->ci * k->k * k->k, ns = (size_t)k->n * k->ci;
    test_rng rng = test_rng_new(900 + (uint64_t)_i);
    float *x = test_alloc(nx), *dy = test_alloc(ny), *sc = test_alloc(ns), *sh = test_alloc(ns);
    float *dw1 = test_alloc(nw), *dw2 = test_alloc(nw), *db = test_alloc((size_t)k->co);
    double *ref = calloc(nw, sizeof *ref);
    ck_assert_ptr_nonnull(ref);
    test_fill(x, nx, &rng, -1.0f, 1.0f);
    test_fill(dy, ny, &rng, -1.0f, 1.0f);
    test_fill(sc, ns, &rng, 0.5f, 1.5f);
    test_fill(sh, ns, &rng, -0.5f, 0.5f);
    test_fill(dw1, nw, &rng, -1.0f, 1.0f);
    memcpy(dw2, dw1, nw * sizeof(float));
    for (size_t i = 0; i < nw; i++)
        ref[i] = dw1[i];
    for (int n = 0; n < k->n; n++)
        for (int o = 0; o < k->co; o++)
            for (int i = 0; i < k->ci; i++)
                for (int ky = 0; ky < k->k; ky++)
                    for (int kx = 0; kx < k->k; kx++) {
                        double acc = 0.0;
                        for (int oy = 0; oy < ho; oy++)
                            for (int ox = 0; ox < wo; ox++) {
                                int iy = oy * k->g.stride - k->g.pad_top + ky;
                                int ix = ox * k->g.stride - k->g.pad_left + kx;
                                if (iy < 0 || iy >= k->h || ix < 0 || ix >= k->w)
                                    continue;
                                const size_t nc = (size_t)n * k->ci + i;
                                double v = x[(nc * k->h + iy) * k->w + ix];
                                if (k->prologue)
                                    v = op_activation_reference(KV_ACT_SILU, v * sc[nc] + sh[nc]);
                                acc += v * dy[(((size_t)n * k->co + o) * ho + oy) * wo + ox];
                            }
                        ref[(((size_t)o * k->ci + i) * k->k + ky) * k->k + kx] += acc;
                    }
    kv_tensor tx = op_tensor4(x, k->n, k->ci, k->h, k->w), tdy = op_tensor4(dy, k->n, k->co, ho, wo);
    kv_tensor tsc = op_tensor4(sc, k->n, k->ci, 1, 1), tsh = op_tensor4(sh, k->n, k->ci, 1, 1);
    kv_tensor tdw1 = op_tensor4(dw1, k->co, k->ci, k->k, k->k);
    kv_tensor tdw2 = op_tensor4(dw2, k->co, k->ci, k->k, k->k), tdb = op_tensor1(db, k->co);
    kv_conv_prologue pro = {&tsc, &tsh, KV_ACT_SILU, false};
    kv_backend *one = op_backend(1), *two = op_backend(2);
    ck_assert_ok(one->ops->conv2d_backward_weight(one, &tx, k->prologue ? &pro : NULL, &tdy, k->g,
                                                  &tdw1, &tdb));
    ck_assert_ok(two->ops->conv2d_backward_weight(two, &tx, k->prologue ? &pro : NULL, &tdy, k->g,
                                                  &tdw2, &tdb));
    const double err = op_relative_error(dw1, ref, nw);
    ck_assert_msg(err < OP_TOLERANCE, "case %d: relative error %g", _i, err);
    ck_assert_msg(memcmp(dw1, dw2, nw * sizeof(float)) == 0, "case %d: 1 and 2 threads differ", _i);
    kv_backend_destroy(one);
    kv_backend_destroy(two);
    free(x), free(dy), free(sc), free(sh), free(dw1), free(dw2), free(db), free(ref);
}
END_TEST

Suite *suite_conv2d_ops(void)
{
    Suite *s = suite_create("conv2d");
    TCase *forward = op_tcase(s, "forward"), *backward = op_tcase(s, "backward");
    tcase_add_loop_test(forward, conv2d_matches_float64_reference, 0,
                        (int)(sizeof conv_cases / sizeof conv_cases[0]));
    tcase_add_loop_test(forward, conv2d_prologue_matches_float64_reference, 0, 4);
    tcase_add_loop_test(forward, conv2d_residual_and_upsample_match_float64_reference, 0, 8);
    tcase_add_loop_test(forward, conv2d_bf16_matches_float64_reference, 0,
                        (int)(sizeof bf16_cases / sizeof bf16_cases[0]));
    tcase_add_loop_test(forward, conv2d_bf16_prologue_upsample_residual, 0, 2);
    tcase_add_loop_test(backward, conv2d_bf16_backward_data, 0, 3);
    tcase_add_loop_test(backward, conv2d_weight_gradient_matches_float64_reference, 0,
                        (int)(sizeof wgrad_cases / sizeof wgrad_cases[0]));
    tcase_add_loop_test(backward, conv2d_gradients_match_finite_differences, 0,
                        (int)(sizeof conv_grad_cases / sizeof conv_grad_cases[0]));
    return s;
}
