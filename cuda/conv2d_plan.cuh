/* conv2d_plan.cuh — how cuda/conv2d.cu splits a convolution into pieces
 * that cuDNN runs, and the index maps of its two helper kernels. Plain C and
 * __host__ __device__, so tests/test_cuda_host.c checks them on the CPU.
 *
 * cuDNN pads symmetrically (the same rows on top and bottom) and has no
 * prologue. So a convolution whose geometry is symmetric, whose input needs
 * no prologue and already has the compute dtype goes to cuDNN as it is.
 * Every other one is *staged*: a kernel writes prologue(x), converted to the
 * compute dtype and with every padding row and column written out as zeros,
 * into a staging buffer, and cuDNN convolves that with no padding. That is
 * how the Downsample2D conv (pad bottom/right only) and every conv with a
 * fused group norm run.
 *
 * A staging buffer as large as the input would add a whole activation to
 * the peak memory (the 256-channel 1024^2 input of the decoder's last level
 * is 512 MiB in bf16), so the work goes in pieces of at most `budget` bytes
 * of buffers: chunks of whole samples when one sample fits, else bands of
 * output rows of one sample, whose staged input is the band's rows plus the
 * (kh - stride) rows of overlap, zeros where they fall outside the image.
 * A band of output rows is not a packed tensor of y (its channels are Ho*Wo
 * apart), so banded pieces, and outputs that need another dtype, go through
 * an output buffer, and a second kernel adds the bias and writes them into y;
 * otherwise cuDNN writes y directly and that kernel adds the bias in place. */
#ifndef KV_CONV2D_PLAN_CUH
#define KV_CONV2D_PLAN_CUH

#include "backend/backend.h"

typedef struct kv_conv_plan {
    int n, c, h, w;                 /* input */
    int co, kh, kw, stride;         /* filter */
    int pad_top, pad_left, pad_bottom, pad_right;
    int ho, wo;                     /* output */
    int staged;                     /* the input goes through the staging buffer */
    int out_buffer;                 /* the output goes through the output buffer */
    int chunk;                      /* samples per piece */
    int rows;                       /* output rows per band (the last may be shorter) */
    int bands;                      /* bands per sample: ceil(ho / rows) */
    int wp;                         /* staged width: w + pad_left + pad_right */
    size_t in_elems, out_elems;     /* buffer sizes in elements (0 when unused) */
} kv_conv_plan;

/* Padded input rows that output rows [oy0, oy0 + rows) read. */
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

static inline void kv_conv_plan_sizes(kv_conv_plan *p)
{
    p->in_elems = p->staged ? (size_t)p->chunk * p->c * (size_t)kv_conv_in_rows(p, p->rows) * p->wp
                            : 0;
    p->out_elems = p->out_buffer ? (size_t)p->chunk * p->co * (size_t)p->rows * p->wo : 0;
}

/* Plans y = conv(x) for x (n, c, h, w), filter (co, c, kh, kw), geometry g.
 * staged: the input needs the staging buffer (see above); convert: y has
 * another dtype than the compute dtype; esize: bytes per element of the
 * compute dtype; budget: bytes the two buffers may take together (a piece
 * is never smaller than one output row of one sample, whatever the budget). */
static inline void kv_conv_plan_make(kv_conv_plan *p, int n, int c, int h, int w, int co, int kh,
                                     int kw, kv_conv_geometry g, int staged, int convert,
                                     size_t esize, size_t budget)
{
    memset(p, 0, sizeof *p);
    p->n = n;
    p->c = c;
    p->h = h;
    p->w = w;
    p->co = co;
    p->kh = kh;
    p->kw = kw;
    p->stride = g.stride;
    p->pad_top = g.pad_top;
    p->pad_left = g.pad_left;
    p->pad_bottom = g.pad_bottom;
    p->pad_right = g.pad_right;
    p->ho = (h + g.pad_top + g.pad_bottom - kh) / g.stride + 1;
    p->wo = (w + g.pad_left + g.pad_right - kw) / g.stride + 1;
    p->staged = staged;
    p->out_buffer = convert;
    p->wp = staged ? w + g.pad_left + g.pad_right : w;
    p->rows = p->ho;
    p->bands = 1;
    const size_t out_row = (size_t)co * p->wo * esize;
    for (int pass = 0; pass < 2; pass++) {
        size_t in_row = staged ? (size_t)c * p->wp * esize : 0;
        size_t per_sample = in_row * (size_t)kv_conv_in_rows(p, p->ho) +
                            (p->out_buffer ? out_row * p->ho : 0);
        if (per_sample == 0) { /* nothing buffered: the whole batch at once */
            p->chunk = n;
            break;
        }
        if (per_sample <= budget || !staged) {
            size_t fit = budget / per_sample;
            p->chunk = fit < 1 ? 1 : (fit > (size_t)n ? n : (int)fit);
            p->rows = p->ho;
            p->bands = 1;
            break;
        }
        /* bands of one sample: in_row * ((r - 1) s + kh) + out_row * r <= budget */
        p->chunk = 1;
        size_t per_row = in_row * p->stride + (p->out_buffer ? out_row : 0);
        size_t fixed = in_row * (size_t)(kh - g.stride > 0 ? kh - g.stride : 0);
        size_t r = budget > fixed ? (budget - fixed) / per_row : 0;
        if (r < 1)
            r = 1;
        if (r > (size_t)p->ho)
            r = p->ho;
        p->bands = (p->ho + (int)r - 1) / (int)r;
        p->rows = (p->ho + p->bands - 1) / p->bands; /* equal bands */
        p->bands = (p->ho + p->rows - 1) / p->rows;
        if (p->bands == 1 || p->out_buffer)
            break;
        p->out_buffer = 1; /* a band of y is not packed: plan again with the buffer */
    }
    kv_conv_plan_sizes(p);
}

/* The staging kernel's map. A piece's staged input is (nb, c, in_rows, wp)
 * for samples [n0, n0 + nb) and padded rows [pr0, pr0 + in_rows); its
 * element (local plane lp = nn * c + ci, pixel pix = r * wp + q) holds the
 * value of x at the returned index, or a padding zero when that is -1.
 * *plane is the (sample, channel) index (n0 + nn) * c + ci, for the
 * prologue's scale and shift. The kernels go over (plane, pixel) so that
 * no 64-bit division is needed per element. */
static inline KV_HD int64_t kv_conv_stage_source(const kv_conv_plan *p, int n0, int pr0, int lp,
                                                 int pix, int64_t *plane)
{
    int r = pix / p->wp, q = pix % p->wp;
    *plane = (int64_t)n0 * p->c + lp;
    int sy = pr0 + r - p->pad_top, sx = q - p->pad_left;
    if (sy < 0 || sy >= p->h || sx < 0 || sx >= p->w)
        return -1;
    return (*plane * p->h + sy) * p->w + sx;
}

/* The output kernel's map: a piece's output is (nb, co, rows, wo) for
 * samples from n0 and output rows from oy0; its element (local plane
 * lp = nn * co + cc, pixel pix = r * wo + ox) goes to the returned index of
 * y; *channel is cc (for the bias). */
static inline KV_HD int64_t kv_conv_output_target(const kv_conv_plan *p, int n0, int oy0, int lp,
                                                  int pix, int *channel)
{
    int r = pix / p->wo, ox = pix % p->wo;
    *channel = lp % p->co;
    return (((int64_t)n0 * p->co + lp) * p->ho + oy0 + r) * p->wo + ox;
}

#endif /* KV_CONV2D_PLAN_CUH */
