/* test_cuda.c — the CUDA backend against the CPU backend, on fresh random
 * inputs (the seed is printed; --seed repeats a run).
 *
 *   test_cuda [--plugin PATH] [--device N] [--seed S] [--quick] [--only-ops]
 *             [--require-gpu] [--tiny]
 *   test_cuda bench ...   (in the GPU bundle: tools/bench_cuda.c's program)
 *
 * Without a usable plugin or GPU it prints "SKIPPED: ..." and exits 0 (make
 * check runs it that way on machines without a GPU), or 1 with
 * --require-gpu (tests/gpu/check.sh: on a GPU machine a plugin that does not
 * load is a failure). With one it checks, in each precision (fp32, tf32,
 * bf16) and so in both of the backend's layouts (NCHW in fp32, NHWC in tf32
 * and bf16; bf16 in NCHW too, KLVAE_CUDA_LAYOUT=nchw):
 *   - every inference op (conv2d in every geometry, with a group-norm
 *     prologue, the 2x upsample read in its staging, a residual, with the
 *     work cut into bands and chunks, with and without cuDNN's fused
 *     epilogue; group_norm_stats into float32 and compute tensors;
 *     group_norm with every activation and in place; add with aliasing and
 *     mixed storage; upsample; attention in one and in many query blocks;
 *     posterior_split; gaussian_sample) against the CPU: relative L2 error
 *     at most 1e-5 in fp32 and 1e-2 in tf32 and bf16; outputs are poisoned
 *     with NaN first and no NaN or Inf passes;
 *   - fp32 convolutions with each cuDNN algorithm forced in turn: the
 *     allowed ones (conv2d.cu's algo_allowed) must meet 1e-5 through a whole
 *     model; the excluded ones are measured and printed (INFO);
 *   - gaussian_sample bit for bit equal to the CPU on float32 tensors, in
 *     every precision;
 *   - whole encode and decode of a random-weight SD-config model at 64^2 and
 *     256^2 (--quick: 64^2, fp32 and bf16 only): fp32 within 1e-5, tf32
 *     within 1e-2, bf16 within 1.5 times PyTorch's own bf16 error
 *     (tests/gpu/bf16_reference.json);
 *   - klvae_*_device equal to the host API, through the core's plugin loader;
 *   - training refused up front: the table lacks the training ops.
 * --tiny: a few ops in fp32 and bf16 (for compute-sanitizer, which makes
 * everything slow). One line per check, then "test_cuda: N passed, N
 * failed, N skipped". */
#include <time.h>
#include <unistd.h>

#include "test_cuda.h"

/* ---- conv2d ---- */

typedef struct conv_case {
    const char *name;
    int n, c, h, w, co, k;
    kv_conv_geometry g;
    int act; /* prologue activation, or -1 for none */
    int bias, residual, up;
} conv_case;

static const conv_case conv_cases[] = {
    {"conv2d 3x3 conv_in 3->32", 2, 3, 17, 23, 32, 3, {1, 1, 1, 1, 1}, -1, 1, 0, 0},
    {"conv2d 3x3 GN+SiLU prologue 32->48", 2, 32, 16, 20, 48, 3, {1, 1, 1, 1, 1}, KV_ACT_SILU, 1,
     0, 0},
    {"conv2d 1x1 24->24", 3, 24, 9, 13, 24, 1, {1, 0, 0, 0, 0}, -1, 1, 0, 0},
    {"conv2d 3x3 stride-2 pad b/r (odd size)", 2, 32, 15, 18, 32, 3, {2, 0, 0, 1, 1}, -1, 1, 0, 0},
    {"conv2d 3x3 GELU prologue 64->64", 1, 64, 32, 32, 64, 3, {1, 1, 1, 1, 1}, KV_ACT_GELU, 1, 0,
     0},
    {"conv2d 3x3 Mish prologue, no bias", 2, 16, 11, 7, 8, 3, {1, 1, 1, 1, 1}, KV_ACT_MISH, 0, 0,
     0},
    {"conv2d 3x3 conv_out 64->3 SiLU", 2, 64, 24, 24, 3, 3, {1, 1, 1, 1, 1}, KV_ACT_SILU, 1, 0, 0},
    {"conv2d 3x3 prologue none 40->40", 1, 40, 64, 48, 40, 3, {1, 1, 1, 1, 1}, KV_ACT_NONE, 1, 0,
     0},
    {"conv2d 3x3 GN+SiLU + residual 64->64", 2, 64, 18, 14, 64, 3, {1, 1, 1, 1, 1}, KV_ACT_SILU, 1,
     1, 0},
    {"conv2d 1x1 + residual 32->32", 2, 32, 9, 11, 32, 1, {1, 0, 0, 0, 0}, -1, 1, 1, 0},
    {"conv2d 3x3 upsample 2x 32->32", 2, 32, 7, 9, 32, 3, {1, 1, 1, 1, 1}, -1, 1, 0, 1},
    {"conv2d 3x3 upsample 2x 5->8, no bias", 1, 5, 6, 5, 8, 3, {1, 1, 1, 1, 1}, -1, 0, 0, 1},
    {"conv2d 3x3 GN+SiLU + upsample + residual", 2, 16, 5, 6, 24, 3, {1, 1, 1, 1, 1}, KV_ACT_SILU,
     1, 1, 1},
    {"conv2d 3x3 + residual, no bias 24->24", 2, 24, 10, 7, 24, 3, {1, 1, 1, 1, 1}, -1, 0, 1, 0},
};

/* conv2d of case k on gpu against the CPU; the prologue's scale and shift
 * in float32 storage, as the model's group norms give them. */
static void test_conv(suite *s, kv_backend *gpu, kv_precision p, const conv_case *k,
                      const char *tag)
{
    char what[160];
    snprintf(what, sizeof what, "%s%s", k->name, tag);
    const int hi = k->h << k->up, wi = k->w << k->up;
    const int ho = (hi + k->g.pad_top + k->g.pad_bottom - k->k) / k->g.stride + 1;
    const int wo = (wi + k->g.pad_left + k->g.pad_right - k->k) / k->g.stride + 1;
    size_t nx = (size_t)k->n * k->c * k->h * k->w, nw = (size_t)k->co * k->c * k->k * k->k;
    size_t ny = (size_t)k->n * k->co * ho * wo, nc = (size_t)k->n * k->c;
    float *x = alloc_floats(nx), *w = alloc_floats(nw), *b = alloc_floats((size_t)k->co);
    float *sc = alloc_floats(nc), *sh = alloc_floats(nc), *want = alloc_floats(ny),
          *got = alloc_floats(ny), *r = alloc_floats(ny);
    fill(x, nx, &s->r, -1.5f, 2.5f);
    float bound = 1.0f / sqrtf((float)(k->c * k->k * k->k));
    fill(w, nw, &s->r, -bound, bound);
    fill(b, (size_t)k->co, &s->r, -0.5f, 0.5f);
    fill(sc, nc, &s->r, 0.3f, 1.2f);
    fill(sh, nc, &s->r, -0.6f, 0.2f);
    fill(r, ny, &s->r, -1.0f, 1.0f);

    kv_tensor cx = kv_tensor_wrap(x, k->n, k->c, k->h, k->w),
              cw = kv_tensor_wrap(w, k->co, k->c, k->k, k->k),
              cb = kv_tensor_wrap(k->bias ? b : NULL, 1, k->co, 1, 1),
              cs = kv_tensor_wrap(sc, k->n, k->c, 1, 1), ct = kv_tensor_wrap(sh, k->n, k->c, 1, 1),
              cr = kv_tensor_wrap(r, k->n, k->co, ho, wo),
              cy = kv_tensor_wrap(want, k->n, k->co, ho, wo);
    const bool norm = k->act >= 0;
    kv_conv_prologue cpro = {norm ? &cs : NULL, norm ? &ct : NULL,
                             (kv_activation)(norm ? k->act : 0), k->up != 0};
    klvae_status_t st = s->cpu->ops->conv2d(s->cpu, &cx, norm || k->up ? &cpro : NULL, &cw, &cb,
                                            k->residual ? &cr : NULL, k->g, &cy);
    if (st != KLVAE_OK) {
        failed_call(s, what, p, st);
        goto out;
    }
    kv_tensor gx = {0}, gw = {0}, gb = {0}, gs = {0}, gt = {0}, gr = {0}, gy = {0};
    if ((st = put(gpu, k->n, k->c, k->h, k->w, x, &gx)) == KLVAE_OK &&
        (st = put(gpu, k->co, k->c, k->k, k->k, w, &gw)) == KLVAE_OK &&
        (st = put(gpu, 1, k->co, 1, 1, b, &gb)) == KLVAE_OK &&
        (st = put_f32(gpu, k->n, k->c, 1, 1, sc, &gs)) == KLVAE_OK &&
        (st = put_f32(gpu, k->n, k->c, 1, 1, sh, &gt)) == KLVAE_OK &&
        (st = put(gpu, k->n, k->co, ho, wo, r, &gr)) == KLVAE_OK &&
        (st = put(gpu, k->n, k->co, ho, wo, NULL, &gy)) == KLVAE_OK) {
        kv_tensor nob = gb;
        nob.data = NULL;
        kv_conv_prologue gpro = {norm ? &gs : NULL, norm ? &gt : NULL, cpro.act, cpro.upsample2x};
        st = done(s, gpu,
                  gpu->ops->conv2d(gpu, &gx, norm || k->up ? &gpro : NULL, &gw,
                                   k->bias ? &gb : &nob, k->residual ? &gr : NULL, k->g, &gy));
        if (st == KLVAE_OK)
            st = get(gpu, &gy, got);
    }
    if (st != KLVAE_OK)
        failed_call(s, what, p, st);
    else
        verdict(s, what, p, rel_l2(got, want, ny), tolerance(p));
    kv_tensor_release(gpu, &gx);
    kv_tensor_release(gpu, &gw);
    kv_tensor_release(gpu, &gb);
    kv_tensor_release(gpu, &gs);
    kv_tensor_release(gpu, &gt);
    kv_tensor_release(gpu, &gr);
    kv_tensor_release(gpu, &gy);
out:
    free(x);
    free(w);
    free(b);
    free(sc);
    free(sh);
    free(want);
    free(got);
    free(r);
}

/* ---- group norm ---- */

/* f32: the outputs in float32 storage, as the model keeps them */
static void test_group_norm_stats(suite *s, kv_backend *gpu, kv_precision p, int n, int c, int hh,
                                  int ww, int groups, float lo, float hi, int f32)
{
    char what[160];
    snprintf(what, sizeof what, "group_norm_stats %dx%dx%dx%d G=%d x in [%g,%g]%s", n, c, hh, ww,
             groups, (double)lo, (double)hi, f32 ? " (float32 out)" : "");
    const kv_storage out = f32 ? KV_STORAGE_FLOAT32 : KV_STORAGE_COMPUTE;
    size_t nx = (size_t)n * c * hh * ww;
    /* on the heap, sized from the shape: c runs to 768 */
    const size_t ng = (size_t)n * groups;
    float *x = alloc_floats(nx), *gamma = alloc_floats((size_t)c), *beta = alloc_floats((size_t)c);
    float *cs = alloc_floats((size_t)n * c), *ct = alloc_floats((size_t)n * c);
    float *gs = alloc_floats((size_t)n * c), *gt = alloc_floats((size_t)n * c);
    float *cm = alloc_floats(ng), *cr = alloc_floats(ng), *gm = alloc_floats(ng),
          *gr = alloc_floats(ng);
    fill(x, nx, &s->r, lo, hi);
    fill(gamma, (size_t)c, &s->r, 0.5f, 1.5f);
    fill(beta, (size_t)c, &s->r, -0.5f, 0.5f);
    kv_tensor tx = kv_tensor_wrap(x, n, c, hh, ww), tg = kv_tensor_wrap(gamma, 1, c, 1, 1),
              tb = kv_tensor_wrap(beta, 1, c, 1, 1), ts = kv_tensor_wrap(cs, n, c, 1, 1),
              tt = kv_tensor_wrap(ct, n, c, 1, 1), tm = kv_tensor_wrap(cm, n, groups, 1, 1),
              tr = kv_tensor_wrap(cr, n, groups, 1, 1);
    klvae_status_t st =
        s->cpu->ops->group_norm_stats(s->cpu, &tx, &tg, &tb, groups, 1e-6f, &ts, &tt, &tm, &tr);
    kv_tensor dx = {0}, dg = {0}, db = {0}, ds = {0}, dt = {0}, dm = {0}, dr = {0};
    if (st == KLVAE_OK && (st = put(gpu, n, c, hh, ww, x, &dx)) == KLVAE_OK &&
        (st = put(gpu, 1, c, 1, 1, gamma, &dg)) == KLVAE_OK &&
        (st = put(gpu, 1, c, 1, 1, beta, &db)) == KLVAE_OK &&
        (st = put_as(gpu, n, c, 1, 1, NULL, out, &ds)) == KLVAE_OK &&
        (st = put_as(gpu, n, c, 1, 1, NULL, out, &dt)) == KLVAE_OK &&
        (st = put_as(gpu, n, groups, 1, 1, NULL, out, &dm)) == KLVAE_OK &&
        (st = put_as(gpu, n, groups, 1, 1, NULL, out, &dr)) == KLVAE_OK &&
        (st = done(s, gpu,
                   gpu->ops->group_norm_stats(gpu, &dx, &dg, &db, groups, 1e-6f, &ds, &dt, &dm,
                                              &dr))) == KLVAE_OK &&
        (st = get(gpu, &ds, gs)) == KLVAE_OK && (st = get(gpu, &dt, gt)) == KLVAE_OK &&
        (st = get(gpu, &dm, gm)) == KLVAE_OK)
        st = get(gpu, &dr, gr);
    if (st != KLVAE_OK) {
        failed_call(s, what, p, st);
    } else {
        /* in bf16 mode the input itself is rounded to bf16 before the statistics */
        double e = rel_l2(gs, cs, (size_t)n * c);
        double e2 = rel_l2(gt, ct, (size_t)n * c), e3 = rel_l2(gm, cm, (size_t)n * groups);
        double e4 = rel_l2(gr, cr, (size_t)n * groups);
        e = fmax(fmax(e, e2), fmax(e3, e4));
        verdict(s, what, p, e, tolerance(p));
    }
    kv_tensor_release(gpu, &dx);
    kv_tensor_release(gpu, &dg);
    kv_tensor_release(gpu, &db);
    kv_tensor_release(gpu, &ds);
    kv_tensor_release(gpu, &dt);
    kv_tensor_release(gpu, &dm);
    kv_tensor_release(gpu, &dr);
    free(x);
    free(gamma);
    free(beta);
    free(cs);
    free(ct);
    free(gs);
    free(gt);
    free(cm);
    free(cr);
    free(gm);
    free(gr);
}

static void test_group_norm(suite *s, kv_backend *gpu, kv_precision p, kv_activation act,
                            int in_place)
{
    static const char *names[] = {"none", "silu", "gelu", "relu", "mish", "leaky_relu"};
    char what[160];
    snprintf(what, sizeof what, "group_norm act %s%s", names[act], in_place ? " in place" : "");
    const int n = 2, c = 64, hh = 19, ww = 21, groups = 16;
    size_t nx = (size_t)n * c * hh * ww;
    float *x = alloc_floats(nx), *want = alloc_floats(nx), *got = alloc_floats(nx);
    float gamma[64], beta[64];
    fill(x, nx, &s->r, -2.0f, 3.0f);
    fill(gamma, 64, &s->r, 0.5f, 1.5f);
    fill(beta, 64, &s->r, -0.5f, 0.5f);
    kv_tensor tx = kv_tensor_wrap(x, n, c, hh, ww), tg = kv_tensor_wrap(gamma, 1, c, 1, 1),
              tb = kv_tensor_wrap(beta, 1, c, 1, 1), ty = kv_tensor_wrap(want, n, c, hh, ww);
    klvae_status_t st = s->cpu->ops->group_norm(s->cpu, &tx, &tg, &tb, groups, 1e-6f, act, &ty);
    kv_backend *h = gpu;
    kv_tensor dx = {0}, dg = {0}, db = {0}, dy = {0};
    if (st == KLVAE_OK && (st = put(h, n, c, hh, ww, x, &dx)) == KLVAE_OK &&
        (st = put(gpu, 1, c, 1, 1, gamma, &dg)) == KLVAE_OK &&
        (st = put(gpu, 1, c, 1, 1, beta, &db)) == KLVAE_OK &&
        (in_place || (st = put(h, n, c, hh, ww, NULL, &dy)) == KLVAE_OK)) {
        kv_tensor *out = in_place ? &dx : &dy;
        st = done(s, gpu, gpu->ops->group_norm(gpu, &dx, &dg, &db, groups, 1e-6f, act, out));
        if (st == KLVAE_OK)
            st = get(h, out, got);
    }
    if (st != KLVAE_OK)
        failed_call(s, what, p, st);
    else
        verdict(s, what, p, rel_l2(got, want, nx), tolerance(p));
    kv_tensor_release(h, &dx);
    kv_tensor_release(gpu, &dg);
    kv_tensor_release(gpu, &db);
    kv_tensor_release(h, &dy);
    free(x);
    free(want);
    free(got);
}

/* ---- add, upsample ---- */

/* mixed: b in float32 storage (a master copy beside compute tensors) */
static void test_add(suite *s, kv_backend *gpu, kv_precision p, int mixed)
{
    const char *what = mixed ? "add (y aliases a, b float32)" : "add (y aliases a)";
    const int n = 3, c = 7, hh = 33, ww = 29;
    size_t count = (size_t)n * c * hh * ww;
    float *a = alloc_floats(count), *b = alloc_floats(count), *want = alloc_floats(count),
          *got = alloc_floats(count);
    fill(a, count, &s->r, -3, 3);
    fill(b, count, &s->r, -3, 3);
    for (size_t i = 0; i < count; i++)
        want[i] = a[i] + b[i];
    kv_tensor da = {0}, db = {0};
    klvae_status_t st;
    if ((st = put(gpu, n, c, hh, ww, a, &da)) == KLVAE_OK &&
        (st = put_as(gpu, n, c, hh, ww, b, mixed ? KV_STORAGE_FLOAT32 : KV_STORAGE_COMPUTE,
                     &db)) == KLVAE_OK &&
        (st = done(s, gpu, gpu->ops->add(gpu, &da, &db, &da))) == KLVAE_OK) /* y is a */
        st = get(gpu, &da, got);
    if (st != KLVAE_OK)
        failed_call(s, what, p, st);
    else
        verdict(s, what, p, rel_l2(got, want, count), tolerance(p));
    kv_tensor_release(gpu, &da);
    kv_tensor_release(gpu, &db);
    free(a);
    free(b);
    free(want);
    free(got);
}

static void test_upsample(suite *s, kv_backend *gpu, kv_precision p)
{
    const int n = 2, c = 5, hh = 7, ww = 9;
    size_t nx = (size_t)n * c * hh * ww, ny = nx * 4;
    float *x = alloc_floats(nx), *want = alloc_floats(ny), *got = alloc_floats(ny);
    fill(x, nx, &s->r, -3, 3);
    kv_tensor tx = kv_tensor_wrap(x, n, c, hh, ww), ty = kv_tensor_wrap(want, n, c, 2 * hh, 2 * ww);
    klvae_status_t st = s->cpu->ops->upsample_nearest2x(s->cpu, &tx, &ty);
    kv_tensor dx = {0}, dy = {0};
    if (st == KLVAE_OK && (st = put(gpu, n, c, hh, ww, x, &dx)) == KLVAE_OK &&
        (st = put(gpu, n, c, 2 * hh, 2 * ww, NULL, &dy)) == KLVAE_OK &&
        (st = done(s, gpu, gpu->ops->upsample_nearest2x(gpu, &dx, &dy))) == KLVAE_OK)
        st = get(gpu, &dy, got);
    if (st != KLVAE_OK)
        failed_call(s, "upsample_nearest2x", p, st);
    else
        verdict(s, "upsample_nearest2x", p, rel_l2(got, want, ny), tolerance(p));
    kv_tensor_release(gpu, &dx);
    kv_tensor_release(gpu, &dy);
    free(x);
    free(want);
    free(got);
}

/* ---- attention ---- */

static void test_attention(suite *s, kv_backend *gpu, kv_precision p, int batch, int c, int hh,
                           int ww, const char *tag)
{
    char what[160];
    snprintf(what, sizeof what, "attention B=%d C=%d N=%d%s", batch, c, hh * ww, tag);
    size_t count = (size_t)batch * c * hh * ww;
    float *q = alloc_floats(count), *k = alloc_floats(count), *v = alloc_floats(count),
          *want = alloc_floats(count), *got = alloc_floats(count);
    fill(q, count, &s->r, -1, 1);
    fill(k, count, &s->r, -1, 1);
    fill(v, count, &s->r, -1, 1);
    float scale = 1.0f / sqrtf((float)c);
    kv_tensor tq = kv_tensor_wrap(q, batch, c, hh, ww), tk = kv_tensor_wrap(k, batch, c, hh, ww),
              tv = kv_tensor_wrap(v, batch, c, hh, ww), to = kv_tensor_wrap(want, batch, c, hh, ww);
    klvae_status_t st = s->cpu->ops->attention(s->cpu, &tq, &tk, &tv, scale, &to);
    kv_backend *h = gpu;
    kv_tensor dq = {0}, dk = {0}, dv = {0}, d_out = {0};
    if (st == KLVAE_OK && (st = put(h, batch, c, hh, ww, q, &dq)) == KLVAE_OK &&
        (st = put(h, batch, c, hh, ww, k, &dk)) == KLVAE_OK &&
        (st = put(h, batch, c, hh, ww, v, &dv)) == KLVAE_OK &&
        (st = put(h, batch, c, hh, ww, NULL, &d_out)) == KLVAE_OK &&
        (st = done(s, gpu, gpu->ops->attention(gpu, &dq, &dk, &dv, scale, &d_out))) ==
            KLVAE_OK)
        st = get(h, &d_out, got);
    if (st != KLVAE_OK)
        failed_call(s, what, p, st);
    else
        verdict(s, what, p, rel_l2(got, want, count), tolerance(p));
    kv_tensor_release(h, &dq);
    kv_tensor_release(h, &dk);
    kv_tensor_release(h, &dv);
    kv_tensor_release(h, &d_out);
    free(q);
    free(k);
    free(v);
    free(want);
    free(got);
}

/* ---- posterior ---- */

static void test_posterior_split(suite *s, kv_backend *gpu, kv_precision p, int with_logvar)
{
    const char *what = with_logvar ? "posterior_split" : "posterior_split (no logvar)";
    const int n = 2, z = 4, hh = 5, ww = 6;
    size_t nm = (size_t)n * 2 * z * hh * ww, nz = nm / 2;
    float *m = alloc_floats(nm), *cmu = alloc_floats(nz), *clv = alloc_floats(nz),
          *gmu = alloc_floats(nz), *glv = alloc_floats(nz);
    fill(m, nm, &s->r, -50, 50);
    kv_tensor tm = kv_tensor_wrap(m, n, 2 * z, hh, ww), tmu = kv_tensor_wrap(cmu, n, z, hh, ww),
              tlv = kv_tensor_wrap(clv, n, z, hh, ww);
    klvae_status_t st = s->cpu->ops->posterior_split(s->cpu, &tm, &tmu, &tlv);
    kv_tensor dm = {0}, dmu = {0}, dlv = {0};
    if (st == KLVAE_OK && (st = put(gpu, n, 2 * z, hh, ww, m, &dm)) == KLVAE_OK &&
        (st = put(gpu, n, z, hh, ww, NULL, &dmu)) == KLVAE_OK &&
        (st = put(gpu, n, z, hh, ww, NULL, &dlv)) == KLVAE_OK &&
        (st = done(s, gpu, gpu->ops->posterior_split(gpu, &dm, &dmu, with_logvar ? &dlv : NULL))) ==
            KLVAE_OK &&
        (st = get(gpu, &dmu, gmu)) == KLVAE_OK)
        st = with_logvar ? get(gpu, &dlv, glv) : KLVAE_OK;
    if (st != KLVAE_OK) {
        failed_call(s, what, p, st);
    } else {
        double e = rel_l2(gmu, cmu, nz);
        if (with_logvar)
            e = fmax(e, rel_l2(glv, clv, nz));
        verdict(s, what, p, e, tolerance(p));
    }
    kv_tensor_release(gpu, &dm);
    kv_tensor_release(gpu, &dmu);
    kv_tensor_release(gpu, &dlv);
    free(m);
    free(cmu);
    free(clv);
    free(gmu);
    free(glv);
}

/* z must be the CPU's bits whenever mean and logvar hold the same floats:
 * on float32 tensors in every precision (klvae_sample's), and on compute
 * tensors in fp32. */
static void test_sample(suite *s, kv_backend *gpu, kv_precision p, int f32, int alias)
{
    char what[160];
    snprintf(what, sizeof what, "gaussian_sample bit-exact%s%s", f32 ? " (float32 tensors)" : "",
             alias ? " z = mean" : "");
    const kv_storage storage = f32 ? KV_STORAGE_FLOAT32 : KV_STORAGE_COMPUTE;
    const int n = 1, z = 3, hh = 5, ww = 7; /* an odd count: the last pair is half used */
    size_t count = (size_t)n * z * hh * ww;
    float *mu = alloc_floats(count), *lv = alloc_floats(count), *want = alloc_floats(count),
          *got = alloc_floats(count);
    fill(mu, count, &s->r, -2, 2);
    fill(lv, count, &s->r, -40, 30);
    uint64_t seed = (uint64_t)(uniform(&s->r) * 4294967296.0) * 65536 + 17;
    /* an odd first: the tensor starts in the middle of a pair (a rank's
     * share of a data-parallel batch) */
    const uint64_t first = 2 * (uint64_t)(uniform(&s->r) * 1e6) + 1;
    kv_tensor tm = kv_tensor_wrap(mu, n, z, hh, ww), tl = kv_tensor_wrap(lv, n, z, hh, ww),
              tz = kv_tensor_wrap(want, n, z, hh, ww);
    klvae_status_t st = s->cpu->ops->gaussian_sample(s->cpu, &tm, &tl, seed, first, &tz);
    kv_backend *h = gpu;
    kv_tensor dm = {0}, dl = {0}, dz = {0};
    if (st == KLVAE_OK && (st = put_as(h, n, z, hh, ww, mu, storage, &dm)) == KLVAE_OK &&
        (st = put_as(h, n, z, hh, ww, lv, storage, &dl)) == KLVAE_OK &&
        (alias || (st = put_as(h, n, z, hh, ww, NULL, storage, &dz)) == KLVAE_OK)) {
        kv_tensor *out = alias ? &dm : &dz;
        st = done(s, gpu, gpu->ops->gaussian_sample(gpu, &dm, &dl, seed, first, out));
        if (st == KLVAE_OK)
            st = get(h, out, got);
    }
    if (st != KLVAE_OK) {
        failed_call(s, what, p, st);
    } else {
        size_t differ = 0;
        for (size_t i = 0; i < count; i++)
            differ += memcmp(&got[i], &want[i], sizeof(float)) != 0;
        printf("%s  %-58s [%s] %zu of %zu values differ\n", differ ? "FAIL" : "PASS", what,
               harness_precision_name(p), differ, count);
        if (differ)
            s->failed++;
        else
            s->passed++;
    }
    kv_tensor_release(h, &dm);
    kv_tensor_release(h, &dl);
    kv_tensor_release(h, &dz);
    free(mu);
    free(lv);
    free(want);
    free(got);
}

/* ---- whole model ---- */

/* Relative L2 error of the moments (mean and logvar as one vector, as the
 * encoder's output is one tensor): logvar alone can be small everywhere. */
static double rel_l2_pair(const float *g1, const float *w1, const float *g2, const float *w2,
                          size_t n)
{
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(g1[i]) || !isfinite(g2[i]))
            return INFINITY;
        double d1 = (double)g1[i] - w1[i], d2 = (double)g2[i] - w2[i];
        num += d1 * d1 + d2 * d2;
        den += (double)w1[i] * w1[i] + (double)w2[i] * w2[i];
    }
    return den > 0.0 ? sqrt(num / den) : sqrt(num);
}

typedef struct reference {
    int size, lat;
    float *images, *mean, *logvar, *z, *decoded;
} reference;

/* The CPU's encode and decode of the SD config at size^2, seed seed. */
static klvae_status_t make_reference(suite *s, uint64_t seed, int size, reference *ref)
{
    memset(ref, 0, sizeof *ref);
    ref->size = size;
    ref->lat = size / 8;
    size_t ni = (size_t)3 * size * size, nz = (size_t)4 * ref->lat * ref->lat;
    ref->images = alloc_floats(ni);
    ref->mean = alloc_floats(nz);
    ref->logvar = alloc_floats(nz);
    ref->z = alloc_floats(nz);
    ref->decoded = alloc_floats(ni);
    fill(ref->images, ni, &s->r, -1, 1);
    for (size_t i = 0; i < nz; i++) /* latents of the scale a VAE produces */
        ref->z[i] = (float)(sqrt(-2.0 * log(1.0 - uniform(&s->r))) *
                            cos(6.283185307179586 * uniform(&s->r)) * 4.0);
    klvae_options_t *o = NULL;
    klvae_model_t *m = NULL;
    char text[32];
    snprintf(text, sizeof text, "%llu", (unsigned long long)seed);
    klvae_status_t st = klvae_options_create(&o);
    if (st == KLVAE_OK)
        st = klvae_options_set(o, "config", "sd");
    if (st == KLVAE_OK)
        st = klvae_options_set(o, "seed", text);
    if (st == KLVAE_OK)
        st = klvae_options_set(o, "backend", "cpu");
    if (st == KLVAE_OK)
        st = klvae_model_create(o, &m);
    klvae_options_free(o);
    double t0 = harness_now();
    if (st == KLVAE_OK)
        st = klvae_encode(m, ref->images, 1, size, size, ref->mean, ref->logvar);
    if (st == KLVAE_OK)
        st = klvae_decode(m, ref->z, 1, ref->lat, ref->lat, ref->decoded);
    printf("      (CPU reference at %d^2: %.1f s)\n", size, harness_now() - t0);
    klvae_model_free(m);
    return st;
}

static void free_reference(reference *ref)
{
    free(ref->images);
    free(ref->mean);
    free(ref->logvar);
    free(ref->z);
    free(ref->decoded);
}

/* The SD model on a backend of precision p created with the environment
 * variable env set to value (NULL: none), named tag in the lines; tol 0:
 * the precision's tolerance. Returns the larger error, or -1 when a call
 * failed. */
/* A failed call of a model check: a failure, except that an algorithm
 * forced by the test which cuDNN does not have for a shape is a skip. */
static void model_failed(suite *s, const char *what, kv_precision p, klvae_status_t st,
                         const char *env)
{
    if (st == KLVAE_ERR_UNSUPPORTED && env && strcmp(env, "KLVAE_CUDA_CONV_ALGO") == 0)
        skip(s, what, klvae_last_error());
    else
        failed_call(s, what, p, st);
}

static double test_model_with(suite *s, kv_precision p, uint64_t seed, const reference *ref,
                              const char *env, const char *value, const char *tag, double tol)
{
    char what[160];
    kv_backend *be = NULL;
    klvae_model_t *m = NULL;
    klvae_status_t st = backend_with(s, p, env, value, &be);
    if (st == KLVAE_OK)
        st = harness_model(be, "sd", seed, harness_precision_name(p), &m);
    snprintf(what, sizeof what, "SD encode %d^2 mean, logvar%s", ref->size, tag);
    if (st != KLVAE_OK) {
        model_failed(s, what, p, st, env);
        return -1.0;
    }
    be = m->be;
    double worst = -1.0;
    const int size = ref->size, lat = ref->lat;
    size_t ni = (size_t)3 * size * size, nz = (size_t)4 * lat * lat;
    float *mean = alloc_floats(nz), *logvar = alloc_floats(nz), *decoded = alloc_floats(ni);
    kv_tensor x = {0}, mu = {0}, lv = {0}, z = {0}, y = {0};
    double t0 = harness_now();
    if ((st = put(be, 1, 3, size, size, ref->images, &x)) == KLVAE_OK &&
        (st = put(be, 1, 4, lat, lat, NULL, &mu)) == KLVAE_OK &&
        (st = put(be, 1, 4, lat, lat, NULL, &lv)) == KLVAE_OK &&
        (st = kv_vae_encode(m, &x, &mu, &lv)) == KLVAE_OK && (st = get(be, &mu, mean)) == KLVAE_OK)
        st = get(be, &lv, logvar);
    double t1 = harness_now();
    if (st != KLVAE_OK) {
        model_failed(s, what, p, st, env);
    } else {
        worst = rel_l2_pair(mean, ref->mean, logvar, ref->logvar, nz);
        verdict(s, what, p, worst, tol > 0 ? tol : model_tolerance(p, "encode", size));
    }
    snprintf(what, sizeof what, "SD decode %d^2%s", size, tag);
    if ((st = put(be, 1, 4, lat, lat, ref->z, &z)) == KLVAE_OK &&
        (st = put(be, 1, 3, size, size, NULL, &y)) == KLVAE_OK &&
        (st = kv_vae_decode(m, &z, NULL, &y)) == KLVAE_OK)
        st = get(be, &y, decoded);
    if (st != KLVAE_OK) {
        model_failed(s, what, p, st, env);
        worst = -1.0;
    } else {
        double e = rel_l2(decoded, ref->decoded, ni);
        verdict(s, what, p, e, tol > 0 ? tol : model_tolerance(p, "decode", size));
        worst = worst < 0 ? -1.0 : fmax(worst, e);
    }
    printf("      (first encode %.2f s, decode %.2f s, with cuDNN's algorithm choice)\n", t1 - t0,
           harness_now() - t1);
    kv_tensor_release(be, &x);
    kv_tensor_release(be, &mu);
    kv_tensor_release(be, &lv);
    kv_tensor_release(be, &z);
    kv_tensor_release(be, &y);
    free(mean);
    free(logvar);
    free(decoded);
    kv_model_destroy(m);
    return worst;
}

static void test_model(suite *s, kv_precision p, uint64_t seed, const reference *ref)
{
    (void)test_model_with(s, p, seed, ref, NULL, NULL, "", 0.0);
}

/* fp32 with each cuDNN algorithm forced (KLVAE_CUDA_CONV_ALGO): the allowed
 * ones must meet fp32's bound through the whole model; the others are
 * measured only, the evidence for leaving them out (conv2d.cu,
 * algo_allowed; cuDNN has no DIRECT forward, which says so). A backend
 * with a forced algorithm keeps its choices apart from the others' (the
 * process-wide choice table's key holds the setting). */
static void test_fp32_algorithms(suite *s, uint64_t seed, const reference *ref)
{
    static const struct {
        int algo;
        const char *name;
        int allowed;
    } algos[] = {{0, "IMPLICIT_GEMM", 1}, {1, "IMPLICIT_PRECOMP_GEMM", 1}, {2, "GEMM", 1},
                 {3, "DIRECT", 0},        {4, "FFT", 0},                   {5, "FFT_TILING", 0},
                 {6, "WINOGRAD", 0},      {7, "WINOGRAD_NONFUSED", 0}};
    for (size_t i = 0; i < sizeof algos / sizeof algos[0]; i++) {
        char value[8], tag[64];
        snprintf(value, sizeof value, "%d", algos[i].algo);
        snprintf(tag, sizeof tag, " algo %s", algos[i].name);
        if (algos[i].allowed) {
            (void)test_model_with(s, KV_PRECISION_FP32, seed, ref, "KLVAE_CUDA_CONV_ALGO", value,
                                  tag, fp32_tol);
            continue;
        }
        /* measured, not judged */
        s->measuring = 1;
        double e = test_model_with(s, KV_PRECISION_FP32, seed, ref, "KLVAE_CUDA_CONV_ALGO", value,
                                   tag, 1e30);
        s->measuring = 0;
        printf("INFO  fp32 %-40s error %s%.3g (excluded; fp32 bound %.0e)\n", algos[i].name,
               e < 0 ? "n/a: cuDNN refused it " : "", e < 0 ? 0.0 : e, fp32_tol);
    }
}

/* ---- the public device-pointer API, through the core's loader ---- */

static void test_device_api(suite *s, kv_precision p, uint64_t seed, const char *plugin_path)
{
    const char *what = "klvae_*_device equal to the host API (tiny)";
    klvae_options_t *o = NULL;
    klvae_model_t *m = NULL;
    char text[32];
    snprintf(text, sizeof text, "%llu", (unsigned long long)seed);
    setenv("KLVAE_CUDA_PLUGIN", plugin_path, 1);
    klvae_status_t st = klvae_options_create(&o);
    if (st == KLVAE_OK)
        st = klvae_options_set(o, "config", "tiny");
    if (st == KLVAE_OK)
        st = klvae_options_set(o, "seed", text);
    if (st == KLVAE_OK)
        st = klvae_options_set(o, "backend", "cuda");
    if (st == KLVAE_OK)
        st = klvae_options_set(o, "precision", harness_precision_name(p));
    if (st == KLVAE_OK)
        st = klvae_model_create(o, &m);
    klvae_options_free(o);
    if (st != KLVAE_OK) {
        char why[600];
        snprintf(why, sizeof why, "(the core cannot give a CUDA model: %s)", klvae_last_error());
        skip(s, what, why);
        return;
    }
    const int size = 32, f = klvae_model_downsampling_factor(m), lat = size / f;
    const int zc = klvae_model_latent_channels(m);
    size_t ni = (size_t)3 * size * size, nz = (size_t)zc * lat * lat;
    float *img = alloc_floats(ni), *hm = alloc_floats(nz), *hl = alloc_floats(nz),
          *hz = alloc_floats(nz), *hy = alloc_floats(ni), *dm_host = alloc_floats(nz),
          *dl_host = alloc_floats(nz), *dz_host = alloc_floats(nz), *dy_host = alloc_floats(ni);
    fill(img, ni, &s->r, -1, 1);
    kv_tensor di = {0}, dm = {0}, dl = {0}, dz = {0}, dy = {0};
    double err = 0.0;
    if ((st = klvae_encode(m, img, 1, size, size, hm, hl)) == KLVAE_OK &&
        (st = klvae_sample(m, hm, hl, 1, lat, lat, 99, hz)) == KLVAE_OK &&
        (st = klvae_decode(m, hz, 1, lat, lat, hy)) == KLVAE_OK &&
        (st = put(s->mem, 1, 3, size, size, img, &di)) == KLVAE_OK &&
        (st = put(s->mem, 1, zc, lat, lat, NULL, &dm)) == KLVAE_OK &&
        (st = put(s->mem, 1, zc, lat, lat, NULL, &dl)) == KLVAE_OK &&
        (st = put(s->mem, 1, zc, lat, lat, NULL, &dz)) == KLVAE_OK &&
        (st = put(s->mem, 1, 3, size, size, NULL, &dy)) == KLVAE_OK &&
        (st = klvae_encode_device(m, di.data, 1, size, size, dm.data, dl.data, NULL)) ==
            KLVAE_OK &&
        (st = klvae_sample_device(m, dm.data, dl.data, 1, lat, lat, 99, dz.data, NULL)) ==
            KLVAE_OK &&
        (st = klvae_decode_device(m, dz.data, 1, lat, lat, dy.data, NULL)) == KLVAE_OK &&
        (st = get(s->mem, &dm, dm_host)) == KLVAE_OK && (st = get(s->mem, &dl, dl_host)) == KLVAE_OK &&
        (st = get(s->mem, &dz, dz_host)) == KLVAE_OK && (st = get(s->mem, &dy, dy_host)) == KLVAE_OK) {
        err = fmax(fmax(rel_l2(dm_host, hm, nz), rel_l2(dl_host, hl, nz)),
                   fmax(rel_l2(dz_host, hz, nz), rel_l2(dy_host, hy, ni)));
    }
    if (st != KLVAE_OK)
        failed_call(s, what, p, st);
    else /* the same ops on the same tensors: the device calls copy in and out
          * on the device what the host calls upload and download */
        verdict(s, what, p, err, 1e-6);
    kv_tensor_release(s->mem, &di);
    kv_tensor_release(s->mem, &dm);
    kv_tensor_release(s->mem, &dl);
    kv_tensor_release(s->mem, &dz);
    kv_tensor_release(s->mem, &dy);
    free(img);
    free(hm);
    free(hl);
    free(hz);
    free(hy);
    free(dm_host);
    free(dl_host);
    free(dz_host);
    free(dy_host);

    klvae_model_free(m);
}

/* ---- main ---- */

/* The op checks on a backend of precision p; tag names the variant (the
 * environment variable env = value it was created with). */
static void run_ops_on(suite *s, kv_precision p, const char *env, const char *value,
                       const char *tag)
{
    char what[160];
    kv_backend *gpu = NULL, *small = NULL;
    klvae_status_t st = backend_with(s, p, env, value, &gpu);
    if (st != KLVAE_OK) {
        snprintf(what, sizeof what, "create the backend%s", tag);
        failed_call(s, what, p, st);
        return;
    }
    /* a backend with tiny buffer budgets: convs in bands and chunks, attention
     * in many query blocks */
    if (env)
        setenv(env, value, 1);
    setenv("KLVAE_CUDA_ATTENTION_BUDGET", "300000", 1);
    st = backend_with(s, p, "KLVAE_CUDA_CONV_BUDGET", "60000", &small);
    unsetenv("KLVAE_CUDA_ATTENTION_BUDGET");
    if (env)
        unsetenv(env);
    if (st != KLVAE_OK) {
        snprintf(what, sizeof what, "create a small-budget backend%s", tag);
        failed_call(s, what, p, st);
    }
    char bands[96];
    snprintf(bands, sizeof bands, " (bands)%s", tag);
    for (size_t i = 0; i < sizeof conv_cases / sizeof conv_cases[0]; i++) {
        test_conv(s, gpu, p, &conv_cases[i], tag);
        if (small)
            test_conv(s, small, p, &conv_cases[i], bands);
    }
    if (env) { /* a variant: the convolutions are what it changes */
        kv_backend_destroy(small);
        kv_backend_destroy(gpu);
        return;
    }
    test_group_norm_stats(s, gpu, p, 2, 32, 13, 11, 8, -1.0f, 1.0f, 0);
    test_group_norm_stats(s, gpu, p, 2, 32, 13, 11, 8, -1.0f, 1.0f, 1);
    test_group_norm_stats(s, gpu, p, 1, 128, 96, 96, 32, 2.0f, 4.0f, 1); /* several chunks */
    test_group_norm_stats(s, gpu, p, 2, 64, 160, 130, 32, -3.0f, 1.0f, 1);
    test_group_norm_stats(s, gpu, p, 2, 36, 9, 7, 6, -1.0f, 2.0f, 1); /* channels not a multiple of 8 */
    test_group_norm_stats(s, gpu, p, 2, 200, 6, 5, 8, -1.0f, 2.0f, 1); /* 200 one-channel slots */
    test_group_norm_stats(s, gpu, p, 1, 768, 5, 7, 32, -1.0f, 2.0f, 1); /* 192 four-channel slots */
    for (int a = 0; a <= KV_ACT_LEAKY_RELU; a++)
        test_group_norm(s, gpu, p, (kv_activation)a, 0);
    test_group_norm(s, gpu, p, KV_ACT_SILU, 1);
    test_add(s, gpu, p, 0);
    test_add(s, gpu, p, 1);
    test_upsample(s, gpu, p);
    test_attention(s, gpu, p, 2, 32, 9, 11, "");
    test_attention(s, gpu, p, 1, 64, 32, 32, "");
    test_attention(s, gpu, p, 1, 16, 5, 7, "");
    if (small)
        test_attention(s, small, p, 2, 64, 24, 20, " (many blocks)");
    test_posterior_split(s, gpu, p, 1);
    test_posterior_split(s, gpu, p, 0);
    if (p == KV_PRECISION_FP32) {
        test_sample(s, gpu, p, 0, 0);
        test_sample(s, gpu, p, 0, 1);
    }
    test_sample(s, gpu, p, 1, 0);
    test_sample(s, gpu, p, 1, 1);
    kv_backend_destroy(small);
    kv_backend_destroy(gpu);
    run_training_ops(s, p);
}

/* --tiny: one convolution of each kind (prologue, residual, upsample), one
 * group norm, one attention, one sampling. */
static void run_tiny_ops(suite *s, kv_precision p)
{
    kv_backend *gpu = NULL;
    klvae_status_t st = backend_with(s, p, NULL, NULL, &gpu);
    if (st != KLVAE_OK) {
        failed_call(s, "create the backend", p, st);
        return;
    }
    test_conv(s, gpu, p, &conv_cases[3], "");
    test_conv(s, gpu, p, &conv_cases[8], "");
    test_conv(s, gpu, p, &conv_cases[12], "");
    test_group_norm(s, gpu, p, KV_ACT_SILU, 0);
    test_attention(s, gpu, p, 1, 16, 5, 7, "");
    test_sample(s, gpu, p, 1, 0);
    kv_backend_destroy(gpu);
}

static void run_ops(suite *s, kv_precision p)
{
    if (s->tiny) {
        run_tiny_ops(s, p);
        return;
    }
    run_ops_on(s, p, NULL, NULL, "");
    if (p == KV_PRECISION_BF16) { /* the other layout, and cuDNN's epilogue off */
        run_ops_on(s, p, "KLVAE_CUDA_LAYOUT", "nchw", " [nchw]");
        run_ops_on(s, p, "KLVAE_CUDA_FUSED", "0", " [unfused]");
    }
    if (p == KV_PRECISION_FP32) /* fp32 on tensor cores' layout: still exact */
        run_ops_on(s, p, "KLVAE_CUDA_LAYOUT", "nhwc", " [nhwc]");
}

#ifdef KV_WITH_BENCH
int bench_cuda_main(int argc, char **argv);
#endif

int main(int argc, char **argv)
{
#ifdef KV_WITH_BENCH
    if (argc > 1 && strcmp(argv[1], "bench") == 0)
        return bench_cuda_main(argc - 1, argv + 1);
#endif
    const char *plugin_path = NULL;
    int only_ops = 0, require_gpu = 0;
    suite s;
    memset(&s, 0, sizeof s);
    uint64_t seed = (uint64_t)time(NULL) * 1000003u + (uint64_t)getpid();
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--plugin") == 0 && i + 1 < argc)
            plugin_path = argv[++i];
        else if (strcmp(argv[i], "--device") == 0 && i + 1 < argc)
            s.device = atoi(argv[++i]);
        else if (strcmp(argv[i], "--seed") == 0 && i + 1 < argc)
            seed = strtoull(argv[++i], NULL, 10);
        else if (strcmp(argv[i], "--quick") == 0)
            s.quick = 1;
        else if (strcmp(argv[i], "--only-ops") == 0)
            only_ops = 1;
        else if (strcmp(argv[i], "--require-gpu") == 0)
            require_gpu = 1;
        else if (strcmp(argv[i], "--tiny") == 0)
            s.tiny = s.quick = only_ops = 1;
        else {
            fprintf(stderr, "usage: test_cuda [--plugin PATH] [--device N] [--seed S] [--quick] "
                            "[--only-ops] [--require-gpu] [--tiny]\n");
            return 2;
        }
    }
    if (!plugin_path)
        plugin_path = getenv("KLVAE_CUDA_PLUGIN");
    if (!plugin_path || !*plugin_path)
        plugin_path = "lib/libklvae_cuda.so";
    char why[1024];
    s.plugin = harness_open(plugin_path, why, sizeof why);
    if (!s.plugin) {
        printf("%s: no CUDA plugin (%s)\n", require_gpu ? "FAILED" : "SKIPPED", why);
        return require_gpu ? 1 : 0;
    }
    if (harness_probe(s.plugin, s.device) != KLVAE_OK) {
        printf("%s: no CUDA device (%s)\n", require_gpu ? "FAILED" : "SKIPPED",
               klvae_last_error());
        return require_gpu ? 1 : 0;
    }
    s.r.state = seed * 2654435761u + 0x9E3779B97F4A7C15ull;
    printf("test_cuda: plugin %s, device %d, seed %llu%s\n", plugin_path, s.device,
           (unsigned long long)seed, s.quick ? ", quick" : "");
    kv_backend_settings cs;
    memset(&cs, 0, sizeof cs);
    cs.threads = kv_cpu_count();
    klvae_status_t st = kv_cpu_backend_create(&cs, &s.cpu);
    if (st == KLVAE_OK)
        st = harness_backend(s.plugin, s.device, KV_PRECISION_FP32, &s.mem);
    if (st != KLVAE_OK) {
        printf("FAIL  cannot create the backends: %s\n", klvae_last_error());
        return 1;
    }
    const kv_precision precisions[] = {KV_PRECISION_FP32, KV_PRECISION_TF32, KV_PRECISION_BF16};
    for (int i = 0; i < 3; i++) {
        if (s.quick && precisions[i] == KV_PRECISION_TF32)
            continue;
        run_ops(&s, precisions[i]);
    }
    const int sizes[] = {64, 256};
    if (only_ops)
        goto done;
    uint64_t model_seed = seed % 1000 + 1;
    for (int i = 0; i < 2; i++) {
        if (s.quick && sizes[i] > 64)
            continue;
        reference ref;
        st = make_reference(&s, model_seed, sizes[i], &ref);
        if (st != KLVAE_OK) {
            failed_call(&s, "the CPU reference model", KV_PRECISION_FP32, st);
        } else {
            for (int j = 0; j < 3; j++) {
                if (s.quick && precisions[j] == KV_PRECISION_TF32)
                    continue;
                test_model(&s, precisions[j], model_seed, &ref);
            }
            if (sizes[i] == 64) { /* the variants and the algorithms, at the small size */
                (void)test_model_with(&s, KV_PRECISION_BF16, model_seed, &ref, "KLVAE_CUDA_LAYOUT",
                                      "nchw", " [nchw]", 0.0);
                (void)test_model_with(&s, KV_PRECISION_BF16, model_seed, &ref, "KLVAE_CUDA_FUSED",
                                      "0", " [unfused]", 0.0);
                if (!s.quick)
                    test_fp32_algorithms(&s, model_seed, &ref);
            }
        }
        free_reference(&ref);
    }
    test_device_api(&s, KV_PRECISION_FP32, model_seed, plugin_path);
    test_device_api(&s, KV_PRECISION_BF16, model_seed, plugin_path);
    run_training_steps(&s, model_seed, plugin_path);
done:
    kv_backend_destroy(s.mem);
    kv_backend_destroy(s.cpu);
    printf("test_cuda: %d passed, %d failed, %d skipped\n", s.passed, s.failed, s.skipped);
    return s.failed ? 1 : 0;
}
