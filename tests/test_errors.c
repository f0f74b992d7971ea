/* test_errors.c — bad inputs to the public API: every one gets its own
 * test, which checks the exact status, that the message names what was
 * wrong, that outputs are NULL and nothing is left on disk. */
#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include "formats/safetensors.h"
#include "test_util.h"

#define NOATTN_LEGACY "fixtures/noattn/legacy.safetensors"
#define NOATTN_FOLDER "fixtures/noattn/diffusers"
#define NOATTN_WEIGHTS NOATTN_FOLDER "/diffusion_pytorch_model.safetensors"

/* ---- helpers ---- */

static void copy_file(const char *from, const char *to)
{
    size_t len;
    unsigned char *buf = test_read_file(from, &len);
    test_write_file(to, buf, len);
    free(buf);
}

/* A safetensors file: 8-byte length, header, then data bytes (may be NULL
 * for zeros). */
static void write_st_bytes(const char *path, const char *header, const void *data, size_t len)
{
    size_t hlen = strlen(header);
    unsigned char *buf = calloc(8 + hlen + len + 1, 1);
    ck_assert_ptr_nonnull(buf);
    for (int i = 0; i < 8; i++)
        buf[i] = (unsigned char)((uint64_t)hlen >> (8 * i));
    memcpy(buf + 8, header, hlen);
    if (data && len)
        memcpy(buf + 8 + hlen, data, len);
    test_write_file(path, buf, 8 + hlen + len);
    free(buf);
}

static int sentinel_object;
#define SENTINEL ((void *)&sentinel_object)

/* Loads path expecting status; checks that *out came back NULL. */
static void expect_load_failure(const char *path, const klvae_options_t *opts,
                                klvae_status_t expected)
{
    klvae_model_t *m = SENTINEL;
    klvae_status_t st = klvae_model_load(path, opts, &m);
    klvae_model_t *got = m;
    if (st == KLVAE_OK && m != NULL && m != SENTINEL)
        klvae_model_free(m); /* no leak when the library wrongly succeeds */
    ck_assert_msg(st == expected, "klvae_model_load(%s) returned %d (%s), expected %d (%s): %s",
                  path, (int)st, klvae_status_string(st), (int)expected,
                  klvae_status_string(expected), klvae_last_error());
    ck_assert_msg(got == NULL, "klvae_model_load failed but *out is %p, not NULL", (void *)got);
}

/* Options for the noattn single files (norm_num_groups cannot be seen in
 * the shapes). */
static klvae_options_t *noattn_options(void)
{
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    ck_assert_ok(klvae_options_set(o, "norm_num_groups", "4"));
    ck_assert_ok(klvae_options_set(o, "threads", "1"));
    return o;
}

/* Rewrites a fixture single file as float32 through kv_st_write, leaving
 * out tensor skip (may be NULL) and giving tensor reshape (may be NULL) a
 * new shape filled with random values. Both must exist in the source. */
typedef struct rewrite_ctx {
    float **data;
    size_t *numel;
} rewrite_ctx;

static klvae_status_t rewrite_fetch(void *ctx, size_t index, float *dst)
{
    rewrite_ctx *c = ctx;
    if (c->numel[index])
        memcpy(dst, c->data[index], c->numel[index] * sizeof(float));
    return KLVAE_OK;
}

static void rewrite_fixture(const char *src, const char *dst, const char *skip,
                            const char *reshape, int ndim, const int64_t *shape)
{
    kv_safetensors st;
    ck_assert_ok(kv_st_open(src, &st));
    if (skip)
        ck_assert_msg(kv_st_find(&st, skip) != NULL, "%s has no tensor %s", src, skip);
    if (reshape)
        ck_assert_msg(kv_st_find(&st, reshape) != NULL, "%s has no tensor %s", src, reshape);
    kv_st_entry *entries = calloc(st.count, sizeof *entries);
    float **data = calloc(st.count, sizeof *data);
    size_t *numel = calloc(st.count, sizeof *numel);
    ck_assert(entries && data && numel);
    size_t count = 0;
    test_rng rng = test_rng_new(99);
    for (size_t i = 0; i < st.count; i++) {
        const kv_st_tensor *t = &st.tensors[i];
        if (skip && strcmp(t->name, skip) == 0)
            continue;
        kv_st_entry *e = &entries[count];
        e->name = t->name;
        if (reshape && strcmp(t->name, reshape) == 0) {
            e->ndim = ndim;
            size_t n = 1;
            for (int d = 0; d < ndim; d++) {
                e->shape[d] = shape[d];
                n *= (size_t)shape[d];
            }
            numel[count] = n;
            data[count] = test_alloc(n);
            test_fill(data[count], n, &rng, -0.5f, 0.5f);
        } else {
            e->ndim = t->ndim;
            for (int d = 0; d < t->ndim; d++)
                e->shape[d] = t->shape[d];
            numel[count] = kv_st_numel(t);
            data[count] = test_alloc(numel[count]);
            ck_assert_ok(kv_st_read_f32(&st, t, data[count]));
        }
        count++;
    }
    rewrite_ctx ctx = {data, numel};
    ck_assert_ok(kv_st_write(dst, entries, count, NULL, 0, rewrite_fetch, &ctx, NULL));
    for (size_t i = 0; i < count; i++)
        free(data[i]);
    free(data);
    free(numel);
    free(entries);
    kv_st_close(&st);
}

/* config.json for the noattn weights, with the given JSON values for four
 * keys; noattn_config_ok() gives the true one. */
static void write_noattn_config(const char *path, const char *block_out_channels,
                                const char *down_block_types, const char *latent_channels,
                                const char *norm_num_groups)
{
    char text[2048];
    int n = snprintf(text, sizeof text,
                     "{\n"
                     "  \"_class_name\": \"AutoencoderKL\",\n"
                     "  \"_diffusers_version\": \"0.42.1\",\n"
                     "  \"act_fn\": \"silu\",\n"
                     "  \"block_out_channels\": %s,\n"
                     "  \"down_block_types\": %s,\n"
                     "  \"force_upcast\": true,\n"
                     "  \"in_channels\": 3,\n"
                     "  \"latent_channels\": %s,\n"
                     "  \"layers_per_block\": 2,\n"
                     "  \"mid_block_add_attention\": false,\n"
                     "  \"norm_num_groups\": %s,\n"
                     "  \"out_channels\": 3,\n"
                     "  \"sample_size\": 32,\n"
                     "  \"scaling_factor\": 0.18215,\n"
                     "  \"shift_factor\": null,\n"
                     "  \"up_block_types\": [\"UpDecoderBlock2D\", \"UpDecoderBlock2D\"],\n"
                     "  \"use_post_quant_conv\": true,\n"
                     "  \"use_quant_conv\": true\n"
                     "}\n",
                     block_out_channels, down_block_types, latent_channels, norm_num_groups);
    ck_assert_int_lt(n, (int)sizeof text);
    test_write_file(path, text, (size_t)n);
}

#define OK_CHANNELS "[8, 16]"
#define OK_DOWN "[\"DownEncoderBlock2D\", \"DownEncoderBlock2D\"]"
#define OK_LATENT "4"
#define OK_GROUPS "4"

/* A copy of the noattn diffusers folder under dir with a config.json made
 * from the four values. Returns the folder path. */
static char *noattn_folder(const char *dir, const char *channels, const char *down,
                           const char *latent, const char *groups)
{
    char *folder = test_join(dir, "model");
    ck_assert_int_eq(mkdir(folder, 0755), 0);
    char *weights = test_join(folder, "diffusion_pytorch_model.safetensors");
    char *config = test_join(folder, "config.json");
    copy_file(NOATTN_WEIGHTS, weights);
    write_noattn_config(config, channels, down, latent, groups);
    free(weights);
    free(config);
    return folder;
}

/* ---- malformed safetensors files ---- */

START_TEST(load_nonexistent_path_is_io)
{
    char *dir = test_tmpdir();
    char *path = test_join(dir, "no-such-model.safetensors");
    expect_load_failure(path, NULL, KLVAE_ERR_IO);
    ck_assert_error_mentions(path);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(load_empty_file_is_format)
{
    char *dir = test_tmpdir();
    char *path = test_join(dir, "empty.safetensors");
    test_write_file(path, "", 0);
    expect_load_failure(path, NULL, KLVAE_ERR_FORMAT);
    ck_assert_error_mentions(path);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(load_file_shorter_than_length_field_is_format)
{
    char *dir = test_tmpdir();
    char *path = test_join(dir, "five.safetensors");
    test_write_file(path, "\x10\0\0\0\0", 5);
    expect_load_failure(path, NULL, KLVAE_ERR_FORMAT);
    ck_assert_error_mentions(path);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(load_truncated_fixture_is_format)
{
    size_t len;
    unsigned char *buf = test_read_file(NOATTN_LEGACY, &len);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = (hlen << 8) | buf[i];
    size_t keep = 8 + (size_t)hlen + 1000; /* the whole header, a little data */
    ck_assert_uint_lt(keep, len);
    char *dir = test_tmpdir();
    char *path = test_join(dir, "truncated.safetensors");
    test_write_file(path, buf, keep);
    klvae_options_t *o = noattn_options();
    expect_load_failure(path, o, KLVAE_ERR_FORMAT);
    ck_assert_error_mentions(path);
    ck_assert_error_mentions("truncated");
    ck_assert_error_mentions("tensor '");
    klvae_options_free(o);
    free(buf);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(load_header_length_past_end_is_format)
{
    char *dir = test_tmpdir();
    char *path = test_join(dir, "short.safetensors");
    unsigned char buf[8 + 30];
    memset(buf, ' ', sizeof buf);
    buf[0] = 0xE8; /* 1000 */
    buf[1] = 0x03;
    for (int i = 2; i < 8; i++)
        buf[i] = 0;
    buf[8] = '{';
    buf[9] = '}';
    test_write_file(path, buf, sizeof buf);
    expect_load_failure(path, NULL, KLVAE_ERR_FORMAT);
    ck_assert_error_mentions(path);
    ck_assert_error_mentions("1000");
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(load_header_length_over_limit_is_format)
{
    /* A sparse file large enough to hold the claimed header, so that only
     * the 100,000,000-byte limit can reject it. */
    char *dir = test_tmpdir();
    char *path = test_join(dir, "huge-header.safetensors");
    const uint64_t hlen = 100000001u;
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ck_assert_int_ge(fd, 0);
    unsigned char head[10];
    for (int i = 0; i < 8; i++)
        head[i] = (unsigned char)(hlen >> (8 * i));
    head[8] = '{';
    head[9] = '}';
    ck_assert_int_eq(write(fd, head, sizeof head), (ssize_t)sizeof head);
    ck_assert_int_eq(ftruncate(fd, (off_t)(8 + hlen + 64)), 0);
    close(fd);
    expect_load_failure(path, NULL, KLVAE_ERR_FORMAT);
    ck_assert_error_mentions(path);
    ck_assert_error_mentions("100000001");
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(load_header_far_larger_than_its_data_is_format)
{
    /* Under the format's limit, but 99,999,999 header bytes for 64 bytes of
     * data: refused from the length field, before the header is read. */
    char *dir = test_tmpdir();
    char *path = test_join(dir, "bloated-header.safetensors");
    const uint64_t hlen = 99999999u;
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ck_assert_int_ge(fd, 0);
    unsigned char head[10];
    for (int i = 0; i < 8; i++)
        head[i] = (unsigned char)(hlen >> (8 * i));
    head[8] = '{';
    head[9] = '}';
    ck_assert_int_eq(write(fd, head, sizeof head), (ssize_t)sizeof head);
    ck_assert_int_eq(ftruncate(fd, (off_t)(8 + hlen + 64)), 0);
    close(fd);
    expect_load_failure(path, NULL, KLVAE_ERR_FORMAT);
    ck_assert_error_mentions(path);
    ck_assert_error_mentions("99999999 bytes but the tensor data only 64");
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(load_invalid_json_header_is_format)
{
    char *dir = test_tmpdir();
    char *path = test_join(dir, "badjson.safetensors");
    write_st_bytes(path, "{\"decoder.conv_in.weight\": {\"dtype\": \"F32\", \"shape\": [1", NULL,
                   16);
    expect_load_failure(path, NULL, KLVAE_ERR_FORMAT);
    ck_assert_error_mentions(path);
    ck_assert_error_mentions("JSON");
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(load_header_json_array_is_format)
{
    char *dir = test_tmpdir();
    char *path = test_join(dir, "array.safetensors");
    write_st_bytes(path, "[{\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 8]}]", NULL, 8);
    expect_load_failure(path, NULL, KLVAE_ERR_FORMAT);
    ck_assert_error_mentions(path);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(load_tensor_entry_not_object_is_format)
{
    char *dir = test_tmpdir();
    char *path = test_join(dir, "entry.safetensors");
    write_st_bytes(path, "{\"encoder.conv_in.weight\": [0, 8]}", NULL, 8);
    expect_load_failure(path, NULL, KLVAE_ERR_FORMAT);
    ck_assert_error_mentions("encoder.conv_in.weight");
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(load_entry_without_data_offsets_is_format)
{
    char *dir = test_tmpdir();
    char *path = test_join(dir, "nooffsets.safetensors");
    write_st_bytes(path, "{\"encoder.conv_in.bias\": {\"dtype\": \"F32\", \"shape\": [2]}}", NULL,
                   8);
    expect_load_failure(path, NULL, KLVAE_ERR_FORMAT);
    ck_assert_error_mentions(path);
    ck_assert_error_mentions("encoder.conv_in.bias");
    ck_assert_error_mentions("data_offsets");
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(load_unknown_dtype_is_format)
{
    char *dir = test_tmpdir();
    char *path = test_join(dir, "dtype.safetensors");
    write_st_bytes(path,
                   "{\"encoder.conv_in.bias\": {\"dtype\": \"F17\", \"shape\": [2], "
                   "\"data_offsets\": [0, 8]}}",
                   NULL, 8);
    expect_load_failure(path, NULL, KLVAE_ERR_FORMAT);
    ck_assert_error_mentions("F17");
    ck_assert_error_mentions("encoder.conv_in.bias");
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(load_byte_range_mismatch_is_format)
{
    /* 3 float32 elements need 12 bytes; the range holds 8. */
    char *dir = test_tmpdir();
    char *path = test_join(dir, "range.safetensors");
    write_st_bytes(path,
                   "{\"decoder.conv_out.bias\": {\"dtype\": \"F32\", \"shape\": [3], "
                   "\"data_offsets\": [0, 8]}}",
                   NULL, 12);
    expect_load_failure(path, NULL, KLVAE_ERR_FORMAT);
    ck_assert_error_mentions("decoder.conv_out.bias");
    ck_assert_error_mentions("12");
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(load_byte_count_overflow_is_format)
{
    /* The real fixture plus one extra (unused) tensor whose shape claims
     * 2^59 float32 values in an empty range: 2^59 * 32 bits wraps to 0 in
     * 64-bit arithmetic. The file is malformed and must be refused. */
    size_t len;
    unsigned char *buf = test_read_file(NOATTN_LEGACY, &len);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = (hlen << 8) | buf[i];
    ck_assert_int_eq(buf[8], '{');
    const char *extra =
        "\"zzz.bogus\":{\"dtype\":\"F32\",\"shape\":[576460752303423488],\"data_offsets\":[0,0]},";
    size_t elen = strlen(extra);
    unsigned char *out = malloc(len + elen);
    ck_assert_ptr_nonnull(out);
    uint64_t new_hlen = hlen + elen;
    for (int i = 0; i < 8; i++)
        out[i] = (unsigned char)(new_hlen >> (8 * i));
    out[8] = '{';
    memcpy(out + 9, extra, elen);
    memcpy(out + 9 + elen, buf + 9, len - 9);
    char *dir = test_tmpdir();
    char *path = test_join(dir, "overflow.safetensors");
    test_write_file(path, out, len + elen);
    free(out);
    free(buf);
    klvae_options_t *o = noattn_options();
    klvae_model_t *m = SENTINEL;
    klvae_status_t st = klvae_model_load(path, o, &m);
    char message[1024];
    snprintf(message, sizeof message, "%s", klvae_last_error());
    klvae_model_t *got = m;
    /* Clean up before asserting, so that a failure leaks nothing. */
    if (st == KLVAE_OK && m && m != SENTINEL)
        klvae_model_free(m);
    klvae_options_free(o);
    test_rmtree(dir);
    free(path);
    free(dir);
    ck_assert_msg(st == KLVAE_ERR_FORMAT, "returned %d (%s), expected %d (malformed file): %s",
                  (int)st, klvae_status_string(st), (int)KLVAE_ERR_FORMAT, message);
    ck_assert_msg(strstr(message, "zzz.bogus"), "message \"%s\" does not name zzz.bogus",
                  message);
    ck_assert_ptr_null(got);
}
END_TEST

START_TEST(load_overlapping_offsets_is_format)
{
    char *dir = test_tmpdir();
    char *path = test_join(dir, "overlap.safetensors");
    write_st_bytes(path,
                   "{\"first.tensor\": {\"dtype\": \"F32\", \"shape\": [4], "
                   "\"data_offsets\": [0, 16]}, "
                   "\"second.tensor\": {\"dtype\": \"F32\", \"shape\": [4], "
                   "\"data_offsets\": [12, 28]}}",
                   NULL, 28);
    expect_load_failure(path, NULL, KLVAE_ERR_FORMAT);
    ck_assert_error_mentions("first.tensor");
    ck_assert_error_mentions("second.tensor");
    ck_assert_error_mentions("overlap");
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(load_duplicate_keys_is_format)
{
    char *dir = test_tmpdir();
    char *path = test_join(dir, "dup.safetensors");
    write_st_bytes(path,
                   "{\"dup.tensor\": {\"dtype\": \"F32\", \"shape\": [2], "
                   "\"data_offsets\": [0, 8]}, "
                   "\"dup.tensor\": {\"dtype\": \"F32\", \"shape\": [2], "
                   "\"data_offsets\": [8, 16]}}",
                   NULL, 16);
    expect_load_failure(path, NULL, KLVAE_ERR_FORMAT);
    ck_assert_error_mentions(path);
    ck_assert_error_mentions("duplicate");
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

/* ---- weights that do not fit ---- */

START_TEST(rewritten_fixture_loads)
{
    /* Control for the next tests: the rewrite itself produces a valid file. */
    char *dir = test_tmpdir();
    char *path = test_join(dir, "same.safetensors");
    rewrite_fixture(NOATTN_LEGACY, path, NULL, NULL, 0, NULL);
    klvae_options_t *o = noattn_options();
    klvae_model_t *m = NULL;
    ck_assert_ok(klvae_model_load(path, o, &m));
    ck_assert_ptr_nonnull(m);
    ck_assert_int_eq(klvae_model_latent_channels(m), 4);
    klvae_model_free(m);
    klvae_options_free(o);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(load_missing_tensor)
{
    const char *gone = "decoder.up_blocks.1.resnets.2.norm1.weight";
    char *dir = test_tmpdir();
    char *path = test_join(dir, "missing.safetensors");
    rewrite_fixture(NOATTN_LEGACY, path, gone, NULL, 0, NULL);
    klvae_options_t *o = noattn_options();
    expect_load_failure(path, o, KLVAE_ERR_MISSING_TENSOR);
    ck_assert_error_mentions(gone);
    ck_assert_error_mentions(path);
    klvae_options_free(o);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

/* A NaN or infinity in any weights the library loads is refused with the
 * tensor's name: the model's (a folder and a single file), LPIPS' and the
 * discriminator's. */
START_TEST(weights_with_nan_are_refused)
{
    char *dir = test_tmpdir();
    char *folder = noattn_folder(dir, OK_CHANNELS, OK_DOWN, OK_LATENT, OK_GROUPS);
    char *weights = test_join(folder, "diffusion_pytorch_model.safetensors");
    test_damage_tensor(weights, "decoder.up_blocks.1.resnets.1.conv2.weight", TEST_DAMAGE_NAN);
    expect_load_failure(folder, NULL, KLVAE_ERR_NONFINITE);
    ck_assert_error_mentions("decoder.up_blocks.1.resnets.1.conv2.weight");
    ck_assert_error_mentions("non-finite");
    char *single = test_join(dir, "single.safetensors");
    copy_file(NOATTN_LEGACY, single);
    test_damage_tensor(single, "encoder.conv_in.bias", TEST_DAMAGE_NAN);
    klvae_options_t *o = noattn_options();
    expect_load_failure(single, o, KLVAE_ERR_NONFINITE);
    ck_assert_error_mentions("encoder.conv_in.bias");
    /* the trainer's networks */
    klvae_model_t *m = NULL;
    ck_assert_ok(klvae_model_load(NOATTN_LEGACY, o, &m));
    const char *files[2][3] = {
        {"fixtures/train/lpips.safetensors", "lpips_weights", "lin2.model.1.weight"},
        {"fixtures/train/disc.safetensors", "disc_weights", "main.2.weight"}};
    for (int k = 0; k < 2; k++) {
        char *copy = test_join(dir, k ? "disc.safetensors" : "lpips.safetensors");
        copy_file(files[k][0], copy);
        test_damage_tensor(copy, files[k][2], TEST_DAMAGE_NAN);
        klvae_options_t *to = NULL;
        ck_assert_ok(klvae_options_create(&to));
        ck_assert_ok(klvae_options_set(to, files[k][1], copy));
        ck_assert_ok(klvae_options_set(to, "disc_layers", "3"));
        ck_assert_ok(klvae_options_set(to, "disc_channels", "8"));
        klvae_trainer_t *t = (klvae_trainer_t *)&t;
        ck_assert_status(klvae_trainer_create(m, to, &t), KLVAE_ERR_NONFINITE);
        ck_assert_ptr_null(t);
        ck_assert_error_mentions(files[k][2]);
        klvae_options_free(to);
        free(copy);
    }
    klvae_model_free(m);
    klvae_options_free(o);
    test_rmtree(dir);
    free(single);
    free(weights);
    free(folder);
    free(dir);
}
END_TEST

START_TEST(load_wrong_shape_bias)
{
    const int64_t shape[1] = {4};
    char *dir = test_tmpdir();
    char *path = test_join(dir, "bias.safetensors");
    rewrite_fixture(NOATTN_LEGACY, path, NULL, "decoder.conv_out.bias", 1, shape);
    klvae_options_t *o = noattn_options();
    expect_load_failure(path, o, KLVAE_ERR_SHAPE);
    ck_assert_error_mentions("decoder.conv_out.bias");
    ck_assert_error_mentions("[3]"); /* expected */
    ck_assert_error_mentions("[4]"); /* found */
    klvae_options_free(o);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(load_wrong_shape_middle_conv)
{
    const int64_t shape[4] = {16, 16, 1, 1};
    const char *name = "decoder.up_blocks.0.resnets.1.conv1.weight";
    char *dir = test_tmpdir();
    char *path = test_join(dir, "conv.safetensors");
    rewrite_fixture(NOATTN_LEGACY, path, NULL, name, 4, shape);
    klvae_options_t *o = noattn_options();
    expect_load_failure(path, o, KLVAE_ERR_SHAPE);
    ck_assert_error_mentions(name);
    ck_assert_error_mentions("[16, 16, 3, 3]");
    ck_assert_error_mentions("[16, 16, 1, 1]");
    klvae_options_free(o);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

/* ---- diffusers folders ---- */

START_TEST(folder_copy_loads)
{
    /* Control: the generated config.json is right for the weights. */
    char *dir = test_tmpdir();
    char *folder = noattn_folder(dir, OK_CHANNELS, OK_DOWN, OK_LATENT, OK_GROUPS);
    klvae_model_t *m = NULL;
    ck_assert_ok(klvae_model_load(folder, NULL, &m));
    ck_assert_int_eq(klvae_model_downsampling_factor(m), 2);
    klvae_model_free(m);
    test_rmtree(dir);
    free(folder);
    free(dir);
}
END_TEST

START_TEST(folder_config_disagrees_latent_channels)
{
    char *dir = test_tmpdir();
    char *folder = noattn_folder(dir, OK_CHANNELS, OK_DOWN, "8", OK_GROUPS);
    expect_load_failure(folder, NULL, KLVAE_ERR_CONFIG);
    ck_assert_error_mentions("config.json disagrees");
    ck_assert_error_mentions("encoder.conv_out.weight");
    ck_assert_error_mentions("[8, 16, 3, 3]");  /* in the file */
    ck_assert_error_mentions("[16, 16, 3, 3]"); /* what 8 latent channels need */
    test_rmtree(dir);
    free(folder);
    free(dir);
}
END_TEST

START_TEST(folder_config_disagrees_block_out_channels)
{
    char *dir = test_tmpdir();
    char *folder = noattn_folder(dir, "[8, 32]", OK_DOWN, OK_LATENT, OK_GROUPS);
    expect_load_failure(folder, NULL, KLVAE_ERR_CONFIG);
    ck_assert_error_mentions("config.json disagrees");
    ck_assert_error_mentions("encoder.down_blocks.1.resnets.0.conv1.weight");
    test_rmtree(dir);
    free(folder);
    free(dir);
}
END_TEST

START_TEST(folder_without_config_is_io)
{
    char *dir = test_tmpdir();
    char *weights = test_join(dir, "diffusion_pytorch_model.safetensors");
    copy_file(NOATTN_WEIGHTS, weights);
    expect_load_failure(dir, NULL, KLVAE_ERR_IO);
    ck_assert_error_mentions(dir);
    ck_assert_error_mentions("config.json");
    test_rmtree(dir);
    free(weights);
    free(dir);
}
END_TEST

START_TEST(folder_without_weights_is_io)
{
    char *dir = test_tmpdir();
    char *config = test_join(dir, "config.json");
    write_noattn_config(config, OK_CHANNELS, OK_DOWN, OK_LATENT, OK_GROUPS);
    expect_load_failure(dir, NULL, KLVAE_ERR_IO);
    ck_assert_error_mentions(dir);
    ck_assert_error_mentions("diffusion_pytorch_model.safetensors");
    test_rmtree(dir);
    free(config);
    free(dir);
}
END_TEST

START_TEST(folder_config_invalid_json_is_format)
{
    char *dir = test_tmpdir();
    char *folder = noattn_folder(dir, OK_CHANNELS, OK_DOWN, OK_LATENT, OK_GROUPS);
    char *config = test_join(folder, "config.json");
    const char *bad = "{\n  \"latent_channels\": 4,\n  \"block_out_channels\": [8, 16\n}\n";
    test_write_file(config, bad, strlen(bad));
    expect_load_failure(folder, NULL, KLVAE_ERR_FORMAT);
    ck_assert_error_mentions(config);
    ck_assert_error_mentions("JSON");
    test_rmtree(dir);
    free(config);
    free(folder);
    free(dir);
}
END_TEST

START_TEST(folder_config_cross_attn_block_is_config)
{
    char *dir = test_tmpdir();
    char *folder = noattn_folder(dir, OK_CHANNELS,
                                 "[\"DownEncoderBlock2D\", \"CrossAttnDownBlock2D\"]", OK_LATENT,
                                 OK_GROUPS);
    expect_load_failure(folder, NULL, KLVAE_ERR_CONFIG);
    ck_assert_error_mentions("down_block_types");
    ck_assert_error_mentions("CrossAttnDownBlock2D");
    ck_assert_error_mentions("config.json");
    test_rmtree(dir);
    free(folder);
    free(dir);
}
END_TEST

START_TEST(folder_config_indivisible_channels_is_config)
{
    char *dir = test_tmpdir();
    char *folder = noattn_folder(dir, "[8, 18]", OK_DOWN, OK_LATENT, OK_GROUPS);
    expect_load_failure(folder, NULL, KLVAE_ERR_CONFIG);
    ck_assert_error_mentions("block_out_channels");
    ck_assert_error_mentions("18");
    ck_assert_error_mentions("norm_num_groups");
    ck_assert_error_mentions("config.json");
    test_rmtree(dir);
    free(folder);
    free(dir);
}
END_TEST

START_TEST(folder_config_string_for_int_is_config)
{
    char *dir = test_tmpdir();
    char *folder = noattn_folder(dir, OK_CHANNELS, OK_DOWN, "\"4\"", OK_GROUPS);
    expect_load_failure(folder, NULL, KLVAE_ERR_CONFIG);
    ck_assert_error_mentions("latent_channels");
    ck_assert_error_mentions("config.json");
    test_rmtree(dir);
    free(folder);
    free(dir);
}
END_TEST

/* A copy of fixture folder src under dir whose config.json has the text
 * from replaced by to. Returns the folder path. */
static char *edited_folder(const char *dir, const char *src, const char *from, const char *to)
{
    char *folder = test_join(dir, "model");
    ck_assert_int_eq(mkdir(folder, 0755), 0);
    char *src_weights = test_join(src, "diffusion_pytorch_model.safetensors");
    char *src_config = test_join(src, "config.json");
    char *weights = test_join(folder, "diffusion_pytorch_model.safetensors");
    char *config = test_join(folder, "config.json");
    copy_file(src_weights, weights);
    size_t len;
    char *text = (char *)test_read_file(src_config, &len);
    char *at = strstr(text, from);
    ck_assert_msg(at != NULL, "%s has no '%s'", src_config, from);
    char *edited = malloc(len + strlen(to) + 1);
    ck_assert_ptr_nonnull(edited);
    int n = sprintf(edited, "%.*s%s%s", (int)(at - text), text, to, at + strlen(from));
    test_write_file(config, edited, (size_t)n);
    free(edited);
    free(text);
    free(src_weights);
    free(src_config);
    free(weights);
    free(config);
    return folder;
}

/* config.json turns off a part whose weights the file has: the load used to
 * ignore those tensors and compute without them (found by
 * tests/fuzz/fuzz_config.c). */
static void expect_config_disowns_weights(const char *src, const char *from, const char *to,
                                          const char *key)
{
    char *dir = test_tmpdir();
    char *folder = edited_folder(dir, src, from, to);
    expect_load_failure(folder, NULL, KLVAE_ERR_CONFIG);
    ck_assert_error_mentions("config.json disagrees with the weights");
    ck_assert_error_mentions(key);
    ck_assert_error_mentions("diffusion_pytorch_model.safetensors");
    test_rmtree(dir);
    free(folder);
    free(dir);
}

START_TEST(folder_config_without_attention_for_attention_weights_is_config)
{
    expect_config_disowns_weights("fixtures/gelu/diffusers", "\"mid_block_add_attention\": true",
                                  "\"mid_block_add_attention\": false", "mid_block_add_attention");
}
END_TEST

START_TEST(folder_config_without_quant_conv_for_its_weights_is_config)
{
    expect_config_disowns_weights("fixtures/gelu/diffusers", "\"use_quant_conv\": true",
                                  "\"use_quant_conv\": false", "use_quant_conv");
}
END_TEST

START_TEST(folder_config_with_fewer_layers_than_the_weights_is_config)
{
    expect_config_disowns_weights(NOATTN_FOLDER, "\"layers_per_block\": 2",
                                  "\"layers_per_block\": 1", "layers_per_block");
}
END_TEST

START_TEST(load_option_disagrees_with_model_is_config)
{
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    ck_assert_ok(klvae_options_set(o, "latent_channels", "8"));
    expect_load_failure(NOATTN_FOLDER, o, KLVAE_ERR_CONFIG);
    ck_assert_error_mentions("latent_channels");
    ck_assert_error_mentions("8");
    ck_assert_error_mentions("4");
    klvae_options_free(o);
}
END_TEST

START_TEST(load_option_disagrees_with_single_file_is_config)
{
    klvae_options_t *o = noattn_options();
    ck_assert_ok(klvae_options_set(o, "block_out_channels", "8,16,16"));
    expect_load_failure(NOATTN_LEGACY, o, KLVAE_ERR_CONFIG);
    ck_assert_error_mentions("block_out_channels");
    ck_assert_error_mentions("8,16,16");
    klvae_options_free(o);
}
END_TEST

START_TEST(load_norm_groups_option_disagrees_with_config_json_is_config)
{
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    ck_assert_ok(klvae_options_set(o, "norm_num_groups", "8"));
    expect_load_failure(NOATTN_FOLDER, o, KLVAE_ERR_CONFIG);
    ck_assert_error_mentions("norm_num_groups");
    klvae_options_free(o);
}
END_TEST

/* ---- backends ---- */

START_TEST(load_backend_cuda_unavailable)
{
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    ck_assert_ok(klvae_options_set(o, "backend", "cuda"));
    expect_load_failure(NOATTN_FOLDER, o, KLVAE_ERR_BACKEND_UNAVAILABLE);
    ck_assert_error_mentions("cuda");
    klvae_options_free(o);
}
END_TEST

START_TEST(create_backend_cuda_unavailable)
{
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    ck_assert_ok(klvae_options_set(o, "config", "tiny"));
    ck_assert_ok(klvae_options_set(o, "backend", "cuda"));
    klvae_model_t *m = SENTINEL;
    klvae_status_t st = klvae_model_create(o, &m);
    klvae_model_t *got = m;
    if (st == KLVAE_OK && m && m != SENTINEL)
        klvae_model_free(m);
    ck_assert_status(st, KLVAE_ERR_BACKEND_UNAVAILABLE);
    ck_assert_error_mentions("cuda");
    ck_assert_ptr_null(got);
    klvae_options_free(o);
}
END_TEST

START_TEST(env_backend_bad_value_is_option)
{
    const char *old = getenv("KLVAE_BACKEND");
    char *saved = old ? strdup(old) : NULL;
    setenv("KLVAE_BACKEND", "gpu", 1);
    klvae_options_t *o = NULL;
    klvae_status_t st_opts = klvae_options_create(&o);
    if (st_opts == KLVAE_OK)
        st_opts = klvae_options_set(o, "config", "tiny");
    klvae_model_t *m = SENTINEL;
    klvae_status_t st = klvae_model_create(o, &m);
    char message[1024];
    snprintf(message, sizeof message, "%s", klvae_last_error());
    klvae_model_t *got = m;
    if (st == KLVAE_OK && m && m != SENTINEL)
        klvae_model_free(m);
    /* Restore the environment before any assertion can end the test. */
    if (saved) {
        setenv("KLVAE_BACKEND", saved, 1);
        free(saved);
    } else {
        unsetenv("KLVAE_BACKEND");
    }
    klvae_options_free(o);
    ck_assert_int_eq(st_opts, KLVAE_OK);
    ck_assert_msg(st == KLVAE_ERR_OPTION, "status %d, message %s", (int)st, message);
    ck_assert_msg(strstr(message, "KLVAE_BACKEND") && strstr(message, "gpu"),
                  "message \"%s\" names neither KLVAE_BACKEND nor gpu", message);
    ck_assert_ptr_null(got);
}
END_TEST

/* ---- inference arguments ---- */

/* A fresh tiny model (downsampling factor 2, 3 -> 4 channels). */
static klvae_model_t *tiny(void)
{
    klvae_model_t *m = test_tiny_model(1);
    ck_assert_int_eq(klvae_model_downsampling_factor(m), 2);
    ck_assert_int_eq(klvae_model_in_channels(m), 3);
    ck_assert_int_eq(klvae_model_latent_channels(m), 4);
    return m;
}

static void expect_encode_rejected(int n, int h, int w, const char *mention)
{
    klvae_model_t *m = tiny();
    float *img = test_alloc(3 * 8 * 8 * 2), *mean = test_alloc(4 * 4 * 4 * 2),
          *logvar = test_alloc(4 * 4 * 4 * 2);
    ck_assert_status(klvae_encode(m, img, n, h, w, mean, logvar), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions(mention);
    free(img);
    free(mean);
    free(logvar);
    klvae_model_free(m);
}

static void expect_decode_rejected(int n, int lat_h, int lat_w, const char *mention)
{
    klvae_model_t *m = tiny();
    float *z = test_alloc(4 * 4 * 4 * 2), *img = test_alloc(3 * 8 * 8 * 2);
    ck_assert_status(klvae_decode(m, z, n, lat_h, lat_w, img), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions(mention);
    free(z);
    free(img);
    klvae_model_free(m);
}

static void expect_sample_rejected(int n, int lat_h, int lat_w, const char *mention)
{
    klvae_model_t *m = tiny();
    float *mean = test_alloc(4 * 4 * 4 * 2), *logvar = test_alloc(4 * 4 * 4 * 2),
          *z = test_alloc(4 * 4 * 4 * 2);
    ck_assert_status(klvae_sample(m, mean, logvar, n, lat_h, lat_w, 5, z),
                     KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions(mention);
    free(mean);
    free(logvar);
    free(z);
    klvae_model_free(m);
}

START_TEST(encode_height_not_multiple_of_factor)
{
    expect_encode_rejected(1, 7, 8, "factor 2");
    ck_assert_error_mentions("7 x 8");
}
END_TEST

START_TEST(encode_width_not_multiple_of_factor)
{
    expect_encode_rejected(2, 8, 5, "factor 2");
    ck_assert_error_mentions("8 x 5");
}
END_TEST

START_TEST(encode_n_zero)
{
    expect_encode_rejected(0, 8, 8, "n is 0");
}
END_TEST

START_TEST(encode_n_negative)
{
    expect_encode_rejected(-1, 8, 8, "n is -1");
}
END_TEST

START_TEST(decode_n_zero)
{
    expect_decode_rejected(0, 4, 4, "n is 0");
}
END_TEST

START_TEST(decode_n_negative)
{
    expect_decode_rejected(-1, 4, 4, "n is -1");
}
END_TEST

START_TEST(sample_n_zero)
{
    expect_sample_rejected(0, 4, 4, "n is 0");
}
END_TEST

START_TEST(sample_n_negative)
{
    expect_sample_rejected(-1, 4, 4, "n is -1");
}
END_TEST

START_TEST(encode_h_zero)
{
    expect_encode_rejected(1, 0, 8, "0 x 8");
}
END_TEST

START_TEST(encode_w_negative)
{
    expect_encode_rejected(1, 8, -2, "8 x -2");
}
END_TEST

START_TEST(decode_lat_h_negative)
{
    expect_decode_rejected(1, -4, 4, "-4 x 4");
}
END_TEST

START_TEST(decode_lat_w_zero)
{
    expect_decode_rejected(1, 4, 0, "4 x 0");
}
END_TEST

START_TEST(sample_lat_h_zero)
{
    expect_sample_rejected(1, 0, 4, "0 x 4");
}
END_TEST

START_TEST(sample_lat_w_negative)
{
    expect_sample_rejected(1, 4, -1, "4 x -1");
}
END_TEST

START_TEST(encode_int_max_sizes)
{
    expect_encode_rejected(INT_MAX, INT_MAX, INT_MAX, "2147483647 x 2147483647");
}
END_TEST

START_TEST(encode_overflowing_sizes)
{
    /* Multiples of the factor, so only the size product can be refused. */
    expect_encode_rejected(INT_MAX, 1 << 30, 1 << 30, "too large");
}
END_TEST

START_TEST(decode_overflowing_sizes)
{
    expect_decode_rejected(INT_MAX, INT_MAX, INT_MAX, "too large");
}
END_TEST

START_TEST(decode_upscaled_size_overflows_int)
{
    /* lat_h * 2 does not fit in an int although lat_h does. */
    expect_decode_rejected(1, (INT_MAX / 2) + 1, 1, "too large");
}
END_TEST

START_TEST(sample_overflowing_sizes)
{
    expect_sample_rejected(INT_MAX, INT_MAX, INT_MAX, "too large");
}
END_TEST

START_TEST(encode_mean_overlaps_images)
{
    klvae_model_t *m = tiny();
    float *buf = test_alloc(3 * 4 * 4 + 4 * 2 * 2);
    float *logvar = test_alloc(4 * 2 * 2);
    /* images: 48 floats at buf; mean: 16 floats starting inside them. */
    ck_assert_status(klvae_encode(m, buf, 1, 4, 4, buf + 40, logvar), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("overlap");
    free(buf);
    free(logvar);
    klvae_model_free(m);
}
END_TEST

START_TEST(encode_logvar_overlaps_images)
{
    klvae_model_t *m = tiny();
    float *buf = test_alloc(3 * 4 * 4);
    float *mean = test_alloc(4 * 2 * 2);
    ck_assert_status(klvae_encode(m, buf, 1, 4, 4, mean, buf + 10), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("overlap");
    free(buf);
    free(mean);
    klvae_model_free(m);
}
END_TEST

START_TEST(encode_mean_overlaps_logvar)
{
    klvae_model_t *m = tiny();
    float *img = test_alloc(3 * 4 * 4);
    float *out = test_alloc(4 * 2 * 2 + 8);
    ck_assert_status(klvae_encode(m, img, 1, 4, 4, out, out + 8), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("overlap");
    free(img);
    free(out);
    klvae_model_free(m);
}
END_TEST

START_TEST(decode_images_overlap_z)
{
    klvae_model_t *m = tiny();
    float *buf = test_alloc(3 * 4 * 4 + 15);
    /* z: 16 floats at buf; images: 48 floats from buf + 15. */
    ck_assert_status(klvae_decode(m, buf, 1, 2, 2, buf + 15), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("overlap");
    free(buf);
    klvae_model_free(m);
}
END_TEST

START_TEST(encode_logvar_null_works)
{
    klvae_model_t *m = tiny();
    const int n = 2, h = 6, w = 10;
    const size_t ni = (size_t)n * 3 * h * w, nz = (size_t)n * 4 * (h / 2) * (w / 2);
    float *img = test_alloc(ni), *mean1 = test_alloc(nz), *logvar = test_alloc(nz),
          *mean2 = test_alloc(nz);
    test_rng rng = test_rng_new(77);
    test_fill(img, ni, &rng, -1.0f, 1.0f);
    for (size_t i = 0; i < nz; i++)
        logvar[i] = mean2[i] = NAN;
    ck_assert_ok(klvae_encode(m, img, n, h, w, mean1, logvar));
    ck_assert_ok(klvae_encode(m, img, n, h, w, mean2, NULL));
    int differs = 0;
    for (size_t i = 0; i < nz; i++) {
        ck_assert(isfinite(mean1[i]));
        ck_assert(logvar[i] >= -30.0f && logvar[i] <= 20.0f);
        ck_assert_msg(memcmp(&mean1[i], &mean2[i], sizeof(float)) == 0,
                      "mean[%zu] is %g with logvar and %g without", i, (double)mean1[i],
                      (double)mean2[i]);
        if (mean1[i] != mean1[0])
            differs = 1;
    }
    ck_assert_int_eq(differs, 1);
    free(img);
    free(mean1);
    free(mean2);
    free(logvar);
    klvae_model_free(m);
}
END_TEST

/* ---- NULL pointers ---- */

START_TEST(load_null_path)
{
    expect_load_failure(NULL, NULL, KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("path");
}
END_TEST

START_TEST(load_null_out)
{
    ck_assert_status(klvae_model_load(NOATTN_FOLDER, NULL, NULL), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("out");
}
END_TEST

START_TEST(create_null_out)
{
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    ck_assert_ok(klvae_options_set(o, "config", "tiny"));
    ck_assert_status(klvae_model_create(o, NULL), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("out");
    klvae_options_free(o);
}
END_TEST

START_TEST(save_null_model)
{
    char *dir = test_tmpdir();
    char *path = test_join(dir, "saved");
    ck_assert_status(klvae_model_save(NULL, path), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("model");
    ck_assert(!test_path_exists(path));
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(save_null_path)
{
    klvae_model_t *m = tiny();
    ck_assert_status(klvae_model_save(m, NULL), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("path");
    klvae_model_free(m);
}
END_TEST

START_TEST(encode_null_model)
{
    float img[3 * 2 * 2] = {0}, mean[4] = {0}, logvar[4] = {0};
    ck_assert_status(klvae_encode(NULL, img, 1, 2, 2, mean, logvar), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("model");
}
END_TEST

START_TEST(encode_null_images)
{
    klvae_model_t *m = tiny();
    float mean[4] = {0}, logvar[4] = {0};
    ck_assert_status(klvae_encode(m, NULL, 1, 2, 2, mean, logvar), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("images");
    klvae_model_free(m);
}
END_TEST

START_TEST(encode_null_mean)
{
    klvae_model_t *m = tiny();
    float img[3 * 2 * 2] = {0}, logvar[4] = {0};
    ck_assert_status(klvae_encode(m, img, 1, 2, 2, NULL, logvar), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("mean");
    klvae_model_free(m);
}
END_TEST

START_TEST(decode_null_model)
{
    float z[4] = {0}, img[3 * 2 * 2] = {0};
    ck_assert_status(klvae_decode(NULL, z, 1, 1, 1, img), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("model");
}
END_TEST

START_TEST(decode_null_z)
{
    klvae_model_t *m = tiny();
    float img[3 * 2 * 2] = {0};
    ck_assert_status(klvae_decode(m, NULL, 1, 1, 1, img), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("z is NULL");
    klvae_model_free(m);
}
END_TEST

START_TEST(decode_null_images)
{
    klvae_model_t *m = tiny();
    float z[4] = {0};
    ck_assert_status(klvae_decode(m, z, 1, 1, 1, NULL), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("images");
    klvae_model_free(m);
}
END_TEST

START_TEST(sample_null_model)
{
    float mean[4] = {0}, logvar[4] = {0}, z[4] = {0};
    ck_assert_status(klvae_sample(NULL, mean, logvar, 1, 1, 1, 0, z), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("model");
}
END_TEST

START_TEST(sample_null_mean)
{
    klvae_model_t *m = tiny();
    float logvar[4] = {0}, z[4] = {0};
    ck_assert_status(klvae_sample(m, NULL, logvar, 1, 1, 1, 0, z), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("mean");
    klvae_model_free(m);
}
END_TEST

START_TEST(sample_null_logvar)
{
    klvae_model_t *m = tiny();
    float mean[4] = {0}, z[4] = {0};
    ck_assert_status(klvae_sample(m, mean, NULL, 1, 1, 1, 0, z), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("logvar");
    klvae_model_free(m);
}
END_TEST

START_TEST(sample_null_z)
{
    klvae_model_t *m = tiny();
    float mean[4] = {0}, logvar[4] = {0};
    ck_assert_status(klvae_sample(m, mean, logvar, 1, 1, 1, 0, NULL), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("z is NULL");
    klvae_model_free(m);
}
END_TEST

START_TEST(options_create_null)
{
    ck_assert_status(klvae_options_create(NULL), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("out");
}
END_TEST

START_TEST(options_set_null_opts)
{
    ck_assert_status(klvae_options_set(NULL, "threads", "2"), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("opts");
}
END_TEST

START_TEST(options_set_null_key)
{
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    ck_assert_status(klvae_options_set(o, NULL, "2"), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("key");
    klvae_options_free(o);
}
END_TEST

START_TEST(options_set_null_value)
{
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    ck_assert_ok(klvae_options_set(o, "threads", "3"));
    ck_assert_status(klvae_options_set(o, "threads", NULL), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("value");
    char buf[16];
    ck_assert_ok(klvae_options_get(o, "threads", buf, sizeof buf));
    ck_assert_str_eq(buf, "3");
    klvae_options_free(o);
}
END_TEST

START_TEST(options_get_null_key)
{
    char buf[16] = "untouched";
    ck_assert_status(klvae_options_get(NULL, NULL, buf, sizeof buf), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("key");
}
END_TEST

START_TEST(options_get_null_buf)
{
    ck_assert_status(klvae_options_get(NULL, "threads", NULL, 16), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("buf");
}
END_TEST

/* klvae_image_read with one NULL argument: the others come back reset. */
static void expect_image_read_null(int which, const char *name)
{
    float sentinel[1];
    float *px = sentinel;
    int h = 11, w = 12;
    const char *path = "fixtures/noattn/README.md";
    klvae_status_t st = klvae_image_read(which == 0 ? NULL : path, which == 1 ? NULL : &px,
                                         which == 2 ? NULL : &h, which == 3 ? NULL : &w);
    if (st == KLVAE_OK && px && px != sentinel)
        klvae_free(px);
    ck_assert_status(st, KLVAE_ERR_INVALID_ARGUMENT);
    char text[32];
    snprintf(text, sizeof text, "%s is NULL", name);
    ck_assert_error_mentions(text);
    /* "On error *pixels is NULL and *h, *w are 0." */
    if (which != 1)
        ck_assert_ptr_null(px);
    if (which != 2)
        ck_assert_int_eq(h, 0);
    if (which != 3)
        ck_assert_int_eq(w, 0);
}

START_TEST(image_read_null_path)
{
    expect_image_read_null(0, "path");
}
END_TEST

START_TEST(image_read_null_pixels)
{
    expect_image_read_null(1, "pixels");
}
END_TEST

START_TEST(image_read_null_h)
{
    expect_image_read_null(2, "h");
}
END_TEST

START_TEST(image_read_null_w)
{
    expect_image_read_null(3, "w");
}
END_TEST

START_TEST(image_write_null_path)
{
    float img[3 * 2 * 2] = {0};
    ck_assert_status(klvae_image_write_png(NULL, img, 2, 2), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("path");
}
END_TEST

START_TEST(image_write_null_pixels)
{
    char *dir = test_tmpdir();
    char *path = test_join(dir, "x.png");
    ck_assert_status(klvae_image_write_png(path, NULL, 2, 2), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("pixels");
    int tmp_found;
    ck_assert_int_eq(test_count_entries(dir, &tmp_found), 0);
    test_rmtree(dir);
    free(path);
    free(dir);
}
END_TEST

START_TEST(model_get_null_model)
{
    char buf[64] = "untouched";
    ck_assert_status(klvae_model_get(NULL, "latent_channels", buf, sizeof buf),
                     KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("model");
}
END_TEST

START_TEST(free_functions_accept_null)
{
    /* An earlier error message must survive the no-op calls. */
    ck_assert_status(klvae_options_create(NULL), KLVAE_ERR_INVALID_ARGUMENT);
    klvae_model_free(NULL);
    klvae_options_free(NULL);
    klvae_free(NULL);
    ck_assert_error_mentions("klvae_options_create");
}
END_TEST

START_TEST(queries_on_null_model)
{
    ck_assert_int_eq(klvae_model_in_channels(NULL), 0);
    ck_assert_int_eq(klvae_model_out_channels(NULL), 0);
    ck_assert_int_eq(klvae_model_latent_channels(NULL), 0);
    ck_assert_int_eq(klvae_model_downsampling_factor(NULL), 0);
    ck_assert(klvae_model_scaling_factor(NULL) == 0.0f);
    ck_assert(klvae_model_shift_factor(NULL) == 0.0f);
    ck_assert(klvae_model_parameter_count(NULL) == 0);
    ck_assert_ptr_nonnull(klvae_model_backend(NULL));
    ck_assert_str_eq(klvae_model_backend(NULL), "");
}
END_TEST

/* ---- options ---- */

START_TEST(options_unknown_key)
{
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    ck_assert_ok(klvae_options_set(o, "threads", "3"));
    ck_assert_status(klvae_options_set(o, "thread_count", "3"), KLVAE_ERR_OPTION);
    ck_assert_error_mentions("thread_count");
    char buf[32];
    ck_assert_ok(klvae_options_get(o, "threads", buf, sizeof buf));
    ck_assert_str_eq(buf, "3");
    ck_assert_status(klvae_options_get(o, "thread_count", buf, sizeof buf), KLVAE_ERR_OPTION);
    ck_assert_error_mentions("thread_count");
    klvae_options_free(o);
}
END_TEST

/* Sets key to a good value, then to a bad one: OPTION naming both key and
 * bad value, and the good value stays. */
static void expect_bad_option(const char *key, const char *good, const char *bad)
{
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    ck_assert_ok(klvae_options_set(o, key, good));
    ck_assert_status(klvae_options_set(o, key, bad), KLVAE_ERR_OPTION);
    ck_assert_error_mentions(key);
    char quoted[64];
    snprintf(quoted, sizeof quoted, "'%s'", bad);
    ck_assert_error_mentions(quoted);
    char buf[64];
    ck_assert_ok(klvae_options_get(o, key, buf, sizeof buf));
    ck_assert_str_eq(buf, good);
    klvae_options_free(o);
}

START_TEST(option_threads_not_a_number)
{
    expect_bad_option("threads", "2", "abc");
}
END_TEST

START_TEST(option_threads_negative)
{
    expect_bad_option("threads", "2", "-1");
}
END_TEST

START_TEST(option_block_out_channels_empty_item)
{
    expect_bad_option("block_out_channels", "32,64", "1,,2");
}
END_TEST

START_TEST(option_use_quant_conv_maybe)
{
    expect_bad_option("use_quant_conv", "false", "maybe");
}
END_TEST

START_TEST(option_scaling_factor_inf)
{
    expect_bad_option("scaling_factor", "0.5", "inf");
}
END_TEST

START_TEST(option_seed_negative)
{
    expect_bad_option("seed", "9", "-3");
}
END_TEST

START_TEST(option_backend_gpu)
{
    expect_bad_option("backend", "cpu", "gpu");
}
END_TEST

/* ---- saving ---- */

START_TEST(save_under_regular_file_is_io)
{
    klvae_model_t *m = tiny();
    char *dir = test_tmpdir();
    char *file = test_join(dir, "plain-file");
    char *target = test_join(file, "model");
    const char *content = "precious contents";
    test_write_file(file, content, strlen(content));
    ck_assert_status(klvae_model_save(m, target), KLVAE_ERR_IO);
    ck_assert_error_mentions(target);
    ck_assert(!test_path_exists(target));
    size_t len;
    unsigned char *after = test_read_file(file, &len);
    ck_assert_uint_eq(len, strlen(content));
    ck_assert(memcmp(after, content, len) == 0);
    int tmp_found;
    ck_assert_int_eq(test_count_entries(dir, &tmp_found), 1);
    free(after);
    test_rmtree(dir);
    free(target);
    free(file);
    free(dir);
    klvae_model_free(m);
}
END_TEST

START_TEST(save_weights_name_taken_by_folder_is_io)
{
    /* The weights cannot be renamed into place: nothing may be left, not the
     * temporary file and not a config.json for missing weights. */
    klvae_model_t *m = tiny();
    char *dir = test_tmpdir();
    char *blocker = test_join(dir, "diffusion_pytorch_model.safetensors");
    ck_assert_int_eq(mkdir(blocker, 0755), 0);
    ck_assert_status(klvae_model_save(m, dir), KLVAE_ERR_IO);
    ck_assert_error_mentions("diffusion_pytorch_model.safetensors");
    int tmp_found;
    ck_assert_int_eq(test_count_entries(dir, &tmp_found), 1);
    ck_assert_int_eq(tmp_found, 0);
    char *config = test_join(dir, "config.json");
    ck_assert(!test_path_exists(config));
    free(config);
    test_rmtree(dir);
    free(blocker);
    free(dir);
    klvae_model_free(m);
}
END_TEST

START_TEST(save_failing_config_leaves_earlier_folder_intact)
{
    /* config.json cannot be replaced: the earlier weights must stay too, so
     * the folder never pairs new weights with an old config. */
    klvae_model_t *m = tiny();
    char *dir = test_tmpdir();
    ck_assert_ok(klvae_model_save(m, dir));
    char *weights = test_join(dir, "diffusion_pytorch_model.safetensors");
    char *config = test_join(dir, "config.json");
    FILE *fp = fopen(weights, "rb");
    ck_assert_ptr_nonnull(fp);
    fseek(fp, 0, SEEK_END);
    long before = ftell(fp);
    fclose(fp);
    ck_assert_int_eq(remove(config), 0);
    ck_assert_int_eq(mkdir(config, 0755), 0); /* rename over a folder fails */
    klvae_options_t *o = NULL;
    klvae_model_t *other = NULL;
    ck_assert_ok(klvae_options_create(&o));
    ck_assert_ok(klvae_options_set(o, "config", "tiny"));
    ck_assert_ok(klvae_options_set(o, "layers_per_block", "2")); /* a bigger file */
    ck_assert_ok(klvae_model_create(o, &other));
    ck_assert_status(klvae_model_save(other, dir), KLVAE_ERR_IO);
    fp = fopen(weights, "rb");
    ck_assert_ptr_nonnull(fp);
    fseek(fp, 0, SEEK_END);
    ck_assert_int_eq(ftell(fp), before);
    fclose(fp);
    int tmp_found;
    test_count_entries(dir, &tmp_found);
    ck_assert_int_eq(tmp_found, 0);
    klvae_model_free(other);
    klvae_options_free(o);
    test_rmtree(dir);
    free(weights);
    free(config);
    free(dir);
    klvae_model_free(m);
}
END_TEST

START_TEST(sample_z_partly_overlapping_mean_is_invalid)
{
    klvae_model_t *m = tiny();
    const int n = 1, h = 4, w = 4;
    const size_t count = (size_t)n * 4 * h * w;
    float *buf = test_alloc(3 * count);
    float *mean = buf, *logvar = buf + 2 * count;
    ck_assert_status(klvae_sample(m, mean, logvar, n, h, w, 1, buf + 5), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("overlap");
    ck_assert_status(klvae_sample(m, mean, logvar, n, h, w, 1, logvar - 3),
                     KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_ok(klvae_sample(m, mean, logvar, n, h, w, 1, mean));   /* exactly mean: fine */
    ck_assert_ok(klvae_sample(m, mean, logvar, n, h, w, 1, logvar)); /* exactly logvar: fine */
    free(buf);
    klvae_model_free(m);
}
END_TEST

START_TEST(model_get_rejects_config_and_accepts_dashes)
{
    klvae_model_t *m = tiny();
    char buf[64];
    ck_assert_status(klvae_model_get(m, "config", buf, sizeof buf), KLVAE_ERR_OPTION);
    ck_assert_error_mentions("config");
    ck_assert_status(klvae_model_get(m, "colour", buf, sizeof buf), KLVAE_ERR_OPTION);
    ck_assert_error_mentions("colour");
    ck_assert_ok(klvae_model_get(m, "latent-channels", buf, sizeof buf));
    ck_assert_str_eq(buf, "4");
    ck_assert_status(klvae_model_get(m, "block_out_channels", buf, 3), KLVAE_ERR_BUFFER_TOO_SMALL);
    ck_assert_error_mentions("too small");
    char expect[64];
    ck_assert_ok(klvae_model_get(m, "block_out_channels", expect, sizeof expect));
    ck_assert_status(klvae_model_get(m, "block_out_channels", NULL, 0), KLVAE_ERR_BUFFER_TOO_SMALL);
    ck_assert_uint_eq(klvae_last_needed_size(), strlen(expect) + 1);
    ck_assert_status(klvae_model_get(m, "backend", buf, 1), KLVAE_ERR_BUFFER_TOO_SMALL);
    ck_assert_uint_eq(klvae_last_needed_size(), 4); /* "cpu" */
    klvae_model_free(m);
}
END_TEST

Suite *suite_errors(void)
{
    Suite *s = suite_create("errors");
    TCase *tc = tcase_create("files");
    tcase_add_test(tc, load_nonexistent_path_is_io);
    tcase_add_test(tc, load_empty_file_is_format);
    tcase_add_test(tc, load_file_shorter_than_length_field_is_format);
    tcase_add_test(tc, load_truncated_fixture_is_format);
    tcase_add_test(tc, load_header_length_past_end_is_format);
    tcase_add_test(tc, load_header_length_over_limit_is_format);
    tcase_add_test(tc, load_header_far_larger_than_its_data_is_format);
    tcase_add_test(tc, load_invalid_json_header_is_format);
    tcase_add_test(tc, load_header_json_array_is_format);
    tcase_add_test(tc, load_tensor_entry_not_object_is_format);
    tcase_add_test(tc, load_entry_without_data_offsets_is_format);
    tcase_add_test(tc, load_unknown_dtype_is_format);
    tcase_add_test(tc, load_byte_range_mismatch_is_format);
    tcase_add_test(tc, load_byte_count_overflow_is_format);
    tcase_add_test(tc, load_overlapping_offsets_is_format);
    tcase_add_test(tc, load_duplicate_keys_is_format);
    suite_add_tcase(s, tc);

    tc = tcase_create("weights");
    tcase_add_test(tc, rewritten_fixture_loads);
    tcase_add_test(tc, load_missing_tensor);
    tcase_add_test(tc, load_wrong_shape_bias);
    tcase_add_test(tc, weights_with_nan_are_refused);
    tcase_add_test(tc, load_wrong_shape_middle_conv);
    suite_add_tcase(s, tc);

    tc = tcase_create("config");
    tcase_add_test(tc, folder_copy_loads);
    tcase_add_test(tc, folder_config_disagrees_latent_channels);
    tcase_add_test(tc, folder_config_disagrees_block_out_channels);
    tcase_add_test(tc, folder_without_config_is_io);
    tcase_add_test(tc, folder_without_weights_is_io);
    tcase_add_test(tc, folder_config_invalid_json_is_format);
    tcase_add_test(tc, folder_config_cross_attn_block_is_config);
    tcase_add_test(tc, folder_config_indivisible_channels_is_config);
    tcase_add_test(tc, folder_config_string_for_int_is_config);
    tcase_add_test(tc, folder_config_without_attention_for_attention_weights_is_config);
    tcase_add_test(tc, folder_config_without_quant_conv_for_its_weights_is_config);
    tcase_add_test(tc, folder_config_with_fewer_layers_than_the_weights_is_config);
    tcase_add_test(tc, load_option_disagrees_with_model_is_config);
    tcase_add_test(tc, load_option_disagrees_with_single_file_is_config);
    tcase_add_test(tc, load_norm_groups_option_disagrees_with_config_json_is_config);
    suite_add_tcase(s, tc);

    tc = tcase_create("backend");
    tcase_add_test(tc, load_backend_cuda_unavailable);
    tcase_add_test(tc, create_backend_cuda_unavailable);
    tcase_add_test(tc, env_backend_bad_value_is_option);
    suite_add_tcase(s, tc);

    tc = tcase_create("inference");
    tcase_add_test(tc, encode_height_not_multiple_of_factor);
    tcase_add_test(tc, encode_width_not_multiple_of_factor);
    tcase_add_test(tc, encode_n_zero);
    tcase_add_test(tc, encode_n_negative);
    tcase_add_test(tc, decode_n_zero);
    tcase_add_test(tc, decode_n_negative);
    tcase_add_test(tc, sample_n_zero);
    tcase_add_test(tc, sample_n_negative);
    tcase_add_test(tc, encode_h_zero);
    tcase_add_test(tc, encode_w_negative);
    tcase_add_test(tc, decode_lat_h_negative);
    tcase_add_test(tc, decode_lat_w_zero);
    tcase_add_test(tc, sample_lat_h_zero);
    tcase_add_test(tc, sample_lat_w_negative);
    tcase_add_test(tc, encode_int_max_sizes);
    tcase_add_test(tc, encode_overflowing_sizes);
    tcase_add_test(tc, decode_overflowing_sizes);
    tcase_add_test(tc, decode_upscaled_size_overflows_int);
    tcase_add_test(tc, sample_overflowing_sizes);
    tcase_add_test(tc, encode_mean_overlaps_images);
    tcase_add_test(tc, encode_logvar_overlaps_images);
    tcase_add_test(tc, encode_mean_overlaps_logvar);
    tcase_add_test(tc, decode_images_overlap_z);
    tcase_add_test(tc, encode_logvar_null_works);
    suite_add_tcase(s, tc);

    tc = tcase_create("null");
    tcase_add_test(tc, load_null_path);
    tcase_add_test(tc, load_null_out);
    tcase_add_test(tc, create_null_out);
    tcase_add_test(tc, save_null_model);
    tcase_add_test(tc, save_null_path);
    tcase_add_test(tc, encode_null_model);
    tcase_add_test(tc, encode_null_images);
    tcase_add_test(tc, encode_null_mean);
    tcase_add_test(tc, decode_null_model);
    tcase_add_test(tc, decode_null_z);
    tcase_add_test(tc, decode_null_images);
    tcase_add_test(tc, sample_null_model);
    tcase_add_test(tc, sample_null_mean);
    tcase_add_test(tc, sample_null_logvar);
    tcase_add_test(tc, sample_null_z);
    tcase_add_test(tc, options_create_null);
    tcase_add_test(tc, options_set_null_opts);
    tcase_add_test(tc, options_set_null_key);
    tcase_add_test(tc, options_set_null_value);
    tcase_add_test(tc, options_get_null_key);
    tcase_add_test(tc, options_get_null_buf);
    tcase_add_test(tc, image_read_null_path);
    tcase_add_test(tc, image_read_null_pixels);
    tcase_add_test(tc, image_read_null_h);
    tcase_add_test(tc, image_read_null_w);
    tcase_add_test(tc, image_write_null_path);
    tcase_add_test(tc, image_write_null_pixels);
    tcase_add_test(tc, model_get_null_model);
    tcase_add_test(tc, free_functions_accept_null);
    tcase_add_test(tc, queries_on_null_model);
    suite_add_tcase(s, tc);

    tc = tcase_create("options");
    tcase_add_test(tc, options_unknown_key);
    tcase_add_test(tc, option_threads_not_a_number);
    tcase_add_test(tc, option_threads_negative);
    tcase_add_test(tc, option_block_out_channels_empty_item);
    tcase_add_test(tc, option_use_quant_conv_maybe);
    tcase_add_test(tc, option_scaling_factor_inf);
    tcase_add_test(tc, option_seed_negative);
    tcase_add_test(tc, option_backend_gpu);
    suite_add_tcase(s, tc);

    tc = tcase_create("save");
    tcase_add_test(tc, save_under_regular_file_is_io);
    tcase_add_test(tc, save_weights_name_taken_by_folder_is_io);
    tcase_add_test(tc, save_failing_config_leaves_earlier_folder_intact);
    tcase_add_test(tc, sample_z_partly_overlapping_mean_is_invalid);
    tcase_add_test(tc, model_get_rejects_config_and_accepts_dashes);
    suite_add_tcase(s, tc);
    return s;
}
