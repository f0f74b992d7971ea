/* conv2d_internal.h — the two ways the CPU backend convolves: banded
 * im2col + sgemm for every shape (conv2d.c), and Winograd F(2x2, 3x3) for
 * the 3x3 "same" convolutions with enough channels (conv2d_winograd.c). */
#ifndef KV_CONV2D_INTERNAL_H
#define KV_CONV2D_INTERNAL_H

#include "backend/cpu/cpu_ops.h"

/* Below this many channels the transforms cost more than they save. */
#define KV_WINOGRAD_MIN_CHANNELS 32

bool kv_winograd_applies(int ci, int co, int kh, int kw, kv_conv_geometry g);
klvae_status_t kv_conv2d_winograd(kv_cpu *cpu, const kv_tensor *x,
                                  const kv_conv_prologue *prologue, const kv_tensor *w,
                                  const kv_tensor *b, kv_tensor *y);

#endif
