/* test_plugin.c — backend selection and the CUDA plugin loader, without a
 * GPU: every way loading can fail (with its status and the words of its
 * message), auto's fallback and its reason, KLVAE_BACKEND, and a working
 * fake plugin (tests/plugins/fake_plugin.c) that shows that backend=cuda
 * reaches the plugin, that settings arrive, that op errors come back with
 * their message, and that klvae_*_device use set_stream and synchronize.
 *
 * The loader keeps its outcome for the process; every test starts from
 * kv_plugin_reset_for_tests() with KLVAE_CUDA_PLUGIN and KLVAE_BACKEND unset,
 * so the suite also works with CK_FORK=no. */
#include <dlfcn.h>
#include <pthread.h>
#include <unistd.h>

#include "backend/cpu/bf16_gemm.h"
#include "backend/cpu/cpu_ops.h"
#include "backend/plugin_loader.h"
#include "model/model.h"
#include "plugins/fake_plugin.h"
#include "test_util.h"
#include "train/dp.h"

static char *saved_plugin_env, *saved_backend_env;

static char *save_env(const char *name)
{
    const char *v = getenv(name);
    return v ? strdup(v) : NULL;
}

static void restore_env(const char *name, char **saved)
{
    if (*saved)
        setenv(name, *saved, 1);
    else
        unsetenv(name);
    free(*saved);
    *saved = NULL;
}

static void setup(void)
{
    saved_plugin_env = save_env("KLVAE_CUDA_PLUGIN");
    saved_backend_env = save_env("KLVAE_BACKEND");
    unsetenv("KLVAE_CUDA_PLUGIN");
    unsetenv("KLVAE_BACKEND");
    kv_plugin_reset_for_tests();
}

static void teardown(void)
{
    restore_env("KLVAE_CUDA_PLUGIN", &saved_plugin_env);
    restore_env("KLVAE_BACKEND", &saved_backend_env);
    kv_plugin_reset_for_tests();
}

/* The folder of this test program (the fake plugins are in plugins/). */
static const char *exe_dir(void)
{
    static char dir[4096];
    ssize_t n = readlink("/proc/self/exe", dir, sizeof dir - 1);
    ck_assert_int_gt(n, 0);
    dir[n] = '\0';
    *strrchr(dir, '/') = '\0';
    return dir;
}

/* build/tests/plugins/fake_MODE.so */
static const char *fake(const char *mode)
{
    static char path[4200];
    snprintf(path, sizeof path, "%s/plugins/fake_%s.so", exe_dir(), mode);
    ck_assert_msg(access(path, R_OK) == 0, "%s is missing (make builds it)", path);
    return path;
}

static void use_plugin(const char *path)
{
    setenv("KLVAE_CUDA_PLUGIN", path, 1);
}

/* The fake's record, when the loader has it loaded (else NULL). */
static fake_record *record_of(const char *mode)
{
    void *h = dlopen(fake(mode), RTLD_NOW | RTLD_NOLOAD);
    if (!h)
        return NULL;
    fake_record *r = dlsym(h, FAKE_RECORD_SYMBOL);
    dlclose(h); /* the loader still holds it */
    ck_assert_ptr_nonnull(r);
    return r;
}

/* Creates a tiny model with backend (NULL: not set) and optional device
 * and precision (NULL: default). */
static klvae_status_t create(const char *backend, const char *device, const char *precision,
                             klvae_model_t **m)
{
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    ck_assert_ok(klvae_options_set(o, "config", "tiny"));
    ck_assert_ok(klvae_options_set(o, "threads", "1"));
    if (backend)
        ck_assert_ok(klvae_options_set(o, "backend", backend));
    if (device)
        ck_assert_ok(klvae_options_set(o, "device", device));
    if (precision)
        ck_assert_ok(klvae_options_set(o, "precision", precision));
    *m = NULL;
    klvae_status_t st = klvae_model_create(o, m);
    klvae_options_free(o);
    return st;
}

static void expect_cuda_failure(klvae_status_t status, const char *words1, const char *words2)
{
    klvae_model_t *m = NULL;
    ck_assert_status(create("cuda", NULL, NULL, &m), status);
    ck_assert_ptr_null(m);
    if (status == KLVAE_ERR_BACKEND_UNAVAILABLE)
        ck_assert_error_mentions("backend 'cuda' is unavailable");
    if (words1)
        ck_assert_error_mentions(words1);
    if (words2)
        ck_assert_error_mentions(words2);
}

/* auto falls back to the CPU, succeeds with an empty message, and its
 * reason mentions the words. */
static void expect_auto_cpu(const char *words1, const char *words2)
{
    klvae_model_t *m = NULL;
    ck_assert_ok(create(NULL, NULL, NULL, &m));
    ck_assert_str_eq(klvae_last_error(), "");
    ck_assert_str_eq(klvae_model_backend(m), "cpu");
    char reason[1024];
    ck_assert_ok(klvae_model_get(m, "backend_reason", reason, sizeof reason));
    if (words1)
        ck_assert_msg(strstr(reason, words1), "reason \"%s\" lacks \"%s\"", reason, words1);
    if (words2)
        ck_assert_msg(strstr(reason, words2), "reason \"%s\" lacks \"%s\"", reason, words2);
    klvae_model_free(m);
}

/* ---- no plugin ---- */

START_TEST(cuda_without_plugin_names_where_it_looked)
{
    char beside[4200];
    snprintf(beside, sizeof beside, "%s/libklvae_cuda.so", exe_dir());
    expect_cuda_failure(KLVAE_ERR_BACKEND_UNAVAILABLE, "CUDA plugin not found (looked in: ",
                        beside);
    ck_assert_error_mentions("the dynamic linker's search path for libklvae_cuda.so");
    ck_assert_error_mentions("KLVAE_CUDA_PLUGIN");
}
END_TEST

/* A plugin beside the core is loaded only where the NVIDIA driver's library
 * loads: here a working fake plugin copied beside this program is left
 * unloaded with "no CUDA driver" on a machine without libcuda.so.1, and used
 * on one with it. */
START_TEST(plugin_beside_the_core_waits_for_a_driver)
{
    char beside[4200];
    snprintf(beside, sizeof beside, "%s/libklvae_cuda.so", exe_dir());
    FILE *in = fopen(fake("working"), "rb"), *out = fopen(beside, "wb");
    ck_assert_ptr_nonnull(in);
    ck_assert_ptr_nonnull(out);
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, in)) > 0)
        ck_assert_uint_eq(fwrite(buf, 1, n, out), n);
    fclose(in);
    ck_assert_int_eq(fclose(out), 0);
    void *driver = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
    if (driver)
        dlclose(driver);
    klvae_model_t *m = NULL;
    klvae_status_t st = create("cuda", NULL, NULL, &m);
    char error[1024];
    snprintf(error, sizeof error, "%s", klvae_last_error());
    void *loaded = dlopen(beside, RTLD_NOW | RTLD_NOLOAD);
    if (loaded)
        dlclose(loaded);
    unlink(beside); /* before any assertion: the other tests look beside too */
    if (driver) {
        ck_assert_ok(st);
        ck_assert_ptr_nonnull(loaded);
        klvae_model_free(m);
    } else {
        ck_assert_int_eq(st, KLVAE_ERR_BACKEND_UNAVAILABLE);
        ck_assert_msg(strstr(error, "no CUDA driver") && strstr(error, beside) &&
                          strstr(error, "the plugin was not loaded"),
                      "error \"%s\"", error);
        ck_assert_ptr_null(loaded);
    }
}
END_TEST

START_TEST(auto_without_plugin_is_cpu_with_a_reason)
{
    expect_auto_cpu("CUDA plugin not found", "looked in");
    klvae_model_t *m = NULL;
    /* explicitly cpu: no reason, and the plugin is not looked for */
    ck_assert_ok(create("cpu", NULL, NULL, &m));
    char reason[16] = "x";
    ck_assert_ok(klvae_model_get(m, "backend-reason", reason, sizeof reason));
    ck_assert_str_eq(reason, "");
    klvae_model_free(m);
}
END_TEST

START_TEST(env_path_missing_is_not_searched_further)
{
    use_plugin("/nonexistent/klvae/libklvae_cuda.so");
    expect_cuda_failure(KLVAE_ERR_BACKEND_UNAVAILABLE, "KLVAE_CUDA_PLUGIN is /nonexistent/klvae/libklvae_cuda.so",
                        "does not exist");
    expect_auto_cpu("CUDA plugin not found", "/nonexistent/klvae/libklvae_cuda.so");
}
END_TEST

START_TEST(not_a_shared_object)
{
    char *dir = test_tmpdir();
    char path[4200];
    snprintf(path, sizeof path, "%s/libklvae_cuda.so", dir);
    test_write_file(path, "not an ELF file\n", 16);
    use_plugin(path);
    expect_cuda_failure(KLVAE_ERR_BACKEND_UNAVAILABLE, path, "cannot load it");
    test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(no_entry_point)
{
    use_plugin(fake("no_entry"));
    expect_cuda_failure(KLVAE_ERR_BACKEND_UNAVAILABLE, "fake_no_entry.so",
                        "no entry point klvae_plugin_entry");
    /* a refused plugin is closed again */
    ck_assert_ptr_null(dlopen(fake("no_entry"), RTLD_NOW | RTLD_NOLOAD));
}
END_TEST

START_TEST(abi_version_mismatch)
{
    use_plugin(fake("bad_abi"));
    char needs[64];
    snprintf(needs, sizeof needs, "ABI version 7, this libklvae needs %d", KV_PLUGIN_ABI_VERSION);
    expect_cuda_failure(KLVAE_ERR_BACKEND_UNAVAILABLE, "fake_bad_abi.so", needs);
    ck_assert_error_mentions("version mismatch");
    ck_assert_ptr_null(dlopen(fake("bad_abi"), RTLD_NOW | RTLD_NOLOAD));
    expect_auto_cpu("ABI version 7", NULL);
}
END_TEST

START_TEST(probe_without_driver)
{
    use_plugin(fake("no_driver"));
    expect_cuda_failure(KLVAE_ERR_BACKEND_UNAVAILABLE, "no CUDA driver", "fake_no_driver.so");
    expect_auto_cpu("no CUDA driver", "fake_no_driver.so");
    fake_record *r = record_of("no_driver");
    ck_assert_ptr_nonnull(r);
    ck_assert_int_eq(r->probes, 2);
    ck_assert_int_eq(r->creates, 0);
}
END_TEST

START_TEST(create_out_of_memory)
{
    use_plugin(fake("create_oom"));
    /* the plugin's status is kept, not turned into "unavailable" */
    expect_cuda_failure(KLVAE_ERR_OUT_OF_MEMORY, "out of memory creating the cuDNN handle",
                        "on device 0");
    expect_auto_cpu("out of memory creating the cuDNN handle", NULL);
}
END_TEST

START_TEST(backend_lacking_an_op)
{
    use_plugin(fake("incomplete"));
    expect_cuda_failure(KLVAE_ERR_BACKEND_UNAVAILABLE, "lacks the op attention", NULL);
    fake_record *r = record_of("incomplete");
    ck_assert_int_eq(r->creates, 1);
    ck_assert_int_eq(r->destroys, 1);
}
END_TEST

START_TEST(outcome_is_kept_until_reset)
{
    use_plugin("/nonexistent/first.so");
    expect_cuda_failure(KLVAE_ERR_BACKEND_UNAVAILABLE, "/nonexistent/first.so", NULL);
    use_plugin(fake("working"));
    expect_cuda_failure(KLVAE_ERR_BACKEND_UNAVAILABLE, "/nonexistent/first.so", NULL);
    kv_plugin_reset_for_tests();
    klvae_model_t *m = NULL;
    ck_assert_ok(create("cuda", NULL, NULL, &m));
    ck_assert_str_eq(klvae_model_backend(m), "cuda");
    klvae_model_free(m);
}
END_TEST

/* ---- the working fake ---- */

START_TEST(cuda_reaches_the_plugin_with_its_settings)
{
    use_plugin(fake("working"));
    klvae_model_t *m = NULL;
    ck_assert_ok(create("cuda", "3", "bf16", &m));
    ck_assert_str_eq(klvae_last_error(), "");
    ck_assert_str_eq(klvae_model_backend(m), "cuda");
    char buf[64];
    ck_assert_ok(klvae_model_get(m, "backend", buf, sizeof buf));
    ck_assert_str_eq(buf, "cuda");
    ck_assert_ok(klvae_model_get(m, "precision", buf, sizeof buf));
    ck_assert_str_eq(buf, "bf16");
    ck_assert_ok(klvae_model_get(m, "backend_reason", buf, sizeof buf));
    ck_assert_str_eq(buf, "");
    fake_record *r = record_of("working");
    ck_assert_ptr_nonnull(r);
    ck_assert_int_eq(r->probes, 1);
    ck_assert_int_eq(r->probe_device, 3);
    ck_assert_int_eq(r->create_device, 3);
    ck_assert_int_eq(r->create_precision, KV_PRECISION_BF16);
    ck_assert_int_gt(r->uploads, 0); /* the initialised parameters */
    ck_assert_int_gt(r->live_allocations, 0);
    klvae_model_free(m);
    ck_assert_int_eq(r->destroys, 1);
    ck_assert_int_eq(r->live_allocations, 0);
}
END_TEST

/* A world of one rank for kv_dp: the sums are the values themselves. */
static int one_allreduce(void *ctx, void *data, size_t count, klvae_comm_type_t type)
{
    (void)ctx, (void)data, (void)count, (void)type;
    return 0;
}

static int one_broadcast(void *ctx, void *data, size_t bytes, int root)
{
    (void)ctx, (void)data, (void)bytes, (void)root;
    return 0;
}

/* Two ranks that hold the same floats: the sum doubles them (and counts the
 * calls, in ctx). */
static int twin_allreduce(void *ctx, void *data, size_t count, klvae_comm_type_t type)
{
    ++*(int *)ctx;
    for (size_t i = 0; i < count; i++) {
        if (type == KLVAE_COMM_FLOAT32)
            ((float *)data)[i] *= 2.0f;
        else
            ((double *)data)[i] *= 2.0;
    }
    return 0;
}

/* The data-parallel gradient sums on a plugin's backend (the NCCL path,
 * with the fake standing in for cuda/comm.cu): the communicator is
 * bootstrapped through the broadcast, the first backward is recorded and
 * summed at its end, later ones launch each bucket as soon as the backward
 * has written it, and the end makes the backend wait. */
START_TEST(gradient_sums_reach_the_plugin_bucket_by_bucket)
{
    use_plugin(fake("working"));
    klvae_model_t *m = NULL;
    ck_assert_ok(create("cuda", NULL, NULL, &m));
    fake_record *r = record_of("working");
    klvae_comm_t one = {sizeof one, 0, 1, NULL, one_allreduce, one_broadcast};
    kv_dp *dp = NULL;
    ck_assert_ok(kv_dp_create(&one, m->be, 0.001, &dp)); /* buckets of 1048 bytes */
    ck_assert_ok(kv_dp_start_device(dp, m->plugin, "nccl"));
    ck_assert_str_eq(kv_dp_allreduce_name(dp), "nccl");
    ck_assert_int_eq(r->comm_creates, 1);
    ck_assert_int_eq(r->bootstrap_ok, 1);
    /* five "gradients" of 100, 200, 300, 100 and 50 floats */
    const int sizes[5] = {100, 200, 300, 100, 50};
    kv_tensor grads[5];
    kv_param params[5];
    memset(params, 0, sizeof params);
    for (int i = 0; i < 5; i++) {
        grads[i] = (kv_tensor){NULL, 1, {sizes[i], 0, 0, 0}, KV_F32, true};
        ck_assert_ok(m->be->ops->alloc(m->be, (size_t)sizes[i] * 4, KV_STORAGE_FLOAT32,
                                       &grads[i].data));
        params[i].tensor = &grads[i];
    }
    kv_param_set set = {params, 5};
    ck_assert_ok(kv_dp_net_init(dp, &dp->model, "the test network", set, NULL));
    for (int pass = 0; pass < 2; pass++) {
        const int before = r->buckets;
        ck_assert_ok(kv_dp_grads_begin(dp, &dp->model));
        for (int i = 4; i >= 0; i--) { /* the backward: last layer first */
            ck_assert_ok(kv_dp_grad_written(dp, &dp->model, grads[i].data));
            if (pass == 0) /* recorded only */
                ck_assert_int_eq(r->buckets, before);
        }
        if (pass == 1) /* each launched as soon as written, before the end */
            ck_assert_int_eq(r->buckets - before, 4);
        ck_assert_ok(kv_dp_grads_end(dp, &dp->model));
        /* write order 4, 3 (150 floats: 600 bytes) | 2 (1200: alone) | 1 | 0 */
        ck_assert_int_eq(r->buckets - before, 4);
        ck_assert_int_eq(r->bucket_tensors[before], 2);
        ck_assert_int_eq(r->bucket_floats[before], 150);
        ck_assert_int_eq(r->bucket_floats[before + 1], 300);
        ck_assert_int_eq(r->bucket_floats[before + 2], 200);
        ck_assert_int_eq(r->bucket_floats[before + 3], 100);
        ck_assert_int_eq(r->comm_waits, pass + 1);
        ck_assert_int_eq(r->buckets_at_wait[pass], before + 4); /* the wait comes last */
    }
    kv_dp_free(dp);
    ck_assert_int_eq(r->comm_destroys, 1);
    /* without NCCL: auto sums on the host, nccl is refused with the reason */
    setenv("FAKE_PLUGIN_NO_NCCL", "1", 1);
    ck_assert_ok(kv_dp_create(&one, m->be, 25, &dp));
    ck_assert_ok(kv_dp_start_device(dp, m->plugin, "auto"));
    ck_assert_str_eq(kv_dp_allreduce_name(dp), "host");
    ck_assert_status(kv_dp_start_device(dp, m->plugin, "nccl"), KLVAE_ERR_BACKEND_UNAVAILABLE);
    ck_assert_error_mentions("cannot load NCCL");
    kv_dp_free(dp);
    unsetenv("FAKE_PLUGIN_NO_NCCL");
    /* host sums of a backend whose memory is not the host's: each bucket
     * downloaded into one buffer, summed by one call, uploaded back; here
     * by twin ranks, which double every value */
    int calls = 0;
    klvae_comm_t twins = {sizeof twins, 0, 2, &calls, twin_allreduce, one_broadcast};
    float *values[5];
    for (int i = 0; i < 5; i++) {
        values[i] = test_alloc((size_t)sizes[i]);
        for (int e = 0; e < sizes[i]; e++)
            values[i][e] = (float)(i * 1000 + e);
        ck_assert_ok(m->be->ops->upload(m->be, &grads[i], values[i]));
    }
    ck_assert_ok(kv_dp_create(&twins, m->be, 0.001, &dp));
    ck_assert_ok(kv_dp_start_device(dp, m->plugin, "host"));
    ck_assert_ok(kv_dp_net_init(dp, &dp->model, "the test network", set, NULL));
    ck_assert_ok(kv_dp_grads_begin(dp, &dp->model));
    for (int i = 4; i >= 0; i--)
        ck_assert_ok(kv_dp_grad_written(dp, &dp->model, grads[i].data));
    ck_assert_ok(kv_dp_grads_end(dp, &dp->model));
    ck_assert_int_eq(calls, 4); /* one per bucket */
    for (int i = 0; i < 5; i++) {
        float *back = test_alloc((size_t)sizes[i]);
        ck_assert_ok(m->be->ops->download(m->be, back, &grads[i]));
        for (int e = 0; e < sizes[i]; e++)
            ck_assert_float_eq(back[e], 2.0f * values[i][e]);
        free(back);
        free(values[i]);
    }
    kv_dp_free(dp);
    for (int i = 0; i < 5; i++)
        m->be->ops->release(m->be, grads[i].data);
    klvae_model_free(m);
}
END_TEST

START_TEST(auto_prefers_a_usable_plugin)
{
    use_plugin(fake("working"));
    klvae_model_t *m = NULL;
    ck_assert_ok(create("auto", NULL, "tf32", &m));
    ck_assert_str_eq(klvae_model_backend(m), "cuda");
    char buf[16];
    ck_assert_ok(klvae_model_get(m, "precision", buf, sizeof buf));
    ck_assert_str_eq(buf, "tf32");
    ck_assert_int_eq(record_of("working")->create_precision, KV_PRECISION_TF32);
    klvae_model_free(m);
}
END_TEST

START_TEST(op_errors_come_back_with_their_message)
{
    use_plugin(fake("working"));
    klvae_model_t *m = NULL;
    ck_assert_ok(create("cuda", NULL, NULL, &m));
    const int f = klvae_model_downsampling_factor(m), zc = klvae_model_latent_channels(m);
    const int h = 2 * f, w = 2 * f;
    float *images = test_alloc((size_t)3 * h * w), *mean = test_alloc((size_t)zc * 4),
          *logvar = test_alloc((size_t)zc * 4), *z = test_alloc((size_t)zc * 4);
    ck_assert_status(klvae_encode(m, images, 1, h, w, mean, logvar), KLVAE_ERR_BACKEND);
    ck_assert_error_mentions("fake plugin: conv2d is not implemented");
    ck_assert_status(klvae_decode(m, mean, 1, 2, 2, images), KLVAE_ERR_BACKEND);
    ck_assert_error_mentions("conv2d is not implemented");
    /* sample works on the fake (z = mean + logvar), through upload and download */
    for (int i = 0; i < zc * 4; i++) {
        mean[i] = (float)i;
        logvar[i] = 0.5f;
    }
    ck_assert_ok(klvae_sample(m, mean, logvar, 1, 2, 2, 7, z));
    for (int i = 0; i < zc * 4; i++)
        ck_assert_float_eq(z[i], (float)i + 0.5f);
    fake_record *r = record_of("working");
    ck_assert_int_eq(r->set_streams, 0); /* the host entry points leave the stream alone */
    klvae_model_free(m);
    ck_assert_int_eq(r->live_allocations, 0);
    free(images);
    free(mean);
    free(logvar);
    free(z);
}
END_TEST

START_TEST(trainer_asks_the_table_before_allocating)
{
    /* the fake, like the real plugin of this version, has no training ops */
    use_plugin(fake("working"));
    klvae_model_t *m = NULL;
    ck_assert_ok(create("cuda", NULL, NULL, &m));
    fake_record *r = record_of("working");
    const int live = r->live_allocations, allocs = r->uploads;
    klvae_trainer_t *t = (klvae_trainer_t *)&t; /* must become NULL */
    ck_assert_status(klvae_trainer_create(m, NULL, &t), KLVAE_ERR_UNSUPPORTED);
    ck_assert_ptr_null(t);
    ck_assert_error_mentions("the cuda backend cannot train");
    ck_assert_error_mentions("conv2d_backward_data"); /* the first training op of the list */
    ck_assert_int_eq(r->live_allocations, live);   /* nothing was allocated */
    ck_assert_int_eq(r->uploads, allocs);
    klvae_model_free(m);
    ck_assert_int_eq(r->live_allocations, 0);
}
END_TEST

START_TEST(weights_go_through_upload_and_download)
{
    /* the same fixture loaded on the CPU and on the fake, saved again: the
     * same bytes */
    use_plugin(fake("working"));
    const char *fixture = "fixtures/noquant/diffusers";
    char *dir = test_tmpdir();
    char cpu_dir[4200], cuda_dir[4200], a[4300], b[4300];
    snprintf(cpu_dir, sizeof cpu_dir, "%s/cpu", dir);
    snprintf(cuda_dir, sizeof cuda_dir, "%s/cuda", dir);
    const char *backends[2] = {"cpu", "cuda"};
    const char *dirs[2] = {cpu_dir, cuda_dir};
    for (int i = 0; i < 2; i++) {
        klvae_options_t *o = NULL;
        ck_assert_ok(klvae_options_create(&o));
        ck_assert_ok(klvae_options_set(o, "backend", backends[i]));
        klvae_model_t *m = NULL;
        ck_assert_ok(klvae_model_load(fixture, o, &m));
        ck_assert_str_eq(klvae_model_backend(m), backends[i]);
        ck_assert_ok(klvae_model_save(m, dirs[i]));
        klvae_model_free(m);
        klvae_options_free(o);
    }
    ck_assert_int_gt(record_of("working")->downloads, 0);
    snprintf(a, sizeof a, "%s/diffusion_pytorch_model.safetensors", cpu_dir);
    snprintf(b, sizeof b, "%s/diffusion_pytorch_model.safetensors", cuda_dir);
    FILE *fa = fopen(a, "rb"), *fb = fopen(b, "rb");
    ck_assert_ptr_nonnull(fa);
    ck_assert_ptr_nonnull(fb);
    int ca, cb;
    long at = 0;
    do {
        ca = fgetc(fa);
        cb = fgetc(fb);
        ck_assert_msg(ca == cb, "the saved weights differ at byte %ld", at);
        at++;
    } while (ca != EOF);
    fclose(fa);
    fclose(fb);
    test_rmtree(dir);
    free(dir);
}
END_TEST

/* ---- KLVAE_BACKEND ---- */

START_TEST(env_backend_selects)
{
    use_plugin(fake("no_driver"));
    setenv("KLVAE_BACKEND", "cuda", 1);
    klvae_model_t *m = NULL;
    ck_assert_status(create(NULL, NULL, NULL, &m), KLVAE_ERR_BACKEND_UNAVAILABLE);
    ck_assert_error_mentions("no CUDA driver");
    setenv("KLVAE_BACKEND", "auto", 1);
    expect_auto_cpu("no CUDA driver", NULL);
    /* the option wins over the environment */
    ck_assert_ok(create("cpu", NULL, NULL, &m));
    klvae_model_free(m);
    setenv("KLVAE_BACKEND", "cpu", 1);
    ck_assert_ok(create(NULL, NULL, NULL, &m));
    ck_assert_str_eq(klvae_model_backend(m), "cpu");
    klvae_model_free(m);
}
END_TEST

START_TEST(cpu_never_loads_the_plugin)
{
    use_plugin(fake("working"));
    setenv("KLVAE_BACKEND", "cpu", 1);
    klvae_model_t *m = NULL;
    ck_assert_ok(create(NULL, NULL, NULL, &m));
    ck_assert_str_eq(klvae_model_backend(m), "cpu");
    ck_assert_ptr_null(record_of("working"));
    klvae_model_free(m);
}
END_TEST

/* ---- precision on the CPU ---- */

static void assert_precision(klvae_model_t *m, const char *precision, const char *reason_words)
{
    char buf[256];
    ck_assert_ok(klvae_model_get(m, "precision", buf, sizeof buf));
    ck_assert_str_eq(buf, precision);
    ck_assert_ok(klvae_model_get(m, "precision-reason", buf, sizeof buf));
    if (reason_words)
        ck_assert_msg(strstr(buf, reason_words), "precision_reason '%s' lacks '%s'", buf,
                      reason_words);
    else
        ck_assert_str_eq(buf, "");
}

/* bf16 runs where the CPU has the instructions and says why not elsewhere;
 * tf32 stays the CUDA backend's. */
START_TEST(precision_on_the_cpu)
{
    use_plugin("/nonexistent/libklvae_cuda.so");
    const bool bf16 = kv_bf16_available(NULL, 0);
    klvae_model_t *m = NULL;
    ck_assert_ok(create("auto", NULL, "bf16", &m));
    ck_assert_str_eq(klvae_model_backend(m), "cpu");
    assert_precision(m, bf16 ? "bf16" : "fp32", bf16 ? NULL : "no AVX512-BF16");
    klvae_model_free(m);
    ck_assert_ok(create("cpu", NULL, "bf16", &m));
    assert_precision(m, bf16 ? "bf16" : "fp32", bf16 ? NULL : "no AVX512-BF16");
    klvae_model_free(m);
    /* as on a CPU without them, whatever this one has */
    kv_bf16_hide_for_tests(true);
    ck_assert_ok(create("cpu", NULL, "bf16", &m));
    kv_bf16_hide_for_tests(false);
    assert_precision(m, "fp32", "precision=bf16 computes in fp32 here");
    ck_assert(!kv_cpu_of(m->be)->bf16);
    klvae_model_free(m);
    ck_assert_ok(create("cpu", NULL, "fp32", &m));
    assert_precision(m, "fp32", NULL);
    klvae_model_free(m);
    ck_assert_ok(create("auto", NULL, "tf32", &m));
    assert_precision(m, "fp32", "precision=tf32 needs the CUDA backend");
    klvae_model_free(m);
    m = NULL;
    ck_assert_status(create("cpu", NULL, "tf32", &m), KLVAE_ERR_UNSUPPORTED);
    ck_assert_error_mentions("precision=tf32");
    ck_assert_ptr_null(m);
}
END_TEST

/* ---- device entry points ---- */

START_TEST(device_calls_use_the_callers_stream)
{
    use_plugin(fake("working"));
    klvae_model_t *m = NULL;
    ck_assert_ok(create("cuda", NULL, NULL, &m));
    fake_record *r = record_of("working");
    const int f = klvae_model_downsampling_factor(m), zc = klvae_model_latent_channels(m);
    const int h = 2 * f, w = 2 * f, nz = zc * 4;
    /* the fake's device memory is host memory */
    float *images = test_alloc((size_t)3 * h * w), *mean = test_alloc((size_t)nz),
          *logvar = test_alloc((size_t)nz), *z = test_alloc((size_t)nz);
    void *stream = (void *)(uintptr_t)0x1234;
    int uploads = r->uploads, downloads = r->downloads;

    ck_assert_status(klvae_encode_device(m, images, 1, h, w, mean, logvar, stream),
                     KLVAE_ERR_BACKEND);
    ck_assert_error_mentions("fake plugin: conv2d is not implemented");
    ck_assert_int_eq(r->set_streams, 2);
    ck_assert_ptr_eq(r->streams[0], stream);
    ck_assert_ptr_null(r->streams[1]); /* back on the model's own stream */
    ck_assert_int_eq(r->synchronizes, 1);

    ck_assert_status(klvae_decode_device(m, z, 1, 2, 2, images, NULL), KLVAE_ERR_BACKEND);
    ck_assert_error_mentions("conv2d is not implemented");
    ck_assert_int_eq(r->synchronizes, 2);

    for (int i = 0; i < nz; i++) {
        mean[i] = (float)i;
        logvar[i] = -1.0f;
    }
    ck_assert_ok(klvae_sample_device(m, mean, logvar, 1, 2, 2, 42, z, stream));
    ck_assert_str_eq(klvae_last_error(), "");
    for (int i = 0; i < nz; i++)
        ck_assert_float_eq(z[i], (float)i - 1.0f);
    ck_assert_int_eq(r->set_streams, 6);
    ck_assert_ptr_eq(r->streams[4], stream);
    ck_assert_ptr_null(r->last_stream);
    ck_assert_int_eq(r->synchronizes, 3);
    /* the caller's device arrays are copied in and out on the device, never
     * through the host: images in and nothing out (failed encode), z in and
     * nothing out (failed decode), mean and logvar in and z out (sample) */
    ck_assert_int_eq(r->uploads, uploads);
    ck_assert_int_eq(r->downloads, downloads);
    ck_assert_int_eq(r->imports, 4);
    ck_assert_int_eq(r->exports, 1);

    /* argument errors come first and touch no stream */
    ck_assert_status(klvae_encode_device(m, NULL, 1, h, w, mean, logvar, stream),
                     KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("klvae_encode_device: images is NULL");
    ck_assert_status(klvae_decode_device(m, z, 0, 2, 2, images, NULL), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("klvae_decode_device: n is 0");
    ck_assert_status(klvae_sample_device(m, mean, logvar, 1, 2, 2, 1, mean + 1, NULL),
                     KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("klvae_sample_device: z must be");
    ck_assert_int_eq(r->set_streams, 6);
    klvae_model_free(m);
    ck_assert_int_eq(r->live_allocations, 0);
    free(images);
    free(mean);
    free(logvar);
    free(z);
}
END_TEST

START_TEST(device_calls_on_a_cpu_model)
{
    klvae_model_t *m = NULL;
    ck_assert_ok(create("cpu", NULL, NULL, &m));
    float buf[3 * 16 * 16], out[3 * 16 * 16];
    memset(buf, 0, sizeof buf);
    ck_assert_status(klvae_encode_device(m, buf, 1, 16, 16, out, NULL, NULL),
                     KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("klvae_encode_device: the model runs on the cpu backend");
    ck_assert_error_mentions("use klvae_encode");
    ck_assert_status(klvae_decode_device(m, buf, 1, 2, 2, out, NULL), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("use klvae_decode");
    ck_assert_status(klvae_sample_device(m, buf, buf + 64, 1, 2, 2, 0, out, NULL),
                     KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("use klvae_sample");
    ck_assert_status(klvae_encode_device(NULL, buf, 1, 16, 16, out, NULL, NULL),
                     KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("model is NULL");
    klvae_model_free(m);
}
END_TEST

/* ---- threads ---- */

static void *create_in_thread(void *arg)
{
    (void)arg;
    klvae_model_t *m = NULL;
    klvae_status_t st = create("cuda", NULL, NULL, &m);
    bool ok = st == KLVAE_OK && strcmp(klvae_model_backend(m), "cuda") == 0;
    klvae_model_free(m);
    return ok ? (void *)1 : NULL;
}

START_TEST(first_use_from_several_threads)
{
    use_plugin(fake("working"));
    pthread_t threads[4];
    for (int i = 0; i < 4; i++)
        ck_assert_int_eq(pthread_create(&threads[i], NULL, create_in_thread, NULL), 0);
    for (int i = 0; i < 4; i++) {
        void *ok = NULL;
        pthread_join(threads[i], &ok);
        ck_assert_ptr_nonnull(ok);
    }
    fake_record *r = record_of("working");
    ck_assert_int_eq(r->creates, 4);
    ck_assert_int_eq(r->destroys, 4);
}
END_TEST

Suite *suite_plugin(void)
{
    Suite *s = suite_create("plugin");
    TCase *tc = tcase_create("loader");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, cuda_without_plugin_names_where_it_looked);
    tcase_add_test(tc, auto_without_plugin_is_cpu_with_a_reason);
    tcase_add_test(tc, plugin_beside_the_core_waits_for_a_driver);
    tcase_add_test(tc, env_path_missing_is_not_searched_further);
    tcase_add_test(tc, not_a_shared_object);
    tcase_add_test(tc, no_entry_point);
    tcase_add_test(tc, abi_version_mismatch);
    tcase_add_test(tc, trainer_asks_the_table_before_allocating);
    tcase_add_test(tc, probe_without_driver);
    tcase_add_test(tc, create_out_of_memory);
    tcase_add_test(tc, backend_lacking_an_op);
    tcase_add_test(tc, outcome_is_kept_until_reset);
    suite_add_tcase(s, tc);

    tc = tcase_create("fake");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, cuda_reaches_the_plugin_with_its_settings);
    tcase_add_test(tc, auto_prefers_a_usable_plugin);
    tcase_add_test(tc, gradient_sums_reach_the_plugin_bucket_by_bucket);
    tcase_add_test(tc, op_errors_come_back_with_their_message);
    tcase_add_test(tc, weights_go_through_upload_and_download);
    tcase_add_test(tc, env_backend_selects);
    tcase_add_test(tc, cpu_never_loads_the_plugin);
    tcase_add_test(tc, precision_on_the_cpu);
    tcase_add_test(tc, first_use_from_several_threads);
    suite_add_tcase(s, tc);

    tc = tcase_create("device");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, device_calls_use_the_callers_stream);
    tcase_add_test(tc, device_calls_on_a_cpu_model);
    suite_add_tcase(s, tc);
    return s;
}
