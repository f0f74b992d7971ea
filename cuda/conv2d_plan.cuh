/* conv2d_plan.cuh — how cuda/conv2d.cu splits a convolution into pieces
 * that cuDNN runs, and the index maps of its staging kernel. Plain C and
 * __host__ __device__, so tests/test_cuda_host.c checks them on the CPU.
 *
 * Layout. In fp32 mode the backend's activations are NCHW, as the CPU's; in
 * tf32 and bf16 they are NHWC, the layout cuDNN's tensor-core kernels work
 * in (cuda/README.md). The plan knows both.
 *
 * Staging. cuDNN pads symmetrically and has no prologue. So a convolution
 * whose geometry is symmetric, whose input needs no prologue and no
 * upsampling goes to cuDNN as it is. Every other one is *staged*: a kernel
 * writes prologue(x) (the group norm and activation fused into the conv),
 * read through the nearest 2x upsample when the conv has one (the decoder's
 * Upsample2D: the upsampled tensor is never stored), with every padding row
 * and column written out as zeros, into a staging buffer, and cuDNN
 * convolves that with no padding.
 *
 * Pieces. A staging buffer as large as the input would add a whole
 * activation to the peak memory (the 256-channel 1024^2 input of the
 * decoder's last level is 512 MiB in bf16), so the work goes in pieces of at
 * most `budget` bytes of buffers: chunks of whole samples when one sample
 * fits, else bands of output rows of one sample, whose staged input is the
 * band's rows plus the (kh - stride) rows of overlap. In NHWC a band of
 * output rows is a contiguous part of y, so cuDNN writes it in place; in
 * NCHW it is not (its channels are Ho*Wo apart), so banded NCHW pieces go
 * through an output buffer that a second kernel copies into y.
 *
 * cuDNN's limit. cuDNN refuses a tensor of 2^31 elements or more (a 1024^2
 * decode of batch 8 reaches exactly 2^31 in its 256-channel convolutions),
 * so no piece's input or output may reach KV_CUDNN_MAX_ELEMS: batches are
 * split, and a single sample that is too large is staged and banded.
 *
 * The bias and the residual (the resnet's shortcut, the attention's input)
 * are the epilogue: cuDNN's fused convolution adds them, or one kernel over
 * the piece's output when that is not available (conv2d.cu). */
#ifndef KV_CONV2D_PLAN_CUH
#define KV_CONV2D_PLAN_CUH

#include "backend/backend.h"

#define KV_CUDNN_MAX_ELEMS ((size_t)0x7FFFFFFF) /* 2^31 - 1 */

typedef struct kv_conv_plan {
    int n, c, h, w;                 /* input as stored */
    int up;                         /* 1: the conv reads the nearest-2x upsample of x */
    int hi, wi;                     /* the conv's logical input: h << up, w << up */
    int co, kh, kw, stride;         /* filter */
    int pad_top, pad_left, pad_bottom, pad_right;
    int ho, wo;                     /* output */
    int nhwc;                       /* activations (x, y, the staged input) are NHWC */
    int staged;                     /* the input goes through the staging buffer */
    int out_buffer;                 /* the output goes through the output buffer (NCHW bands) */
    int chunk;                      /* samples per piece */
    int rows;                       /* output rows per band (the last may be shorter) */
    int bands;                      /* bands per sample: ceil(ho / rows) */
    int wp;                         /* staged width: wi + pad_left + pad_right */
    size_t in_elems, out_elems;     /* buffer sizes in elements (0 when unused) */
} kv_conv_plan;

/* Padded input rows that `rows` output rows read. */
static inline KV_HD int kv_conv_in_rows(const kv_conv_plan *p, int rows)
{
    return (rows - 1) * p->stride + p->kh;
}

/* Output rows of band b. */
static inline KV_HD int kv_conv_band_rows(const kv_conv_plan *p, int b)
{
    int left = p->ho - b * p->rows;
    return left < p->rows ? left : p->rows;
}

/* The class of a convolution's input height for the choice of its cuDNN
 * algorithm: the smallest power of two >= h. Shapes that differ only in
 * height within one class (the bands of a streamed image, the last band of
 * a cut convolution) start from the choice made for the first of them
 * instead of asking cuDNN and timing candidates again (cuda/conv2d.cu). */
static inline KV_HD int kv_conv_height_class(int h)
{
    int c = 1;
    while (c < h && c < (1 << 30))
        c <<= 1;
    return c;
}

/* Elements of the input and output tensors cuDNN sees for a piece of nb
 * samples and `rows` output rows. */
static inline KV_HD size_t kv_conv_piece_x_elems(const kv_conv_plan *p, int nb, int rows)
{
    return p->staged ? (size_t)nb * p->c * (size_t)kv_conv_in_rows(p, rows) * p->wp
                     : (size_t)nb * p->c * (size_t)p->h * p->w;
}

static inline KV_HD size_t kv_conv_piece_y_elems(const kv_conv_plan *p, int nb, int rows)
{
    return (size_t)nb * p->co * (size_t)rows * p->wo;
}

static inline void kv_conv_plan_sizes(kv_conv_plan *p)
{
    p->in_elems = p->staged ? kv_conv_piece_x_elems(p, p->chunk, p->rows) : 0;
    p->out_elems = p->out_buffer ? kv_conv_piece_y_elems(p, p->chunk, p->rows) : 0;
}

/* Bands of one sample for a budget: each band's buffers within budget
 * bytes (esize per element) and its tensors under cuDNN's limit. */
static inline void kv_conv_plan_bands(kv_conv_plan *p, size_t esize, size_t budget)
{
    const size_t in_row = (size_t)p->c * p->wp; /* staged elements per input row */
    const size_t out_row = (size_t)p->co * p->wo;
    const size_t per_row_bytes = (in_row * p->stride + (p->out_buffer ? out_row : 0)) * esize;
    const size_t fixed = in_row * (size_t)(p->kh > p->stride ? p->kh - p->stride : 0);
    size_t r = budget > fixed * esize ? (budget - fixed * esize) / per_row_bytes : 0;
    /* cuDNN's element limit on the staged input and the output of a band */
    size_t r_in = KV_CUDNN_MAX_ELEMS > fixed ? (KV_CUDNN_MAX_ELEMS - fixed) / (in_row * p->stride)
                                              : 0;
    size_t r_out = KV_CUDNN_MAX_ELEMS / out_row;
    if (r > r_in)
        r = r_in;
    if (r > r_out)
        r = r_out;
    if (r < 1)
        r = 1;
    if (r > (size_t)p->ho)
        r = (size_t)p->ho;
    p->chunk = 1;
    p->bands = (p->ho + (int)r - 1) / (int)r;
    p->rows = (p->ho + p->bands - 1) / p->bands; /* equal bands */
    p->bands = (p->ho + p->rows - 1) / p->rows;
}

/* Plans y = conv(prologue(x)) for x (n, c, h, w) as stored, read through a
 * nearest 2x upsample when up, filter (co, c, kh, kw), geometry g.
 * staged: the input needs the staging buffer (prologue, asymmetric padding
 * or upsampling; see above) — a single sample over cuDNN's limit is staged
 * whatever this says; nhwc: the activations' layout; esize: bytes per
 * element of the compute dtype; budget: bytes the buffers may take together
 * (a piece is never smaller than one output row of one sample, whatever the
 * budget). */
static inline void kv_conv_plan_make(kv_conv_plan *p, int n, int c, int h, int w, int up, int co,
                                     int kh, int kw, kv_conv_geometry g, int staged, int nhwc,
                                     size_t esize, size_t budget)
{
    memset(p, 0, sizeof *p);
    p->n = n;
    p->c = c;
    p->h = h;
    p->w = w;
    p->up = up ? 1 : 0;
    p->hi = h << p->up;
    p->wi = w << p->up;
    p->co = co;
    p->kh = kh;
    p->kw = kw;
    p->stride = g.stride;
    p->pad_top = g.pad_top;
    p->pad_left = g.pad_left;
    p->pad_bottom = g.pad_bottom;
    p->pad_right = g.pad_right;
    p->ho = (p->hi + g.pad_top + g.pad_bottom - kh) / g.stride + 1;
    p->wo = (p->wi + g.pad_left + g.pad_right - kw) / g.stride + 1;
    p->nhwc = nhwc ? 1 : 0;
    const size_t x_sample = (size_t)c * h * w, y_sample = (size_t)co * p->ho * p->wo;
    p->staged = staged || p->up || x_sample > KV_CUDNN_MAX_ELEMS || y_sample > KV_CUDNN_MAX_ELEMS;
    p->wp = p->staged ? p->wi + g.pad_left + g.pad_right : w;
    p->rows = p->ho;
    p->bands = 1;
    if (!p->staged) { /* cuDNN reads x as it is: whole samples, as many as its limit allows */
        size_t largest = x_sample > y_sample ? x_sample : y_sample;
        size_t fit = largest ? KV_CUDNN_MAX_ELEMS / largest : (size_t)n;
        p->chunk = fit < 1 ? 1 : (fit > (size_t)n ? n : (int)fit);
        kv_conv_plan_sizes(p);
        return;
    }
    const size_t per_sample = ((size_t)c * p->wp * (size_t)kv_conv_in_rows(p, p->ho)) * esize;
    if (per_sample <= budget && per_sample / esize <= KV_CUDNN_MAX_ELEMS &&
        y_sample <= KV_CUDNN_MAX_ELEMS) {
        size_t fit = budget / per_sample, fit_x = KV_CUDNN_MAX_ELEMS / (per_sample / esize);
        size_t fit_y = y_sample ? KV_CUDNN_MAX_ELEMS / y_sample : (size_t)n;
        if (fit > fit_x)
            fit = fit_x;
        if (fit > fit_y)
            fit = fit_y;
        p->chunk = fit < 1 ? 1 : (fit > (size_t)n ? n : (int)fit);
    } else {
        kv_conv_plan_bands(p, esize, budget);
        if (p->bands > 1 && !p->nhwc) { /* an NCHW band of y is not packed: plan again */
            p->out_buffer = 1;
            kv_conv_plan_bands(p, esize, budget);
        }
    }
    kv_conv_plan_sizes(p);
}

/* The staging kernel's map. A piece's staged input is nb samples from n0 and
 * padded rows [pr0, pr0 + in_rows), NHWC (nb, in_rows, wp, c) or NCHW
 * (nb, c, in_rows, wp): element e of it holds the value of x at the
 * returned index, or a padding zero when that is -1. *plane is the (sample,
 * channel) index (n0 + nn) * c + ci, for the prologue's scale and shift. */
static inline KV_HD int64_t kv_conv_stage_source(const kv_conv_plan *p, int n0, int pr0,
                                                 int in_rows, int64_t e, int64_t *plane)
{
    int nn, ci, r, q;
    if (p->nhwc) {
        ci = (int)(e % p->c);
        int64_t pix = e / p->c;
        q = (int)(pix % p->wp);
        int64_t row = pix / p->wp;
        r = (int)(row % in_rows);
        nn = (int)(row / in_rows);
    } else {
        q = (int)(e % p->wp);
        int64_t row = e / p->wp;
        r = (int)(row % in_rows);
        int64_t lp = row / in_rows;
        ci = (int)(lp % p->c);
        nn = (int)(lp / p->c);
    }
    const int n = n0 + nn;
    *plane = (int64_t)n * p->c + ci;
    const int sy = pr0 + r - p->pad_top, sx = q - p->pad_left; /* in the logical input */
    if (sy < 0 || sy >= p->hi || sx < 0 || sx >= p->wi)
        return -1;
    const int y = sy >> p->up, x = sx >> p->up;
    return p->nhwc ? (((int64_t)n * p->h + y) * p->w + x) * p->c + ci
                   : (*plane * p->h + y) * p->w + x;
}

/* The output buffer's map (NCHW bands): element e of a piece's output
 * (nb, co, rows, wo) for samples from n0 and output rows from oy0 goes to
 * the returned index of y. */
static inline KV_HD int64_t kv_conv_output_target(const kv_conv_plan *p, int n0, int oy0,
                                                  int rows, int64_t e)
{
    const int ox = (int)(e % p->wo);
    const int64_t rest = e / p->wo;
    const int r = (int)(rest % rows);
    const int64_t lp = rest / rows; /* nn * co + channel */
    return (((int64_t)n0 * p->co + lp) * p->ho + oy0 + r) * p->wo + ox;
}

/* Where the output of a piece starts in y when cuDNN writes it in place
 * (no output buffer): samples from n0, rows from oy0. */
static inline KV_HD int64_t kv_conv_output_offset(const kv_conv_plan *p, int n0, int oy0)
{
    return p->nhwc ? (((int64_t)n0 * p->ho + oy0) * p->wo) * p->co
                   : (int64_t)n0 * p->co * p->ho * p->wo; /* bands == 1 here */
}

/* Where a piece of an unstaged input (whole samples) starts in x. */
static inline KV_HD int64_t kv_conv_input_offset(const kv_conv_plan *p, int n0)
{
    return (int64_t)n0 * p->c * p->h * p->w;
}

/* The backward data of an asymmetrically padded convolution is computed
 * for the padded input (hp x wp, the padding included) and cropped: element
 * e of dx (n, c, h, w in the layout) is element returned of that padded
 * gradient, whose padding starts top rows and left columns before x. */
static inline KV_HD int64_t kv_conv_crop_source(int64_t e, int nhwc, int c, int h, int w, int hp,
                                                int wp, int top, int left)
{
    int n, ch, y, x;
    if (nhwc) {
        ch = (int)(e % c);
        int64_t pix = e / c;
        x = (int)(pix % w);
        int64_t row = pix / w;
        y = (int)(row % h);
        n = (int)(row / h);
        return (((int64_t)n * hp + y + top) * wp + x + left) * c + ch;
    }
    x = (int)(e % w);
    int64_t row = e / w;
    y = (int)(row % h);
    int64_t plane = row / h;
    ch = (int)(plane % c);
    n = (int)(plane / c);
    return (((int64_t)n * c + ch) * hp + y + top) * wp + x + left;
}

#endif /* KV_CONV2D_PLAN_CUH */
