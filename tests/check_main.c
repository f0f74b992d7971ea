/* check_main.c — runs every suite and ends with a plain
 * "N passed, N failed" line. CK_RUN_SUITE / CK_RUN_CASE select a part. */
#include <dirent.h>
#include <ftw.h>
#include <sys/stat.h>
#include <stdbool.h>
#include <unistd.h>

#include "formats/safetensors.h"
#include "test_util.h"

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

char *test_join(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    ck_assert_ptr_nonnull(p);
    snprintf(p, n, "%s/%s", dir, name);
    return p;
}

bool test_path_exists(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0;
}

int test_count_entries(const char *dir, int *tmp_found)
{
    DIR *d = opendir(dir);
    ck_assert_ptr_nonnull(d);
    int count = 0;
    *tmp_found = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        count++;
        if (strstr(e->d_name, ".tmp."))
            *tmp_found = 1;
    }
    closedir(d);
    return count;
}

unsigned char *test_read_file(const char *path, size_t *len)
{
    FILE *fp = fopen(path, "rb");
    ck_assert_msg(fp != NULL, "cannot open %s", path);
    fseek(fp, 0, SEEK_END);
    long size = ftell(fp);
    ck_assert_int_ge(size, 0);
    rewind(fp);
    unsigned char *buf = malloc((size_t)size + 1);
    ck_assert_ptr_nonnull(buf);
    ck_assert_uint_eq(fread(buf, 1, (size_t)size, fp), (size_t)size);
    fclose(fp);
    buf[size] = 0;
    *len = (size_t)size;
    return buf;
}

void test_rmtree(const char *path)
{
    if (path)
        nftw(path, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

char *test_tmpdir(void)
{
    const char *base = getenv("TMPDIR");
    char *path = malloc(4096);
    ck_assert_ptr_nonnull(path);
    snprintf(path, 4096, "%s/klvae-test-XXXXXX", base && *base ? base : "/tmp");
    ck_assert_ptr_nonnull(mkdtemp(path));
    return path;
}

void test_write_file(const char *path, const void *data, size_t len)
{
    FILE *fp = fopen(path, "wb");
    ck_assert_msg(fp != NULL, "cannot write %s", path);
    if (len)
        ck_assert_uint_eq(fwrite(data, 1, len, fp), len);
    fclose(fp);
}

void test_write_safetensors(const char *path, const char *header_json, size_t data_len)
{
    size_t hlen = strlen(header_json);
    size_t total = 8 + hlen + data_len;
    unsigned char *buf = malloc(total);
    ck_assert_ptr_nonnull(buf);
    for (int i = 0; i < 8; i++)
        buf[i] = (unsigned char)((uint64_t)hlen >> (8 * i));
    memcpy(buf + 8, header_json, hlen);
    for (size_t i = 0; i < data_len; i++)
        buf[8 + hlen + i] = (unsigned char)(i * 37 + 11);
    test_write_file(path, buf, total);
    free(buf);
}

void test_damage_tensor(const char *path, const char *tensor, test_damage how)
{
    kv_safetensors st;
    ck_assert_ok(kv_st_open(path, &st));
    const kv_st_tensor *t = kv_st_find(&st, tensor);
    ck_assert_msg(t != NULL, "%s has no tensor %s", path, tensor);
    ck_assert_str_eq(t->dtype, "F32");
    const uint64_t last = st.data_start + t->end - 4, header_end = st.data_start;
    kv_st_close(&st);
    size_t len;
    unsigned char *bytes = test_read_file(path, &len);
    if (how == TEST_DAMAGE_NAN) {
        const float nan = NAN;
        memcpy(bytes + last, &nan, sizeof nan);
    } else { /* the same number of bytes, so every offset stays valid */
        char quoted[512];
        snprintf(quoted, sizeof quoted, "\"%s\"", tensor);
        char *entry = memmem(bytes, header_end, quoted, strlen(quoted));
        ck_assert_ptr_nonnull(entry);
        char *dtype = memmem(entry, header_end - (uint64_t)((unsigned char *)entry - bytes),
                             "\"F32\"", 5);
        ck_assert_ptr_nonnull(dtype);
        memcpy(dtype, "\"I32\"", 5);
    }
    test_write_file(path, bytes, len);
    free(bytes);
}

float *test_load_fixture_tensor(const char *path, const char *name, int shape[4])
{
    kv_safetensors st;
    klvae_status_t status = kv_st_open(path, &st);
    ck_assert_msg(status == KLVAE_OK, "cannot open fixture %s: %s", path, klvae_last_error());
    const kv_st_tensor *t = kv_st_find(&st, name);
    ck_assert_msg(t != NULL, "fixture %s has no tensor %s", path, name);
    ck_assert_int_eq(t->ndim, 4);
    for (int d = 0; d < 4; d++)
        shape[d] = (int)t->shape[d];
    float *data = test_alloc(kv_st_numel(t));
    ck_assert_ok(kv_st_read_f32(&st, t, data));
    kv_st_close(&st);
    return data;
}

klvae_model_t *test_tiny_model(int threads)
{
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    ck_assert_ok(klvae_options_set(o, "config", "tiny"));
    ck_assert_ok(klvae_options_set(o, "seed", "7"));
    if (threads > 0) {
        char text[16];
        snprintf(text, sizeof text, "%d", threads);
        ck_assert_ok(klvae_options_set(o, "threads", text));
    }
    klvae_model_t *m = NULL;
    ck_assert_ok(klvae_model_create(o, &m));
    klvae_options_free(o);
    return m;
}

int main(void)
{
    Suite *(*const suites[])(void) = {
        suite_api, suite_options, suite_config, suite_safetensors,
        /* the op families, in the order of backend.h's specification */
        suite_conv2d_ops, suite_group_norm_ops, suite_batch_norm_ops, suite_attention_ops,
        suite_upsample_ops, suite_pool_ops, suite_activation_ops, suite_elementwise_ops,
        suite_posterior_ops, suite_lpips_ops, suite_losses_ops, suite_optimizer_ops,
        suite_model, suite_sample, suite_image, suite_errors, suite_data, suite_train, suite_cli,
        suite_plugin, suite_cuda_host, suite_golden, suite_save, suite_stream, suite_buckets,
        suite_dp, suite_dataset, suite_weight_cache, suite_bf16, suite_cpu_memory};
    SRunner *runner = srunner_create(NULL);
    for (size_t i = 0; i < sizeof suites / sizeof suites[0]; i++)
        srunner_add_suite(runner, suites[i]());
    srunner_run_all(runner, CK_ENV);
    int total = srunner_ntests_run(runner);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);
    printf("%d passed, %d failed\n", total - failed, failed);
    return failed == 0 ? 0 : 1;
}
