/* conv2d_internal.h — what cuda/conv2d.cu shares with the backward ops of
 * cuda/conv2d_backward.cu: the process-wide table of cuDNN choices per
 * shape, the math type of the precision, and the staging kernel (prologue,
 * upsample, padding; conv2d_plan.cuh). */
#ifndef KV_CONV2D_INTERNAL_H
#define KV_CONV2D_INTERNAL_H

#include "cuda_ops.h"

/* What a choice is for. */
enum kv_conv_kind { KV_CONV_FORWARD = 0, KV_CONV_BACKWARD_DATA = 1, KV_CONV_BACKWARD_FILTER = 2 };

#define KV_CONV_KEY_DIMS 20
/* device, dtype, layout, precision, kind, n, c, h, w, co, kh, kw, stride,
 * pad_h, pad_w, epilogue, alignment, and the settings that change the
 * choice: forced algorithm, fused epilogue allowed, workspace limit (MiB) */
struct kv_conv_key {
    int dims[KV_CONV_KEY_DIMS];
};

/* A cuDNN algorithm (of the kind's enum) with its math type and workspace;
 * fused: the forward's cuDNN epilogue (conv + bias + residual). */
struct kv_conv_choice {
    int fused;
    int algo;
    cudnnMathType_t math;
    size_t workspace;
};

static inline void kv_conv_key_make(kv_conv_key *key, const kv_cuda *cu, kv_conv_kind kind, int n,
                                    int c, int h, int w, int co, int kh, int kw, int stride,
                                    int pad_h, int pad_w, int epilogue, int align)
{
    const int dims[KV_CONV_KEY_DIMS] = {cu->device, (int)cu->compute, cu->nhwc,
                                        (int)cu->precision, (int)kind, n, c, h, w, co, kh, kw,
                                        stride, pad_h, pad_w, epilogue, align, cu->forced_algo,
                                        cu->fused_epilogue, (int)(cu->workspace_max >> 20)};
    memcpy(key->dims, dims, sizeof dims);
}

/* The choice recorded for key (true), for the life of the process. */
bool kv_conv_choice_lookup(const kv_conv_key *key, kv_conv_choice *out);
void kv_conv_choice_store(const kv_conv_key *key, const kv_conv_choice *c);

/* cuDNN's math type for the backend's precision (fp32: FMA only). */
cudnnMathType_t kv_conv_wanted_math(const kv_cuda *cu);

/* A group norm fused into a convolution's input: act(x * scale + shift). */
struct kv_conv_norm {
    const void *scale, *shift;
    int scale16, shift16, act;
};

/* Writes the staged input of one piece of plan (nb samples from n0, output
 * rows [oy0, oy0 + rows)) into dst: norm(x) or x, read through the plan's
 * upsample, padding written as zeros. */
klvae_status_t kv_conv_stage(kv_cuda *cu, const kv_conv_plan *plan, const void *x,
                             const kv_conv_norm *norm, void *dst, int n0, int nb, int oy0,
                             int rows);

#endif /* KV_CONV2D_INTERNAL_H */
