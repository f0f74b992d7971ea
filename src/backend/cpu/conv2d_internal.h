/* conv2d_internal.h — the two ways the CPU backend convolves: banded
 * im2col + sgemm for every shape (conv2d.c), and Winograd F(2x2, 3x3) for
 * the 3x3 "same" convolutions with enough channels (conv2d_winograd.c). */
#ifndef KV_CONV2D_INTERNAL_H
#define KV_CONV2D_INTERNAL_H

#include "backend/cpu/cpu_ops.h"

/* Below this many channels the transforms cost more than they save. */
#define KV_WINOGRAD_MIN_CHANNELS 32

bool kv_winograd_applies(int ci, int co, int kh, int kw, kv_conv_geometry g);
/* y = conv(prologue(x)) + b for a geometry kv_winograd_applies to;
 * pad_top is its top padding (0 or 1), the bottom one follows from y's rows. */
klvae_status_t kv_conv2d_winograd(kv_cpu *cpu, const kv_tensor *x,
                                  const kv_conv_prologue *prologue, const kv_tensor *w,
                                  const kv_tensor *b, int pad_top, kv_tensor *y);

#endif
