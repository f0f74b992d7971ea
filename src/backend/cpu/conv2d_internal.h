/* conv2d_internal.h — the two ways the CPU backend convolves: banded
 * im2col + sgemm for every shape (conv2d.c), and Winograd F(2x2, 3x3) for
 * the 3x3 "same" convolutions with enough channels (conv2d_winograd.c). */
#ifndef KV_CONV2D_INTERNAL_H
#define KV_CONV2D_INTERNAL_H

#include "backend/cpu/cpu_ops.h"

/* Below this many channels the transforms cost more than they save. */
#define KV_WINOGRAD_MIN_CHANNELS 32

bool kv_winograd_applies(int ci, int co, int kh, int kw, kv_conv_geometry g);
/* y = conv(prologue(x), w') + b for a 3x3 "same" convolution, where w' is
 * w, or with flipped the flipped transpose of w (w'[i][o][ky][kx] =
 * w[o][i][2-ky][2-kx]: the kernel of the data gradient, so that its
 * transform is kept for w itself). */
klvae_status_t kv_conv2d_winograd(kv_cpu *cpu, const kv_tensor *x,
                                  const kv_conv_prologue *prologue, const kv_tensor *w,
                                  bool flipped, const kv_tensor *b, kv_tensor *y);
/* U = G w' G^T for every (co, ci) of the convolution's ci x co kernel w'
 * (w, or w's flipped transpose), 16 x co x ci floats, over the pool (each
 * thread's scratch must hold 9 ci floats). */
void kv_winograd_transform_weights(kv_cpu *cpu, const float *w, bool flipped, int ci, int co,
                                   float *u);

#endif
