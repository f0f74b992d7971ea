/* test_cli.c — the klvae tool's own pieces: the plot rasterizer
 * (src/cli/plot.c), the image metrics, the image grid and the loss picture
 * of a run folder. The pictures are written to a temporary folder (kept
 * when KLVAE_KEEP_PICTURES is set, to look at them). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli/cli.h"
#include "cli/latents.h"
#include "cli/plot.h"
#include "cli/plot_run.h"
#include "test_util.h"

/* Deterministic noise (xorshift64*), so the picture is the same every run. */
static unsigned long long rng_state = 0x9E3779B97F4A7C15ull;

static double uniform01(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (double)((rng_state * 2685821657736338717ull) >> 11) / 9007199254740992.0;
}

static double gaussian(void)
{
    double u = uniform01(), v = uniform01();
    return sqrt(-2.0 * log(u + 1e-300)) * cos(6.283185307179586 * v);
}

/* Pixels of img (3, h, w) whose colour is rgb (within one level). */
static long count_colour(const float *img, int h, int w, const unsigned char rgb[3])
{
    size_t plane = (size_t)h * w;
    long n = 0;
    for (size_t i = 0; i < plane; i++) {
        int match = 1;
        for (int c = 0; c < 3; c++) {
            double level = (img[c * plane + i] * 0.5 + 0.5) * 255.0;
            match &= fabs(level - rgb[c]) <= 1.0;
        }
        n += match;
    }
    return n;
}

static void check_range(const float *img, int h, int w, const char *what)
{
    size_t bad = 0, total = 3 * (size_t)h * w;
    for (size_t i = 0; i < total; i++)
        bad += !(img[i] >= -1.0f && img[i] <= 1.0f);
    ck_assert_msg(bad == 0, "%s: %zu values outside [-1, 1]", what, bad);
}

static void write_png(const char *dir, const char *name, const float *img, int h, int w)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    klvae_status_t st = klvae_image_write_png(path, img, h, w);
    ck_assert_msg(st == KLVAE_OK, "writing %s: %s", path, klvae_last_error());
}

/* The picture `klvae train` draws: a noisy loss on log axes with its moving
 * average, and a linear panel whose series has gaps (NaN). */
static void test_training_plot(const char *dir)
{
    enum { N = 3000 };
    static double step[N], raw[N], smooth[N], kl[N], lpips[N];
    double ema = 0.0;
    for (int i = 0; i < N; i++) {
        step[i] = i + 1;
        double clean = 0.015 + 0.4 * exp(-i / 350.0) + 0.03 * exp(-i / 2000.0);
        raw[i] = clean * exp(0.35 * gaussian());
        ema = i == 0 ? raw[i] : 0.98 * ema + 0.02 * raw[i];
        smooth[i] = ema;
        kl[i] = (i / 100) % 7 == 3 ? NAN : 2500.0 + 9000.0 * (1.0 - exp(-i / 600.0)) + 300.0 * gaussian();
        lpips[i] = i % 10 == 0 ? 6000.0 * exp(-i / 900.0) + 1500.0 + 200.0 * gaussian() : NAN;
    }
    /* lpips is measured every 10th step only: its NaNs in between would
     * leave only isolated dots, so it gets its own x array without them. */
    static double lpx[N / 10], lpy[N / 10];
    for (int i = 0; i < N / 10; i++)
        lpx[i] = step[i * 10], lpy[i] = lpips[i * 10];

    const plot_series loss[] = {
        {"loss", step, raw, N, {174, 199, 232}},
        {"loss (ema 0.98)", step, smooth, N, {31, 119, 180}},
    };
    const plot_series second[] = {
        {"KL (gaps: NaN)", step, kl, N, {255, 127, 14}},
        {"LPIPS x 1E4", lpx, lpy, N / 10, {44, 160, 44}},
    };
    const plot_panel panels[] = {
        {"Reconstruction loss", "step", 1, loss, 2},
        {"KL divergence and LPIPS", "step", 0, second, 2},
    };
    int h = -1;
    char err[256] = "untouched";
    float *img = plot_render(panels, 2, 900, 320, &h, err, sizeof err);
    ck_assert_msg(img != NULL, "render failed: %s", err);
    if (!img)
        return;
    ck_assert_msg(h == 640, "height %d, expected 640", h);
    ck_assert_msg(err[0] == '\0', "err not cleared on success: %s", err);
    check_range(img, h, 900, "training plot");
    for (int s = 0; s < 2; s++) {
        long a = count_colour(img, h, 900, loss[s].rgb);
        long b = count_colour(img, h, 900, second[s].rgb);
        ck_assert_msg(a > 200, "panel 1 series %d colour found on only %ld pixels", s, a);
        ck_assert_msg(b > 200, "panel 2 series %d colour found on only %ld pixels", s, b);
    }
    const unsigned char white[3] = {255, 255, 255};
    double white_frac = (double)count_colour(img, h, 900, white) / ((double)h * 900);
    ck_assert_msg(white_frac > 0.6, "background only %.2f white", white_frac);
    write_png(dir, "plot_test.png", img, h, 900);
    free(img);
}

static void expect_error(const plot_panel *panels, int npanels, int width, int panel_height,
                         const char *what)
{
    int h = 123;
    char err[256] = "";
    float *img = plot_render(panels, npanels, width, panel_height, &h, err, sizeof err);
    ck_assert_msg(img == NULL, "%s: expected NULL", what);
    ck_assert_msg(h == 0, "%s: out_h %d, expected 0", what, h);
    ck_assert_msg(err[0] != '\0', "%s: no message", what);
    free(img);
}

static void test_bad_arguments(void)
{
    double y[2] = {1, 2};
    const plot_series ok[] = {{"a", NULL, y, 2, {0, 0, 0}}};
    const plot_series neg[] = {{"a", NULL, y, -1, {0, 0, 0}}};
    const plot_series noy[] = {{"a", NULL, NULL, 2, {0, 0, 0}}};
    const plot_panel good = {"T", "X", 0, ok, 1};
    const plot_panel null_series = {"T", "X", 0, NULL, 2};
    const plot_panel neg_nseries = {"T", "X", 0, ok, -1};
    const plot_panel neg_n = {"T", "X", 0, neg, 1};
    const plot_panel null_y = {"T", "X", 0, noy, 1};
    expect_error(&good, 0, 400, 200, "npanels 0");
    expect_error(NULL, 1, 400, 200, "panels NULL");
    expect_error(&good, 1, 20, 200, "width too small");
    expect_error(&good, 1, 100000, 200, "width too large");
    expect_error(&good, 1, 400, 50, "panel height too small");
    expect_error(&null_series, 1, 400, 200, "NULL series, nseries 2");
    expect_error(&neg_nseries, 1, 400, 200, "nseries -1");
    expect_error(&neg_n, 1, 400, 200, "series n -1");
    expect_error(&null_y, 1, 400, 200, "series y NULL");

    /* out_h NULL and err NULL: still NULL, nothing written, no crash. */
    char err[64] = "";
    ck_assert_msg(plot_render(&good, 1, 400, 200, NULL, err, sizeof err) == NULL, "out_h NULL");
    ck_assert_msg(err[0] != '\0', "out_h NULL: no message");
    int h = 7;
    ck_assert_msg(plot_render(&good, 0, 400, 200, &h, NULL, 0) == NULL && h == 0, "err NULL");
}

/* Degenerate data: one point, all NaN, empty, all equal, Inf, non-positive
 * values on a log axis, and a 100k-point series (timed). */
static void test_degenerate(const char *dir)
{
    enum { BIG = 100000 };
    double one_x = 42.0, one_y = 0.5;
    double nans[5] = {NAN, NAN, NAN, NAN, NAN};
    double flat[6] = {3, 3, 3, 3, INFINITY, 3};
    double logy[6] = {1, 0.1, 0, -2, 0.01, 0.001};
    double *bx = malloc(sizeof(double) * BIG), *by = malloc(sizeof(double) * BIG);
    ck_assert_msg(bx && by, "out of memory");
    if (!bx || !by) {
        free(bx);
        free(by);
        return;
    }
    for (int i = 0; i < BIG; i++) {
        bx[i] = i;
        by[i] = sin(i / 3000.0) * 2.0 + gaussian() * 0.3 + (i % 25000 == 0 ? 4.0 : 0.0);
    }
    const plot_series single[] = {{NULL, &one_x, &one_y, 1, {200, 30, 30}}};
    const plot_series empty[] = {
        {"all NaN", NULL, nans, 5, {30, 30, 200}},
        {"n = 0", NULL, NULL, 0, {30, 200, 30}},
    };
    const plot_series flats[] = {
        {"all equal (and Inf)", NULL, flat, 6, {148, 103, 189}},
        {"log, with 0 and -2", NULL, logy, 6, {140, 86, 75}},
    };
    const plot_series big[] = {{"100K points", bx, by, BIG, {214, 39, 40}}};
    const plot_panel panels[] = {
        {"One point", "x", 0, single, 1},
        {"All NaN", NULL, 0, empty, 2},
        {"All equal", "index", 1, flats, 2},
        {"100k points", "step", 0, big, 1},
        {NULL, NULL, 0, NULL, 0},
    };
    int h = 0;
    char err[256];
    float *img = plot_render(panels, 5, 600, 200, &h, err, sizeof err);
    ck_assert_msg(img != NULL, "render failed: %s", err);
    if (img) {
        ck_assert_msg(h == 1000, "height %d", h);
        check_range(img, h, 600, "degenerate plot");
        long dot = count_colour(img, h, 600, single[0].rgb);
        ck_assert_msg(dot > 0, "the single point is not drawn");
        long bigpx = count_colour(img, h, 600, big[0].rgb);
        ck_assert_msg(bigpx > 500, "the 100k series covers only %ld pixels", bigpx);
        write_png(dir, "plot_test_edge.png", img, h, 600);
        free(img);
    }
    /* The smallest accepted size still renders. */
    img = plot_render(panels + 2, 1, PLOT_MIN_WIDTH, PLOT_MIN_PANEL_HEIGHT, &h, err, sizeof err);
    ck_assert_msg(img != NULL && h == PLOT_MIN_PANEL_HEIGHT, "minimum size: %s", err);
    if (img) {
        check_range(img, h, PLOT_MIN_WIDTH, "minimum size");
        write_png(dir, "plot_test_small.png", img, h, PLOT_MIN_WIDTH);
    }
    free(img);
    free(bx);
    free(by);
}


/* A folder for the pictures, removed afterwards unless KLVAE_KEEP_PICTURES
 * is set (then its path is printed). */
static char *picture_dir(void)
{
    return test_tmpdir();
}

static void done_with_pictures(char *dir)
{
    if (getenv("KLVAE_KEEP_PICTURES"))
        printf("pictures kept in %s\n", dir);
    else
        test_rmtree(dir);
    free(dir);
}

START_TEST(plot_renders_a_training_plot)
{
    char *dir = picture_dir();
    test_training_plot(dir);
    done_with_pictures(dir);
}
END_TEST

START_TEST(plot_rejects_bad_arguments)
{
    test_bad_arguments();
}
END_TEST

START_TEST(plot_survives_degenerate_data)
{
    char *dir = picture_dir();
    test_degenerate(dir);
    done_with_pictures(dir);
}
END_TEST

/* An image whose values are exact 8-bit levels, as a PNG would hold. */
static void random_levels(float *img, size_t n, int lo, int hi)
{
    for (size_t i = 0; i < n; i++) {
        int q = lo + (int)(uniform01() * (hi - lo + 1));
        q = q > hi ? hi : q;
        img[i] = 2.0f * (float)q / 255.0f - 1.0f;
    }
}

START_TEST(psnr_follows_its_definition)
{
    enum { H = 13, W = 29, N = 3 * H * W };
    float a[N], b[N];
    random_levels(a, N, 10, 245);
    for (int k = 1; k <= 7; k += 3) {
        /* every value off by exactly k levels: MSE = (k / 255)^2 */
        for (int i = 0; i < N; i++)
            b[i] = a[i] + (i % 2 ? 2.0f : -2.0f) * (float)k / 255.0f;
        double want = 20.0 * log10(255.0 / k);
        ck_assert_double_eq_tol(image_psnr(a, b, H, W), want, 1e-9);
    }
    ck_assert_double_eq(image_psnr(a, a, H, W), 99.0);
}
END_TEST

/* SSIM computed directly: a 2D Gaussian window (11 x 11, sigma 1.5) at
 * every pixel, cut at the border and renormalised, averaged over pixels
 * whose window lies inside (all pixels below 11 on a side). */
static double ssim_brute_force(const float *a, const float *b, int h, int w)
{
    double total = 0;
    for (int c = 0; c < 3; c++) {
        const int m = h >= 11 && w >= 11 ? 5 : 0;
        double sum = 0;
        for (int y = m; y < h - m; y++)
            for (int x = m; x < w - m; x++) {
                double ws = 0, mx = 0, my = 0, xx = 0, yy = 0, xy = 0;
                for (int dy = -5; dy <= 5; dy++)
                    for (int dx = -5; dx <= 5; dx++) {
                        int py = y + dy, px = x + dx;
                        if (py < 0 || py >= h || px < 0 || px >= w)
                            continue;
                        double g = exp(-(dx * dx + dy * dy) / (2 * 1.5 * 1.5));
                        size_t i = ((size_t)c * h + py) * w + px;
                        double u = nearbyint((a[i] * 0.5 + 0.5) * 255) / 255;
                        double v = nearbyint((b[i] * 0.5 + 0.5) * 255) / 255;
                        ws += g;
                        mx += g * u;
                        my += g * v;
                        xx += g * u * u;
                        yy += g * v * v;
                        xy += g * u * v;
                    }
                mx /= ws, my /= ws, xx /= ws, yy /= ws, xy /= ws;
                const double c1 = 1e-4, c2 = 9e-4;
                sum += (2 * mx * my + c1) * (2 * (xy - mx * my) + c2) /
                       ((mx * mx + my * my + c1) * (xx - mx * mx + yy - my * my + c2));
            }
        total += sum / ((double)(h - 2 * m) * (w - 2 * m));
    }
    return total / 3;
}

START_TEST(ssim_matches_a_direct_computation)
{
    const int sizes[][2] = {{23, 31}, {9, 14}, {16, 11}};
    for (int s = 0; s < 3; s++) {
        const int h = sizes[s][0], w = sizes[s][1];
        const size_t n = (size_t)3 * h * w;
        float *a = malloc(n * sizeof(float)), *b = malloc(n * sizeof(float));
        /* a smooth image and a noisy copy: SSIM well inside (0, 1) */
        for (size_t i = 0; i < n; i++) {
            a[i] = (float)(0.6 * sin(0.3 * (double)(i % w) + 0.2 * (double)(i / w)));
            b[i] = a[i] + (float)(0.15 * gaussian());
            b[i] = b[i] > 1 ? 1 : b[i] < -1 ? -1 : b[i];
        }
        double got = image_ssim(a, b, h, w), want = ssim_brute_force(a, b, h, w);
        ck_assert_msg(fabs(got - want) < 1e-9, "%dx%d: SSIM %.12f, direct %.12f", h, w, got, want);
        ck_assert_msg(got > 0.1 && got < 0.95, "%dx%d: SSIM %f is not a partial match", h, w, got);
        ck_assert_double_eq_tol(image_ssim(a, a, h, w), 1.0, 1e-12);
        free(a);
        free(b);
    }
}
END_TEST

START_TEST(grid_puts_inputs_above_reconstructions)
{
    enum { H = 6, W = 5, ROWS = 2, COLS = 3 };
    float imgs[ROWS * COLS * 3 * H * W];
    random_levels(imgs, sizeof imgs / sizeof imgs[0], 0, 255);
    char *dir = test_tmpdir();
    char path[4200];
    snprintf(path, sizeof path, "%s/grid.png", dir);
    ck_assert_int_eq(write_image_grid(path, imgs, ROWS, COLS, H, W), KLVAE_OK);
    float *px = NULL;
    int gh = 0, gw = 0;
    ck_assert_int_eq(klvae_image_read(path, &px, &gh, &gw), KLVAE_OK);
    ck_assert_int_eq(gh, ROWS * H + (ROWS - 1) * 2);
    ck_assert_int_eq(gw, COLS * W + (COLS - 1) * 2);
    for (int r = 0; r < ROWS; r++)
        for (int q = 0; q < COLS; q++)
            for (int c = 0; c < 3; c++)
                for (int y = 0; y < H; y++)
                    for (int x = 0; x < W; x++) {
                        float want = imgs[(((size_t)(r * COLS + q) * 3 + c) * H + y) * W + x];
                        float got = px[((size_t)c * gh + r * (H + 2) + y) * gw + q * (W + 2) + x];
                        ck_assert_float_eq_tol(got, want, 1e-6);
                    }
    /* the gap between the rows is white */
    ck_assert_float_eq(px[(size_t)H * gw + 1], 1.0f);
    klvae_free(px);
    test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(loss_plot_is_drawn_from_the_run_logs)
{
    char *dir = test_tmpdir();
    char path[4200];
    snprintf(path, sizeof path, "%s/log.csv", dir);
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fprintf(f, "step,elapsed_s,step_s,total,rec,perceptual,nll,kl,g,d_weight,disc_factor,d_loss\n");
    for (int i = 0; i < 300; i++)
        fprintf(f, "%d,%d,0.1,1,%g,0,1,%g,%g,0.5,%d,%g\n", i, i, 0.5 * exp(-i / 80.0) + 0.05,
                100.0 + i, i >= 150 ? 0.3 : 0.0, i >= 150, i >= 150 ? 1.0 : 0.0);
    fprintf(f, "300,30"); /* a torn last line, as a crash leaves it */
    fclose(f);
    snprintf(path, sizeof path, "%s/eval.csv", dir);
    f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fprintf(f, "step,psnr,ssim\n0,11.5,0.1\n100,17,0.5\n200,19,0.6\n");
    fclose(f);
    write_loss_plot(dir);
    snprintf(path, sizeof path, "%s/loss.png", dir);
    float *px = NULL;
    int h = 0, w = 0;
    ck_assert_int_eq(klvae_image_read(path, &px, &h, &w), KLVAE_OK);
    ck_assert_int_eq(w, 900);
    ck_assert_int_eq(h, 4 * 260); /* the GAN panel appears once disc_factor > 0 */
    klvae_free(px);
    /* no logs: a warning, no picture, no crash */
    char *empty = test_tmpdir();
    write_loss_plot(empty);
    snprintf(path, sizeof path, "%s/loss.png", empty);
    ck_assert_int_ne(access(path, F_OK), 0);
    test_rmtree(empty);
    free(empty);
    test_rmtree(dir);
    free(dir);
}
END_TEST

/* Writes a latent file: one tensor "latent" of dtype (4-byte elements
 * filled from values, or zero bytes of other widths), and metadata. */
static void write_latent_file(const char *path, const char *dtype, int bytes, const int64_t *shape,
                              int ndim, const float *values, const char *metadata)
{
    size_t n = 1;
    char dims[64] = "";
    for (int d = 0; d < ndim; d++) {
        n *= (size_t)shape[d];
        snprintf(dims + strlen(dims), sizeof dims - strlen(dims), d ? ",%lld" : "%lld",
                 (long long)shape[d]);
    }
    char header[512];
    int hlen = snprintf(header, sizeof header,
                        "{\"latent\":{\"dtype\":\"%s\",\"shape\":[%s],\"data_offsets\":[0,%zu]},"
                        "\"__metadata__\":{%s}}",
                        dtype, dims, n * (size_t)bytes, metadata);
    unsigned char *buf = calloc(8 + (size_t)hlen + n * (size_t)bytes, 1);
    ck_assert_ptr_nonnull(buf);
    for (int i = 0; i < 8; i++)
        buf[i] = (unsigned char)((uint64_t)hlen >> (8 * i));
    memcpy(buf + 8, header, (size_t)hlen);
    if (values)
        memcpy(buf + 8 + hlen, values, n * sizeof(float));
    test_write_file(path, buf, 8 + (size_t)hlen + n * (size_t)bytes);
    free(buf);
}

START_TEST(latents_read_back_with_their_metadata)
{
    test_rng rng = test_rng_new(31);
    const int64_t shape[3] = {4, 3, 5}; /* (C, h, w): N = 1 */
    float values[60];
    test_fill(values, 60, &rng, -3.0f, 3.0f);
    char *dir = test_tmpdir();
    char *path = test_join(dir, "lat.safetensors");
    write_latent_file(path, "F32", 4, shape, 3, values,
                      "\"image_height\":\"21\",\"image_width\":\"99999999999\",\"scaled\":\"true\"");
    latents lat;
    ck_assert_ok(read_latents(path, 4, &lat));
    ck_assert_int_eq(lat.n, 1);
    ck_assert_int_eq(lat.c, 4);
    ck_assert_int_eq(lat.h, 3);
    ck_assert_int_eq(lat.w, 5);
    ck_assert_int_eq(lat.image_height, 21);
    ck_assert_int_eq(lat.image_width, 0); /* out of range: the latent's own size is used */
    ck_assert(lat.scaled);
    ck_assert(memcmp(lat.data, values, sizeof values) == 0);
    free(lat.data);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(latents_of_the_wrong_kind_are_refused)
{
    const int64_t shape[4] = {2, 4, 3, 3};
    const int64_t wrong[4] = {2, 5, 3, 3};
    char *dir = test_tmpdir();
    char *path = test_join(dir, "lat.safetensors");
    latents lat;
    write_latent_file(path, "I32", 4, shape, 4, NULL, "");
    ck_assert_status(read_latents(path, 4, &lat), KLVAE_ERR_UNSUPPORTED);
    ck_assert_error_mentions("I32");
    ck_assert_ptr_null(lat.data);
    write_latent_file(path, "F32", 4, wrong, 4, NULL, "");
    ck_assert_status(read_latents(path, 4, &lat), KLVAE_ERR_SHAPE);
    ck_assert_error_mentions("[2, 5, 3, 3]");
    ck_assert_ptr_null(lat.data);
    ck_assert_int_eq(lat.n, 0);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

Suite *suite_cli(void)
{
    Suite *s = suite_create("cli");
    TCase *tc = tcase_create("cli");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, plot_renders_a_training_plot);
    tcase_add_test(tc, plot_rejects_bad_arguments);
    tcase_add_test(tc, plot_survives_degenerate_data);
    tcase_add_test(tc, psnr_follows_its_definition);
    tcase_add_test(tc, ssim_matches_a_direct_computation);
    tcase_add_test(tc, grid_puts_inputs_above_reconstructions);
    tcase_add_test(tc, loss_plot_is_drawn_from_the_run_logs);
    tcase_add_test(tc, latents_read_back_with_their_metadata);
    tcase_add_test(tc, latents_of_the_wrong_kind_are_refused);
    suite_add_tcase(s, tc);
    return s;
}
