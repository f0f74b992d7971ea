/* test_dataset.c — encoding datasets to latents (src/dataset/, klvae_encode_dataset,
 * klvae_latent_stats): bucket sets, bucket choice, cover sizes and crop boxes on odd
 * sizes against independent double-precision formulas; the resampler against PIL's
 * definition written out here; the file list against the training loader's; and whole
 * runs on the noquant fixture (f = 8): shard rows equal to klvae_encode of the
 * preprocessed image bit for bit (and so their decodes), flipped rows equal to the
 * encoding of the mirror image, buckets, dtypes and scaling, samples, statistics
 * against a direct computation over the shards, resume after a stop equal byte for
 * byte to an uninterrupted run, parts covering every image once, unreadable files
 * listed with their reason, and bad arguments. */
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <jpeglib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/numerics.h"
#include "dataset/geometry.h"
#include "dataset/settings.h"
#include "dataset/shard.h"
#include "formats/image_files.h"
#include "formats/safetensors.h"
#include "test_util.h"
#include "train/data.h"

#define MODEL "fixtures/noquant/diffusers" /* f = 8, 4 latent channels */

/* ---- helpers ---- */

/* An 8-bit RGB PNG of noise (klvae_image_write_png keeps 8-bit values exactly). */
static void write_png_noise(const char *path, int h, int w, uint64_t seed)
{
    float *px = test_alloc((size_t)3 * h * w);
    test_rng r = test_rng_new(seed);
    for (size_t i = 0; i < (size_t)3 * h * w; i++)
        px[i] = (float)(int)(test_uniform(&r) * 256.0) * (2.0f / 255.0f) - 1.0f;
    ck_assert_ok(klvae_image_write_png(path, px, h, w));
    free(px);
}

static void write_jpeg_noise(const char *path, int h, int w, uint64_t seed)
{
    struct jpeg_compress_struct cinfo;
    struct jpeg_error_mgr jerr;
    cinfo.err = jpeg_std_error(&jerr);
    jpeg_create_compress(&cinfo);
    FILE *fp = fopen(path, "wb");
    ck_assert_ptr_nonnull(fp);
    jpeg_stdio_dest(&cinfo, fp);
    cinfo.image_width = (JDIMENSION)w;
    cinfo.image_height = (JDIMENSION)h;
    cinfo.input_components = 3;
    cinfo.in_color_space = JCS_RGB;
    jpeg_set_defaults(&cinfo);
    jpeg_set_quality(&cinfo, 90, TRUE);
    jpeg_start_compress(&cinfo, TRUE);
    unsigned char *row = malloc((size_t)w * 3);
    test_rng r = test_rng_new(seed);
    while (cinfo.next_scanline < cinfo.image_height) {
        for (int i = 0; i < w * 3; i++)
            row[i] = (unsigned char)(test_uniform(&r) * 256.0);
        JSAMPROW rows[1] = {row};
        jpeg_write_scanlines(&cinfo, rows, 1);
    }
    jpeg_finish_compress(&cinfo);
    jpeg_destroy_compress(&cinfo);
    fclose(fp);
    free(row);
}

/* The first bytes of src written as dst. */
static void write_truncated(const char *src, const char *dst, double fraction)
{
    size_t len;
    unsigned char *data = test_read_file(src, &len);
    test_write_file(dst, data, (size_t)((double)len * fraction));
    free(data);
}

/* The fixture model on the CPU, with scale and shift overriding its factors
 * when not NULL. */
static klvae_model_t *load_model_scaled(int threads, const char *scale, const char *shift)
{
    klvae_options_t *o = NULL;
    klvae_model_t *m = NULL;
    char t[8];
    snprintf(t, sizeof t, "%d", threads);
    ck_assert_ok(klvae_options_create(&o));
    ck_assert_ok(klvae_options_set(o, "backend", "cpu"));
    ck_assert_ok(klvae_options_set(o, "threads", t));
    if (scale)
        ck_assert_ok(klvae_options_set(o, "scaling_factor", scale));
    if (shift)
        ck_assert_ok(klvae_options_set(o, "shift_factor", shift));
    ck_assert_ok(klvae_model_load(MODEL, o, &m));
    klvae_options_free(o);
    return m;
}

static klvae_model_t *load_model(int threads)
{
    return load_model_scaled(threads, NULL, NULL);
}

/* Options from "key", "value", ... NULL. */
static klvae_options_t *options(const char *first, ...)
{
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    va_list ap;
    va_start(ap, first);
    for (const char *key = first; key; key = va_arg(ap, const char *)) {
        const char *value = va_arg(ap, const char *);
        ck_assert_ok(klvae_options_set(o, key, value));
    }
    va_end(ap);
    return o;
}

static void encode(klvae_model_t *m, const char *data, const char *out, klvae_options_t *o,
                   klvae_dataset_progress_t *summary)
{
    ck_assert_ok(klvae_encode_dataset(m, data, out, o, NULL, NULL, summary));
    klvae_options_free(o);
}

/* A tensor of a shard as float32 (NULL when absent); *rows its first dimension. */
static float *shard_tensor(const char *dir, const char *shard, const char *name, int *rows)
{
    char *path = test_join(dir, shard);
    kv_safetensors st;
    ck_assert_ok(kv_st_open(path, &st));
    const kv_st_tensor *t = kv_st_find(&st, name);
    float *data = NULL;
    if (t) {
        data = test_alloc(kv_st_numel(t));
        ck_assert_ok(kv_st_read_f32(&st, t, data));
        *rows = (int)t->shape[0];
    }
    kv_st_close(&st);
    free(path);
    return data;
}

/* An I32 tensor of a shard, read as it is stored. */
static int32_t *shard_ints(const char *dir, const char *shard, const char *name)
{
    char *path = test_join(dir, shard);
    kv_safetensors st;
    ck_assert_ok(kv_st_open(path, &st));
    const kv_st_tensor *t = kv_st_find(&st, name);
    ck_assert_ptr_nonnull(t);
    ck_assert_str_eq(t->dtype, "I32");
    size_t bytes = (size_t)(t->end - t->begin);
    int32_t *data = malloc(bytes);
    ck_assert(pread(st.fd, data, bytes, (off_t)(st.data_start + t->begin)) == (ssize_t)bytes);
    kv_st_close(&st);
    free(path);
    return data;
}

/* The lines of a JSON-lines file, parsed. */
static json_t *read_jsonl(const char *dir, const char *name)
{
    char *path = test_join(dir, name);
    size_t len;
    char *text = (char *)test_read_file(path, &len);
    json_t *lines = json_array();
    for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
        json_error_t err;
        json_t *v = json_loads(line, 0, &err);
        ck_assert_msg(v != NULL, "%s: bad line %s", path, line);
        json_array_append_new(lines, v);
    }
    free(text);
    free(path);
    return lines;
}

static json_t *read_json(const char *dir, const char *name)
{
    char *path = test_join(dir, name);
    json_error_t err;
    json_t *v = json_load_file(path, 0, &err);
    ck_assert_msg(v != NULL, "%s: %s", path, err.text);
    free(path);
    return v;
}

/* Asserts that every file of a (recursively) is in b with the same bytes, and
 * the other way round. */
static void assert_same_tree(const char *a, const char *b)
{
    DIR *d = opendir(a);
    ck_assert_ptr_nonnull(d);
    int count = 0;
    for (struct dirent *e; (e = readdir(d)) != NULL;) {
        if (e->d_name[0] == '.')
            continue;
        count++;
        char *pa = test_join(a, e->d_name), *pb = test_join(b, e->d_name);
        struct stat sb;
        ck_assert_int_eq(stat(pa, &sb), 0);
        if (S_ISDIR(sb.st_mode)) {
            assert_same_tree(pa, pb);
        } else {
            ck_assert_msg(test_path_exists(pb), "%s has no %s", b, e->d_name);
            size_t la, lb;
            unsigned char *da = test_read_file(pa, &la), *db = test_read_file(pb, &lb);
            ck_assert_msg(la == lb && memcmp(da, db, la) == 0, "%s and %s differ", pa, pb);
            free(da);
            free(db);
        }
        free(pa);
        free(pb);
    }
    closedir(d);
    int tmp;
    ck_assert_int_eq(test_count_entries(b, &tmp), count);
    ck_assert_int_eq(tmp, 0);
}

/* The image of a file as the dataset prepares it (geometry g). */
static float *prepared(const char *path, const kv_geometry *g)
{
    float *src = NULL;
    int h, w;
    ck_assert_ok(klvae_image_read(path, &src, &h, &w));
    ck_assert_int_eq(h, g->src_h);
    ck_assert_int_eq(w, g->src_w);
    float *out = test_alloc((size_t)3 * g->h * g->w);
    ck_assert_ok(kv_geometry_apply(src, g, out));
    klvae_free(src);
    return out;
}

/* The geometry an index line records. */
static kv_geometry line_geometry(const json_t *line)
{
    kv_geometry g;
    const json_t *orig = json_object_get(line, "original_size");
    const json_t *resized = json_object_get(line, "resized_size");
    const json_t *crop = json_object_get(line, "crop");
    g.src_h = (int)json_integer_value(json_array_get(orig, 0));
    g.src_w = (int)json_integer_value(json_array_get(orig, 1));
    g.resized_h = (int)json_integer_value(json_array_get(resized, 0));
    g.resized_w = (int)json_integer_value(json_array_get(resized, 1));
    g.top = (int)json_integer_value(json_array_get(crop, 0));
    g.left = (int)json_integer_value(json_array_get(crop, 1));
    g.h = (int)json_integer_value(json_array_get(crop, 2));
    g.w = (int)json_integer_value(json_array_get(crop, 3));
    return g;
}

static const char *line_string(const json_t *line, const char *key)
{
    const char *s = json_string_value(json_object_get(line, key));
    ck_assert_ptr_nonnull(s);
    return s;
}

static int line_int(const json_t *line, const char *key)
{
    return (int)json_integer_value(json_object_get(line, key));
}

/* A folder of images of odd sizes: PNGs and JPEGs, some in a subfolder. */
static const int odd_sizes[][2] = {{37, 53}, {64, 41}, {29, 90}, {75, 75},
                                   {50, 33}, {101, 67}, {40, 40}};
#define N_ODD ((int)(sizeof odd_sizes / sizeof odd_sizes[0]))

static char *make_odd_folder(void)
{
    char *root = test_tmpdir();
    char *sub = test_join(root, "sub");
    ck_assert_int_eq(mkdir(sub, 0755), 0);
    for (int i = 0; i < N_ODD; i++) {
        char name[64];
        snprintf(name, sizeof name, "%s/img%d.%s", i >= 4 ? "sub" : ".", i, i % 2 ? "jpg" : "png");
        char *path = test_join(root, name);
        if (i % 2)
            write_jpeg_noise(path, odd_sizes[i][0], odd_sizes[i][1], (uint64_t)i + 1);
        else
            write_png_noise(path, odd_sizes[i][0], odd_sizes[i][1], (uint64_t)i + 1);
        free(path);
    }
    free(sub);
    return root;
}

/* ---- geometry ---- */

START_TEST(bucket_set_by_hand)
{
    /* side 64, step 16, ratio 4, worked out by hand from the definition:
     * w = 64 -> h = 64; 80 -> 48; 96, 112, 128 -> 32 (4096 / w / 16 = 2.67,
     * 2.29, 2); w = 144 (h 16) is beyond the ratio; and the transposes. */
    static const kv_bucket want[] = {{128, 32}, {112, 32}, {96, 32}, {80, 48}, {64, 64},
                                     {48, 80},  {32, 96},  {32, 112}, {32, 128}};
    kv_bucket *b = NULL;
    int n = 0;
    ck_assert_ok(kv_buckets_make(64, 16, 4.0, &b, &n));
    ck_assert_int_eq(n, 9);
    for (int i = 0; i < n; i++) {
        ck_assert_int_eq(b[i].h, want[i].h);
        ck_assert_int_eq(b[i].w, want[i].w);
    }
    free(b);
    /* SDXL's published buckets are in the 1024,64 set, both ways round */
    ck_assert_ok(kv_buckets_make(1024, 64, 4.0, &b, &n));
    static const int sdxl[][2] = {{1024, 1024}, {896, 1152}, {832, 1216}, {768, 1344},
                                  {640, 1536}, {576, 1728}, {512, 2048}};
    for (size_t k = 0; k < sizeof sdxl / sizeof sdxl[0]; k++)
        for (int t = 0; t < 2; t++) {
            bool found = false;
            for (int i = 0; i < n; i++)
                found |= b[i].h == sdxl[k][t] && b[i].w == sdxl[k][1 - t];
            ck_assert_msg(found, "%d x %d is not a bucket", sdxl[k][t], sdxl[k][1 - t]);
        }
    for (int i = 0; i < n; i++) {
        ck_assert_int_le(b[i].h * b[i].w, 1024 * 1024);
        ck_assert(b[i].h % 64 == 0 && b[i].w % 64 == 0);
        ck_assert(b[i].w <= 4 * b[i].h && b[i].h <= 4 * b[i].w);
    }
    free(b);
    ck_assert_status(kv_buckets_make(64, 64, 1.5, &b, &n), KLVAE_OK); /* only 64 x 64 */
    ck_assert_int_eq(n, 1);
    free(b);
    /* 15 x 15 in steps of 10: 10 x 20 only, beyond a ratio of 1.5 */
    ck_assert_status(kv_buckets_make(15, 10, 1.5, &b, &n), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("no bucket");
    ck_assert_ptr_null(b);
}
END_TEST

/* The nearest bucket by the log of the aspect ratios, in double. */
static int nearest_by_log(const kv_bucket *b, int n, int h, int w)
{
    int best = 0;
    double best_d = INFINITY;
    for (int i = 0; i < n; i++) {
        double d = fabs(log((double)b[i].w / b[i].h) - log((double)w / h));
        if (d < best_d - 1e-12) {
            best = i;
            best_d = d;
        }
    }
    return best;
}

START_TEST(nearest_bucket_on_odd_sizes)
{
    kv_bucket *b = NULL;
    int n = 0;
    ck_assert_ok(kv_buckets_make(64, 16, 4.0, &b, &n));
    /* by hand: 37 x 53 (w/h 1.43) -> 48 x 80 (1.67), not 64 x 64 */
    ck_assert_int_eq(kv_bucket_nearest(b, n, 37, 53), 5);
    ck_assert_int_eq(kv_bucket_nearest(b, n, 60, 60), 4);
    ck_assert_int_eq(kv_bucket_nearest(b, n, 1, 1000), 8); /* beyond the widest: the widest */
    ck_assert_int_eq(kv_bucket_nearest(b, n, 1000, 1), 0);
    test_rng r = test_rng_new(5);
    for (int k = 0; k < 20000; k++) {
        int h = 1 + (int)(test_uniform(&r) * 3000), w = 1 + (int)(test_uniform(&r) * 3000);
        ck_assert_msg(kv_bucket_nearest(b, n, h, w) == nearest_by_log(b, n, h, w),
                      "%d x %d: bucket %d, by the log %d", h, w, kv_bucket_nearest(b, n, h, w),
                      nearest_by_log(b, n, h, w));
    }
    free(b);
}
END_TEST

START_TEST(cover_and_centre_crop_on_odd_sizes)
{
    kv_geometry g;
    kv_geometry_cover(37, 53, 32, 32, &g); /* 53 * 32 / 37 = 45.84 -> 46, crop at 7 */
    ck_assert_int_eq(g.resized_h, 32);
    ck_assert_int_eq(g.resized_w, 46);
    ck_assert_int_eq(g.top, 0);
    ck_assert_int_eq(g.left, 7);
    kv_geometry_cover(101, 67, 48, 80, &g); /* 80 / 67 > 48 / 101: 101 * 80 / 67 = 120.6 */
    ck_assert_int_eq(g.resized_w, 80);
    ck_assert_int_eq(g.resized_h, 121);
    ck_assert_int_eq(g.top, 36);
    ck_assert_int_eq(g.left, 0);
    test_rng r = test_rng_new(9);
    for (int k = 0; k < 20000; k++) {
        int sh = 1 + (int)(test_uniform(&r) * 4000), sw = 1 + (int)(test_uniform(&r) * 4000);
        int h = 8 * (1 + (int)(test_uniform(&r) * 64)), w = 8 * (1 + (int)(test_uniform(&r) * 64));
        kv_geometry_cover(sh, sw, h, w, &g);
        double scale = fmax((double)h / sh, (double)w / sw);
        int rh = (double)h / sh >= (double)w / sw ? h : (int)floor(sh * scale + 0.5);
        int rw = (double)h / sh >= (double)w / sw ? (int)floor(sw * scale + 0.5) : w;
        ck_assert_msg(g.resized_h == rh && g.resized_w == rw,
                      "%d x %d to %d x %d: resized %d x %d, want %d x %d", sh, sw, h, w,
                      g.resized_h, g.resized_w, rh, rw);
        ck_assert(g.resized_h >= h && g.resized_w >= w);
        ck_assert_int_eq(g.top, (rh - h) / 2);
        ck_assert_int_eq(g.left, (rw - w) / 2);
    }
}
END_TEST

START_TEST(random_crop_is_seeded_and_covers_the_range)
{
    kv_geometry g;
    kv_geometry_cover(40, 47, 32, 32, &g); /* resized 32 x 38: left in 0..6 */
    ck_assert_int_eq(g.resized_w, 38);
    int seen[7] = {0};
    for (uint64_t id = 0; id < 700; id++) {
        kv_geometry a = g, b = g;
        kv_geometry_random_crop(&a, 3, id);
        kv_geometry_random_crop(&b, 3, id);
        ck_assert(a.top == b.top && a.left == b.left);
        ck_assert_int_eq(a.top, 0);
        ck_assert(a.left >= 0 && a.left <= 6);
        seen[a.left]++;
    }
    for (int i = 0; i < 7; i++)
        ck_assert_msg(seen[i] > 50, "offset %d drawn %d times of 700", i, seen[i]);
    kv_geometry a = g, b = g;
    int differ = 0;
    for (uint64_t id = 0; id < 50; id++) {
        a = g, b = g;
        kv_geometry_random_crop(&a, 3, id);
        kv_geometry_random_crop(&b, 4, id);
        differ += a.left != b.left;
    }
    ck_assert_int_gt(differ, 25);
}
END_TEST

/* PIL's bilinear resample (a triangle filter widened by the scale when shrinking,
 * normalised), in double, summed over every source pixel of each axis. */
static double pil_weight(int src, int out_index, int in, int out)
{
    double scale = (double)in / out, fs = scale > 1 ? scale : 1;
    double center = (out_index + 0.5) * scale;
    double lo = floor(center - fs + 0.5), hi = floor(center + fs + 0.5);
    if (src < fmax(lo, 0) || src >= fmin(hi, in))
        return 0.0;
    double t = fabs((src - center + 0.5) / fs);
    return t < 1 ? 1 - t : 0;
}

static void reference_resample(const float *src, const kv_geometry *g, double *out)
{
    for (int c = 0; c < 3; c++)
        for (int y = 0; y < g->h; y++)
            for (int x = 0; x < g->w; x++) {
                double sum = 0, wsum_y = 0;
                for (int sy = 0; sy < g->src_h; sy++) {
                    double wy = pil_weight(sy, g->top + y, g->src_h, g->resized_h);
                    if (wy == 0)
                        continue;
                    double row = 0, wsum_x = 0;
                    for (int sx = 0; sx < g->src_w; sx++) {
                        double wx = pil_weight(sx, g->left + x, g->src_w, g->resized_w);
                        row += wx * src[((size_t)c * g->src_h + sy) * g->src_w + sx];
                        wsum_x += wx;
                    }
                    sum += wy * row / wsum_x;
                    wsum_y += wy;
                }
                out[((size_t)c * g->h + y) * g->w + x] = sum / wsum_y;
            }
}

START_TEST(resample_matches_pil_definition)
{
    /* shrinking by odd factors, enlarging, and one axis unchanged */
    static const int cases[][4] = {{101, 67, 48, 80}, {37, 53, 32, 32}, {13, 20, 32, 32},
                                   {300, 41, 64, 16}, {32, 77, 32, 32}, {9, 9, 64, 64}};
    test_rng r = test_rng_new(21);
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        const int *cs = cases[k];
        float *src = test_alloc((size_t)3 * cs[0] * cs[1]);
        test_fill(src, (size_t)3 * cs[0] * cs[1], &r, -1, 1);
        kv_geometry g;
        kv_geometry_cover(cs[0], cs[1], cs[2], cs[3], &g);
        kv_geometry_random_crop(&g, 7, k);
        size_t n = (size_t)3 * g.h * g.w;
        float *out = test_alloc(n);
        double *want = calloc(n, sizeof *want);
        ck_assert_ok(kv_geometry_apply(src, &g, out));
        reference_resample(src, &g, want);
        double worst = 0;
        for (size_t i = 0; i < n; i++)
            worst = fmax(worst, fabs(out[i] - want[i]));
        ck_assert_msg(worst < 1e-5, "case %zu: %g off PIL's definition", k, worst);
        free(src), free(out), free(want);
    }
}
END_TEST

START_TEST(no_resize_is_the_plain_crop_and_mirror_mirrors)
{
    const int h = 32, w = 45;
    float *src = test_alloc((size_t)3 * h * w);
    test_rng r = test_rng_new(4);
    test_fill(src, (size_t)3 * h * w, &r, -1, 1);
    kv_geometry g;
    kv_geometry_cover(h, w, 32, 32, &g);
    ck_assert(g.resized_h == h && g.resized_w == w && g.left == 6);
    float *out = test_alloc(3 * 32 * 32), *mirror = test_alloc(3 * 32 * 32);
    ck_assert_ok(kv_geometry_apply(src, &g, out));
    kv_mirror(out, 3, 32, 32, mirror);
    for (int c = 0; c < 3; c++)
        for (int y = 0; y < 32; y++)
            for (int x = 0; x < 32; x++) {
                float v = src[((size_t)c * h + y) * w + 6 + x];
                ck_assert(out[((size_t)c * 32 + y) * 32 + x] == v);
                ck_assert(mirror[((size_t)c * 32 + y) * 32 + 31 - x] == v);
            }
    free(src), free(out), free(mirror);
}
END_TEST

START_TEST(half_rounding_is_exact)
{
    /* every half value survives the trip through float */
    for (uint32_t h = 0; h < 65536; h++) {
        if ((h & 0x7C00u) == 0x7C00u && (h & 0x3FFu))
            continue; /* NaN */
        ck_assert_uint_eq(kv_half_from_float(kv_half_to_float((uint16_t)h)), h);
    }
    /* halfway between two halves: to the even one; just above: up */
    for (uint32_t h = 0; h < 0x7BFFu; h++) {
        double a = kv_half_to_float((uint16_t)h), b = kv_half_to_float((uint16_t)(h + 1));
        float mid = (float)((a + b) / 2);
        uint16_t want = (h & 1u) ? (uint16_t)(h + 1) : (uint16_t)h;
        ck_assert_uint_eq(kv_half_from_float(mid), want);
        ck_assert_uint_eq(kv_half_from_float(nextafterf(mid, INFINITY)), h + 1);
        ck_assert_uint_eq(kv_half_from_float(-nextafterf(mid, 0)), 0x8000u | h);
    }
    ck_assert_uint_eq(kv_half_from_float(65519.0f), 0x7BFFu);
    ck_assert_uint_eq(kv_half_from_float(65520.0f), 0x7C00u);
    ck_assert_uint_eq(kv_half_from_float(-1e30f), 0xFC00u);
    ck_assert((kv_half_from_float(NAN) & 0x7FFFu) > 0x7C00u);
}
END_TEST

/* ---- the file list ---- */

static int compare_strings(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

START_TEST(walk_lists_what_the_training_loader_reads)
{
    char *root = make_odd_folder();
    char *hidden = test_join(root, ".hidden.png"), *text = test_join(root, "notes.txt");
    char *upper = test_join(root, "sub/UPPER.JPEG"), *link = test_join(root, "loop");
    write_png_noise(hidden, 8, 8, 1);
    test_write_file(text, "x", 1);
    write_jpeg_noise(upper, 8, 8, 2);
    ck_assert_int_eq(symlink(".", link), 0); /* a loop: walked once */
    kv_image_files files;
    ck_assert_ok(kv_image_files_walk(root, &files));
    kv_dataset *ds = NULL;
    ck_assert_ok(kv_dataset_open_folder(root, 8, 0, &ds));
    ck_assert_uint_eq(files.count, kv_dataset_count(ds));
    ck_assert_uint_eq(files.count, N_ODD + 1);
    char **theirs = malloc(files.count * sizeof *theirs);
    for (size_t i = 0; i < files.count; i++) /* epoch 0 is a permutation of the list */
        theirs[i] = (char *)kv_dataset_path(ds, i);
    qsort(theirs, files.count, sizeof *theirs, compare_strings);
    for (size_t i = 0; i < files.count; i++) {
        ck_assert_str_eq(files.paths[i], theirs[i]);
        ck_assert_str_eq(files.names[i], files.paths[i] + strlen(root) + 1);
    }
    ck_assert_str_eq(files.names[0], "img0.png");
    ck_assert_str_eq(files.names[files.count - 1], "sub/img6.png");
    free(theirs);
    kv_dataset_free(ds);
    kv_image_files_free(&files);
    /* a trailing slash changes no name */
    char *slashed = malloc(strlen(root) + 2);
    sprintf(slashed, "%s/", root);
    ck_assert_ok(kv_image_files_walk(slashed, &files));
    ck_assert_str_eq(files.names[0], "img0.png");
    kv_image_files_free(&files);
    free(slashed), free(hidden), free(text), free(upper), free(link);
    test_rmtree(root);
    free(root);
}
END_TEST

START_TEST(list_file_lines)
{
    char *root = test_tmpdir();
    char *list = test_join(root, "list.txt");
    const char *text = "# images\r\na.png\r\n\r\n/abs/b.jpg\nsub/c.jpeg\na.png";
    test_write_file(list, text, strlen(text));
    kv_image_files files;
    ck_assert_ok(kv_image_files_read_list(list, &files));
    ck_assert_uint_eq(files.count, 4);
    const char *names[] = {"a.png", "/abs/b.jpg", "sub/c.jpeg", "a.png"};
    for (int i = 0; i < 4; i++)
        ck_assert_str_eq(files.names[i], names[i]);
    char *want = test_join(root, "sub/c.jpeg");
    ck_assert_str_eq(files.paths[2], want);
    ck_assert_str_eq(files.paths[1], "/abs/b.jpg");
    kv_image_files_free(&files);
    test_write_file(list, "# nothing\n\n", 11);
    ck_assert_status(kv_image_files_read_list(list, &files), KLVAE_ERR_IO);
    ck_assert_error_mentions("lists no image path");
    test_write_file(list, "a.png\0b.png\n", 12);
    ck_assert_status(kv_image_files_read_list(list, &files), KLVAE_ERR_FORMAT);
    ck_assert_error_mentions("NUL");
    ck_assert_uint_eq(files.count, 0);
    free(want), free(list);
    test_rmtree(root);
    free(root);
}
END_TEST

/* ---- whole runs ---- */

/* Checks every index line's rows against klvae_encode of the prepared image
 * (and its mirror image with flip), bit for bit. */
static void check_rows_are_encodings(klvae_model_t *m, const char *data, const char *out,
                                     bool flip)
{
    json_t *index = read_jsonl(out, "index.jsonl");
    ck_assert_int_gt(json_array_size(index), 0);
    size_t i;
    json_t *line;
    json_array_foreach(index, i, line) {
        kv_geometry g = line_geometry(line);
        char *path = test_join(data, line_string(line, "path"));
        float *img = prepared(path, &g);
        const int lh = g.h / 8, lw = g.w / 8;
        const size_t nz = (size_t)4 * lh * lw;
        float *mean = test_alloc(2 * nz), *logvar = test_alloc(2 * nz);
        float *both = test_alloc((size_t)6 * g.h * g.w);
        memcpy(both, img, (size_t)3 * g.h * g.w * sizeof *img);
        kv_mirror(img, 3, g.h, g.w, both + (size_t)3 * g.h * g.w);
        ck_assert_ok(klvae_encode(m, both, flip ? 2 : 1, g.h, g.w, mean, logvar));
        const char *shard = line_string(line, "shard");
        const int row = line_int(line, "row");
        const char *names[4] = {"mean", "logvar", "mean_flip", "logvar_flip"};
        const float *want[4] = {mean, logvar, mean + nz, logvar + nz};
        for (int t = 0; t < (flip ? 4 : 2); t++) {
            int rows;
            float *got = shard_tensor(out, shard, names[t], &rows);
            ck_assert_ptr_nonnull(got);
            ck_assert_msg(memcmp(got + (size_t)row * nz, want[t], nz * sizeof *got) == 0,
                          "%s row %d (%s) is not the encoding of %s", shard, row, names[t], path);
            free(got);
        }
        free(path), free(img), free(mean), free(logvar), free(both);
    }
    json_decref(index);
}

START_TEST(round_trip_is_bit_for_bit)
{
    /* shorter side = size: the prepared image is a plain crop of the file, so
     * the reference is the file's pixels, cropped here, then encode and decode */
    char *data = test_tmpdir(), *out_root = test_tmpdir();
    char *out = test_join(out_root, "latents");
    char *a = test_join(data, "a.png"), *b = test_join(data, "b.jpg");
    write_png_noise(a, 32, 45, 1);
    write_jpeg_noise(b, 53, 32, 2);
    klvae_model_t *m = load_model(2);
    encode(m, data, out, options("size", "32", "encode_batch", "2", NULL), NULL);
    const char *files[2] = {a, b};
    const int top[2] = {0, 10}, left[2] = {6, 0};
    for (int k = 0; k < 2; k++) {
        float *src = NULL;
        int h, w;
        ck_assert_ok(klvae_image_read(files[k], &src, &h, &w));
        float *crop = test_alloc(3 * 32 * 32);
        for (int c = 0; c < 3; c++)
            for (int y = 0; y < 32; y++)
                memcpy(crop + ((size_t)c * 32 + y) * 32,
                       src + ((size_t)c * h + top[k] + y) * w + left[k], 32 * sizeof *crop);
        float mean[64], logvar[64], want_img[3 * 32 * 32], got_img[3 * 32 * 32];
        ck_assert_ok(klvae_encode(m, crop, 1, 32, 32, mean, logvar));
        ck_assert_ok(klvae_decode(m, mean, 1, 4, 4, want_img));
        int rows;
        float *stored = shard_tensor(out, "shard-0000-000000.safetensors", "mean", &rows);
        ck_assert_int_eq(rows, 2);
        ck_assert_ok(klvae_decode(m, stored + 64 * k, 1, 4, 4, got_img));
        ck_assert(memcmp(stored + 64 * k, mean, sizeof mean) == 0);
        ck_assert_msg(memcmp(got_img, want_img, sizeof got_img) == 0,
                      "row %d does not decode to the reconstruction of its image", k);
        float *lv = shard_tensor(out, "shard-0000-000000.safetensors", "logvar", &rows);
        ck_assert(memcmp(lv + 64 * k, logvar, sizeof logvar) == 0);
        free(stored), free(lv), free(crop);
        klvae_free(src);
    }
    klvae_model_free(m);
    free(a), free(b), free(out);
    test_rmtree(data), test_rmtree(out_root);
    free(data), free(out_root);
}
END_TEST

START_TEST(resized_and_flipped_rows_are_the_encodings)
{
    char *data = make_odd_folder(), *root = test_tmpdir();
    char *out = test_join(root, "o");
    klvae_model_t *m = load_model(2);
    klvae_dataset_progress_t summary = KLVAE_DATASET_PROGRESS_INIT;
    encode(m, data, out, options("size", "32", "flip", "true", "crop", "random", "seed", "11",
                                 "shard_size", "3", "encode_batch", "3", NULL), &summary);
    ck_assert_int_eq(summary.images_done, N_ODD);
    ck_assert_int_eq(summary.shards_total, 3);
    ck_assert_int_eq(summary.finished, 1);
    ck_assert_int_eq(summary.dataset_complete, 1);
    check_rows_are_encodings(m, data, out, true);
    /* the index's geometry is the one the settings say */
    json_t *index = read_jsonl(out, "index.jsonl");
    size_t i;
    json_t *line;
    json_array_foreach(index, i, line) {
        kv_geometry g = line_geometry(line), want;
        kv_geometry_cover(g.src_h, g.src_w, 32, 32, &want);
        kv_geometry_random_crop(&want, 11, (uint64_t)line_int(line, "file"));
        ck_assert(memcmp(&g, &want, sizeof g) == 0);
        ck_assert(json_is_true(json_object_get(line, "flip")));
        int32_t *orig = shard_ints(out, line_string(line, "shard"), "original_size");
        int32_t *corner = shard_ints(out, line_string(line, "shard"), "crop_top_left");
        const int row = line_int(line, "row");
        ck_assert(orig[2 * row] == g.src_h && orig[2 * row + 1] == g.src_w);
        ck_assert(corner[2 * row] == g.top && corner[2 * row + 1] == g.left);
        free(orig), free(corner);
    }
    json_decref(index);
    klvae_model_free(m);
    free(out);
    test_rmtree(data), test_rmtree(root);
    free(data), free(root);
}
END_TEST

START_TEST(buckets_group_images_by_aspect_ratio)
{
    char *data = make_odd_folder(), *root = test_tmpdir();
    char *out = test_join(root, "o");
    klvae_model_t *m = load_model(2);
    encode(m, data, out, options("buckets", "64,16", "shard_size", "2", NULL), NULL);
    kv_bucket *b = NULL;
    int n = 0;
    ck_assert_ok(kv_buckets_make(64, 16, 4.0, &b, &n));
    json_t *index = read_jsonl(out, "index.jsonl");
    ck_assert_int_eq(json_array_size(index), N_ODD);
    size_t i;
    json_t *line;
    json_array_foreach(index, i, line) {
        kv_geometry g = line_geometry(line), want;
        const kv_bucket *nb = &b[kv_bucket_nearest(b, n, g.src_h, g.src_w)];
        kv_geometry_cover(g.src_h, g.src_w, nb->h, nb->w, &want);
        ck_assert(memcmp(&g, &want, sizeof g) == 0);
        const json_t *bucket = json_object_get(line, "bucket");
        ck_assert_int_eq(json_integer_value(json_array_get(bucket, 0)), nb->h);
        ck_assert_int_eq(json_integer_value(json_array_get(bucket, 1)), nb->w);
        int rows;
        float *mean = shard_tensor(out, line_string(line, "shard"), "mean", &rows);
        ck_assert_ptr_nonnull(mean);
        free(mean);
    }
    /* one bucket per shard, of its shape, at most 2 rows */
    json_t *manifest = read_json(out, "manifest.json");
    json_t *shards = json_object_get(manifest, "shards"), *s;
    json_array_foreach(shards, i, s) {
        char *path = test_join(out, line_string(s, "file"));
        kv_safetensors st;
        ck_assert_ok(kv_st_open(path, &st));
        const kv_st_tensor *t = kv_st_find(&st, "mean");
        const json_t *bucket = json_object_get(s, "bucket");
        ck_assert_int_eq(t->shape[0], line_int(s, "rows"));
        ck_assert_int_le(t->shape[0], 2);
        ck_assert_int_eq(t->shape[2] * 8, json_integer_value(json_array_get(bucket, 0)));
        ck_assert_int_eq(t->shape[3] * 8, json_integer_value(json_array_get(bucket, 1)));
        kv_st_close(&st);
        free(path);
    }
    check_rows_are_encodings(m, data, out, false);
    json_decref(manifest), json_decref(index);
    free(b);
    klvae_model_free(m);
    free(out);
    test_rmtree(data), test_rmtree(root);
    free(data), free(root);
}
END_TEST

/* Stops the run at its stop_after-th progress call. */
typedef struct stopper {
    int calls, stop_after;
} stopper;

static int stop_at(void *user, const klvae_dataset_progress_t *p)
{
    stopper *s = user;
    ck_assert_int_eq(p->struct_size, sizeof *p);
    return ++s->calls >= s->stop_after;
}

START_TEST(resume_after_stops_gives_the_same_bytes)
{
    char *data = make_odd_folder(), *root = test_tmpdir();
    char *whole = test_join(root, "whole");
    char *bad = test_join(data, "bad.png");
    test_write_file(bad, "not an image", 12);
    klvae_model_t *m = load_model(2);
#define RESUME_OPTIONS                                                                        \
    options("size", "16", "flip", "true", "shard_size", "2", "encode_batch", "1", "crop",    \
            "random", NULL)
    encode(m, data, whole, RESUME_OPTIONS, NULL);
    /* stopped at several points (inside a shard, after one, after a skip), then
     * continued, in as many runs as it takes */
    /* (a shard of 2 is 2 or 3 progress calls and one more when written: from 3
     * calls on each run writes at least one shard) */
    static const int stops[] = {3, 4, 5, 7, 10};
    for (size_t k = 0; k < sizeof stops / sizeof stops[0]; k++) {
        const int stop_after = stops[k];
        char name[32];
        snprintf(name, sizeof name, "stopped%d", stop_after);
        char *out = test_join(root, name);
        int runs = 0;
        klvae_dataset_progress_t summary = KLVAE_DATASET_PROGRESS_INIT;
        do {
            stopper s = {0, stop_after};
            klvae_options_t *o = RESUME_OPTIONS;
            summary.struct_size = sizeof summary;
            ck_assert_ok(klvae_encode_dataset(m, data, out, o, stop_at, &s, &summary));
            klvae_options_free(o);
            ck_assert_int_lt(++runs, 40);
        } while (!summary.finished);
        ck_assert_int_gt(runs, 1);
        ck_assert_int_gt(summary.images_resumed, 0);
        ck_assert_int_eq(summary.images_done + summary.images_skipped, N_ODD + 1);
        assert_same_tree(whole, out);
        free(out);
    }
    klvae_model_free(m);
    free(whole), free(bad);
    test_rmtree(data), test_rmtree(root);
    free(data), free(root);
}
END_TEST

START_TEST(parts_cover_every_image_once)
{
    char *data = make_odd_folder(), *root = test_tmpdir();
    char *parts = test_join(root, "parts3"), *env = test_join(root, "env");
    klvae_model_t *m = load_model(1);
    for (int p = 0; p < 3; p++) {
        char part[8];
        snprintf(part, sizeof part, "%d/3", p);
        klvae_dataset_progress_t summary = KLVAE_DATASET_PROGRESS_INIT;
        encode(m, data, parts, options("size", "16", "part", part, "shard_size", "2", NULL),
               &summary);
        ck_assert_int_eq(summary.part, p);
        ck_assert_int_eq(summary.parts, 3);
        ck_assert_int_eq(summary.images_total, (p + 1) * N_ODD / 3 - p * N_ODD / 3);
        ck_assert_int_eq(summary.dataset_complete, p == 2);
        char *index_path = test_join(parts, "index.jsonl");
        ck_assert_int_eq(test_path_exists(index_path), p == 2);
        free(index_path);
    }
    json_t *index = read_jsonl(parts, "index.jsonl");
    ck_assert_int_eq(json_array_size(index), N_ODD);
    int seen[N_ODD] = {0};
    size_t i;
    json_t *line;
    json_array_foreach(index, i, line) {
        int file = line_int(line, "file");
        ck_assert(file >= 0 && file < N_ODD);
        seen[file]++;
    }
    for (int f = 0; f < N_ODD; f++)
        ck_assert_msg(seen[f] == 1, "file %d is in the index %d times", f, seen[f]);
    /* part auto under mpirun: the rank and size of Open MPI's environment */
    for (int p = 2; p >= 0; p--) {
        char rank[8];
        snprintf(rank, sizeof rank, "%d", p);
        setenv("OMPI_COMM_WORLD_RANK", rank, 1);
        setenv("OMPI_COMM_WORLD_SIZE", "3", 1);
        encode(m, data, env, options("size", "16", "shard_size", "2", NULL), NULL);
    }
    unsetenv("OMPI_COMM_WORLD_RANK");
    unsetenv("OMPI_COMM_WORLD_SIZE");
    assert_same_tree(parts, env);
    /* a rank the environment gets wrong is refused */
    setenv("PMI_RANK", "3", 1);
    setenv("PMI_SIZE", "3", 1);
    klvae_options_t *o = options("size", "16", NULL);
    ck_assert_status(klvae_encode_dataset(m, data, env, o, NULL, NULL, NULL),
                     KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("PMI_RANK=3");
    unsetenv("PMI_RANK");
    unsetenv("PMI_SIZE");
    klvae_options_free(o);
    json_decref(index);
    klvae_model_free(m);
    free(parts), free(env);
    test_rmtree(data), test_rmtree(root);
    free(data), free(root);
}
END_TEST

/* One bad file of each kind, and what errors.jsonl must say of it. */
typedef struct bad_file {
    const char *name, *reason;
} bad_file;

static const bad_file bad_files[] = {
    {"empty.png", "it is empty"},
    {"text.jpg", "neither a PNG nor a JPEG"},
    {"truncated.png", "corrupt PNG"},
    {"truncated.jpg", "corrupt JPEG"},
    {"cut_header.jpg", "corrupt JPEG"},
    {"dangling.png", "cannot open"},
    {"huge.png", "budget"},
};

static void make_bad_files(const char *data)
{
    char *good_png = test_join(data, "img0.png"), *good_jpg = test_join(data, "img1.jpg");
    for (size_t i = 0; i < sizeof bad_files / sizeof bad_files[0]; i++) {
        char *path = test_join(data, bad_files[i].name);
        if (i == 0)
            test_write_file(path, "", 0);
        else if (i == 1)
            test_write_file(path, "hello, world\n", 13);
        else if (i == 2)
            write_truncated(good_png, path, 0.6);
        else if (i == 3)
            write_truncated(good_jpg, path, 0.6);
        else if (i == 4)
            write_truncated(good_jpg, path, 0.02);
        else if (i == 5)
            ck_assert_int_eq(symlink("nowhere.png", path), 0);
        else
            write_png_noise(path, 80, 80, 3); /* over the budget of the run below */
        free(path);
    }
    free(good_png), free(good_jpg);
}

/* errors.jsonl names each bad file with its reason, and sub/img5.jpg (101 x 67)
 * as over the budget; in file-list order. */
static void check_errors_file(const char *out)
{
    static const bad_file budget = {"sub/img5.jpg", "budget"};
    const size_t nbad = sizeof bad_files / sizeof bad_files[0];
    json_t *errors = read_jsonl(out, "errors.jsonl");
    ck_assert_int_eq(json_array_size(errors), nbad + 1);
    for (size_t i = 1; i < nbad + 1; i++)
        ck_assert_int_lt(line_int(json_array_get(errors, i - 1), "file"),
                         line_int(json_array_get(errors, i), "file"));
    for (size_t k = 0; k <= nbad; k++) {
        const bad_file *bf = k < nbad ? &bad_files[k] : &budget;
        bool found = false;
        size_t i;
        json_t *line;
        json_array_foreach(errors, i, line) {
            if (strcmp(line_string(line, "path"), bf->name) != 0)
                continue;
            found = true;
            ck_assert_msg(strstr(line_string(line, "reason"), bf->reason),
                          "the reason for %s is '%s'", bf->name, line_string(line, "reason"));
        }
        ck_assert_msg(found, "errors.jsonl does not name %s", bf->name);
    }
    json_decref(errors);
}

START_TEST(unreadable_files_are_listed_with_their_reason)
{
    char *data = make_odd_folder(), *root = test_tmpdir();
    make_bad_files(data);
    klvae_model_t *m = load_model(2);
    const char *modes[2][2] = {{"size", "16"}, {"buckets", "64,16"}}; /* read; header first */
    for (int k = 0; k < 2; k++) {
        char *out = test_join(root, modes[k][0]);
        klvae_dataset_progress_t summary = KLVAE_DATASET_PROGRESS_INIT;
        encode(m, data, out, options(modes[k][0], modes[k][1], "max_image_pixels", "6000",
                                     NULL), &summary);
        const int nbad = (int)(sizeof bad_files / sizeof bad_files[0]);
        /* 101 x 67 is over the budget of 6000 pixels too */
        ck_assert_int_eq(summary.images_skipped, nbad + 1);
        ck_assert_int_eq(summary.images_done, N_ODD - 1);
        json_t *manifest = read_json(out, "manifest.json");
        json_t *counts = json_object_get(manifest, "counts");
        ck_assert_int_eq(line_int(counts, "skipped"), nbad + 1);
        ck_assert_int_eq(line_int(counts, "images"), N_ODD - 1);
        json_decref(manifest);
        check_errors_file(out);
        free(out);
    }
    klvae_model_free(m);
    test_rmtree(data), test_rmtree(root);
    free(data), free(root);
}
END_TEST

START_TEST(threads_loaders_and_batches_do_not_change_bytes)
{
    char *data = make_odd_folder(), *root = test_tmpdir();
    char *a = test_join(root, "a"), *b = test_join(root, "b");
    klvae_model_t *m1 = load_model(1), *m2 = load_model(3);
    encode(m1, data, a, options("size", "24", "flip", "true", "loader_threads", "1",
                                "encode_batch", "1", NULL), NULL);
    encode(m2, data, b, options("size", "24", "flip", "true", "loader_threads", "4",
                                "encode_batch", "5", NULL), NULL);
    assert_same_tree(a, b);
    klvae_model_free(m1), klvae_model_free(m2);
    free(a), free(b);
    test_rmtree(data), test_rmtree(root);
    free(data), free(root);
}
END_TEST

START_TEST(dtypes_and_scaling_store_the_converted_values)
{
    char *data = make_odd_folder(), *root = test_tmpdir();
    char *f32 = test_join(root, "f32"), *bf16 = test_join(root, "bf16");
    char *f16 = test_join(root, "f16"), *scaled = test_join(root, "scaled");
    klvae_model_t *m = load_model(2);
    const char *shard = "shard-0000-000000.safetensors";
    encode(m, data, f32, options("size", "16", NULL), NULL);
    encode(m, data, bf16, options("size", "16", "dtype", "bf16", NULL), NULL);
    encode(m, data, f16, options("size", "16", "dtype", "fp16", NULL), NULL);
    klvae_model_t *ms = load_model_scaled(2, "0.25", "0.5");
    encode(ms, data, scaled, options("size", "16", "dtype", "bf16", "scale_latents", "true", NULL),
           NULL);
    klvae_model_free(ms);
    const float s = 0.25f, shift = 0.5f, log_s2 = (float)(2.0 * log(0.25));
    for (int t = 0; t < 2; t++) {
        const char *name = t ? "logvar" : "mean";
        int rows;
        float *ref = shard_tensor(f32, shard, name, &rows);
        float *b = shard_tensor(bf16, shard, name, &rows);
        float *h = shard_tensor(f16, shard, name, &rows);
        float *sc = shard_tensor(scaled, shard, name, &rows);
        for (size_t i = 0; i < (size_t)rows * 4 * 2 * 2; i++) {
            ck_assert(b[i] == kv_bf16_to_float(kv_bf16_from_float(ref[i])));
            ck_assert(h[i] == kv_half_to_float(kv_half_from_float(ref[i])));
            float want = t ? ref[i] + log_s2 : (ref[i] - shift) * s;
            ck_assert_msg(sc[i] == kv_bf16_to_float(kv_bf16_from_float(want)),
                          "%s %zu: %g stored, %g wanted", name, i, sc[i], want);
        }
        free(ref), free(b), free(h), free(sc);
    }
    char *path = test_join(bf16, shard);
    kv_safetensors st;
    ck_assert_ok(kv_st_open(path, &st));
    ck_assert_str_eq(kv_st_find(&st, "mean")->dtype, "BF16");
    ck_assert_str_eq(kv_st_metadata(&st, "scaled"), "false");
    kv_st_close(&st);
    free(path);
    path = test_join(scaled, shard);
    ck_assert_ok(kv_st_open(path, &st));
    ck_assert_str_eq(kv_st_metadata(&st, "scaled"), "true");
    ck_assert_str_eq(kv_st_metadata(&st, "scaling_factor"), "0.25");
    ck_assert_str_eq(kv_st_metadata(&st, "shift_factor"), "0.5");
    kv_st_close(&st);
    free(path);
    /* the statistics are of the raw latents either way */
    double mean_a[4], std_a[4], mean_b[4], std_b[4], sa, sb, ha, hb;
    int ca, cb;
    ck_assert_ok(klvae_latent_stats(bf16, 4, &ca, mean_a, std_a, &sa, &ha));
    ck_assert_ok(klvae_latent_stats(scaled, 4, &cb, mean_b, std_b, &sb, &hb));
    ck_assert_int_eq(ca, 4);
    ck_assert_int_eq(cb, 4);
    for (int c = 0; c < 4; c++) { /* two bf16 roundings apart */
        ck_assert_double_eq_tol(mean_a[c], mean_b[c], 0.02 * std_a[c]);
        ck_assert_double_eq_tol(std_a[c], std_b[c], 0.02 * std_a[c]);
    }
    klvae_model_free(m);
    free(f32), free(bf16), free(f16), free(scaled);
    test_rmtree(data), test_rmtree(root);
    free(data), free(root);
}
END_TEST

START_TEST(samples_are_drawn_per_image)
{
    char *data = make_odd_folder(), *root = test_tmpdir();
    char *post = test_join(root, "post"), *smp = test_join(root, "sample");
    klvae_model_t *m = load_model(2);
    encode(m, data, post, options("size", "16", "flip", "true", NULL), NULL);
    encode(m, data, smp, options("size", "16", "flip", "true", "store", "sample", "seed", "77",
                                 "encode_batch", "3", NULL), NULL);
    const char *shard = "shard-0000-000000.safetensors";
    int rows;
    float *mean = shard_tensor(post, shard, "mean", &rows);
    float *logvar = shard_tensor(post, shard, "logvar", &rows);
    float *mean_f = shard_tensor(post, shard, "mean_flip", &rows);
    float *logvar_f = shard_tensor(post, shard, "logvar_flip", &rows);
    float *z = shard_tensor(smp, shard, "latent", &rows);
    float *z_f = shard_tensor(smp, shard, "latent_flip", &rows);
    ck_assert_ptr_null(shard_tensor(smp, shard, "mean", &rows));
    json_t *index = read_jsonl(smp, "index.jsonl");
    for (int r = 0; r < rows; r++) {
        uint32_t file = (uint32_t)line_int(json_array_get(index, (size_t)r), "file");
        float want[16], want_f[16];
        ck_assert_ok(klvae_sample(m, mean + 16 * r, logvar + 16 * r, 1, 2, 2,
                                  kv_ds_sample_seed(77, file, 0), want));
        ck_assert_ok(klvae_sample(m, mean_f + 16 * r, logvar_f + 16 * r, 1, 2, 2,
                                  kv_ds_sample_seed(77, file, 1), want_f));
        ck_assert(memcmp(z + 16 * r, want, sizeof want) == 0);
        ck_assert(memcmp(z_f + 16 * r, want_f, sizeof want_f) == 0);
        ck_assert(memcmp(z + 16 * r, mean + 16 * r, sizeof want) != 0);
    }
    json_decref(index);
    free(mean), free(logvar), free(mean_f), free(logvar_f), free(z), free(z_f);
    klvae_model_free(m);
    free(post), free(smp);
    test_rmtree(data), test_rmtree(root);
    free(data), free(root);
}
END_TEST

/* The statistics of z over every stored row of every shard, computed here:
 * per channel mean, and the variance of the mean plus the mean of
 * exp(logvar) (posterior) or the variance of the samples. */
static void direct_stats(const char *out, bool posterior, double *mean, double *std)
{
    double sum[4] = {0}, sq[4] = {0}, var[4] = {0}, count = 0;
    json_t *manifest = read_json(out, "manifest.json");
    size_t i;
    json_t *s;
    const char *names[2][2] = {{"latent", "latent_flip"}, {"mean", "mean_flip"}};
    const char *lv_names[2] = {"logvar", "logvar_flip"};
    json_array_foreach(json_object_get(manifest, "shards"), i, s) {
        for (int copy = 0; copy < 2; copy++) {
            int rows;
            float *z = shard_tensor(out, line_string(s, "file"), names[posterior][copy], &rows);
            float *lv = posterior ? shard_tensor(out, line_string(s, "file"), lv_names[copy],
                                                 &rows)
                                  : NULL;
            if (!z)
                continue;
            const size_t plane = 2 * 2;
            for (int r = 0; r < rows; r++)
                for (int c = 0; c < 4; c++)
                    for (size_t k = 0; k < plane; k++) {
                        size_t at = ((size_t)r * 4 + c) * plane + k;
                        sum[c] += z[at];
                        sq[c] += (double)z[at] * z[at];
                        if (lv)
                            var[c] += exp((double)lv[at]);
                    }
            count += (double)rows * plane;
            free(z), free(lv);
        }
    }
    for (int c = 0; c < 4; c++) {
        mean[c] = sum[c] / count;
        std[c] = sqrt(sq[c] / count - mean[c] * mean[c] + var[c] / count);
    }
    json_decref(manifest);
}

START_TEST(latent_stats_match_a_direct_computation)
{
    char *data = make_odd_folder(), *root = test_tmpdir();
    klvae_model_t *m = load_model(2);
    for (int posterior = 0; posterior < 2; posterior++) {
        char *out = test_join(root, posterior ? "post" : "sample");
        encode(m, data, out, options("size", "16", "flip", "true", "shard_size", "3", "store",
                                     posterior ? "posterior" : "sample", NULL), NULL);
        double want_mean[4], want_std[4], mean[4], std[4], scale, shift;
        direct_stats(out, posterior, want_mean, want_std);
        int channels = 0;
        ck_assert_ok(klvae_latent_stats(out, 4, &channels, mean, std, &scale, &shift));
        ck_assert_int_eq(channels, 4);
        double mean_all = 0, var_all = 0;
        for (int c = 0; c < 4; c++) {
            ck_assert_double_eq_tol(mean[c], want_mean[c], 1e-9 * (1 + fabs(want_mean[c])));
            ck_assert_double_eq_tol(std[c], want_std[c], 1e-9 * want_std[c]);
            mean_all += want_mean[c] / 4;
        }
        for (int c = 0; c < 4; c++)
            var_all += (want_std[c] * want_std[c] +
                        (want_mean[c] - mean_all) * (want_mean[c] - mean_all)) / 4;
        ck_assert_double_eq_tol(scale, 1 / sqrt(var_all), 1e-9 / sqrt(var_all));
        ck_assert_double_eq_tol(shift, mean_all, 1e-9);
        json_t *manifest = read_json(out, "manifest.json");
        json_t *stats = json_object_get(manifest, "latent_stats");
        ck_assert_double_eq(json_real_value(json_object_get(stats, "scaling_factor")), scale);
        ck_assert(json_is_true(json_object_get(manifest, "complete")));
        json_decref(manifest);
        /* fewer channels asked for: only those written */
        double one[1] = {-1}, sentinel[2] = {-7, -7};
        ck_assert_ok(klvae_latent_stats(out, 1, &channels, one, sentinel, NULL, NULL));
        ck_assert_double_eq(one[0], mean[0]);
        ck_assert_double_eq(sentinel[1], -7);
        free(out);
    }
    klvae_model_free(m);
    test_rmtree(data), test_rmtree(root);
    free(data), free(root);
}
END_TEST

START_TEST(bad_arguments_are_refused)
{
    char *data = make_odd_folder(), *root = test_tmpdir();
    char *out = test_join(root, "o"), *missing = test_join(root, "no/such/folder");
    klvae_model_t *m = load_model(1);
    klvae_options_t *o = options("size", "20", NULL);
    ck_assert_status(klvae_encode_dataset(NULL, data, out, NULL, NULL, NULL, NULL),
                     KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("model");
    ck_assert_status(klvae_encode_dataset(m, NULL, out, NULL, NULL, NULL, NULL),
                     KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_status(klvae_encode_dataset(m, data, NULL, NULL, NULL, NULL, NULL),
                     KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_status(klvae_encode_dataset(m, data, out, o, NULL, NULL, NULL),
                     KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("size 20");
    klvae_options_free(o);
    o = options("buckets", "64,12", NULL);
    ck_assert_status(klvae_encode_dataset(m, data, out, o, NULL, NULL, NULL),
                     KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("step 12");
    klvae_options_free(o);
    klvae_dataset_progress_t tiny = {0};
    ck_assert_status(klvae_encode_dataset(m, data, out, NULL, NULL, NULL, &tiny),
                     KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("struct_size");
    ck_assert(!test_path_exists(out)); /* nothing written so far */
    ck_assert_status(klvae_encode_dataset(m, root, out, NULL, NULL, NULL, NULL), KLVAE_ERR_IO);
    ck_assert_error_mentions("no PNG or JPEG");
    ck_assert_status(klvae_encode_dataset(m, data, missing, NULL, NULL, NULL, NULL),
                     KLVAE_ERR_IO);
    ck_assert_error_mentions("no/such/folder");
    /* a folder made with other settings is refused and left as it was */
    o = options("size", "16", NULL);
    ck_assert_ok(klvae_encode_dataset(m, data, out, o, NULL, NULL, NULL));
    klvae_options_free(o);
    int tmp, before = test_count_entries(out, &tmp);
    o = options("size", "16", "flip", "true", NULL);
    ck_assert_status(klvae_encode_dataset(m, data, out, o, NULL, NULL, NULL),
                     KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("preprocessing.flip");
    ck_assert_int_eq(test_count_entries(out, &tmp), before);
    klvae_options_free(o);
    /* a damaged shard is named, not silently encoded again */
    char *shard = test_join(out, "shard-0000-000000.safetensors");
    write_truncated(shard, shard, 0.5);
    o = options("size", "16", NULL);
    ck_assert_status(klvae_encode_dataset(m, data, out, o, NULL, NULL, NULL), KLVAE_ERR_FORMAT);
    ck_assert_error_mentions("shard-0000-000000.safetensors is damaged");
    klvae_options_free(o);
    /* latent_stats */
    int channels;
    ck_assert_status(klvae_latent_stats(NULL, 0, &channels, NULL, NULL, NULL, NULL),
                     KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_status(klvae_latent_stats(out, -1, &channels, NULL, NULL, NULL, NULL),
                     KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_status(klvae_latent_stats(root, 0, &channels, NULL, NULL, NULL, NULL),
                     KLVAE_ERR_IO);
    ck_assert_error_mentions("no latent dataset folder");
    char *half = test_join(root, "half");
    o = options("size", "16", "part", "0/2", NULL);
    ck_assert_ok(klvae_encode_dataset(m, data, half, o, NULL, NULL, NULL));
    ck_assert_status(klvae_latent_stats(half, 0, &channels, NULL, NULL, NULL, NULL),
                     KLVAE_ERR_IO);
    ck_assert_error_mentions("part 1 of 2");
    klvae_options_free(o);
    /* a model that does not take RGB */
    klvae_options_t *mo = options("config", "tiny", "in_channels", "1", "backend", "cpu", NULL);
    klvae_model_t *grey = NULL;
    ck_assert_ok(klvae_model_create(mo, &grey));
    ck_assert_status(klvae_encode_dataset(grey, data, half, NULL, NULL, NULL, NULL),
                     KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("1 input channels");
    klvae_model_free(grey);
    klvae_options_free(mo);
    klvae_model_free(m);
    free(out), free(missing), free(shard), free(half);
    test_rmtree(data), test_rmtree(root);
    free(data), free(root);
}
END_TEST

Suite *suite_dataset(void)
{
    Suite *s = suite_create("dataset");
    TCase *tc = tcase_create("geometry");
    tcase_add_test(tc, bucket_set_by_hand);
    tcase_add_test(tc, nearest_bucket_on_odd_sizes);
    tcase_add_test(tc, cover_and_centre_crop_on_odd_sizes);
    tcase_add_test(tc, random_crop_is_seeded_and_covers_the_range);
    tcase_add_test(tc, resample_matches_pil_definition);
    tcase_add_test(tc, no_resize_is_the_plain_crop_and_mirror_mirrors);
    tcase_add_test(tc, half_rounding_is_exact);
    suite_add_tcase(s, tc);
    tc = tcase_create("files");
    tcase_add_test(tc, walk_lists_what_the_training_loader_reads);
    tcase_add_test(tc, list_file_lines);
    suite_add_tcase(s, tc);
    tc = tcase_create("encode");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, round_trip_is_bit_for_bit);
    tcase_add_test(tc, resized_and_flipped_rows_are_the_encodings);
    tcase_add_test(tc, buckets_group_images_by_aspect_ratio);
    tcase_add_test(tc, resume_after_stops_gives_the_same_bytes);
    tcase_add_test(tc, parts_cover_every_image_once);
    tcase_add_test(tc, unreadable_files_are_listed_with_their_reason);
    tcase_add_test(tc, threads_loaders_and_batches_do_not_change_bytes);
    tcase_add_test(tc, dtypes_and_scaling_store_the_converted_values);
    tcase_add_test(tc, samples_are_drawn_per_image);
    tcase_add_test(tc, latent_stats_match_a_direct_computation);
    tcase_add_test(tc, bad_arguments_are_refused);
    suite_add_tcase(s, tc);
    return s;
}
