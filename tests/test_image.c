/* test_image.c — klvae_image_read (PNG in every colour type and depth,
 * JPEG) and klvae_image_write_png: exact values, errors, atomic writes. */
#include <dirent.h>
#include <stdbool.h>
#include <stdio.h>
#include <jpeglib.h>
#include <malloc.h>
#include <png.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "test_util.h"

#if defined(__SANITIZE_ADDRESS__)
#define TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TEST_ASAN 1
#endif
#endif
#ifdef TEST_ASAN
#include <sanitizer/lsan_interface.h>
#endif

/* ---- helpers ---- */

/* The value an 8-bit (max 255) or 16-bit (max 65535) sample must read as. */
static double sample_value(unsigned s, unsigned max)
{
    return (double)s / (double)max * 2.0 - 1.0;
}

/* Checks a (3, h, w) image against expected integer RGB samples
 * want[(y * w + x) * 3 + c] of the given maximum. Tolerance 1e-6 is far
 * below one 16-bit step (3e-5). */
static void assert_rgb(const float *px, int h, int w, const unsigned *want, unsigned max,
                       const char *what)
{
    const size_t plane = (size_t)h * w;
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++)
            for (int c = 0; c < 3; c++) {
                double expected = sample_value(want[((size_t)y * w + x) * 3 + c], max);
                float got = px[c * plane + (size_t)y * w + x];
                ck_assert_msg(fabs((double)got - expected) < 1e-6 && got >= -1.0f && got <= 1.0f,
                              "%s: pixel (%d, %d) channel %d is %.9g, expected %.9g", what, y, x,
                              c, (double)got, expected);
            }
}

/* Writes a PNG with libpng: rows are given as packed bytes exactly as the
 * PNG stores them (sub-byte samples MSB first, 16-bit big-endian). */
typedef struct png_spec {
    int w, h, depth, color, interlace;
    const png_color *palette;
    int palette_count;
    const png_byte *trans; /* palette alpha */
    int trans_count;
    const png_color_16 *trans_color; /* grey or RGB transparent colour */
} png_spec;

static void write_png_file(const char *path, const png_spec *spec, const unsigned char *data,
                           size_t rowbytes)
{
    FILE *fp = fopen(path, "wb");
    ck_assert_ptr_nonnull(fp);
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
    ck_assert_ptr_nonnull(png);
    png_infop info = png_create_info_struct(png);
    ck_assert_ptr_nonnull(info);
    if (setjmp(png_jmpbuf(png)))
        ck_abort_msg("libpng failed writing the test image %s", path);
    png_init_io(png, fp);
    png_set_IHDR(png, info, (png_uint_32)spec->w, (png_uint_32)spec->h, spec->depth, spec->color,
                 spec->interlace, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    if (spec->palette)
        png_set_PLTE(png, info, spec->palette, spec->palette_count);
    if (spec->trans || spec->trans_color)
        png_set_tRNS(png, info, spec->trans, spec->trans_count, spec->trans_color);
    png_write_info(png, info);
    png_bytep *rows = malloc((size_t)spec->h * sizeof *rows);
    ck_assert_ptr_nonnull(rows);
    for (int y = 0; y < spec->h; y++)
        rows[y] = (png_bytep)(data + (size_t)y * rowbytes);
    png_write_image(png, rows);
    png_write_end(png, NULL);
    png_destroy_write_struct(&png, &info);
    free(rows);
    fclose(fp);
}

/* Packs one sample of the given depth into a row (MSB first). */
static void put_sample(unsigned char *row, int index, int depth, unsigned v)
{
    if (depth == 16) {
        row[2 * index] = (unsigned char)(v >> 8);
        row[2 * index + 1] = (unsigned char)v;
    } else if (depth == 8) {
        row[index] = (unsigned char)v;
    } else {
        int per_byte = 8 / depth;
        int shift = 8 - depth * (index % per_byte + 1);
        row[index / per_byte] |= (unsigned char)(v << shift);
    }
}

/* Builds and checks an image of channels samples per pixel. The callback
 * fills the samples of pixel i; to_rgb gives the expected RGB. */
typedef struct variant {
    const char *name;
    png_spec spec;
    int channels;       /* samples per pixel stored in the PNG */
    unsigned max;       /* largest sample value */
    unsigned out_max;   /* 255 or 65535: the scale of the expected RGB */
} variant;

static void run_variant(const variant *v, const unsigned *samples, const unsigned *want_rgb)
{
    const png_spec *s = &v->spec;
    size_t rowbytes = ((size_t)s->w * v->channels * s->depth + 7) / 8;
    unsigned char *data = calloc((size_t)s->h * rowbytes, 1);
    ck_assert_ptr_nonnull(data);
    for (int y = 0; y < s->h; y++)
        for (int i = 0; i < s->w * v->channels; i++)
            put_sample(data + (size_t)y * rowbytes, i, s->depth,
                       samples[(size_t)y * s->w * v->channels + i]);
    char *dir = test_tmpdir();
    char *path = test_join(dir, "variant.png");
    write_png_file(path, s, data, rowbytes);
    float *px = NULL;
    int h = -1, w = -1;
    ck_assert_ok(klvae_image_read(path, &px, &h, &w));
    ck_assert_ptr_nonnull(px);
    ck_assert_int_eq(h, s->h);
    ck_assert_int_eq(w, s->w);
    assert_rgb(px, h, w, want_rgb, v->out_max, v->name);
    klvae_free(px);
    free(data);
    test_rmtree(dir);
    free(path);
    free(dir);
}

/* Random samples for n values below max + 1. */
static unsigned *random_samples(size_t n, unsigned max, uint64_t seed)
{
    test_rng rng = test_rng_new(seed);
    unsigned *s = malloc(n * sizeof *s);
    ck_assert_ptr_nonnull(s);
    for (size_t i = 0; i < n; i++)
        s[i] = (unsigned)(test_uniform(&rng) * (max + 1.0));
    /* Make sure both extremes occur. */
    s[0] = 0;
    s[n - 1] = max;
    return s;
}

/* Grey (+ alpha) samples to expected RGB at scale out_max. */
static unsigned *grey_to_rgb(const unsigned *s, size_t pixels, int channels, unsigned scale)
{
    unsigned *rgb = malloc(pixels * 3 * sizeof *rgb);
    ck_assert_ptr_nonnull(rgb);
    for (size_t i = 0; i < pixels; i++)
        for (int c = 0; c < 3; c++)
            rgb[i * 3 + c] = s[i * channels] * scale;
    return rgb;
}

/* RGB (+ alpha) samples to expected RGB. */
static unsigned *drop_alpha(const unsigned *s, size_t pixels, int channels)
{
    unsigned *rgb = malloc(pixels * 3 * sizeof *rgb);
    ck_assert_ptr_nonnull(rgb);
    for (size_t i = 0; i < pixels; i++)
        for (int c = 0; c < 3; c++)
            rgb[i * 3 + c] = s[i * channels + c];
    return rgb;
}

#define IMG_H 13
#define IMG_W 29

static void grey_variant(const char *name, int depth, int interlace, uint64_t seed)
{
    unsigned max = (1u << depth) - 1;
    variant v = {name, {IMG_W, IMG_H, depth, PNG_COLOR_TYPE_GRAY, interlace, NULL, 0, NULL, 0,
                        NULL},
                 1, max, depth == 16 ? 65535u : 255u};
    size_t pixels = (size_t)IMG_H * IMG_W;
    unsigned *s = random_samples(pixels, max, seed);
    /* Low bit depths are scaled up to 8 bits: 1 -> 255, 2 -> 85, 4 -> 17. */
    unsigned scale = depth == 16 ? 1 : 255 / max;
    unsigned *want = grey_to_rgb(s, pixels, 1, scale);
    run_variant(&v, s, want);
    free(s);
    free(want);
}

/* ---- writing and reading back ---- */

START_TEST(png_write_read_round_trip)
{
    const int h = 13, w = 29;
    const size_t n = 3 * (size_t)h * w;
    float *img = test_alloc(n);
    test_rng rng = test_rng_new(21);
    test_fill(img, n, &rng, -1.3f, 1.3f);
    /* Clamping: out of range, infinities and NaN. */
    img[0] = -1.0f;
    img[1] = 1.0f;
    img[2] = 0.0f;
    img[3] = 7.5f;
    img[4] = -2.0f;
    img[5] = INFINITY;
    img[6] = -INFINITY;
    img[7] = NAN;
    img[8] = -NAN;
    img[n - 1] = 1.0001f;
    char *dir = test_tmpdir();
    char *path = test_join(dir, "out.png");
    ck_assert_ok(klvae_image_write_png(path, img, h, w));
    float *px = NULL;
    int rh = 0, rw = 0;
    ck_assert_ok(klvae_image_read(path, &px, &rh, &rw));
    ck_assert_int_eq(rh, h);
    ck_assert_int_eq(rw, w);
    for (size_t i = 0; i < n; i++) {
        double v = (double)img[i] * 0.5 + 0.5;
        v = v > 0.0 ? (v < 1.0 ? v : 1.0) : 0.0; /* NaN clamps to 0 */
        double q = nearbyint(255.0 * v);
        double expected = q / 255.0 * 2.0 - 1.0;
        ck_assert_msg(fabs((double)px[i] - expected) < 1e-6,
                      "value %zu: wrote %.9g, read %.9g, expected %.9g", i, (double)img[i],
                      (double)px[i], expected);
    }
    /* Spot checks of the clamps with literal values. */
    ck_assert(fabs(px[3] - 1.0f) < 1e-6 && fabs(px[4] + 1.0f) < 1e-6);
    ck_assert(fabs(px[5] - 1.0f) < 1e-6 && fabs(px[6] + 1.0f) < 1e-6);
    ck_assert(fabs(px[7] + 1.0f) < 1e-6 && fabs(px[8] + 1.0f) < 1e-6);
    ck_assert(fabs(px[2] - (128.0 / 255.0 * 2.0 - 1.0)) < 1e-6);

    /* The file is an 8-bit RGB, non-interlaced PNG. */
    FILE *fp = fopen(path, "rb");
    ck_assert_ptr_nonnull(fp);
    png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
    png_infop info = png_create_info_struct(png);
    ck_assert(png && info);
    if (setjmp(png_jmpbuf(png)))
        ck_abort_msg("libpng cannot read %s", path);
    png_init_io(png, fp);
    png_read_info(png, info);
    ck_assert_int_eq(png_get_image_width(png, info), w);
    ck_assert_int_eq(png_get_image_height(png, info), h);
    ck_assert_int_eq(png_get_bit_depth(png, info), 8);
    ck_assert_int_eq(png_get_color_type(png, info), PNG_COLOR_TYPE_RGB);
    ck_assert_int_eq(png_get_interlace_type(png, info), PNG_INTERLACE_NONE);
    png_destroy_read_struct(&png, &info, NULL);
    fclose(fp);

    int tmp_found;
    ck_assert_int_eq(test_count_entries(dir, &tmp_found), 1);
    ck_assert_int_eq(tmp_found, 0);
    klvae_free(px);
    free(img);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(png_write_one_pixel)
{
    const float img[3] = {0.25f, -0.6f, 0.999f};
    char *dir = test_tmpdir();
    char *path = test_join(dir, "one.png");
    ck_assert_ok(klvae_image_write_png(path, img, 1, 1));
    float *px = NULL;
    int h = 0, w = 0;
    ck_assert_ok(klvae_image_read(path, &px, &h, &w));
    ck_assert_int_eq(h, 1);
    ck_assert_int_eq(w, 1);
    /* 0.625 * 255 = 159.375 -> 159; 0.2 * 255 = 51; 0.9995 * 255 = 254.87 -> 255 */
    const unsigned want[3] = {159, 51, 255};
    assert_rgb(px, 1, 1, want, 255, "one pixel");
    klvae_free(px);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(png_overwrite_replaces_file)
{
    char *dir = test_tmpdir();
    char *path = test_join(dir, "img.png");
    /* A larger image first, then a smaller one over it. */
    const int h1 = 24, w1 = 40, h2 = 5, w2 = 7;
    float *big = test_alloc(3 * (size_t)h1 * w1);
    float *small = test_alloc(3 * (size_t)h2 * w2);
    test_rng rng = test_rng_new(4);
    test_fill(big, 3 * (size_t)h1 * w1, &rng, -1.0f, 1.0f);
    test_fill(small, 3 * (size_t)h2 * w2, &rng, -1.0f, 1.0f);
    ck_assert_ok(klvae_image_write_png(path, big, h1, w1));
    struct stat sb1;
    ck_assert_int_eq(stat(path, &sb1), 0);
    ck_assert_ok(klvae_image_write_png(path, small, h2, w2));
    struct stat sb2;
    ck_assert_int_eq(stat(path, &sb2), 0);
    ck_assert_int_lt(sb2.st_size, sb1.st_size);
    float *px = NULL;
    int h = 0, w = 0;
    ck_assert_ok(klvae_image_read(path, &px, &h, &w));
    ck_assert_int_eq(h, h2);
    ck_assert_int_eq(w, w2);
    for (size_t i = 0; i < 3 * (size_t)h2 * w2; i++) {
        double q = nearbyint(255.0 * ((double)small[i] * 0.5 + 0.5));
        ck_assert(fabs((double)px[i] - (q / 255.0 * 2.0 - 1.0)) < 1e-6);
    }
    int tmp_found;
    ck_assert_int_eq(test_count_entries(dir, &tmp_found), 1);
    ck_assert_int_eq(tmp_found, 0);
    klvae_free(px);
    free(big);
    free(small);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

/* ---- PNG variants ---- */

START_TEST(png_grey_8bit)
{
    grey_variant("grey 8-bit", 8, PNG_INTERLACE_NONE, 31);
}
END_TEST

START_TEST(png_grey_1bit)
{
    grey_variant("grey 1-bit", 1, PNG_INTERLACE_NONE, 32);
}
END_TEST

START_TEST(png_grey_2bit)
{
    grey_variant("grey 2-bit", 2, PNG_INTERLACE_NONE, 33);
}
END_TEST

START_TEST(png_grey_4bit)
{
    grey_variant("grey 4-bit", 4, PNG_INTERLACE_NONE, 34);
}
END_TEST

START_TEST(png_grey_16bit)
{
    grey_variant("grey 16-bit", 16, PNG_INTERLACE_NONE, 35);
}
END_TEST

START_TEST(png_grey_alpha_8bit)
{
    variant v = {"grey+alpha 8-bit",
                 {IMG_W, IMG_H, 8, PNG_COLOR_TYPE_GRAY_ALPHA, PNG_INTERLACE_NONE, NULL, 0, NULL,
                  0, NULL},
                 2, 255, 255};
    size_t pixels = (size_t)IMG_H * IMG_W;
    unsigned *s = random_samples(pixels * 2, 255, 36);
    unsigned *want = grey_to_rgb(s, pixels, 2, 1); /* alpha dropped, not composited */
    run_variant(&v, s, want);
    free(s);
    free(want);
}
END_TEST

START_TEST(png_grey_with_trns)
{
    /* A transparent grey value: the colour stays, the transparency goes. */
    png_color_16 trans = {0, 0, 0, 0, 77};
    variant v = {"grey 8-bit with tRNS",
                 {IMG_W, IMG_H, 8, PNG_COLOR_TYPE_GRAY, PNG_INTERLACE_NONE, NULL, 0, NULL, 0,
                  &trans},
                 1, 255, 255};
    size_t pixels = (size_t)IMG_H * IMG_W;
    unsigned *s = random_samples(pixels, 255, 37);
    for (size_t i = 0; i < pixels; i += 5)
        s[i] = 77;
    unsigned *want = grey_to_rgb(s, pixels, 1, 1);
    run_variant(&v, s, want);
    free(s);
    free(want);
}
END_TEST

static void make_palette(png_color *pal, int count, uint64_t seed)
{
    test_rng rng = test_rng_new(seed);
    for (int i = 0; i < count; i++) {
        pal[i].red = (png_byte)(test_uniform(&rng) * 256.0);
        pal[i].green = (png_byte)(test_uniform(&rng) * 256.0);
        pal[i].blue = (png_byte)(test_uniform(&rng) * 256.0);
    }
}

static unsigned *palette_to_rgb(const unsigned *idx, size_t pixels, const png_color *pal)
{
    unsigned *rgb = malloc(pixels * 3 * sizeof *rgb);
    ck_assert_ptr_nonnull(rgb);
    for (size_t i = 0; i < pixels; i++) {
        rgb[3 * i] = pal[idx[i]].red;
        rgb[3 * i + 1] = pal[idx[i]].green;
        rgb[3 * i + 2] = pal[idx[i]].blue;
    }
    return rgb;
}

START_TEST(png_palette_8bit)
{
    png_color pal[7];
    make_palette(pal, 7, 40);
    variant v = {"palette 8-bit",
                 {IMG_W, IMG_H, 8, PNG_COLOR_TYPE_PALETTE, PNG_INTERLACE_NONE, pal, 7, NULL, 0,
                  NULL},
                 1, 6, 255};
    size_t pixels = (size_t)IMG_H * IMG_W;
    unsigned *s = random_samples(pixels, 6, 41);
    unsigned *want = palette_to_rgb(s, pixels, pal);
    run_variant(&v, s, want);
    free(s);
    free(want);
}
END_TEST

START_TEST(png_palette_4bit)
{
    png_color pal[16];
    make_palette(pal, 16, 42);
    variant v = {"palette 4-bit",
                 {IMG_W, IMG_H, 4, PNG_COLOR_TYPE_PALETTE, PNG_INTERLACE_NONE, pal, 16, NULL, 0,
                  NULL},
                 1, 15, 255};
    size_t pixels = (size_t)IMG_H * IMG_W;
    unsigned *s = random_samples(pixels, 15, 43);
    unsigned *want = palette_to_rgb(s, pixels, pal);
    run_variant(&v, s, want);
    free(s);
    free(want);
}
END_TEST

START_TEST(png_palette_with_trns)
{
    png_color pal[5];
    make_palette(pal, 5, 44);
    const png_byte alpha[5] = {0, 128, 255, 3, 200};
    variant v = {"palette 8-bit with tRNS",
                 {IMG_W, IMG_H, 8, PNG_COLOR_TYPE_PALETTE, PNG_INTERLACE_NONE, pal, 5, alpha, 5,
                  NULL},
                 1, 4, 255};
    size_t pixels = (size_t)IMG_H * IMG_W;
    unsigned *s = random_samples(pixels, 4, 45);
    unsigned *want = palette_to_rgb(s, pixels, pal); /* alpha dropped */
    run_variant(&v, s, want);
    free(s);
    free(want);
}
END_TEST

START_TEST(png_rgb_8bit)
{
    variant v = {"RGB 8-bit",
                 {IMG_W, IMG_H, 8, PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE, NULL, 0, NULL, 0,
                  NULL},
                 3, 255, 255};
    size_t pixels = (size_t)IMG_H * IMG_W;
    unsigned *s = random_samples(pixels * 3, 255, 46);
    run_variant(&v, s, s);
    free(s);
}
END_TEST

START_TEST(png_rgba_8bit)
{
    variant v = {"RGBA 8-bit",
                 {IMG_W, IMG_H, 8, PNG_COLOR_TYPE_RGB_ALPHA, PNG_INTERLACE_NONE, NULL, 0, NULL,
                  0, NULL},
                 4, 255, 255};
    size_t pixels = (size_t)IMG_H * IMG_W;
    unsigned *s = random_samples(pixels * 4, 255, 47);
    unsigned *want = drop_alpha(s, pixels, 4);
    run_variant(&v, s, want);
    free(s);
    free(want);
}
END_TEST

START_TEST(png_rgb_16bit)
{
    variant v = {"RGB 16-bit",
                 {IMG_W, IMG_H, 16, PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE, NULL, 0, NULL, 0,
                  NULL},
                 3, 65535, 65535};
    size_t pixels = (size_t)IMG_H * IMG_W;
    unsigned *s = random_samples(pixels * 3, 65535, 48);
    /* Values that differ only in the low byte must stay apart. */
    s[3] = 0x1234;
    s[4] = 0x1235;
    s[5] = 0x00FF;
    run_variant(&v, s, s);
    free(s);
}
END_TEST

START_TEST(png_rgba_16bit)
{
    variant v = {"RGBA 16-bit",
                 {IMG_W, IMG_H, 16, PNG_COLOR_TYPE_RGB_ALPHA, PNG_INTERLACE_NONE, NULL, 0, NULL,
                  0, NULL},
                 4, 65535, 65535};
    size_t pixels = (size_t)IMG_H * IMG_W;
    unsigned *s = random_samples(pixels * 4, 65535, 49);
    unsigned *want = drop_alpha(s, pixels, 4);
    run_variant(&v, s, want);
    free(s);
    free(want);
}
END_TEST

START_TEST(png_interlaced_rgb_8bit)
{
    variant v = {"interlaced RGB 8-bit",
                 {IMG_W, IMG_H, 8, PNG_COLOR_TYPE_RGB, PNG_INTERLACE_ADAM7, NULL, 0, NULL, 0,
                  NULL},
                 3, 255, 255};
    size_t pixels = (size_t)IMG_H * IMG_W;
    unsigned *s = random_samples(pixels * 3, 255, 50);
    run_variant(&v, s, s);
    free(s);
}
END_TEST

START_TEST(png_interlaced_grey_16bit)
{
    grey_variant("interlaced grey 16-bit", 16, PNG_INTERLACE_ADAM7, 51);
}
END_TEST

START_TEST(png_interlaced_grey_2bit)
{
    grey_variant("interlaced grey 2-bit", 2, PNG_INTERLACE_ADAM7, 52);
}
END_TEST

/* ---- JPEG ---- */

/* Writes a w x h JPEG at quality 100 without chroma subsampling. samples
 * are row-major, components per pixel. restart: MCU rows between restart
 * markers (0: none); scans: a progressive scan script (NULL: baseline). */
static void write_jpeg_custom(const char *path, const unsigned char *samples, int w, int h,
                              int components, unsigned restart, const jpeg_scan_info *scans,
                              int nscans)
{
    FILE *fp = fopen(path, "wb");
    ck_assert_ptr_nonnull(fp);
    struct jpeg_compress_struct cinfo;
    struct jpeg_error_mgr jerr;
    cinfo.err = jpeg_std_error(&jerr);
    jpeg_create_compress(&cinfo);
    jpeg_stdio_dest(&cinfo, fp);
    cinfo.image_width = (JDIMENSION)w;
    cinfo.image_height = (JDIMENSION)h;
    cinfo.input_components = components;
    cinfo.in_color_space = components == 1 ? JCS_GRAYSCALE : JCS_RGB;
    jpeg_set_defaults(&cinfo);
    jpeg_set_quality(&cinfo, 100, TRUE);
    for (int c = 0; c < cinfo.num_components; c++) {
        cinfo.comp_info[c].h_samp_factor = 1;
        cinfo.comp_info[c].v_samp_factor = 1;
    }
    cinfo.restart_in_rows = (int)restart;
    cinfo.scan_info = scans;
    cinfo.num_scans = nscans;
    jpeg_start_compress(&cinfo, TRUE);
    while (cinfo.next_scanline < cinfo.image_height) {
        JSAMPROW row = (JSAMPROW)(samples + (size_t)cinfo.next_scanline * w * components);
        jpeg_write_scanlines(&cinfo, &row, 1);
    }
    jpeg_finish_compress(&cinfo);
    jpeg_destroy_compress(&cinfo);
    fclose(fp);
}

static void write_jpeg_file(const char *path, const unsigned char *samples, int w, int h,
                            int components)
{
    write_jpeg_custom(path, samples, w, h, components, 0, NULL, 0);
}

/* A smooth test pattern (JPEG is lossy; smooth content keeps the error
 * small). */
static unsigned char pattern(int x, int y, int c)
{
    double v = 128.0 + 90.0 * sin(0.21 * x + 0.9 * c) * cos(0.17 * y - 0.4 * c);
    return (unsigned char)lrint(v);
}

START_TEST(jpeg_rgb)
{
    const int w = 37, h = 21;
    unsigned char *rgb = malloc((size_t)w * h * 3);
    ck_assert_ptr_nonnull(rgb);
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++)
            for (int c = 0; c < 3; c++)
                rgb[((size_t)y * w + x) * 3 + c] = pattern(x, y, c);
    char *dir = test_tmpdir();
    char *path = test_join(dir, "photo.jpg");
    write_jpeg_file(path, rgb, w, h, 3);
    float *px = NULL;
    int rh = 0, rw = 0;
    ck_assert_ok(klvae_image_read(path, &px, &rh, &rw));
    ck_assert_int_eq(rh, h);
    ck_assert_int_eq(rw, w);
    const size_t plane = (size_t)h * w;
    double worst = 0.0;
    int channel_differs = 0;
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) {
            for (int c = 0; c < 3; c++) {
                float got = px[c * plane + (size_t)y * w + x];
                ck_assert(got >= -1.0f && got <= 1.0f);
                double d = fabs((double)got - sample_value(rgb[((size_t)y * w + x) * 3 + c], 255));
                if (d > worst)
                    worst = d;
            }
            if (px[(size_t)y * w + x] != px[plane + (size_t)y * w + x])
                channel_differs = 1;
        }
    /* At most 5 levels of 255 off (in [-1, 1] units: 10/255); libjpeg-turbo
     * at quality 100 without subsampling is about 3 levels off. */
    ck_assert_msg(worst <= 10.0 / 255.0, "largest JPEG error %.5f", worst);
    ck_assert_int_eq(channel_differs, 1); /* really colour, channels in the right planes */
    klvae_free(px);
    free(rgb);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(jpeg_grey_gives_equal_channels)
{
    const int w = 19, h = 33;
    unsigned char *grey = malloc((size_t)w * h);
    ck_assert_ptr_nonnull(grey);
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++)
            grey[(size_t)y * w + x] = pattern(x, y, 1);
    char *dir = test_tmpdir();
    char *path = test_join(dir, "grey.jpeg");
    write_jpeg_file(path, grey, w, h, 1);
    float *px = NULL;
    int rh = 0, rw = 0;
    ck_assert_ok(klvae_image_read(path, &px, &rh, &rw));
    ck_assert_int_eq(rh, h);
    ck_assert_int_eq(rw, w);
    const size_t plane = (size_t)h * w;
    for (size_t i = 0; i < plane; i++) {
        ck_assert_msg(px[i] == px[plane + i] && px[i] == px[2 * plane + i],
                      "pixel %zu: R, G, B = %g, %g, %g", i, (double)px[i],
                      (double)px[plane + i], (double)px[2 * plane + i]);
        ck_assert_msg(fabs((double)px[i] - sample_value(grey[i], 255)) <= 8.0 / 255.0,
                      "pixel %zu: %g, expected about %g", i, (double)px[i],
                      sample_value(grey[i], 255));
    }
    klvae_free(px);
    free(grey);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

/* ---- errors ---- */

/* Reads path expecting failure with status; checks the outputs are reset. */
static void expect_read_failure(const char *path, klvae_status_t status)
{
    float sentinel[1];
    float *px = sentinel;
    int h = 123, w = 456;
    klvae_status_t st = klvae_image_read(path, &px, &h, &w);
    float *got = px;
    if (st == KLVAE_OK && px != sentinel)
        klvae_free(px); /* no leak when the reader wrongly succeeds */
    ck_assert_msg(st == status, "klvae_image_read(%s) returned %d (%s), expected %d (%s): %s",
                  path, (int)st, klvae_status_string(st), (int)status,
                  klvae_status_string(status), klvae_last_error());
    ck_assert_ptr_null(got);
    ck_assert_int_eq(h, 0);
    ck_assert_int_eq(w, 0);
}

START_TEST(read_nonexistent_file_is_io)
{
    char *dir = test_tmpdir();
    char *path = test_join(dir, "no-such-image.png");
    expect_read_failure(path, KLVAE_ERR_IO);
    ck_assert_error_mentions(path);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(read_empty_file_is_format)
{
    char *dir = test_tmpdir();
    char *path = test_join(dir, "empty.png");
    test_write_file(path, "", 0);
    expect_read_failure(path, KLVAE_ERR_FORMAT);
    ck_assert_error_mentions(path);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(read_text_file_is_format)
{
    char *dir = test_tmpdir();
    char *path = test_join(dir, "notes.png");
    const char *text = "This is a text file, not an image.\nSecond line.\n";
    test_write_file(path, text, strlen(text));
    expect_read_failure(path, KLVAE_ERR_FORMAT);
    ck_assert_error_mentions(path);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(read_truncated_png_is_format)
{
    char *dir = test_tmpdir();
    char *path = test_join(dir, "whole.png");
    char *cut = test_join(dir, "cut.png");
    float *img = test_alloc(3 * 16 * 16);
    test_rng rng = test_rng_new(60);
    test_fill(img, 3 * 16 * 16, &rng, -1.0f, 1.0f);
    ck_assert_ok(klvae_image_write_png(path, img, 16, 16));
    FILE *fp = fopen(path, "rb");
    ck_assert_ptr_nonnull(fp);
    unsigned char head[40];
    ck_assert_uint_eq(fread(head, 1, sizeof head, fp), sizeof head);
    fclose(fp);
    test_write_file(cut, head, sizeof head);
    expect_read_failure(cut, KLVAE_ERR_FORMAT);
    ck_assert_error_mentions("corrupt");
    ck_assert_error_mentions(cut);
    free(img);
    test_rmtree(dir);
    free(path);
    free(cut);
    free(dir);
}
END_TEST

START_TEST(read_png_cut_in_image_data_is_format)
{
    /* Cut inside the IDAT stream, well after the header. */
    char *dir = test_tmpdir();
    char *path = test_join(dir, "whole.png");
    char *cut = test_join(dir, "cut.png");
    const int h = 40, w = 40;
    float *img = test_alloc(3 * (size_t)h * w);
    test_rng rng = test_rng_new(61);
    test_fill(img, 3 * (size_t)h * w, &rng, -1.0f, 1.0f); /* noise: compresses badly */
    ck_assert_ok(klvae_image_write_png(path, img, h, w));
    FILE *fp = fopen(path, "rb");
    ck_assert_ptr_nonnull(fp);
    unsigned char *buf = malloc(20000);
    ck_assert_ptr_nonnull(buf);
    size_t len = fread(buf, 1, 20000, fp);
    fclose(fp);
    ck_assert_uint_gt(len, 2000);
    test_write_file(cut, buf, len / 2);
    expect_read_failure(cut, KLVAE_ERR_FORMAT);
    ck_assert_error_mentions("corrupt");
    free(buf);
    free(img);
    test_rmtree(dir);
    free(path);
    free(cut);
    free(dir);
}
END_TEST

/* Bytes the process holds from malloc (glibc's count, mmapped blocks
 * included). */
static size_t heap_in_use(void)
{
    struct mallinfo2 m = mallinfo2();
    return m.uordblks + m.hblkhd;
}

START_TEST(read_corrupt_interlaced_png_leaks_nothing)
{
    /* A tall, narrow Adam7 PNG cut inside its image data: libpng gives up in
     * the middle of png_read_image, after the reader has allocated its
     * row-pointer array (8 bytes a row, 160 KB here). */
    const int w = 3, h = 20000;
    unsigned char *grey = malloc((size_t)w * h);
    ck_assert_ptr_nonnull(grey);
    test_rng rng = test_rng_new(64);
    for (size_t i = 0; i < (size_t)w * h; i++)
        grey[i] = (unsigned char)(test_uniform(&rng) * 256.0); /* noise: a long IDAT */
    char *dir = test_tmpdir();
    char *path = test_join(dir, "whole.png");
    char *cut = test_join(dir, "cut.png");
    png_spec spec = {w, h, 8, PNG_COLOR_TYPE_GRAY, PNG_INTERLACE_ADAM7, NULL, 0, NULL, 0, NULL};
    write_png_file(path, &spec, grey, (size_t)w);
    size_t len;
    unsigned char *bytes = test_read_file(path, &len);
    test_write_file(cut, bytes, len / 2);
    free(bytes);
    free(grey);
    expect_read_failure(cut, KLVAE_ERR_FORMAT); /* the first read warms libpng up */
    ck_assert_error_mentions(cut);
    ck_assert_error_mentions("corrupt PNG");
    size_t before = heap_in_use();
    for (int i = 0; i < 4; i++)
        expect_read_failure(cut, KLVAE_ERR_FORMAT);
    size_t after = heap_in_use();
    test_rmtree(dir);
    free(path);
    free(cut);
    free(dir);
#ifdef TEST_ASAN
    (void)before, (void)after; /* ASan's malloc keeps no glibc counts */
    ck_assert_msg(__lsan_do_recoverable_leak_check() == 0, "LeakSanitizer found leaks (above)");
#else
    ck_assert_msg(after < before + 64 * 1024,
                  "four failed reads left %zu more bytes allocated (the row pointers are 160 KB)",
                  after - before);
#endif
}
END_TEST

START_TEST(read_corrupt_jpeg_is_format)
{
    char *dir = test_tmpdir();
    char *path = test_join(dir, "bad.jpg");
    /* A JPEG start-of-image marker followed by junk. */
    unsigned char junk[64] = {0xFF, 0xD8, 0xFF, 0x01, 0x02, 0x03};
    for (int i = 6; i < 64; i++)
        junk[i] = (unsigned char)(i * 7);
    test_write_file(path, junk, sizeof junk);
    expect_read_failure(path, KLVAE_ERR_FORMAT);
    ck_assert_error_mentions(path);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(read_truncated_jpeg_is_format)
{
    /* A JPEG cut in the middle of its entropy-coded data: libjpeg only warns
     * and pads with grey, but the file is corrupt and must be refused rather
     * than returned with half of the image made up. */
    const int w = 48, h = 40;
    unsigned char *rgb = malloc((size_t)w * h * 3);
    ck_assert_ptr_nonnull(rgb);
    test_rng rng = test_rng_new(63);
    for (size_t i = 0; i < (size_t)w * h * 3; i++)
        rgb[i] = (unsigned char)(test_uniform(&rng) * 256.0); /* noise: a long scan */
    char *dir = test_tmpdir();
    char *path = test_join(dir, "whole.jpg");
    char *cut = test_join(dir, "cut.jpg");
    write_jpeg_file(path, rgb, w, h, 3);
    FILE *fp = fopen(path, "rb");
    ck_assert_ptr_nonnull(fp);
    unsigned char *buf = malloc(65536);
    ck_assert_ptr_nonnull(buf);
    size_t len = fread(buf, 1, 65536, fp);
    fclose(fp);
    ck_assert_uint_gt(len, 4000);
    test_write_file(cut, buf, len / 2);
    free(buf);
    free(rgb);
    float sentinel[1];
    float *px = sentinel;
    int rh = 123, rw = 456;
    klvae_status_t st = klvae_image_read(cut, &px, &rh, &rw);
    if (st == KLVAE_OK && px && px != sentinel)
        klvae_free(px);
    char message[1024];
    snprintf(message, sizeof message, "%s", klvae_last_error());
    bool names_cut = strstr(message, cut) != NULL;
    /* Clean up before asserting, so that a failure leaks nothing. */
    test_rmtree(dir);
    free(path);
    free(cut);
    free(dir);
    ck_assert_msg(st == KLVAE_ERR_FORMAT, "returned %d (%s), expected %d (malformed file)",
                  (int)st, klvae_status_string(st), (int)KLVAE_ERR_FORMAT);
    ck_assert_msg(names_cut, "message \"%s\" does not name the file", message);
    ck_assert_ptr_null(px);
    ck_assert_int_eq(rh, 0);
    ck_assert_int_eq(rw, 0);
}
END_TEST

/* A noisy w x h RGB JPEG (random samples make long scans) written to path;
 * restart as in write_jpeg_custom. Returns the file's bytes. */
static unsigned char *noisy_jpeg(const char *path, int w, int h, unsigned restart, uint64_t seed,
                                 size_t *len)
{
    unsigned char *rgb = malloc((size_t)w * h * 3);
    ck_assert_ptr_nonnull(rgb);
    test_rng rng = test_rng_new(seed);
    for (size_t i = 0; i < (size_t)w * h * 3; i++)
        rgb[i] = (unsigned char)(test_uniform(&rng) * 256.0);
    write_jpeg_custom(path, rgb, w, h, 3, restart, NULL, 0);
    free(rgb);
    return test_read_file(path, len);
}

/* The offset of the first start-of-scan marker. */
static size_t jpeg_sos(const unsigned char *bytes, size_t len)
{
    for (size_t i = 2; i + 1 < len; i++)
        if (bytes[i] == 0xFF && bytes[i + 1] == 0xDA)
            return i;
    ck_abort_msg("no SOS marker in the test JPEG");
    return 0;
}

/* Expects a corrupt-JPEG refusal of path whose message has what. */
static void expect_corrupt_jpeg(const char *path, const char *what)
{
    expect_read_failure(path, KLVAE_ERR_FORMAT);
    ck_assert_error_mentions(path);
    ck_assert_error_mentions("corrupt JPEG");
    ck_assert_error_mentions(what);
}

START_TEST(jpeg_marker_inside_scan_is_format)
{
    /* The scan stops at an EOI marker well before its end: libjpeg warns
     * "premature end of data segment" and fills the rest with grey. */
    char *dir = test_tmpdir();
    char *path = test_join(dir, "cut.jpg");
    size_t len;
    unsigned char *bytes = noisy_jpeg(path, 53, 41, 0, 80, &len);
    size_t sos = jpeg_sos(bytes, len);
    size_t cut = sos + (len - sos) * 3 / 5;
    bytes[cut] = 0xFF;
    bytes[cut + 1] = 0xD9;
    test_write_file(path, bytes, cut + 2);
    free(bytes);
    expect_corrupt_jpeg(path, "premature end of data segment");
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(jpeg_wrong_restart_marker_is_format)
{
    /* Restart markers RST0, RST1, ... after every MCU row; one renumbered
     * means a lost segment, which libjpeg skips with a warning. */
    char *dir = test_tmpdir();
    char *path = test_join(dir, "resync.jpg");
    size_t len;
    unsigned char *bytes = noisy_jpeg(path, 45, 39, 1, 81, &len);
    int seen = 0;
    for (size_t i = jpeg_sos(bytes, len) + 2; i + 1 < len && seen < 2; i++) {
        if (bytes[i] == 0xFF && bytes[i + 1] >= 0xD0 && bytes[i + 1] <= 0xD7 && ++seen == 2)
            bytes[i + 1] = (unsigned char)(0xD0 + (bytes[i + 1] - 0xD0 + 3) % 8);
    }
    ck_assert_int_eq(seen, 2);
    test_write_file(path, bytes, len);
    free(bytes);
    expect_corrupt_jpeg(path, "instead of RST");
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(jpeg_bad_huffman_code_is_format)
{
    /* A run of one bits ("FF 00": a stuffed 0xFF byte) is no code of any
     * Huffman table: libjpeg warns "bad Huffman code" and goes on. */
    char *dir = test_tmpdir();
    char *path = test_join(dir, "huffman.jpg");
    size_t len;
    unsigned char *bytes = noisy_jpeg(path, 47, 35, 0, 82, &len);
    size_t sos = jpeg_sos(bytes, len);
    size_t at = sos + (len - sos) / 3;
    for (size_t i = at; i < at + 16; i += 2) {
        bytes[i] = 0xFF;
        bytes[i + 1] = 0x00;
    }
    test_write_file(path, bytes, len);
    free(bytes);
    expect_corrupt_jpeg(path, "bad Huffman code");
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(jpeg_stray_bytes_between_markers_still_decode)
{
    /* Junk before the SOS marker: libjpeg warns about extraneous bytes,
     * skips them, and every pixel is as in the clean file. */
    char *dir = test_tmpdir();
    char *clean = test_join(dir, "clean.jpg");
    char *stray = test_join(dir, "stray.jpg");
    size_t len;
    unsigned char *bytes = noisy_jpeg(clean, 29, 31, 0, 83, &len);
    size_t sos = jpeg_sos(bytes, len);
    unsigned char *with = malloc(len + 5);
    ck_assert_ptr_nonnull(with);
    memcpy(with, bytes, sos);
    memcpy(with + sos, "\x01\x02\x03\x04\x05", 5);
    memcpy(with + sos + 5, bytes + sos, len - sos);
    test_write_file(stray, with, len + 5);
    float *a = NULL, *b = NULL;
    int ha, wa, hb, wb;
    ck_assert_ok(klvae_image_read(clean, &a, &ha, &wa));
    ck_assert_ok(klvae_image_read(stray, &b, &hb, &wb));
    ck_assert_int_eq(ha, hb);
    ck_assert_int_eq(wa, wb);
    ck_assert(memcmp(a, b, (size_t)3 * ha * wa * sizeof(float)) == 0);
    klvae_free(a);
    klvae_free(b);
    free(with);
    free(bytes);
    test_rmtree(dir);
    free(clean);
    free(stray);
    free(dir);
}
END_TEST

/* A grey progressive script: the DC coefficient and each of the 63 AC
 * coefficients on its own, first at bit al, then refined bit by bit down
 * to 0; (al + 1) * 64 scans. */
static jpeg_scan_info *one_coefficient_scans(int al, int *count)
{
    *count = (al + 1) * 64;
    jpeg_scan_info *scans = calloc((size_t)*count, sizeof *scans);
    ck_assert_ptr_nonnull(scans);
    int n = 0;
    for (int k = 0; k < 64; k++)
        for (int bit = al; bit >= 0; bit--) {
            jpeg_scan_info *s = &scans[n++];
            s->comps_in_scan = 1;
            s->component_index[0] = 0;
            s->Ss = s->Se = k;
            s->Ah = bit == al ? 0 : bit + 1;
            s->Al = bit;
        }
    return scans;
}

START_TEST(jpeg_with_too_many_scans_is_format)
{
    /* 704 valid scans of an 8 x 8 image: each scan is a pass over the whole
     * image, so a larger one could keep the decoder busy for minutes. */
    unsigned char grey[10 * 12];
    test_rng rng = test_rng_new(84);
    for (size_t i = 0; i < sizeof grey; i++)
        grey[i] = (unsigned char)(test_uniform(&rng) * 256.0);
    char *dir = test_tmpdir();
    char *many = test_join(dir, "many-scans.jpg");
    char *few = test_join(dir, "few-scans.jpg");
    int count;
    jpeg_scan_info *scans = one_coefficient_scans(10, &count);
    ck_assert_int_eq(count, 704);
    write_jpeg_custom(many, grey, 12, 10, 1, 0, scans, count);
    free(scans);
    expect_corrupt_jpeg(many, "more than 500 scans");
    scans = one_coefficient_scans(1, &count); /* 128 scans: fine */
    write_jpeg_custom(few, grey, 12, 10, 1, 0, scans, count);
    free(scans);
    float *px = NULL;
    int h, w;
    ck_assert_ok(klvae_image_read(few, &px, &h, &w));
    ck_assert_int_eq(h, 10);
    ck_assert_int_eq(w, 12);
    for (size_t i = 0; i < sizeof grey; i++)
        ck_assert_msg(fabs((double)px[i] - sample_value(grey[i], 255)) <= 12.0 / 255.0,
                      "pixel %zu: %g, expected about %g", i, (double)px[i],
                      sample_value(grey[i], 255));
    klvae_free(px);
    test_rmtree(dir);
    free(many);
    free(few);
    free(dir);
}
END_TEST

START_TEST(read_directory_is_io)
{
    /* A folder cannot be opened as an image: that is an I/O error, not a
     * malformed (or "empty") file. */
    char dir[4096];
    char *made = test_tmpdir();
    snprintf(dir, sizeof dir, "%s", made);
    test_rmtree(made);
    free(made);
    ck_assert_int_eq(mkdir(dir, 0700), 0);
    /* rmdir below is all the cleanup; nothing leaks if an assertion fails. */
    float sentinel[1];
    float *px = sentinel;
    int h = 123, w = 456;
    klvae_status_t st = klvae_image_read(dir, &px, &h, &w);
    if (st == KLVAE_OK && px && px != sentinel)
        klvae_free(px);
    rmdir(dir);
    ck_assert_status(st, KLVAE_ERR_IO);
    ck_assert_error_mentions(dir);
    ck_assert_ptr_null(px);
    ck_assert_int_eq(h, 0);
    ck_assert_int_eq(w, 0);
}
END_TEST

START_TEST(write_to_missing_folder_is_io)
{
    char *dir = test_tmpdir();
    char *missing = test_join(dir, "no-such-folder");
    char *path = test_join(missing, "out.png");
    float img[3 * 2 * 3] = {0};
    ck_assert_status(klvae_image_write_png(path, img, 2, 3), KLVAE_ERR_IO);
    ck_assert_error_mentions(path);
    ck_assert(!test_path_exists(path));
    ck_assert(!test_path_exists(missing));
    int tmp_found;
    ck_assert_int_eq(test_count_entries(dir, &tmp_found), 0);
    test_rmtree(dir);
    free(path);
    free(missing);
    free(dir);
}
END_TEST

START_TEST(write_over_folder_is_io_and_leaves_no_temporary)
{
    /* The temporary file is written, then the rename onto a folder fails:
     * the temporary must be removed. */
    char *dir = test_tmpdir();
    char *target = test_join(dir, "target.png");
    ck_assert_int_eq(mkdir(target, 0755), 0);
    float img[3 * 4 * 4];
    test_rng rng = test_rng_new(62);
    test_fill(img, 3 * 4 * 4, &rng, -1.0f, 1.0f);
    ck_assert_status(klvae_image_write_png(target, img, 4, 4), KLVAE_ERR_IO);
    ck_assert_error_mentions(target);
    struct stat sb;
    ck_assert_int_eq(stat(target, &sb), 0);
    ck_assert(S_ISDIR(sb.st_mode));
    int tmp_found;
    ck_assert_int_eq(test_count_entries(dir, &tmp_found), 1);
    ck_assert_int_eq(tmp_found, 0);
    test_rmtree(dir);
    free(target);
    free(dir);
}
END_TEST

static void expect_write_size_rejected(int h, int w)
{
    char *dir = test_tmpdir();
    char *path = test_join(dir, "bad-size.png");
    float img[3 * 4 * 4] = {0};
    ck_assert_status(klvae_image_write_png(path, img, h, w), KLVAE_ERR_INVALID_ARGUMENT);
    char size[64];
    snprintf(size, sizeof size, "%d x %d", h, w);
    ck_assert_error_mentions(size);
    ck_assert(!test_path_exists(path));
    int tmp_found;
    ck_assert_int_eq(test_count_entries(dir, &tmp_found), 0);
    test_rmtree(dir);
    free(path);
    free(dir);
}

START_TEST(write_zero_height_is_invalid)
{
    expect_write_size_rejected(0, 4);
}
END_TEST

START_TEST(write_negative_width_is_invalid)
{
    expect_write_size_rejected(4, -3);
}
END_TEST

START_TEST(write_zero_width_is_invalid)
{
    expect_write_size_rejected(4, 0);
}
END_TEST

START_TEST(write_negative_height_is_invalid)
{
    expect_write_size_rejected(-1, 4);
}
END_TEST

/* ---- the pixel budget ---- */

/* Reads path with max_image_pixels = budget (NULL opts when budget is 0). */
static klvae_status_t read_with_budget(const char *path, uint64_t budget, float **px, int *h,
                                       int *w)
{
    klvae_options_t *o = NULL;
    if (budget) {
        char text[32];
        snprintf(text, sizeof text, "%llu", (unsigned long long)budget);
        ck_assert_ok(klvae_options_create(&o));
        ck_assert_ok(klvae_options_set(o, "max_image_pixels", text));
    }
    klvae_status_t st = klvae_image_read_opts(path, o, px, h, w);
    klvae_options_free(o);
    return st;
}

/* Expects path (w x h pixels) refused under budget, with the outputs reset
 * and a message naming the file, the size, the budget and the option. */
static void expect_over_budget(const char *path, int w, int h, uint64_t budget)
{
    float sentinel[1];
    float *px = sentinel;
    int rh = 123, rw = 456;
    ck_assert_status(read_with_budget(path, budget, &px, &rh, &rw), KLVAE_ERR_UNSUPPORTED);
    ck_assert_ptr_null(px);
    ck_assert_int_eq(rh, 0);
    ck_assert_int_eq(rw, 0);
    char size[64], limit[32];
    snprintf(size, sizeof size, "%d x %d", w, h);
    snprintf(limit, sizeof limit, "%llu", (unsigned long long)budget);
    ck_assert_error_mentions(path);
    ck_assert_error_mentions(size);
    ck_assert_error_mentions(limit);
    ck_assert_error_mentions("max_image_pixels");
}

/* Expects path to read as a w x h image with every value in [-1, 1]. */
static void expect_within_budget(const char *path, int w, int h, uint64_t budget)
{
    float *px = NULL;
    int rh = 0, rw = 0;
    ck_assert_ok(read_with_budget(path, budget, &px, &rh, &rw));
    ck_assert_int_eq(rh, h);
    ck_assert_int_eq(rw, w);
    for (size_t i = 0; i < (size_t)3 * h * w; i++)
        ck_assert(px[i] >= -1.0f && px[i] <= 1.0f);
    klvae_free(px);
}

START_TEST(budget_refuses_one_pixel_too_many)
{
    /* Odd sizes; the budget one below, at and above w * h, for both formats. */
    test_rng rng = test_rng_new(70);
    const int w = 37 + (int)(test_uniform(&rng) * 20), h = 21 + (int)(test_uniform(&rng) * 20);
    const uint64_t pixels = (uint64_t)w * h;
    float *img = test_alloc(3 * pixels);
    test_fill(img, 3 * pixels, &rng, -1.0f, 1.0f);
    unsigned char *rgb = malloc(3 * pixels);
    ck_assert_ptr_nonnull(rgb);
    for (size_t i = 0; i < 3 * pixels; i++)
        rgb[i] = (unsigned char)(test_uniform(&rng) * 256.0);
    char *dir = test_tmpdir();
    char *png_path = test_join(dir, "odd.png");
    char *jpeg_path = test_join(dir, "odd.jpg");
    ck_assert_ok(klvae_image_write_png(png_path, img, h, w));
    write_jpeg_file(jpeg_path, rgb, w, h, 3);
    const char *paths[2] = {png_path, jpeg_path};
    for (int i = 0; i < 2; i++) {
        expect_over_budget(paths[i], w, h, pixels - 1);
        expect_over_budget(paths[i], w, h, 1);
        expect_within_budget(paths[i], w, h, pixels);
        expect_within_budget(paths[i], w, h, pixels + 1);
        expect_within_budget(paths[i], w, h, 0); /* NULL options: the default */
    }
    free(rgb);
    free(img);
    test_rmtree(dir);
    free(png_path);
    free(jpeg_path);
    free(dir);
}
END_TEST

/* CRC-32 of PNG chunks (ISO 3309), bit by bit: tests need only a few. */
static uint32_t png_crc(const unsigned char *p, size_t n)
{
    uint32_t crc = 0xFFFFFFFFu;
    for (size_t i = 0; i < n; i++) {
        crc ^= p[i];
        for (int k = 0; k < 8; k++)
            crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    return ~crc;
}

/* Appends a chunk (length, type, data, CRC) at out; returns its size. */
static size_t png_chunk(unsigned char *out, const char *type, const unsigned char *data,
                        uint32_t len)
{
    for (int i = 0; i < 4; i++)
        out[i] = (unsigned char)(len >> (24 - 8 * i));
    memcpy(out + 4, type, 4);
    if (len)
        memcpy(out + 8, data, len);
    uint32_t crc = png_crc(out + 4, 4 + (size_t)len);
    for (int i = 0; i < 4; i++)
        out[8 + len + (uint32_t)i] = (unsigned char)(crc >> (24 - 8 * i));
    return 12 + (size_t)len;
}

START_TEST(png_header_claiming_a_huge_image_is_refused_before_allocating)
{
    /* 69 bytes that claim a 65535 x 65535 interlaced 16-bit RGBA image: the
     * reader used to allocate 48 GB for it (or fail with out of memory). */
    unsigned char file[128];
    static const unsigned char signature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
    memcpy(file, signature, 8);
    unsigned char ihdr[13] = {0x00, 0x00, 0xFF, 0xFF, 0x00, 0x00, 0xFF, 0xFF, 16, 6, 0, 0, 1};
    size_t len = 8 + png_chunk(file + 8, "IHDR", ihdr, 13);
    unsigned char idat[12] = {0x78, 0x9C, 0x63, 0x60, 0x00, 0x00, 0x00, 0x02, 0x00, 0x01};
    len += png_chunk(file + len, "IDAT", idat, sizeof idat);
    len += png_chunk(file + len, "IEND", NULL, 0);
    ck_assert_uint_eq(len, 69);
    char *dir = test_tmpdir();
    char *path = test_join(dir, "claims-4-gigapixels.png");
    test_write_file(path, file, len);
    expect_over_budget(path, 65535, 65535, 67108864);
    /* klvae_image_read has the same budget */
    float *px = NULL;
    int h = 1, w = 1;
    ck_assert_status(klvae_image_read(path, &px, &h, &w), KLVAE_ERR_UNSUPPORTED);
    ck_assert_error_mentions("67108864");
    ck_assert_ptr_null(px);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(jpeg_header_claiming_a_huge_image_is_refused_before_decoding)
{
    /* A small JPEG whose frame header is patched to 9984 x 29184, as in a
     * corrupt 133-byte file that decoded to 3.4 GB of grey. */
    const int w = 24, h = 16;
    unsigned char rgb[24 * 16 * 3];
    test_rng rng = test_rng_new(71);
    for (size_t i = 0; i < sizeof rgb; i++)
        rgb[i] = (unsigned char)(test_uniform(&rng) * 256.0);
    char *dir = test_tmpdir();
    char *path = test_join(dir, "tall.jpg");
    write_jpeg_file(path, rgb, w, h, 3);
    size_t len;
    unsigned char *bytes = test_read_file(path, &len);
    size_t sof = 2;
    while (sof + 9 < len && !(bytes[sof] == 0xFF && bytes[sof + 1] == 0xC0))
        sof++;
    ck_assert_msg(sof + 9 < len, "no SOF0 marker in the test JPEG");
    bytes[sof + 5] = 29184 >> 8; /* height */
    bytes[sof + 6] = 29184 & 0xFF;
    bytes[sof + 7] = 9984 >> 8; /* width */
    bytes[sof + 8] = 9984 & 0xFF;
    test_write_file(path, bytes, len);
    free(bytes);
    expect_over_budget(path, 9984, 29184, 67108864);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

/* The offset of chunk type in a PNG file's bytes (at its length field). */
static size_t png_find_chunk(const unsigned char *bytes, size_t len, const char *type)
{
    for (size_t at = 8; at + 12 <= len;) {
        uint32_t n = (uint32_t)bytes[at] << 24 | (uint32_t)bytes[at + 1] << 16 |
                     (uint32_t)bytes[at + 2] << 8 | bytes[at + 3];
        if (memcmp(bytes + at + 4, type, 4) == 0)
            return at;
        at += 12 + (size_t)n;
    }
    ck_abort_msg("no %s chunk in the test PNG", type);
    return 0;
}

/* Recomputes the CRC of the chunk at offset at, after its data changed. */
static void png_fix_crc(unsigned char *bytes, size_t at)
{
    uint32_t n = (uint32_t)bytes[at] << 24 | (uint32_t)bytes[at + 1] << 16 |
                 (uint32_t)bytes[at + 2] << 8 | bytes[at + 3];
    uint32_t crc = png_crc(bytes + at + 4, 4 + (size_t)n);
    for (int i = 0; i < 4; i++)
        bytes[at + 8 + n + (uint32_t)i] = (unsigned char)(crc >> (24 - 8 * i));
}

/* A noisy w x h PNG at path; returns its bytes. */
static unsigned char *noisy_png(const char *path, int w, int h, uint64_t seed, size_t *len)
{
    float *img = test_alloc((size_t)3 * w * h);
    test_rng rng = test_rng_new(seed);
    test_fill(img, (size_t)3 * w * h, &rng, -1.0f, 1.0f);
    ck_assert_ok(klvae_image_write_png(path, img, h, w));
    free(img);
    return test_read_file(path, len);
}

START_TEST(png_corrupt_image_data_is_format)
{
    /* Bytes changed inside the compressed image data, with the chunk's CRC
     * made right again: only zlib (or the row filters) can tell. */
    char *dir = test_tmpdir();
    char *path = test_join(dir, "corrupt.png");
    size_t len;
    unsigned char *bytes = noisy_png(path, 33, 27, 90, &len);
    size_t idat = png_find_chunk(bytes, len, "IDAT");
    size_t middle = idat + 8 + (png_find_chunk(bytes, len, "IEND") - idat - 12) / 2;
    for (size_t i = middle; i < middle + 6; i++)
        bytes[i] ^= 0x5A;
    png_fix_crc(bytes, idat);
    test_write_file(path, bytes, len);
    free(bytes);
    expect_read_failure(path, KLVAE_ERR_FORMAT);
    ck_assert_error_mentions(path);
    ck_assert_error_mentions("corrupt PNG");
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(png_image_data_short_of_rows_is_format)
{
    /* The header claims more rows than the complete zlib stream holds. */
    char *dir = test_tmpdir();
    char *path = test_join(dir, "short.png");
    size_t len;
    unsigned char *bytes = noisy_png(path, 19, 23, 91, &len);
    size_t ihdr = png_find_chunk(bytes, len, "IHDR");
    bytes[ihdr + 8 + 7] += 5; /* height 23 -> 28 (low byte of the big-endian field) */
    png_fix_crc(bytes, ihdr);
    test_write_file(path, bytes, len);
    free(bytes);
    expect_read_failure(path, KLVAE_ERR_FORMAT);
    ck_assert_error_mentions(path);
    ck_assert_error_mentions("Not enough image data");
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

static long peak_rss_kb(void)
{
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return r.ru_maxrss;
}

START_TEST(png_text_chunk_claiming_gigabytes_is_refused_without_allocating)
{
    /* A 9 x 3 PNG header, then a tEXt chunk whose length field claims
     * 1.2 GB, then the end of the file: libpng allocated the whole chunk
     * before reading it (found by tests/fuzz/fuzz_png.c: 1.2 GB and a
     * second for 77 bytes). */
    unsigned char file[128];
    static const unsigned char signature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
    memcpy(file, signature, 8);
    unsigned char ihdr[13] = {0, 0, 0, 9, 0, 0, 0, 3, 1, 0, 0, 0, 0};
    size_t len = 8 + png_chunk(file + 8, "IHDR", ihdr, 13);
    static const unsigned char text[] = {0x49, 0x44, 0x41, 0x54, 't', 'E', 'X', 't',
                                         'C', 'o', 'm', 'm', 'e', 'n', 't', 0};
    memcpy(file + len, text, sizeof text);
    len += sizeof text;
    char *dir = test_tmpdir();
    char *path = test_join(dir, "text-bomb.png");
    test_write_file(path, file, len);
    long before = peak_rss_kb();
    expect_read_failure(path, KLVAE_ERR_FORMAT);
    long grew_kb = peak_rss_kb() - before;
    ck_assert_error_mentions(path);
    ck_assert_error_mentions("corrupt PNG");
    test_rmtree(dir);
    free(path);
    free(dir);
    ck_assert_msg(grew_kb < 32 * 1024, "reading 77 bytes raised the peak RSS by %ld kB", grew_kb);
}
END_TEST

START_TEST(png_metadata_chunks_are_skipped)
{
    /* Large text and colour-profile chunks (never used here) between the
     * header and the image data: the pixels are those of the plain file. */
    char *dir = test_tmpdir();
    char *plain = test_join(dir, "plain.png");
    char *with = test_join(dir, "with-metadata.png");
    size_t len;
    unsigned char *bytes = noisy_png(plain, 23, 17, 92, &len);
    const size_t after_ihdr = 8 + 25, comment = 300000;
    unsigned char *chunk = malloc(comment + 64);
    unsigned char *out = malloc(len + 2 * (comment + 64));
    ck_assert(chunk && out);
    memcpy(chunk, "Comment", 8); /* keyword and its NUL */
    for (size_t i = 8; i < comment; i++)
        chunk[i] = (unsigned char)('a' + i % 26);
    memcpy(out, bytes, after_ihdr);
    size_t at = after_ihdr;
    at += png_chunk(out + at, "tEXt", chunk, (uint32_t)comment);
    at += png_chunk(out + at, "iCCP", (const unsigned char *)"icc\0\0\x78\x9c\x03\x00", 9);
    at += png_chunk(out + at, "zzZz", chunk, 1000); /* unknown, safe to copy */
    memcpy(out + at, bytes + after_ihdr, len - after_ihdr);
    test_write_file(with, out, at + len - after_ihdr);
    float *a = NULL, *b = NULL;
    int ha, wa, hb, wb;
    ck_assert_ok(klvae_image_read(plain, &a, &ha, &wa));
    ck_assert_ok(klvae_image_read(with, &b, &hb, &wb));
    ck_assert_int_eq(ha, hb);
    ck_assert_int_eq(wa, wb);
    ck_assert(memcmp(a, b, (size_t)3 * ha * wa * sizeof(float)) == 0);
    klvae_free(a);
    klvae_free(b);
    free(out);
    free(chunk);
    free(bytes);
    test_rmtree(dir);
    free(plain);
    free(with);
    free(dir);
}
END_TEST

START_TEST(budget_option_range)
{
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    static const char *const bad[] = {"0", "-1", "1099511627777", "1e6", "", "12x", "+5"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        ck_assert_status(klvae_options_set(o, "max_image_pixels", bad[i]), KLVAE_ERR_OPTION);
        ck_assert_error_mentions("max_image_pixels");
    }
    ck_assert_ok(klvae_options_set(o, "max-image-pixels", "1"));
    ck_assert_ok(klvae_options_set(o, "max_image_pixels", "1099511627776"));
    char buf[32];
    ck_assert_ok(klvae_options_get(NULL, "max_image_pixels", buf, sizeof buf));
    ck_assert_str_eq(buf, "67108864");
    klvae_options_free(o);
    /* NULL arguments name the function that was called */
    float *px = NULL;
    int h, w;
    ck_assert_status(klvae_image_read_opts(NULL, NULL, &px, &h, &w), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("klvae_image_read_opts");
    ck_assert_error_mentions("path");
}
END_TEST

Suite *suite_image(void)
{
    Suite *s = suite_create("image");
    TCase *tc = tcase_create("write");
    tcase_add_test(tc, png_write_read_round_trip);
    tcase_add_test(tc, png_write_one_pixel);
    tcase_add_test(tc, png_overwrite_replaces_file);
    suite_add_tcase(s, tc);
    tc = tcase_create("png");
    tcase_add_test(tc, png_grey_8bit);
    tcase_add_test(tc, png_grey_1bit);
    tcase_add_test(tc, png_grey_2bit);
    tcase_add_test(tc, png_grey_4bit);
    tcase_add_test(tc, png_grey_16bit);
    tcase_add_test(tc, png_grey_alpha_8bit);
    tcase_add_test(tc, png_grey_with_trns);
    tcase_add_test(tc, png_palette_8bit);
    tcase_add_test(tc, png_palette_4bit);
    tcase_add_test(tc, png_palette_with_trns);
    tcase_add_test(tc, png_rgb_8bit);
    tcase_add_test(tc, png_rgba_8bit);
    tcase_add_test(tc, png_rgb_16bit);
    tcase_add_test(tc, png_rgba_16bit);
    tcase_add_test(tc, png_interlaced_rgb_8bit);
    tcase_add_test(tc, png_interlaced_grey_16bit);
    tcase_add_test(tc, png_interlaced_grey_2bit);
    suite_add_tcase(s, tc);
    tc = tcase_create("jpeg");
    tcase_add_test(tc, jpeg_rgb);
    tcase_add_test(tc, jpeg_grey_gives_equal_channels);
    suite_add_tcase(s, tc);
    tc = tcase_create("errors");
    tcase_add_test(tc, read_nonexistent_file_is_io);
    tcase_add_test(tc, read_empty_file_is_format);
    tcase_add_test(tc, read_text_file_is_format);
    tcase_add_test(tc, read_truncated_png_is_format);
    tcase_add_test(tc, read_png_cut_in_image_data_is_format);
    tcase_add_test(tc, read_corrupt_interlaced_png_leaks_nothing);
    tcase_add_test(tc, read_corrupt_jpeg_is_format);
    tcase_add_test(tc, read_truncated_jpeg_is_format);
    tcase_add_test(tc, jpeg_marker_inside_scan_is_format);
    tcase_add_test(tc, jpeg_wrong_restart_marker_is_format);
    tcase_add_test(tc, jpeg_bad_huffman_code_is_format);
    tcase_add_test(tc, jpeg_stray_bytes_between_markers_still_decode);
    tcase_add_test(tc, jpeg_with_too_many_scans_is_format);
    tcase_add_test(tc, read_directory_is_io);
    tcase_add_test(tc, write_to_missing_folder_is_io);
    tcase_add_test(tc, write_over_folder_is_io_and_leaves_no_temporary);
    tcase_add_test(tc, write_zero_height_is_invalid);
    tcase_add_test(tc, write_negative_width_is_invalid);
    tcase_add_test(tc, write_zero_width_is_invalid);
    tcase_add_test(tc, write_negative_height_is_invalid);
    suite_add_tcase(s, tc);
    tc = tcase_create("budget");
    tcase_add_test(tc, budget_refuses_one_pixel_too_many);
    tcase_add_test(tc, png_header_claiming_a_huge_image_is_refused_before_allocating);
    tcase_add_test(tc, jpeg_header_claiming_a_huge_image_is_refused_before_decoding);
    tcase_add_test(tc, budget_option_range);
    tcase_add_test(tc, png_corrupt_image_data_is_format);
    tcase_add_test(tc, png_image_data_short_of_rows_is_format);
    tcase_add_test(tc, png_text_chunk_claiming_gigabytes_is_refused_without_allocating);
    tcase_add_test(tc, png_metadata_chunks_are_skipped);
    suite_add_tcase(s, tc);
    return s;
}
