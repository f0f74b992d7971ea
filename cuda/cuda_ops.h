/* cuda_ops.h — the CUDA backend's context and its ops (one file per op
 * family, as src/backend/cpu/: conv2d.cu, group_norm.cu, elementwise.cu,
 * activation.cu, upsample.cu, attention.cu, posterior.cu; the plugin, errors
 * and the op table in cuda_backend.cu; memory, upload and download in
 * memory.cu). The math of each op is specified in src/backend/backend.h.
 *
 * Storage. Every tensor the backend hands out is in the backend's layout
 * (NHWC in tf32 and bf16 mode, where cuDNN's tensor-core kernels work
 * without transposes; NCHW in fp32 mode, as the CPU) and in its compute
 * dtype (bf16 in bf16 mode, else float32), except the blocks the core asks
 * for as KV_STORAGE_FLOAT32 (group-norm statistics), which are float32 in the
 * backend's layout. A tensor's dtype is looked up by its address in the
 * backend's block table (tensor_table.cuh). Caller memory never reaches an
 * op: klvae_*_device copies it in and out (import/export, memory.cu). */
#ifndef KV_CUDA_OPS_H
#define KV_CUDA_OPS_H

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cudnn.h>

#include "backend/plugin.h"
#include "base/numerics.h"
#include "conv2d_plan.cuh"
#include "layout_plan.cuh"
#include "tensor_table.cuh"

/* Defaults of the budgets (bytes), overridable through the environment
 * (cuda/README.md, "Environment variables"). */
#define KV_CUDA_CONV_BUDGET ((size_t)128 << 20)      /* conv staging + output pieces */
#define KV_CUDA_ATTENTION_BUDGET ((size_t)64 << 20)  /* attention scores of one block */
#define KV_CUDA_WORKSPACE_MAX ((size_t)256 << 20)    /* cuDNN workspace, at most */

/* How the bytes of a tensor are read. */
enum kv_cuda_dtype { KV_CUDA_F32 = 0, KV_CUDA_BF16 = 1 };

struct kv_cuda {
    cudaStream_t own_stream, stream; /* stream: own_stream, or the caller's (set_stream) */
    int device;
    kv_precision precision;
    kv_cuda_dtype compute; /* KV_CUDA_BF16 in bf16 mode, else KV_CUDA_F32 */
    int nhwc;              /* the layout of 4-D tensors: 1 NHWC, 0 NCHW */
    klvae_status_t (*set_error)(klvae_status_t status, const char *message);
    cublasHandle_t cublas;
    cudnnHandle_t cudnn;
    cudnnTensorDescriptor_t x_desc, y_desc, bias_desc;
    cudnnFilterDescriptor_t w_desc;
    cudnnConvolutionDescriptor_t conv_desc;
    cudnnActivationDescriptor_t identity;
    cudaMemPool_t pool;    /* this backend's stream-ordered pool */
    void *host_scalars;    /* pinned host memory for results the host reads (kv_cuda_to_host) */
    kv_tensor_table table; /* every block handed out: size, dtype; bytes in use and peak */
    size_t conv_budget, attention_budget, workspace_max;
    int conv_search;     /* 1: time the best candidates of a large convolution once */
    int fused_epilogue;  /* 1: try cuDNN's conv + bias + residual (KLVAE_CUDA_FUSED=0: never) */
    int forced_algo;     /* KLVAE_CUDA_CONV_ALGO (tests), or -1 */
    int debug;           /* KLVAE_CUDA_DEBUG=1: wait for every op and name the one that failed */
    int sm_count;
    const char *memstats_path; /* KLVAE_CUDA_MEMSTATS */
    /* the first failure of a path that cannot return one (a release),
     * reported by the next op or synchronize */
    cudaError_t deferred;
    const char *deferred_call;
};

static inline kv_cuda *kv_cuda_of(kv_backend *be)
{
    return (kv_cuda *)be->ctx;
}

/* ---- errors (cuda_backend.cu) ---- */

/* Formats the message and hands it to the core (host->set_error). */
klvae_status_t kv_cuda_error(const kv_cuda *cu, klvae_status_t status, const char *fmt, ...)
    KV_PRINTF(3, 4);
klvae_status_t kv_cuda_fail(const kv_cuda *cu, cudaError_t e, const char *call);
klvae_status_t kv_cudnn_fail(const kv_cuda *cu, cudnnStatus_t s, const char *call);
klvae_status_t kv_cublas_fail(const kv_cuda *cu, cublasStatus_t s, const char *call);

#define KV_CU(cu, call)                                                                         \
    do {                                                                                        \
        cudaError_t e_ = (call);                                                                \
        if (e_ != cudaSuccess)                                                                  \
            return kv_cuda_fail((cu), e_, #call);                                               \
    } while (0)
#define KV_CUDNN(cu, call)                                                                      \
    do {                                                                                        \
        cudnnStatus_t s_ = (call);                                                              \
        if (s_ != CUDNN_STATUS_SUCCESS)                                                         \
            return kv_cudnn_fail((cu), s_, #call);                                              \
    } while (0)
#define KV_CUBLAS(cu, call)                                                                     \
    do {                                                                                        \
        cublasStatus_t s_ = (call);                                                             \
        if (s_ != CUBLAS_STATUS_SUCCESS)                                                        \
            return kv_cublas_fail((cu), s_, #call);                                             \
    } while (0)
/* After a kernel launch: a bad configuration shows up here. */
#define KV_LAUNCHED(cu, kernel)                                                                 \
    do {                                                                                        \
        cudaError_t e_ = cudaGetLastError();                                                    \
        if (e_ != cudaSuccess)                                                                  \
            return kv_cuda_fail((cu), e_, "the launch of " #kernel);                            \
    } while (0)
#define KV_TRY(expr)                                                                            \
    do {                                                                                        \
        klvae_status_t st_ = (expr);                                                            \
        if (st_ != KLVAE_OK)                                                                    \
            return st_;                                                                         \
    } while (0)

/* Makes cu's device current for the scope and puts the caller's back at its
 * end, so that no op changes the calling thread's current device. */
struct kv_device_scope {
    int previous, ok;
    explicit kv_device_scope(int device) : previous(-1), ok(1)
    {
        if (cudaGetDevice(&previous) != cudaSuccess)
            previous = -1;
        if (previous != device && cudaSetDevice(device) != cudaSuccess)
            ok = 0;
    }
    ~kv_device_scope()
    {
        int now = -1;
        if (previous >= 0 && cudaGetDevice(&now) == cudaSuccess && now != previous)
            (void)cudaSetDevice(previous);
    }
    kv_device_scope(const kv_device_scope &) = delete;
    kv_device_scope &operator=(const kv_device_scope &) = delete;
};

/* ---- memory (memory.cu) ---- */

/* The dtype of the block holding ptr; KLVAE_ERR_INTERNAL naming op and what
 * when ptr is not memory of this backend. */
klvae_status_t kv_cuda_dtype_of(const kv_cuda *cu, const void *ptr, const char *op,
                                const char *what, kv_cuda_dtype *out);
/* *bf16 = 1 when tensor t (named what in op's messages) is stored in bf16,
 * 0 for float32; the error of kv_cuda_dtype_of. */
klvae_status_t kv_cuda_bf16_flag(const kv_cuda *cu, const char *op, const kv_tensor *t,
                                 const char *what, int *bf16);
/* A block of bytes for the rest of one op (staging, workspace, scores):
 * stream-ordered, so kv_cuda_temp_free may follow the work queued on it at
 * once; both are no-ops for 0 bytes / NULL. */
klvae_status_t kv_cuda_temp(kv_cuda *cu, size_t bytes, const char *what, void **ptr);
void kv_cuda_temp_free(kv_cuda *cu, void *ptr);
/* Copies bytes (at most KV_CUDA_HOST_SCALARS) from device memory into
 * cu->host_scalars and waits for the stream: how a training op hands a sum
 * to the host. */
#define KV_CUDA_HOST_SCALARS ((size_t)64 << 10)
klvae_status_t kv_cuda_to_host(kv_cuda *cu, const void *device, size_t bytes);
/* A temporary device copy of a host array of bytes (kv_cuda_temp_free it);
 * the host array may be reused when this returns. */
klvae_status_t kv_cuda_from_host(kv_cuda *cu, const void *host, size_t bytes, const char *what,
                                 void **device);
/* y (count elements, dtype ty) = x (dtype tx), on the backend's stream. */
klvae_status_t kv_cuda_convert(kv_cuda *cu, const void *x, kv_cuda_dtype tx, void *y,
                               kv_cuda_dtype ty, size_t count);
/* upload, download (the kv_backend_ops members) and the plugin's
 * import_device, export_device. */
klvae_status_t kv_cuda_upload(kv_backend *be, kv_tensor *dst, const float *src);
klvae_status_t kv_cuda_download(kv_backend *be, float *dst, const kv_tensor *src);
klvae_status_t kv_cuda_import(kv_backend *be, kv_tensor *dst, const float *src);
klvae_status_t kv_cuda_export(kv_backend *be, float *dst, const kv_tensor *src);
klvae_status_t kv_cuda_alloc(kv_backend *be, size_t bytes, kv_storage storage, void **out);
void kv_cuda_release(kv_backend *be, void *ptr);
void kv_cuda_trim(kv_backend *be, bool keep);
void kv_cuda_write_memstats(kv_cuda *cu, const char *when);

static inline size_t kv_cuda_esize(kv_cuda_dtype t)
{
    return t == KV_CUDA_BF16 ? 2 : 4;
}

static inline size_t kv_cuda_numel(const kv_tensor *t)
{
    size_t n = 1;
    for (int i = 0; i < t->ndim; i++)
        n *= (size_t)t->shape[i];
    return n;
}

/* Grid size for a grid-stride loop over count items with 256 threads. */
static inline unsigned kv_cuda_blocks(size_t count, const kv_cuda *cu)
{
    size_t blocks = (count + 255) / 256;
    size_t cap = (size_t)cu->sm_count * 32;
    if (blocks > cap)
        blocks = cap;
    return blocks < 1 ? 1u : (unsigned)blocks;
}

/* Grid for kernels over (plane, pixel): y over planes (looping past 65535),
 * x over the pixels of a plane, about sm_count * 32 blocks in all. */
static inline dim3 kv_cuda_grid2(const kv_cuda *cu, size_t planes, size_t pixels)
{
    unsigned y = planes > 65535 ? 65535u : (unsigned)(planes ? planes : 1);
    size_t want = (size_t)cu->sm_count * 32 / y;
    size_t x = (pixels + 255) / 256;
    if (x > want)
        x = want;
    return dim3(x < 1 ? 1u : (unsigned)x, y, 1);
}

/* ---- device helpers shared by the kernels ---- */

#if defined(__CUDACC__)
/* Element i of a float32 (bf16 == 0) or bf16 (bf16 != 0) array, as float. */
static __device__ __forceinline__ float kv_ld(const void *p, int bf16, size_t i)
{
    return bf16 ? kv_bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static __device__ __forceinline__ void kv_st(void *p, int bf16, size_t i, float v)
{
    if (bf16)
        ((uint16_t *)p)[i] = kv_bf16_from_float(v);
    else
        ((float *)p)[i] = v;
}

/* 16 bytes of one dtype as KV_VEC(T) floats: 8 bf16 or 4 float32. The
 * vectorised kernels move whole 16-byte words when every operand of the
 * launch is 16-byte aligned and the count divides. */
template <typename T> struct kv_vec;
template <> struct kv_vec<float> {
    enum { width = 4 };
    static __device__ __forceinline__ void load(const float *p, size_t i, float v[4])
    {
        float4 q = *(const float4 *)(p + i);
        v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
    }
    static __device__ __forceinline__ void store(float *p, size_t i, const float v[4])
    {
        *(float4 *)(p + i) = make_float4(v[0], v[1], v[2], v[3]);
    }
};
template <> struct kv_vec<uint16_t> {
    enum { width = 8 };
    static __device__ __forceinline__ void load(const uint16_t *p, size_t i, float v[8])
    {
        uint4 q = *(const uint4 *)(p + i);
        const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int k = 0; k < 4; k++) {
            v[2 * k] = kv_bf16_to_float((uint16_t)(w[k] & 0xFFFFu));
            v[2 * k + 1] = kv_bf16_to_float((uint16_t)(w[k] >> 16));
        }
    }
    static __device__ __forceinline__ void store(uint16_t *p, size_t i, const float v[8])
    {
        uint32_t w[4];
#pragma unroll
        for (int k = 0; k < 4; k++)
            w[k] = (uint32_t)kv_bf16_from_float(v[2 * k]) |
                   ((uint32_t)kv_bf16_from_float(v[2 * k + 1]) << 16);
        *(uint4 *)(p + i) = make_uint4(w[0], w[1], w[2], w[3]);
    }
};
#endif

/* Whether every pointer is 16-byte aligned (NULL counts as aligned). */
static inline bool kv_cuda_aligned16(const void *a, const void *b = NULL, const void *c = NULL,
                                     const void *d = NULL)
{
    return (((uintptr_t)a | (uintptr_t)b | (uintptr_t)c | (uintptr_t)d) & 15u) == 0;
}

/* ---- ops ---- */

/* The ops: kv_cuda_NAME for NAME of KV_BACKEND_OPS (src/backend/backend.h),
 * each in the file of its family. All are declared; cuda_backend.cu's
 * KV_CUDA_OPS lists the ones this backend defines. cuda_backend.cu wraps
 * each in the device scope and the error checks (kv_op_guard), so an op
 * itself only launches work. */
#define KV_CUDA_DECLARE(family, name, needed_by, params) klvae_status_t kv_cuda_##name params;
KV_BACKEND_OPS(KV_CUDA_DECLARE)
#undef KV_CUDA_DECLARE

#endif /* KV_CUDA_OPS_H */
