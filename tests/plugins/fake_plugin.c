/* fake_plugin.c — stand-ins for libklvae_cuda.so, to test the plugin loader
 * and the CUDA code paths of the core without a GPU (tests/test_plugin.c).
 *
 * The Makefile builds one shared object per mode, build/tests/plugins/
 * fake_MODE.so, compiled with -DFAKE_MODE_<mode>:
 *
 *   working     a plugin whose "device" memory is host memory (malloc): alloc,
 *               release, trim, upload, download work; gaussian_sample writes
 *               z = mean + logvar (a recognisable value, not a sample); every
 *               other op fails with KLVAE_ERR_BACKEND "fake plugin: OP is not
 *               implemented". It records what the core asked of it in
 *               fake_plugin_record (read by the tests with dlsym). Its
 *               data-parallel functions (plugin ABI 4) stand in for NCCL:
 *               comm_create bootstraps through the host's broadcast as the
 *               real one does (FAKE_PLUGIN_NO_NCCL=1 in the environment:
 *               KLVAE_ERR_BACKEND_UNAVAILABLE, as without libnccl), and
 *               comm_allreduce records each bucket and sums nothing (a
 *               world of one rank).
 *   no_entry    exports no klvae_plugin_entry;
 *   bad_abi     reports ABI version 7;
 *   no_driver   probe fails: KLVAE_ERR_BACKEND_UNAVAILABLE "no CUDA driver";
 *   create_oom  create fails: KLVAE_ERR_OUT_OF_MEMORY;
 *   incomplete  create returns a backend whose op table lacks attention.
 *
 * Every mode's backend, like the real plugin of this version, has the
 * inference ops of KV_BACKEND_OPS and none of the training ops.
 *
 * It includes the core's headers for the types only and links nothing of
 * libklvae, as the real plugin must not. */
#include <stdlib.h>
#include <string.h>

#include "backend/plugin.h"
#include "fake_plugin.h"

#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wunused-function" /* the training ops' fake_fail_* */

#define FAKE_EXPORT __attribute__((visibility("default")))

FAKE_EXPORT fake_record fake_plugin_record;

static const kv_plugin_host *host;

/* Counters may be bumped from several threads at once (the thread test). */
#define BUMP(field) __atomic_add_fetch(&fake_plugin_record.field, 1, __ATOMIC_SEQ_CST)
#define DROP(field) __atomic_sub_fetch(&fake_plugin_record.field, 1, __ATOMIC_SEQ_CST)

static klvae_status_t fail(const char *op)
{
    char message[128];
    strcpy(message, "fake plugin: ");
    strcat(message, op);
    strcat(message, " is not implemented");
    return host->set_error(KLVAE_ERR_BACKEND, message);
}

static size_t numel(const kv_tensor *t)
{
    size_t n = 1;
    for (int i = 0; i < t->ndim; i++)
        n *= (size_t)t->shape[i];
    return n;
}

/* ---- memory: host memory behind the backend's interface ---- */

static void fake_destroy(kv_backend *be)
{
    BUMP(destroys);
    free(be);
}

static klvae_status_t fake_alloc(kv_backend *be, size_t bytes, kv_storage storage, void **out)
{
    (void)storage;
    *out = malloc(bytes ? bytes : 1);
    if (!*out)
        return host->set_error(KLVAE_ERR_OUT_OF_MEMORY, "fake plugin: out of memory");
    BUMP(live_allocations);
    return KLVAE_OK;
}

static void fake_release(kv_backend *be, void *ptr)
{
    if (ptr)
        DROP(live_allocations);
    free(ptr);
}

static void fake_trim(kv_backend *be, bool keep)
{
    (void)keep;
}

static klvae_status_t fake_upload(kv_backend *be, kv_tensor *dst, const float *src)
{
    BUMP(uploads);
    memcpy(dst->data, src, numel(dst) * sizeof(float));
    return KLVAE_OK;
}

static klvae_status_t fake_download(kv_backend *be, float *dst, const kv_tensor *src)
{
    BUMP(downloads);
    memcpy(dst, src->data, numel(src) * sizeof(float));
    return KLVAE_OK;
}

static klvae_status_t fake_gaussian_sample(kv_backend *be, const kv_tensor *mean,
                                           const kv_tensor *logvar, uint64_t seed, uint64_t first,
                                           kv_tensor *z)
{
    (void)first;
    const float *m = mean->data, *l = logvar->data;
    float *out = z->data;
    for (size_t i = 0, n = numel(z); i < n; i++)
        out[i] = m[i] + l[i];
    return KLVAE_OK;
}

/* ---- every other inference op fails; training ops are absent ---- */

/* fake_fail_NAME for every op of the list, failing with its name. */
#define FAKE_FAILING(family, name, needed_by, params)                                           \
    static klvae_status_t fake_fail_##name params                                               \
    {                                                                                           \
        return fail(#name);                                                                     \
    }
KV_BACKEND_OPS(FAKE_FAILING)
#undef FAKE_FAILING

/* Like the real plugin of this version: the inference ops and no training
 * op, which the core must notice before it trains. */
#define FAKE_ENTRY(family, name, needed_by, params) FAKE_ENTRY_##needed_by(name)
#define FAKE_ENTRY_KV_OP_INFERENCE(name) t.name = fake_fail_##name;
#define FAKE_ENTRY_KV_OP_TRAINING(name)

static kv_backend_ops fake_table(void)
{
    kv_backend_ops t;
    memset(&t, 0, sizeof t);
    t.name = "cuda";
    t.destroy = fake_destroy;
    t.alloc = fake_alloc;
    t.release = fake_release;
    t.trim = fake_trim;
    t.upload = fake_upload;
    t.download = fake_download;
    KV_BACKEND_OPS(FAKE_ENTRY)
    t.gaussian_sample = fake_gaussian_sample;
#if defined(FAKE_MODE_incomplete)
    t.attention = NULL;
#endif
    return t;
}

/* ---- the plugin table ---- */

static klvae_status_t fake_probe(const kv_plugin_host *h, int device)
{
    __atomic_store_n(&host, h, __ATOMIC_SEQ_CST);
    BUMP(probes);
    fake_plugin_record.probe_device = device;
#if defined(FAKE_MODE_no_driver)
    return h->set_error(KLVAE_ERR_BACKEND_UNAVAILABLE, "no CUDA driver");
#else
    return KLVAE_OK;
#endif
}

static klvae_status_t fake_create(const kv_plugin_host *h, const kv_plugin_settings *settings,
                                  kv_backend **out)
{
    __atomic_store_n(&host, h, __ATOMIC_SEQ_CST);
    *out = NULL;
    BUMP(creates);
    fake_plugin_record.create_device = settings->device;
    fake_plugin_record.create_precision = (int)settings->precision;
#if defined(FAKE_MODE_create_oom)
    return h->set_error(KLVAE_ERR_OUT_OF_MEMORY,
                        "out of memory creating the cuDNN handle (fake plugin)");
#else
    /* the table lives with the backend: creates may run on several threads */
    struct fake_backend {
        kv_backend be;
        kv_backend_ops ops;
    } *fb = calloc(1, sizeof *fb);
    if (!fb)
        return h->set_error(KLVAE_ERR_OUT_OF_MEMORY, "fake plugin: out of memory");
    fb->ops = fake_table();
    kv_backend *be = &fb->be;
    be->ops = &fb->ops;
    be->host_memory = false; /* exercise the core's upload / download path */
    *out = be;
    return KLVAE_OK;
#endif
}

static klvae_status_t fake_set_stream(kv_backend *be, void *stream)
{
    if (fake_plugin_record.set_streams < 8)
        fake_plugin_record.streams[fake_plugin_record.set_streams] = stream;
    BUMP(set_streams);
    fake_plugin_record.last_stream = stream;
    return KLVAE_OK;
}

static klvae_status_t fake_synchronize(kv_backend *be)
{
    BUMP(synchronizes);
    return KLVAE_OK;
}

/* The fake's device memory is host memory: a device copy is a memcpy. */
static klvae_status_t fake_import_device(kv_backend *be, kv_tensor *dst, const float *src)
{
    BUMP(imports);
    memcpy(dst->data, src, numel(dst) * sizeof(float));
    return KLVAE_OK;
}

static klvae_status_t fake_export_device(kv_backend *be, float *dst, const kv_tensor *src)
{
    BUMP(exports);
    memcpy(dst, src->data, numel(src) * sizeof(float));
    return KLVAE_OK;
}

/* ---- data-parallel functions (ABI 4), a world of one rank ---- */

struct kv_device_comm {
    int rank;
};

#define FAKE_NCCL_ID "fake-nccl-unique-id"

static klvae_status_t fake_comm_create(kv_backend *be, const kv_plugin_comm_host *comm,
                                       struct kv_device_comm **out)
{
    *out = NULL;
    const char *no = getenv("FAKE_PLUGIN_NO_NCCL");
    if (no && *no == '1')
        return host->set_error(KLVAE_ERR_BACKEND_UNAVAILABLE,
                               "NCCL cannot be used on rank 0: cannot load NCCL (fake)");
    char id[32] = "";
    if (comm->rank == 0)
        strcpy(id, FAKE_NCCL_ID);
    if (comm->broadcast(comm->ctx, id, sizeof id, 0) != 0)
        return host->set_error(KLVAE_ERR_COMM, "fake plugin: the broadcast failed");
    fake_plugin_record.bootstrap_ok = strcmp(id, FAKE_NCCL_ID) == 0;
    *out = calloc(1, sizeof **out);
    if (!*out)
        return host->set_error(KLVAE_ERR_OUT_OF_MEMORY, "fake plugin: out of memory");
    (*out)->rank = comm->rank;
    BUMP(comm_creates);
    return KLVAE_OK;
}

static klvae_status_t fake_comm_allreduce(struct kv_device_comm *c, kv_tensor *const *tensors,
                                          size_t count)
{
    int k = fake_plugin_record.buckets++;
    if (k < 16) {
        fake_plugin_record.bucket_tensors[k] = (int)count;
        long floats = 0;
        for (size_t i = 0; i < count; i++)
            floats += (long)numel(tensors[i]);
        fake_plugin_record.bucket_floats[k] = floats;
    }
    return KLVAE_OK;
}

static klvae_status_t fake_comm_wait(struct kv_device_comm *c)
{
    if (fake_plugin_record.comm_waits < 4)
        fake_plugin_record.buckets_at_wait[fake_plugin_record.comm_waits] =
            fake_plugin_record.buckets;
    BUMP(comm_waits);
    return KLVAE_OK;
}

static void fake_comm_destroy(struct kv_device_comm *c)
{
    if (c)
        BUMP(comm_destroys);
    free(c);
}

static const kv_plugin fake_plugin = {
#if defined(FAKE_MODE_bad_abi)
    .abi_version = 7,
#else
    .abi_version = KV_PLUGIN_ABI_VERSION,
#endif
    .struct_size = sizeof(kv_plugin),
    .name = "cuda",
    .version = "0.1.0-fake",
    .probe = fake_probe,
    .create = fake_create,
    .set_stream = fake_set_stream,
    .synchronize = fake_synchronize,
    .import_device = fake_import_device,
    .export_device = fake_export_device,
    .comm_create = fake_comm_create,
    .comm_allreduce = fake_comm_allreduce,
    .comm_wait = fake_comm_wait,
    .comm_destroy = fake_comm_destroy,
};

#if defined(FAKE_MODE_no_entry)
FAKE_EXPORT const kv_plugin *not_the_entry_point(void)
#else
FAKE_EXPORT const kv_plugin *klvae_plugin_entry(void)
#endif
{
    return &fake_plugin;
}
