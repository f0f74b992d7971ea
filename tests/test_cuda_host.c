/* test_cuda_host.c — the CUDA backend's index math, plans and block table,
 * checked on the CPU (no GPU, no CUDA toolkit needed): the __host__
 * __device__ functions of the cuda/ headers compile as plain C here (KV_HD is
 * empty outside nvcc) and are compared with straightforward loops written
 * from backend.h's specification, in both of the backend's layouts. */
#include "test_util.h"

#include "../cuda/attention_plan.cuh"
#include "../cuda/batch_norm_plan.cuh"
#include "../cuda/conv2d_plan.cuh"
#include "../cuda/group_norm_plan.cuh"
#include "../cuda/layout_plan.cuh"
#include "../cuda/posterior_plan.cuh"
#include "../cuda/tensor_table.cuh"
#include "../cuda/upsample_plan.cuh"
#include "backend/backend.h"
#include "backend/cpu/cpu_ops.h"
#include "base/philox.h"

/* ---- bf16 ---- */

static int is_nan_bits(uint16_t h)
{
    return (h & 0x7F80u) == 0x7F80u && (h & 0x007Fu) != 0;
}

START_TEST(bf16_round_trips_every_pattern)
{
    for (uint32_t h = 0; h < 65536; h++) {
        float f = kv_bf16_to_float((uint16_t)h);
        uint16_t back = kv_bf16_from_float(f);
        if (is_nan_bits((uint16_t)h)) {
            ck_assert_msg(is_nan_bits(back), "NaN %04x became %04x", h, back);
            ck_assert_int_eq(back & 0x8000u, h & 0x8000u);
        } else {
            ck_assert_msg(back == h, "bf16 %04x -> %g -> %04x", h, (double)f, back);
        }
    }
}
END_TEST

/* The nearest bf16 to f by exact double arithmetic, ties to even, with
 * IEEE overflow to infinity. */
static uint16_t nearest_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint16_t t = (uint16_t)(u >> 16), sign = t & 0x8000u;
    if ((t & 0x7F80u) == 0x7F80u)
        return t; /* infinity (f is not NaN here) */
    double a = fabs((double)kv_bf16_to_float(t));
    uint16_t up = (uint16_t)(t + 1);
    double b = (up & 0x7FFFu) == 0x7F80u ? ldexp(1.0, 128) : fabs((double)kv_bf16_to_float(up));
    double x = fabs((double)f), da = x - a, db = b - x;
    uint16_t r = da < db ? t : db < da ? up : ((t & 1u) ? up : t);
    return (uint16_t)((r & 0x7FFFu) | sign);
}

START_TEST(bf16_rounds_to_nearest_even)
{
    test_rng rng = test_rng_new(4242);
    for (int i = 0; i < 2000000; i++) {
        uint32_t u = (uint32_t)(test_uniform(&rng) * 4294967296.0);
        if (i % 4 == 1)
            u = (u & 0xFFFF0000u) | 0x8000u; /* exact ties */
        if (i % 4 == 2)
            u = (u & 0xFFFF0000u) | (0x7FFFu + (u & 1u)); /* next to ties */
        float f;
        memcpy(&f, &u, sizeof f);
        if (f != f)
            continue;
        uint16_t got = kv_bf16_from_float(f), want = nearest_bf16(f);
        ck_assert_msg(got == want, "%a (%08x): got %04x, want %04x", (double)f, u, got, want);
    }
    const float edge[] = {0.0f, -0.0f, 1.0f, -1.0f, 3.40282347e38f, -3.40282347e38f,
                          1.17549435e-38f, 1.0e-45f, 3.3961775e38f, 3.3961776e38f, INFINITY,
                          -INFINITY};
    for (size_t i = 0; i < sizeof edge / sizeof edge[0]; i++)
        ck_assert_int_eq(kv_bf16_from_float(edge[i]), nearest_bf16(edge[i]));
    ck_assert_int_eq(kv_bf16_from_float(3.40282347e38f), 0x7F80); /* FLT_MAX rounds up */
    ck_assert_int_eq(kv_bf16_from_float(1.0f + 1.0f / 256.0f), 0x3F80); /* tie to even (down) */
    ck_assert_int_eq(kv_bf16_from_float(1.0f + 3.0f / 256.0f), 0x3F82); /* tie to even (up) */
    ck_assert(is_nan_bits(kv_bf16_from_float(NAN)));
}
END_TEST

/* ---- activations and elementwise index maps ---- */

START_TEST(activations_are_the_cpu_formulas)
{
    const kv_activation acts[] = {KV_ACT_NONE, KV_ACT_SILU, KV_ACT_GELU, KV_ACT_RELU, KV_ACT_MISH,
                                  KV_ACT_LEAKY_RELU};
    test_rng rng = test_rng_new(77);
    for (size_t a = 0; a < sizeof acts / sizeof acts[0]; a++)
        for (int i = 0; i < 20000; i++) {
            float v = (float)((test_uniform(&rng) - 0.5) * (i % 2 ? 60.0 : 8.0));
            float got = kv_activate(acts[a], v), want = kv_activate(acts[a], v);
            ck_assert_msg(got == want || fabsf(got - want) <= 1e-6f * fabsf(want),
                          "act %d at %g: %g vs %g", (int)acts[a], (double)v, (double)got,
                          (double)want);
        }
}
END_TEST

START_TEST(upsample_maps_repeat_each_pixel)
{
    for (int h = 1; h <= 5; h++)
        for (int w = 1; w <= 6; w++) {
            const int planes = 3, n = 2;
            for (int p = 0; p < planes; p++)
                for (int y = 0; y < 2 * h; y++)
                    for (int x = 0; x < 2 * w; x++) {
                        size_t want = (size_t)p * h * w + (size_t)(y / 2) * w + x / 2;
                        ck_assert_uint_eq(kv_upsample_source((size_t)p, y * 2 * w + x, h, w),
                                          want);
                    }
            /* NHWC: whole pixels, over every sample */
            for (int b = 0; b < n; b++)
                for (int y = 0; y < 2 * h; y++)
                    for (int x = 0; x < 2 * w; x++) {
                        size_t pix = ((size_t)b * 2 * h + y) * 2 * w + x;
                        size_t want = ((size_t)b * h + y / 2) * w + x / 2;
                        ck_assert_uint_eq(kv_upsample_source_pixel(pix, h, w), want);
                    }
        }
}
END_TEST

START_TEST(posterior_maps_take_the_halves)
{
    const int n = 3, z = 4, hw = 5;
    /* NCHW: one sample's means together */
    const size_t block = (size_t)z * hw;
    for (int b = 0; b < n; b++)
        for (int c = 0; c < z; c++)
            for (int p = 0; p < hw; p++) {
                size_t i = (size_t)b * block + (size_t)c * hw + p;
                size_t want = ((size_t)b * 2 * z + c) * hw + p;
                ck_assert_uint_eq(kv_posterior_source(i, block), want);
            }
    /* NHWC: one pixel's means together; moments (n, hw, 2z), mean (n, hw, z) */
    for (int b = 0; b < n; b++)
        for (int p = 0; p < hw; p++)
            for (int c = 0; c < z; c++) {
                size_t i = ((size_t)b * hw + p) * z + c;
                size_t want = ((size_t)b * hw + p) * 2 * z + c;
                ck_assert_uint_eq(kv_posterior_source(i, (size_t)z), want);
                ck_assert_uint_eq(kv_posterior_source(i, (size_t)z) + z, want + z); /* logvar */
            }
    ck_assert_float_eq(kv_clamp_logvar(-31.0f), -30.0f);
    ck_assert_float_eq(kv_clamp_logvar(25.0f), 20.0f);
    ck_assert_float_eq(kv_clamp_logvar(1.5f), 1.5f);
}
END_TEST

/* ---- layouts ---- */

START_TEST(layout_maps_are_inverse_permutations)
{
    const int shapes[][4] = {{1, 1, 1, 1}, {2, 3, 4, 5}, {3, 7, 1, 9}, {1, 16, 6, 6}, {4, 1, 3, 2}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        const int n = shapes[s][0], c = shapes[s][1], h = shapes[s][2], w = shapes[s][3];
        const size_t count = (size_t)n * c * h * w;
        unsigned char *seen = calloc(count, 1);
        ck_assert_ptr_nonnull(seen);
        for (int b = 0; b < n; b++)
            for (int ch = 0; ch < c; ch++)
                for (int y = 0; y < h; y++)
                    for (int x = 0; x < w; x++) {
                        size_t i = (((size_t)b * c + ch) * h + y) * w + x;
                        size_t want = (((size_t)b * h + y) * w + x) * c + ch;
                        size_t e = kv_nchw_to_nhwc(i, c, h, w);
                        ck_assert_uint_eq(e, want);
                        ck_assert_uint_eq(kv_nhwc_to_nchw(e, c, h, w), i);
                        ck_assert_uint_eq(kv_storage_index(i, 1, 4, c, h, w), want);
                        ck_assert_uint_eq(kv_storage_index(i, 0, 4, c, h, w), i);
                        ck_assert(!seen[e]);
                        seen[e] = 1;
                    }
        free(seen);
    }
    /* tensors that are not 4-D are stored in their own order */
    for (size_t i = 0; i < 100; i++)
        ck_assert_uint_eq(kv_storage_index(i, 1, 1, 1, 1, 1), i);
}
END_TEST

/* The NHWC sampling kernel of cuda/posterior.cu on the CPU: element e draws
 * from the Philox pair of its NCHW index. It must give the CPU backend's
 * bits, element for element, at every odd size. */
START_TEST(nhwc_sampling_gives_the_cpu_bits)
{
    const int n = 2, c = 3, h = 5, w = 7; /* odd count, odd planes */
    const size_t count = (size_t)n * c * h * w;
    test_rng rng = test_rng_new(909);
    float *mean = test_alloc(count), *logvar = test_alloc(count), *z = test_alloc(count);
    float *mean_s = test_alloc(count), *lv_s = test_alloc(count);
    test_fill(mean, count, &rng, -2, 2);
    test_fill(logvar, count, &rng, -35, 25); /* both ends of the clamp */
    for (size_t i = 0; i < count; i++) {
        mean_s[kv_nchw_to_nhwc(i, c, h, w)] = mean[i];
        lv_s[kv_nchw_to_nhwc(i, c, h, w)] = logvar[i];
    }
    kv_backend_settings settings;
    memset(&settings, 0, sizeof settings);
    settings.threads = 2;
    kv_backend *be = NULL;
    ck_assert_ok(kv_cpu_backend_create(&settings, &be));
    kv_tensor tm = kv_tensor_wrap(mean, n, c, h, w), tl = kv_tensor_wrap(logvar, n, c, h, w),
              tz = kv_tensor_wrap(z, n, c, h, w);
    ck_assert_ok(be->ops->gaussian_sample(be, &tm, &tl, 1234567, 0, &tz));
    kv_backend_destroy(be);
    for (size_t e = 0; e < count; e++) {
        size_t i = kv_nhwc_to_nchw(e, c, h, w);
        float eps[2];
        kv_philox_normal_pair(1234567, i / 2, &eps[0], &eps[1]);
        volatile float prod = kv_posterior_std(lv_s[e]) * eps[i % 2];
        float got = mean_s[e] + prod;
        ck_assert_msg(memcmp(&got, &z[i], sizeof got) == 0, "element %zu: %a vs the CPU's %a", i,
                      (double)got, (double)z[i]);
    }
    free(mean), free(logvar), free(z), free(mean_s), free(lv_s);
}
END_TEST

/* ---- Philox indices of a share of a batch ---- */

/* kv_philox_index: first + the NCHW index of a storage index, in both
 * layouts. */
START_TEST(philox_index_is_first_plus_the_nchw_index)
{
    const int n = 3, c = 5, h = 4, w = 3;
    const size_t hw = (size_t)h * w, count = (size_t)n * c * hw;
    const uint64_t firsts[] = {0, 1, 4097, (uint64_t)1 << 40};
    for (size_t f = 0; f < sizeof firsts / sizeof firsts[0]; f++)
        for (size_t i = 0; i < count; i++) {
            ck_assert_uint_eq(kv_philox_index(i, 0, c, hw, firsts[f]), firsts[f] + i);
            ck_assert_uint_eq(kv_philox_index(kv_nchw_to_nhwc(i, c, h, w), 1, c, hw, firsts[f]),
                              firsts[f] + i);
        }
}
END_TEST

/* cuda/lpips.cu's gradient kernel on the CPU, NHWC, at an odd first: each
 * value's dropout mask and db must be the CPU backend's bits. */
START_TEST(nhwc_lpips_mask_at_first_gives_the_cpu_bits)
{
    const int n = 2, c = 3, h = 5, w = 7;
    const size_t hw = (size_t)h * w, count = (size_t)n * c * hw;
    const uint64_t seed = 77, first = 4097;
    const float dropout = 0.5f, keep = 1.0f / (1.0f - dropout);
    test_rng rng = test_rng_new(313);
    float *a = test_alloc(count), *b = test_alloc(count), *db = test_alloc(count), wt[3];
    test_fill(a, count, &rng, -0.5f, 0.5f);
    test_fill(b, count, &rng, -0.5f, 0.5f);
    test_fill(wt, 3, &rng, 0, 1);
    const float scale[2] = {0.7f, -1.3f};
    double values[2];
    kv_backend_settings settings;
    memset(&settings, 0, sizeof settings);
    settings.threads = 2;
    kv_backend *be = NULL;
    ck_assert_ok(kv_cpu_backend_create(&settings, &be));
    kv_tensor ta = kv_tensor_wrap(a, n, c, h, w), tb = kv_tensor_wrap(b, n, c, h, w),
              tw = kv_tensor_wrap(wt, 1, c, 1, 1), tdb = kv_tensor_wrap(db, n, c, h, w);
    ck_assert_ok(be->ops->lpips_distance(be, &ta, &tb, &tw, dropout, seed, first, values, scale,
                                         &tdb));
    kv_backend_destroy(be);
    int dropped = 0;
    for (size_t e = 0; e < count; e++) { /* e: the NHWC storage index */
        const size_t i = kv_nhwc_to_nchw(e, c, h, w);
        int sn, sc;
        kv_storage_nc(e, 1, c, hw, &sn, &sc);
        const float m =
            kv_philox_uniform(seed, kv_philox_index(e, 1, c, hw, first)) < dropout ? 0.0f : keep;
        dropped += m == 0.0f;
        const float g = scale[sn] * 2.0f / (float)hw, d = a[i] - b[i];
        const float got = g * wt[sc] * m * (-d);
        ck_assert_msg(memcmp(&got, &db[i], sizeof got) == 0, "element %zu: %a vs the CPU's %a",
                      i, (double)got, (double)db[i]);
    }
    ck_assert_int_gt(dropped, 0);
    ck_assert_int_lt(dropped, (int)count);
    free(a), free(b), free(db);
}
END_TEST

/* cuda/posterior.cu's posterior_backward kernel on the CPU, NHWC, sampled
 * at an odd first: the CPU backend's bits. */
START_TEST(nhwc_posterior_backward_at_first_gives_the_cpu_bits)
{
    const int n = 2, z = 3, h = 5, w = 7;
    const size_t hw = (size_t)h * w, count = (size_t)n * z * hw;
    const uint64_t seed = 4242, first = 1001;
    const float k = 0.01f;
    test_rng rng = test_rng_new(717);
    float *mom = test_alloc(2 * count), *dz = test_alloc(count), *dm = test_alloc(2 * count);
    test_fill(mom, 2 * count, &rng, -35, 25);
    test_fill(dz, count, &rng, -1, 1);
    kv_backend_settings settings;
    memset(&settings, 0, sizeof settings);
    settings.threads = 2;
    kv_backend *be = NULL;
    ck_assert_ok(kv_cpu_backend_create(&settings, &be));
    kv_tensor tm = kv_tensor_wrap(mom, n, 2 * z, h, w), tz = kv_tensor_wrap(dz, n, z, h, w),
              td = kv_tensor_wrap(dm, n, 2 * z, h, w);
    ck_assert_ok(be->ops->posterior_backward(be, &tm, &tz, k, true, seed, first, &td));
    kv_backend_destroy(be);
    for (size_t e = 0; e < count; e++) { /* e: the NHWC index of dz's element */
        const size_t i = kv_nhwc_to_nchw(e, z, h, w);
        const size_t nn = i / ((size_t)z * hw), ch = i / hw % (size_t)z, p = i % hw;
        const size_t mi = (nn * 2 * z + ch) * hw + p, li = mi + (size_t)z * hw;
        const float l = mom[li], s = kv_clamp_logvar(l);
        float ds = k * 0.5f * (float)(exp((double)s) - 1.0);
        ds = ds + dz[i] * 0.5f * kv_posterior_std(l) *
                      kv_philox_normal(seed, kv_philox_index(e, 1, z, hw, first));
        const float dl = kv_logvar_unclamped(l) ? ds : 0.0f, dmu = dz[i] + k * mom[mi];
        ck_assert_msg(memcmp(&dl, &dm[li], sizeof dl) == 0, "dlogvar %zu: %a vs the CPU's %a", i,
                      (double)dl, (double)dm[li]);
        ck_assert_msg(memcmp(&dmu, &dm[mi], sizeof dmu) == 0, "dmean %zu: %a vs the CPU's %a", i,
                      (double)dmu, (double)dm[mi]);
    }
    free(mom), free(dz), free(dm);
}
END_TEST

/* ---- batch norm ---- */

/* batch_norm_plan.cuh's per-channel arithmetic from the CPU backend's sums
 * gives the CPU's bits: mean, invstd, y, the running statistics, dx (and
 * from sums of two halves of the batch, the same channel values). */
START_TEST(batch_norm_channel_math_gives_the_cpu_bits)
{
    const int n = 4, c = 5, h = 3, w = 7;
    const size_t hw = (size_t)h * w, numel = (size_t)n * c * hw;
    const double count = (double)n * hw;
    test_rng rng = test_rng_new(1212);
    float *x = test_alloc(numel), *y = test_alloc(numel), *dy = test_alloc(numel);
    float *dx = test_alloc(numel);
    float gamma[5], beta[5], mean[5], invstd[5], rm[5], rv[5], rm0[5], rv0[5], dg[5] = {0},
                                                                               dbt[5] = {0};
    test_fill(x, numel, &rng, -2, 3);
    test_fill(dy, numel, &rng, -1, 1);
    test_fill(gamma, 5, &rng, 0.5f, 1.5f);
    test_fill(beta, 5, &rng, -0.5f, 0.5f);
    test_fill(rm0, 5, &rng, -1, 1);
    test_fill(rv0, 5, &rng, 0.5f, 2);
    memcpy(rm, rm0, sizeof rm);
    memcpy(rv, rv0, sizeof rv);
    double sums[10], dsums[10], half[2][10];
    kv_backend_settings settings;
    memset(&settings, 0, sizeof settings);
    settings.threads = 2;
    kv_backend *be = NULL;
    ck_assert_ok(kv_cpu_backend_create(&settings, &be));
    kv_tensor tx = kv_tensor_wrap(x, n, c, h, w), ty = kv_tensor_wrap(y, n, c, h, w),
              tdy = kv_tensor_wrap(dy, n, c, h, w), tdx = kv_tensor_wrap(dx, n, c, h, w),
              tg = kv_tensor_wrap(gamma, 1, c, 1, 1), tb = kv_tensor_wrap(beta, 1, c, 1, 1),
              tm = kv_tensor_wrap(mean, 1, c, 1, 1), ti = kv_tensor_wrap(invstd, 1, c, 1, 1),
              tdg = kv_tensor_wrap(dg, 1, c, 1, 1), tdb = kv_tensor_wrap(dbt, 1, c, 1, 1);
    ck_assert_ok(be->ops->batch_norm_stats(be, &tx, sums));
    ck_assert_ok(be->ops->batch_norm(be, &tx, &tg, &tb, sums, count, 1e-5f, 0.1f, rm, rv, &ty,
                                     &tm, &ti));
    ck_assert_ok(be->ops->batch_norm_backward_stats(be, &tx, &tm, &ti, &tdy, dsums, &tdg, &tdb));
    ck_assert_ok(be->ops->batch_norm_backward(be, &tx, &tg, &tm, &ti, &tdy, dsums, count, &tdx));
    for (int p = 0; p < 2; p++) { /* samples 0-1 and 2-3, as two processes would sum them */
        kv_tensor part = kv_tensor_wrap(x + (size_t)p * 2 * c * hw, 2, c, h, w);
        ck_assert_ok(be->ops->batch_norm_stats(be, &part, half[p]));
    }
    kv_backend_destroy(be);
    for (int ch = 0; ch < c; ch++) {
        const kv_bn_channel k =
            kv_bn_forward_channel(sums[ch], sums[c + ch], count, 1e-5f, gamma[ch], beta[ch]);
        ck_assert_float_eq(k.mean, mean[ch]);
        ck_assert_float_eq(k.invstd, invstd[ch]);
        const kv_bn_channel kh = kv_bn_forward_channel(
            half[0][ch] + half[1][ch], half[0][c + ch] + half[1][c + ch], count, 1e-5f,
            gamma[ch], beta[ch]);
        ck_assert_float_eq_tol(kh.mean, k.mean, 1e-6f);
        ck_assert_float_eq_tol(kh.invstd, k.invstd, 1e-6f * k.invstd);
        float m = rm0[ch], v = rv0[ch];
        kv_bn_running(&k, count, 0.1f, &m, &v);
        ck_assert_float_eq(m, rm[ch]);
        ck_assert_float_eq(v, rv[ch]);
        const kv_bn_grad_channel g =
            kv_bn_backward_channel(dsums[ch], dsums[c + ch], count, gamma[ch]);
        for (int b = 0; b < n; b++)
            for (size_t p = 0; p < hw; p++) {
                const size_t i = ((size_t)b * c + ch) * hw + p;
                const float got_y = kv_bn_add(kv_bn_mul(x[i], k.s), k.t);
                ck_assert_msg(memcmp(&got_y, &y[i], sizeof got_y) == 0, "y %zu: %a vs %a", i,
                              (double)got_y, (double)y[i]);
                const float xhat = kv_bn_xhat(x[i], k.mean, k.invstd);
                const float got_dx = kv_bn_dx(&g, dy[i], xhat, k.invstd);
                ck_assert_msg(memcmp(&got_dx, &dx[i], sizeof got_dx) == 0, "dx %zu: %a vs %a",
                              i, (double)got_dx, (double)dx[i]);
            }
        ck_assert_float_eq(dg[ch], (float)dsums[c + ch]);
        ck_assert_float_eq(dbt[ch], (float)dsums[ch]);
    }
    free(x), free(y), free(dy), free(dx);
}
END_TEST

/* ---- conv2d plans ---- */

typedef struct conv_case {
    int n, c, h, w, co, kh, kw, up;
    kv_conv_geometry g;
} conv_case;

static conv_case random_conv_case(test_rng *r)
{
    conv_case k;
    k.n = 1 + (int)(test_uniform(r) * 3);
    k.c = 1 + (int)(test_uniform(r) * 4);
    k.co = 1 + (int)(test_uniform(r) * 3);
    int big = test_uniform(r) < 0.5;
    k.kh = big ? 3 : 1;
    k.kw = test_uniform(r) < 0.8 ? k.kh : (big ? 1 : 3);
    k.up = test_uniform(r) < 0.3;
    k.g.stride = 1 + (int)(test_uniform(r) * 2);
    k.g.pad_top = (int)(test_uniform(r) * 2);
    k.g.pad_left = (int)(test_uniform(r) * 2);
    k.g.pad_bottom = (int)(test_uniform(r) * 2);
    k.g.pad_right = (int)(test_uniform(r) * 2);
    k.h = k.kh + (int)(test_uniform(r) * 9);
    k.w = k.kw + (int)(test_uniform(r) * 9);
    return k;
}

static void plan_case(kv_conv_plan *p, const conv_case *k, int staged, int nhwc, size_t es,
                      size_t budget)
{
    kv_conv_plan_make(p, k->n, k->c, k->h, k->w, k->up, k->co, k->kh, k->kw, k->g, staged, nhwc,
                      es, budget);
}

START_TEST(conv_plan_covers_every_output_row_within_budget)
{
    test_rng rng = test_rng_new(31337);
    for (int iter = 0; iter < 20000; iter++) {
        conv_case k = random_conv_case(&rng);
        int staged = test_uniform(&rng) < 0.7, nhwc = test_uniform(&rng) < 0.5;
        size_t es = test_uniform(&rng) < 0.5 ? 2 : 4;
        size_t budget = (size_t)(test_uniform(&rng) * 4000);
        kv_conv_plan p;
        plan_case(&p, &k, staged, nhwc, es, budget);
        const int hi = k.h << k.up, wi = k.w << k.up;
        ck_assert_int_eq(p.ho, (hi + k.g.pad_top + k.g.pad_bottom - k.kh) / k.g.stride + 1);
        ck_assert_int_eq(p.wo, (wi + k.g.pad_left + k.g.pad_right - k.kw) / k.g.stride + 1);
        ck_assert_int_ge(p.chunk, 1);
        ck_assert_int_le(p.chunk, k.n);
        ck_assert_int_ge(p.rows, 1);
        ck_assert_int_eq(p.bands, (p.ho + p.rows - 1) / p.rows);
        if (k.up)
            ck_assert(p.staged); /* the upsample is read in the staging */
        if (!p.staged)
            ck_assert_int_eq(p.bands, 1);
        if (p.bands > 1)
            ck_assert_int_eq(p.chunk, 1);
        /* an NCHW band of y is not a packed tensor; an NHWC band is */
        ck_assert_int_eq(p.out_buffer, p.bands > 1 && !nhwc);
        /* the bands tile [0, ho) */
        int next = 0;
        for (int b = 0; b < p.bands; b++) {
            int rows = kv_conv_band_rows(&p, b);
            ck_assert_int_ge(rows, 1);
            ck_assert_int_eq(b * p.rows, next);
            next += rows;
        }
        ck_assert_int_eq(next, p.ho);
        size_t bytes = (p.in_elems + p.out_elems) * es;
        if (!(p.chunk == 1 && (p.rows == 1 || (!p.staged && p.bands == 1))))
            ck_assert_msg(bytes <= budget, "buffers of %zu bytes over a budget of %zu", bytes,
                          budget);
        if (p.staged)
            ck_assert_uint_eq(p.in_elems,
                              (size_t)p.chunk * k.c * kv_conv_in_rows(&p, p.rows) *
                                  (wi + k.g.pad_left + k.g.pad_right));
        else
            ck_assert_uint_eq(p.in_elems, 0);
    }
}
END_TEST

/* The CUDA backend's conv2d done on the CPU piece by piece, as conv2d.cu
 * runs it: the staging map (prologue, upsample, padding) into a buffer in
 * the backend's layout, an unpadded convolution of the staged piece (or a
 * padded one of whole samples), then the epilogue (bias, residual) at the
 * piece's place in y, or through the output buffer's map. x, r and y are in
 * storage layout; y starts as NaN so that every output is seen written once. */
typedef struct conv_operands {
    const float *x, *wt, *bias, *scale, *shift, *r;
    int act;
    double *y;
} conv_operands;

/* Element (b, ch, y, x) of an (n, c, h, w) tensor stored in the layout. */
static size_t at(int nhwc, int c, int h, int w, int b, int ch, int y, int x)
{
    return nhwc ? (((size_t)b * h + y) * w + x) * c + ch : (((size_t)b * c + ch) * h + y) * w + x;
}

static void conv_by_plan(const kv_conv_plan *p, const conv_operands *o)
{
    float *in = test_alloc(p->in_elems ? p->in_elems : 1);
    for (int n0 = 0; n0 < p->n; n0 += p->chunk) {
        int nb = p->n - n0 < p->chunk ? p->n - n0 : p->chunk;
        for (int band = 0; band < p->bands; band++) {
            int oy0 = band * p->rows, rows = kv_conv_band_rows(p, band);
            int in_rows = kv_conv_in_rows(p, rows), hin = p->h, win = p->w;
            int pad_t = p->pad_top, pad_l = p->pad_left;
            const float *src = o->x + kv_conv_input_offset(p, n0);
            if (p->staged) {
                size_t elems = kv_conv_piece_x_elems(p, nb, rows);
                for (size_t e = 0; e < elems; e++) {
                    int64_t plane;
                    int64_t s = kv_conv_stage_source(p, n0, oy0 * p->stride, in_rows, (int64_t)e,
                                                     &plane);
                    float v = 0.0f;
                    if (s >= 0) {
                        v = o->x[s];
                        if (o->scale)
                            v = kv_activate(o->act, v * o->scale[plane] + o->shift[plane]);
                    }
                    in[e] = v;
                }
                src = in;
                hin = in_rows;
                win = p->wp;
                pad_t = pad_l = 0;
            }
            /* the piece's convolution; its output element pe in the piece's layout */
            for (int nn = 0; nn < nb; nn++)
                for (int ch = 0; ch < p->co; ch++)
                    for (int r = 0; r < rows; r++)
                        for (int ox = 0; ox < p->wo; ox++) {
                            int oy = p->staged ? r : oy0 + r;
                            double s = 0.0;
                            for (int c = 0; c < p->c; c++)
                                for (int ky = 0; ky < p->kh; ky++)
                                    for (int kx = 0; kx < p->kw; kx++) {
                                        int iy = oy * p->stride + ky - pad_t;
                                        int ix = ox * p->stride + kx - pad_l;
                                        if (iy < 0 || iy >= hin || ix < 0 || ix >= win)
                                            continue;
                                        s += (double)src[at(p->nhwc, p->c, hin, win, nn, c, iy,
                                                            ix)] *
                                             o->wt[((ch * p->c + c) * p->kh + ky) * p->kw + kx];
                                    }
                            s += o->bias[ch];
                            int64_t t;
                            if (p->out_buffer) { /* the buffer is (nb, co, rows, wo) */
                                int64_t e = (((int64_t)nn * p->co + ch) * rows + r) * p->wo + ox;
                                t = kv_conv_output_target(p, n0, oy0, rows, e);
                            } else {
                                t = kv_conv_output_offset(p, n0, oy0) +
                                    (int64_t)at(p->nhwc, p->co, rows, p->wo, nn, ch, r, ox);
                            }
                            if (o->r)
                                s += o->r[t];
                            ck_assert_msg(o->y[t] != o->y[t], "output %lld written twice",
                                          (long long)t);
                            o->y[t] = s;
                        }
        }
    }
    free(in);
}

/* y from the specification in NCHW: b + sum w * xpad(up(prologue(x))) + r. */
static void conv_reference(const conv_case *k, const conv_operands *o, int ho, int wo,
                           double *y)
{
    const int hi = k->h << k->up, wi = k->w << k->up;
    for (int n = 0; n < k->n; n++)
        for (int ch = 0; ch < k->co; ch++)
            for (int oy = 0; oy < ho; oy++)
                for (int ox = 0; ox < wo; ox++) {
                    double s = o->bias[ch];
                    for (int c = 0; c < k->c; c++)
                        for (int ky = 0; ky < k->kh; ky++)
                            for (int kx = 0; kx < k->kw; kx++) {
                                int iy = oy * k->g.stride + ky - k->g.pad_top;
                                int ix = ox * k->g.stride + kx - k->g.pad_left;
                                if (iy < 0 || iy >= hi || ix < 0 || ix >= wi)
                                    continue;
                                double v = o->x[(((size_t)n * k->c + c) * k->h + (iy >> k->up)) *
                                                    k->w + (ix >> k->up)];
                                if (o->scale)
                                    v = kv_activate(o->act, (float)v * o->scale[n * k->c + c] +
                                                                o->shift[n * k->c + c]);
                                s += v * o->wt[((ch * k->c + c) * k->kh + ky) * k->kw + kx];
                            }
                    size_t i = (((size_t)n * k->co + ch) * ho + oy) * wo + ox;
                    if (o->r)
                        s += o->r[i];
                    y[i] = s;
                }
}

static float *to_layout(const float *nchw, int nhwc, int n, int c, int h, int w)
{
    size_t count = (size_t)n * c * h * w;
    float *out = test_alloc(count ? count : 1);
    for (size_t i = 0; i < count; i++)
        out[nhwc ? kv_nchw_to_nhwc(i, c, h, w) : i] = nchw[i];
    return out;
}

START_TEST(conv_pieces_compute_the_specified_convolution)
{
    /* _i: bit 0 the layout (NHWC), bit 1 a residual */
    const int nhwc = _i & 1, with_r = (_i >> 1) & 1;
    test_rng rng = test_rng_new(2024 + (uint64_t)_i);
    for (int iter = 0; iter < 250; iter++) {
        conv_case k = random_conv_case(&rng);
        int symmetric = k.g.pad_top == k.g.pad_bottom && k.g.pad_left == k.g.pad_right;
        int prologue = test_uniform(&rng) < 0.5;
        int staged = prologue || !symmetric || test_uniform(&rng) < 0.3;
        int act = prologue ? (int)(test_uniform(&rng) * 6) : 0;
        size_t budget = (size_t)(test_uniform(&rng) * 3000);
        kv_conv_plan p;
        plan_case(&p, &k, staged, nhwc, 4, budget);
        size_t nx = (size_t)k.n * k.c * k.h * k.w, nw = (size_t)k.co * k.c * k.kh * k.kw;
        size_t ny = (size_t)k.n * k.co * p.ho * p.wo;
        float *x = test_alloc(nx), *wt = test_alloc(nw), *bias = test_alloc((size_t)k.co);
        float *scale = test_alloc((size_t)k.n * k.c), *shift = test_alloc((size_t)k.n * k.c);
        float *r = test_alloc(ny);
        test_fill(x, nx, &rng, -2, 2);
        test_fill(wt, nw, &rng, -1, 1);
        test_fill(bias, (size_t)k.co, &rng, -1, 1);
        test_fill(scale, (size_t)k.n * k.c, &rng, 0.5f, 1.5f);
        test_fill(shift, (size_t)k.n * k.c, &rng, -0.5f, 0.5f);
        test_fill(r, ny, &rng, -1, 1);
        double *want = calloc(ny, sizeof *want), *got = malloc(ny * sizeof *got);
        ck_assert_ptr_nonnull(want);
        ck_assert_ptr_nonnull(got);
        for (size_t i = 0; i < ny; i++)
            got[i] = NAN; /* poison: every output must be written once */
        conv_operands ref = {x, wt, bias, prologue ? scale : NULL, shift, with_r ? r : NULL, act,
                             want};
        conv_reference(&k, &ref, p.ho, p.wo, want);
        float *xs = to_layout(x, nhwc, k.n, k.c, k.h, k.w);
        float *rs = to_layout(r, nhwc, k.n, k.co, p.ho, p.wo);
        conv_operands dev = {xs, wt, bias, ref.scale, shift, with_r ? rs : NULL, act, got};
        conv_by_plan(&p, &dev);
        for (size_t i = 0; i < ny; i++) {
            size_t t = nhwc ? kv_nchw_to_nhwc(i, k.co, p.ho, p.wo) : i;
            ck_assert_msg(fabs(got[t] - want[i]) <= 1e-5 * (1.0 + fabs(want[i])),
                          "iter %d: y[%zu] = %g, want %g (n %d c %d %dx%d up %d co %d k %dx%d s %d "
                          "pads %d %d %d %d, staged %d chunk %d rows %d bands %d)",
                          iter, i, got[t], want[i], k.n, k.c, k.h, k.w, k.up, k.co, k.kh, k.kw,
                          k.g.stride, k.g.pad_top, k.g.pad_left, k.g.pad_bottom, k.g.pad_right,
                          p.staged, p.chunk, p.rows, p.bands);
        }
        free(x), free(wt), free(bias), free(scale), free(shift), free(r), free(xs), free(rs);
        free(want), free(got);
    }
}
END_TEST

/* Every piece of a plan stays under cuDNN's 2^31 elements. */
static void assert_pieces_under_cudnn_limit(const kv_conv_plan *p)
{
    for (int n0 = 0; n0 < p->n; n0 += p->chunk) {
        int nb = p->n - n0 < p->chunk ? p->n - n0 : p->chunk;
        for (int b = 0; b < p->bands; b++) {
            int rows = kv_conv_band_rows(p, b);
            ck_assert_uint_le(kv_conv_piece_x_elems(p, nb, rows), KV_CUDNN_MAX_ELEMS);
            ck_assert_uint_le(kv_conv_piece_y_elems(p, nb, rows), KV_CUDNN_MAX_ELEMS);
        }
    }
}

START_TEST(conv_plan_bands_the_decoders_largest_input)
{
    const kv_conv_geometry same = {1, 1, 1, 1, 1}, pointwise = {1, 0, 0, 0, 0};
    const size_t budget = (size_t)128 << 20;
    kv_conv_plan p;
    /* up_blocks.3.resnets.0.conv1 at 1024^2 in bf16 NHWC: 256 -> 128 channels
     * with its group norm: bands, written in place */
    kv_conv_plan_make(&p, 1, 256, 1024, 1024, 0, 128, 3, 3, same, 1, 1, 2, budget);
    ck_assert_int_gt(p.bands, 1);
    ck_assert_int_eq(p.out_buffer, 0);
    ck_assert((p.in_elems + p.out_elems) * 2 <= budget);
    ck_assert_int_ge(p.rows, 64); /* still big pieces for cuDNN */
    /* the upsampler of up_blocks.2 reads 512^2 through the upsample: never a
     * 1024^2 copy of its input */
    kv_conv_plan_make(&p, 1, 256, 512, 512, 1, 256, 3, 3, same, 0, 1, 2, budget);
    ck_assert(p.staged);
    ck_assert_int_eq(p.ho, 1024);
    ck_assert((p.in_elems + p.out_elems) * 2 <= budget);
    /* the 64x64-latent mid block fits whole, with every sample of a batch of 8 */
    kv_conv_plan_make(&p, 8, 512, 64, 64, 0, 512, 3, 3, same, 1, 1, 2, budget);
    ck_assert_int_eq(p.bands, 1);
    ck_assert_int_ge(p.chunk, 4);
    /* no prologue, symmetric: cuDNN gets x and y as they are */
    kv_conv_plan_make(&p, 8, 512, 64, 64, 0, 512, 3, 3, same, 0, 1, 2, budget);
    ck_assert_int_eq(p.chunk, 8);
    ck_assert_uint_eq(p.in_elems + p.out_elems, 0);
    /* batch 8 at 1024^2: the 256-channel shortcut's input is 2^31 elements,
     * one over cuDNN's limit: the batch is split */
    kv_conv_plan_make(&p, 8, 256, 1024, 1024, 0, 128, 1, 1, pointwise, 0, 1, 2, budget);
    ck_assert(!p.staged);
    ck_assert_int_lt(p.chunk, 8);
    assert_pieces_under_cudnn_limit(&p);
    /* and the conv that reads the upsample of 8 x 256 x 512^2 */
    kv_conv_plan_make(&p, 8, 256, 512, 512, 1, 256, 3, 3, same, 0, 1, 2, budget);
    assert_pieces_under_cudnn_limit(&p);
    /* one sample over the limit by itself (512 x 2048^2 = 2^31): staged and
     * banded, in either layout */
    for (int nhwc = 0; nhwc <= 1; nhwc++) {
        kv_conv_plan_make(&p, 1, 512, 2048, 2048, 0, 512, 3, 3, same, 0, nhwc, 4, (size_t)1 << 40);
        ck_assert(p.staged);
        ck_assert_int_gt(p.bands, 1);
        assert_pieces_under_cudnn_limit(&p);
    }
}
END_TEST

/* conv2d_backward_data with asymmetric padding, as conv2d_backward.cu does
 * it: the gradient of the padded input (the convolution unpadded), then
 * cropped with kv_conv_crop_source in either layout; against the CPU
 * backend's op. */
/* kv_conv_height_class: a power of two, at least h, under 2h, never smaller
 * for a larger h (so the classes are the intervals (2^(k-1), 2^k]). */
START_TEST(conv_height_class_is_the_next_power_of_two)
{
    int previous = 0;
    for (int h = 1; h <= 70000; h++) {
        int c = kv_conv_height_class(h);
        ck_assert_int_ge(c, h);
        ck_assert_int_lt(c, 2 * h + (h == 1));
        ck_assert_int_eq(c & (c - 1), 0);
        ck_assert_int_ge(c, previous);
        previous = c;
    }
    ck_assert_int_eq(kv_conv_height_class(489), 512);
    ck_assert_int_eq(kv_conv_height_class(512), 512);
    ck_assert_int_eq(kv_conv_height_class(513), 1024);
}
END_TEST

START_TEST(backward_data_crop_gives_the_cpu_gradient)
{
    test_rng rng = test_rng_new(606);
    const kv_conv_geometry geos[] = {{2, 0, 0, 1, 1}, {1, 0, 1, 2, 0}, {2, 1, 0, 0, 1}};
    for (int gi = 0; gi < 3; gi++)
        for (int nhwc = 0; nhwc <= 1; nhwc++) {
            const kv_conv_geometry g = geos[gi];
            const int n = 2, c = 3, h = 7, w = 6, co = 4, k = 3;
            const int hp = h + g.pad_top + g.pad_bottom, wp = w + g.pad_left + g.pad_right;
            const int ho = (hp - k) / g.stride + 1, wo = (wp - k) / g.stride + 1;
            size_t nx = (size_t)n * c * h * w, nw = (size_t)co * c * k * k;
            size_t ny = (size_t)n * co * ho * wo, np = (size_t)n * c * hp * wp;
            float *wt = test_alloc(nw), *dy = test_alloc(ny), *want = test_alloc(nx);
            double *dxp = calloc(np, sizeof *dxp); /* NCHW, padded */
            ck_assert_ptr_nonnull(dxp);
            test_fill(wt, nw, &rng, -1, 1);
            test_fill(dy, ny, &rng, -1, 1);
            for (int b = 0; b < n; b++)
                for (int o = 0; o < co; o++)
                    for (int oy = 0; oy < ho; oy++)
                        for (int ox = 0; ox < wo; ox++)
                            for (int ch = 0; ch < c; ch++)
                                for (int ky = 0; ky < k; ky++)
                                    for (int kx = 0; kx < k; kx++)
                                        dxp[(((size_t)b * c + ch) * hp + oy * g.stride + ky) * wp +
                                            ox * g.stride + kx] +=
                                            (double)dy[(((size_t)b * co + o) * ho + oy) * wo + ox] *
                                            wt[((o * c + ch) * k + ky) * k + kx];
            /* the padded gradient as the backend stores it, then the crop */
            double *stored = calloc(np, sizeof *stored);
            ck_assert_ptr_nonnull(stored);
            for (size_t i = 0; i < np; i++)
                stored[nhwc ? kv_nchw_to_nhwc(i, c, hp, wp) : i] = dxp[i];
            kv_backend_settings settings;
            memset(&settings, 0, sizeof settings);
            settings.threads = 1;
            kv_backend *be = NULL;
            ck_assert_ok(kv_cpu_backend_create(&settings, &be));
            kv_tensor tdy = kv_tensor_wrap(dy, n, co, ho, wo), tw = kv_tensor_wrap(wt, co, c, k, k),
                      tdx = kv_tensor_wrap(want, n, c, h, w);
            ck_assert_ok(be->ops->conv2d_backward_data(be, &tdy, &tw, g, &tdx));
            kv_backend_destroy(be);
            for (size_t e = 0; e < nx; e++) {
                double got = stored[kv_conv_crop_source((int64_t)e, nhwc, c, h, w, hp, wp,
                                                        g.pad_top, g.pad_left)];
                size_t i = nhwc ? kv_nhwc_to_nchw(e, c, h, w) : e;
                ck_assert_msg(fabs(got - want[i]) <= 1e-5 * (1.0 + fabs(want[i])),
                              "geometry %d, nhwc %d: dx[%zu] = %g, the CPU's %g", gi, nhwc, i,
                              got, (double)want[i]);
            }
            free(wt), free(dy), free(want), free(dxp), free(stored);
        }
}
END_TEST

START_TEST(storage_nc_names_sample_and_channel)
{
    const int n = 3, c = 5, h = 4, w = 3;
    const size_t hw = (size_t)h * w;
    for (int nhwc = 0; nhwc <= 1; nhwc++)
        for (int b = 0; b < n; b++)
            for (int ch = 0; ch < c; ch++)
                for (size_t p = 0; p < hw; p++) {
                    size_t i = ((size_t)b * c + ch) * hw + p;
                    size_t e = nhwc ? kv_nchw_to_nhwc(i, c, h, w) : i;
                    int gn, gc;
                    kv_storage_nc(e, nhwc, c, hw, &gn, &gc);
                    ck_assert_int_eq(gn, b);
                    ck_assert_int_eq(gc, ch);
                }
}
END_TEST

/* ---- group norm ---- */

START_TEST(group_norm_chunks_tile_each_group)
{
    const size_t counts[] = {1, 7, 16383, 16384, 16385, 100000, (size_t)16 << 20, (size_t)1 << 33};
    for (size_t i = 0; i < sizeof counts / sizeof counts[0]; i++) {
        size_t count = counts[i];
        int chunks = kv_gn_chunks(count);
        ck_assert_int_ge(chunks, 1);
        ck_assert_int_le(chunks, KV_GN_CHUNKS_MAX);
        size_t next = 0;
        for (int k = 0; k < chunks; k++) {
            size_t b, e;
            kv_gn_chunk_range(count, chunks, k, &b, &e);
            ck_assert_uint_eq(b, next);
            ck_assert_uint_ge(e, b);
            if (count >= (size_t)chunks)
                ck_assert_uint_gt(e, b);
            next = e;
        }
        ck_assert_uint_eq(next, count);
    }
}
END_TEST

START_TEST(group_norm_finalize_matches_the_cpu_backend)
{
    const int n = 2, c = 12, groups = 3, h = 37, w = 29;
    const size_t plane = (size_t)h * w, count = (size_t)(c / groups) * plane;
    test_rng rng = test_rng_new(515);
    float *x = test_alloc((size_t)n * c * plane), gamma[12], beta[12];
    test_fill(x, (size_t)n * c * plane, &rng, -3, 5);
    test_fill(gamma, 12, &rng, 0.5f, 2);
    test_fill(beta, 12, &rng, -1, 1);
    float scale[24], shift[24], mean[6], rstd[6];
    kv_backend_settings settings;
    memset(&settings, 0, sizeof settings);
    settings.threads = 1;
    kv_backend *be = NULL;
    ck_assert_ok(kv_cpu_backend_create(&settings, &be));
    kv_tensor tx = kv_tensor_wrap(x, n, c, h, w), tg = kv_tensor_wrap(gamma, 1, c, 1, 1),
              tb = kv_tensor_wrap(beta, 1, c, 1, 1), ts = kv_tensor_wrap(scale, n, c, 1, 1),
              tt = kv_tensor_wrap(shift, n, c, 1, 1), tm = kv_tensor_wrap(mean, n, groups, 1, 1),
              tr = kv_tensor_wrap(rstd, n, groups, 1, 1);
    ck_assert_ok(be->ops->group_norm_stats(be, &tx, &tg, &tb, groups, 1e-6f, &ts, &tt, &tm, &tr));
    kv_backend_destroy(be);
    /* the GPU's way: chunk sums in double, added in chunk order */
    for (int b = 0; b < n; b++)
        for (int g = 0; g < groups; g++) {
            const float *xg = x + ((size_t)b * groups + g) * count;
            int chunks = kv_gn_chunks(count);
            double s = 0.0, q = 0.0;
            for (int k = 0; k < chunks; k++) {
                size_t lo, hi;
                kv_gn_chunk_range(count, chunks, k, &lo, &hi);
                double cs = 0.0, cq = 0.0;
                for (size_t i = lo; i < hi; i++) {
                    cs += xg[i];
                    cq += (double)xg[i] * xg[i];
                }
                s += cs;
                q += cq;
            }
            for (int ch = g * (c / groups); ch < (g + 1) * (c / groups); ch++) {
                float sc, sh;
                double mu, rs;
                kv_gn_finalize(s, q, count, 1e-6f, gamma[ch], beta[ch], &sc, &sh, &mu, &rs);
                ck_assert_float_eq_tol(sc, scale[b * c + ch], 1e-6f * fabsf(scale[b * c + ch]));
                ck_assert_float_eq_tol(sh, shift[b * c + ch], 1e-6f * (1 + fabsf(shift[b * c + ch])));
                ck_assert_float_eq_tol((float)mu, mean[b * groups + g], 1e-6f);
                ck_assert_float_eq_tol((float)rs, rstd[b * groups + g], 1e-6f * rstd[b * groups + g]);
            }
        }
    free(x);
}
END_TEST

/* ---- attention ---- */

START_TEST(attention_blocks_are_linear_in_positions)
{
    const int ns[] = {1, 5, 63, 64, 65, 1000, 4096, 16384, 65536};
    const int batches[] = {1, 2, 8};
    const size_t budget = (size_t)64 << 20;
    for (size_t i = 0; i < sizeof ns / sizeof ns[0]; i++)
        for (size_t j = 0; j < sizeof batches / sizeof batches[0]; j++)
            for (size_t bytes = 4; bytes <= 6; bytes += 2) {
                int n = ns[i], batch = batches[j];
                int block = kv_attention_block(n, batch, bytes, budget);
                ck_assert_int_ge(block, 1);
                ck_assert_int_le(block, n);
                ck_assert(block == n || block % KV_ATTENTION_ALIGN == 0);
                if (block > KV_ATTENTION_ALIGN)
                    ck_assert((size_t)block * n * batch * bytes <= budget);
                int next = 0;
                for (int k = 0; next < n; k++) {
                    int size = kv_attention_block_size(n, block, k);
                    ck_assert_int_ge(size, 1);
                    next += size;
                }
                ck_assert_int_eq(next, n);
            }
    /* 1024^2 decode: 16384 positions never need the 1 GiB score matrix */
    int block = kv_attention_block(16384, 1, 6, budget);
    ck_assert((size_t)block * 16384 * 6 <= budget);
    ck_assert_int_ge(block, 512);
}
END_TEST

/* ---- the block table ---- */

START_TEST(tensor_table_finds_every_block_by_any_pointer)
{
    kv_tensor_table t;
    memset(&t, 0, sizeof t);
    enum { BLOCKS = 700 };
    static char arena[BLOCKS * 64];
    /* blocks of 1 to 64 bytes, packed as a pool packs small ones */
    size_t offset[BLOCKS], bytes[BLOCKS], total = 0;
    size_t at_ = 0;
    for (int i = 0; i < BLOCKS; i++) {
        bytes[i] = (size_t)(i % 64) + 1;
        offset[i] = at_;
        at_ += 64;
        kv_block_info b = {arena + offset[i], bytes[i], (unsigned char)(i % 3 == 0)};
        ck_assert_int_eq(kv_ttable_insert(&t, b), 0);
        total += bytes[i];
        ck_assert_uint_eq(t.in_use, total);
    }
    ck_assert_uint_eq(t.peak, total);
    ck_assert_uint_eq(t.count, BLOCKS);
    for (int i = 0; i < BLOCKS; i++) {
        const kv_block_info *b = kv_ttable_find(&t, arena + offset[i]);
        ck_assert_ptr_nonnull(b);
        ck_assert_int_eq(b->bf16, i % 3 == 0);
        /* an interior pointer finds its block; one past the end does not */
        ck_assert_ptr_eq(kv_ttable_find(&t, arena + offset[i] + bytes[i] - 1), b);
        if (bytes[i] < 64)
            ck_assert_ptr_null(kv_ttable_find(&t, arena + offset[i] + bytes[i]));
    }
    int local;
    ck_assert_ptr_null(kv_ttable_find(&t, &local));
    ck_assert_ptr_null(kv_ttable_find(&t, NULL));
    /* remove every other block: the rest stay findable (backward shift) */
    for (int i = 0; i < BLOCKS; i += 2) {
        ck_assert_uint_eq(kv_ttable_remove(&t, arena + offset[i]), bytes[i]);
        total -= bytes[i];
    }
    ck_assert_uint_eq(kv_ttable_remove(&t, arena + offset[0]), 0); /* twice */
    ck_assert_uint_eq(t.in_use, total);
    ck_assert_uint_eq(t.count, BLOCKS / 2);
    for (int i = 0; i < BLOCKS; i++) {
        const kv_block_info *b = kv_ttable_find(&t, arena + offset[i]);
        if (i % 2)
            ck_assert_msg(b && b->ptr == arena + offset[i], "block %d lost", i);
        else
            ck_assert_ptr_null(b);
    }
    /* the peak stays until the caller resets it (trim) */
    ck_assert_uint_gt(t.peak, t.in_use);
    kv_ttable_free(&t);
    ck_assert_uint_eq(t.capacity, 0);
}
END_TEST

/* ---- group norm in NHWC ---- */

/* cuda/group_norm.cu's NHWC sums on the CPU: per chunk of pixels and per
 * channel (threads sharing a slot take every sharers-th pixel, added in
 * lane order), then per group over chunks and channels in order. They must
 * give the CPU backend's statistics. */
START_TEST(group_norm_nhwc_sums_match_the_cpu_backend)
{
    const int n = 2, c = 24, groups = 6, h = 41, w = 23, width = 8, threads = 256;
    const size_t pixels = (size_t)h * w, count = (size_t)(c / groups) * pixels;
    test_rng rng = test_rng_new(516);
    float *x = test_alloc((size_t)n * c * pixels), gamma[24], beta[24];
    test_fill(x, (size_t)n * c * pixels, &rng, -3, 5);
    test_fill(gamma, 24, &rng, 0.5f, 2);
    test_fill(beta, 24, &rng, -1, 1);
    float scale[48], shift[48], mean[12], rstd[12];
    kv_backend_settings settings;
    memset(&settings, 0, sizeof settings);
    settings.threads = 1;
    kv_backend *be = NULL;
    ck_assert_ok(kv_cpu_backend_create(&settings, &be));
    kv_tensor tx = kv_tensor_wrap(x, n, c, h, w), tg = kv_tensor_wrap(gamma, 1, c, 1, 1),
              tb = kv_tensor_wrap(beta, 1, c, 1, 1), ts = kv_tensor_wrap(scale, n, c, 1, 1),
              tt = kv_tensor_wrap(shift, n, c, 1, 1), tm = kv_tensor_wrap(mean, n, groups, 1, 1),
              tr = kv_tensor_wrap(rstd, n, groups, 1, 1);
    ck_assert_ok(be->ops->group_norm_stats(be, &tx, &tg, &tb, groups, 1e-6f, &ts, &tt, &tm, &tr));
    kv_backend_destroy(be);
    float *xs = to_layout(x, 1, n, c, h, w);
    const int chunks = kv_gn_chunks(pixels * c), sharers = threads / (c / width);
    double *part = calloc((size_t)2 * n * chunks * c, sizeof *part);
    ck_assert_ptr_nonnull(part);
    for (int b = 0; b < n; b++)
        for (int k = 0; k < chunks; k++) {
            size_t p0, p1;
            kv_gn_chunk_range(pixels, chunks, k, &p0, &p1);
            for (int ch = 0; ch < c; ch++) {
                double s = 0.0, q = 0.0;
                for (int lane = 0; lane < sharers; lane++) {
                    double ls = 0.0, lq = 0.0;
                    for (size_t p = p0 + lane; p < p1; p += sharers) {
                        double v = xs[((size_t)b * pixels + p) * c + ch];
                        ls += v;
                        lq += v * v;
                    }
                    s += ls;
                    q += lq;
                }
                part[2 * (((size_t)b * chunks + k) * c + ch)] = s;
                part[2 * (((size_t)b * chunks + k) * c + ch) + 1] = q;
            }
        }
    const int cpg = c / groups;
    for (int b = 0; b < n; b++)
        for (int g = 0; g < groups; g++) {
            double s = 0.0, q = 0.0;
            for (int k = 0; k < chunks; k++)
                for (int ch = g * cpg; ch < (g + 1) * cpg; ch++) {
                    s += part[2 * (((size_t)b * chunks + k) * c + ch)];
                    q += part[2 * (((size_t)b * chunks + k) * c + ch) + 1];
                }
            for (int ch = g * cpg; ch < (g + 1) * cpg; ch++) {
                float sc, sh;
                double mu, rs;
                kv_gn_finalize(s, q, count, 1e-6f, gamma[ch], beta[ch], &sc, &sh, &mu, &rs);
                ck_assert_float_eq_tol(sc, scale[b * c + ch], 1e-6f * fabsf(scale[b * c + ch]));
                ck_assert_float_eq_tol(sh, shift[b * c + ch],
                                       1e-6f * (1 + fabsf(shift[b * c + ch])));
                ck_assert_float_eq_tol((float)mu, mean[b * groups + g], 1e-6f);
                ck_assert_float_eq_tol((float)rs, rstd[b * groups + g],
                                       1e-6f * rstd[b * groups + g]);
            }
        }
    free(x), free(xs), free(part);
}
END_TEST

Suite *suite_cuda_host(void)
{
    Suite *s = suite_create("cuda_host");
    TCase *tc = tcase_create("index math");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, bf16_round_trips_every_pattern);
    tcase_add_test(tc, bf16_rounds_to_nearest_even);
    tcase_add_test(tc, activations_are_the_cpu_formulas);
    tcase_add_test(tc, upsample_maps_repeat_each_pixel);
    tcase_add_test(tc, posterior_maps_take_the_halves);
    tcase_add_test(tc, layout_maps_are_inverse_permutations);
    tcase_add_test(tc, nhwc_sampling_gives_the_cpu_bits);
    tcase_add_test(tc, philox_index_is_first_plus_the_nchw_index);
    tcase_add_test(tc, nhwc_lpips_mask_at_first_gives_the_cpu_bits);
    tcase_add_test(tc, nhwc_posterior_backward_at_first_gives_the_cpu_bits);
    tcase_add_test(tc, batch_norm_channel_math_gives_the_cpu_bits);
    tcase_add_test(tc, conv_plan_covers_every_output_row_within_budget);
    tcase_add_loop_test(tc, conv_pieces_compute_the_specified_convolution, 0, 4);
    tcase_add_test(tc, conv_plan_bands_the_decoders_largest_input);
    tcase_add_test(tc, conv_height_class_is_the_next_power_of_two);
    tcase_add_test(tc, backward_data_crop_gives_the_cpu_gradient);
    tcase_add_test(tc, storage_nc_names_sample_and_channel);
    tcase_add_test(tc, group_norm_chunks_tile_each_group);
    tcase_add_test(tc, group_norm_finalize_matches_the_cpu_backend);
    tcase_add_test(tc, group_norm_nhwc_sums_match_the_cpu_backend);
    tcase_add_test(tc, attention_blocks_are_linear_in_positions);
    tcase_add_test(tc, tensor_table_finds_every_block_by_any_pointer);
    suite_add_tcase(s, tc);
    return s;
}
