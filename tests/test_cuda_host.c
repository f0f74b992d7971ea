/* test_cuda_host.c — the CUDA backend's index math, plans and allocator,
 * checked on the CPU (no GPU, no CUDA toolkit needed): the __host__
 * __device__ functions of the cuda/ headers compile as plain C here (KV_HD is
 * empty outside nvcc) and are compared with straightforward loops written
 * from backend.h's specification. */
#include "test_util.h"

#include "../cuda/attention_plan.cuh"
#include "../cuda/conv2d_plan.cuh"
#include "../cuda/device_cache.cuh"
#include "../cuda/group_norm_plan.cuh"
#include "../cuda/posterior_plan.cuh"
#include "../cuda/upsample_plan.cuh"
#include "backend/backend.h"
#include "backend/cpu/cpu_ops.h"

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

START_TEST(upsample_map_repeats_each_pixel)
{
    for (int h = 1; h <= 5; h++)
        for (int w = 1; w <= 6; w++) {
            const int planes = 3;
            for (int p = 0; p < planes; p++)
                for (int y = 0; y < 2 * h; y++)
                    for (int x = 0; x < 2 * w; x++) {
                        size_t want = (size_t)p * h * w + (size_t)(y / 2) * w + x / 2;
                        ck_assert_uint_eq(kv_upsample_source((size_t)p, y * 2 * w + x, h, w),
                                          want);
                    }
        }
}
END_TEST

START_TEST(posterior_map_takes_the_halves)
{
    const int n = 3, z = 4, hw = 5;
    const size_t block = (size_t)z * hw;
    for (int b = 0; b < n; b++)
        for (int c = 0; c < z; c++)
            for (int p = 0; p < hw; p++) {
                size_t i = (size_t)b * block + (size_t)c * hw + p;
                size_t want = ((size_t)b * 2 * z + c) * hw + p;
                ck_assert_uint_eq(kv_posterior_source(i, block), want);
            }
    ck_assert_float_eq(kv_clamp_logvar(-31.0f), -30.0f);
    ck_assert_float_eq(kv_clamp_logvar(25.0f), 20.0f);
    ck_assert_float_eq(kv_clamp_logvar(1.5f), 1.5f);
}
END_TEST

/* ---- conv2d plans ---- */

typedef struct conv_case {
    int n, c, h, w, co, kh, kw;
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
    k.g.stride = 1 + (int)(test_uniform(r) * 2);
    k.g.pad_top = (int)(test_uniform(r) * 2);
    k.g.pad_left = (int)(test_uniform(r) * 2);
    k.g.pad_bottom = (int)(test_uniform(r) * 2);
    k.g.pad_right = (int)(test_uniform(r) * 2);
    k.h = k.kh + (int)(test_uniform(r) * 9);
    k.w = k.kw + (int)(test_uniform(r) * 9);
    return k;
}

START_TEST(conv_plan_covers_every_output_row_within_budget)
{
    test_rng rng = test_rng_new(31337);
    for (int iter = 0; iter < 20000; iter++) {
        conv_case k = random_conv_case(&rng);
        int staged = test_uniform(&rng) < 0.7, convert = test_uniform(&rng) < 0.3;
        size_t es = test_uniform(&rng) < 0.5 ? 2 : 4;
        size_t budget = (size_t)(test_uniform(&rng) * 4000);
        kv_conv_plan p;
        kv_conv_plan_make(&p, k.n, k.c, k.h, k.w, k.co, k.kh, k.kw, k.g, staged, convert, es,
                          budget);
        ck_assert_int_eq(p.ho, (k.h + k.g.pad_top + k.g.pad_bottom - k.kh) / k.g.stride + 1);
        ck_assert_int_ge(p.chunk, 1);
        ck_assert_int_le(p.chunk, k.n);
        ck_assert_int_ge(p.rows, 1);
        ck_assert_int_eq(p.bands, (p.ho + p.rows - 1) / p.rows);
        if (!staged)
            ck_assert_int_eq(p.bands, 1);
        if (p.bands > 1) {
            ck_assert_int_eq(p.chunk, 1);
            ck_assert(p.out_buffer); /* a band of y is not a packed tensor */
        }
        if (convert)
            ck_assert(p.out_buffer);
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
        if (!(p.chunk == 1 && (p.rows == 1 || (!staged && p.bands == 1))))
            ck_assert_msg(bytes <= budget, "buffers of %zu bytes over a budget of %zu", bytes,
                          budget);
        if (staged)
            ck_assert_uint_eq(p.in_elems,
                              (size_t)p.chunk * k.c * kv_conv_in_rows(&p, p.rows) *
                                  (k.w + k.g.pad_left + k.g.pad_right));
        else
            ck_assert_uint_eq(p.in_elems, 0);
    }
}
END_TEST

static double act_ref(int act, double v)
{
    return kv_activate((kv_activation)act, (float)v);
}

/* y from the specification: b + sum w * xpad(prologue(x)), in double. */
static void conv_reference(const conv_case *k, const float *x, const float *wt, const float *bias,
                           const float *scale, const float *shift, int act, int ho, int wo,
                           double *y)
{
    for (int n = 0; n < k->n; n++)
        for (int o = 0; o < k->co; o++)
            for (int oy = 0; oy < ho; oy++)
                for (int ox = 0; ox < wo; ox++) {
                    double s = bias[o];
                    for (int c = 0; c < k->c; c++)
                        for (int ky = 0; ky < k->kh; ky++)
                            for (int kx = 0; kx < k->kw; kx++) {
                                int iy = oy * k->g.stride + ky - k->g.pad_top;
                                int ix = ox * k->g.stride + kx - k->g.pad_left;
                                if (iy < 0 || iy >= k->h || ix < 0 || ix >= k->w)
                                    continue;
                                double v = x[((n * k->c + c) * k->h + iy) * k->w + ix];
                                if (scale)
                                    v = act_ref(act, (float)v * scale[n * k->c + c] +
                                                         shift[n * k->c + c]);
                                s += v * wt[((o * k->c + c) * k->kh + ky) * k->kw + kx];
                            }
                    y[((n * k->co + o) * ho + oy) * wo + ox] = s;
                }
}

/* The CUDA backend's conv2d done on the CPU piece by piece: the staging map,
 * an unpadded convolution of the staged rows, the output map. */
static void conv_by_plan(const kv_conv_plan *p, const float *x, const float *wt,
                         const float *bias, const float *scale, const float *shift, int act,
                         double *y)
{
    float *in = test_alloc(p->in_elems ? p->in_elems : 1);
    for (int n0 = 0; n0 < p->n; n0 += p->chunk) {
        int nb = p->n - n0 < p->chunk ? p->n - n0 : p->chunk;
        for (int band = 0; band < p->bands; band++) {
            int oy0 = band * p->rows, rows = kv_conv_band_rows(p, band);
            int in_rows = kv_conv_in_rows(p, rows), hin = p->h, win = p->w;
            int pad_t = p->pad_top, pad_l = p->pad_left;
            const float *src = x + (size_t)n0 * p->c * p->h * p->w;
            if (p->staged) {
                int pixels = in_rows * p->wp;
                for (int lp = 0; lp < nb * p->c; lp++)
                    for (int pix = 0; pix < pixels; pix++) {
                        int64_t plane;
                        int64_t s = kv_conv_stage_source(p, n0, oy0 * p->stride, lp, pix, &plane);
                        float v = 0.0f;
                        if (s >= 0) {
                            v = x[s];
                            if (scale)
                                v = kv_activate(act, v * scale[plane] + shift[plane]);
                        }
                        in[(size_t)lp * pixels + pix] = v;
                    }
                src = in;
                hin = in_rows;
                win = p->wp;
                pad_t = pad_l = 0;
            }
            /* the piece's convolution, unpadded when staged */
            int pixels = rows * p->wo;
            for (int lp = 0; lp < nb * p->co; lp++) {
                int nn = lp / p->co, o = lp % p->co;
                for (int pix = 0; pix < pixels; pix++) {
                    int r = pix / p->wo, ox = pix % p->wo;
                    int oy = p->staged ? r : oy0 + r;
                    double s = 0.0;
                    for (int c = 0; c < p->c; c++)
                        for (int ky = 0; ky < p->kh; ky++)
                            for (int kx = 0; kx < p->kw; kx++) {
                                int iy = oy * p->stride + ky - pad_t, ix = ox * p->stride + kx - pad_l;
                                if (iy < 0 || iy >= hin || ix < 0 || ix >= win)
                                    continue;
                                s += (double)src[((size_t)(nn * p->c + c) * hin + iy) * win + ix] *
                                     wt[((o * p->c + c) * p->kh + ky) * p->kw + kx];
                            }
                    int channel;
                    int64_t t = kv_conv_output_target(p, n0, oy0, lp, pix, &channel);
                    ck_assert_int_eq(channel, o);
                    ck_assert_msg(y[t] != y[t], "output %lld written twice", (long long)t);
                    y[t] = s + bias[channel];
                }
            }
        }
    }
    free(in);
}

START_TEST(conv_pieces_compute_the_specified_convolution)
{
    test_rng rng = test_rng_new(2024 + (uint64_t)_i);
    for (int iter = 0; iter < 300; iter++) {
        conv_case k = random_conv_case(&rng);
        int symmetric = k.g.pad_top == k.g.pad_bottom && k.g.pad_left == k.g.pad_right;
        int prologue = test_uniform(&rng) < 0.5;
        int staged = prologue || !symmetric || test_uniform(&rng) < 0.5;
        int convert = test_uniform(&rng) < 0.3;
        int act = prologue ? (int)(test_uniform(&rng) * 6) : 0;
        size_t budget = (size_t)(test_uniform(&rng) * 3000);
        kv_conv_plan p;
        kv_conv_plan_make(&p, k.n, k.c, k.h, k.w, k.co, k.kh, k.kw, k.g, staged, convert, 4,
                          budget);
        size_t nx = (size_t)k.n * k.c * k.h * k.w, nw = (size_t)k.co * k.c * k.kh * k.kw;
        size_t ny = (size_t)k.n * k.co * p.ho * p.wo;
        float *x = test_alloc(nx), *wt = test_alloc(nw), *bias = test_alloc((size_t)k.co);
        float *scale = test_alloc((size_t)k.n * k.c), *shift = test_alloc((size_t)k.n * k.c);
        test_fill(x, nx, &rng, -2, 2);
        test_fill(wt, nw, &rng, -1, 1);
        test_fill(bias, (size_t)k.co, &rng, -1, 1);
        test_fill(scale, (size_t)k.n * k.c, &rng, 0.5f, 1.5f);
        test_fill(shift, (size_t)k.n * k.c, &rng, -0.5f, 0.5f);
        double *want = calloc(ny, sizeof *want), *got = malloc(ny * sizeof *got);
        ck_assert_ptr_nonnull(want);
        ck_assert_ptr_nonnull(got);
        for (size_t i = 0; i < ny; i++)
            got[i] = NAN; /* poison: every output must be written once */
        conv_reference(&k, x, wt, bias, prologue ? scale : NULL, shift, act, p.ho, p.wo, want);
        conv_by_plan(&p, x, wt, bias, prologue ? scale : NULL, shift, act, got);
        for (size_t i = 0; i < ny; i++)
            ck_assert_msg(fabs(got[i] - want[i]) <= 1e-5 * (1.0 + fabs(want[i])),
                          "iter %d: y[%zu] = %g, want %g (n %d c %d %dx%d co %d k %dx%d s %d pads "
                          "%d %d %d %d, staged %d chunk %d rows %d bands %d)",
                          iter, i, got[i], want[i], k.n, k.c, k.h, k.w, k.co, k.kh, k.kw,
                          k.g.stride, k.g.pad_top, k.g.pad_left, k.g.pad_bottom, k.g.pad_right,
                          p.staged, p.chunk, p.rows, p.bands);
        free(x);
        free(wt);
        free(bias);
        free(scale);
        free(shift);
        free(want);
        free(got);
    }
}
END_TEST

START_TEST(conv_plan_bands_the_decoders_largest_input)
{
    /* up_blocks.3.resnets.0.conv1 at 1024^2 in bf16: 256 -> 128 channels */
    kv_conv_geometry same = {1, 1, 1, 1, 1};
    kv_conv_plan p;
    kv_conv_plan_make(&p, 1, 256, 1024, 1024, 128, 3, 3, same, 1, 0, 2, (size_t)64 << 20);
    ck_assert_int_gt(p.bands, 1);
    ck_assert((p.in_elems + p.out_elems) * 2 <= (size_t)64 << 20);
    ck_assert_int_ge(p.rows, 32); /* still big pieces for cuDNN */
    /* the 64x64-latent mid block fits whole, with every sample of a batch of 8 */
    kv_conv_plan_make(&p, 8, 512, 64, 64, 512, 3, 3, same, 1, 0, 2, (size_t)64 << 20);
    ck_assert_int_eq(p.bands, 1);
    ck_assert_int_ge(p.chunk, 4);
    /* no prologue, symmetric, right dtype: cuDNN gets x and y as they are */
    kv_conv_plan_make(&p, 8, 512, 64, 64, 512, 3, 3, same, 0, 0, 2, (size_t)64 << 20);
    ck_assert_int_eq(p.chunk, 8);
    ck_assert_uint_eq(p.in_elems + p.out_elems, 0);
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

/* ---- the caching allocator, over malloc ---- */

typedef struct fake_device {
    size_t limit, used;
    int mallocs, frees, syncs;
} fake_device;

/* Blocks carry their size in front, so that freeing gives it back. */
static int fake_malloc(void *ctx, size_t bytes, void **ptr)
{
    fake_device *d = ctx;
    if (d->used + bytes > d->limit)
        return KV_DCACHE_OOM;
    size_t *block = malloc(bytes + 16);
    if (!block)
        return KV_DCACHE_FAIL;
    block[0] = bytes;
    *ptr = (char *)block + 16;
    d->used += bytes;
    d->mallocs++;
    return KV_DCACHE_OK;
}

static void fake_free(void *ctx, void *ptr)
{
    fake_device *d = ctx;
    size_t *block = (size_t *)(void *)((char *)ptr - 16);
    d->used -= block[0];
    d->frees++;
    free(block);
}

static void fake_sync(void *ctx)
{
    fake_device *d = ctx;
    d->syncs++;
}

static kv_dcache fake_cache(fake_device *d)
{
    kv_dcache c;
    memset(&c, 0, sizeof c);
    c.ctx = d;
    c.dev_malloc = fake_malloc;
    c.dev_free = fake_free;
    c.before_free = fake_sync;
    return c;
}

START_TEST(device_cache_reuses_released_blocks)
{
    fake_device d = {(size_t)1 << 40, 0, 0, 0, 0};
    kv_dcache c = fake_cache(&d);
    void *a, *b, *e;
    ck_assert_int_eq(kv_dcache_alloc(&c, 3 << 20, 1, &a), KV_DCACHE_OK);
    ck_assert_int_eq(kv_dcache_alloc(&c, 1000, 0, &b), KV_DCACHE_OK);
    ck_assert_int_eq(d.mallocs, 2);
    ck_assert_uint_eq(c.in_use, kv_dcache_round(3 << 20) + kv_dcache_round(1000));
    /* dtype lookup: start and interior pointers, foreign memory */
    ck_assert_int_eq(kv_dcache_lookup(&c, a)->bf16, 1);
    ck_assert_int_eq(kv_dcache_lookup(&c, (char *)a + 12345)->bf16, 1);
    ck_assert_int_eq(kv_dcache_lookup(&c, b)->bf16, 0);
    int local;
    ck_assert_ptr_null(kv_dcache_lookup(&c, &local));
    /* release and take again: no device call */
    ck_assert_int_eq(kv_dcache_release(&c, a), 0);
    ck_assert_int_eq(kv_dcache_release(&c, a), -1); /* twice */
    ck_assert_int_eq(kv_dcache_alloc(&c, (3 << 20) - 100, 0, &e), KV_DCACHE_OK);
    ck_assert_ptr_eq(e, a);
    ck_assert_int_eq(kv_dcache_lookup(&c, e)->bf16, 0); /* the new owner's dtype */
    ck_assert_int_eq(d.mallocs, 2);
    /* a large miss gives the cached large blocks back first */
    ck_assert_int_eq(kv_dcache_release(&c, e), 0);
    ck_assert_int_eq(kv_dcache_alloc(&c, 9 << 20, 1, &e), KV_DCACHE_OK);
    ck_assert_int_eq(d.frees, 1);
    ck_assert_int_eq(d.syncs, 1);
    ck_assert_uint_eq(c.cached, 0);
    ck_assert_uint_eq(c.reserved, kv_dcache_round(9 << 20) + kv_dcache_round(1000));
    ck_assert_uint_ge(c.peak_reserved, c.reserved);
    kv_dcache_destroy(&c);
    ck_assert_int_eq(d.frees, d.mallocs);
}
END_TEST

START_TEST(device_cache_survives_many_blocks_and_oom)
{
    fake_device d = {(size_t)64 << 20, 0, 0, 0, 0};
    kv_dcache c = fake_cache(&d);
    void *ptrs[500];
    /* many small blocks: the table grows, lookups stay right */
    for (int i = 0; i < 500; i++)
        ck_assert_int_eq(kv_dcache_alloc(&c, (size_t)(i % 7 + 1) * 512, i & 1, &ptrs[i]),
                         KV_DCACHE_OK);
    for (int i = 0; i < 500; i += 2)
        ck_assert_int_eq(kv_dcache_release(&c, ptrs[i]), 0);
    for (int i = 1; i < 500; i += 2)
        ck_assert_int_eq(kv_dcache_lookup(&c, ptrs[i])->bf16, 1);
    /* dropping blocks one by one keeps every other block findable */
    for (int i = 1; i < 500; i += 4)
        ck_assert_int_eq(kv_dcache_drop(&c, ptrs[i]), 0);
    for (int i = 3; i < 500; i += 4)
        ck_assert_ptr_eq(kv_dcache_lookup(&c, ptrs[i])->ptr, ptrs[i]);
    /* out of memory: the cache is given back and the request tried again */
    void *big, *big2;
    ck_assert_int_eq(kv_dcache_alloc(&c, (size_t)40 << 20, 0, &big), KV_DCACHE_OK);
    ck_assert_int_eq(kv_dcache_release(&c, big), 0);
    ck_assert_int_eq(kv_dcache_alloc(&c, (size_t)20 << 20, 0, &big), KV_DCACHE_OK); /* frees 40 */
    ck_assert_int_eq(kv_dcache_alloc(&c, (size_t)60 << 20, 0, &big2), KV_DCACHE_OOM);
    ck_assert_int_eq(kv_dcache_release(&c, big), 0);
    ck_assert_int_eq(kv_dcache_alloc(&c, (size_t)50 << 20, 0, &big2), KV_DCACHE_OK);
    /* trim: nothing cached stays */
    for (int i = 3; i < 500; i += 4)
        ck_assert_int_eq(kv_dcache_release(&c, ptrs[i]), 0);
    kv_dcache_free_cached(&c, 0);
    ck_assert_uint_eq(c.cached, 0);
    ck_assert_uint_eq(c.reserved, c.in_use);
    ck_assert_ptr_eq(kv_dcache_lookup(&c, big2)->ptr, big2);
    kv_dcache_destroy(&c);
    ck_assert_int_eq(d.frees, d.mallocs);
    ck_assert_uint_eq(kv_dcache_round(0), 512);
    ck_assert_uint_eq(kv_dcache_round(SIZE_MAX), 0);
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
    tcase_add_test(tc, upsample_map_repeats_each_pixel);
    tcase_add_test(tc, posterior_map_takes_the_halves);
    tcase_add_test(tc, conv_plan_covers_every_output_row_within_budget);
    tcase_add_loop_test(tc, conv_pieces_compute_the_specified_convolution, 0, 4);
    tcase_add_test(tc, conv_plan_bands_the_decoders_largest_input);
    tcase_add_test(tc, group_norm_chunks_tile_each_group);
    tcase_add_test(tc, group_norm_finalize_matches_the_cpu_backend);
    tcase_add_test(tc, attention_blocks_are_linear_in_positions);
    tcase_add_test(tc, device_cache_reuses_released_blocks);
    tcase_add_test(tc, device_cache_survives_many_blocks_and_oom);
    suite_add_tcase(s, tc);
    return s;
}
