/* test_grad.c — every backward op against central finite differences of a
 * float64 reference forward, on small random tensors.
 *
 * Each test builds a scalar L = sum(R * op(inputs)) with a random upstream R,
 * differentiates the float64 forward numerically (h = 1e-5, so truncation
 * and rounding errors are far below the float32 errors under test), and
 * compares with the op's float32 backward: max |analytic - numeric| must be
 * below GRAD_TOLERANCE times the largest |numeric| of that gradient. Where a
 * gradient has thousands of elements, a fixed random sample of them is
 * differentiated. */
#include "backend/backend.h"
#include "backend/cpu/cpu_ops.h"
#include "base/philox.h"
#include "test_util.h"

#define GRAD_TOLERANCE 1e-4
#define FD_STEP 1e-5
#define FD_SAMPLES 60

static kv_backend *backend(void)
{
    kv_backend_settings settings = {2, 0, KV_PRECISION_FP32};
    kv_backend *be = NULL;
    ck_assert_ok(kv_cpu_backend_create(&settings, &be));
    return be;
}

static kv_tensor t4(float *d, int n, int c, int h, int w)
{
    return kv_tensor_wrap(d, n, c, h, w);
}

static kv_tensor t1(float *d, int n)
{
    kv_tensor t = kv_tensor_wrap(d, n, 1, 1, 1);
    t.ndim = 1;
    return t;
}

/* A loss over double inputs the test can perturb. */
typedef double (*loss_fn)(void *ctx);

static double numeric(double *x, loss_fn f, void *ctx)
{
    double old = *x;
    *x = old + FD_STEP;
    double plus = f(ctx);
    *x = old - FD_STEP;
    double minus = f(ctx);
    *x = old;
    return (plus - minus) / (2.0 * FD_STEP);
}

/* Compares analytic (float) with numeric gradients of every element of x,
 * or FD_SAMPLES of them chosen by a fixed generator when x is large. */
static void check_gradient(const char *what, double *x, size_t n, const float *analytic,
                           loss_fn f, void *ctx)
{
    test_rng rng = test_rng_new(n * 31 + 7);
    size_t checks = n <= 2 * FD_SAMPLES ? n : FD_SAMPLES;
    double worst = 0.0, scale = 0.0;
    size_t worst_at = 0;
    double worst_num = 0.0;
    for (size_t k = 0; k < checks; k++) {
        size_t i = checks == n ? k : (size_t)(test_uniform(&rng) * (double)n);
        double num = numeric(&x[i], f, ctx);
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

static void fill_both(double *d, float *f, size_t n, test_rng *rng, double lo, double hi)
{
    for (size_t i = 0; i < n; i++) {
        f[i] = (float)(lo + (hi - lo) * test_uniform(rng));
        d[i] = f[i];
    }
}

static double *dalloc(size_t n)
{
    double *p = calloc(n ? n : 1, sizeof *p);
    ck_assert_ptr_nonnull(p);
    return p;
}

static double act_ref(kv_activation act, double v)
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

/* ---- conv2d ---- */

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
                                if (c->scale)
                                    v = act_ref(c->act, v * c->scale[n * c->ci + i] +
                                                            c->shift[n * c->ci + i]);
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
    c.x = dalloc(nx), c.wt = dalloc(nw), c.b = dalloc((size_t)c.co), c.r = dalloc(ny);
    fill_both(c.x, x, nx, &rng, -1, 1);
    fill_both(c.wt, w, nw, &rng, -0.5, 0.5);
    fill_both(c.b, b, (size_t)c.co, &rng, -0.5, 0.5);
    fill_both(c.r, r, ny, &rng, -1, 1);
    kv_tensor tsc = t4(sc, c.n, c.ci, 1, 1), tsh = t4(sh, c.n, c.ci, 1, 1);
    kv_conv_prologue pro = {&tsc, &tsh, c.act};
    if (k->prologue) {
        c.scale = dalloc(ns), c.shift = dalloc(ns);
        fill_both(c.scale, sc, ns, &rng, 0.5, 1.5);
        fill_both(c.shift, sh, ns, &rng, -0.5, 0.5);
    }
    float *dw = test_alloc(nw), *db = test_alloc((size_t)c.co), *dx = test_alloc(nx);
    kv_backend *be = backend();
    kv_tensor tx = t4(x, c.n, c.ci, c.h, c.w), tr = t4(r, c.n, c.co, c.ho, c.wo);
    kv_tensor tw = t4(w, c.co, c.ci, c.kh, c.kw), tdw = t4(dw, c.co, c.ci, c.kh, c.kw);
    kv_tensor tdb = t1(db, c.co), tdx = t4(dx, c.n, c.ci, c.h, c.w);
    /* accumulation: start from ones and subtract them afterwards */
    for (size_t i = 0; i < nw; i++)
        dw[i] = 1.0f;
    ck_assert_ok(be->ops->conv2d_backward_weight(be, &tx, k->prologue ? &pro : NULL, &tr, c.g,
                                                 &tdw, &tdb));
    for (size_t i = 0; i < nw; i++)
        dw[i] -= 1.0f;
    check_gradient("conv dw", c.wt, nw, dw, conv_loss, &c);
    check_gradient("conv db", c.b, (size_t)c.co, db, conv_loss, &c);
    if (!k->prologue) { /* dx is the gradient of the conv's own input */
        ck_assert_ok(be->ops->conv2d_backward_data(be, &tr, &tw, c.g, &tdx));
        check_gradient("conv dx", c.x, nx, dx, conv_loss, &c);
    }
    kv_backend_destroy(be);
    free(x), free(w), free(b), free(r), free(sc), free(sh), free(dw), free(db), free(dx);
    free(c.x), free(c.wt), free(c.b), free(c.r), free(c.scale), free(c.shift);
}
END_TEST

/* ---- group norm with activation ---- */

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
                    total += act_ref(g->act, u) * g->r[((size_t)n * g->c + c) * g->hw + i];
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
    g.x = dalloc(n), g.r = dalloc(n), g.gamma = dalloc(6), g.beta = dalloc(6);
    fill_both(g.x, x, n, &rng, -2, 3);
    fill_both(g.r, r, n, &rng, -1, 1);
    fill_both(g.gamma, gamma, 6, &rng, 0.5, 1.5);
    fill_both(g.beta, beta, 6, &rng, -0.5, 0.5);
    float scale[12], shift[12], mean[6], rstd[6], dgamma[6] = {0}, dbeta[6] = {0};
    float *dx = test_alloc(n);
    kv_backend *be = backend();
    kv_tensor tx = t4(x, g.n, g.c, 5, 7), tg = t1(gamma, 6), tb = t1(beta, 6);
    kv_tensor ts = t4(scale, g.n, g.c, 1, 1), tt = t4(shift, g.n, g.c, 1, 1);
    kv_tensor tm = t4(mean, g.n, g.groups, 1, 1), trs = t4(rstd, g.n, g.groups, 1, 1);
    kv_tensor tr = t4(r, g.n, g.c, 5, 7), tdx = t4(dx, g.n, g.c, 5, 7);
    kv_tensor tdg = t1(dgamma, 6), tdb = t1(dbeta, 6);
    ck_assert_ok(be->ops->group_norm_stats(be, &tx, &tg, &tb, g.groups, 1e-6f, &ts, &tt, &tm, &trs));
    ck_assert_ok(be->ops->group_norm_backward(be, &tx, &tg, &ts, &tt, &tm, &trs, g.groups, g.act,
                                              &tr, &tdx, &tdg, &tdb));
    check_gradient("group norm dx", g.x, n, dx, gn_loss, &g);
    check_gradient("group norm dgamma", g.gamma, 6, dgamma, gn_loss, &g);
    check_gradient("group norm dbeta", g.beta, 6, dbeta, gn_loss, &g);
    kv_backend_destroy(be);
    free(x), free(r), free(dx), free(g.x), free(g.r), free(g.gamma), free(g.beta);
}
END_TEST

/* ---- attention ---- */

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
    a.q = dalloc(n), a.k = dalloc(n), a.v = dalloc(n), a.r = dalloc(n);
    fill_both(a.q, q, n, &rng, -1.5, 1.5);
    fill_both(a.k, k, n, &rng, -1.5, 1.5);
    fill_both(a.v, v, n, &rng, -1, 1);
    fill_both(a.r, r, n, &rng, -1, 1);
    kv_backend *be = backend();
    kv_tensor tq = t4(q, 2, 5, 3, 4), tk = t4(k, 2, 5, 3, 4), tv = t4(v, 2, 5, 3, 4),
              tr = t4(r, 2, 5, 3, 4), tdq = t4(dq, 2, 5, 3, 4), tdk = t4(dk, 2, 5, 3, 4),
              tdv = t4(dv, 2, 5, 3, 4);
    ck_assert_ok(be->ops->attention_backward(be, &tq, &tk, &tv, (float)a.scale, &tr, &tdq, &tdk,
                                             &tdv));
    check_gradient("attention dq", a.q, n, dq, attn_loss, &a);
    check_gradient("attention dk", a.k, n, dk, attn_loss, &a);
    check_gradient("attention dv", a.v, n, dv, attn_loss, &a);
    kv_backend_destroy(be);
    free(q), free(k), free(v), free(r), free(dq), free(dk), free(dv);
    free(a.q), free(a.k), free(a.v), free(a.r);
}
END_TEST

/* ---- small elementwise ops ---- */

typedef struct simple_ctx {
    int n, c, h, w, kind;
    double *x, *r, *aux;
} simple_ctx;

/* kind 0: upsample, 1: max pool, 2: relu, 3: leaky relu, 4: unit normalize */
static double simple_loss(void *p)
{
    simple_ctx *s = p;
    double total = 0.0;
    const int planes = s->n * s->c;
    if (s->kind == 0) {
        for (int q = 0; q < planes; q++)
            for (int y = 0; y < 2 * s->h; y++)
                for (int x = 0; x < 2 * s->w; x++)
                    total += s->x[((size_t)q * s->h + y / 2) * s->w + x / 2] *
                             s->r[((size_t)q * 2 * s->h + y) * 2 * s->w + x];
    } else if (s->kind == 1) {
        int ho = s->h / 2, wo = s->w / 2;
        for (int q = 0; q < planes; q++)
            for (int y = 0; y < ho; y++)
                for (int x = 0; x < wo; x++) {
                    const double *a = s->x + ((size_t)q * s->h + 2 * y) * s->w + 2 * x;
                    double m = fmax(fmax(a[0], a[1]), fmax(a[s->w], a[s->w + 1]));
                    total += m * s->r[((size_t)q * ho + y) * wo + x];
                }
    } else if (s->kind == 2 || s->kind == 3) {
        for (size_t i = 0; i < (size_t)planes * s->h * s->w; i++)
            total += act_ref(s->kind == 2 ? KV_ACT_RELU : KV_ACT_LEAKY_RELU, s->x[i]) * s->r[i];
    } else {
        size_t plane = (size_t)s->h * s->w;
        for (int n = 0; n < s->n; n++)
            for (size_t p = 0; p < plane; p++) {
                double ss = 0;
                for (int c = 0; c < s->c; c++)
                    ss += s->x[((size_t)n * s->c + c) * plane + p] * s->x[((size_t)n * s->c + c) * plane + p];
                double inv = 1.0 / (sqrt(ss) + 1e-10);
                for (int c = 0; c < s->c; c++)
                    total += s->x[((size_t)n * s->c + c) * plane + p] * inv *
                             s->r[((size_t)n * s->c + c) * plane + p];
            }
    }
    return total;
}

START_TEST(small_op_backwards_match_finite_differences)
{
    static const char *const names[] = {"upsample", "max pool", "relu", "leaky relu",
                                        "unit normalize"};
    simple_ctx s = {2, 3, 5, 7, _i, NULL, NULL, NULL};
    size_t nx = (size_t)s.n * s.c * s.h * s.w;
    size_t ny = _i == 0 ? 4 * nx : _i == 1 ? (size_t)s.n * s.c * (s.h / 2) * (s.w / 2) : nx;
    test_rng rng = test_rng_new(1000 + (uint64_t)_i);
    float *x = test_alloc(nx), *r = test_alloc(ny), *y = test_alloc(ny), *dx = test_alloc(nx),
          *norms = test_alloc((size_t)s.n * s.h * s.w);
    s.x = dalloc(nx), s.r = dalloc(ny);
    fill_both(s.x, x, nx, &rng, -1, 1);
    fill_both(s.r, r, ny, &rng, -1, 1);
    /* keep values away from the kinks so that the differences are smooth */
    for (size_t i = 0; i < nx; i++)
        if (fabs(s.x[i]) < 0.02)
            s.x[i] = x[i] = 0.5f;
    kv_backend *be = backend();
    kv_tensor tx = t4(x, s.n, s.c, s.h, s.w), tdx = t4(dx, s.n, s.c, s.h, s.w);
    kv_tensor tn = t4(norms, s.n, 1, s.h, s.w);
    if (_i == 0) {
        kv_tensor tr = t4(r, s.n, s.c, 2 * s.h, 2 * s.w);
        ck_assert_ok(be->ops->upsample_nearest2x_backward(be, &tr, &tdx));
    } else if (_i == 1) {
        kv_tensor tr = t4(r, s.n, s.c, s.h / 2, s.w / 2);
        ck_assert_ok(be->ops->max_pool2x2_backward(be, &tx, &tr, &tdx));
    } else if (_i == 2 || _i == 3) {
        kv_activation act = _i == 2 ? KV_ACT_RELU : KV_ACT_LEAKY_RELU;
        kv_tensor ty = t4(y, s.n, s.c, s.h, s.w), tr = t4(r, s.n, s.c, s.h, s.w);
        ck_assert_ok(be->ops->activation(be, &tx, act, &ty));
        ck_assert_ok(be->ops->activation_backward(be, &ty, &tr, act, &tdx));
    } else {
        kv_tensor ty = t4(y, s.n, s.c, s.h, s.w), tr = t4(r, s.n, s.c, s.h, s.w);
        ck_assert_ok(be->ops->unit_normalize(be, &tx, &ty, &tn));
        ck_assert_ok(be->ops->unit_normalize_backward(be, &tx, &tn, &tr, &tdx));
    }
    check_gradient(names[_i], s.x, nx, dx, simple_loss, &s);
    kv_backend_destroy(be);
    free(x), free(r), free(y), free(dx), free(norms), free(s.x), free(s.r);
}
END_TEST

START_TEST(unit_normalize_gradient_is_zero_for_a_zero_vector)
{
    /* PyTorch gives NaN here; libklvae gives 0. */
    float x[2 * 3 * 2] = {0, 1, 0, -2, 0, 0.5f, 0, 1, 0, 3, 0, -1}; /* pixel 0 all zero */
    float y[12], norms[4], dy[12], dx[12];
    for (int i = 0; i < 12; i++)
        dy[i] = 1.0f + (float)i;
    kv_backend *be = backend();
    kv_tensor tx = t4(x, 2, 3, 1, 2), ty = t4(y, 2, 3, 1, 2), tn = t4(norms, 2, 1, 1, 2);
    kv_tensor tdy = t4(dy, 2, 3, 1, 2), tdx = t4(dx, 2, 3, 1, 2);
    ck_assert_ok(be->ops->unit_normalize(be, &tx, &ty, &tn));
    ck_assert_ok(be->ops->unit_normalize_backward(be, &tx, &tn, &tdy, &tdx));
    for (int n = 0; n < 2; n++)
        for (int c = 0; c < 3; c++) {
            ck_assert(isfinite(dx[(n * 3 + c) * 2 + 1]));
            ck_assert_float_eq(dx[(n * 3 + c) * 2 + 0], 0.0f);
            ck_assert_float_eq(y[(n * 3 + c) * 2 + 0], 0.0f);
        }
    kv_backend_destroy(be);
}
END_TEST

/* ---- LPIPS distance ---- */

typedef struct lpips_ctx {
    int n, c, hw;
    double *a, *b, *w;
    const float *gscale;
} lpips_ctx;

static double lpips_loss(void *p)
{
    lpips_ctx *l = p;
    double total = 0.0;
    for (int n = 0; n < l->n; n++) {
        double v = 0;
        for (int c = 0; c < l->c; c++)
            for (int i = 0; i < l->hw; i++) {
                size_t at = ((size_t)n * l->c + c) * l->hw + i;
                double d = l->a[at] - l->b[at];
                v += l->w[c] * d * d;
            }
        total += l->gscale[n] * v / l->hw;
    }
    return total;
}

START_TEST(lpips_distance_matches_definition_and_gradient)
{
    const int n = 2, c = 4, h = 3, w = 5;
    const size_t count = (size_t)n * c * h * w;
    test_rng rng = test_rng_new(1100);
    float *a = test_alloc(count), *b = test_alloc(count), *db = test_alloc(count), wl[4];
    lpips_ctx l = {n, c, h * w, dalloc(count), dalloc(count), dalloc(4), NULL};
    fill_both(l.a, a, count, &rng, -1, 1);
    fill_both(l.b, b, count, &rng, -1, 1);
    fill_both(l.w, wl, 4, &rng, 0.1, 1);
    const float gscale[2] = {0.7f, -1.3f};
    l.gscale = gscale;
    double values[2];
    kv_backend *be = backend();
    kv_tensor ta = t4(a, n, c, h, w), tb = t4(b, n, c, h, w), tw = t4(wl, 1, c, 1, 1),
              tdb = t4(db, n, c, h, w);
    ck_assert_ok(be->ops->lpips_distance(be, &ta, &tb, &tw, 0.0f, 0, values, gscale, &tdb));
    for (int k = 0; k < n; k++) {
        lpips_ctx one = l;
        float unit[2] = {0, 0};
        unit[k] = 1.0f;
        one.gscale = unit;
        ck_assert_double_le(fabs(values[k] - lpips_loss(&one)), 1e-6 * fabs(values[k]));
    }
    check_gradient("lpips db", l.b, count, db, lpips_loss, &l);
    /* dropout: about half the terms vanish, the rest double; same seed, same mask */
    double dropped[2], again[2];
    ck_assert_ok(be->ops->lpips_distance(be, &ta, &tb, &tw, 0.5f, 42, dropped, NULL, NULL));
    ck_assert_ok(be->ops->lpips_distance(be, &ta, &tb, &tw, 0.5f, 42, again, NULL, NULL));
    ck_assert_double_eq(dropped[0], again[0]);
    ck_assert_double_ne(dropped[0], values[0]);
    ck_assert_double_lt(fabs(dropped[0] / values[0] - 1.0), 0.6);
    kv_backend_destroy(be);
    free(a), free(b), free(db), free(l.a), free(l.b), free(l.w);
}
END_TEST

/* ---- batch norm (training mode) ---- */

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
    b.x = dalloc(n), b.r = dalloc(n), b.gamma = dalloc(4), b.beta = dalloc(4);
    fill_both(b.x, x, n, &rng, -2, 3);
    fill_both(b.r, r, n, &rng, -1, 1);
    fill_both(b.gamma, gamma, 4, &rng, 0.5, 1.5);
    fill_both(b.beta, beta, 4, &rng, -0.5, 0.5);
    kv_backend *be = backend();
    kv_tensor tx = t4(x, 3, 4, 2, 5), ty = t4(y, 3, 4, 2, 5), tr = t4(r, 3, 4, 2, 5),
              tdx = t4(dx, 3, 4, 2, 5), tg = t1(gamma, 4), tb = t1(beta, 4), tm = t1(mean, 4),
              ti = t1(invstd, 4), tdg = t1(dgamma, 4), tdb = t1(dbeta, 4);
    ck_assert_ok(be->ops->batch_norm(be, &tx, &tg, &tb, 1e-5f, 0.1f, rmean, rvar, &ty, &tm, &ti));
    ck_assert_ok(be->ops->batch_norm_backward(be, &tx, &tg, &tm, &ti, &tr, &tdx, &tdg, &tdb));
    check_gradient("batch norm dx", b.x, n, dx, bn_loss, &b);
    check_gradient("batch norm dgamma", b.gamma, 4, dgamma, bn_loss, &b);
    check_gradient("batch norm dbeta", b.beta, 4, dbeta, bn_loss, &b);
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

/* ---- losses ---- */

START_TEST(pixel_and_logit_losses_match_their_definitions)
{
    const size_t n = 2 * 3 * 4 * 5;
    test_rng rng = test_rng_new(1300);
    float *x = test_alloc(n), *xh = test_alloc(n), *g = test_alloc(n);
    test_fill(x, n, &rng, -1, 1);
    test_fill(xh, n, &rng, -1, 1);
    xh[3] = x[3]; /* sign(0) = 0 */
    kv_backend *be = backend();
    kv_tensor tx = t4(x, 2, 3, 4, 5), txh = t4(xh, 2, 3, 4, 5), tg = t4(g, 2, 3, 4, 5);
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
    kv_tensor tl = t4(l, 2, 1, 2, 2), tgl = t4(gl, 2, 1, 2, 2);
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

/* ---- posterior and KL ---- */

typedef struct post_ctx {
    int n, z, hw;
    double *moments, *r;
    double kl_weight;
    uint64_t seed;
} post_ctx;

static double post_loss(void *p)
{
    post_ctx *q = p;
    double total = 0.0;
    for (int n = 0; n < q->n; n++)
        for (int c = 0; c < q->z; c++)
            for (int i = 0; i < q->hw; i++) {
                double mu = q->moments[((size_t)n * 2 * q->z + c) * q->hw + i];
                double l = q->moments[((size_t)n * 2 * q->z + q->z + c) * q->hw + i];
                double s = l < -30 ? -30 : (l > 20 ? 20 : l);
                size_t zi = ((size_t)n * q->z + c) * q->hw + i;
                double eps = kv_philox_normal(q->seed, zi);
                double zv = mu + exp(0.5 * s) * eps;
                total += zv * q->r[zi] + q->kl_weight * 0.5 * (mu * mu + exp(s) - 1 - s);
            }
    return total;
}

START_TEST(posterior_backward_matches_finite_differences)
{
    post_ctx q = {2, 3, 4 * 5, NULL, NULL, 0.3, 77};
    size_t nm = (size_t)q.n * 2 * q.z * q.hw, nz = (size_t)q.n * q.z * q.hw;
    test_rng rng = test_rng_new(1400);
    float *m = test_alloc(nm), *r = test_alloc(nz), *dm = test_alloc(nm);
    q.moments = dalloc(nm), q.r = dalloc(nz);
    fill_both(q.moments, m, nm, &rng, -3, 3);
    fill_both(q.r, r, nz, &rng, -1, 1);
    /* some logvars beyond the clamp: no gradient there */
    m[nz / q.n + 1] = -40.0f, q.moments[nz / q.n + 1] = -40.0;
    kv_backend *be = backend();
    kv_tensor tm = t4(m, q.n, 2 * q.z, 4, 5), tr = t4(r, q.n, q.z, 4, 5),
              tdm = t4(dm, q.n, 2 * q.z, 4, 5);
    ck_assert_ok(be->ops->posterior_backward(be, &tm, &tr, (float)q.kl_weight, true, q.seed, &tdm));
    check_gradient("posterior dmoments", q.moments, nm, dm, post_loss, &q);
    ck_assert_float_eq(dm[nz / q.n + 1], 0.0f);
    double kl, want = 0;
    ck_assert_ok(be->ops->kl_sum(be, &tm, &kl));
    for (int n = 0; n < q.n; n++)
        for (int c = 0; c < q.z; c++)
            for (int i = 0; i < q.hw; i++) {
                double mu = q.moments[((size_t)n * 2 * q.z + c) * q.hw + i];
                double l = q.moments[((size_t)n * 2 * q.z + q.z + c) * q.hw + i];
                double s = l < -30 ? -30 : (l > 20 ? 20 : l);
                want += 0.5 * (mu * mu + exp(s) - 1 - s);
            }
    ck_assert_double_le(fabs(kl - want), 1e-9 * fabs(want));
    kv_backend_destroy(be);
    free(m), free(r), free(dm), free(q.moments), free(q.r);
}
END_TEST

/* ---- Adam ---- */

START_TEST(adam_follows_pytorch_update)
{
    const size_t n = 100;
    test_rng rng = test_rng_new(1500);
    float *p = test_alloc(n), *g = test_alloc(n), *m = test_alloc(n), *v = test_alloc(n);
    double *pd = dalloc(n), *md = dalloc(n), *vd = dalloc(n);
    fill_both(pd, p, n, &rng, -1, 1);
    kv_backend *be = backend();
    kv_tensor tp = t1(p, (int)n), tg = t1(g, (int)n), tm = t1(m, (int)n), tv = t1(v, (int)n);
    const double lr = 1e-2, b1 = 0.5, b2 = 0.9, eps = 1e-8;
    for (int step = 1; step <= 4; step++) {
        test_fill(g, n, &rng, -1, 1);
        g[7] = 0.0f; /* zero gradients leave the parameter alone */
        ck_assert_ok(be->ops->adam(be, &tp, &tg, &tm, &tv, (float)lr, (float)b1, (float)b2,
                                   (float)eps, step));
        for (size_t i = 0; i < n; i++) {
            md[i] = b1 * md[i] + (1 - b1) * g[i];
            vd[i] = b2 * vd[i] + (1 - b2) * (double)g[i] * g[i];
            double denom = sqrt(vd[i]) / sqrt(1 - pow(b2, step)) + eps;
            pd[i] -= lr / (1 - pow(b1, step)) * md[i] / denom;
        }
    }
    for (size_t i = 0; i < n; i++)
        ck_assert_double_le(fabs(p[i] - pd[i]), 1e-6);
    kv_backend_destroy(be);
    free(p), free(g), free(m), free(v), free(pd), free(md), free(vd);
}
END_TEST

Suite *suite_grad(void)
{
    Suite *s = suite_create("grad");
    TCase *tc = tcase_create("backward");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, conv2d_gradients_match_finite_differences, 0,
                        (int)(sizeof conv_grad_cases / sizeof conv_grad_cases[0]));
    tcase_add_loop_test(tc, group_norm_backward_matches_finite_differences, 0, 4);
    tcase_add_test(tc, attention_backward_matches_finite_differences);
    tcase_add_loop_test(tc, small_op_backwards_match_finite_differences, 0, 5);
    tcase_add_test(tc, unit_normalize_gradient_is_zero_for_a_zero_vector);
    tcase_add_test(tc, lpips_distance_matches_definition_and_gradient);
    tcase_add_test(tc, batch_norm_backward_matches_finite_differences);
    tcase_add_test(tc, pixel_and_logit_losses_match_their_definitions);
    tcase_add_test(tc, posterior_backward_matches_finite_differences);
    tcase_add_test(tc, adam_follows_pytorch_update);
    suite_add_tcase(s, tc);
    return s;
}
