/* test_model.c — whole-model encode and decode against diffusers fixtures
 * (tools/make_fixtures.py) in every file layout, plus the model-level
 * properties: thread-count and batch independence, save/load round trips,
 * seeded creation. The architecture doc's bound: max abs error <= 1e-4 on
 * mean, logvar and decoded images. */
#include <unistd.h>

#include "formats/safetensors.h"
#include "test_util.h"

#define PARITY_TOLERANCE 1e-4

typedef struct fixture_case {
    const char *config;
    const char *file; /* inside fixtures/<config>/ */
} fixture_case;

static const fixture_case fixture_cases[] = {
    {"latent16", "diffusers"},         {"latent16", "legacy.safetensors"},
    {"latent16", "compvis.safetensors"}, {"latent16", "fp16.safetensors"},
    {"latent16", "bf16.safetensors"},  {"noquant", "diffusers"},
    {"noquant", "legacy.safetensors"}, {"noquant", "compvis.safetensors"},
    {"noquant", "fp16.safetensors"},   {"noattn", "diffusers"},
    {"noattn", "legacy.safetensors"},  {"noattn", "compvis.safetensors"},
    {"noattn", "fp16.safetensors"},    {"gelu", "diffusers"},
    {"gelu", "legacy.safetensors"},    {"gelu", "compvis.safetensors"},
    {"gelu", "fp16.safetensors"},
};

/* What a single file cannot show, as the fixture configs have it. */
static const struct {
    const char *config, *groups, *act;
} file_options[] = {
    {"latent16", "8", "silu"}, {"noquant", "4", "silu"}, {"noattn", "4", "silu"}, {"gelu", "8", "gelu"},
};

static klvae_model_t *load_fixture(const fixture_case *fc, int threads)
{
    char path[256];
    snprintf(path, sizeof path, "fixtures/%s/%s", fc->config, fc->file);
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    if (strcmp(fc->file, "diffusers") != 0) {
        for (size_t i = 0; i < sizeof file_options / sizeof file_options[0]; i++)
            if (strcmp(file_options[i].config, fc->config) == 0) {
                ck_assert_ok(klvae_options_set(o, "norm_num_groups", file_options[i].groups));
                ck_assert_ok(klvae_options_set(o, "act_fn", file_options[i].act));
            }
    }
    if (threads > 0) {
        char text[8];
        snprintf(text, sizeof text, "%d", threads);
        ck_assert_ok(klvae_options_set(o, "threads", text));
    }
    klvae_model_t *m = NULL;
    ck_assert_ok(klvae_model_load(path, o, &m));
    klvae_options_free(o);
    return m;
}

typedef struct fixture_io {
    int xs[4], ms[4], ds[4];
    float *x, *mean, *logvar, *decoded;
} fixture_io;

static fixture_io load_io(const char *config)
{
    char path[256];
    fixture_io io;
    int ls[4];
    snprintf(path, sizeof path, "fixtures/%s/io.safetensors", config);
    io.x = test_load_fixture_tensor(path, "x", io.xs);
    io.mean = test_load_fixture_tensor(path, "mean", io.ms);
    io.logvar = test_load_fixture_tensor(path, "logvar", ls);
    io.decoded = test_load_fixture_tensor(path, "decoded", io.ds);
    return io;
}

static void free_io(fixture_io *io)
{
    free(io->x), free(io->mean), free(io->logvar), free(io->decoded);
}

static size_t count4(const int s[4])
{
    return (size_t)s[0] * s[1] * s[2] * s[3];
}

START_TEST(encode_and_decode_match_diffusers)
{
    const fixture_case *fc = &fixture_cases[_i];
    klvae_model_t *m = load_fixture(fc, 0);
    fixture_io io = load_io(fc->config);
    ck_assert_int_eq(klvae_model_latent_channels(m), io.ms[1]);
    ck_assert_int_eq(klvae_model_downsampling_factor(m), io.xs[2] / io.ms[2]);
    size_t nm = count4(io.ms), nd = count4(io.ds);
    float *mean = test_alloc(nm), *logvar = test_alloc(nm), *decoded = test_alloc(nd);
    ck_assert_ok(klvae_encode(m, io.x, io.xs[0], io.xs[2], io.xs[3], mean, logvar));
    ck_assert_ok(klvae_decode(m, io.mean, io.ms[0], io.ms[2], io.ms[3], decoded));
    double e_mean = test_max_abs_diff(mean, io.mean, nm);
    double e_logvar = test_max_abs_diff(logvar, io.logvar, nm);
    double e_dec = test_max_abs_diff(decoded, io.decoded, nd);
    ck_assert_msg(e_mean <= PARITY_TOLERANCE && e_logvar <= PARITY_TOLERANCE &&
                      e_dec <= PARITY_TOLERANCE,
                  "%s/%s: max abs error mean %g logvar %g decoded %g", fc->config, fc->file,
                  e_mean, e_logvar, e_dec);
    free(mean), free(logvar), free(decoded);
    free_io(&io);
    klvae_model_free(m);
}
END_TEST

START_TEST(thread_count_changes_no_bit)
{
    const fixture_case fc = {"latent16", "diffusers"};
    klvae_model_t *one = load_fixture(&fc, 1), *two = load_fixture(&fc, 2);
    fixture_io io = load_io(fc.config);
    size_t nm = count4(io.ms), nd = count4(io.ds);
    float *m1 = test_alloc(nm), *m2 = test_alloc(nm), *d1 = test_alloc(nd), *d2 = test_alloc(nd);
    ck_assert_ok(klvae_encode(one, io.x, io.xs[0], io.xs[2], io.xs[3], m1, NULL));
    ck_assert_ok(klvae_encode(two, io.x, io.xs[0], io.xs[2], io.xs[3], m2, NULL));
    ck_assert_ok(klvae_decode(one, io.mean, io.ms[0], io.ms[2], io.ms[3], d1));
    ck_assert_ok(klvae_decode(two, io.mean, io.ms[0], io.ms[2], io.ms[3], d2));
    ck_assert_int_eq(memcmp(m1, m2, nm * sizeof(float)), 0);
    ck_assert_int_eq(memcmp(d1, d2, nd * sizeof(float)), 0);
    free(m1), free(m2), free(d1), free(d2);
    free_io(&io);
    klvae_model_free(one);
    klvae_model_free(two);
}
END_TEST

START_TEST(batch_items_are_independent)
{
    const fixture_case fc = {"noquant", "diffusers"};
    klvae_model_t *m = load_fixture(&fc, 2);
    fixture_io io = load_io(fc.config);
    size_t nm = count4(io.ms), nd = count4(io.ds), per_m = nm / 2, per_x = count4(io.xs) / 2,
           per_d = nd / 2;
    float *batch = test_alloc(nm), *single = test_alloc(per_m);
    float *dbatch = test_alloc(nd), *dsingle = test_alloc(per_d);
    ck_assert_ok(klvae_encode(m, io.x, 2, io.xs[2], io.xs[3], batch, NULL));
    ck_assert_ok(klvae_encode(m, io.x + per_x, 1, io.xs[2], io.xs[3], single, NULL));
    ck_assert_int_eq(memcmp(batch + per_m, single, per_m * sizeof(float)), 0);
    ck_assert_ok(klvae_decode(m, io.mean, 2, io.ms[2], io.ms[3], dbatch));
    ck_assert_ok(klvae_decode(m, io.mean + per_m, 1, io.ms[2], io.ms[3], dsingle));
    ck_assert_int_eq(memcmp(dbatch + per_d, dsingle, per_d * sizeof(float)), 0);
    free(batch), free(single), free(dbatch), free(dsingle);
    free_io(&io);
    klvae_model_free(m);
}
END_TEST

START_TEST(logvar_may_be_null)
{
    const fixture_case fc = {"noattn", "diffusers"};
    klvae_model_t *m = load_fixture(&fc, 0);
    fixture_io io = load_io(fc.config);
    size_t nm = count4(io.ms);
    float *mean = test_alloc(nm);
    ck_assert_ok(klvae_encode(m, io.x, io.xs[0], io.xs[2], io.xs[3], mean, NULL));
    ck_assert_double_le(test_max_abs_diff(mean, io.mean, nm), PARITY_TOLERANCE);
    free(mean);
    free_io(&io);
    klvae_model_free(m);
}
END_TEST

START_TEST(queries_describe_the_loaded_config)
{
    const fixture_case fc = {"latent16", "diffusers"};
    klvae_model_t *m = load_fixture(&fc, 0);
    ck_assert_int_eq(klvae_model_in_channels(m), 3);
    ck_assert_int_eq(klvae_model_out_channels(m), 3);
    ck_assert_int_eq(klvae_model_latent_channels(m), 16);
    ck_assert_int_eq(klvae_model_downsampling_factor(m), 4);
    ck_assert_float_eq(klvae_model_scaling_factor(m), 1.5305f);
    ck_assert_float_eq(klvae_model_shift_factor(m), 0.0609f);
    ck_assert_str_eq(klvae_model_backend(m), "cpu");
    char buf[64];
    ck_assert_ok(klvae_model_get(m, "block_out_channels", buf, sizeof buf));
    ck_assert_str_eq(buf, "16,32,32");
    ck_assert_ok(klvae_model_get(m, "norm_num_groups", buf, sizeof buf));
    ck_assert_str_eq(buf, "8");
    ck_assert_ok(klvae_model_get(m, "backend", buf, sizeof buf));
    ck_assert_str_eq(buf, "cpu");
    /* The parameter count equals the element count of the weights file. */
    kv_safetensors st;
    ck_assert_ok(kv_st_open("fixtures/latent16/diffusers/diffusion_pytorch_model.safetensors", &st));
    int64_t total = 0;
    for (size_t i = 0; i < st.count; i++)
        total += (int64_t)kv_st_numel(&st.tensors[i]);
    kv_st_close(&st);
    ck_assert_int_eq(klvae_model_parameter_count(m), total);
    klvae_model_free(m);
}
END_TEST

START_TEST(single_file_config_defaults_and_overrides)
{
    /* Without options a single file gets the SD values for what shapes
     * cannot show; options replace them. */
    klvae_model_t *m = NULL;
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    ck_assert_ok(klvae_options_set(o, "norm_num_groups", "4"));
    ck_assert_ok(klvae_model_load("fixtures/noattn/compvis.safetensors", o, &m));
    ck_assert_float_eq(klvae_model_scaling_factor(m), 0.18215f);
    ck_assert_float_eq(klvae_model_shift_factor(m), 0.0f);
    char buf[32];
    ck_assert_ok(klvae_model_get(m, "shift_factor", buf, sizeof buf));
    ck_assert_str_eq(buf, "none");
    ck_assert_ok(klvae_model_get(m, "mid_block_add_attention", buf, sizeof buf));
    ck_assert_str_eq(buf, "false");
    ck_assert_ok(klvae_model_get(m, "layers_per_block", buf, sizeof buf));
    ck_assert_str_eq(buf, "2");
    klvae_model_free(m);
    ck_assert_ok(klvae_options_set(o, "scaling_factor", "0.13025"));
    ck_assert_ok(klvae_options_set(o, "shift_factor", "0.5"));
    ck_assert_ok(klvae_model_load("fixtures/noattn/compvis.safetensors", o, &m));
    ck_assert_float_eq(klvae_model_scaling_factor(m), 0.13025f);
    ck_assert_float_eq(klvae_model_shift_factor(m), 0.5f);
    klvae_model_free(m);
    klvae_options_free(o);
}
END_TEST

START_TEST(save_then_load_gives_identical_outputs)
{
    const fixture_case fc = {"latent16", "compvis.safetensors"};
    klvae_model_t *m = load_fixture(&fc, 0);
    char *dir = test_tmpdir();
    char folder[4200];
    snprintf(folder, sizeof folder, "%s/saved", dir);
    ck_assert_ok(klvae_model_save(m, folder));
    klvae_model_t *back = NULL;
    ck_assert_ok(klvae_model_load(folder, NULL, &back));
    char a[64], b[64];
    const char *keys[] = {"block_out_channels", "latent_channels", "norm_num_groups", "act_fn",
                          "use_quant_conv", "mid_block_add_attention", "scaling_factor"};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        ck_assert_ok(klvae_model_get(m, keys[i], a, sizeof a));
        ck_assert_ok(klvae_model_get(back, keys[i], b, sizeof b));
        ck_assert_str_eq(a, b);
    }
    fixture_io io = load_io(fc.config);
    size_t nm = count4(io.ms), nd = count4(io.ds);
    float *m1 = test_alloc(nm), *m2 = test_alloc(nm), *d1 = test_alloc(nd), *d2 = test_alloc(nd);
    ck_assert_ok(klvae_encode(m, io.x, io.xs[0], io.xs[2], io.xs[3], m1, NULL));
    ck_assert_ok(klvae_encode(back, io.x, io.xs[0], io.xs[2], io.xs[3], m2, NULL));
    ck_assert_ok(klvae_decode(m, io.mean, io.ms[0], io.ms[2], io.ms[3], d1));
    ck_assert_ok(klvae_decode(back, io.mean, io.ms[0], io.ms[2], io.ms[3], d2));
    ck_assert_int_eq(memcmp(m1, m2, nm * sizeof(float)), 0);
    ck_assert_int_eq(memcmp(d1, d2, nd * sizeof(float)), 0);
    free(m1), free(m2), free(d1), free(d2);
    free_io(&io);
    klvae_model_free(back);
    klvae_model_free(m);
    test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(saved_config_keeps_unknown_keys)
{
    /* Keys libklvae does not interpret (latents_mean, force_upcast, ...)
     * survive load and save. */
    char *dir = test_tmpdir();
    char src[4200], dst[4200], path[4300];
    snprintf(src, sizeof src, "%s/src", dir);
    snprintf(dst, sizeof dst, "%s/dst", dir);
    klvae_model_t *m = NULL;
    ck_assert_ok(klvae_model_load("fixtures/gelu/diffusers", NULL, &m));
    ck_assert_ok(klvae_model_save(m, src));
    klvae_model_free(m);
    snprintf(path, sizeof path, "%s/config.json", src);
    FILE *fp = fopen(path, "w");
    ck_assert_ptr_nonnull(fp);
    fputs("{\"_class_name\": \"AutoencoderKL\", \"block_out_channels\": [8, 16],"
          " \"down_block_types\": [\"DownEncoderBlock2D\", \"DownEncoderBlock2D\"],"
          " \"up_block_types\": [\"UpDecoderBlock2D\", \"UpDecoderBlock2D\"],"
          " \"norm_num_groups\": 8, \"act_fn\": \"gelu\","
          " \"latents_mean\": [0.5, -0.25, 1.0, 2.0], \"force_upcast\": false,"
          " \"my_note\": \"kept\"}",
          fp);
    fclose(fp);
    ck_assert_ok(klvae_model_load(src, NULL, &m));
    ck_assert_ok(klvae_model_save(m, dst));
    klvae_model_free(m);
    snprintf(path, sizeof path, "%s/config.json", dst);
    char *text = NULL;
    fp = fopen(path, "r");
    ck_assert_ptr_nonnull(fp);
    text = calloc(1, 1 << 16);
    ck_assert_uint_gt(fread(text, 1, (1 << 16) - 1, fp), 0);
    fclose(fp);
    ck_assert_ptr_nonnull(strstr(text, "\"my_note\": \"kept\""));
    ck_assert_ptr_nonnull(strstr(text, "\"force_upcast\": false"));
    ck_assert_ptr_nonnull(strstr(text, "-0.25"));
    /* class defaults filled in for the keys the file left out */
    ck_assert_ptr_nonnull(strstr(text, "\"layers_per_block\": 1"));
    ck_assert_ptr_nonnull(strstr(text, "\"latent_channels\": 4"));
    ck_assert_ptr_nonnull(strstr(text, "\"scaling_factor\": 0.18215"));
    free(text);
    test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(create_is_seeded_and_follows_pytorch_init)
{
    klvae_model_t *a = test_tiny_model(0), *b = test_tiny_model(0);
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    ck_assert_ok(klvae_options_set(o, "config", "tiny"));
    ck_assert_ok(klvae_options_set(o, "seed", "8"));
    klvae_model_t *c = NULL;
    ck_assert_ok(klvae_model_create(o, &c));
    klvae_options_free(o);
    char *dir = test_tmpdir();
    char pa[4200], pb[4200], pc[4200];
    snprintf(pa, sizeof pa, "%s/a", dir);
    snprintf(pb, sizeof pb, "%s/b", dir);
    snprintf(pc, sizeof pc, "%s/c", dir);
    ck_assert_ok(klvae_model_save(a, pa));
    ck_assert_ok(klvae_model_save(b, pb));
    ck_assert_ok(klvae_model_save(c, pc));
    kv_safetensors sa, sb, sc;
    strcat(pa, "/diffusion_pytorch_model.safetensors");
    strcat(pb, "/diffusion_pytorch_model.safetensors");
    strcat(pc, "/diffusion_pytorch_model.safetensors");
    ck_assert_ok(kv_st_open(pa, &sa));
    ck_assert_ok(kv_st_open(pb, &sb));
    ck_assert_ok(kv_st_open(pc, &sc));
    int differing = 0;
    for (size_t i = 0; i < sa.count; i++) {
        const kv_st_tensor *t = &sa.tensors[i];
        size_t n = kv_st_numel(t);
        float *va = test_alloc(n), *vb = test_alloc(n), *vc = test_alloc(n);
        ck_assert_ok(kv_st_read_f32(&sa, t, va));
        ck_assert_ok(kv_st_read_f32(&sb, kv_st_find(&sb, t->name), vb));
        ck_assert_ok(kv_st_read_f32(&sc, kv_st_find(&sc, t->name), vc));
        ck_assert_int_eq(memcmp(va, vb, n * sizeof(float)), 0); /* same seed */
        differing += memcmp(va, vc, n * sizeof(float)) != 0;
        bool norm = strstr(t->name, "norm") != NULL;
        if (norm) {
            float want = strstr(t->name, ".weight") ? 1.0f : 0.0f;
            for (size_t e = 0; e < n; e++)
                ck_assert_float_eq(va[e], want);
        } else {
            /* Uniform in +-1/sqrt(fan_in): fan_in from the weight's shape. */
            char wname[160];
            snprintf(wname, sizeof wname, "%s", t->name);
            char *dot = strrchr(wname, '.');
            strcpy(dot, ".weight");
            const kv_st_tensor *wt = kv_st_find(&sa, wname);
            ck_assert_ptr_nonnull(wt);
            int64_t fan_in = wt->shape[1] * (wt->ndim == 4 ? wt->shape[2] * wt->shape[3] : 1);
            double bound = 1.0 / sqrt((double)fan_in), sum = 0, sumsq = 0;
            for (size_t e = 0; e < n; e++) {
                ck_assert_double_le(fabs(va[e]), bound);
                sum += va[e];
                sumsq += (double)va[e] * va[e];
            }
            if (n >= 1000) { /* mean 0, variance bound^2 / 3 */
                ck_assert_double_lt(fabs(sum / n), 0.1 * bound);
                ck_assert_double_lt(fabs(sumsq / n / (bound * bound / 3.0) - 1.0), 0.1);
            }
        }
        free(va), free(vb), free(vc);
    }
    ck_assert_int_gt(differing, (int)sa.count / 3);
    kv_st_close(&sa), kv_st_close(&sb), kv_st_close(&sc);
    klvae_model_free(a), klvae_model_free(b), klvae_model_free(c);
    test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(sd_config_has_the_published_parameter_count)
{
    klvae_model_t *m = NULL;
    ck_assert_ok(klvae_model_create(NULL, &m)); /* config sd */
    ck_assert_int_eq(klvae_model_parameter_count(m), 83653863);
    ck_assert_int_eq(klvae_model_downsampling_factor(m), 8);
    ck_assert_int_eq(klvae_model_latent_channels(m), 4);
    klvae_model_free(m);
}
END_TEST

Suite *suite_model(void)
{
    Suite *s = suite_create("model");
    TCase *tc = tcase_create("fixtures");
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, encode_and_decode_match_diffusers, 0,
                        (int)(sizeof fixture_cases / sizeof fixture_cases[0]));
    tcase_add_test(tc, thread_count_changes_no_bit);
    tcase_add_test(tc, batch_items_are_independent);
    tcase_add_test(tc, logvar_may_be_null);
    tcase_add_test(tc, queries_describe_the_loaded_config);
    tcase_add_test(tc, single_file_config_defaults_and_overrides);
    tcase_add_test(tc, save_then_load_gives_identical_outputs);
    tcase_add_test(tc, saved_config_keeps_unknown_keys);
    suite_add_tcase(s, tc);
    TCase *tc2 = tcase_create("create");
    tcase_set_timeout(tc2, 120);
    tcase_add_test(tc2, create_is_seeded_and_follows_pytorch_init);
    tcase_add_test(tc2, sd_config_has_the_published_parameter_count);
    suite_add_tcase(s, tc2);
    return s;
}
