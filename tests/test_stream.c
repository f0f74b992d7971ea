/* test_stream.c — streamed ("exact") encode and decode against the untiled
 * forward (the bound: 1e-5 relative L2), on several configs, odd
 * sizes, batch > 1 and bands forced down to one row so that every boundary
 * case occurs (halo rows at both ends, the upsample's odd band ends, the
 * downsample's stride, bands that do not divide the height); the memory it
 * holds against memory_limit; the spill file (created in spill_dir, used,
 * removed, also on error); the error for a limit too small; blend tiling
 * against diffusers' tiled decode and encode (tools/make_blend_fixture.py). */
#include <dirent.h>
#include <signal.h>
#include <sys/resource.h>

#include "model/model.h"
#include "model/stream.h"
#include "test_util.h"

#define EXACT_TOLERANCE 1e-5  /* the issue's: relative L2 against untiled */
#define PARITY_TOLERANCE 1e-4 /* against diffusers (docs/design.md) */

static double relative_l2(const float *a, const float *ref, size_t n)
{
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - (double)ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    return den > 0.0 ? sqrt(num / den) : sqrt(num);
}

/* A model: a named config with random weights (seed), or a fixture. */
typedef struct model_case {
    const char *config;  /* "small", "tiny", or a fixture folder */
    bool fixture;
    int lat_h, lat_w;    /* odd latent sizes */
} model_case;

static const model_case model_cases[] = {
    {"small", false, 7, 5},     /* 4 levels, >= 32 channels: Winograd bands */
    {"tiny", false, 9, 6},      /* 2 levels */
    {"latent16", true, 5, 7},   /* 16 latent channels, 3 levels */
    {"noquant", true, 3, 5},    /* no quant convs, 4 levels, 2 resnets per level */
    {"noattn", true, 11, 3},    /* no mid-block attention */
    {"gelu", true, 5, 9},       /* gelu in the resnets */
};

static klvae_model_t *make_model(const model_case *mc)
{
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    ck_assert_ok(klvae_options_set(o, "memory_limit", "none"));
    ck_assert_ok(klvae_options_set(o, "threads", "2"));
    klvae_model_t *m = NULL;
    if (mc->fixture) {
        char path[256];
        snprintf(path, sizeof path, "fixtures/%s/diffusers", mc->config);
        ck_assert_ok(klvae_model_load(path, o, &m));
    } else {
        ck_assert_ok(klvae_options_set(o, "config", mc->config));
        ck_assert_ok(klvae_options_set(o, "seed", "11"));
        ck_assert_ok(klvae_model_create(o, &m));
    }
    klvae_options_free(o);
    return m;
}

/* Streams whatever does not fit in limit bytes (0: untiled), in bands of
 * at most rows rows (0: as planned). */
static void set_streaming(klvae_model_t *m, uint64_t limit, int rows)
{
    m->infer.limit_kind = limit ? KV_LIMIT_BYTES : KV_LIMIT_NONE;
    m->infer.memory_limit = limit;
    m->infer.max_band_rows = rows;
}

/* A limit just below the untiled forward's, so that it streams. */
static uint64_t below_untiled(const klvae_model_t *m, bool encode, int n, int h, int w)
{
    return kv_untiled_bytes(m, encode, n, h, w) - 1;
}

static void assert_plan_starts(klvae_model_t *m, const char *prefix)
{
    char plan[600];
    ck_assert_ok(klvae_model_get(m, "last_plan", plan, sizeof plan));
    ck_assert_msg(strncmp(plan, prefix, strlen(prefix)) == 0, "last_plan is \"%s\"", plan);
}

static float *random_array(size_t n, uint64_t seed)
{
    float *x = test_alloc(n);
    test_rng r = test_rng_new(seed);
    test_fill(x, n, &r, -1.0f, 1.0f);
    return x;
}

/* ---- exact streaming against untiled ---- */

START_TEST(streamed_decode_matches_untiled)
{
    const model_case *mc = &model_cases[_i];
    klvae_model_t *m = make_model(mc);
    const int n = 2, f = klvae_model_downsampling_factor(m), zc = klvae_model_latent_channels(m);
    const size_t nz = (size_t)n * zc * mc->lat_h * mc->lat_w;
    const size_t ni = (size_t)n * klvae_model_out_channels(m) * mc->lat_h * f * mc->lat_w * f;
    float *z = random_array(nz, 40 + (uint64_t)_i), *ref = test_alloc(ni), *out = test_alloc(ni);
    ck_assert_ok(klvae_decode(m, z, n, mc->lat_h, mc->lat_w, ref));
    assert_plan_starts(m, "untiled");
    const uint64_t limit = below_untiled(m, false, n, mc->lat_h * f, mc->lat_w * f);
    for (int rows = 1; rows <= 3; rows++) {
        set_streaming(m, limit, rows);
        for (size_t i = 0; i < ni; i++)
            out[i] = NAN; /* every value must be written */
        ck_assert_ok(klvae_decode(m, z, n, mc->lat_h, mc->lat_w, out));
        assert_plan_starts(m, "streamed");
        double err = relative_l2(out, ref, ni);
        ck_assert_msg(err < EXACT_TOLERANCE, "%s, bands of %d rows: relative error %g",
                      mc->config, rows, err);
    }
    klvae_model_free(m);
    free(z), free(ref), free(out);
}
END_TEST

START_TEST(streamed_encode_matches_untiled)
{
    const model_case *mc = &model_cases[_i];
    klvae_model_t *m = make_model(mc);
    const int n = 2, f = klvae_model_downsampling_factor(m), zc = klvae_model_latent_channels(m);
    const int h = mc->lat_h * f, w = mc->lat_w * f;
    const size_t ni = (size_t)n * klvae_model_in_channels(m) * h * w;
    const size_t nz = (size_t)n * zc * mc->lat_h * mc->lat_w;
    float *x = random_array(ni, 60 + (uint64_t)_i), *mean = test_alloc(nz), *logvar = test_alloc(nz);
    float *mean2 = test_alloc(nz), *logvar2 = test_alloc(nz);
    ck_assert_ok(klvae_encode(m, x, n, h, w, mean, logvar));
    const uint64_t limit = below_untiled(m, true, n, h, w);
    for (int rows = 1; rows <= 3; rows++) {
        set_streaming(m, limit, rows);
        for (size_t i = 0; i < nz; i++)
            mean2[i] = logvar2[i] = NAN;
        ck_assert_ok(klvae_encode(m, x, n, h, w, mean2, rows == 2 ? NULL : logvar2));
        assert_plan_starts(m, "streamed");
        double e_mean = relative_l2(mean2, mean, nz);
        double e_logvar = rows == 2 ? 0.0 : relative_l2(logvar2, logvar, nz);
        ck_assert_msg(e_mean < EXACT_TOLERANCE && e_logvar < EXACT_TOLERANCE,
                      "%s, bands of %d rows: relative error %g (mean), %g (logvar)", mc->config,
                      rows, e_mean, e_logvar);
    }
    klvae_model_free(m);
    free(x), free(mean), free(logvar), free(mean2), free(logvar2);
}
END_TEST

START_TEST(whole_bands_are_the_untiled_forward_bit_for_bit)
{
    /* With bands as large as every layer (and nothing spilled), the streamed
     * forward runs the same ops on the same tensors, statistics included. */
    model_case mc = {"small", false, 6, 5};
    klvae_model_t *m = make_model(&mc);
    const int n = 2, f = klvae_model_downsampling_factor(m), h = 6 * f, w = 5 * f;
    const size_t nz = (size_t)n * 4 * 6 * 5, ni = (size_t)n * 3 * h * w;
    float *z = random_array(nz, 81), *ref = test_alloc(ni), *out = test_alloc(ni);
    float *x = random_array(ni, 82), *mean = test_alloc(nz), *logvar = test_alloc(nz);
    float *mean2 = test_alloc(nz), *logvar2 = test_alloc(nz);
    ck_assert_ok(klvae_decode(m, z, n, 6, 5, ref));
    ck_assert_ok(klvae_encode(m, x, n, h, w, mean, logvar));
    kv_forward_plan plan = {.mode = KV_FORWARD_STREAMED, .n = n, .h = h, .w = w,
                            .band_bytes = (size_t)1 << 30, .spill_threshold = UINT64_MAX};
    kv_stream_report report;
    ck_assert_ok(kv_stream_decode(m, &plan, z, out, &report));
    ck_assert_int_eq(report.max_rows, h);
    plan.encode = true;
    ck_assert_ok(kv_stream_encode(m, &plan, x, mean2, logvar2, &report));
    ck_assert_msg(memcmp(out, ref, ni * sizeof(float)) == 0, "decode: relative error %g",
                  relative_l2(out, ref, ni));
    ck_assert_msg(memcmp(mean2, mean, nz * sizeof(float)) == 0 &&
                      memcmp(logvar2, logvar, nz * sizeof(float)) == 0,
                  "encode: relative error %g", relative_l2(mean2, mean, nz));
    klvae_model_free(m);
    free(z), free(ref), free(out), free(x), free(mean), free(logvar), free(mean2), free(logvar2);
}
END_TEST

START_TEST(streamed_forward_holds_what_it_planned_within_the_limit)
{
    model_case mc = {"small", false, 12, 10};
    klvae_model_t *m = make_model(&mc);
    const int f = klvae_model_downsampling_factor(m), h = 12 * f, w = 10 * f;
    float *z = random_array((size_t)4 * 12 * 10, 90), *img = test_alloc((size_t)3 * h * w);
    const uint64_t untiled = kv_untiled_bytes(m, false, 1, h, w);
    for (int i = 1; i <= 3; i++) {
        set_streaming(m, untiled * i / 4, 0);
        kv_forward_plan plan;
        ck_assert_ok(kv_plan_forward(m, false, 1, h, w, false, &plan));
        ck_assert_int_eq(plan.mode, KV_FORWARD_STREAMED);
        kv_stream_report report;
        ck_assert_ok(kv_stream_decode(m, &plan, z, img, &report));
        /* its own count: what the dry run planned, within the limit */
        ck_assert_uint_eq(report.peak_bytes, plan.planned_bytes);
        ck_assert_uint_le(report.peak_bytes, plan.limit);
    }
    klvae_model_free(m);
    free(z), free(img);
}
END_TEST

/* The size in the message "... needs at least N MiB ...", in bytes. */
static uint64_t minimum_from_message(void)
{
    const char *at = strstr(klvae_last_error(), "needs at least ");
    ck_assert_ptr_nonnull(at);
    double v = strtod(at + strlen("needs at least "), NULL);
    const char *unit = strstr(at, "MiB") ? "MiB" : "GiB";
    return (uint64_t)(v * (strcmp(unit, "MiB") == 0 ? 1048576.0 : 1073741824.0));
}

START_TEST(a_backend_without_host_memory_streams_through_staging)
{
    /* The CPU backend flagged as if its memory were a device's: bands,
     * statistics and the attention go through upload and download, as they
     * would on the CUDA backend. */
    model_case mc = {"latent16", true, 5, 6};
    klvae_model_t *m = make_model(&mc);
    const int n = 2, f = klvae_model_downsampling_factor(m), h = 5 * f, w = 6 * f;
    const size_t nz = (size_t)n * 16 * 5 * 6, ni = (size_t)n * 3 * h * w;
    float *z = random_array(nz, 95), *ref = test_alloc(ni), *out = test_alloc(ni);
    float *x = random_array(ni, 96), *mean = test_alloc(nz), *mean2 = test_alloc(nz);
    ck_assert_ok(klvae_decode(m, z, n, 5, 6, ref));
    ck_assert_ok(klvae_encode(m, x, n, h, w, mean, NULL));
    m->be->host_memory = false;
    set_streaming(m, below_untiled(m, false, n, h, w), 2);
    ck_assert_ok(klvae_decode(m, z, n, 5, 6, out));
    set_streaming(m, below_untiled(m, true, n, h, w), 3);
    ck_assert_ok(klvae_encode(m, x, n, h, w, mean2, NULL));
    assert_plan_starts(m, "streamed");
    char text[600];
    ck_assert_ok(klvae_model_get(m, "last_plan", text, sizeof text));
    ck_assert_msg(strstr(text, " on the device; ") && strstr(text, " in host memory"), "%s", text);
    double e_dec = relative_l2(out, ref, ni), e_mean = relative_l2(mean2, mean, nz);
    ck_assert_msg(e_dec < EXACT_TOLERANCE && e_mean < EXACT_TOLERANCE,
                  "relative error %g (decode), %g (mean)", e_dec, e_mean);
    /* memory_limit bounds the device's memory: the stores are in host memory,
     * counted apart, planned as they are held */
    set_streaming(m, below_untiled(m, false, 1, h, w), 0);
    kv_forward_plan plan;
    ck_assert_ok(kv_plan_forward(m, false, 1, h, w, false, &plan));
    ck_assert_int_eq(plan.mode, KV_FORWARD_STREAMED);
    kv_stream_report report;
    ck_assert_ok(kv_stream_decode(m, &plan, z, out, &report));
    ck_assert_uint_eq(report.peak_bytes, plan.planned_bytes);
    ck_assert_uint_le(report.peak_bytes, plan.limit);
    ck_assert_uint_eq(report.host_peak_bytes, plan.planned_host_bytes);
    ck_assert_uint_gt(report.host_peak_bytes, 0);
    /* the least device limit it names streams without spilling (host memory
     * is plentiful here), within that limit */
    set_streaming(m, 1 << 16, 0);
    ck_assert_status(klvae_decode(m, z, 1, 5, 6, out), KLVAE_ERR_OUT_OF_MEMORY);
    set_streaming(m, minimum_from_message() + (1 << 17), 0);
    ck_assert_ok(kv_plan_forward(m, false, 1, h, w, false, &plan));
    ck_assert_uint_eq(plan.spill_threshold, UINT64_MAX);
    ck_assert_ok(kv_stream_decode(m, &plan, z, out, &report));
    ck_assert_uint_eq(report.spilled_bytes, 0);
    ck_assert_uint_le(report.peak_bytes, plan.limit);
    ck_assert_double_lt(relative_l2(out, ref, (size_t)3 * h * w), EXACT_TOLERANCE);
    m->be->host_memory = true;
    klvae_model_free(m);
    free(z), free(ref), free(out), free(x), free(mean), free(mean2);
}
END_TEST

/* ---- the limit, and the spill file ---- */

START_TEST(a_limit_too_small_names_the_least_that_works)
{
    model_case mc = {"small", false, 16, 12};
    klvae_model_t *m = make_model(&mc);
    const int f = klvae_model_downsampling_factor(m);
    float *z = random_array((size_t)4 * 16 * 12, 7), *img = test_alloc((size_t)3 * 16 * f * 12 * f);
    set_streaming(m, 1 << 20, 0);
    ck_assert_status(klvae_decode(m, z, 1, 16, 12, img), KLVAE_ERR_OUT_OF_MEMORY);
    ck_assert_error_mentions("memory_limit 1.0 MiB is too small to decode 12 x 16 latents");
    ck_assert_error_mentions("needs at least");
    /* what it names is enough (the message rounds to 0.1 MiB) */
    const uint64_t least = minimum_from_message() + (1 << 17);
    ck_assert_uint_gt(least, 1 << 20);
    char *dir = test_tmpdir();
    free(m->infer.spill_dir);
    m->infer.spill_dir = strdup(dir);
    set_streaming(m, least, 0);
    ck_assert_ok(klvae_decode(m, z, 1, 16, 12, img));
    assert_plan_starts(m, "streamed");
    /* the same for an encode */
    set_streaming(m, 1 << 20, 0);
    ck_assert_status(klvae_encode(m, img, 1, 16 * f, 12 * f, z, NULL), KLVAE_ERR_OUT_OF_MEMORY);
    ck_assert_error_mentions("is too small to encode 96 x 128 images");
    klvae_model_free(m);
    test_rmtree(dir);
    free(dir), free(z), free(img);
}
END_TEST

static int open_descriptors(void)
{
    DIR *d = opendir("/proc/self/fd");
    ck_assert_ptr_nonnull(d);
    int count = 0;
    while (readdir(d))
        count++;
    closedir(d);
    return count;
}

/* The least limit (plus a little) for the decode of z: everything spilled. */
static uint64_t spilling_limit(klvae_model_t *m, int lat_h, int lat_w)
{
    const int f = klvae_model_downsampling_factor(m);
    set_streaming(m, 1 << 20, 0);
    kv_forward_plan plan;
    ck_assert_status(kv_plan_forward(m, false, 1, lat_h * f, lat_w * f, false, &plan),
                     KLVAE_ERR_OUT_OF_MEMORY);
    return plan.planned_bytes + 4096;
}

START_TEST(the_spill_file_is_used_and_removed)
{
    model_case mc = {"small", false, 13, 11};
    klvae_model_t *m = make_model(&mc);
    const int n = 2, f = klvae_model_downsampling_factor(m);
    const size_t nz = (size_t)n * 4 * 13 * 11, ni = (size_t)n * 3 * 13 * f * 11 * f;
    float *z = random_array(nz, 12), *ref = test_alloc(ni), *out = test_alloc(ni);
    ck_assert_ok(klvae_decode(m, z, n, 13, 11, ref));
    char *dir = test_tmpdir();
    free(m->infer.spill_dir);
    m->infer.spill_dir = strdup(dir);
    const int fds = open_descriptors();
    set_streaming(m, spilling_limit(m, 13, 11), 3);
    kv_forward_plan plan;
    ck_assert_ok(kv_plan_forward(m, false, n, 13 * f, 11 * f, false, &plan));
    ck_assert_uint_eq(plan.spill_threshold, 0); /* every activation spilled */
    kv_stream_report report;
    ck_assert_ok(kv_stream_decode(m, &plan, z, out, &report));
    ck_assert_uint_gt(report.spilled_bytes, 0);
    ck_assert_uint_le(report.peak_bytes, plan.limit);
    double err = relative_l2(out, ref, ni);
    ck_assert_msg(err < EXACT_TOLERANCE, "relative error %g", err);
    /* through the API, which says where it spilled */
    ck_assert_ok(klvae_decode(m, z, n, 13, 11, out));
    char text[600];
    ck_assert_ok(klvae_model_get(m, "last_plan", text, sizeof text));
    ck_assert_msg(strstr(text, "spilled to a file in") && strstr(text, dir), "%s", text);
    int tmp_found;
    ck_assert_int_eq(test_count_entries(dir, &tmp_found), 0);
    ck_assert_int_eq(open_descriptors(), fds);
    klvae_model_free(m);
    test_rmtree(dir);
    free(dir), free(z), free(ref), free(out);
}
END_TEST

START_TEST(a_spill_file_that_cannot_grow_is_an_error_that_leaves_nothing)
{
    model_case mc = {"small", false, 13, 11};
    klvae_model_t *m = make_model(&mc);
    const int f = klvae_model_downsampling_factor(m);
    float *z = random_array((size_t)4 * 13 * 11, 13), *img = test_alloc((size_t)3 * 13 * f * 11 * f);
    char *dir = test_tmpdir();
    free(m->infer.spill_dir);
    m->infer.spill_dir = strdup(dir);
    const uint64_t limit = spilling_limit(m, 13, 11);
    const int fds = open_descriptors();
    /* files of this process may not grow past 64 KiB */
    struct rlimit old, small = {65536, 65536};
    ck_assert_int_eq(getrlimit(RLIMIT_FSIZE, &old), 0);
    small.rlim_max = old.rlim_max;
    void (*old_handler)(int) = signal(SIGXFSZ, SIG_IGN);
    ck_assert_int_eq(setrlimit(RLIMIT_FSIZE, &small), 0);
    set_streaming(m, limit, 0);
    klvae_status_t st = klvae_decode(m, z, 1, 13, 11, img);
    setrlimit(RLIMIT_FSIZE, &old);
    signal(SIGXFSZ, old_handler);
    ck_assert_int_eq(st, KLVAE_ERR_IO);
    ck_assert_error_mentions(dir);
    ck_assert_error_mentions("spill_dir");
    int tmp_found;
    ck_assert_int_eq(test_count_entries(dir, &tmp_found), 0);
    ck_assert_int_eq(open_descriptors(), fds);
    /* and the model works on */
    ck_assert_ok(klvae_decode(m, z, 1, 13, 11, img));
    /* a spill_dir that does not exist */
    free(m->infer.spill_dir);
    m->infer.spill_dir = test_join(dir, "missing");
    ck_assert_status(klvae_decode(m, z, 1, 13, 11, img), KLVAE_ERR_IO);
    ck_assert_error_mentions("cannot create the spill file in");
    ck_assert_error_mentions("missing");
    ck_assert_int_eq(open_descriptors(), fds);
    klvae_model_free(m);
    test_rmtree(dir);
    free(dir), free(z), free(img);
}
END_TEST

/* ---- options ---- */

START_TEST(memory_limit_reads_sizes_and_the_model_reports_it)
{
    static const struct {
        const char *text, *bytes;
    } good[] = {{"4G", "4294967296"}, {"1.5G", "1610612736"}, {"512M", "536870912"},
                {"4GiB", "4294967296"}, {"4gb", "4294967296"}, {"3000000000", "3000000000"},
                {"auto", "auto"}, {"none", "none"}};
    for (size_t i = 0; i < KV_ARRAY_LEN(good); i++) {
        klvae_options_t *o = NULL;
        ck_assert_ok(klvae_options_create(&o));
        ck_assert_ok(klvae_options_set(o, "config", "tiny"));
        ck_assert_ok(klvae_options_set(o, "memory-limit", good[i].text));
        klvae_model_t *m = NULL;
        ck_assert_ok(klvae_model_create(o, &m));
        char buf[32];
        ck_assert_ok(klvae_model_get(m, "memory_limit", buf, sizeof buf));
        ck_assert_str_eq(buf, good[i].bytes);
        klvae_model_free(m);
        klvae_options_free(o);
    }
    static const char *const bad[] = {"0", "-1", "4X", "G", "", "1e400", "inf", "1000", "4 G",
                                      "4GB2"};
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    for (size_t i = 0; i < KV_ARRAY_LEN(bad); i++) {
        ck_assert_status(klvae_options_set(o, "memory_limit", bad[i]), KLVAE_ERR_OPTION);
        ck_assert_error_mentions("memory_limit");
    }
    klvae_options_free(o);
}
END_TEST

START_TEST(tile_options_are_checked)
{
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    ck_assert_ok(klvae_options_set(o, "config", "small"));
    ck_assert_ok(klvae_options_set(o, "tile_size", "100"));
    klvae_model_t *m = NULL;
    ck_assert_status(klvae_model_create(o, &m), KLVAE_ERR_OPTION);
    ck_assert_error_mentions("tile_size 100 is not a multiple of the model's downsampling factor 8");
    ck_assert_ptr_null(m);
    /* an overlap whose tiles do not cover the image: refused, nothing run */
    ck_assert_ok(klvae_options_set(o, "tile_size", "64"));
    ck_assert_ok(klvae_options_set(o, "tile_overlap", "0.3"));
    ck_assert_ok(klvae_options_set(o, "tiling", "blend"));
    ck_assert_ok(klvae_model_create(o, &m));
    float *z = test_alloc((size_t)4 * 16 * 16), *img = test_alloc((size_t)3 * 128 * 128);
    ck_assert_status(klvae_decode(m, z, 1, 16, 16, img), KLVAE_ERR_OPTION);
    ck_assert_error_mentions("tile_overlap 0.3");
    klvae_model_free(m);
    klvae_options_free(o);
    free(z), free(img);
}
END_TEST

/* ---- blend tiling against diffusers ---- */

static klvae_model_t *blend_model(void)
{
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    ck_assert_ok(klvae_options_set(o, "tiling", "blend"));
    ck_assert_ok(klvae_options_set(o, "tile_size", "32"));
    ck_assert_ok(klvae_options_set(o, "tile_overlap", "0.25"));
    klvae_model_t *m = NULL;
    ck_assert_ok(klvae_model_load("fixtures/latent16/diffusers", o, &m));
    klvae_options_free(o);
    return m;
}

START_TEST(blend_decode_matches_diffusers_tiled_decode)
{
    const char *io = "fixtures/blend/io.safetensors";
    int zs[4], ds[4];
    float *z = test_load_fixture_tensor(io, "z", zs);
    float *expect = test_load_fixture_tensor(io, "decoded_tiled", ds);
    const size_t n = (size_t)ds[0] * ds[1] * ds[2] * ds[3];
    float *out = test_alloc(n), *exact = test_alloc(n);
    klvae_model_t *m = blend_model();
    ck_assert_ok(klvae_decode(m, z, zs[0], zs[2], zs[3], out));
    assert_plan_starts(m, "blend: tiles of 32 pixels");
    double err = test_max_abs_diff(out, expect, n);
    ck_assert_msg(err <= PARITY_TOLERANCE, "max abs error %g against diffusers", err);
    /* and it is not the untiled picture: the seams */
    m->infer.blend = false;
    ck_assert_ok(klvae_decode(m, z, zs[0], zs[2], zs[3], exact));
    ck_assert_double_gt(test_max_abs_diff(out, exact, n), 100 * PARITY_TOLERANCE);
    klvae_model_free(m);
    free(z), free(expect), free(out), free(exact);
}
END_TEST

START_TEST(blend_encode_matches_diffusers_tiled_encode)
{
    const char *io = "fixtures/blend/io.safetensors";
    int xs[4], ms[4], ls[4];
    float *x = test_load_fixture_tensor(io, "x", xs);
    float *mean = test_load_fixture_tensor(io, "mean_tiled", ms);
    float *logvar = test_load_fixture_tensor(io, "logvar_tiled", ls);
    const size_t n = (size_t)ms[0] * ms[1] * ms[2] * ms[3];
    float *mu = test_alloc(n), *lv = test_alloc(n);
    klvae_model_t *m = blend_model();
    ck_assert_ok(klvae_encode(m, x, xs[0], xs[2], xs[3], mu, lv));
    double e_mean = test_max_abs_diff(mu, mean, n), e_logvar = test_max_abs_diff(lv, logvar, n);
    ck_assert_msg(e_mean <= PARITY_TOLERANCE && e_logvar <= PARITY_TOLERANCE,
                  "max abs error %g (mean), %g (logvar) against diffusers", e_mean, e_logvar);
    klvae_model_free(m);
    free(x), free(mean), free(logvar), free(mu), free(lv);
}
END_TEST

Suite *suite_stream(void)
{
    Suite *s = suite_create("stream");
    TCase *exact = tcase_create("exact");
    tcase_set_timeout(exact, 300);
    const int cases = (int)KV_ARRAY_LEN(model_cases);
    tcase_add_loop_test(exact, streamed_decode_matches_untiled, 0, cases);
    tcase_add_loop_test(exact, streamed_encode_matches_untiled, 0, cases);
    tcase_add_test(exact, whole_bands_are_the_untiled_forward_bit_for_bit);
    tcase_add_test(exact, streamed_forward_holds_what_it_planned_within_the_limit);
    tcase_add_test(exact, a_backend_without_host_memory_streams_through_staging);
    suite_add_tcase(s, exact);
    TCase *limit = tcase_create("limit");
    tcase_set_timeout(limit, 120);
    tcase_add_test(limit, a_limit_too_small_names_the_least_that_works);
    tcase_add_test(limit, the_spill_file_is_used_and_removed);
    tcase_add_test(limit, a_spill_file_that_cannot_grow_is_an_error_that_leaves_nothing);
    tcase_add_test(limit, memory_limit_reads_sizes_and_the_model_reports_it);
    tcase_add_test(limit, tile_options_are_checked);
    suite_add_tcase(s, limit);
    TCase *blend = tcase_create("blend");
    tcase_add_test(blend, blend_decode_matches_diffusers_tiled_decode);
    tcase_add_test(blend, blend_encode_matches_diffusers_tiled_encode);
    suite_add_tcase(s, blend);
    return s;
}
