/* conv2d_internal.h — the two ways the CPU backend convolves: banded
 * im2col + sgemm for every shape (conv2d.c), and Winograd F(2x2, 3x3) for
 * the 3x3 "same" convolutions with enough channels (conv2d_winograd.c). */
#ifndef KV_CONV2D_INTERNAL_H
#define KV_CONV2D_INTERNAL_H

#include "backend/cpu/cpu_ops.h"

/* Wide vectors where the CPU has them; the transforms are streaming loops. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define KV_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KV_VECTOR_CLONES
#endif

/* Below this many channels the transforms cost more than they save. */
#define KV_WINOGRAD_MIN_CHANNELS 32

/* One Winograd convolution's state (conv2d_winograd.c), also what the
 * input transform reads. */
typedef struct kv_winograd_job {
    const float *x, *bias; /* this image */
    float *y;
    const float *scale, *shift; /* this image's prologue, or NULL */
    kv_activation act;
    const float *u; /* transformed weights: 16 x Co x Ci */
    float *v;       /* this band's transformed inputs: 16 x Ci x tiles */
    int ci, co, h, w; /* h: input rows */
    int ho, pad_top;  /* output rows: h + pad_top + pad_bottom - 2 */
    int tiles_w, tile_rows_per_band;
    int tr0, tr1; /* this band's tile rows */
    int rows_per_chunk, chunks, co_per_split, splits;
    kv_cpu *cpu;
} kv_winograd_job;

/* V[xi][c][t] = (B^T d B)[xi] at j->v + xi * Ci * tiles + c * tiles + t for
 * channels [c0, c1) and the tiles of tile rows [j->tr0, j->tr1) (tiles of
 * them), with the prologue; rows holds 8 padded rows (8 (2 tiles_w + 2)
 * floats). */
void kv_winograd_transform_inputs(const kv_winograd_job *j, int c0, int c1, size_t tiles,
                                  float *rows);

bool kv_winograd_applies(int ci, int co, int kh, int kw, kv_conv_geometry g);
/* y = conv(prologue(x), w') + b for a geometry kv_winograd_applies to, where
 * w' is w, or with flipped the flipped transpose of w (w'[i][o][ky][kx] =
 * w[o][i][2-ky][2-kx]: the kernel of the data gradient, so that its
 * transform is kept for w itself); pad_top is the top padding (0 or 1: the
 * row bands of a streamed forward read halo rows instead), the bottom one
 * follows from y's rows. */
klvae_status_t kv_conv2d_winograd(kv_cpu *cpu, const kv_tensor *x,
                                  const kv_conv_prologue *prologue, const kv_tensor *w,
                                  bool flipped, const kv_tensor *b, int pad_top, kv_tensor *y);

/* Whether the weight gradient of this convolution goes through Winograd
 * (conv2d_winograd_backward.c): 3x3, stride 1, padding 1 on every side
 * (outputs the size of the input), at least KV_WINOGRAD_MIN_CHANNELS in and
 * out. */
bool kv_winograd_backward_weight_applies(int ci, int co, int h, int w, int ho, int wo, int kh,
                                         int kw, kv_conv_geometry g);
/* dw += the weight gradient of y = conv(prologue(x), w) given dy, for a
 * shape kv_winograd_backward_weight_applies to (the bias gradient is the
 * caller's). */
klvae_status_t kv_conv2d_winograd_backward_weight(kv_backend *be, const kv_tensor *x,
                                                  const kv_conv_prologue *prologue,
                                                  const kv_tensor *dy, kv_tensor *dw);
/* The same with bf16 products (cpu->bf16; conv2d_winograd_bf16.c);
 * kv_conv2d_winograd calls it in that mode. */
klvae_status_t kv_conv2d_winograd_bf16(kv_cpu *cpu, const kv_tensor *x,
                                       const kv_conv_prologue *prologue, const kv_tensor *w,
                                       bool flipped, const kv_tensor *b, int pad_top,
                                       kv_tensor *y);
/* U = G w' G^T for every (co, ci) of the convolution's ci x co kernel w'
 * (w, or w's flipped transpose), 16 x co x ci floats, over the pool (each
 * thread's scratch must hold 9 ci floats). */
void kv_winograd_transform_weights(kv_cpu *cpu, const float *w, bool flipped, int ci, int co,
                                   float *u);

#endif
