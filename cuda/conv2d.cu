/* conv2d.cu — convolution through cuDNN (its classic API: a tensor, filter
 * and convolution descriptor, cudnnFindConvolutionForwardAlgorithmEx once
 * per shape, cudnnConvolutionForward), with two kernels of our own around
 * it for what cuDNN does not do: the staging kernel (prologue, dtype
 * conversion, asymmetric padding) and the output kernel (bias, dtype
 * conversion, band placement). How a convolution is cut into pieces, and
 * why, is in cuda/conv2d_plan.cuh.
 *
 * Precision: fp32 mode allows only FMA kernels (CUDNN_FMA_MATH; no TF32),
 * tf32 mode lets cuDNN use TF32 tensor cores (CUDNN_DEFAULT_MATH), bf16
 * mode has bf16 tensors and filters with float32 accumulation
 * (CUDNN_TENSOR_OP_MATH, compute type float). */
#include <stdlib.h>

#include "cuda_ops.h"

/* ---- the algorithm table: one cuDNN algorithm per shape ---- */

static unsigned algo_hash(const kv_conv_algo_key *k)
{
    unsigned h = 2166136261u;
    for (int i = 0; i < 11; i++)
        h = (h ^ (unsigned)k->dims[i]) * 16777619u;
    return (h ^ (unsigned)k->align) * 16777619u;
}

static bool algo_key_equal(const kv_conv_algo_key *a, const kv_conv_algo_key *b)
{
    return memcmp(a, b, sizeof *a) == 0;
}

static kv_conv_algo *algo_find(kv_cuda *cu, const kv_conv_algo_key *key)
{
    if (!cu->algo_capacity)
        return NULL;
    unsigned mask = (unsigned)cu->algo_capacity - 1;
    for (unsigned i = algo_hash(key) & mask;; i = (i + 1) & mask) {
        if (!cu->algos[i].used)
            return NULL;
        if (algo_key_equal(&cu->algos[i].key, key))
            return &cu->algos[i];
    }
}

static klvae_status_t algo_insert(kv_cuda *cu, const kv_conv_algo *a, kv_conv_algo **slot)
{
    if ((cu->algo_count + 1) * 2 > cu->algo_capacity) {
        int capacity = cu->algo_capacity ? cu->algo_capacity * 2 : 64;
        kv_conv_algo *table = (kv_conv_algo *)calloc((size_t)capacity, sizeof *table);
        if (!table)
            return kv_cuda_error(cu, KLVAE_ERR_OUT_OF_MEMORY, "out of memory growing the cuDNN "
                                                              "algorithm table");
        for (int i = 0; i < cu->algo_capacity; i++)
            if (cu->algos[i].used) {
                unsigned m = (unsigned)capacity - 1, j = algo_hash(&cu->algos[i].key) & m;
                while (table[j].used)
                    j = (j + 1) & m;
                table[j] = cu->algos[i];
            }
        free(cu->algos);
        cu->algos = table;
        cu->algo_capacity = capacity;
    }
    unsigned mask = (unsigned)cu->algo_capacity - 1, i = algo_hash(&a->key) & mask;
    while (cu->algos[i].used)
        i = (i + 1) & mask;
    cu->algos[i] = *a;
    cu->algos[i].used = true;
    cu->algo_count++;
    *slot = &cu->algos[i];
    return KLVAE_OK;
}

void kv_cuda_conv_forget(kv_cuda *cu)
{
    free(cu->algos);
    cu->algos = NULL;
    cu->algo_capacity = cu->algo_count = 0;
}

/* ---- one cuDNN convolution ---- */

struct conv_shape {
    int n, c, h, w, co, kh, kw, stride, pad_h, pad_w;
    int ho, wo; /* expected output size */
};

static cudnnMathType_t wanted_math(const kv_cuda *cu)
{
    switch (cu->precision) {
    case KV_PRECISION_TF32: return CUDNN_DEFAULT_MATH;
    case KV_PRECISION_BF16: return CUDNN_TENSOR_OP_MATH;
    default: return CUDNN_FMA_MATH;
    }
}

/* fp32 mode takes no algorithm that would round its inputs to TF32, nor the
 * FFT ones, whose rounding errors grow with the image (the CPU reference is
 * matched to 1e-5 through some 30 layers). */
static bool algo_allowed(const kv_cuda *cu, cudnnConvolutionFwdAlgo_t algo, cudnnMathType_t m)
{
    if (cu->precision != KV_PRECISION_FP32)
        return true;
    return m == CUDNN_FMA_MATH && algo != CUDNN_CONVOLUTION_FWD_ALGO_FFT &&
           algo != CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING;
}

/* log2 of the alignment of p, up to 256 bytes: cuDNN picks kernels by it. */
static int align_class(const void *p)
{
    uintptr_t u = (uintptr_t)p;
    int a = 0;
    while (a < 8 && !(u & ((uintptr_t)1 << a)))
        a++;
    return a;
}

/* The fallback every configuration supports, with its workspace. */
static klvae_status_t fallback_algo(kv_cuda *cu, kv_conv_algo *a)
{
    a->algo = CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM;
    a->math = wanted_math(cu);
    KV_CUDNN(cu, cudnnSetConvolutionMathType(cu->conv_desc, a->math));
    KV_CUDNN(cu, cudnnGetConvolutionForwardWorkspaceSize(cu->cudnn, cu->x_desc, cu->w_desc,
                                                         cu->conv_desc, cu->y_desc, a->algo,
                                                         &a->workspace));
    return KLVAE_OK;
}

/* Benchmarks the algorithms for the shape now in the descriptors (once per
 * shape) and picks the fastest allowed one within the workspace limit; with
 * KLVAE_CUDA_CONV_SEARCH=0, cuDNN's heuristic ranking instead (no runs: for
 * compute-sanitizer, which makes the benchmark very slow). */
static klvae_status_t choose_algo(kv_cuda *cu, const kv_conv_algo_key *key, const void *x,
                                  const void *w, void *y, kv_conv_algo **out)
{
    kv_conv_algo *found = algo_find(cu, key);
    if (found) {
        *out = found;
        return KLVAE_OK;
    }
    kv_conv_algo a;
    memset(&a, 0, sizeof a);
    a.key = *key;
    KV_CUDNN(cu, cudnnSetConvolutionMathType(cu->conv_desc, wanted_math(cu)));
    cudnnConvolutionFwdAlgoPerf_t perf[CUDNN_CONVOLUTION_FWD_ALGO_COUNT];
    int got = 0;
    bool chosen = false;
    size_t limit = KV_CUDA_WORKSPACE_LIMIT;
    cudnnStatus_t s;
    if (cu->conv_search) {
        /* a temporary workspace for the benchmark, smaller if memory is short */
        void *ws = NULL;
        while (limit > 0 && kv_dcache_alloc(&cu->cache, limit, 0, &ws) != KV_DCACHE_OK) {
            ws = NULL;
            limit /= 4;
            if (limit < ((size_t)1 << 20))
                limit = 0;
        }
        s = cudnnFindConvolutionForwardAlgorithmEx(cu->cudnn, cu->x_desc, x, cu->w_desc, w,
                                                   cu->conv_desc, cu->y_desc, y,
                                                   CUDNN_CONVOLUTION_FWD_ALGO_COUNT, &got, perf,
                                                   ws, limit);
        if (ws)
            kv_dcache_drop(&cu->cache, ws); /* give it back: it is not kept */
    } else {
        /* cuDNN's heuristics, ranked, without running anything */
        s = cudnnGetConvolutionForwardAlgorithm_v7(cu->cudnn, cu->x_desc, cu->w_desc,
                                                   cu->conv_desc, cu->y_desc,
                                                   CUDNN_CONVOLUTION_FWD_ALGO_COUNT, &got, perf);
    }
    if (s == CUDNN_STATUS_SUCCESS) {
        for (int i = 0; i < got && !chosen; i++)
            if (perf[i].status == CUDNN_STATUS_SUCCESS && perf[i].memory <= limit &&
                algo_allowed(cu, perf[i].algo, perf[i].mathType)) {
                a.algo = perf[i].algo;
                a.math = perf[i].mathType;
                a.workspace = perf[i].memory;
                chosen = true;
            }
    } else if (CUDNN_STATUS_CATEGORY(s) != CUDNN_STATUS_NOT_SUPPORTED &&
               CUDNN_STATUS_CATEGORY(s) != CUDNN_STATUS_BAD_PARAM) {
        return kv_cudnn_fail(cu, s, cu->conv_search ? "cudnnFindConvolutionForwardAlgorithmEx"
                                                    : "cudnnGetConvolutionForwardAlgorithm_v7");
    }
    if (!chosen)
        KV_TRY(fallback_algo(cu, &a));
    return algo_insert(cu, &a, out);
}

static cudnnDataType_t cudnn_type(kv_cuda_dtype t)
{
    return t == KV_CUDA_BF16 ? CUDNN_DATA_BFLOAT16 : CUDNN_DATA_FLOAT;
}

/* y = conv(x) for one piece, all pointers in the compute dtype. */
static klvae_status_t conv_run(kv_cuda *cu, const conv_shape *s, const void *x, const void *w,
                               void *y)
{
    const cudnnDataType_t dt = cudnn_type(cu->compute);
    KV_CUDNN(cu, cudnnSetTensor4dDescriptor(cu->x_desc, CUDNN_TENSOR_NCHW, dt, s->n, s->c, s->h,
                                            s->w));
    KV_CUDNN(cu, cudnnSetFilter4dDescriptor(cu->w_desc, dt, CUDNN_TENSOR_NCHW, s->co, s->c, s->kh,
                                            s->kw));
    KV_CUDNN(cu, cudnnSetConvolution2dDescriptor(cu->conv_desc, s->pad_h, s->pad_w, s->stride,
                                                 s->stride, 1, 1, CUDNN_CROSS_CORRELATION,
                                                 CUDNN_DATA_FLOAT));
    KV_CUDNN(cu, cudnnSetTensor4dDescriptor(cu->y_desc, CUDNN_TENSOR_NCHW, dt, s->n, s->co, s->ho,
                                            s->wo));
    int on, oc, oh, ow;
    KV_CUDNN(cu, cudnnGetConvolution2dForwardOutputDim(cu->conv_desc, cu->x_desc, cu->w_desc, &on,
                                                       &oc, &oh, &ow));
    if (on != s->n || oc != s->co || oh != s->ho || ow != s->wo)
        return kv_cuda_error(cu, KLVAE_ERR_INTERNAL,
                             "conv2d: cuDNN computes a %d x %d x %d x %d output where %d x %d x %d "
                             "x %d was planned",
                             on, oc, oh, ow, s->n, s->co, s->ho, s->wo);
    kv_conv_algo_key key;
    memset(&key, 0, sizeof key);
    const int dims[11] = {s->n,  s->c,      s->h,     s->w,     s->co,       s->kh,
                          s->kw, s->stride, s->pad_h, s->pad_w, (int)cu->compute};
    memcpy(key.dims, dims, sizeof dims);
    key.align = align_class(x) * 16 + align_class(y);
    kv_conv_algo *a = NULL;
    KV_TRY(choose_algo(cu, &key, x, w, y, &a));
    const float one = 1.0f, zero = 0.0f;
    for (int attempt = 0;; attempt++) {
        KV_CUDNN(cu, cudnnSetConvolutionMathType(cu->conv_desc, a->math));
        void *ws = NULL;
        if (a->workspace)
            KV_TRY(kv_cuda_reserve(cu, KV_BUF_WORKSPACE, a->workspace, &ws));
        cudnnStatus_t st = cudnnConvolutionForward(cu->cudnn, &one, cu->x_desc, x, cu->w_desc, w,
                                                   cu->conv_desc, a->algo, ws, a->workspace,
                                                   &zero, cu->y_desc, y);
        if (st == CUDNN_STATUS_SUCCESS)
            return KLVAE_OK;
        /* an algorithm the benchmark chose but this call refuses: the fallback, for good */
        if (attempt == 0 && a->algo != CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM &&
            (CUDNN_STATUS_CATEGORY(st) == CUDNN_STATUS_NOT_SUPPORTED ||
             CUDNN_STATUS_CATEGORY(st) == CUDNN_STATUS_BAD_PARAM)) {
            KV_TRY(fallback_algo(cu, a));
            continue;
        }
        return kv_cudnn_fail(cu, st, "cudnnConvolutionForward");
    }
}

/* ---- the two kernels around cuDNN ---- */

struct stage_args {
    kv_conv_plan plan;
    const void *x;
    int x16;
    const void *scale, *shift; /* the prologue, or NULL */
    int scale16, shift16, act;
    void *dst; /* compute dtype */
    int dst16;
    int n0, pr0, in_rows, planes;
};

/* The staged input of one piece: prologue(x) or 0 for padding, converted. */
static __global__ void stage_kernel(stage_args a)
{
    const int planes = a.planes;
    const int pixels = a.in_rows * a.plan.wp;
    for (int lp = blockIdx.y; lp < planes; lp += gridDim.y) {
        float s = 1.0f, t = 0.0f;
        const int64_t plane = (int64_t)a.n0 * a.plan.c + lp;
        if (a.scale) {
            s = kv_ld(a.scale, a.scale16, plane);
            t = kv_ld(a.shift, a.shift16, plane);
        }
        for (int pix = blockIdx.x * blockDim.x + threadIdx.x; pix < pixels;
             pix += gridDim.x * blockDim.x) {
            int64_t unused;
            int64_t src = kv_conv_stage_source(&a.plan, a.n0, a.pr0, lp, pix, &unused);
            float v = 0.0f;
            if (src >= 0) {
                v = kv_ld(a.x, a.x16, (size_t)src);
                if (a.scale)
                    v = kv_activate(a.act, v * s + t);
            }
            kv_st(a.dst, a.dst16, (size_t)lp * pixels + pix, v);
        }
    }
}

struct output_args {
    kv_conv_plan plan;
    const void *src; /* compute dtype */
    int src16;
    void *y;
    int y16;
    const void *bias; /* or NULL */
    int bias16;
    int n0, oy0, rows, planes;
};

/* One piece's output plus the bias, into its place in y (may be in place). */
static __global__ void output_kernel(output_args a)
{
    const int pixels = a.rows * a.plan.wo;
    for (int lp = blockIdx.y; lp < a.planes; lp += gridDim.y) {
        const int channel = lp % a.plan.co;
        const float b = a.bias ? kv_ld(a.bias, a.bias16, channel) : 0.0f;
        for (int pix = blockIdx.x * blockDim.x + threadIdx.x; pix < pixels;
             pix += gridDim.x * blockDim.x) {
            int ch;
            int64_t dst = kv_conv_output_target(&a.plan, a.n0, a.oy0, lp, pix, &ch);
            float v = kv_ld(a.src, a.src16, (size_t)lp * pixels + pix) + b;
            kv_st(a.y, a.y16, (size_t)dst, v);
        }
    }
}

/* ---- the op ---- */

klvae_status_t kv_cuda_conv2d(kv_backend *be, const kv_tensor *x, const kv_conv_prologue *prologue,
                              const kv_tensor *w, const kv_tensor *b, kv_conv_geometry g,
                              kv_tensor *y)
{
    kv_cuda *cu = kv_cuda_of(be);
    KV_CU(cu, cudaSetDevice(cu->device));
    const int n = x->shape[0], c = x->shape[1], h = x->shape[2], wd = x->shape[3];
    const int co = w->shape[0];
    const int kh = w->ndim == 4 ? w->shape[2] : 1, kw = w->ndim == 4 ? w->shape[3] : 1;
    const kv_cuda_dtype tc = cu->compute;
    const size_t es = kv_cuda_esize(tc);
    const kv_cuda_dtype tx = kv_cuda_dtype_of(cu, x->data), ty = kv_cuda_dtype_of(cu, y->data);

    /* the filter in the compute dtype (it is, unless it is a caller's array) */
    const void *wp = w->data;
    kv_cuda_dtype tw = kv_cuda_dtype_of(cu, w->data);
    if (tw != tc) {
        size_t count = kv_cuda_numel(w);
        void *buf = NULL;
        KV_TRY(kv_cuda_reserve(cu, KV_BUF_WEIGHT, count * es, &buf));
        KV_TRY(kv_cuda_convert(cu, w->data, tw, buf, tc, count));
        wp = buf;
    }
    const bool has_prologue = prologue && prologue->scale && prologue->scale->data &&
                              prologue->shift && prologue->shift->data;
    const bool symmetric = g.pad_top == g.pad_bottom && g.pad_left == g.pad_right;
    const bool staged = has_prologue || !symmetric || tx != tc;
    kv_conv_plan plan;
    kv_conv_plan_make(&plan, n, c, h, wd, co, kh, kw, g, staged, ty != tc, es, cu->conv_budget);
    if (plan.ho != y->shape[2] || plan.wo != y->shape[3] || y->shape[1] != co)
        return kv_cuda_error(cu, KLVAE_ERR_INTERNAL,
                             "conv2d: output is %d x %d x %d, the geometry gives %d x %d x %d",
                             y->shape[1], y->shape[2], y->shape[3], co, plan.ho, plan.wo);
    void *in_buf = NULL, *out_buf = NULL;
    if (plan.in_elems)
        KV_TRY(kv_cuda_reserve(cu, KV_BUF_CONV_IN, plan.in_elems * es, &in_buf));
    if (plan.out_elems)
        KV_TRY(kv_cuda_reserve(cu, KV_BUF_CONV_OUT, plan.out_elems * es, &out_buf));
    const void *bias = b && b->data ? b->data : NULL;

    for (int n0 = 0; n0 < n; n0 += plan.chunk) {
        const int nb = n - n0 < plan.chunk ? n - n0 : plan.chunk;
        for (int band = 0; band < plan.bands; band++) {
            const int oy0 = band * plan.rows, rows = kv_conv_band_rows(&plan, band);
            conv_shape s = {nb, c, h, wd, co, kh, kw, g.stride, g.pad_top, g.pad_left, rows,
                            plan.wo};
            const void *xin;
            if (staged) {
                stage_args sa;
                memset(&sa, 0, sizeof sa);
                sa.plan = plan;
                sa.x = x->data;
                sa.x16 = tx;
                if (has_prologue) {
                    sa.scale = prologue->scale->data;
                    sa.shift = prologue->shift->data;
                    sa.scale16 = kv_cuda_dtype_of(cu, sa.scale);
                    sa.shift16 = kv_cuda_dtype_of(cu, sa.shift);
                    sa.act = prologue->act;
                }
                sa.dst = in_buf;
                sa.dst16 = tc;
                sa.n0 = n0;
                sa.pr0 = oy0 * g.stride;
                sa.in_rows = kv_conv_in_rows(&plan, rows);
                sa.planes = nb * c;
                stage_kernel<<<kv_cuda_grid2(cu, (size_t)nb * c, (size_t)sa.in_rows * plan.wp), 256,
                               0, cu->stream>>>(sa);
                KV_LAUNCHED(cu, stage_kernel);
                xin = in_buf;
                s.h = sa.in_rows;
                s.w = plan.wp;
                s.pad_h = 0;
                s.pad_w = 0;
            } else {
                xin = (const char *)x->data + (size_t)n0 * c * h * wd * es;
            }
            void *yout = plan.out_buffer
                             ? out_buf
                             : (void *)((char *)y->data + (size_t)n0 * co * plan.ho * plan.wo * es);
            KV_TRY(conv_run(cu, &s, xin, wp, yout));
            if (plan.out_buffer || bias) {
                output_args oa;
                memset(&oa, 0, sizeof oa);
                oa.plan = plan;
                oa.src = yout;
                oa.src16 = tc;
                oa.y = y->data;
                oa.y16 = ty;
                oa.bias = bias;
                oa.bias16 = bias ? kv_cuda_dtype_of(cu, bias) : 0;
                oa.n0 = n0;
                oa.oy0 = oy0;
                oa.rows = rows;
                oa.planes = nb * co;
                output_kernel<<<kv_cuda_grid2(cu, (size_t)nb * co, (size_t)rows * plan.wo), 256, 0,
                                cu->stream>>>(oa);
                KV_LAUNCHED(cu, output_kernel);
            }
        }
    }
    return KLVAE_OK;
}
