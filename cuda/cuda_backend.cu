/* cuda_backend.cu — the CUDA backend plugin: the exported entry point, probe
 * and create, streams, error reporting, and the op table, whose every entry
 * runs in the backend's device scope and reports asynchronous faults
 * (kv_op_guard). Memory, upload and download are in memory.cu; the ops in
 * the file of their family (cuda_ops.h).
 *
 * The plugin never links libklvae: errors go to the core through
 * kv_plugin_host.set_error, which every backend keeps from create. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm.h"
#include "cuda_ops.h"

#define KV_CUDA_STR2(x) #x
#define KV_CUDA_STR(x) KV_CUDA_STR2(x)
#define KV_CUDA_PLUGIN_VERSION                                                                  \
    KV_CUDA_STR(KLVAE_VERSION_MAJOR) "." KV_CUDA_STR(KLVAE_VERSION_MINOR) "." KV_CUDA_STR(        \
        KLVAE_VERSION_PATCH)

/* ---- errors ---- */

static klvae_status_t report(klvae_status_t (*set_error)(klvae_status_t, const char *),
                             klvae_status_t status, const char *fmt, va_list ap)
{
    char message[1024];
    vsnprintf(message, sizeof message, fmt, ap);
    return set_error ? set_error(status, message) : status;
}

klvae_status_t kv_cuda_error(const kv_cuda *cu, klvae_status_t status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    klvae_status_t st = report(cu ? cu->set_error : NULL, status, fmt, ap);
    va_end(ap);
    return st;
}

static klvae_status_t host_error(const kv_plugin_host *host, klvae_status_t status,
                                 const char *fmt, ...) KV_PRINTF(3, 4);
static klvae_status_t host_error(const kv_plugin_host *host, klvae_status_t status,
                                 const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    klvae_status_t st = report(host ? host->set_error : NULL, status, fmt, ap);
    va_end(ap);
    return st;
}

/* Errors that leave the CUDA context unusable: a kernel faulted. */
static bool sticky(cudaError_t e)
{
    switch (e) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorHardwareStackError:
    case cudaErrorAssert:
    case cudaErrorECCUncorrectable:
    case cudaErrorLaunchTimeout:
        return true;
    default:
        return false;
    }
}

klvae_status_t kv_cuda_fail(const kv_cuda *cu, cudaError_t e, const char *call)
{
    (void)cudaGetLastError(); /* clears a non-sticky error */
    if (e == cudaErrorMemoryAllocation)
        return kv_cuda_error(cu, KLVAE_ERR_OUT_OF_MEMORY, "CUDA is out of device memory (%s)",
                             call);
    if (sticky(e))
        return kv_cuda_error(cu, KLVAE_ERR_BACKEND,
                             "CUDA error in %s: %s (%s): a kernel faulted on the device, in this "
                             "op or an earlier one (the device reports faults when it is next "
                             "asked; KLVAE_CUDA_DEBUG=1 waits after every op and names the one "
                             "that faulted). The CUDA context cannot be used any more: restart "
                             "the process to use the GPU again",
                             call, cudaGetErrorString(e), cudaGetErrorName(e));
    return kv_cuda_error(cu, KLVAE_ERR_BACKEND, "CUDA error in %s: %s (%s)", call,
                         cudaGetErrorString(e), cudaGetErrorName(e));
}

klvae_status_t kv_cudnn_fail(const kv_cuda *cu, cudnnStatus_t s, const char *call)
{
    if (s == CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED ||
        s == CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED)
        return kv_cuda_error(cu, KLVAE_ERR_OUT_OF_MEMORY, "cuDNN ran out of memory in %s (%s)",
                             call, cudnnGetErrorString(s));
    return kv_cuda_error(cu, KLVAE_ERR_BACKEND, "cuDNN error in %s: %s (status %d)", call,
                         cudnnGetErrorString(s), (int)s);
}

klvae_status_t kv_cublas_fail(const kv_cuda *cu, cublasStatus_t s, const char *call)
{
    if (s == CUBLAS_STATUS_ALLOC_FAILED)
        return kv_cuda_error(cu, KLVAE_ERR_OUT_OF_MEMORY, "cuBLAS ran out of memory in %s",
                             call);
    return kv_cuda_error(cu, KLVAE_ERR_BACKEND, "cuBLAS error in %s: %s (status %d)", call,
                         cublasGetStatusString(s), (int)s);
}

/* ---- the op table ---- */

/* What every entry of the table does around the op: the backend's device
 * current for the call (the caller's back after it), an error left by an
 * earlier release or an earlier asynchronous fault reported first, and in
 * debug mode (KLVAE_CUDA_DEBUG=1) a wait for the op's work, so that a fault
 * is reported under the op that caused it. */
static klvae_status_t op_begin(kv_cuda *cu, const char *name, const kv_device_scope &scope)
{
    if (!scope.ok)
        return kv_cuda_error(cu, KLVAE_ERR_BACKEND, "%s: cannot make CUDA device %d current",
                             name, cu->device);
    if (cu->deferred != cudaSuccess) {
        cudaError_t e = cu->deferred;
        cu->deferred = cudaSuccess;
        return kv_cuda_fail(cu, e, cu->deferred_call);
    }
    cudaError_t e = cudaPeekAtLastError();
    if (e != cudaSuccess)
        return kv_cuda_fail(cu, e, "work queued before this op");
    return KLVAE_OK;
}

static klvae_status_t op_end(kv_cuda *cu, const char *name, klvae_status_t st)
{
    if (st != KLVAE_OK || !cu->debug)
        return st;
    cudaError_t e = cudaStreamSynchronize(cu->stream);
    if (e == cudaSuccess)
        e = cudaGetLastError();
    if (e != cudaSuccess) {
        char call[96];
        snprintf(call, sizeof call, "op %s (KLVAE_CUDA_DEBUG)", name);
        return kv_cuda_fail(cu, e, call);
    }
    return KLVAE_OK;
}

template <typename F, F f, const char *Name> struct kv_op_guard;
template <typename... A, klvae_status_t (*F)(kv_backend *, A...), const char *Name>
struct kv_op_guard<klvae_status_t (*)(kv_backend *, A...), F, Name> {
    static klvae_status_t call(kv_backend *be, A... args)
    {
        kv_cuda *cu = kv_cuda_of(be);
        kv_device_scope scope(cu->device);
        klvae_status_t st = op_begin(cu, Name, scope);
        if (st == KLVAE_OK)
            st = F(be, args...);
        return op_end(cu, Name, st);
    }
};
#define KV_GUARDED(fn, name) kv_op_guard<decltype(&fn), &fn, name>::call

/* The ops this backend has, by name: every op of KV_BACKEND_OPS (an op
 * missing here would be NULL in the table, and the core would refuse what
 * needs it, naming it). */
#define KV_CUDA_OPS(X)                                                                          \
    X(conv2d) X(group_norm_stats) X(group_norm) X(add) X(upsample_nearest2x) X(attention)       \
    X(posterior_split) X(gaussian_sample) X(conv2d_backward_data) X(conv2d_backward_weight)     \
    X(group_norm_backward) X(attention_backward) X(upsample_nearest2x_backward) X(activation)    \
    X(activation_backward) X(channel_affine) X(max_pool2x2) X(max_pool2x2_backward)             \
    X(unit_normalize) X(unit_normalize_backward) X(lpips_distance) X(batch_norm_stats)          \
    X(batch_norm) X(batch_norm_backward_stats) X(batch_norm_backward) X(pixel_loss)             \
    X(logit_loss) X(posterior_backward) X(kl_sum) X(adam) X(sum_squares) X(scale) X(lerp)       \
    X(axpy) X(fill)

#define KV_CUDA_NAME(name) static constexpr char kv_op_name_##name[] = #name;
KV_CUDA_OPS(KV_CUDA_NAME)
#undef KV_CUDA_NAME
static constexpr char kv_op_name_upload[] = "upload";
static constexpr char kv_op_name_download[] = "download";
static constexpr char kv_op_name_import[] = "import_device";
static constexpr char kv_op_name_export[] = "export_device";

static void cuda_destroy(kv_backend *be);

static kv_backend_ops cuda_table(void)
{
    kv_backend_ops t;
    memset(&t, 0, sizeof t);
    t.name = "cuda";
    t.destroy = cuda_destroy;
    t.alloc = kv_cuda_alloc;
    t.release = kv_cuda_release;
    t.trim = kv_cuda_trim;
    t.upload = KV_GUARDED(kv_cuda_upload, kv_op_name_upload);
    t.download = KV_GUARDED(kv_cuda_download, kv_op_name_download);
#define KV_CUDA_SET(name) t.name = KV_GUARDED(kv_cuda_##name, kv_op_name_##name);
    KV_CUDA_OPS(KV_CUDA_SET)
#undef KV_CUDA_SET
    return t;
}

static const kv_backend_ops cuda_ops = cuda_table();

/* ---- create and destroy ---- */

/* Releases what create made, also when it stopped half way. */
static void context_free(kv_cuda *cu)
{
    if (!cu)
        return;
    kv_device_scope scope(cu->device);
    if (scope.ok) {
        if (cu->stream && cu->stream != cu->own_stream)
            (void)cudaStreamSynchronize(cu->stream);
        if (cu->own_stream)
            (void)cudaStreamSynchronize(cu->own_stream);
        cu->stream = cu->own_stream;
        if (cu->pool) {
            kv_cuda_write_memstats(cu, "destroy");
            /* blocks still out (none, unless the core leaked) go with the pool */
            (void)cudaMemPoolDestroy(cu->pool);
        }
        if (cu->host_scalars)
            (void)cudaFreeHost(cu->host_scalars);
        if (cu->identity)
            cudnnDestroyActivationDescriptor(cu->identity);
        if (cu->x_desc)
            cudnnDestroyTensorDescriptor(cu->x_desc);
        if (cu->y_desc)
            cudnnDestroyTensorDescriptor(cu->y_desc);
        if (cu->bias_desc)
            cudnnDestroyTensorDescriptor(cu->bias_desc);
        if (cu->w_desc)
            cudnnDestroyFilterDescriptor(cu->w_desc);
        if (cu->conv_desc)
            cudnnDestroyConvolutionDescriptor(cu->conv_desc);
        if (cu->cudnn)
            cudnnDestroy(cu->cudnn);
        if (cu->cublas)
            cublasDestroy(cu->cublas);
        if (cu->own_stream)
            cudaStreamDestroy(cu->own_stream);
    }
    (void)cudaGetLastError();
    kv_ttable_free(&cu->table);
    free(cu);
}

static void cuda_destroy(kv_backend *be)
{
    if (!be)
        return;
    context_free(kv_cuda_of(be));
    free(be);
}

static size_t env_bytes(const char *name, size_t fallback)
{
    const char *v = getenv(name);
    if (!v || !*v)
        return fallback;
    char *end = NULL;
    unsigned long long n = strtoull(v, &end, 10);
    return end && *end == '\0' && n > 0 ? (size_t)n : fallback;
}

static bool env_is(const char *name, const char *value)
{
    const char *v = getenv(name);
    return v && strcmp(v, value) == 0;
}

/* ---- the plugin ---- */

static klvae_status_t plugin_probe(const kv_plugin_host *host, int device)
{
    int driver = 0;
    cudaError_t e = cudaDriverGetVersion(&driver);
    if (e != cudaSuccess || driver == 0) {
        (void)cudaGetLastError();
        return host_error(host, KLVAE_ERR_BACKEND_UNAVAILABLE,
                          "no CUDA driver (libcuda.so.1 is not installed or does not load)");
    }
    if (driver / 1000 < CUDART_VERSION / 1000)
        return host_error(host, KLVAE_ERR_BACKEND_UNAVAILABLE,
                          "driver too old for this plugin: the driver supports CUDA %d.%d, the "
                          "plugin was built with CUDA %d.%d and needs a CUDA %d driver",
                          driver / 1000, driver % 1000 / 10, CUDART_VERSION / 1000,
                          CUDART_VERSION % 1000 / 10, CUDART_VERSION / 1000);
    int count = 0;
    e = cudaGetDeviceCount(&count);
    if (e == cudaErrorNoDevice || (e == cudaSuccess && count == 0)) {
        (void)cudaGetLastError();
        return host_error(host, KLVAE_ERR_BACKEND_UNAVAILABLE, "no CUDA device");
    }
    if (e == cudaErrorInsufficientDriver) {
        (void)cudaGetLastError();
        return host_error(host, KLVAE_ERR_BACKEND_UNAVAILABLE,
                          "driver too old for this plugin (%s)", cudaGetErrorString(e));
    }
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return host_error(host, KLVAE_ERR_BACKEND_UNAVAILABLE,
                          "CUDA cannot be initialised: %s (%s)", cudaGetErrorString(e),
                          cudaGetErrorName(e));
    }
    if (device < 0 || device >= count)
        return host_error(host, KLVAE_ERR_BACKEND_UNAVAILABLE,
                          "device %d does not exist (%d device%s)", device, count,
                          count == 1 ? "" : "s");
    int major = 0, minor = 0, pools = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, device) != cudaSuccess) {
        (void)cudaGetLastError();
        return host_error(host, KLVAE_ERR_BACKEND_UNAVAILABLE,
                          "cannot read the attributes of CUDA device %d", device);
    }
    if (major < 8)
        return host_error(host, KLVAE_ERR_BACKEND_UNAVAILABLE,
                          "device %d has compute capability %d.%d; this plugin is built for 8.0 "
                          "(Ampere) and newer",
                          device, major, minor);
    if (!pools)
        return host_error(host, KLVAE_ERR_BACKEND_UNAVAILABLE,
                          "device %d does not support stream-ordered memory pools "
                          "(cudaMallocAsync), which this plugin allocates from",
                          device);
    return KLVAE_OK;
}

static klvae_status_t create_pool(kv_cuda *cu)
{
    cudaMemPoolProps props;
    memset(&props, 0, sizeof props);
    props.allocType = cudaMemAllocationTypePinned;
    props.handleTypes = cudaMemHandleTypeNone;
    props.location.type = cudaMemLocationTypeDevice;
    props.location.id = cu->device;
    KV_CU(cu, cudaMemPoolCreate(&cu->pool, &props));
    /* keep freed memory for reuse until trim says otherwise */
    uint64_t keep = UINT64_MAX;
    KV_CU(cu, cudaMemPoolSetAttribute(cu->pool, cudaMemPoolAttrReleaseThreshold, &keep));
    return KLVAE_OK;
}

static klvae_status_t create_libraries(kv_cuda *cu)
{
    cublasStatus_t bs = cublasCreate(&cu->cublas);
    if (bs != CUBLAS_STATUS_SUCCESS) {
        cu->cublas = NULL;
        return kv_cublas_fail(cu, bs, "cublasCreate");
    }
    KV_CUBLAS(cu, cublasSetStream(cu->cublas, cu->stream));
    /* fp32: no TF32 anywhere; tf32: TF32 products; bf16: the GEMMs say bf16 */
    KV_CUBLAS(cu, cublasSetMathMode(cu->cublas, cu->precision == KV_PRECISION_TF32
                                                    ? CUBLAS_TF32_TENSOR_OP_MATH
                                                    : CUBLAS_DEFAULT_MATH));
    cudnnStatus_t ds = cudnnCreate(&cu->cudnn);
    if (ds != CUDNN_STATUS_SUCCESS) {
        cu->cudnn = NULL;
        if (ds == CUDNN_STATUS_SUBLIBRARY_LOADING_FAILED ||
            ds == CUDNN_STATUS_SUBLIBRARY_VERSION_MISMATCH)
            return kv_cuda_error(cu, KLVAE_ERR_BACKEND_UNAVAILABLE,
                                 "cuDNN cannot be used: %s (cudnnCreate; is every libcudnn_*.so.9 "
                                 "of one cuDNN 9 on the library path?)",
                                 cudnnGetErrorString(ds));
        return kv_cudnn_fail(cu, ds, "cudnnCreate");
    }
    KV_CUDNN(cu, cudnnSetStream(cu->cudnn, cu->stream));
    KV_CUDNN(cu, cudnnCreateTensorDescriptor(&cu->x_desc));
    KV_CUDNN(cu, cudnnCreateTensorDescriptor(&cu->y_desc));
    KV_CUDNN(cu, cudnnCreateTensorDescriptor(&cu->bias_desc));
    KV_CUDNN(cu, cudnnCreateFilterDescriptor(&cu->w_desc));
    KV_CUDNN(cu, cudnnCreateConvolutionDescriptor(&cu->conv_desc));
    KV_CUDNN(cu, cudnnCreateActivationDescriptor(&cu->identity));
    KV_CUDNN(cu, cudnnSetActivationDescriptor(cu->identity, CUDNN_ACTIVATION_IDENTITY,
                                              CUDNN_NOT_PROPAGATE_NAN, 0.0));
    return KLVAE_OK;
}

/* The settings read from the environment (cuda/README.md). */
static void read_environment(kv_cuda *cu, size_t free_bytes)
{
    cu->conv_budget = env_bytes("KLVAE_CUDA_CONV_BUDGET", KV_CUDA_CONV_BUDGET);
    cu->attention_budget = env_bytes("KLVAE_CUDA_ATTENTION_BUDGET", KV_CUDA_ATTENTION_BUDGET);
    size_t workspace = free_bytes / 8 < KV_CUDA_WORKSPACE_MAX ? free_bytes / 8
                                                              : KV_CUDA_WORKSPACE_MAX;
    cu->workspace_max = env_bytes("KLVAE_CUDA_WORKSPACE", workspace);
    cu->conv_search = !env_is("KLVAE_CUDA_CONV_SEARCH", "0");
    cu->fused_epilogue = !env_is("KLVAE_CUDA_FUSED", "0");
    const char *algo = getenv("KLVAE_CUDA_CONV_ALGO");
    char *end = NULL;
    long forced = algo && *algo ? strtol(algo, &end, 10) : -1;
    /* a value that is not an algorithm number forces none (and create says so) */
    cu->forced_algo = algo && *algo && (!end || *end || forced < 0 || forced > 7) ? -2
                                                                                   : (int)forced;
    cu->debug = env_is("KLVAE_CUDA_DEBUG", "1");
    /* NHWC where tensor cores run (tf32, bf16); fp32 keeps the CPU's NCHW */
    cu->nhwc = cu->precision != KV_PRECISION_FP32;
    if (env_is("KLVAE_CUDA_LAYOUT", "nchw"))
        cu->nhwc = 0;
    else if (env_is("KLVAE_CUDA_LAYOUT", "nhwc"))
        cu->nhwc = 1;
    const char *stats = getenv("KLVAE_CUDA_MEMSTATS");
    cu->memstats_path = stats && *stats ? stats : NULL;
}

/* create's steps after the context exists; cu is freed by the caller on
 * failure. */
static klvae_status_t context_init(kv_cuda *cu)
{
    kv_device_scope scope(cu->device);
    if (!scope.ok)
        return kv_cuda_error(cu, KLVAE_ERR_BACKEND, "cannot make CUDA device %d current",
                             cu->device);
    KV_CU(cu, cudaStreamCreateWithFlags(&cu->own_stream, cudaStreamNonBlocking));
    cu->stream = cu->own_stream;
    KV_CU(cu, cudaDeviceGetAttribute(&cu->sm_count, cudaDevAttrMultiProcessorCount, cu->device));
    size_t free_bytes = 0, total = 0;
    KV_CU(cu, cudaMemGetInfo(&free_bytes, &total));
    read_environment(cu, free_bytes);
    if (cu->forced_algo == -2)
        return kv_cuda_error(cu, KLVAE_ERR_OPTION,
                             "KLVAE_CUDA_CONV_ALGO is '%s'; it must be a cuDNN forward algorithm "
                             "number from 0 to 7",
                             getenv("KLVAE_CUDA_CONV_ALGO"));
    KV_TRY(create_pool(cu));
    KV_CU(cu, cudaMallocHost(&cu->host_scalars, KV_CUDA_HOST_SCALARS));
    return create_libraries(cu);
}

static klvae_status_t plugin_create(const kv_plugin_host *host, const kv_plugin_settings *settings,
                                    kv_backend **out)
{
    if (!out)
        return host_error(host, KLVAE_ERR_INVALID_ARGUMENT, "CUDA plugin create: out is NULL");
    *out = NULL;
    if (!settings || settings->struct_size < sizeof(kv_plugin_settings))
        return host_error(host, KLVAE_ERR_BACKEND_UNAVAILABLE,
                          "CUDA plugin create: the settings are from another version of "
                          "libklvae (struct_size %u, expected %zu)",
                          settings ? settings->struct_size : 0u, sizeof(kv_plugin_settings));
    if (settings->precision != KV_PRECISION_FP32 && settings->precision != KV_PRECISION_TF32 &&
        settings->precision != KV_PRECISION_BF16)
        return host_error(host, KLVAE_ERR_OPTION, "CUDA plugin create: unknown precision %d",
                          (int)settings->precision);
    klvae_status_t st = plugin_probe(host, settings->device);
    if (st != KLVAE_OK)
        return st;
    kv_cuda *cu = (kv_cuda *)calloc(1, sizeof *cu);
    kv_backend *be = (kv_backend *)calloc(1, sizeof *be);
    if (!cu || !be) {
        free(cu);
        free(be);
        return host_error(host, KLVAE_ERR_OUT_OF_MEMORY, "out of memory creating the CUDA backend");
    }
    cu->device = settings->device;
    cu->precision = settings->precision;
    cu->compute = settings->precision == KV_PRECISION_BF16 ? KV_CUDA_BF16 : KV_CUDA_F32;
    cu->set_error = host ? host->set_error : NULL;
    st = context_init(cu);
    if (st != KLVAE_OK) {
        context_free(cu);
        free(be);
        return st;
    }
    be->ops = &cuda_ops;
    be->ctx = cu;
    be->host_memory = false;
    be->lossy_storage = cu->compute != KV_CUDA_F32;
    *out = be;
    return KLVAE_OK;
}

static klvae_status_t set_stream(kv_backend *be, void *stream)
{
    kv_cuda *cu = kv_cuda_of(be);
    cudaStream_t next = stream ? (cudaStream_t)stream : cu->own_stream;
    if (next == cu->stream)
        return KLVAE_OK;
    /* Blocks released on the old stream are reused on the new one only after
     * the work that used them is done. */
    KV_CU(cu, cudaStreamSynchronize(cu->stream));
    KV_CUBLAS(cu, cublasSetStream(cu->cublas, next));
    cudnnStatus_t s = cudnnSetStream(cu->cudnn, next);
    if (s != CUDNN_STATUS_SUCCESS) { /* all or nothing: cuBLAS goes back too */
        (void)cublasSetStream(cu->cublas, cu->stream);
        return kv_cudnn_fail(cu, s, "cudnnSetStream");
    }
    cu->stream = next;
    return KLVAE_OK;
}

static klvae_status_t synchronize(kv_backend *be)
{
    kv_cuda *cu = kv_cuda_of(be);
    KV_CU(cu, cudaStreamSynchronize(cu->stream));
    kv_cuda_write_memstats(cu, "sync");
    return KLVAE_OK;
}

static constexpr char kv_name_set_stream[] = "set_stream";
static constexpr char kv_name_synchronize[] = "synchronize";

static const kv_plugin the_plugin = {
    KV_PLUGIN_ABI_VERSION,
    sizeof(kv_plugin),
    "cuda",
    KV_CUDA_PLUGIN_VERSION,
    plugin_probe,
    plugin_create,
    KV_GUARDED(set_stream, kv_name_set_stream),
    KV_GUARDED(synchronize, kv_name_synchronize),
    KV_GUARDED(kv_cuda_import, kv_op_name_import),
    KV_GUARDED(kv_cuda_export, kv_op_name_export),
    /* data-parallel gradient sums with NCCL (comm.cu) */
    kv_cuda_comm_create,
    kv_cuda_comm_allreduce,
    kv_cuda_comm_wait,
    kv_cuda_comm_destroy,
};

extern "C" __attribute__((visibility("default"))) const kv_plugin *klvae_plugin_entry(void)
{
    return &the_plugin;
}
