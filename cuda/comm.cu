/* comm.cu — data-parallel gradient sums on the GPUs with NCCL (plugin ABI 4,
 * src/backend/plugin.h): the communicator, bootstrapped through the
 * program's own (rank 0 makes the ncclUniqueId and the program's broadcast
 * callback sends it: over MPI for the klvae tool), and the sum of one
 * gradient bucket on a stream of its own, queued after the backward work so
 * far, so that the backward of the layers before it goes on meanwhile. The
 * core decides the buckets and when each is launched (src/train/buckets.h,
 * src/train/dp.c); this file only moves them.
 *
 * NCCL is loaded with dlopen when a communicator is made (the file
 * KLVAE_NCCL_LIBRARY names, else libnccl.so.2), so the plugin still loads
 * where NCCL is not installed; nccl.h gives only the types. */
#include <dlfcn.h>
#include <nccl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm.h"
#include "cuda_ops.h"

/* ---- NCCL, loaded once per process and never unloaded ---- */

struct nccl_api {
    ncclResult_t (*get_unique_id)(ncclUniqueId *);
    ncclResult_t (*comm_init_rank)(ncclComm_t *, int, ncclUniqueId, int);
    ncclResult_t (*all_reduce)(const void *, void *, size_t, ncclDataType_t, ncclRedOp_t,
                               ncclComm_t, cudaStream_t);
    ncclResult_t (*group_start)(void);
    ncclResult_t (*group_end)(void);
    ncclResult_t (*comm_destroy)(ncclComm_t);
    ncclResult_t (*comm_get_async_error)(ncclComm_t, ncclResult_t *);
    const char *(*get_error_string)(ncclResult_t);
};

static pthread_mutex_t nccl_lock = PTHREAD_MUTEX_INITIALIZER;
static nccl_api nccl;
static int nccl_state; /* 0 not tried, 1 loaded, -1 failed (nccl_why says why) */
static char nccl_why[512];

template <typename F> static bool find(void *lib, const char *name, F *out)
{
    *out = (F)dlsym(lib, name);
    if (!*out)
        snprintf(nccl_why, sizeof nccl_why, "the NCCL library has no %s", name);
    return *out != NULL;
}

static bool nccl_load(char *why, size_t size)
{
    pthread_mutex_lock(&nccl_lock);
    if (nccl_state == 0) {
        const char *path = getenv("KLVAE_NCCL_LIBRARY");
        if (!path || !*path)
            path = "libnccl.so.2";
        void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
        bool ok = lib != NULL;
        if (!ok)
            snprintf(nccl_why, sizeof nccl_why,
                     "cannot load NCCL (%s; KLVAE_NCCL_LIBRARY names another file)", dlerror());
        ok = ok && find(lib, "ncclGetUniqueId", &nccl.get_unique_id) &&
             find(lib, "ncclCommInitRank", &nccl.comm_init_rank) &&
             find(lib, "ncclAllReduce", &nccl.all_reduce) &&
             find(lib, "ncclGroupStart", &nccl.group_start) &&
             find(lib, "ncclGroupEnd", &nccl.group_end) &&
             find(lib, "ncclCommDestroy", &nccl.comm_destroy) &&
             find(lib, "ncclCommGetAsyncError", &nccl.comm_get_async_error) &&
             find(lib, "ncclGetErrorString", &nccl.get_error_string);
        nccl_state = ok ? 1 : -1;
    }
    snprintf(why, size, "%s", nccl_state == 1 ? "" : nccl_why);
    bool ok = nccl_state == 1;
    pthread_mutex_unlock(&nccl_lock);
    return ok;
}

static klvae_status_t nccl_fail(const kv_cuda *cu, ncclResult_t r, const char *call)
{
    return kv_cuda_error(cu, KLVAE_ERR_BACKEND, "NCCL error in %s: %s (%d)", call,
                         nccl.get_error_string(r), (int)r);
}

#define KV_NCCL(cu, call)                                                                       \
    do {                                                                                        \
        ncclResult_t r_ = (call);                                                               \
        if (r_ != ncclSuccess)                                                                  \
            return nccl_fail((cu), r_, #call);                                                  \
    } while (0)

/* ---- the communicator ---- */

struct kv_device_comm {
    kv_cuda *cu;
    ncclComm_t comm;
    cudaStream_t stream;     /* the sums' own */
    cudaEvent_t ready, done; /* the backward so far; the sums so far */
};

/* Every rank learns whether NCCL loaded on every rank: the lowest rank
 * where it did not is named to all, with its reason. */
static klvae_status_t agree_loaded(const kv_cuda *cu, const kv_plugin_comm_host *host, bool loaded,
                                   char *why, size_t size)
{
    double *failed = (double *)calloc((size_t)host->size, sizeof *failed);
    if (!failed)
        return kv_cuda_error(cu, KLVAE_ERR_OUT_OF_MEMORY, "out of memory starting NCCL");
    failed[host->rank] = loaded ? 0.0 : 1.0;
    int rc = host->allreduce_sum(host->ctx, failed, (size_t)host->size, KLVAE_COMM_FLOAT64);
    int first = -1;
    for (int r = 0; rc == 0 && r < host->size && first < 0; r++)
        if (failed[r] != 0.0)
            first = r;
    free(failed);
    if (rc == 0 && first >= 0)
        rc = host->broadcast(host->ctx, why, size, first);
    if (rc != 0)
        return kv_cuda_error(cu, KLVAE_ERR_COMM,
                             "the communicator's callback failed (returned %d) while starting "
                             "NCCL",
                             rc);
    if (first < 0)
        return KLVAE_OK;
    why[size - 1] = '\0';
    return kv_cuda_error(cu, KLVAE_ERR_BACKEND_UNAVAILABLE, "NCCL cannot be used on rank %d: %s",
                         first, why);
}

/* NCCL's communicator over the host's ranks: rank 0's unique id, broadcast. */
static klvae_status_t init_rank(const kv_cuda *cu, const kv_plugin_comm_host *host,
                                ncclComm_t *comm)
{
    struct {
        int32_t status;
        ncclUniqueId id;
    } boot;
    memset(&boot, 0, sizeof boot);
    if (host->rank == 0)
        boot.status = (int32_t)nccl.get_unique_id(&boot.id);
    int rc = host->broadcast(host->ctx, &boot, sizeof boot, 0);
    if (rc != 0)
        return kv_cuda_error(cu, KLVAE_ERR_COMM,
                             "the communicator's broadcast failed (returned %d) sending NCCL's "
                             "unique id",
                             rc);
    if (boot.status != ncclSuccess)
        return nccl_fail(cu, (ncclResult_t)boot.status, "ncclGetUniqueId (on rank 0)");
    KV_NCCL(cu, nccl.comm_init_rank(comm, host->size, boot.id, host->rank));
    return KLVAE_OK;
}

void kv_cuda_comm_destroy(kv_device_comm *c)
{
    if (!c)
        return;
    kv_device_scope scope(c->cu->device);
    if (c->stream)
        (void)cudaStreamSynchronize(c->stream);
    if (c->comm)
        (void)nccl.comm_destroy(c->comm);
    if (c->ready)
        (void)cudaEventDestroy(c->ready);
    if (c->done)
        (void)cudaEventDestroy(c->done);
    if (c->stream)
        (void)cudaStreamDestroy(c->stream);
    free(c);
}

static klvae_status_t comm_start(kv_device_comm *c, const kv_plugin_comm_host *host)
{
    kv_cuda *cu = c->cu;
    kv_device_scope scope(cu->device);
    if (!scope.ok)
        return kv_cuda_error(cu, KLVAE_ERR_BACKEND, "NCCL: cannot make CUDA device %d current",
                             cu->device);
    KV_TRY(init_rank(cu, host, &c->comm));
    KV_CU(cu, cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
    KV_CU(cu, cudaEventCreateWithFlags(&c->ready, cudaEventDisableTiming));
    KV_CU(cu, cudaEventCreateWithFlags(&c->done, cudaEventDisableTiming));
    return KLVAE_OK;
}

klvae_status_t kv_cuda_comm_create(kv_backend *be, const kv_plugin_comm_host *host,
                                   kv_device_comm **out)
{
    *out = NULL;
    kv_cuda *cu = kv_cuda_of(be);
    char why[512];
    bool loaded = nccl_load(why, sizeof why);
    KV_TRY(agree_loaded(cu, host, loaded, why, sizeof why));
    kv_device_comm *c = (kv_device_comm *)calloc(1, sizeof *c);
    if (!c)
        return kv_cuda_error(cu, KLVAE_ERR_OUT_OF_MEMORY, "out of memory starting NCCL");
    c->cu = cu;
    klvae_status_t st = comm_start(c, host);
    if (st != KLVAE_OK) {
        kv_cuda_comm_destroy(c);
        return st;
    }
    *out = c;
    return KLVAE_OK;
}

klvae_status_t kv_cuda_comm_allreduce(kv_device_comm *c, kv_tensor *const *tensors, size_t count)
{
    kv_cuda *cu = c->cu;
    kv_device_scope scope(cu->device);
    if (!scope.ok)
        return kv_cuda_error(cu, KLVAE_ERR_BACKEND, "NCCL: cannot make CUDA device %d current",
                             cu->device);
    for (size_t i = 0; i < count; i++) { /* the trainer's gradients are kept in float32 */
        kv_cuda_dtype d;
        KV_TRY(kv_cuda_dtype_of(cu, tensors[i]->data, "the gradient sum", "a gradient", &d));
        if (d != KV_CUDA_F32)
            return kv_cuda_error(cu, KLVAE_ERR_INTERNAL,
                                 "the gradient sum: gradient %zu of the bucket is not float32", i);
    }
    /* after the backward work queued so far, on the sums' stream */
    KV_CU(cu, cudaEventRecord(c->ready, cu->stream));
    KV_CU(cu, cudaStreamWaitEvent(c->stream, c->ready, 0));
    /* one launch for the bucket: NCCL fuses the operations of a group */
    KV_NCCL(cu, nccl.group_start());
    ncclResult_t r = ncclSuccess;
    for (size_t i = 0; i < count && r == ncclSuccess; i++)
        r = nccl.all_reduce(tensors[i]->data, tensors[i]->data, kv_cuda_numel(tensors[i]),
                            ncclFloat, ncclSum, c->comm, c->stream);
    ncclResult_t end = nccl.group_end();
    if (r != ncclSuccess)
        return nccl_fail(cu, r, "ncclAllReduce");
    if (end != ncclSuccess)
        return nccl_fail(cu, end, "ncclGroupEnd");
    return KLVAE_OK;
}

klvae_status_t kv_cuda_comm_wait(kv_device_comm *c)
{
    kv_cuda *cu = c->cu;
    kv_device_scope scope(cu->device);
    if (!scope.ok)
        return kv_cuda_error(cu, KLVAE_ERR_BACKEND, "NCCL: cannot make CUDA device %d current",
                             cu->device);
    KV_CU(cu, cudaEventRecord(c->done, c->stream));
    KV_CU(cu, cudaStreamWaitEvent(cu->stream, c->done, 0));
    ncclResult_t async = ncclSuccess;
    KV_NCCL(cu, nccl.comm_get_async_error(c->comm, &async));
    if (async != ncclSuccess && async != ncclInProgress)
        return nccl_fail(cu, async, "an earlier gradient sum (ncclCommGetAsyncError)");
    return KLVAE_OK;
}
