/* test_data.c — training data (src/train/data.h): the procedural generator, folder
 * datasets (walk, order, epoch permutations, resize, crop, flip, formats,
 * errors) and the loader thread (batches, positions, skipping unreadable
 * files, failing when nothing can be read, stopping early). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <jpeglib.h>
#include <png.h>
#include <pthread.h>
#include <sys/stat.h>
#include <unistd.h>

#include "test_util.h"
#include "train/data.h"
#include "train/procedural.h"

/* ---- helpers ---- */

/* root/rel, creating the folders of rel on the way. */
static char *make_path(const char *root, const char *rel)
{
    char *path = test_join(root, rel);
    for (char *slash = path + strlen(root) + 1; (slash = strchr(slash, '/')) != NULL; slash++) {
        *slash = '\0';
        if (mkdir(path, 0755) != 0)
            ck_assert_msg(errno == EEXIST, "cannot create folder %s", path);
        *slash = '/';
    }
    return path;
}

/* The value klvae_image_read gives an 8-bit sample. */
static float value8(unsigned s)
{
    return (float)s * (2.0f / 255.0f) - 1.0f;
}

/* Inverse of value8, not rounded. */
static double sample8(float v)
{
    return ((double)v + 1.0) * 127.5;
}

/* Sample c of pixel (x, y) of an 8-bit test image, in 0..255. */
typedef unsigned (*sample_fn)(int x, int y, int c, unsigned arg);

/* Writes an 8-bit RGB PNG (through klvae_image_write_png, which rounds
 * value8(s) back to s exactly). */
static void write_png8(const char *path, int h, int w, sample_fn fn, unsigned arg)
{
    float *px = test_alloc((size_t)3 * h * w);
    for (int c = 0; c < 3; c++)
        for (int y = 0; y < h; y++)
            for (int x = 0; x < w; x++)
                px[((size_t)c * h + y) * w + x] = value8(fn(x, y, c, arg));
    ck_assert_ok(klvae_image_write_png(path, px, h, w));
    free(px);
}

static void write_png8_at(const char *root, const char *rel, int h, int w, sample_fn fn,
                          unsigned arg)
{
    char *path = make_path(root, rel);
    write_png8(path, h, w, fn, arg);
    free(path);
}

/* Coordinates: R = x, G = y, B = 77 (images up to 256 on a side). */
static unsigned coords(int x, int y, int c, unsigned arg)
{
    (void)arg;
    return c == 0 ? (unsigned)x : c == 1 ? (unsigned)y : 77u;
}

/* Coordinates scaled for interpolation tests: R = kx x, G = ky y with
 * arg = 16 kx + ky. */
static unsigned coords_scaled(int x, int y, int c, unsigned arg)
{
    return c == 0 ? (arg >> 4) * (unsigned)x : c == 1 ? (arg & 15u) * (unsigned)y : 77u;
}

/* Pseudo-random content depending on arg. */
static unsigned noise(int x, int y, int c, unsigned arg)
{
    uint32_t h = (uint32_t)x * 73856093u ^ (uint32_t)y * 19349663u ^ (uint32_t)c * 83492791u ^
                 (arg + 1u) * 2654435761u;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    return h & 255u;
}

/* A flat colour identifying file number arg. */
static unsigned flat(int x, int y, int c, unsigned arg)
{
    (void)x;
    (void)y;
    return c == 0 ? 10u + 20u * arg : c == 1 ? 200u - 10u * arg : 33u;
}

static void write_text(const char *path, const char *text)
{
    test_write_file(path, text, strlen(text));
}

/* Writes the first half of a valid PNG. */
static void write_truncated_png(const char *path)
{
    char *tmp = malloc(strlen(path) + 8);
    ck_assert_ptr_nonnull(tmp);
    sprintf(tmp, "%s.whole", path);
    write_png8(tmp, 24, 24, noise, 5);
    FILE *fp = fopen(tmp, "rb");
    ck_assert_ptr_nonnull(fp);
    unsigned char buf[8192];
    size_t n = fread(buf, 1, sizeof buf, fp);
    fclose(fp);
    ck_assert_uint_gt(n, 200);
    test_write_file(path, buf, n / 2);
    remove(tmp);
    free(tmp);
}

static size_t image_floats(int size)
{
    return (size_t)3 * size * size;
}

/* The index of the first value outside [-1, 1] (or NaN), n if none. (Hot
 * loops check with plain code: every Check assertion costs a message.) */
static size_t first_outside_unit(const float *px, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!(px[i] >= -1.0f && px[i] <= 1.0f))
            return i;
    return n;
}

/* Per-image standard deviation over all channels. */
static double image_std(const float *px, size_t n)
{
    double m = 0.0, m2 = 0.0;
    for (size_t i = 0; i < n; i++) {
        m += px[i];
        m2 += (double)px[i] * px[i];
    }
    m /= (double)n;
    return sqrt(fmax(m2 / (double)n - m * m, 0.0));
}

/* ---- the procedural generator ---- */

START_TEST(procedural_is_deterministic)
{
    const int sizes[] = {8, 37, 64, 600}; /* 600: wider than a row chunk */
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        int size = sizes[k];
        size_t n = image_floats(size);
        float *a = test_alloc(n), *b = test_alloc(n);
        for (uint64_t index = 0; index < (size > 100 ? 2u : 6u); index++) {
            memset(b, 0xFF, n * sizeof *b); /* NaN: every value must be written */
            kv_procedural_image(1234, index * 977, size, a);
            kv_procedural_image(1234, index * 977, size, b);
            ck_assert_msg(memcmp(a, b, n * sizeof *a) == 0,
                          "size %d index %llu: two calls differ", size,
                          (unsigned long long)(index * 977));
        }
        free(a);
        free(b);
    }
}
END_TEST

START_TEST(procedural_differs_by_index_and_seed)
{
    const int size = 29;
    const size_t n = image_floats(size);
    enum { COUNT = 12 };
    float *img[COUNT];
    for (int i = 0; i < COUNT; i++) {
        img[i] = test_alloc(n);
        kv_procedural_image(7, (uint64_t)i, size, img[i]);
    }
    for (int i = 0; i < COUNT; i++)
        for (int j = i + 1; j < COUNT; j++)
            ck_assert_msg(test_max_abs_diff(img[i], img[j], n) > 0.1,
                          "images %d and %d of seed 7 are (nearly) the same", i, j);
    float *other = test_alloc(n);
    for (int i = 0; i < COUNT; i++) {
        kv_procedural_image(8, (uint64_t)i, size, other);
        ck_assert_msg(test_max_abs_diff(img[i], other, n) > 0.1,
                      "image %d is the same for seeds 7 and 8", i);
        kv_procedural_image(7 + ((uint64_t)1 << 32), (uint64_t)i, size, other);
        ck_assert_msg(test_max_abs_diff(img[i], other, n) > 0.1,
                      "image %d: the seed's high 32 bits are ignored", i);
        kv_procedural_image(7, (uint64_t)i + ((uint64_t)1 << 32), size, other);
        ck_assert_msg(test_max_abs_diff(img[i], other, n) > 0.1,
                      "image %d: the index's high 32 bits are ignored", i);
    }
    free(other);
    for (int i = 0; i < COUNT; i++)
        free(img[i]);
}
END_TEST

/* In [-1, 1]; not flat (std > 0.05); spatially structured: neighbouring
 * pixels are closer than random pairs of pixels; and varied between
 * images. */
START_TEST(procedural_is_in_range_and_structured)
{
    const int size = 45;
    const size_t plane = (size_t)size * size, n = 3 * plane;
    enum { COUNT = 60 };
    float *px = test_alloc(n);
    int structured = 0;
    double mean_red[COUNT];
    test_rng rng = test_rng_new(3);
    for (int i = 0; i < COUNT; i++) {
        kv_procedural_image(2024, (uint64_t)i, size, px);
        size_t k = first_outside_unit(px, n);
        ck_assert_msg(k == n, "image %d value %zu is %g", i, k, (double)px[k % n]);
        double sd = image_std(px, n);
        ck_assert_msg(sd > 0.05, "image %d is nearly flat (std %.4f)", i, sd);
        double neighbours = 0.0, pairs = 0.0;
        int count = 0;
        for (int c = 0; c < 3; c++)
            for (int y = 0; y + 1 < size; y++)
                for (int x = 0; x + 1 < size; x++) {
                    const float *p = px + c * plane + (size_t)y * size + x;
                    neighbours += fabs((double)p[1] - p[0]) + fabs((double)p[size] - p[0]);
                    count += 2;
                }
        neighbours /= count;
        for (int k = 0; k < 4000; k++) {
            size_t c = (size_t)(test_uniform(&rng) * 3) * plane;
            size_t a = (size_t)(test_uniform(&rng) * (double)plane);
            size_t b = (size_t)(test_uniform(&rng) * (double)plane);
            pairs += fabs((double)px[c + a] - px[c + b]);
        }
        pairs /= 4000;
        if (neighbours < 0.5 * pairs)
            structured++;
        double m = 0.0;
        for (size_t k = 0; k < plane; k++)
            m += px[k];
        mean_red[i] = m / (double)plane;
    }
    ck_assert_msg(structured >= COUNT * 8 / 10,
                  "only %d of %d images have neighbours closer than random pairs", structured,
                  COUNT);
    double m = 0.0, m2 = 0.0;
    for (int i = 0; i < COUNT; i++) {
        m += mean_red[i];
        m2 += mean_red[i] * mean_red[i];
    }
    m /= COUNT;
    double spread = sqrt(m2 / COUNT - m * m);
    ck_assert_msg(spread > 0.1, "the images' mean red varies too little (%.3f)", spread);
    free(px);
}
END_TEST

START_TEST(procedural_tiny_and_odd_sizes)
{
    const int sizes[] = {1, 2, 3, 7, 9, 17};
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        size_t n = image_floats(sizes[k]);
        float *px = test_alloc(n + 1);
        px[n] = 42.0f; /* a guard past the end */
        for (uint64_t i = 0; i < 20; i++) {
            kv_procedural_image(5, i, sizes[k], px);
            ck_assert_uint_eq(first_outside_unit(px, n), n);
            ck_assert(px[n] == 42.0f);
        }
        free(px);
    }
}
END_TEST

START_TEST(procedural_dataset)
{
    kv_dataset *ds = NULL;
    ck_assert_ok(kv_dataset_open_procedural(24, 99, &ds));
    ck_assert_uint_eq(kv_dataset_count(ds), 0);
    ck_assert_int_eq(kv_dataset_size(ds), 24);
    ck_assert_str_eq(kv_dataset_path(ds, 5), "");
    size_t n = image_floats(24);
    float *a = test_alloc(n), *b = test_alloc(n);
    const uint64_t positions[] = {0, 1, 17, (uint64_t)1 << 40};
    for (size_t i = 0; i < sizeof positions / sizeof positions[0]; i++) {
        ck_assert_ok(kv_dataset_get(ds, positions[i], a));
        kv_procedural_image(99, positions[i], 24, b);
        ck_assert(memcmp(a, b, n * sizeof *a) == 0);
    }
    free(a);
    free(b);
    kv_dataset_free(ds);
}
END_TEST

/* ---- folder walk and order ---- */

static const char *const tree_images[] = {
    "b.png", "A.PNG", "a-b/x.png", "a/x.png", "sub/c.jpg", "sub/deeper/d.JPEG", "sub/e.Jpg",
    "dir.png/h.png",
};
static const char *const tree_others[] = {
    "notes.txt", "x.png.txt", ".hidden.png", ".git/f.png", "sub/.cache/g.png", "noext",
    "image.gif", "sub/readme.md", "sub/deeper/png",
};

static int compare_strings(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Finds the nested files, ignores other names and hidden entries, and lists
 * them in strcmp order of their paths. The order is observed through the
 * permutation, which depends only on (seed, epoch) and the file count: a
 * second folder of f0.png ... f7.png (whose sorted order is known) at the
 * same seed reveals which sorted index each position takes. "a-b/x.png"
 * sorts before "a/x.png" ('-' < '/'), unlike a per-folder sort. */
START_TEST(folder_walk_finds_sorted_images)
{
    const size_t count = sizeof tree_images / sizeof tree_images[0];
    char *root = test_tmpdir();
    /* Created in reverse order, so that the folder order is not sorted. */
    for (size_t i = count; i-- > 0;)
        write_png8_at(root, tree_images[i], 9, 10, flat, (unsigned)i);
    for (size_t i = 0; i < sizeof tree_others / sizeof tree_others[0]; i++)
        write_png8_at(root, tree_others[i], 9, 10, flat, 1);
    char *ref = test_tmpdir();
    for (size_t i = count; i-- > 0;) {
        char name[40];
        snprintf(name, sizeof name, "f%zu.png", i);
        write_png8_at(ref, name, 9, 10, flat, (unsigned)i);
    }

    const char *sorted[sizeof tree_images / sizeof tree_images[0]];
    memcpy(sorted, tree_images, sizeof sorted);
    qsort(sorted, count, sizeof sorted[0], compare_strings);

    kv_dataset *ds = NULL, *ds_ref = NULL;
    ck_assert_ok(kv_dataset_open_folder(root, 8, 4242, &ds));
    ck_assert_ok(kv_dataset_open_folder(ref, 8, 4242, &ds_ref));
    ck_assert_uint_eq(kv_dataset_count(ds), count);
    ck_assert_int_eq(kv_dataset_size(ds), 8);
    for (uint64_t p = 0; p < 3 * count; p++) {
        const char *r = kv_dataset_path(ds_ref, p);
        const char *base = strrchr(r, '/');
        ck_assert_ptr_nonnull(base);
        int k = atoi(base + 2);
        char *want = test_join(root, sorted[k]);
        ck_assert_str_eq(kv_dataset_path(ds, p), want);
        free(want);
    }
    kv_dataset_free(ds);
    kv_dataset_free(ds_ref);
    test_rmtree(root);
    test_rmtree(ref);
    free(root);
    free(ref);
}
END_TEST

/* The same tree gives the same stream whatever the order its files were
 * created in, and a trailing slash on the folder changes nothing. */
START_TEST(folder_order_does_not_depend_on_creation_order)
{
    static const char *const names[] = {"k/z.png", "k/a.png", "m.png", "c.jpeg", "k/q/r.png",
                                        "Z.png", "aa.png"};
    const size_t count = sizeof names / sizeof names[0];
    char *a = test_tmpdir(), *b = test_tmpdir();
    for (size_t i = 0; i < count; i++) {
        write_png8_at(a, names[i], 8, 8, flat, (unsigned)i);
        write_png8_at(b, names[count - 1 - i], 8, 8, flat, (unsigned)(count - 1 - i));
    }
    char *b_slash = malloc(strlen(b) + 2);
    ck_assert_ptr_nonnull(b_slash);
    sprintf(b_slash, "%s/", b);
    kv_dataset *da = NULL, *db = NULL;
    ck_assert_ok(kv_dataset_open_folder(a, 8, 1, &da));
    ck_assert_ok(kv_dataset_open_folder(b_slash, 8, 1, &db));
    for (uint64_t p = 0; p < 4 * count; p++) {
        const char *pa = kv_dataset_path(da, p), *pb = kv_dataset_path(db, p);
        ck_assert_str_eq(pa + strlen(a), pb + strlen(b));
    }
    kv_dataset_free(da);
    kv_dataset_free(db);
    test_rmtree(a);
    test_rmtree(b);
    free(a);
    free(b);
    free(b_slash);
}
END_TEST

/* Symbolic links are followed, to files and folders, but a link back to an
 * ancestor folder is not walked again (no endless walk). */
START_TEST(folder_walk_follows_links_without_loops)
{
    char *root = test_tmpdir();
    write_png8_at(root, "real/a.png", 8, 8, flat, 0);
    char *loop = test_join(root, "real/loop"), *link = test_join(root, "link.png");
    char *dangling = test_join(root, "dangling.png");
    ck_assert_int_eq(symlink(root, loop), 0);
    ck_assert_int_eq(symlink("real/a.png", link), 0);
    ck_assert_int_eq(symlink("nowhere.png", dangling), 0); /* kept: reading reports it */
    kv_dataset *ds = NULL;
    ck_assert_ok(kv_dataset_open_folder(root, 8, 0, &ds));
    ck_assert_uint_eq(kv_dataset_count(ds), 3);
    float px[3 * 64];
    int good = 0;
    for (uint64_t p = 0; p < 3; p++) {
        klvae_status_t st = kv_dataset_get(ds, p, px);
        if (strcmp(kv_dataset_path(ds, p), dangling) == 0) {
            ck_assert_status(st, KLVAE_ERR_IO);
            ck_assert_error_mentions(dangling);
        } else {
            ck_assert_ok(st);
            good++;
        }
    }
    ck_assert_int_eq(good, 2);
    kv_dataset_free(ds);
    test_rmtree(root);
    free(loop);
    free(link);
    free(dangling);
    free(root);
}
END_TEST

/* Each file is read under the dataset's pixel budget (the option
 * max_image_pixels, default until set): a larger file is refused from its
 * header and reported like any unreadable file. */
START_TEST(folder_files_over_the_pixel_budget_are_refused)
{
    char *root = test_tmpdir();
    write_png8_at(root, "small.png", 9, 10, noise, 1);  /* 90 pixels */
    write_png8_at(root, "large.png", 13, 14, noise, 2); /* 182 pixels */
    char *large = test_join(root, "large.png");
    kv_dataset *ds = NULL;
    ck_assert_ok(kv_dataset_open_folder(root, 8, 0, &ds));
    ck_assert_uint_eq(kv_dataset_count(ds), 2);
    float px[3 * 64];
    const uint64_t budgets[] = {0, 181, 182, 1}; /* 0: never set */
    for (size_t b = 0; b < sizeof budgets / sizeof budgets[0]; b++) {
        if (budgets[b])
            kv_dataset_set_max_pixels(ds, budgets[b]);
        for (uint64_t p = 0; p < 2; p++) {
            const bool is_large = strcmp(kv_dataset_path(ds, p), large) == 0;
            const uint64_t pixels = is_large ? 182 : 90;
            klvae_status_t st = kv_dataset_get(ds, p, px);
            if (budgets[b] == 0 || pixels <= budgets[b]) {
                ck_assert_ok(st);
                continue;
            }
            ck_assert_status(st, KLVAE_ERR_UNSUPPORTED);
            ck_assert_error_mentions(kv_dataset_path(ds, p));
            ck_assert_error_mentions("max_image_pixels");
        }
    }
    kv_dataset_free(ds);
    test_rmtree(root);
    free(large);
    free(root);
}
END_TEST

/* Every epoch visits every file exactly once; the images are the files';
 * epochs (and seeds) differ in order. */
START_TEST(epochs_are_permutations)
{
    enum { N = 11, EPOCHS = 6 };
    char *root = test_tmpdir();
    char *paths[N];
    for (int i = 0; i < N; i++) {
        char name[32];
        snprintf(name, sizeof name, "%s/img%02d.png", i % 3 == 0 ? "one" : "two/three", i);
        write_png8_at(root, name, 9, 10, flat, (unsigned)i);
        paths[i] = test_join(root, name);
    }
    kv_dataset *ds = NULL, *other_seed = NULL;
    ck_assert_ok(kv_dataset_open_folder(root, 8, 77, &ds));
    ck_assert_ok(kv_dataset_open_folder(root, 8, 78, &other_seed));
    ck_assert_uint_eq(kv_dataset_count(ds), N);
    int order[EPOCHS][N];
    float *px = test_alloc(image_floats(8));
    for (int e = 0; e < EPOCHS; e++) {
        int seen[N] = {0};
        for (int i = 0; i < N; i++) {
            uint64_t p = (uint64_t)e * N + (uint64_t)i;
            const char *path = kv_dataset_path(ds, p);
            int file = -1;
            for (int k = 0; k < N; k++)
                if (strcmp(path, paths[k]) == 0)
                    file = k;
            ck_assert_msg(file >= 0, "position %llu: unknown path %s", (unsigned long long)p,
                          path);
            seen[file]++;
            order[e][i] = file;
            ck_assert_ok(kv_dataset_get(ds, p, px));
            for (int c = 0; c < 3; c++)
                ck_assert_float_eq(px[(size_t)c * 64 + 9], value8(flat(0, 0, c, (unsigned)file)));
        }
        for (int k = 0; k < N; k++)
            ck_assert_msg(seen[k] == 1, "epoch %d visits file %d %d times", e, k, seen[k]);
    }
    for (int e = 0; e < EPOCHS; e++)
        for (int f = e + 1; f < EPOCHS; f++)
            ck_assert_msg(memcmp(order[e], order[f], sizeof order[e]) != 0,
                          "epochs %d and %d have the same order", e, f);
    int same = 0;
    for (int i = 0; i < N; i++)
        same += strcmp(kv_dataset_path(ds, (uint64_t)i), kv_dataset_path(other_seed, (uint64_t)i)) == 0;
    ck_assert_msg(same < N, "seeds 77 and 78 give the same first epoch");
    free(px);
    kv_dataset_free(ds);
    kv_dataset_free(other_seed);
    for (int i = 0; i < N; i++)
        free(paths[i]);
    test_rmtree(root);
    free(root);
}
END_TEST

/* ---- crop, resize, flip ---- */

/* The crop of a 45 x 70 image (no resize) at size 32 is an exact window of
 * the source, flipped or not; offsets cover the range; flips happen for
 * about half the positions. */
START_TEST(crop_is_a_window_and_flips_half)
{
    const int h = 45, w = 70, size = 32, positions = 300;
    char *root = test_tmpdir();
    write_png8_at(root, "coords.png", h, w, coords, 0);
    kv_dataset *ds = NULL;
    ck_assert_ok(kv_dataset_open_folder(root, size, 5, &ds));
    const size_t plane = (size_t)size * size;
    float *px = test_alloc(image_floats(size));
    int flips = 0, min_ox = w, max_ox = -1, min_oy = h, max_oy = -1;
    for (int p = 0; p < positions; p++) {
        ck_assert_ok(kv_dataset_get(ds, (uint64_t)p, px));
        bool flip = px[1] < px[0];
        int x00 = (int)lround(sample8(px[0])), oy = (int)lround(sample8(px[plane]));
        int ox = flip ? x00 - (size - 1) : x00;
        ck_assert_msg(ox >= 0 && ox <= w - size && oy >= 0 && oy <= h - size,
                      "position %d: window at (%d, %d) is outside the image", p, ox, oy);
        int bad_y = -1, bad_x = -1;
        for (int y = 0; y < size; y++)
            for (int x = 0; x < size; x++) {
                int sx = flip ? ox + size - 1 - x : ox + x, sy = oy + y;
                for (int c = 0; c < 3; c++)
                    if (px[c * plane + (size_t)y * size + x] != value8(coords(sx, sy, c, 0))) {
                        bad_y = y;
                        bad_x = x;
                    }
            }
        ck_assert_msg(bad_y < 0, "position %d: pixel (%d, %d) is not source (%d, %d)", p, bad_y,
                      bad_x, oy + bad_y, flip ? ox + size - 1 - bad_x : ox + bad_x);
        flips += flip;
        min_ox = KV_MIN(min_ox, ox);
        max_ox = KV_MAX(max_ox, ox);
        min_oy = KV_MIN(min_oy, oy);
        max_oy = KV_MAX(max_oy, oy);
    }
    /* 300 fair coins: mean 150, standard deviation 8.7. */
    ck_assert_msg(flips > 110 && flips < 190, "%d flips in %d positions", flips, positions);
    ck_assert_msg(min_ox <= 1 && max_ox >= w - size - 1 && min_oy <= 1 && max_oy >= h - size - 1,
                  "offsets x %d..%d, y %d..%d do not cover the ranges 0..%d, 0..%d", min_ox,
                  max_ox, min_oy, max_oy, w - size, h - size);
    free(px);
    kv_dataset_free(ds);
    test_rmtree(root);
    free(root);
}
END_TEST

/* Source coordinate of resized pixel dst of an axis scaled from in to out
 * (bilinear, pixel centres aligned, clamped). */
static double resized_coord(int dst, int in, int out)
{
    double s = (dst + 0.5) * (double)in / (double)out - 0.5;
    return s < 0.0 ? 0.0 : (s > in - 1 ? in - 1 : s);
}

/* Images with a side below size are resized so that the shorter side is
 * size (the longer rounded), then cropped: a 20 x 37 image at size 32 is
 * seen at 32 x 59, a 41 x 13 image at size 16 at 50 x 16. The pixels encode
 * their coordinates linearly, so bilinear interpolation gives back the
 * source coordinate of each output pixel exactly. */
static void check_resize(int h, int w, int size, int nh, int nw)
{
    const unsigned kx = 255u / (unsigned)(w - 1), ky = KV_MIN(15u, 255u / (unsigned)(h - 1));
    char *root = test_tmpdir();
    write_png8_at(root, "small.png", h, w, coords_scaled, 16 * kx + ky);
    kv_dataset *ds = NULL;
    ck_assert_ok(kv_dataset_open_folder(root, size, 11, &ds));
    const size_t plane = (size_t)size * size;
    float *px = test_alloc(image_floats(size));
    int flips = 0;
    for (int p = 0; p < 40; p++) {
        ck_assert_ok(kv_dataset_get(ds, (uint64_t)p, px));
        ck_assert_uint_eq(first_outside_unit(px, 3 * plane), 3 * plane);
        /* Find the window (ox, oy, flip) of the nh x nw image that fits. */
        bool found = false;
        for (int flip = 0; flip < 2 && !found; flip++)
            for (int oy = 0; oy <= nh - size && !found; oy++)
                for (int ox = 0; ox <= nw - size && !found; ox++) {
                    bool fits = true;
                    for (int y = 0; y < size && fits; y++)
                        for (int x = 0; x < size && fits; x++) {
                            int X = ox + (flip ? size - 1 - x : x), Y = oy + y;
                            double sx = sample8(px[(size_t)y * size + x]) / kx;
                            double sy = sample8(px[plane + (size_t)y * size + x]) / ky;
                            fits = fabs(sx - resized_coord(X, w, nw)) < 2e-3 &&
                                   fabs(sy - resized_coord(Y, h, nh)) < 2e-3 &&
                                   fabs(px[2 * plane + (size_t)y * size + x] - value8(77)) < 1e-6;
                        }
                    if (fits) {
                        found = true;
                        flips += flip;
                    }
                }
        ck_assert_msg(found,
                      "position %d: the %d x %d crop of the %d x %d image is no window of it "
                      "resized to %d x %d",
                      p, size, size, h, w, nh, nw);
    }
    ck_assert_msg(flips > 5 && flips < 35, "%d flips in 40 positions", flips);
    free(px);
    kv_dataset_free(ds);
    test_rmtree(root);
    free(root);
}

START_TEST(small_images_are_resized)
{
    check_resize(20, 37, 32, 32, 59); /* 37 * 32 / 20 = 59.2 */
    check_resize(41, 13, 16, 50, 16); /* 41 * 16 / 13 = 50.46 */
    check_resize(9, 9, 16, 16, 16);
    check_resize(12, 50, 16, 16, 67); /* one side already long enough: 66.67 */
}
END_TEST

/* A 16-bit grey + alpha PNG loads as equal channels holding its grey
 * values (klvae_image_read converts it); a JPEG loads too. */
START_TEST(grey_alpha_16bit_and_jpeg_load)
{
    const int h = 10, w = 12, size = 8;
    char *root = test_tmpdir();
    char *path = make_path(root, "deep/grey16.png");
    unsigned grey[10][12];
    unsigned char rows[10][12 * 4];
    for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++) {
            grey[y][x] = (unsigned)(x * 977 + y * 6151 + 13) % 65536u;
            unsigned alpha = (unsigned)(x * 31 + y * 7) % 65536u;
            rows[y][4 * x] = (unsigned char)(grey[y][x] >> 8);
            rows[y][4 * x + 1] = (unsigned char)grey[y][x];
            rows[y][4 * x + 2] = (unsigned char)(alpha >> 8);
            rows[y][4 * x + 3] = (unsigned char)alpha;
        }
    FILE *fp = fopen(path, "wb");
    ck_assert_ptr_nonnull(fp);
    png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
    png_infop info = png_create_info_struct(png);
    ck_assert(png && info);
    if (setjmp(png_jmpbuf(png)))
        ck_abort_msg("libpng failed writing %s", path);
    png_init_io(png, fp);
    png_set_IHDR(png, info, (png_uint_32)w, (png_uint_32)h, 16, PNG_COLOR_TYPE_GRAY_ALPHA,
                 PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    png_write_info(png, info);
    for (int y = 0; y < h; y++)
        png_write_row(png, rows[y]);
    png_write_end(png, NULL);
    png_destroy_write_struct(&png, &info);
    fclose(fp);

    kv_dataset *ds = NULL;
    ck_assert_ok(kv_dataset_open_folder(root, size, 3, &ds));
    const size_t plane = (size_t)size * size;
    float *px = test_alloc(image_floats(size));
    for (int p = 0; p < 10; p++) {
        ck_assert_ok(kv_dataset_get(ds, (uint64_t)p, px));
        bool found = false;
        for (int flip = 0; flip < 2 && !found; flip++)
            for (int oy = 0; oy <= h - size && !found; oy++)
                for (int ox = 0; ox <= w - size && !found; ox++) {
                    bool fits = true;
                    for (int y = 0; y < size && fits; y++)
                        for (int x = 0; x < size && fits; x++) {
                            int sx = ox + (flip ? size - 1 - x : x);
                            float want = (float)grey[oy + y][sx] * (2.0f / 65535.0f) - 1.0f;
                            for (int c = 0; c < 3; c++)
                                fits = fits && px[c * plane + (size_t)y * size + x] == want;
                        }
                    found = fits;
                }
        ck_assert_msg(found, "position %d: no window of the 16-bit grey image matches", p);
    }
    kv_dataset_free(ds);
    free(path);

    /* A JPEG (upper-case extension) next to it. */
    unsigned char rgb[16 * 16 * 3];
    for (int i = 0; i < 16 * 16 * 3; i++)
        rgb[i] = (unsigned char)(100 + (i % 48));
    path = make_path(root, "photo.JPEG");
    fp = fopen(path, "wb");
    ck_assert_ptr_nonnull(fp);
    struct jpeg_compress_struct cinfo;
    struct jpeg_error_mgr jerr;
    cinfo.err = jpeg_std_error(&jerr);
    jpeg_create_compress(&cinfo);
    jpeg_stdio_dest(&cinfo, fp);
    cinfo.image_width = 16;
    cinfo.image_height = 16;
    cinfo.input_components = 3;
    cinfo.in_color_space = JCS_RGB;
    jpeg_set_defaults(&cinfo);
    jpeg_start_compress(&cinfo, TRUE);
    while (cinfo.next_scanline < 16) {
        JSAMPROW row = rgb + (size_t)cinfo.next_scanline * 16 * 3;
        jpeg_write_scanlines(&cinfo, &row, 1);
    }
    jpeg_finish_compress(&cinfo);
    jpeg_destroy_compress(&cinfo);
    fclose(fp);
    ck_assert_ok(kv_dataset_open_folder(root, size, 3, &ds));
    ck_assert_uint_eq(kv_dataset_count(ds), 2);
    int jpegs = 0;
    for (int p = 0; p < 4; p++) {
        ck_assert_ok(kv_dataset_get(ds, (uint64_t)p, px));
        if (strcmp(kv_dataset_path(ds, (uint64_t)p), path) == 0) {
            jpegs++;
            bool near = true;
            for (size_t i = 0; i < 3 * plane; i++)
                near = near && px[i] > value8(90) && px[i] < value8(160);
            ck_assert_msg(near, "the JPEG's values are off");
        }
    }
    ck_assert_int_eq(jpegs, 2);
    kv_dataset_free(ds);
    free(path);
    free(px);
    test_rmtree(root);
    free(root);
}
END_TEST

/* ---- determinism and threads ---- */

static const int det_sizes[][2] = {{13, 17}, {40, 31}, {12, 12}, {25, 9}, {7, 30}, {50, 50}};

static char *make_noise_folder(void)
{
    char *root = test_tmpdir();
    for (size_t i = 0; i < sizeof det_sizes / sizeof det_sizes[0]; i++) {
        char name[32];
        snprintf(name, sizeof name, "d%zu/n%zu.png", i % 2, i);
        write_png8_at(root, name, det_sizes[i][0], det_sizes[i][1], noise, (unsigned)i);
    }
    return root;
}

typedef struct reader_job {
    const kv_dataset *ds;
    const float *expected;
    int positions;
    int stride, first;
    bool backwards;
    int mismatches;
} reader_job;

static void *reader_main(void *arg)
{
    reader_job *job = arg;
    const size_t n = image_floats(kv_dataset_size(job->ds));
    float *px = malloc(n * sizeof *px);
    for (int k = 0; px && k < job->positions; k++) {
        int i = (job->first + k * job->stride) % job->positions;
        if (job->backwards)
            i = job->positions - 1 - i;
        if (kv_dataset_get(job->ds, (uint64_t)i, px) != KLVAE_OK ||
            memcmp(px, job->expected + (size_t)i * n, n * sizeof *px) != 0)
            job->mismatches++;
    }
    if (!px)
        job->mismatches = -1;
    free(px);
    return NULL;
}

/* Same (seed, position) gives the same bits: twice, from another dataset
 * over the same folder, and from three threads reading over many epochs in
 * different orders at once. Different positions and seeds differ. */
START_TEST(dataset_is_deterministic_across_threads)
{
    const int size = 12, positions = 72; /* 12 epochs of 6 files */
    const size_t n = image_floats(size);
    char *root = make_noise_folder();
    kv_dataset *ds = NULL, *again = NULL, *other = NULL;
    ck_assert_ok(kv_dataset_open_folder(root, size, 31337, &ds));
    ck_assert_ok(kv_dataset_open_folder(root, size, 31337, &again));
    ck_assert_ok(kv_dataset_open_folder(root, size, 31338, &other));
    float *expected = test_alloc(n * positions), *px = test_alloc(n);
    for (int p = 0; p < positions; p++)
        ck_assert_ok(kv_dataset_get(ds, (uint64_t)p, expected + (size_t)p * n));
    int differs_from_other = 0;
    for (int p = positions; p-- > 0;) {
        ck_assert_ok(kv_dataset_get(ds, (uint64_t)p, px));
        ck_assert_msg(memcmp(px, expected + (size_t)p * n, n * sizeof *px) == 0,
                      "position %d changed on a second read", p);
        ck_assert_ok(kv_dataset_get(again, (uint64_t)p, px));
        ck_assert_msg(memcmp(px, expected + (size_t)p * n, n * sizeof *px) == 0,
                      "position %d differs between two datasets of the same seed", p);
        ck_assert_ok(kv_dataset_get(other, (uint64_t)p, px));
        differs_from_other += memcmp(px, expected + (size_t)p * n, n * sizeof *px) != 0;
        if (p % 6 != 0) /* within an epoch: different files */
            ck_assert_msg(memcmp(expected + (size_t)p * n, expected + (size_t)(p - 1) * n,
                                 n * sizeof *px) != 0,
                          "positions %d and %d give the same image", p - 1, p);
    }
    ck_assert_int_gt(differs_from_other, positions * 3 / 4);

    reader_job jobs[3] = {
        {ds, expected, positions, 1, 0, false, 0},
        {ds, expected, positions, 1, 0, true, 0},
        {ds, expected, positions, 7, 3, false, 0}, /* 7 is prime to 72: all positions */
    };
    pthread_t threads[3];
    for (int t = 0; t < 3; t++)
        ck_assert_int_eq(pthread_create(&threads[t], NULL, reader_main, &jobs[t]), 0);
    for (int t = 0; t < 3; t++)
        pthread_join(threads[t], NULL);
    for (int t = 0; t < 3; t++)
        ck_assert_msg(jobs[t].mismatches == 0, "thread %d: %d positions differ", t,
                      jobs[t].mismatches);
    free(expected);
    free(px);
    kv_dataset_free(ds);
    kv_dataset_free(again);
    kv_dataset_free(other);
    test_rmtree(root);
    free(root);
}
END_TEST

/* ---- errors ---- */

START_TEST(open_errors)
{
    kv_dataset *ds = (kv_dataset *)&ds; /* must be reset to NULL */
    ck_assert_status(kv_dataset_open_folder(NULL, 32, 0, &ds), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_null(ds);
    ck_assert_status(kv_dataset_open_folder("/tmp", 32, 0, NULL), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_status(kv_dataset_open_procedural(32, 0, NULL), KLVAE_ERR_INVALID_ARGUMENT);
    const int bad_sizes[] = {-1, 0, 7, 8193, 1 << 30};
    char *root = test_tmpdir();
    for (size_t i = 0; i < sizeof bad_sizes / sizeof bad_sizes[0]; i++) {
        ds = (kv_dataset *)&ds;
        ck_assert_status(kv_dataset_open_folder(root, bad_sizes[i], 0, &ds),
                         KLVAE_ERR_INVALID_ARGUMENT);
        ck_assert_ptr_null(ds);
        ds = (kv_dataset *)&ds;
        ck_assert_status(kv_dataset_open_procedural(bad_sizes[i], 0, &ds),
                         KLVAE_ERR_INVALID_ARGUMENT);
        ck_assert_ptr_null(ds);
    }
    ck_assert_ok(kv_dataset_open_procedural(8, 0, &ds));
    kv_dataset_free(ds);
    ck_assert_ok(kv_dataset_open_procedural(8192, 0, &ds));
    kv_dataset_free(ds);

    /* Empty folder; then only ignored files. */
    ck_assert_status(kv_dataset_open_folder(root, 32, 0, &ds), KLVAE_ERR_IO);
    ck_assert_error_mentions(root);
    ck_assert_ptr_null(ds);
    for (size_t i = 0; i < sizeof tree_others / sizeof tree_others[0]; i++)
        write_png8_at(root, tree_others[i], 8, 8, flat, 0);
    ck_assert_status(kv_dataset_open_folder(root, 32, 0, &ds), KLVAE_ERR_IO);
    ck_assert_error_mentions(root);
    ck_assert_ptr_null(ds);

    /* Missing folder; a file given as the folder. */
    char *missing = test_join(root, "no-such-folder");
    ck_assert_status(kv_dataset_open_folder(missing, 32, 0, &ds), KLVAE_ERR_IO);
    ck_assert_error_mentions(missing);
    char *file = test_join(root, "notes.txt");
    ck_assert_status(kv_dataset_open_folder(file, 32, 0, &ds), KLVAE_ERR_IO);
    ck_assert_error_mentions(file);
    ck_assert_ptr_null(ds);

    /* A dataset is fine with 8 as size. */
    write_png8_at(root, "ok.png", 8, 8, flat, 0);
    ck_assert_ok(kv_dataset_open_folder(root, 8, 0, &ds));
    ck_assert_uint_eq(kv_dataset_count(ds), 1);
    float px[3 * 64];
    ck_assert_status(kv_dataset_get(NULL, 0, px), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_status(kv_dataset_get(ds, 0, NULL), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_ok(kv_dataset_get(ds, 0, px));
    kv_dataset_free(ds);

    kv_dataset_free(NULL);
    kv_loader_free(NULL);
    ck_assert_uint_eq(kv_dataset_count(NULL), 0);
    ck_assert_int_eq(kv_dataset_size(NULL), 0);
    ck_assert_str_eq(kv_dataset_path(NULL, 3), "");
    free(missing);
    free(file);
    test_rmtree(root);
    free(root);
}
END_TEST

/* A file that cannot be read: the status of reading it, naming it. */
START_TEST(get_reports_unreadable_file)
{
    char *root = test_tmpdir();
    char *bad = make_path(root, "bad.png");
    write_text(bad, "this is not an image\n");
    kv_dataset *ds = NULL;
    ck_assert_ok(kv_dataset_open_folder(root, 8, 0, &ds));
    float px[3 * 64];
    ck_assert_status(kv_dataset_get(ds, 0, px), KLVAE_ERR_FORMAT);
    ck_assert_error_mentions(bad);
    remove(bad); /* gone after the walk */
    ck_assert_status(kv_dataset_get(ds, 1, px), KLVAE_ERR_IO);
    ck_assert_error_mentions(bad);
    kv_dataset_free(ds);
    free(bad);
    test_rmtree(root);
    free(root);
}
END_TEST

/* ---- the loader ---- */

typedef struct warnings {
    int count;
    char text[16][1024];
} warnings;

static void collect_warning(void *ctx, const char *message)
{
    warnings *w = ctx;
    if (w->count < 16)
        snprintf(w->text[w->count], sizeof w->text[0], "%s", message);
    w->count++;
}

static int warnings_naming(const warnings *w, const char *path)
{
    int n = 0;
    for (int i = 0; i < KV_MIN(w->count, 16); i++)
        n += strstr(w->text[i], path) != NULL && strstr(w->text[i], "skipping") != NULL;
    return n;
}

/* Batches hold exactly the images kv_dataset_get gives at consecutive
 * positions from start; the position returned is the one after the batch. */
START_TEST(loader_matches_dataset)
{
    const int size = 8, n = 3, batches = 8;
    const uint64_t start = 5;
    char *root = make_noise_folder();
    kv_dataset *ds = NULL;
    ck_assert_ok(kv_dataset_open_folder(root, size, 12, &ds));
    const size_t img = image_floats(size);
    kv_loader *loader = NULL;
    ck_assert_ok(kv_loader_create(ds, n, start, 2, NULL, NULL, &loader));
    float *batch = test_alloc(img * n), *want = test_alloc(img);
    for (int b = 0; b < batches; b++) {
        uint64_t pos = 0;
        if (b == 3) { /* the position is optional */
            ck_assert_ok(kv_loader_next(loader, batch, NULL));
        } else {
            ck_assert_ok(kv_loader_next(loader, batch, &pos));
            ck_assert_uint_eq(pos, start + (uint64_t)(n * (b + 1)));
        }
        for (int k = 0; k < n; k++) {
            ck_assert_ok(kv_dataset_get(ds, start + (uint64_t)(n * b + k), want));
            ck_assert_msg(memcmp(batch + (size_t)k * img, want, img * sizeof *want) == 0,
                          "batch %d image %d is not position %llu", b, k,
                          (unsigned long long)(start + (uint64_t)(n * b + k)));
        }
    }
    kv_loader_free(loader);
    free(batch);
    free(want);
    kv_dataset_free(ds);
    test_rmtree(root);
    free(root);
}
END_TEST

START_TEST(loader_procedural)
{
    const int size = 16, n = 2;
    kv_dataset *ds = NULL;
    ck_assert_ok(kv_dataset_open_procedural(size, 606, &ds));
    kv_loader *loader = NULL;
    ck_assert_ok(kv_loader_create(ds, n, 100, 3, NULL, NULL, &loader));
    const size_t img = image_floats(size);
    float *batch = test_alloc(img * n), *want = test_alloc(img);
    for (int b = 0; b < 5; b++) {
        uint64_t pos = 0;
        ck_assert_ok(kv_loader_next(loader, batch, &pos));
        ck_assert_uint_eq(pos, 100 + (uint64_t)(n * (b + 1)));
        for (int k = 0; k < n; k++) {
            kv_procedural_image(606, 100 + (uint64_t)(n * b + k), size, want);
            ck_assert(memcmp(batch + (size_t)k * img, want, img * sizeof *want) == 0);
        }
    }
    kv_loader_free(loader);
    free(batch);
    free(want);
    kv_dataset_free(ds);
}
END_TEST

/* A text file named bad.png and a truncated PNG are each reported once,
 * through the callback, and skipped: the batches hold the readable
 * positions in order, over several epochs. */
START_TEST(loader_skips_unreadable_files)
{
    const int size = 8, n = 3;
    char *root = test_tmpdir();
    for (int i = 0; i < 5; i++) {
        char name[32];
        snprintf(name, sizeof name, "%sgood%d.png", i % 2 ? "sub/" : "", i);
        write_png8_at(root, name, 8 + i, 9, noise, (unsigned)(100 + i));
    }
    char *bad = make_path(root, "bad.png");
    write_text(bad, "not a PNG\n");
    char *trunc = make_path(root, "sub/trunc.png");
    write_truncated_png(trunc);

    kv_dataset *ds = NULL;
    ck_assert_ok(kv_dataset_open_folder(root, size, 8, &ds));
    ck_assert_uint_eq(kv_dataset_count(ds), 7);
    warnings w = {0};
    kv_loader *loader = NULL;
    ck_assert_ok(kv_loader_create(ds, n, 2, 2, collect_warning, &w, &loader));
    const size_t img = image_floats(size);
    float *batch = test_alloc(img * n), *want = test_alloc(img);
    uint64_t expect = 2; /* the next readable position */
    uint64_t pos = 0;
    int batches = 0;
    while (pos < 2 + 5 * 7) { /* five epochs */
        ck_assert_ok(kv_loader_next(loader, batch, &pos));
        for (int k = 0; k < n; k++) {
            while (kv_dataset_get(ds, expect, want) != KLVAE_OK) {
                const char *path = kv_dataset_path(ds, expect);
                ck_assert_msg(strcmp(path, bad) == 0 || strcmp(path, trunc) == 0,
                              "%s failed: %s", path, klvae_last_error());
                expect++;
            }
            ck_assert_msg(memcmp(batch + (size_t)k * img, want, img * sizeof *want) == 0,
                          "batch %d image %d is not position %llu", batches, k,
                          (unsigned long long)expect);
            expect++;
        }
        ck_assert_uint_eq(pos, expect);
        batches++;
    }
    ck_assert_msg(w.count == 2, "%d warnings, expected 2 (the first: %s)", w.count, w.text[0]);
    ck_assert_int_eq(warnings_naming(&w, bad), 1);
    ck_assert_int_eq(warnings_naming(&w, trunc), 1);
    kv_loader_free(loader);
    free(batch);
    free(want);
    kv_dataset_free(ds);
    free(bad);
    free(trunc);
    test_rmtree(root);
    free(root);
}
END_TEST

/* When every file is unreadable, kv_loader_next fails with KLVAE_ERR_IO
 * (and keeps failing) instead of waiting forever; each file is reported
 * once. */
START_TEST(loader_fails_when_nothing_is_readable)
{
    char *root = test_tmpdir();
    char *a = make_path(root, "a.png"), *b = make_path(root, "b/b.jpg"),
         *c = make_path(root, "c.png");
    write_text(a, "text");
    write_text(b, "");
    write_truncated_png(c);
    kv_dataset *ds = NULL;
    ck_assert_ok(kv_dataset_open_folder(root, 8, 1, &ds));
    warnings w = {0};
    kv_loader *loader = NULL;
    ck_assert_ok(kv_loader_create(ds, 2, 0, 2, collect_warning, &w, &loader));
    float batch[2 * 3 * 64];
    ck_assert_status(kv_loader_next(loader, batch, NULL), KLVAE_ERR_IO);
    ck_assert_error_mentions(root);
    ck_assert_int_eq(w.count, 3);
    ck_assert_int_eq(warnings_naming(&w, a), 1);
    ck_assert_int_eq(warnings_naming(&w, b), 1);
    ck_assert_int_eq(warnings_naming(&w, c), 1);
    ck_assert_status(kv_loader_next(loader, batch, NULL), KLVAE_ERR_IO);
    ck_assert_error_mentions(root);
    ck_assert_int_eq(w.count, 3);
    kv_loader_free(loader);
    kv_dataset_free(ds);
    free(a);
    free(b);
    free(c);
    test_rmtree(root);
    free(root);
}
END_TEST

/* One good file among many bad ones: the loader keeps delivering it, even
 * when runs of failures longer than the file count occur between two
 * epochs (the good file early in one epoch and late in the next). */
START_TEST(loader_keeps_going_with_one_good_file)
{
    char *root = test_tmpdir();
    for (int i = 0; i < 9; i++) {
        char name[40];
        snprintf(name, sizeof name, "bad%d.png", i);
        char *path = make_path(root, name);
        write_text(path, "x");
        free(path);
    }
    write_png8_at(root, "good.png", 8, 8, noise, 1);
    kv_dataset *ds = NULL;
    ck_assert_ok(kv_dataset_open_folder(root, 8, 2, &ds));
    /* Check that the case the test is about occurs in these epochs. */
    int longest = 0, run = 0;
    float px[3 * 64];
    for (uint64_t p = 0; p < 40 * 10; p++) {
        if (kv_dataset_get(ds, p, px) == KLVAE_OK) {
            run = 0;
        } else {
            run++;
            longest = KV_MAX(longest, run);
        }
    }
    ck_assert_int_gt(longest, 10);
    warnings w = {0};
    kv_loader *loader = NULL;
    ck_assert_ok(kv_loader_create(ds, 1, 0, 2, collect_warning, &w, &loader));
    uint64_t pos = 0;
    for (int b = 0; b < 40; b++)
        ck_assert_ok(kv_loader_next(loader, px, &pos));
    ck_assert_uint_gt(pos, 40 * 10 - 20);
    ck_assert_int_eq(w.count, 9);
    kv_loader_free(loader);
    kv_dataset_free(ds);
    test_rmtree(root);
    free(root);
}
END_TEST

/* Without a callback, the warning is one line on stderr:
 * "klvae: skipping <path>: <reason>". */
START_TEST(loader_default_warning_goes_to_stderr)
{
    char *root = test_tmpdir();
    write_png8_at(root, "good.png", 8, 8, noise, 3);
    char *bad = make_path(root, "bad.png");
    write_text(bad, "no");
    char *log = test_join(root, "stderr.log");
    kv_dataset *ds = NULL;
    ck_assert_ok(kv_dataset_open_folder(root, 8, 4, &ds));

    fflush(stderr);
    int saved = dup(2);
    int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ck_assert_int_ge(saved, 0);
    ck_assert_int_ge(fd, 0);
    dup2(fd, 2);
    close(fd);
    kv_loader *loader = NULL;
    klvae_status_t st = kv_loader_create(ds, 2, 0, 1, NULL, NULL, &loader);
    float batch[2 * 3 * 64];
    klvae_status_t st1 = st == KLVAE_OK ? kv_loader_next(loader, batch, NULL) : st;
    klvae_status_t st2 = st == KLVAE_OK ? kv_loader_next(loader, batch, NULL) : st;
    kv_loader_free(loader);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    ck_assert_ok(st);
    ck_assert_ok(st1);
    ck_assert_ok(st2);

    char text[4096] = {0};
    FILE *fp = fopen(log, "r");
    ck_assert_ptr_nonnull(fp);
    size_t got = fread(text, 1, sizeof text - 1, fp);
    fclose(fp);
    text[got] = '\0';
    char *prefix = malloc(strlen(bad) + 32);
    ck_assert_ptr_nonnull(prefix);
    sprintf(prefix, "klvae: skipping %s: ", bad);
    char *line = strstr(text, prefix);
    ck_assert_msg(line != NULL, "stderr was \"%s\"", text);
    ck_assert_msg(strstr(line + 1, prefix) == NULL, "reported twice: \"%s\"", text);
    ck_assert_ptr_nonnull(strchr(line, '\n'));
    free(prefix);
    kv_dataset_free(ds);
    free(bad);
    free(log);
    test_rmtree(root);
    free(root);
}
END_TEST

/* Freeing stops and joins the thread whether the consumer took nothing,
 * some or all batches ahead, with a full ring or a thread mid-batch. */
START_TEST(loader_stops_early)
{
    kv_dataset *ds = NULL;
    ck_assert_ok(kv_dataset_open_procedural(64, 1, &ds));
    float *batch = test_alloc(image_floats(64) * 4);
    for (int taken = 0; taken < 4; taken++) {
        kv_loader *loader = NULL;
        ck_assert_ok(kv_loader_create(ds, 4, 0, 1 + taken % 3, NULL, NULL, &loader));
        for (int i = 0; i < taken; i++)
            ck_assert_ok(kv_loader_next(loader, batch, NULL));
        if (taken == 2)
            usleep(20000); /* let the ring fill up */
        kv_loader_free(loader);
    }
    free(batch);
    kv_dataset_free(ds);

    char *root = make_noise_folder();
    ck_assert_ok(kv_dataset_open_folder(root, 8, 1, &ds));
    kv_loader *loader = NULL;
    ck_assert_ok(kv_loader_create(ds, 3, 0, 2, NULL, NULL, &loader));
    kv_loader_free(loader);
    kv_dataset_free(ds);
    test_rmtree(root);
    free(root);
}
END_TEST

/* A rank's share (kv_loader_create_share): with 2 micro-batches of 6
 * images and 3 ranks, rank r takes images 2r, 2r + 1 of each micro-batch,
 * and the ranks' shares, put back in the order klvae.h defines, are the
 * single loader's global batches; every rank's position after a batch is
 * the global one. */
START_TEST(loader_shares_make_the_global_batch)
{
    const int size = 8, batch = 12, accum = 2, ranks = 3, part = batch / accum / ranks;
    const uint64_t start = 7;
    char *root = make_noise_folder();
    kv_dataset *ds = NULL;
    ck_assert_ok(kv_dataset_open_folder(root, size, 12, &ds));
    const size_t img = image_floats(size);
    kv_loader *whole = NULL, *rank[3] = {NULL, NULL, NULL};
    ck_assert_ok(kv_loader_create(ds, batch, start, 2, NULL, NULL, &whole));
    for (int r = 0; r < ranks; r++) {
        kv_loader_share share = {batch, accum, r, ranks};
        ck_assert_ok(kv_loader_create_share(ds, &share, start, 2, NULL, NULL, &rank[r]));
    }
    float *global = test_alloc(img * batch), *mine = test_alloc(img * (batch / ranks));
    for (int b = 0; b < 4; b++) { /* more than an epoch of the 6 files */
        uint64_t pos_whole = 0, pos = 0;
        ck_assert_ok(kv_loader_next(whole, global, &pos_whole));
        for (int r = 0; r < ranks; r++) {
            ck_assert_ok(kv_loader_next(rank[r], mine, &pos));
            ck_assert_uint_eq(pos, pos_whole);
            for (int j = 0; j < batch / ranks; j++) {
                const int m = j / part, k = j % part, g = m * (batch / accum) + r * part + k;
                ck_assert_msg(memcmp(mine + (size_t)j * img, global + (size_t)g * img,
                                     img * sizeof *mine) == 0,
                              "batch %d: rank %d's image %d is not global image %d", b, r, j, g);
            }
        }
    }
    for (int r = 0; r < ranks; r++)
        kv_loader_free(rank[r]);
    kv_loader_free(whole);
    /* shares that do not divide */
    kv_loader_share bad = {10, 2, 0, 3};
    kv_loader *none = NULL;
    ck_assert_status(kv_loader_create_share(ds, &bad, 0, 2, NULL, NULL, &none),
                     KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("10 images cannot be shared by 3 ranks in 2 micro-batches");
    ck_assert_ptr_null(none);
    bad = (kv_loader_share){6, 1, 3, 3};
    ck_assert_status(kv_loader_create_share(ds, &bad, 0, 2, NULL, NULL, &none),
                     KLVAE_ERR_INVALID_ARGUMENT);
    free(global);
    free(mine);
    kv_dataset_free(ds);
    test_rmtree(root);
    free(root);
}
END_TEST

/* An unreadable file in a share takes the next readable file of the same
 * epoch's order, reported once; the batches stay where they are: the
 * position after each is start + k batch, and one rank's share or two
 * ranks' shares give the same images. With nothing readable: KLVAE_ERR_IO. */
START_TEST(loader_share_replaces_unreadable_files)
{
    const int size = 8, batch = 4;
    char *root = test_tmpdir();
    for (int i = 0; i < 4; i++) {
        char name[32];
        snprintf(name, sizeof name, "good%d.png", i);
        write_png8_at(root, name, 9, 8 + i, noise, (unsigned)(300 + i));
    }
    char *bad = make_path(root, "bad.png");
    write_text(bad, "not a PNG\n");
    kv_dataset *ds = NULL;
    ck_assert_ok(kv_dataset_open_folder(root, size, 4, &ds));
    const size_t img = image_floats(size);
    warnings w1 = {0}, w2[2] = {{0}, {0}};
    kv_loader *one = NULL, *two[2] = {NULL, NULL};
    kv_loader_share s1 = {batch, 1, 0, 1};
    ck_assert_ok(kv_loader_create_share(ds, &s1, 0, 2, collect_warning, &w1, &one));
    for (int r = 0; r < 2; r++) {
        kv_loader_share s2 = {batch, 1, r, 2};
        ck_assert_ok(kv_loader_create_share(ds, &s2, 0, 2, collect_warning, &w2[r], &two[r]));
    }
    float *all = test_alloc(img * batch), *half = test_alloc(img * 2), *want = test_alloc(img);
    for (int b = 0; b < 5; b++) { /* four epochs of the 5 files */
        uint64_t pos = 0;
        ck_assert_ok(kv_loader_next(one, all, &pos));
        ck_assert_uint_eq(pos, (uint64_t)(b + 1) * batch);
        for (int k = 0; k < batch; k++) { /* what the rule says, from the dataset itself */
            uint64_t p = (uint64_t)(b * batch + k), q = p;
            while (kv_dataset_get(ds, q, want) != KLVAE_OK) {
                ck_assert_str_eq(kv_dataset_path(ds, q), bad);
                q = p - p % 5 + (q % 5 + 1) % 5;
            }
            ck_assert_msg(memcmp(all + (size_t)k * img, want, img * sizeof *want) == 0,
                          "batch %d image %d", b, k);
        }
        for (int r = 0; r < 2; r++) {
            ck_assert_ok(kv_loader_next(two[r], half, &pos));
            ck_assert_uint_eq(pos, (uint64_t)(b + 1) * batch);
            ck_assert(memcmp(half, all + (size_t)(2 * r) * img, 2 * img * sizeof *half) == 0);
        }
    }
    ck_assert_int_eq(w1.count, 1);
    ck_assert_int_eq(warnings_naming(&w1, bad), 1);
    ck_assert_int_eq(w2[0].count + w2[1].count, 2); /* each rank that met it, once */
    kv_loader_free(one);
    kv_loader_free(two[0]);
    kv_loader_free(two[1]);
    kv_dataset_free(ds);
    test_rmtree(root);
    free(root);
    free(bad);
    /* nothing readable */
    root = test_tmpdir();
    char *a = make_path(root, "a.png"), *c = make_path(root, "c.png");
    write_text(a, "text");
    write_truncated_png(c);
    ck_assert_ok(kv_dataset_open_folder(root, 8, 1, &ds));
    w1.count = 0;
    ck_assert_ok(kv_loader_create_share(ds, &s1, 0, 2, collect_warning, &w1, &one));
    ck_assert_status(kv_loader_next(one, all, NULL), KLVAE_ERR_IO);
    ck_assert_error_mentions("none of the 2 image files");
    ck_assert_int_eq(w1.count, 2);
    kv_loader_free(one);
    kv_dataset_free(ds);
    test_rmtree(root);
    free(root);
    free(a);
    free(c);
    free(all);
    free(half);
    free(want);
}
END_TEST

START_TEST(loader_argument_errors)
{
    kv_dataset *ds = NULL;
    ck_assert_ok(kv_dataset_open_procedural(8, 1, &ds));
    kv_loader *loader = (kv_loader *)&loader;
    ck_assert_status(kv_loader_create(NULL, 1, 0, 1, NULL, NULL, &loader),
                     KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_null(loader);
    ck_assert_status(kv_loader_create(ds, 0, 0, 1, NULL, NULL, &loader),
                     KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_status(kv_loader_create(ds, -3, 0, 1, NULL, NULL, &loader),
                     KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_status(kv_loader_create(ds, 1, 0, 0, NULL, NULL, &loader),
                     KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_status(kv_loader_create(ds, 1, 0, 1, NULL, NULL, NULL),
                     KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_ptr_null(loader);
    ck_assert_ok(kv_loader_create(ds, 1, 0, 1, NULL, NULL, &loader));
    float px[3 * 64];
    ck_assert_status(kv_loader_next(NULL, px, NULL), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_status(kv_loader_next(loader, NULL, NULL), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_ok(kv_loader_next(loader, px, NULL));
    kv_loader_free(loader);
    kv_dataset_free(ds);
}
END_TEST

Suite *suite_data(void)
{
    Suite *s = suite_create("data");
    TCase *tc = tcase_create("procedural");
    tcase_add_test(tc, procedural_is_deterministic);
    tcase_add_test(tc, procedural_differs_by_index_and_seed);
    tcase_add_test(tc, procedural_is_in_range_and_structured);
    tcase_add_test(tc, procedural_tiny_and_odd_sizes);
    tcase_add_test(tc, procedural_dataset);
    suite_add_tcase(s, tc);
    tc = tcase_create("folder");
    tcase_add_test(tc, folder_walk_finds_sorted_images);
    tcase_add_test(tc, folder_order_does_not_depend_on_creation_order);
    tcase_add_test(tc, folder_walk_follows_links_without_loops);
    tcase_add_test(tc, folder_files_over_the_pixel_budget_are_refused);
    tcase_add_test(tc, epochs_are_permutations);
    tcase_add_test(tc, crop_is_a_window_and_flips_half);
    tcase_add_test(tc, small_images_are_resized);
    tcase_add_test(tc, grey_alpha_16bit_and_jpeg_load);
    tcase_add_test(tc, dataset_is_deterministic_across_threads);
    tcase_add_test(tc, open_errors);
    tcase_add_test(tc, get_reports_unreadable_file);
    suite_add_tcase(s, tc);
    tc = tcase_create("loader");
    tcase_add_test(tc, loader_matches_dataset);
    tcase_add_test(tc, loader_procedural);
    tcase_add_test(tc, loader_skips_unreadable_files);
    tcase_add_test(tc, loader_fails_when_nothing_is_readable);
    tcase_add_test(tc, loader_keeps_going_with_one_good_file);
    tcase_add_test(tc, loader_default_warning_goes_to_stderr);
    tcase_add_test(tc, loader_stops_early);
    tcase_add_test(tc, loader_argument_errors);
    tcase_add_test(tc, loader_shares_make_the_global_batch);
    tcase_add_test(tc, loader_share_replaces_unreadable_files);
    suite_add_tcase(s, tc);
    return s;
}
