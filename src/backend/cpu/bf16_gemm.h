/* bf16_gemm.h — matrix products with bf16 operands and float32 accumulation,
 * for precision=bf16 on CPUs with AVX512-BF16 (detected at run time).
 *
 * Storage stays float32: the operands are rounded to bf16 (to nearest, ties
 * to even) as they are packed, every product is accumulated in float32 by
 * VDPBF16PS, and C is float32. The instruction multiplies pairs: lane j
 * adds a[2p] * b[2p][j] + a[2p+1] * b[2p+1][j], so both operands are packed
 * as uint32 "pairs" of two bf16 values of consecutive k (the even k in the
 * low half); an odd K gets a zero partner.
 *
 *   packed A (m x k): panels of KV_BF16_MR rows, panel by panel; inside a
 *                     panel, pair p of row r at [p * MR + r] (rows past m
 *                     are zero), so the kernel broadcasts one uint32 per row;
 *   packed B (k x n): blocks of KV_BF16_NR columns, block by block; inside a
 *                     block, pair p of column j at [p * NR + j] (columns
 *                     past n are zero), three 16-lane vectors per pair.
 *
 * The micro-kernel computes an MR x NR block of C from one A panel and one B
 * block in registers (24 accumulators), summing the pairs in order: every
 * value of C is summed the same way whatever the split into tasks, so
 * results do not depend on the number of threads. On this project's AMD
 * Zen 4 it runs within 4-11% of oneDNN's bf16 matmul on a 2048^3 product
 * (docs/performance.md). */
#ifndef KV_BF16_GEMM_H
#define KV_BF16_GEMM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The kernels are compiled for AVX512-BF16 with target attributes, so the
 * library builds and loads on any x86-64 (and any other architecture,
 * without them); they only run after kv_bf16_available said yes. Files with
 * AVX-512 code of their own for this mode (the bf16 Winograd transforms)
 * use the same test and attribute. */
#if defined(__x86_64__) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 10))
#define KV_BF16_KERNELS 1
#define KV_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#endif

#define KV_BF16_MR 8  /* rows of C per kernel call */
#define KV_BF16_NR 48 /* columns of C per kernel call: three 16-lane vectors */

/* Pairs of k: ceil(k / 2). */
static inline int kv_bf16_pairs(int k)
{
    return (k + 1) / 2;
}

/* uint32 words of a packed A (m x k) and of a packed B (k x n). */
static inline size_t kv_bf16_a_words(int m, int k)
{
    return (size_t)((m + KV_BF16_MR - 1) / KV_BF16_MR) * KV_BF16_MR * (size_t)kv_bf16_pairs(k);
}

static inline size_t kv_bf16_b_words(int k, int n)
{
    return (size_t)((n + KV_BF16_NR - 1) / KV_BF16_NR) * KV_BF16_NR * (size_t)kv_bf16_pairs(k);
}

/* True when this CPU (and this build) can run the kernels: AVX512-BF16 with
 * AVX512F, BW and VL, the OS saving the AVX-512 state. Otherwise false, and
 * why is in why (size bytes; why may be NULL). AMX-BF16 CPUs have
 * AVX512-BF16 too; their tile units are not used. The environment variable
 * KLVAE_CPU_NO_BF16 (set, not empty, not "0") makes it answer false, as on a
 * CPU without the instructions (for tests, and to compare on one machine). */
bool kv_bf16_available(char *why, size_t size);

/* Tests only: makes kv_bf16_available answer false, as on a CPU without the
 * instructions (why: "hidden for a test"). */
void kv_bf16_hide_for_tests(bool hide);

/* The float32 value of x rounded to bf16 (to nearest even): what the
 * products see of an operand. For tests. */
float kv_bf16_round(float x);

/* Packs the m x k matrix whose element (i, l) is a[i * row_stride + l *
 * col_stride] as A. One of the strides must be 1. */
void kv_bf16_pack_a(const float *a, size_t row_stride, size_t col_stride, int m, int k,
                    uint32_t *out);

/* Packs the k x n matrix whose element (l, j) is b[l * row_stride + j *
 * col_stride] as B. One of the strides must be 1. */
void kv_bf16_pack_b(const float *b, size_t row_stride, size_t col_stride, int k, int n,
                    uint32_t *out);

/* Packs pair p of a B of k = 2 pairs rows and n columns from its two rows
 * lo (row 2p) and hi (row 2p + 1; NULL: zeros), n values each: what
 * kv_bf16_pack_b does for every pair, for code that makes B two rows at a
 * time (the bf16 im2col) instead of holding all of it in float32. */
void kv_bf16_pack_b_pair(const float *lo, const float *hi, int n, int pairs, int p,
                         uint32_t *out);

/* C (m x n, row stride ldc) = A B, or C += A B when accumulate, from packed
 * A and B of pairs pairs of k, on the calling thread. Only the m x n values
 * are written. */
void kv_bf16_gemm(int m, int n, int pairs, const uint32_t *a, const uint32_t *b, float *c,
                  size_t ldc, bool accumulate);

/* One kernel call: the rows x cols (at most MR x NR) block of C at c from
 * the A panel at a and the B block at b (pairs pairs each). */
void kv_bf16_kernel(int pairs, const uint32_t *a, const uint32_t *b, float *c, size_t ldc,
                    int rows, int cols, bool accumulate);

#endif
