/* memory.cu — the CUDA backend's memory: blocks from a stream-ordered pool,
 * the table of their dtypes (tensor_table.cuh), and the copies between the
 * core's float32 NCHW arrays (host memory for upload and download, a
 * caller's device memory for import and export) and the backend's storage
 * (cuda_ops.h, "Storage"; the maps in layout_plan.cuh).
 *
 * No path here synchronises the device except upload and download, which
 * must leave the host array free for the caller, and trim gives memory back
 * without waiting either: the pool keeps what the last call used at most,
 * so the next call of the same size allocates nothing. */
#include <stdio.h>

#include "cuda_ops.h"

/* ---- blocks ---- */

static klvae_status_t out_of_memory(kv_cuda *cu, size_t bytes, const char *what)
{
    size_t free_bytes = 0, total = 0;
    (void)cudaMemGetInfo(&free_bytes, &total);
    (void)cudaGetLastError();
    return kv_cuda_error(cu, KLVAE_ERR_OUT_OF_MEMORY,
                         "out of device memory allocating %zu bytes for %s on device %d (%zu MiB "
                         "free of %zu MiB; this backend has %zu MiB in use)",
                         bytes, what, cu->device, free_bytes >> 20, total >> 20,
                         cu->table.in_use >> 20);
}

static klvae_status_t block_alloc(kv_cuda *cu, size_t bytes, int bf16, const char *what,
                                  void **out)
{
    *out = NULL;
    void *p = NULL;
    cudaError_t e = cudaMallocFromPoolAsync(&p, bytes ? bytes : 16, cu->pool, cu->stream);
    if (e == cudaErrorMemoryAllocation) {
        (void)cudaGetLastError();
        return out_of_memory(cu, bytes, what);
    }
    if (e != cudaSuccess)
        return kv_cuda_fail(cu, e, "cudaMallocFromPoolAsync");
    kv_block_info b;
    b.ptr = p;
    b.bytes = bytes;
    b.bf16 = (unsigned char)(bf16 ? 1 : 0);
    if (kv_ttable_insert(&cu->table, b) != 0) {
        (void)cudaFreeAsync(p, cu->stream);
        return kv_cuda_error(cu, KLVAE_ERR_OUT_OF_MEMORY,
                             "out of host memory recording a device block");
    }
    *out = p;
    return KLVAE_OK;
}

static void block_free(kv_cuda *cu, void *ptr)
{
    if (!ptr)
        return;
    (void)kv_ttable_remove(&cu->table, ptr);
    cudaError_t e = cudaFreeAsync(ptr, cu->stream);
    if (e != cudaSuccess && cu->deferred == cudaSuccess) {
        cu->deferred = e;
        cu->deferred_call = "cudaFreeAsync";
    }
}

klvae_status_t kv_cuda_dtype_of(const kv_cuda *cu, const void *ptr, const char *op,
                                const char *what, kv_cuda_dtype *out)
{
    *out = KV_CUDA_F32;
    if (cu->compute == KV_CUDA_F32) /* every block is float32 */
        return KLVAE_OK;
    const kv_block_info *b = kv_ttable_find(&cu->table, ptr);
    if (!b)
        return kv_cuda_error(cu, KLVAE_ERR_INTERNAL,
                             "%s: %s (%p) is not memory of this CUDA backend", op, what, ptr);
    *out = b->bf16 ? KV_CUDA_BF16 : KV_CUDA_F32;
    return KLVAE_OK;
}

klvae_status_t kv_cuda_bf16_flag(const kv_cuda *cu, const char *op, const kv_tensor *t,
                                 const char *what, int *bf16)
{
    kv_cuda_dtype d;
    KV_TRY(kv_cuda_dtype_of(cu, t->data, op, what, &d));
    *bf16 = d == KV_CUDA_BF16;
    return KLVAE_OK;
}

klvae_status_t kv_cuda_temp(kv_cuda *cu, size_t bytes, const char *what, void **ptr)
{
    *ptr = NULL;
    return bytes ? block_alloc(cu, bytes, 0, what, ptr) : KLVAE_OK;
}

void kv_cuda_temp_free(kv_cuda *cu, void *ptr)
{
    block_free(cu, ptr);
}

klvae_status_t kv_cuda_alloc(kv_backend *be, size_t bytes, kv_storage storage, void **out)
{
    kv_cuda *cu = kv_cuda_of(be);
    *out = NULL;
    kv_device_scope scope(cu->device);
    if (!scope.ok)
        return kv_cuda_error(cu, KLVAE_ERR_BACKEND, "cannot make device %d current", cu->device);
    /* The core asks for 4 bytes per element; a bf16 tensor holds 2. */
    const int bf16 = cu->compute == KV_CUDA_BF16 && storage == KV_STORAGE_COMPUTE;
    return block_alloc(cu, bf16 ? (bytes + 1) / 2 : bytes, bf16, "a tensor", out);
}

void kv_cuda_release(kv_backend *be, void *ptr)
{
    kv_cuda *cu = kv_cuda_of(be);
    kv_device_scope scope(cu->device);
    block_free(cu, ptr);
}

void kv_cuda_write_memstats(kv_cuda *cu, const char *when)
{
    if (!cu->memstats_path)
        return;
    uint64_t reserved = 0, reserved_high = 0;
    (void)cudaMemPoolGetAttribute(cu->pool, cudaMemPoolAttrReservedMemCurrent, &reserved);
    (void)cudaMemPoolGetAttribute(cu->pool, cudaMemPoolAttrReservedMemHigh, &reserved_high);
    (void)cudaGetLastError();
    FILE *fp = fopen(cu->memstats_path, "a");
    if (fp) {
        fprintf(fp, "klvae-cuda-memstats %s peak_in_use=%zu peak_reserved=%llu reserved=%llu\n",
                when, cu->table.peak, (unsigned long long)reserved_high,
                (unsigned long long)reserved);
        fclose(fp);
    }
}

void kv_cuda_trim(kv_backend *be, bool keep)
{
    kv_cuda *cu = kv_cuda_of(be);
    kv_device_scope scope(cu->device);
    kv_cuda_write_memstats(cu, "trim");
    /* keep: what the last call needed at most; else all but what is in
     * use. What is still queued on the stream stays whatever this says. */
    (void)cudaMemPoolTrimTo(cu->pool, keep ? cu->table.peak : 0);
    (void)cudaGetLastError();
    cu->table.peak = cu->table.in_use;
    uint64_t zero = 0;
    (void)cudaMemPoolSetAttribute(cu->pool, cudaMemPoolAttrReservedMemHigh, &zero);
    (void)cudaGetLastError();
}

klvae_status_t kv_cuda_to_host(kv_cuda *cu, const void *device, size_t bytes)
{
    if (bytes > KV_CUDA_HOST_SCALARS)
        return kv_cuda_error(cu, KLVAE_ERR_INTERNAL, "%zu bytes of results for the host", bytes);
    KV_CU(cu, cudaMemcpyAsync(cu->host_scalars, device, bytes, cudaMemcpyDeviceToHost,
                              cu->stream));
    KV_CU(cu, cudaStreamSynchronize(cu->stream));
    return KLVAE_OK;
}

klvae_status_t kv_cuda_from_host(kv_cuda *cu, const void *host, size_t bytes, const char *what,
                                 void **device)
{
    KV_TRY(kv_cuda_temp(cu, bytes, what, device));
    if (!bytes)
        return KLVAE_OK;
    cudaError_t e = cudaMemcpyAsync(*device, host, bytes, cudaMemcpyHostToDevice, cu->stream);
    /* From pageable memory the copy has taken the bytes when it returns; from
     * pinned memory it may still be queued, so wait for it. */
    cudaPointerAttributes attr;
    if (e == cudaSuccess && cudaPointerGetAttributes(&attr, host) == cudaSuccess &&
        attr.type == cudaMemoryTypeHost)
        e = cudaStreamSynchronize(cu->stream);
    (void)cudaGetLastError(); /* cudaPointerGetAttributes of a plain pointer */
    if (e != cudaSuccess) {
        kv_cuda_temp_free(cu, *device);
        *device = NULL;
        return kv_cuda_fail(cu, e, "cudaMemcpyAsync");
    }
    return KLVAE_OK;
}

/* ---- conversions ---- */

/* The map of a tensor between NCHW order and the backend's storage. */
struct layout_map {
    int nhwc, ndim, c, h, w;
};

static layout_map map_of(const kv_cuda *cu, const kv_tensor *t)
{
    layout_map m;
    m.nhwc = cu->nhwc && t->ndim == 4;
    m.ndim = t->ndim;
    m.c = t->ndim == 4 ? t->shape[1] : 1;
    m.h = t->ndim == 4 ? t->shape[2] : 1;
    m.w = t->ndim == 4 ? t->shape[3] : 1;
    return m;
}

/* dst (storage) at the place of NCHW elements [i0, i0 + count) = src[0, count). */
static __global__ void to_storage_kernel(const float *src, void *dst, int d16, size_t i0,
                                         size_t count, layout_map m)
{
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < count;
         e += (size_t)gridDim.x * blockDim.x)
        kv_st(dst, d16, kv_storage_index(i0 + e, m.nhwc, m.ndim, m.c, m.h, m.w), src[e]);
}

/* dst[0, count) = the NCHW elements [i0, i0 + count) of src (storage). */
static __global__ void from_storage_kernel(const void *src, int s16, float *dst, size_t i0,
                                           size_t count, layout_map m)
{
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < count;
         e += (size_t)gridDim.x * blockDim.x)
        dst[e] = kv_ld(src, s16, kv_storage_index(i0 + e, m.nhwc, m.ndim, m.c, m.h, m.w));
}

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

#define KV_STAGE_FLOATS ((size_t)4 << 20) /* 16 MiB of float32 per piece of a copy */

/* Between float32 NCHW (host when host, else device) and t's storage. */
static klvae_status_t copy_nchw(kv_cuda *cu, kv_tensor *t, const float *in, float *out, bool host)
{
    const size_t count = kv_cuda_numel(t);
    if (!count)
        return KLVAE_OK;
    kv_cuda_dtype dt;
    KV_TRY(kv_cuda_dtype_of(cu, t->data, in ? "upload" : "download", "the tensor", &dt));
    const layout_map m = map_of(cu, t);
    const bool plain = dt == KV_CUDA_F32 && !m.nhwc;
    const cudaMemcpyKind to = host ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToDevice;
    const cudaMemcpyKind from = host ? cudaMemcpyDeviceToHost : cudaMemcpyDeviceToDevice;
    if (plain) {
        if (in)
            KV_CU(cu, cudaMemcpyAsync(t->data, in, count * 4, to, cu->stream));
        else
            KV_CU(cu, cudaMemcpyAsync(out, t->data, count * 4, from, cu->stream));
        return KLVAE_OK;
    }
    if (!host) { /* the caller's device array is the staging: one kernel */
        if (in)
            to_storage_kernel<<<kv_cuda_blocks(count, cu), 256, 0, cu->stream>>>(
                in, t->data, dt == KV_CUDA_BF16, 0, count, m);
        else
            from_storage_kernel<<<kv_cuda_blocks(count, cu), 256, 0, cu->stream>>>(
                t->data, dt == KV_CUDA_BF16, out, 0, count, m);
        KV_LAUNCHED(cu, layout conversion);
        return KLVAE_OK;
    }
    const size_t piece = count < KV_STAGE_FLOATS ? count : KV_STAGE_FLOATS;
    void *stage = NULL;
    KV_TRY(kv_cuda_temp(cu, piece * sizeof(float), "a copy's staging", &stage));
    klvae_status_t st = KLVAE_OK;
    for (size_t i = 0; i < count && st == KLVAE_OK; i += piece) {
        const size_t n = count - i < piece ? count - i : piece;
        cudaError_t e;
        if (in) {
            e = cudaMemcpyAsync(stage, in + i, n * 4, to, cu->stream);
            if (e == cudaSuccess)
                to_storage_kernel<<<kv_cuda_blocks(n, cu), 256, 0, cu->stream>>>(
                    (const float *)stage, t->data, dt == KV_CUDA_BF16, i, n, m);
        } else {
            from_storage_kernel<<<kv_cuda_blocks(n, cu), 256, 0, cu->stream>>>(
                t->data, dt == KV_CUDA_BF16, (float *)stage, i, n, m);
            e = cudaGetLastError();
            if (e == cudaSuccess)
                e = cudaMemcpyAsync(out + i, stage, n * 4, from, cu->stream);
        }
        if (e == cudaSuccess)
            e = cudaGetLastError();
        if (e != cudaSuccess)
            st = kv_cuda_fail(cu, e, in ? "an upload" : "a download");
    }
    kv_cuda_temp_free(cu, stage);
    return st;
}

klvae_status_t kv_cuda_upload(kv_backend *be, kv_tensor *dst, const float *src)
{
    kv_cuda *cu = kv_cuda_of(be);
    klvae_status_t st = copy_nchw(cu, dst, src, NULL, true);
    /* the caller may reuse src at once, also when it is pinned memory (and
     * when the copy failed half way) */
    cudaError_t e = cudaStreamSynchronize(cu->stream);
    if (st == KLVAE_OK && e != cudaSuccess)
        return kv_cuda_fail(cu, e, "cudaStreamSynchronize");
    return st;
}

klvae_status_t kv_cuda_download(kv_backend *be, float *dst, const kv_tensor *src)
{
    kv_cuda *cu = kv_cuda_of(be);
    KV_TRY(copy_nchw(cu, (kv_tensor *)src, NULL, dst, true));
    KV_CU(cu, cudaStreamSynchronize(cu->stream));
    return KLVAE_OK;
}

klvae_status_t kv_cuda_import(kv_backend *be, kv_tensor *dst, const float *src)
{
    return copy_nchw(kv_cuda_of(be), dst, src, NULL, false);
}

klvae_status_t kv_cuda_export(kv_backend *be, float *dst, const kv_tensor *src)
{
    return copy_nchw(kv_cuda_of(be), (kv_tensor *)src, NULL, dst, false);
}
