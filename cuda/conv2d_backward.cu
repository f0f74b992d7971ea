/* conv2d_backward.cu — the gradients of conv2d through cuDNN, in the
 * backend's layout (specified in src/backend/backend.h):
 *
 *   conv2d_backward_data    dx = the transposed convolution of dy
 *                           (cudnnConvolutionBackwardData). cuDNN pads
 *                           symmetrically: an asymmetric geometry (the
 *                           Downsample2D conv) is computed for the padded
 *                           input and cropped (kv_conv_crop_source).
 *   conv2d_backward_weight  dw += dy * prologue(x) (cudnnConvolutionBackward-
 *                           Filter with beta 1; the prologue and asymmetric
 *                           padding staged as in the forward), db += the
 *                           per-channel sums of dy (reduce.cuh).
 *
 * Only deterministic algorithms are taken (the same step twice gives the
 * same bits), in fp32 only ALGO_1 with FMA math (the CPU's 1e-5). Batches are
 * cut so that no tensor reaches cuDNN's 2^31 elements. In bf16 mode a float32
 * gradient (the trainer keeps its gradients in float32) is accumulated from a
 * bf16 one that cuDNN computes, as PyTorch's autocast does. */
#include "conv2d_internal.h"
#include "reduce.cuh"

/* ---- choosing an algorithm ---- */

static bool data_algo_allowed(const kv_cuda *cu, int algo, cudnnMathType_t m)
{
    if (cu->precision != KV_PRECISION_FP32)
        return true;
    return m == CUDNN_FMA_MATH && algo == CUDNN_CONVOLUTION_BWD_DATA_ALGO_1;
}

static bool filter_algo_allowed(const kv_cuda *cu, int algo, cudnnMathType_t m)
{
    if (cu->precision != KV_PRECISION_FP32)
        return true;
    return m == CUDNN_FMA_MATH && algo == CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1;
}

/* The choice for the descriptors as set (heuristics, first deterministic
 * allowed one within the workspace limit; ALGO_1 else), once per key. */
static klvae_status_t choose_backward(kv_cuda *cu, kv_conv_kind kind, const kv_conv_key *key,
                                      kv_conv_choice *out)
{
    if (kv_conv_choice_lookup(key, out))
        return KLVAE_OK;
    const cudnnMathType_t math = kv_conv_wanted_math(cu);
    KV_CUDNN(cu, cudnnSetConvolutionMathType(cu->conv_desc, math));
    kv_conv_choice c = {0, 1, math, 0}; /* ALGO_1 of either kind: deterministic everywhere */
    bool chosen = false;
    int got = 0;
    if (kind == KV_CONV_BACKWARD_DATA) {
        cudnnConvolutionBwdDataAlgoPerf_t perf[CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT];
        cudnnStatus_t s = cudnnGetConvolutionBackwardDataAlgorithm_v7(
            cu->cudnn, cu->w_desc, cu->y_desc, cu->conv_desc, cu->x_desc,
            CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT, &got, perf);
        for (int i = 0; s == CUDNN_STATUS_SUCCESS && i < got && !chosen; i++)
            if (perf[i].status == CUDNN_STATUS_SUCCESS &&
                perf[i].determinism == CUDNN_DETERMINISTIC &&
                perf[i].memory <= cu->workspace_max &&
                data_algo_allowed(cu, (int)perf[i].algo, perf[i].mathType)) {
                c.algo = (int)perf[i].algo;
                c.math = perf[i].mathType;
                c.workspace = perf[i].memory;
                chosen = true;
            }
        if (!chosen)
            KV_CUDNN(cu, cudnnGetConvolutionBackwardDataWorkspaceSize(
                             cu->cudnn, cu->w_desc, cu->y_desc, cu->conv_desc, cu->x_desc,
                             CUDNN_CONVOLUTION_BWD_DATA_ALGO_1, &c.workspace));
    } else {
        cudnnConvolutionBwdFilterAlgoPerf_t perf[CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT];
        cudnnStatus_t s = cudnnGetConvolutionBackwardFilterAlgorithm_v7(
            cu->cudnn, cu->x_desc, cu->y_desc, cu->conv_desc, cu->w_desc,
            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT, &got, perf);
        for (int i = 0; s == CUDNN_STATUS_SUCCESS && i < got && !chosen; i++)
            if (perf[i].status == CUDNN_STATUS_SUCCESS &&
                perf[i].determinism == CUDNN_DETERMINISTIC &&
                perf[i].memory <= cu->workspace_max &&
                filter_algo_allowed(cu, (int)perf[i].algo, perf[i].mathType)) {
                c.algo = (int)perf[i].algo;
                c.math = perf[i].mathType;
                c.workspace = perf[i].memory;
                chosen = true;
            }
        if (!chosen)
            KV_CUDNN(cu, cudnnGetConvolutionBackwardFilterWorkspaceSize(
                             cu->cudnn, cu->x_desc, cu->y_desc, cu->conv_desc, cu->w_desc,
                             CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1, &c.workspace));
    }
    kv_conv_choice_store(key, &c);
    *out = c;
    return KLVAE_OK;
}

/* x (the conv's input as cuDNN sees it: nb x c x h x w), w, y (dy) and the
 * convolution descriptor. */
static klvae_status_t set_backward_descriptors(kv_cuda *cu, int nb, int c, int h, int w, int co,
                                               int kh, int kw, int stride, int pad_h, int pad_w,
                                               int ho, int wo)
{
    const cudnnDataType_t dt = cu->compute == KV_CUDA_BF16 ? CUDNN_DATA_BFLOAT16
                                                           : CUDNN_DATA_FLOAT;
    const cudnnTensorFormat_t f = cu->nhwc ? CUDNN_TENSOR_NHWC : CUDNN_TENSOR_NCHW;
    KV_CUDNN(cu, cudnnSetTensor4dDescriptor(cu->x_desc, f, dt, nb, c, h, w));
    KV_CUDNN(cu, cudnnSetFilter4dDescriptor(cu->w_desc, dt, f, co, c, kh, kw));
    KV_CUDNN(cu, cudnnSetConvolution2dDescriptor(cu->conv_desc, pad_h, pad_w, stride, stride, 1,
                                                 1, CUDNN_CROSS_CORRELATION, CUDNN_DATA_FLOAT));
    KV_CUDNN(cu, cudnnSetTensor4dDescriptor(cu->y_desc, f, dt, nb, co, ho, wo));
    int on, oc, oh, ow;
    KV_CUDNN(cu, cudnnGetConvolution2dForwardOutputDim(cu->conv_desc, cu->x_desc, cu->w_desc, &on,
                                                       &oc, &oh, &ow));
    if (on != nb || oc != co || oh != ho || ow != wo)
        return kv_cuda_error(cu, KLVAE_ERR_INTERNAL,
                             "conv2d backward: cuDNN's output is %d x %d x %d x %d, the gradient "
                             "%d x %d x %d x %d",
                             on, oc, oh, ow, nb, co, ho, wo);
    return KLVAE_OK;
}

/* Samples per piece so that no tensor of a piece reaches cuDNN's limit. */
static int samples_per_piece(size_t per_sample_in, size_t per_sample_out, int n)
{
    size_t largest = per_sample_in > per_sample_out ? per_sample_in : per_sample_out;
    size_t fit = largest ? KV_CUDNN_MAX_ELEMS / largest : (size_t)n;
    return fit < 1 ? 1 : (fit > (size_t)n ? n : (int)fit);
}

static klvae_status_t check_compute(kv_cuda *cu, const char *op, const kv_tensor *t,
                                    const char *what)
{
    kv_cuda_dtype d;
    KV_TRY(kv_cuda_dtype_of(cu, t->data, op, what, &d));
    if (d != cu->compute)
        return kv_cuda_error(cu, KLVAE_ERR_INTERNAL,
                             "%s: %s is stored as float32 in a bf16 backend", op, what);
    return KLVAE_OK;
}

/* ---- backward data ---- */

template <typename T>
static __global__ void crop_kernel(const T *src, T *dst, size_t count, int nhwc, int c, int h,
                                   int w, int hp, int wp, int top, int left)
{
    for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < count;
         e += (size_t)gridDim.x * blockDim.x)
        dst[e] = src[kv_conv_crop_source((int64_t)e, nhwc, c, h, w, hp, wp, top, left)];
}

klvae_status_t kv_cuda_conv2d_backward_data(kv_backend *be, const kv_tensor *dy,
                                            const kv_tensor *w, kv_conv_geometry g,
                                            kv_tensor *dx)
{
    kv_cuda *cu = kv_cuda_of(be);
    KV_TRY(check_compute(cu, "conv2d_backward_data", dy, "dy"));
    KV_TRY(check_compute(cu, "conv2d_backward_data", w, "the filter"));
    KV_TRY(check_compute(cu, "conv2d_backward_data", dx, "dx"));
    const int n = dx->shape[0], c = dx->shape[1], h = dx->shape[2], wd = dx->shape[3];
    const int co = dy->shape[1], ho = dy->shape[2], wo = dy->shape[3];
    const int kh = w->ndim == 4 ? w->shape[2] : 1, kw = w->ndim == 4 ? w->shape[3] : 1;
    const bool symmetric = g.pad_top == g.pad_bottom && g.pad_left == g.pad_right;
    /* the input cuDNN differentiates: x, or x with its padding written out */
    const int hp = symmetric ? h : h + g.pad_top + g.pad_bottom;
    const int wp = symmetric ? wd : wd + g.pad_left + g.pad_right;
    const size_t es = kv_cuda_esize(cu->compute);
    const size_t in_sample = (size_t)c * hp * wp, out_sample = (size_t)co * ho * wo;
    int chunk = samples_per_piece(in_sample, out_sample, n);
    if (!symmetric) { /* the padded gradient is a buffer: as many samples as the budget holds */
        const size_t fit = cu->conv_budget / (in_sample * es);
        chunk = fit < 1 ? 1 : (fit < (size_t)chunk ? (int)fit : chunk);
    }
    void *padded = NULL;
    if (!symmetric)
        KV_TRY(kv_cuda_temp(cu, (size_t)chunk * in_sample * es, "a padded gradient", &padded));
    const float one = 1.0f, zero = 0.0f;
    klvae_status_t st = KLVAE_OK;
    for (int n0 = 0; n0 < n && st == KLVAE_OK; n0 += chunk) {
        const int nb = n - n0 < chunk ? n - n0 : chunk;
        st = set_backward_descriptors(cu, nb, c, hp, wp, co, kh, kw, g.stride,
                                      symmetric ? g.pad_top : 0, symmetric ? g.pad_left : 0, ho,
                                      wo);
        kv_conv_key key;
        kv_conv_key_make(&key, cu, KV_CONV_BACKWARD_DATA, nb, c, hp, wp, co, kh, kw, g.stride,
                         symmetric ? g.pad_top : 0, symmetric ? g.pad_left : 0, 0, 0);
        kv_conv_choice ch;
        if (st == KLVAE_OK)
            st = choose_backward(cu, KV_CONV_BACKWARD_DATA, &key, &ch);
        void *ws = NULL;
        if (st == KLVAE_OK)
            st = kv_cuda_temp(cu, ch.workspace, "a cuDNN workspace", &ws);
        const void *dyp = (const char *)dy->data + (size_t)n0 * out_sample * es;
        void *dxp = symmetric ? (char *)dx->data + (size_t)n0 * in_sample * es : padded;
        if (st == KLVAE_OK) {
            cudnnStatus_t s = cudnnSetConvolutionMathType(cu->conv_desc, ch.math);
            if (s == CUDNN_STATUS_SUCCESS)
                s = cudnnConvolutionBackwardData(
                    cu->cudnn, &one, cu->w_desc, w->data, cu->y_desc, dyp, cu->conv_desc,
                    (cudnnConvolutionBwdDataAlgo_t)ch.algo, ws, ch.workspace, &zero, cu->x_desc,
                    dxp);
            if (s != CUDNN_STATUS_SUCCESS)
                st = kv_cudnn_fail(cu, s, "cudnnConvolutionBackwardData");
        }
        kv_cuda_temp_free(cu, ws);
        if (st == KLVAE_OK && !symmetric) {
            const size_t count = (size_t)nb * c * h * wd;
            void *out = (char *)dx->data + (size_t)n0 * c * h * wd * es;
            if (cu->compute == KV_CUDA_BF16)
                crop_kernel<uint16_t><<<kv_cuda_blocks(count, cu), 256, 0, cu->stream>>>(
                    (const uint16_t *)padded, (uint16_t *)out, count, cu->nhwc, c, h, wd, hp, wp,
                    g.pad_top, g.pad_left);
            else
                crop_kernel<float><<<kv_cuda_blocks(count, cu), 256, 0, cu->stream>>>(
                    (const float *)padded, (float *)out, count, cu->nhwc, c, h, wd, hp, wp,
                    g.pad_top, g.pad_left);
            cudaError_t e = cudaGetLastError();
            if (e != cudaSuccess)
                st = kv_cuda_fail(cu, e, "the launch of crop_kernel");
        }
    }
    kv_cuda_temp_free(cu, padded);
    return st;
}

/* ---- backward weight ---- */

/* dst (float32 or bf16) += src (compute dtype), elementwise. */
static __global__ void accumulate_kernel(void *dst, int d16, const void *src, int s16,
                                         size_t count)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x)
        kv_st(dst, d16, i, kv_ld(dst, d16, i) + kv_ld(src, s16, i));
}

/* db[c] += the sum over the batch of the per-(sample, channel) sums. */
static __global__ void bias_grad_kernel(const double2 *sums, int batch, int channels, void *db,
                                        int db16)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= channels)
        return;
    double s = 0.0;
    for (int n = 0; n < batch; n++)
        s += sums[(size_t)n * channels + c].x;
    kv_st(db, db16, c, kv_ld(db, db16, c) + (float)s);
}

struct dy_value {
    const void *dy;
    int b16;
    __device__ double2 operator()(size_t i, int, int) const
    {
        return make_double2((double)kv_ld(dy, b16, i), 0.0);
    }
};

static klvae_status_t bias_gradient(kv_cuda *cu, const kv_tensor *dy, kv_tensor *db)
{
    kv_cuda_dtype tdb;
    KV_TRY(kv_cuda_dtype_of(cu, db->data, "conv2d_backward_weight", "db", &tdb));
    const int n = dy->shape[0], co = dy->shape[1];
    double2 *sums = NULL;
    KV_TRY(kv_cuda_temp(cu, (size_t)n * co * sizeof(double2), "bias gradient sums",
                        (void **)&sums));
    dy_value f = {dy->data, cu->compute == KV_CUDA_BF16};
    klvae_status_t st = kv_cuda_plane_sums(cu, n, co, dy->shape[2], dy->shape[3], f, sums);
    if (st == KLVAE_OK) {
        bias_grad_kernel<<<(co + 255) / 256, 256, 0, cu->stream>>>(sums, n, co, db->data,
                                                                  tdb == KV_CUDA_BF16);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess)
            st = kv_cuda_fail(cu, e, "the launch of bias_grad_kernel");
    }
    kv_cuda_temp_free(cu, sums);
    return st;
}

/* One piece's filter gradient into dwc (compute dtype): added (beta 1) or
 * written (beta 0). */
static klvae_status_t filter_piece(kv_cuda *cu, const kv_conv_plan *pl, int nb, int rows,
                                   const void *xin, int h, int w, int pad_h, int pad_w,
                                   const void *dyp, float beta, void *dwc)
{
    KV_TRY(set_backward_descriptors(cu, nb, pl->c, h, w, pl->co, pl->kh, pl->kw, pl->stride,
                                    pad_h, pad_w, rows, pl->wo));
    kv_conv_key key;
    kv_conv_key_make(&key, cu, KV_CONV_BACKWARD_FILTER, nb, pl->c, h, w, pl->co, pl->kh, pl->kw,
                     pl->stride, pad_h, pad_w, 0, 0);
    kv_conv_choice ch;
    KV_TRY(choose_backward(cu, KV_CONV_BACKWARD_FILTER, &key, &ch));
    void *ws = NULL;
    KV_TRY(kv_cuda_temp(cu, ch.workspace, "a cuDNN workspace", &ws));
    const float one = 1.0f;
    cudnnStatus_t s = cudnnSetConvolutionMathType(cu->conv_desc, ch.math);
    if (s == CUDNN_STATUS_SUCCESS)
        s = cudnnConvolutionBackwardFilter(cu->cudnn, &one, cu->x_desc, xin, cu->y_desc, dyp,
                                           cu->conv_desc,
                                           (cudnnConvolutionBwdFilterAlgo_t)ch.algo, ws,
                                           ch.workspace, &beta, cu->w_desc, dwc);
    kv_cuda_temp_free(cu, ws);
    return s == CUDNN_STATUS_SUCCESS ? KLVAE_OK
                                     : kv_cudnn_fail(cu, s, "cudnnConvolutionBackwardFilter");
}

/* dst (float32 or bf16) += src (compute dtype), elementwise. */
static klvae_status_t accumulate(kv_cuda *cu, void *dst, int d16, const void *src, size_t count)
{
    accumulate_kernel<<<kv_cuda_blocks(count, cu), 256, 0, cu->stream>>>(
        dst, d16, src, cu->compute == KV_CUDA_BF16, count);
    KV_LAUNCHED(cu, accumulate_kernel);
    return KLVAE_OK;
}

/* The pieces of the plan: stage (when staged), then the filter gradient of
 * each piece: added by cuDNN into dw when dw is in the compute dtype (dwc ==
 * dw), else written into dwc and added into the float32 dw piece by piece
 * (so that the pieces are summed in float32, not in bf16). */
static klvae_status_t filter_pieces(kv_cuda *cu, const kv_conv_plan *pl, const void *x,
                                    const kv_conv_norm *norm, const void *dy, void *dw, int dw16,
                                    void *dwc, void *in_buf)
{
    const size_t es = kv_cuda_esize(cu->compute);
    const size_t nw = (size_t)pl->co * pl->c * pl->kh * pl->kw;
    const float beta = dwc == dw ? 1.0f : 0.0f;
    for (int n0 = 0; n0 < pl->n; n0 += pl->chunk) {
        const int nb = pl->n - n0 < pl->chunk ? pl->n - n0 : pl->chunk;
        for (int band = 0; band < pl->bands; band++) {
            const int oy0 = band * pl->rows, rows = kv_conv_band_rows(pl, band);
            const void *dyp = (const char *)dy + (size_t)kv_conv_output_offset(pl, n0, oy0) * es;
            if (pl->staged) {
                KV_TRY(kv_conv_stage(cu, pl, x, norm, in_buf, n0, nb, oy0, rows));
                KV_TRY(filter_piece(cu, pl, nb, rows, in_buf, kv_conv_in_rows(pl, rows), pl->wp,
                                    0, 0, dyp, beta, dwc));
            } else {
                const void *xin = (const char *)x + (size_t)kv_conv_input_offset(pl, n0) * es;
                KV_TRY(filter_piece(cu, pl, nb, rows, xin, pl->h, pl->w, pl->pad_top,
                                    pl->pad_left, dyp, beta, dwc));
            }
            if (dwc != dw)
                KV_TRY(accumulate(cu, dw, dw16, dwc, nw));
        }
    }
    return KLVAE_OK;
}

klvae_status_t kv_cuda_conv2d_backward_weight(kv_backend *be, const kv_tensor *x,
                                              const kv_conv_prologue *prologue,
                                              const kv_tensor *dy, kv_conv_geometry g,
                                              kv_tensor *dw, kv_tensor *db)
{
    kv_cuda *cu = kv_cuda_of(be);
    const char *op = "conv2d_backward_weight";
    KV_TRY(check_compute(cu, op, x, "the input"));
    KV_TRY(check_compute(cu, op, dy, "dy"));
    if (prologue && prologue->upsample2x)
        return kv_cuda_error(cu, KLVAE_ERR_INTERNAL, "%s: a prologue with upsample2x", op);
    kv_conv_norm norm;
    memset(&norm, 0, sizeof norm);
    const bool has_norm = prologue && prologue->scale && prologue->scale->data;
    if (has_norm) {
        kv_cuda_dtype ds, dh;
        KV_TRY(kv_cuda_dtype_of(cu, prologue->scale->data, op, "the prologue's scale", &ds));
        KV_TRY(kv_cuda_dtype_of(cu, prologue->shift->data, op, "the prologue's shift", &dh));
        norm.scale = prologue->scale->data;
        norm.shift = prologue->shift->data;
        norm.scale16 = ds == KV_CUDA_BF16;
        norm.shift16 = dh == KV_CUDA_BF16;
        norm.act = (int)prologue->act;
    }
    kv_cuda_dtype tdw;
    KV_TRY(kv_cuda_dtype_of(cu, dw->data, op, "dw", &tdw));
    const int n = x->shape[0], c = x->shape[1], h = x->shape[2], wd = x->shape[3];
    const int co = dy->shape[1];
    const int kh = dw->ndim == 4 ? dw->shape[2] : 1, kw = dw->ndim == 4 ? dw->shape[3] : 1;
    const bool symmetric = g.pad_top == g.pad_bottom && g.pad_left == g.pad_right;
    const size_t es = kv_cuda_esize(cu->compute);
    kv_conv_plan pl;
    kv_conv_plan_make(&pl, n, c, h, wd, 0, co, kh, kw, g, has_norm || !symmetric, cu->nhwc, es,
                      cu->conv_budget);
    if (pl.out_buffer) { /* NCHW bands: dy's band is not one tensor; whole samples then */
        const size_t per_sample = (size_t)c * (wd + g.pad_left + g.pad_right) *
                                  (h + g.pad_top + g.pad_bottom) * es;
        kv_conv_plan_make(&pl, n, c, h, wd, 0, co, kh, kw, g, has_norm || !symmetric, cu->nhwc,
                          es, per_sample > cu->conv_budget ? per_sample : cu->conv_budget);
    }
    if (pl.out_buffer)
        return kv_cuda_error(cu, KLVAE_ERR_UNSUPPORTED,
                             "%s: one sample of %d x %d x %d is beyond cuDNN's 2^31 elements in "
                             "NCHW (use the NHWC layout)",
                             op, c, h, wd);
    if (pl.ho != dy->shape[2] || pl.wo != dy->shape[3])
        return kv_cuda_error(cu, KLVAE_ERR_INTERNAL, "%s: dy is %d x %d, the geometry gives %d x %d",
                             op, dy->shape[2], dy->shape[3], pl.ho, pl.wo);
    const size_t nw = (size_t)co * c * kh * kw;
    void *in_buf = NULL, *dwc = tdw == cu->compute ? dw->data : NULL;
    klvae_status_t st = kv_cuda_temp(cu, pl.in_elems * es, "conv2d backward staging", &in_buf);
    if (st == KLVAE_OK && !dwc) /* a float32 gradient of a bf16 filter: via bf16 pieces */
        st = kv_cuda_temp(cu, nw * es, "a filter gradient", &dwc);
    if (st == KLVAE_OK)
        st = filter_pieces(cu, &pl, x->data, has_norm ? &norm : NULL, dy->data, dw->data,
                           tdw == KV_CUDA_BF16, dwc, in_buf);
    if (st == KLVAE_OK && db && db->data)
        st = bias_gradient(cu, dy, db);
    if (dwc != dw->data)
        kv_cuda_temp_free(cu, dwc);
    kv_cuda_temp_free(cu, in_buf);
    return st;
}
