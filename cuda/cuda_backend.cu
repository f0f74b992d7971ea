/* cuda_backend.cu — the CUDA backend plugin: the exported entry point, probe
 * and create, memory (a caching allocator, cuda/device_cache.cuh), upload
 * and download, streams, error reporting, and the op table. The ops live in
 * conv2d.cu, group_norm.cu, elementwise.cu, attention.cu and posterior.cu.
 *
 * The plugin never links libklvae: errors go to the core through
 * kv_plugin_host.set_error, which every backend keeps from create. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

klvae_status_t kv_cuda_fail(const kv_cuda *cu, cudaError_t e, const char *call)
{
    (void)cudaGetLastError(); /* clears a non-sticky error */
    if (e == cudaErrorMemoryAllocation)
        return kv_cuda_error(cu, KLVAE_ERR_OUT_OF_MEMORY, "CUDA is out of device memory (%s)",
                             call);
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

/* ---- memory ---- */

static int dev_malloc(void *ctx, size_t bytes, void **ptr)
{
    cudaError_t e = cudaMalloc(ptr, bytes);
    if (e == cudaSuccess)
        return KV_DCACHE_OK;
    ((kv_cuda *)ctx)->malloc_error = (int)e;
    (void)cudaGetLastError();
    *ptr = NULL;
    return e == cudaErrorMemoryAllocation ? KV_DCACHE_OOM : KV_DCACHE_FAIL;
}

static void dev_free(void *ctx, void *ptr)
{
    (void)ctx;
    (void)cudaFree(ptr);
}

/* Before memory goes back to the device, the work queued on it must end. */
static void before_free(void *ctx)
{
    kv_cuda *cu = (kv_cuda *)ctx;
    (void)cudaStreamSynchronize(cu->stream);
}

static klvae_status_t cache_status(kv_cuda *cu, int rc, size_t bytes, const char *what)
{
    if (rc == KV_DCACHE_OK)
        return KLVAE_OK;
    if (rc == KV_DCACHE_OOM) {
        size_t free_bytes = 0, total = 0;
        (void)cudaMemGetInfo(&free_bytes, &total);
        (void)cudaGetLastError();
        return kv_cuda_error(cu, KLVAE_ERR_OUT_OF_MEMORY,
                             "out of device memory allocating %zu bytes for %s on device %d "
                             "(%zu MiB free of %zu MiB; this backend holds %zu MiB)",
                             bytes, what, cu->device, free_bytes >> 20, total >> 20,
                             cu->cache.reserved >> 20);
    }
    return kv_cuda_error(cu, KLVAE_ERR_BACKEND, "cudaMalloc of %zu bytes for %s failed: %s",
                         bytes, what, cudaGetErrorString((cudaError_t)cu->malloc_error));
}

kv_cuda_dtype kv_cuda_dtype_of(const kv_cuda *cu, const void *ptr)
{
    if (cu->compute != KV_CUDA_BF16)
        return KV_CUDA_F32;
    const kv_dcache_block *b = kv_dcache_lookup(&cu->cache, ptr);
    return b && b->bf16 ? KV_CUDA_BF16 : KV_CUDA_F32;
}

klvae_status_t kv_cuda_reserve(kv_cuda *cu, kv_cuda_buffer_id id, size_t bytes, void **ptr)
{
    kv_cuda_buffer *b = &cu->buffers[id];
    if (b->ptr && b->bytes >= bytes) {
        *ptr = b->ptr;
        return KLVAE_OK;
    }
    if (b->ptr) {
        kv_dcache_drop(&cu->cache, b->ptr);
        b->ptr = NULL;
        b->bytes = 0;
    }
    void *p = NULL;
    KV_TRY(cache_status(cu, kv_dcache_alloc(&cu->cache, bytes, 0, &p), bytes,
                        "a work buffer"));
    b->ptr = p;
    b->bytes = bytes;
    *ptr = p;
    return KLVAE_OK;
}

klvae_status_t kv_cuda_temp(kv_cuda *cu, size_t bytes, void **ptr)
{
    *ptr = NULL;
    return cache_status(cu, kv_dcache_alloc(&cu->cache, bytes, 0, ptr), bytes, "a work buffer");
}

void kv_cuda_temp_release(kv_cuda *cu, void *ptr)
{
    if (ptr)
        kv_dcache_release(&cu->cache, ptr);
}

static void drop_buffers(kv_cuda *cu)
{
    for (int i = 0; i < KV_BUF_COUNT; i++)
        if (cu->buffers[i].ptr) {
            kv_dcache_drop(&cu->cache, cu->buffers[i].ptr);
            cu->buffers[i].ptr = NULL;
            cu->buffers[i].bytes = 0;
        }
}

static klvae_status_t cuda_alloc(kv_backend *be, size_t bytes, void **out)
{
    kv_cuda *cu = kv_cuda_of(be);
    *out = NULL;
    KV_CU(cu, cudaSetDevice(cu->device));
    /* The core asks for 4 bytes per element; in bf16 mode a tensor holds 2. */
    int bf16 = cu->compute == KV_CUDA_BF16;
    size_t want = bf16 ? (bytes + 1) / 2 : bytes;
    return cache_status(cu, kv_dcache_alloc(&cu->cache, want, bf16, out), want, "a tensor");
}

static void cuda_release(kv_backend *be, void *ptr)
{
    if (ptr)
        kv_dcache_release(&kv_cuda_of(be)->cache, ptr);
}

static void write_memstats(kv_cuda *cu, const char *when)
{
    if (!cu->memstats_path)
        return;
    FILE *fp = fopen(cu->memstats_path, "a");
    if (fp) {
        fprintf(fp,
                "klvae-cuda-memstats %s peak_in_use=%zu peak_reserved=%zu reserved=%zu "
                "device_allocs=%zu device_frees=%zu\n",
                when, cu->cache.peak_in_use, cu->cache.peak_reserved, cu->cache.reserved,
                cu->cache.device_allocs, cu->cache.device_frees);
        fclose(fp);
    }
}

static void cuda_trim(kv_backend *be)
{
    kv_cuda *cu = kv_cuda_of(be);
    if (cudaSetDevice(cu->device) != cudaSuccess) {
        (void)cudaGetLastError();
        return;
    }
    write_memstats(cu, "trim");
    drop_buffers(cu);
    kv_dcache_free_cached(&cu->cache, 0);
    cu->cache.peak_in_use = cu->cache.in_use;
    cu->cache.peak_reserved = cu->cache.reserved;
}

/* ---- conversion between float32 and bf16 ---- */

static __global__ void convert_kernel(const void *x, int x16, void *y, int y16, size_t count)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x)
        kv_st(y, y16, i, kv_ld(x, x16, i));
}

klvae_status_t kv_cuda_convert(kv_cuda *cu, const void *x, kv_cuda_dtype tx, void *y,
                               kv_cuda_dtype ty, size_t count)
{
    if (!count)
        return KLVAE_OK;
    if (tx == ty) {
        if (x != y)
            KV_CU(cu, cudaMemcpyAsync(y, x, count * kv_cuda_esize(tx), cudaMemcpyDeviceToDevice,
                                      cu->stream));
        return KLVAE_OK;
    }
    convert_kernel<<<kv_cuda_blocks(count, cu), 256, 0, cu->stream>>>(
        x, tx == KV_CUDA_BF16, y, ty == KV_CUDA_BF16, count);
    KV_LAUNCHED(cu, convert_kernel);
    return KLVAE_OK;
}

#define KV_STAGE_FLOATS ((size_t)2 << 20) /* 8 MiB of float32 per piece */

static klvae_status_t cuda_upload(kv_backend *be, void *dst, const float *src, size_t count)
{
    kv_cuda *cu = kv_cuda_of(be);
    KV_CU(cu, cudaSetDevice(cu->device));
    if (kv_cuda_dtype_of(cu, dst) == KV_CUDA_F32) {
        KV_CU(cu, cudaMemcpyAsync(dst, src, count * sizeof(float), cudaMemcpyHostToDevice,
                                  cu->stream));
    } else {
        size_t piece = count < KV_STAGE_FLOATS ? count : KV_STAGE_FLOATS;
        void *stage = NULL;
        KV_TRY(kv_cuda_reserve(cu, KV_BUF_STAGE, piece * sizeof(float), &stage));
        for (size_t i = 0; i < count; i += piece) {
            size_t n = count - i < piece ? count - i : piece;
            KV_CU(cu, cudaMemcpyAsync(stage, src + i, n * sizeof(float), cudaMemcpyHostToDevice,
                                      cu->stream));
            KV_TRY(kv_cuda_convert(cu, stage, KV_CUDA_F32, (uint16_t *)dst + i, KV_CUDA_BF16, n));
        }
    }
    /* the caller may reuse src at once, also when it is pinned memory */
    KV_CU(cu, cudaStreamSynchronize(cu->stream));
    return KLVAE_OK;
}

static klvae_status_t cuda_download(kv_backend *be, float *dst, const void *src, size_t count)
{
    kv_cuda *cu = kv_cuda_of(be);
    KV_CU(cu, cudaSetDevice(cu->device));
    if (kv_cuda_dtype_of(cu, src) == KV_CUDA_F32) {
        KV_CU(cu, cudaMemcpyAsync(dst, src, count * sizeof(float), cudaMemcpyDeviceToHost,
                                  cu->stream));
    } else {
        size_t piece = count < KV_STAGE_FLOATS ? count : KV_STAGE_FLOATS;
        void *stage = NULL;
        KV_TRY(kv_cuda_reserve(cu, KV_BUF_STAGE, piece * sizeof(float), &stage));
        for (size_t i = 0; i < count; i += piece) {
            size_t n = count - i < piece ? count - i : piece;
            KV_TRY(kv_cuda_convert(cu, (const uint16_t *)src + i, KV_CUDA_BF16, stage,
                                   KV_CUDA_F32, n));
            KV_CU(cu, cudaMemcpyAsync(dst + i, stage, n * sizeof(float), cudaMemcpyDeviceToHost,
                                      cu->stream));
        }
    }
    KV_CU(cu, cudaStreamSynchronize(cu->stream));
    return KLVAE_OK;
}

/* ---- the backend ---- */

static void cuda_destroy(kv_backend *be);

/* The ops this backend has, by name; every other op of KV_BACKEND_OPS is
 * NULL in its table (the core asks before it needs one: a CUDA model cannot
 * create a trainer until the training ops are here). */
#define KV_CUDA_OPS(X)                                                                          \
    X(conv2d) X(group_norm_stats) X(group_norm) X(add) X(upsample_nearest2x) X(attention)       \
    X(posterior_split) X(gaussian_sample) X(activation) X(scale) X(lerp) X(axpy) X(fill)

static kv_backend_ops cuda_table(void)
{
    kv_backend_ops t;
    memset(&t, 0, sizeof t);
    t.name = "cuda";
    t.destroy = cuda_destroy;
    t.alloc = cuda_alloc;
    t.release = cuda_release;
    t.trim = cuda_trim;
    t.upload = cuda_upload;
    t.download = cuda_download;
#define KV_CUDA_SET(name) t.name = kv_cuda_##name;
    KV_CUDA_OPS(KV_CUDA_SET)
#undef KV_CUDA_SET
    return t;
}

static const kv_backend_ops cuda_ops = cuda_table();

/* Releases what create made, also when it stopped half way. */
static void context_free(kv_cuda *cu)
{
    if (!cu)
        return;
    if (cudaSetDevice(cu->device) == cudaSuccess) {
        if (cu->own_stream)
            (void)cudaStreamSynchronize(cu->own_stream);
        if (cu->stream && cu->stream != cu->own_stream)
            (void)cudaStreamSynchronize(cu->stream);
        cu->stream = cu->own_stream;
        write_memstats(cu, "destroy");
        drop_buffers(cu);
        if (cu->cache.dev_malloc)
            kv_dcache_destroy(&cu->cache);
        kv_cuda_conv_forget(cu);
        if (cu->x_desc)
            cudnnDestroyTensorDescriptor(cu->x_desc);
        if (cu->y_desc)
            cudnnDestroyTensorDescriptor(cu->y_desc);
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
    int major = 0, minor = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
        (void)cudaGetLastError();
        return host_error(host, KLVAE_ERR_BACKEND_UNAVAILABLE,
                          "cannot read the compute capability of device %d", device);
    }
    if (major < 8)
        return host_error(host, KLVAE_ERR_BACKEND_UNAVAILABLE,
                          "device %d has compute capability %d.%d; this plugin is built for 8.0 "
                          "(Ampere) and newer",
                          device, major, minor);
    return KLVAE_OK;
}

/* create's steps after the context exists; cu is freed by the caller on
 * failure. */
static klvae_status_t context_init(kv_cuda *cu)
{
    KV_CU(cu, cudaSetDevice(cu->device));
    KV_CU(cu, cudaStreamCreateWithFlags(&cu->own_stream, cudaStreamNonBlocking));
    cu->stream = cu->own_stream;
    KV_CU(cu, cudaDeviceGetAttribute(&cu->sm_count, cudaDevAttrMultiProcessorCount, cu->device));
    cu->cache.ctx = cu;
    cu->cache.dev_malloc = dev_malloc;
    cu->cache.dev_free = dev_free;
    cu->cache.before_free = before_free;
    const char *keep = getenv("KLVAE_CUDA_KEEP_CACHE");
    cu->cache.keep_on_miss = keep && strcmp(keep, "1") == 0;

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
    KV_CUDNN(cu, cudnnCreateFilterDescriptor(&cu->w_desc));
    KV_CUDNN(cu, cudnnCreateConvolutionDescriptor(&cu->conv_desc));
    cu->conv_budget = env_bytes("KLVAE_CUDA_CONV_BUDGET", KV_CUDA_CONV_BUDGET);
    cu->attention_budget = env_bytes("KLVAE_CUDA_ATTENTION_BUDGET", KV_CUDA_ATTENTION_BUDGET);
    const char *search = getenv("KLVAE_CUDA_CONV_SEARCH");
    cu->conv_search = !(search && strcmp(search, "0") == 0);
    const char *stats = getenv("KLVAE_CUDA_MEMSTATS");
    cu->memstats_path = stats && *stats ? stats : NULL;
    return KLVAE_OK;
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
    *out = be;
    return KLVAE_OK;
}

static klvae_status_t plugin_set_stream(kv_backend *be, void *stream)
{
    kv_cuda *cu = kv_cuda_of(be);
    cudaStream_t next = stream ? (cudaStream_t)stream : cu->own_stream;
    if (next == cu->stream)
        return KLVAE_OK;
    KV_CU(cu, cudaSetDevice(cu->device));
    /* Blocks released on the old stream may be reused on the new one only
     * after the work that used them is done. */
    KV_CU(cu, cudaStreamSynchronize(cu->stream));
    KV_CUBLAS(cu, cublasSetStream(cu->cublas, next));
    KV_CUDNN(cu, cudnnSetStream(cu->cudnn, next));
    cu->stream = next;
    return KLVAE_OK;
}

static klvae_status_t plugin_synchronize(kv_backend *be)
{
    kv_cuda *cu = kv_cuda_of(be);
    KV_CU(cu, cudaSetDevice(cu->device));
    KV_CU(cu, cudaStreamSynchronize(cu->stream));
    write_memstats(cu, "sync");
    return KLVAE_OK;
}

static const kv_plugin the_plugin = {
    KV_PLUGIN_ABI_VERSION, sizeof(kv_plugin), "cuda", KV_CUDA_PLUGIN_VERSION,
    plugin_probe,          plugin_create,     plugin_set_stream, plugin_synchronize,
};

extern "C" __attribute__((visibility("default"))) const kv_plugin *klvae_plugin_entry(void)
{
    return &the_plugin;
}
