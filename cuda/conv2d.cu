/* conv2d.cu — y = conv(prologue(x)) + b + r through cuDNN, in the backend's
 * layout (NHWC in tf32 and bf16, where cuDNN's tensor-core kernels need no
 * transposes; NCHW in fp32). How a convolution is cut into pieces, what the
 * staging kernel does (group norm + activation, the nearest 2x upsample,
 * asymmetric padding) and why, is in cuda/conv2d_plan.cuh.
 *
 * The epilogue (bias and residual) is cuDNN's where it can be: its fused
 * convolution y = conv(x) + z + bias (cudnnConvolutionBiasActivationForward
 * with the identity activation, which cuDNN runs with the implicit
 * precomputed GEMM algorithm); otherwise the fastest plain convolution and
 * one vectorised kernel that adds bias and residual in place. Which of the
 * two a shape gets is decided once per shape for the process: by timing the
 * candidates when the convolution is large enough for that to pay
 * (KV_CONV_SEARCH_FLOPS), else by cuDNN's heuristic ranking, the fused one
 * first (choose() below).
 *
 * Precision: fp32 mode takes only the algorithms of algo_allowed with FMA
 * math (no TF32, no FFT or Winograd, whose error grows past the 1e-5 the
 * CPU is matched to); tf32 lets cuDNN use TF32 tensor cores; bf16 has bf16
 * tensors and filters with float32 accumulation. */
#include <pthread.h>
#include <stdlib.h>

#include "conv2d_internal.h"

/* Convolutions of at least this many multiply-adds have their candidates
 * timed once (a 3x3 256 -> 256 conv at 64^2 is 2.4e9). */
#define KV_CONV_SEARCH_FLOPS (1.0e9)
#define KV_CONV_CANDIDATES 4

/* ---- the choice per shape, for the process ---- */

struct conv_entry {
    bool used;
    kv_conv_key key;
    kv_conv_choice choice;
};

static pthread_mutex_t choices_lock = PTHREAD_MUTEX_INITIALIZER;
static conv_entry *choices;
static size_t choices_capacity, choices_count;

static size_t key_hash(const kv_conv_key *k)
{
    size_t h = 1469598103934665603ull;
    for (int i = 0; i < KV_CONV_KEY_DIMS; i++)
        h = (h ^ (size_t)(unsigned)k->dims[i]) * 1099511628211ull;
    return h;
}

bool kv_conv_choice_lookup(const kv_conv_key *k, kv_conv_choice *out)
{
    bool found = false;
    pthread_mutex_lock(&choices_lock);
    if (choices_capacity)
        for (size_t i = key_hash(k) & (choices_capacity - 1); choices[i].used;
             i = (i + 1) & (choices_capacity - 1))
            if (memcmp(&choices[i].key, k, sizeof *k) == 0) {
                *out = choices[i].choice;
                found = true;
                break;
            }
    pthread_mutex_unlock(&choices_lock);
    return found;
}

/* Records (or replaces) the choice for k; a full table of the host's memory
 * only means the choice is made again next time. */
void kv_conv_choice_store(const kv_conv_key *k, const kv_conv_choice *c)
{
    pthread_mutex_lock(&choices_lock);
    if ((choices_count + 1) * 2 > choices_capacity) {
        size_t capacity = choices_capacity ? choices_capacity * 2 : 64;
        conv_entry *table = (conv_entry *)calloc(capacity, sizeof *table);
        if (table) {
            for (size_t i = 0; i < choices_capacity; i++)
                if (choices[i].used) {
                    size_t j = key_hash(&choices[i].key) & (capacity - 1);
                    while (table[j].used)
                        j = (j + 1) & (capacity - 1);
                    table[j] = choices[i];
                }
            free(choices);
            choices = table;
            choices_capacity = capacity;
        }
    }
    if ((choices_count + 1) * 2 <= choices_capacity) {
        size_t i = key_hash(k) & (choices_capacity - 1);
        while (choices[i].used && memcmp(&choices[i].key, k, sizeof *k) != 0)
            i = (i + 1) & (choices_capacity - 1);
        if (!choices[i].used)
            choices_count++;
        choices[i].used = true;
        choices[i].key = *k;
        choices[i].choice = *c;
    }
    pthread_mutex_unlock(&choices_lock);
}

/* ---- one piece: the operands as cuDNN sees them ---- */

struct conv_piece {
    int n, c, h, w;     /* the input cuDNN reads (the staged piece, or whole samples of x) */
    int pad_h, pad_w;   /* cuDNN's symmetric padding (0 when staged) */
    int co, rows, wo;   /* the output cuDNN writes */
    const void *x;
    void *y;            /* in y (written in place), or the output buffer */
    const void *r;      /* the residual at y's place, or NULL */
    bool in_place;      /* y is the piece's place in the op's y */
};

cudnnMathType_t kv_conv_wanted_math(const kv_cuda *cu)
{
    switch (cu->precision) {
    case KV_PRECISION_TF32: return CUDNN_DEFAULT_MATH;
    case KV_PRECISION_BF16: return CUDNN_TENSOR_OP_MATH;
    default: return CUDNN_FMA_MATH;
    }
}

/* fp32 mode: the algorithms whose float32 FMA results meet 1e-5 against
 * the CPU through a whole model (the GPU check runs each of them,
 * tests/gpu/test_cuda.c); the FFT and Winograd ones are not among them, and
 * cuDNN implements no DIRECT convolution. */
static bool algo_allowed(const kv_cuda *cu, cudnnConvolutionFwdAlgo_t algo, cudnnMathType_t m)
{
    if (cu->precision != KV_PRECISION_FP32)
        return true;
    if (m != CUDNN_FMA_MATH)
        return false;
    switch (algo) {
    case CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM:
    case CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM:
    case CUDNN_CONVOLUTION_FWD_ALGO_GEMM:
        return true;
    default:
        return false;
    }
}

static klvae_status_t set_descriptors(kv_cuda *cu, const conv_piece *p, int kh, int kw,
                                      int stride)
{
    const cudnnDataType_t dt = cu->compute == KV_CUDA_BF16 ? CUDNN_DATA_BFLOAT16
                                                           : CUDNN_DATA_FLOAT;
    const cudnnTensorFormat_t f = cu->nhwc ? CUDNN_TENSOR_NHWC : CUDNN_TENSOR_NCHW;
    KV_CUDNN(cu, cudnnSetTensor4dDescriptor(cu->x_desc, f, dt, p->n, p->c, p->h, p->w));
    KV_CUDNN(cu, cudnnSetFilter4dDescriptor(cu->w_desc, dt, f, p->co, p->c, kh, kw));
    KV_CUDNN(cu, cudnnSetConvolution2dDescriptor(cu->conv_desc, p->pad_h, p->pad_w, stride, stride,
                                                 1, 1, CUDNN_CROSS_CORRELATION,
                                                 CUDNN_DATA_FLOAT));
    KV_CUDNN(cu, cudnnSetTensor4dDescriptor(cu->y_desc, f, dt, p->n, p->co, p->rows, p->wo));
    KV_CUDNN(cu, cudnnSetTensor4dDescriptor(cu->bias_desc, f, dt, 1, p->co, 1, 1));
    int on, oc, oh, ow;
    KV_CUDNN(cu, cudnnGetConvolution2dForwardOutputDim(cu->conv_desc, cu->x_desc, cu->w_desc, &on,
                                                       &oc, &oh, &ow));
    if (on != p->n || oc != p->co || oh != p->rows || ow != p->wo)
        return kv_cuda_error(cu, KLVAE_ERR_INTERNAL,
                             "conv2d: cuDNN computes a %d x %d x %d x %d output where %d x %d x %d "
                             "x %d was planned",
                             on, oc, oh, ow, p->n, p->co, p->rows, p->wo);
    return KLVAE_OK;
}

/* ---- the epilogue kernels (bias and residual, where cuDNN did not) ---- */

/* y = y + bias[channel] + r, in place over one piece (count elements from
 * the piece's start): channel = i % co in NHWC (plane == 1), i / plane % co
 * in NCHW. T is the compute dtype of y, bias and r. */
template <typename T>
static __global__ void epilogue_kernel(T *y, const T *bias, const T *r, size_t count, int co,
                                       size_t plane, int vectorised)
{
    typedef kv_vec<T> V;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    const size_t first = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (vectorised) { /* co (NHWC) or plane (NCHW) is a multiple of the width */
        for (size_t v = first; v < count / V::width; v += stride) {
            const size_t i = v * V::width;
            float a[V::width], b[V::width];
            V::load(y, i, a);
            if (r) {
                V::load(r, i, b);
#pragma unroll
                for (int k = 0; k < V::width; k++)
                    a[k] += b[k];
            }
            if (bias) {
                if (plane == 1) {
                    V::load(bias, i % (size_t)co, b);
#pragma unroll
                    for (int k = 0; k < V::width; k++)
                        a[k] += b[k];
                } else {
                    const float bb = kv_ld(bias, sizeof(T) == 2, i / plane % (size_t)co);
#pragma unroll
                    for (int k = 0; k < V::width; k++)
                        a[k] += bb;
                }
            }
            V::store(y, i, a);
        }
        return;
    }
    const int b16 = sizeof(T) == 2;
    for (size_t i = first; i < count; i += stride) {
        float v = kv_ld(y, b16, i);
        if (bias)
            v += kv_ld(bias, b16, plane == 1 ? i % (size_t)co : i / plane % (size_t)co);
        if (r)
            v += kv_ld(r, b16, i);
        kv_st(y, b16, i, v);
    }
}

/* An NCHW band from the output buffer into its place in y, plus bias and
 * residual (conv2d_plan.cuh, kv_conv_output_target). */
struct band_args {
    kv_conv_plan plan;
    const void *src;
    void *y;
    const void *bias, *r;
    int b16, n0, oy0, rows;
    size_t count;
};

static __global__ void band_out_kernel(band_args a)
{
    const size_t per_channel = (size_t)a.rows * a.plan.wo;
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < a.count;
         e += (size_t)gridDim.x * blockDim.x) {
        const int64_t t = kv_conv_output_target(&a.plan, a.n0, a.oy0, a.rows, (int64_t)e);
        float v = kv_ld(a.src, a.b16, e);
        if (a.bias)
            v += kv_ld(a.bias, a.b16, e / per_channel % (size_t)a.plan.co);
        if (a.r)
            v += kv_ld(a.r, a.b16, (size_t)t);
        kv_st(a.y, a.b16, (size_t)t, v);
    }
}

/* ---- the staging kernel ---- */

struct stage_args {
    kv_conv_plan plan;
    const void *x;              /* compute dtype */
    const void *scale, *shift;  /* the group norm, or NULL */
    int scale16, shift16, act;
    void *dst;                  /* compute dtype */
    int n0, pr0, in_rows;
    size_t count;               /* elements of the piece */
};

/* The staged input of one piece: prologue(x), read through the upsample,
 * or 0 for padding. Width W: W consecutive elements per thread, which in
 * NHWC (c a multiple of W) are W channels of one pixel, one 16-byte word. */
template <typename T, int W> static __global__ void stage_kernel(stage_args a)
{
    const int b16 = sizeof(T) == 2;
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    for (size_t v = blockIdx.x * (size_t)blockDim.x + threadIdx.x; v < a.count / W; v += stride) {
        const size_t e = v * W;
        int64_t plane;
        const int64_t src = kv_conv_stage_source(&a.plan, a.n0, a.pr0, a.in_rows, (int64_t)e,
                                                 &plane);
        float val[W];
        if (src < 0) {
#pragma unroll
            for (int k = 0; k < W; k++)
                val[k] = 0.0f;
        } else {
            if (W > 1)
                kv_vec<T>::load((const T *)a.x, (size_t)src, val);
            else
                val[0] = kv_ld(a.x, b16, (size_t)src);
            if (a.scale)
#pragma unroll
                for (int k = 0; k < W; k++)
                    val[k] = kv_activate(a.act, val[k] * kv_ld(a.scale, a.scale16, plane + k) +
                                                    kv_ld(a.shift, a.shift16, plane + k));
        }
        if (W > 1)
            kv_vec<T>::store((T *)a.dst, e, val);
        else
            kv_st(a.dst, b16, e, val[0]);
    }
}

/* ---- the op ---- */

/* Everything one call of conv2d needs, fixed before its pieces run. */
struct conv_call {
    kv_conv_plan plan;
    int kh, kw, stride;
    const void *w, *bias;   /* compute dtype */
    const void *scale;      /* the prologue's group norm (norm), or NULL */
    kv_conv_norm norm;
    const void *x, *r;      /* x; the residual, or NULL */
    void *y;
    void *in_buf, *out_buf; /* the plan's buffers, or NULL */
};

/* The epilogue of an in-place piece that cuDNN did not fuse. */
template <typename T> static klvae_status_t launch_epilogue(kv_cuda *cu, const conv_call *k,
                                                           const conv_piece *p)
{
    const size_t count = (size_t)p->n * p->co * p->rows * p->wo;
    if (!k->bias && !p->r)
        return KLVAE_OK;
    const size_t plane = cu->nhwc ? 1 : (size_t)p->rows * p->wo;
    const int width = kv_vec<T>::width;
    const int vectorised = kv_cuda_aligned16(p->y, p->r, k->bias) &&
                           (cu->nhwc ? p->co % width == 0 : plane % width == 0);
    epilogue_kernel<T><<<kv_cuda_blocks(vectorised ? count / width : count, cu), 256, 0,
                         cu->stream>>>((T *)p->y, (const T *)k->bias, (const T *)p->r, count,
                                       p->co, plane, vectorised);
    KV_LAUNCHED(cu, epilogue_kernel);
    return KLVAE_OK;
}

/* Runs one piece with choice c: cuDNN, then the epilogue unless fused.
 * When the choice cannot run — cuDNN refuses it (not supported, bad
 * parameters) or its workspace does not fit in device memory — returns
 * KLVAE_OK with the reason in *refused, so that the caller can take another
 * candidate. */
static klvae_status_t run_piece(kv_cuda *cu, const conv_call *k, const conv_piece *p,
                                const kv_conv_choice *c, cudnnStatus_t *refused)
{
    *refused = CUDNN_STATUS_SUCCESS;
    KV_CUDNN(cu, cudnnSetConvolutionMathType(cu->conv_desc, c->math));
    void *ws = NULL;
    klvae_status_t st = kv_cuda_temp(cu, c->workspace, "a cuDNN workspace", &ws);
    if (st == KLVAE_ERR_OUT_OF_MEMORY && c->workspace) {
        *refused = CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED;
        return KLVAE_OK;
    }
    KV_TRY(st);
    const float one = 1.0f, zero = 0.0f;
    cudnnStatus_t s;
    if (c->fused)
        s = cudnnConvolutionBiasActivationForward(
            cu->cudnn, &one, cu->x_desc, p->x, cu->w_desc, k->w, cu->conv_desc, (cudnnConvolutionFwdAlgo_t)c->algo, ws,
            c->workspace, p->r ? &one : &zero, cu->y_desc, p->r ? p->r : p->y, cu->bias_desc,
            k->bias, cu->identity, cu->y_desc, p->y);
    else
        s = cudnnConvolutionForward(cu->cudnn, &one, cu->x_desc, p->x, cu->w_desc, k->w,
                                    cu->conv_desc, (cudnnConvolutionFwdAlgo_t)c->algo, ws, c->workspace, &zero, cu->y_desc,
                                    p->y);
    kv_cuda_temp_free(cu, ws);
    if (s != CUDNN_STATUS_SUCCESS) {
        if (CUDNN_STATUS_CATEGORY(s) == CUDNN_STATUS_NOT_SUPPORTED ||
            CUDNN_STATUS_CATEGORY(s) == CUDNN_STATUS_BAD_PARAM) {
            *refused = s;
            return KLVAE_OK;
        }
        return kv_cudnn_fail(cu, s, c->fused ? "cudnnConvolutionBiasActivationForward"
                                               : "cudnnConvolutionForward");
    }
    if (c->fused || !p->in_place)
        return KLVAE_OK; /* the band kernel of conv2d adds them for buffered pieces */
    return cu->compute == KV_CUDA_BF16 ? launch_epilogue<uint16_t>(cu, k, p)
                                       : launch_epilogue<float>(cu, k, p);
}

/* The candidates for the shape in the descriptors, best first by cuDNN's
 * heuristics, the fused one (when the piece can have it) ahead. */
static klvae_status_t candidates(kv_cuda *cu, const conv_call *k, const conv_piece *p,
                                 kv_conv_choice *out, int *count)
{
    *count = 0;
    const cudnnMathType_t math = kv_conv_wanted_math(cu);
    if (cu->forced_algo >= 0) { /* tests: one algorithm, plain */
        kv_conv_choice c = {0, cu->forced_algo, math, 0};
        KV_CUDNN(cu, cudnnSetConvolutionMathType(cu->conv_desc, math));
        cudnnStatus_t s = cudnnGetConvolutionForwardWorkspaceSize(
            cu->cudnn, cu->x_desc, cu->w_desc, cu->conv_desc, cu->y_desc,
            (cudnnConvolutionFwdAlgo_t)c.algo, &c.workspace);
        if (CUDNN_STATUS_CATEGORY(s) == CUDNN_STATUS_NOT_SUPPORTED ||
            CUDNN_STATUS_CATEGORY(s) == CUDNN_STATUS_BAD_PARAM)
            return kv_cuda_error(cu, KLVAE_ERR_UNSUPPORTED,
                                 "conv2d: cuDNN has no algorithm %d (KLVAE_CUDA_CONV_ALGO) for a "
                                 "%d x %d x %d x %d convolution (%s)",
                                 cu->forced_algo, p->n, p->c, p->h, p->w, cudnnGetErrorString(s));
        if (s != CUDNN_STATUS_SUCCESS)
            return kv_cudnn_fail(cu, s, "cudnnGetConvolutionForwardWorkspaceSize");
        out[(*count)++] = c;
        return KLVAE_OK;
    }
    if (cu->fused_epilogue && k->bias && p->in_place) {
        kv_conv_choice c = {1, CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM, math, 0};
        KV_CUDNN(cu, cudnnSetConvolutionMathType(cu->conv_desc, math));
        cudnnStatus_t s = cudnnGetConvolutionForwardWorkspaceSize(
            cu->cudnn, cu->x_desc, cu->w_desc, cu->conv_desc, cu->y_desc, (cudnnConvolutionFwdAlgo_t)c.algo, &c.workspace);
        if (s == CUDNN_STATUS_SUCCESS && c.workspace <= cu->workspace_max)
            out[(*count)++] = c;
    }
    KV_CUDNN(cu, cudnnSetConvolutionMathType(cu->conv_desc, math));
    cudnnConvolutionFwdAlgoPerf_t perf[CUDNN_CONVOLUTION_FWD_ALGO_COUNT];
    int got = 0;
    cudnnStatus_t s = cudnnGetConvolutionForwardAlgorithm_v7(
        cu->cudnn, cu->x_desc, cu->w_desc, cu->conv_desc, cu->y_desc,
        CUDNN_CONVOLUTION_FWD_ALGO_COUNT, &got, perf);
    if (s != CUDNN_STATUS_SUCCESS && CUDNN_STATUS_CATEGORY(s) != CUDNN_STATUS_NOT_SUPPORTED)
        return kv_cudnn_fail(cu, s, "cudnnGetConvolutionForwardAlgorithm_v7");
    for (int i = 0; s == CUDNN_STATUS_SUCCESS && i < got && *count < KV_CONV_CANDIDATES; i++)
        if (perf[i].status == CUDNN_STATUS_SUCCESS && perf[i].memory <= cu->workspace_max &&
            algo_allowed(cu, perf[i].algo, perf[i].mathType)) {
            kv_conv_choice c = {0, (int)perf[i].algo, perf[i].mathType, perf[i].memory};
            out[(*count)++] = c;
        }
    if (*count == 0 || (*count == 1 && out[0].fused)) { /* the one every configuration has */
        kv_conv_choice c = {0, CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM, math, 0};
        KV_CUDNN(cu, cudnnGetConvolutionForwardWorkspaceSize(cu->cudnn, cu->x_desc, cu->w_desc,
                                                             cu->conv_desc, cu->y_desc, (cudnnConvolutionFwdAlgo_t)c.algo,
                                                             &c.workspace));
        out[(*count)++] = c;
    }
    return KLVAE_OK;
}

/* Milliseconds of one run of c (after a first run), or a negative number
 * when cuDNN refuses it. Synchronises: only the first call of a shape. */
static klvae_status_t time_choice(kv_cuda *cu, const conv_call *k, const conv_piece *p,
                                  const kv_conv_choice *c, float *ms)
{
    *ms = -1.0f;
    cudnnStatus_t refused;
    KV_TRY(run_piece(cu, k, p, c, &refused));
    if (refused != CUDNN_STATUS_SUCCESS)
        return KLVAE_OK;
    cudaEvent_t start = NULL, stop = NULL;
    klvae_status_t st = KLVAE_OK;
    cudaError_t e = cudaEventCreate(&start);
    if (e == cudaSuccess)
        e = cudaEventCreate(&stop);
    if (e == cudaSuccess)
        e = cudaEventRecord(start, cu->stream);
    for (int i = 0; i < 3 && e == cudaSuccess && st == KLVAE_OK; i++)
        st = run_piece(cu, k, p, c, &refused);
    if (e == cudaSuccess && st == KLVAE_OK)
        e = cudaEventRecord(stop, cu->stream);
    if (e == cudaSuccess && st == KLVAE_OK)
        e = cudaEventSynchronize(stop);
    if (e == cudaSuccess && st == KLVAE_OK)
        e = cudaEventElapsedTime(ms, start, stop);
    if (start)
        (void)cudaEventDestroy(start);
    if (stop)
        (void)cudaEventDestroy(stop);
    if (st == KLVAE_OK && e != cudaSuccess)
        st = kv_cuda_fail(cu, e, "timing a convolution");
    return st;
}

static kv_conv_key key_of(const kv_cuda *cu, const conv_call *k, const conv_piece *p)
{
    kv_conv_key key;
    const int align = (int)((((uintptr_t)p->x | (uintptr_t)p->y | (uintptr_t)p->r) & 255u) != 0);
    const int epilogue = (k->bias ? 1 : 0) + (p->r ? 2 : 0) + (p->in_place ? 0 : 4);
    kv_conv_key_make(&key, cu, KV_CONV_FORWARD, p->n, p->c, p->h, p->w, p->co, k->kh, k->kw,
                     k->stride, p->pad_h, p->pad_w, epilogue, align);
    return key;
}

/* The key of the class of key's shape: the same convolution with its input
 * height rounded up to kv_conv_height_class, in entries of their own. */
static kv_conv_key class_key_of(const kv_conv_key *key)
{
    kv_conv_key c = *key;
    c.dims[4] += 16; /* the kind: a class entry, never an exact shape's */
    c.dims[7] = kv_conv_height_class(c.dims[7]);
    return c;
}

/* The class's choice for the shape in the descriptors, with the workspace
 * this exact shape needs; false when there is none or cuDNN refuses it. */
static bool class_choice(kv_cuda *cu, const kv_conv_key *class_key, kv_conv_choice *c)
{
    if (!kv_conv_choice_lookup(class_key, c) ||
        cudnnSetConvolutionMathType(cu->conv_desc, c->math) != CUDNN_STATUS_SUCCESS)
        return false;
    return cudnnGetConvolutionForwardWorkspaceSize(cu->cudnn, cu->x_desc, cu->w_desc,
                                                   cu->conv_desc, cu->y_desc,
                                                   (cudnnConvolutionFwdAlgo_t)c->algo,
                                                   &c->workspace) == CUDNN_STATUS_SUCCESS &&
           c->workspace <= cu->workspace_max; /* as candidates() asks of each */
}

/* Runs one piece with the choice for its shape, choosing it first if this
 * process has not yet: the choice of its height class when there is one
 * and cuDNN takes it (a streamed image's bands are cut at many heights, and
 * choosing afresh for each, a search of up to KV_CONV_CANDIDATES timed
 * runs, cost more than the convolutions), else cuDNN's heuristics and, for
 * large shapes, a search. */
static klvae_status_t convolve(kv_cuda *cu, const conv_call *k, const conv_piece *p)
{
    KV_TRY(set_descriptors(cu, p, k->kh, k->kw, k->stride));
    const kv_conv_key key = key_of(cu, k, p), class_key = class_key_of(&key);
    kv_conv_choice c;
    cudnnStatus_t refused;
    if (kv_conv_choice_lookup(&key, &c)) {
        KV_TRY(run_piece(cu, k, p, &c, &refused));
        if (refused == CUDNN_STATUS_SUCCESS)
            return KLVAE_OK;
    } else if (cu->forced_algo < 0 && class_choice(cu, &class_key, &c)) {
        KV_TRY(run_piece(cu, k, p, &c, &refused));
        if (refused == CUDNN_STATUS_SUCCESS) {
            kv_conv_choice_store(&key, &c);
            return KLVAE_OK;
        }
    }
    kv_conv_choice list[KV_CONV_CANDIDATES + 1];
    int count = 0;
    KV_TRY(candidates(cu, k, p, list, &count));
    const double flops = 2.0 * p->n * p->co * p->rows * p->wo * (double)p->c * k->kh * k->kw;
    int best = -1;
    if (cu->conv_search && count > 1 && flops >= KV_CONV_SEARCH_FLOPS) {
        float best_ms = 0.0f;
        for (int i = 0; i < count; i++) {
            float ms;
            KV_TRY(time_choice(cu, k, p, &list[i], &ms));
            if (ms >= 0.0f && (best < 0 || ms < best_ms)) {
                best = i;
                best_ms = ms;
            }
        }
    }
    /* the fastest first, then the others in the heuristics' order */
    refused = CUDNN_STATUS_NOT_SUPPORTED;
    for (int j = -1; j < count; j++) {
        const int i = j < 0 ? best : j;
        if (i < 0 || (j >= 0 && j == best))
            continue;
        KV_TRY(run_piece(cu, k, p, &list[i], &refused));
        if (refused == CUDNN_STATUS_SUCCESS) {
            kv_conv_choice_store(&key, &list[i]);
            kv_conv_choice c_of_class;
            if (!kv_conv_choice_lookup(&class_key, &c_of_class)) /* the class's first */
                kv_conv_choice_store(&class_key, &list[i]);
            return KLVAE_OK;
        }
    }
    if (refused == CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED)
        return kv_cuda_error(cu, KLVAE_ERR_OUT_OF_MEMORY,
                             "conv2d: no cuDNN algorithm's workspace fits in device memory");
    return kv_cudnn_fail(cu, refused, "cudnnConvolutionForward (every candidate algorithm)");
}

klvae_status_t kv_conv_stage(kv_cuda *cu, const kv_conv_plan *plan, const void *x,
                            const kv_conv_norm *norm, void *dst, int n0, int nb, int oy0, int rows)
{
    stage_args a;
    memset(&a, 0, sizeof a);
    a.plan = *plan;
    a.x = x;
    if (norm) {
        a.scale = norm->scale;
        a.shift = norm->shift;
        a.scale16 = norm->scale16;
        a.shift16 = norm->shift16;
        a.act = norm->act;
    }
    a.dst = dst;
    a.n0 = n0;
    a.pr0 = oy0 * plan->stride;
    a.in_rows = kv_conv_in_rows(plan, rows);
    a.count = kv_conv_piece_x_elems(plan, nb, rows);
    const bool bf16 = cu->compute == KV_CUDA_BF16;
    const int width = bf16 ? 8 : 4;
    const bool vec = plan->nhwc && plan->c % width == 0 && kv_cuda_aligned16(x, dst);
    const unsigned blocks = kv_cuda_blocks(vec ? a.count / width : a.count, cu);
    if (bf16 && vec)
        stage_kernel<uint16_t, 8><<<blocks, 256, 0, cu->stream>>>(a);
    else if (bf16)
        stage_kernel<uint16_t, 1><<<blocks, 256, 0, cu->stream>>>(a);
    else if (vec)
        stage_kernel<float, 4><<<blocks, 256, 0, cu->stream>>>(a);
    else
        stage_kernel<float, 1><<<blocks, 256, 0, cu->stream>>>(a);
    KV_LAUNCHED(cu, stage_kernel);
    return KLVAE_OK;
}

static klvae_status_t stage_piece(kv_cuda *cu, const conv_call *k, int n0, int nb, int oy0,
                                  int rows)
{
    return kv_conv_stage(cu, &k->plan, k->x, k->scale ? &k->norm : NULL, k->in_buf, n0, nb, oy0,
                         rows);
}

static klvae_status_t band_out(kv_cuda *cu, const conv_call *k, const conv_piece *p, int n0,
                               int oy0)
{
    band_args a;
    memset(&a, 0, sizeof a);
    a.plan = k->plan;
    a.src = p->y;
    a.y = k->y;
    a.bias = k->bias;
    a.r = k->r;
    a.b16 = cu->compute == KV_CUDA_BF16;
    a.n0 = n0;
    a.oy0 = oy0;
    a.rows = p->rows;
    a.count = (size_t)p->n * p->co * p->rows * p->wo;
    band_out_kernel<<<kv_cuda_blocks(a.count, cu), 256, 0, cu->stream>>>(a);
    KV_LAUNCHED(cu, band_out_kernel);
    return KLVAE_OK;
}

/* The pieces of the plan in order: stage, convolve, place. */
static klvae_status_t run_pieces(kv_cuda *cu, const conv_call *k)
{
    const kv_conv_plan *pl = &k->plan;
    const size_t es = kv_cuda_esize(cu->compute);
    for (int n0 = 0; n0 < pl->n; n0 += pl->chunk) {
        const int nb = pl->n - n0 < pl->chunk ? pl->n - n0 : pl->chunk;
        for (int band = 0; band < pl->bands; band++) {
            const int oy0 = band * pl->rows, rows = kv_conv_band_rows(pl, band);
            conv_piece p;
            memset(&p, 0, sizeof p);
            p.n = nb;
            p.c = pl->c;
            p.co = pl->co;
            p.rows = rows;
            p.wo = pl->wo;
            if (pl->staged) {
                KV_TRY(stage_piece(cu, k, n0, nb, oy0, rows));
                p.x = k->in_buf;
                p.h = kv_conv_in_rows(pl, rows);
                p.w = pl->wp;
            } else {
                p.x = (const char *)k->x + (size_t)kv_conv_input_offset(pl, n0) * es;
                p.h = pl->h;
                p.w = pl->w;
                p.pad_h = pl->pad_top;
                p.pad_w = pl->pad_left;
            }
            p.in_place = !pl->out_buffer;
            if (p.in_place) {
                const size_t at = (size_t)kv_conv_output_offset(pl, n0, oy0) * es;
                p.y = (char *)k->y + at;
                p.r = k->r ? (const char *)k->r + at : NULL;
            } else {
                p.y = k->out_buf;
            }
            KV_TRY(convolve(cu, k, &p));
            if (!p.in_place)
                KV_TRY(band_out(cu, k, &p, n0, oy0));
        }
    }
    return KLVAE_OK;
}

/* conv_call's operands, with their dtypes checked: x, w, b, y and r in the
 * compute dtype, the prologue's scale and shift in either. */
static klvae_status_t operands(kv_cuda *cu, const kv_tensor *x, const kv_conv_prologue *pro,
                               const kv_tensor *w, const kv_tensor *b, const kv_tensor *r,
                               kv_tensor *y, conv_call *k)
{
    const kv_tensor *need[5] = {x, w, b && b->data ? b : NULL, r && r->data ? r : NULL, y};
    static const char *names[5] = {"the input", "the filter", "the bias", "the residual",
                                   "the output"};
    for (int i = 0; i < 5; i++) {
        if (!need[i])
            continue;
        kv_cuda_dtype dt;
        KV_TRY(kv_cuda_dtype_of(cu, need[i]->data, "conv2d", names[i], &dt));
        if (dt != cu->compute)
            return kv_cuda_error(cu, KLVAE_ERR_INTERNAL,
                                 "conv2d: %s is stored as float32; this backend convolves bf16 "
                                 "tensors only",
                                 names[i]);
    }
    k->x = x->data;
    k->w = w->data;
    k->bias = need[2] ? b->data : NULL;
    k->r = need[3] ? r->data : NULL;
    k->y = y->data;
    if (pro && pro->scale && pro->scale->data && pro->shift && pro->shift->data) {
        kv_cuda_dtype ds, dh;
        KV_TRY(kv_cuda_dtype_of(cu, pro->scale->data, "conv2d", "the prologue's scale", &ds));
        KV_TRY(kv_cuda_dtype_of(cu, pro->shift->data, "conv2d", "the prologue's shift", &dh));
        k->scale = pro->scale->data;
        k->norm.scale = pro->scale->data;
        k->norm.shift = pro->shift->data;
        k->norm.scale16 = ds == KV_CUDA_BF16;
        k->norm.shift16 = dh == KV_CUDA_BF16;
        k->norm.act = (int)pro->act;
    }
    return KLVAE_OK;
}

klvae_status_t kv_cuda_conv2d(kv_backend *be, const kv_tensor *x, const kv_conv_prologue *prologue,
                              const kv_tensor *w, const kv_tensor *b, const kv_tensor *residual,
                              kv_conv_geometry g, kv_tensor *y)
{
    kv_cuda *cu = kv_cuda_of(be);
    conv_call k;
    memset(&k, 0, sizeof k);
    KV_TRY(operands(cu, x, prologue, w, b, residual, y, &k));
    const int n = x->shape[0], c = x->shape[1], h = x->shape[2], wd = x->shape[3];
    const int co = w->shape[0];
    k.kh = w->ndim == 4 ? w->shape[2] : 1;
    k.kw = w->ndim == 4 ? w->shape[3] : 1;
    k.stride = g.stride;
    const int up = prologue && prologue->upsample2x;
    const bool symmetric = g.pad_top == g.pad_bottom && g.pad_left == g.pad_right;
    const bool staged = k.scale || up || !symmetric;
    const size_t es = kv_cuda_esize(cu->compute);
    kv_conv_plan_make(&k.plan, n, c, h, wd, up, co, k.kh, k.kw, g, staged, cu->nhwc, es,
                      cu->conv_budget);
    if (k.plan.ho != y->shape[2] || k.plan.wo != y->shape[3] || y->shape[1] != co ||
        y->shape[0] != n)
        return kv_cuda_error(cu, KLVAE_ERR_INTERNAL,
                             "conv2d: output is %d x %d x %d x %d, the geometry gives %d x %d x "
                             "%d x %d",
                             y->shape[0], y->shape[1], y->shape[2], y->shape[3], n, co,
                             k.plan.ho, k.plan.wo);
    if (!n || !co || !k.plan.ho || !k.plan.wo)
        return KLVAE_OK;
    klvae_status_t st = kv_cuda_temp(cu, k.plan.in_elems * es, "conv2d staging", &k.in_buf);
    if (st == KLVAE_OK)
        st = kv_cuda_temp(cu, k.plan.out_elems * es, "conv2d output bands", &k.out_buf);
    if (st == KLVAE_OK)
        st = run_pieces(cu, &k);
    kv_cuda_temp_free(cu, k.in_buf);
    kv_cuda_temp_free(cu, k.out_buf);
    return st;
}
