/* cuda_ops.h — the CUDA backend's context and its ops (one file per op
 * family, as src/backend/cpu/: conv2d.cu, group_norm.cu, elementwise.cu,
 * attention.cu, posterior.cu; memory, errors and the op table in
 * cuda_backend.cu). The math of each op is specified in src/backend/backend.h. */
#ifndef KV_CUDA_OPS_H
#define KV_CUDA_OPS_H

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cudnn.h>

#include "backend/plugin.h"
#include "conv2d_plan.cuh"
#include "device_cache.cuh"
#include "base/numerics.h"
#include "posterior_plan.cuh"
#include "upsample_plan.cuh"

/* Buffer budgets (bytes), overridable for tests through the environment
 * (KLVAE_CUDA_CONV_BUDGET, KLVAE_CUDA_ATTENTION_BUDGET; cuda/README.md). */
#define KV_CUDA_CONV_BUDGET ((size_t)64 << 20)
#define KV_CUDA_ATTENTION_BUDGET ((size_t)64 << 20)
/* The most workspace a cuDNN algorithm may ask for. */
#define KV_CUDA_WORKSPACE_LIMIT ((size_t)64 << 20)

/* How the bytes of a tensor are to be read. */
enum kv_cuda_dtype { KV_CUDA_F32 = 0, KV_CUDA_BF16 = 1 };

/* A buffer the backend keeps for its own use; it only grows, until trim. */
struct kv_cuda_buffer {
    void *ptr;
    size_t bytes;
};

/* The backend's own buffers. */
enum kv_cuda_buffer_id {
    KV_BUF_CONV_IN = 0, /* conv staging */
    KV_BUF_CONV_OUT,    /* conv output pieces */
    KV_BUF_WORKSPACE,   /* cuDNN workspace */
    KV_BUF_WEIGHT,      /* a conv's weights in the compute dtype, when they are not */
    KV_BUF_STATS,       /* group norm partial sums and coefficients */
    KV_BUF_STAGE,       /* upload / download conversion */
    KV_BUF_COUNT
};

/* A cuDNN algorithm chosen for one convolution shape. */
struct kv_conv_algo_key {
    int dims[11]; /* n, c, h, w, co, kh, kw, stride, pad_h, pad_w, dtype */
    int align;    /* alignment class of the x and y pointers */
};
struct kv_conv_algo {
    bool used;
    kv_conv_algo_key key;
    cudnnConvolutionFwdAlgo_t algo;
    cudnnMathType_t math;
    size_t workspace;
};

struct kv_cuda {
    cudaStream_t own_stream, stream;
    int device;
    kv_precision precision;
    kv_cuda_dtype compute; /* KV_CUDA_BF16 in bf16 mode, else KV_CUDA_F32 */
    klvae_status_t (*set_error)(klvae_status_t status, const char *message);
    cublasHandle_t cublas;
    cudnnHandle_t cudnn;
    cudnnTensorDescriptor_t x_desc, y_desc;
    cudnnFilterDescriptor_t w_desc;
    cudnnConvolutionDescriptor_t conv_desc;
    kv_dcache cache;
    kv_cuda_buffer buffers[KV_BUF_COUNT];
    kv_conv_algo *algos; /* open-addressed table of algo_capacity entries */
    int algo_capacity, algo_count;
    size_t conv_budget, attention_budget;
    bool conv_search; /* benchmark algorithms (KLVAE_CUDA_CONV_SEARCH=0: heuristics only) */
    int sm_count;
    const char *memstats_path; /* KLVAE_CUDA_MEMSTATS */
    int malloc_error;          /* the cudaError_t of the last failed cudaMalloc */
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

/* ---- memory (cuda_backend.cu) ---- */

/* How the data at ptr is stored: bf16 for the backend's own allocations in
 * bf16 mode, float32 for everything else (a caller's device array). */
kv_cuda_dtype kv_cuda_dtype_of(const kv_cuda *cu, const void *ptr);
/* Makes buffer id hold at least bytes (its old contents are lost). */
klvae_status_t kv_cuda_reserve(kv_cuda *cu, kv_cuda_buffer_id id, size_t bytes, void **ptr);
/* A block for the rest of one op (attention's score buffers: used once per
 * forward pass, so not kept like the buffers above); kv_cuda_temp_release
 * puts it back in the cache, where the work queued on it still finishes
 * first (one stream). */
klvae_status_t kv_cuda_temp(kv_cuda *cu, size_t bytes, void **ptr);
void kv_cuda_temp_release(kv_cuda *cu, void *ptr);

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
#endif

/* y (count elements, dtype ty) = x (dtype tx), on the backend's stream. */
klvae_status_t kv_cuda_convert(kv_cuda *cu, const void *x, kv_cuda_dtype tx, void *y,
                               kv_cuda_dtype ty, size_t count);

/* ---- ops ---- */

/* The ops: kv_cuda_NAME for NAME of KV_BACKEND_OPS (src/backend/backend.h),
 * each in the file of its family. All are declared; cuda_backend.cu's
 * KV_CUDA_OPS lists the ones this backend defines. */
#define KV_CUDA_DECLARE(family, name, needed_by, params) klvae_status_t kv_cuda_##name params;
KV_BACKEND_OPS(KV_CUDA_DECLARE)
#undef KV_CUDA_DECLARE

void kv_cuda_conv_forget(kv_cuda *cu); /* frees the algorithm table */

#endif /* KV_CUDA_OPS_H */
