/* bf16_gemm.c — see bf16_gemm.h. */
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/bf16_gemm.h"
#include "base/common.h"
#include "base/numerics.h"

#ifdef KV_BF16_KERNELS
#include <immintrin.h>
#endif

/* Pairs of k per pass of the kernel over a block: the B block of one pass
 * (KC * NR * 4 bytes = 48 KB) stays in the L1/L2 caches while every A panel
 * is multiplied with it. Longer sums are split into passes that add to C. */
#define KV_BF16_KC 256

static atomic_bool hidden_for_tests;

void kv_bf16_hide_for_tests(bool hide)
{
    atomic_store(&hidden_for_tests, hide);
}

static bool say(char *why, size_t size, const char *text)
{
    if (why && size)
        snprintf(why, size, "%s", text);
    return false;
}

bool kv_bf16_available(char *why, size_t size)
{
    if (why && size)
        why[0] = '\0';
    if (atomic_load(&hidden_for_tests))
        return say(why, size, "the CPU's bf16 instructions are hidden for a test");
    const char *off = getenv("KLVAE_CPU_NO_BF16");
    if (off && *off && strcmp(off, "0") != 0)
        return say(why, size, "KLVAE_CPU_NO_BF16 is set, so the CPU's bf16 instructions are "
                              "not used");
#ifndef KV_BF16_KERNELS
    return say(why, size, "this build of libklvae has no bf16 kernels (they need x86-64 and "
                          "GCC 10 or clang)");
#else
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
        !__builtin_cpu_supports("avx512vl") || !__builtin_cpu_supports("avx512dq") ||
        !__builtin_cpu_supports("avx512bf16"))
        return say(why, size, "this CPU has no AVX512-BF16 instructions (AMD Zen 4, Intel "
                              "Cooper Lake, Sapphire Rapids and later have them)");
    return true;
#endif
}

float kv_bf16_round(float x)
{
    return kv_bf16_to_float(kv_bf16_from_float(x));
}

#ifdef KV_BF16_KERNELS

/* Word j of the result is lo[j] for even j/2... : the permutation that
 * interleaves the 16 bf16 of lo (words 0-15 of the conversion) with the 16
 * of hi (words 16-31), so each uint32 is (hi[j] << 16) | lo[j]. */
KV_BF16_TARGET static inline __m512i interleave_index(void)
{
    return _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                            22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
}

KV_BF16_TARGET static inline __mmask16 lanes(int count)
{
    return count >= 16 ? (__mmask16)0xFFFF : count <= 0 ? 0 : (__mmask16)((1u << count) - 1u);
}

/* Packs two float32 rows lo (even k) and hi (odd k; NULL: zeros) of count
 * values into count pairs at out: the inner step of every B packing. */
KV_BF16_TARGET static void pack_pairs(const float *lo, const float *hi, int count, uint32_t *out)
{
    const __m512i index = interleave_index();
    for (int i = 0; i < count; i += 16) {
        __mmask16 m = lanes(count - i);
        __m512 l = _mm512_maskz_loadu_ps(m, lo + i);
        __m512 h = hi ? _mm512_maskz_loadu_ps(m, hi + i) : _mm512_setzero_ps();
        __m512i words = (__m512i)_mm512_cvtne2ps_pbh(h, l);
        _mm512_mask_storeu_epi32(out + i, m, _mm512_permutexvar_epi16(index, words));
    }
}

/* count values of x (count even or not) as ceil(count / 2) pairs, in order:
 * converting 32 consecutive floats gives 16 pairs of consecutive k. */
KV_BF16_TARGET static void pairs_of_row(const float *x, int count, uint32_t *out)
{
    for (int i = 0; i < count; i += 32) {
        __m512 a = _mm512_maskz_loadu_ps(lanes(count - i), x + i);
        __m512 b = _mm512_maskz_loadu_ps(lanes(count - i - 16), x + i + 16);
        __m512i words = (__m512i)_mm512_cvtne2ps_pbh(b, a);
        _mm512_mask_storeu_epi32(out + i / 2, lanes((count - i + 1) / 2), words);
    }
}

KV_BF16_TARGET void kv_bf16_kernel(int pairs, const uint32_t *a, const uint32_t *b, float *c,
                                   size_t ldc, int rows, int cols, bool accumulate)
{
    __m512 acc[KV_BF16_MR][3];
#pragma GCC unroll 8
    for (int r = 0; r < KV_BF16_MR; r++)
#pragma GCC unroll 3
        for (int v = 0; v < 3; v++)
            acc[r][v] = _mm512_setzero_ps();
    for (int p = 0; p < pairs; p++, a += KV_BF16_MR, b += KV_BF16_NR) {
        __m512bh b0 = (__m512bh)_mm512_loadu_si512(b);
        __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + 16);
        __m512bh b2 = (__m512bh)_mm512_loadu_si512(b + 32);
#pragma GCC unroll 8
        for (int r = 0; r < KV_BF16_MR; r++) {
            __m512bh ar = (__m512bh)_mm512_set1_epi32((int)a[r]);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], ar, b0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], ar, b1);
            acc[r][2] = _mm512_dpbf16_ps(acc[r][2], ar, b2);
        }
    }
    const __mmask16 m[3] = {lanes(cols), lanes(cols - 16), lanes(cols - 32)};
#pragma GCC unroll 8
    for (int r = 0; r < KV_BF16_MR; r++) {
        if (r >= rows)
            break;
        float *row = c + (size_t)r * ldc;
#pragma GCC unroll 3
        for (int v = 0; v < 3; v++) {
            __m512 x = acc[r][v];
            if (accumulate)
                x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m[v], row + 16 * v));
            _mm512_mask_storeu_ps(row + 16 * v, m[v], x);
        }
    }
}

#else /* no kernels in this build: kv_bf16_available is false, so these never run */

static void pack_pairs(const float *lo, const float *hi, int count, uint32_t *out)
{
    for (int i = 0; i < count; i++)
        out[i] = (uint32_t)kv_bf16_from_float(lo[i]) |
                 (hi ? (uint32_t)kv_bf16_from_float(hi[i]) << 16 : 0u);
}

static void pairs_of_row(const float *x, int count, uint32_t *out)
{
    for (int i = 0; i < count; i += 2)
        out[i / 2] = (uint32_t)kv_bf16_from_float(x[i]) |
                     (i + 1 < count ? (uint32_t)kv_bf16_from_float(x[i + 1]) << 16 : 0u);
}

void kv_bf16_kernel(int pairs, const uint32_t *a, const uint32_t *b, float *c, size_t ldc,
                    int rows, int cols, bool accumulate)
{
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < cols; j++) {
            float sum = 0.0f;
            for (int p = 0; p < pairs; p++) {
                uint32_t x = a[p * KV_BF16_MR + r], y = b[p * KV_BF16_NR + j];
                sum += kv_bf16_to_float((uint16_t)x) * kv_bf16_to_float((uint16_t)y) +
                       kv_bf16_to_float((uint16_t)(x >> 16)) * kv_bf16_to_float((uint16_t)(y >> 16));
            }
            c[(size_t)r * ldc + j] = accumulate ? c[(size_t)r * ldc + j] + sum : sum;
        }
}

#endif

/* Deals the pairs of count values of k-contiguous rows (or columns) out to
 * every stride-th word: rows[r] is the start of line r (lines past count
 * are zero), 16 pairs of each line at a time. */
static void deal_lines(const float *const *lines, int count, int k, uint32_t *out, int stride)
{
    uint32_t chunk[16];
    const int pairs = kv_bf16_pairs(k);
    for (int p0 = 0; p0 < pairs; p0 += 16) {
        const int np = KV_MIN(16, pairs - p0);
        for (int r = 0; r < stride; r++) {
            if (r < count)
                pairs_of_row(lines[r] + 2 * p0, KV_MIN(32, k - 2 * p0), chunk);
            for (int p = 0; p < np; p++)
                out[(size_t)(p0 + p) * stride + r] = r < count ? chunk[p] : 0u;
        }
    }
}

void kv_bf16_pack_a(const float *a, size_t row_stride, size_t col_stride, int m, int k,
                    uint32_t *out)
{
    const int pairs = kv_bf16_pairs(k);
    for (int i0 = 0; i0 < m; i0 += KV_BF16_MR, out += (size_t)KV_BF16_MR * pairs) {
        const int rows = KV_MIN(KV_BF16_MR, m - i0);
        if (col_stride == 1) { /* rows of k values: convert each, deal its pairs out */
            const float *lines[KV_BF16_MR];
            for (int r = 0; r < rows; r++)
                lines[r] = a + (size_t)(i0 + r) * row_stride;
            deal_lines(lines, rows, k, out, KV_BF16_MR);
        } else { /* columns of m values: two k at a time give a panel's row of pairs */
            for (int p = 0; p < pairs; p++) {
                const float *lo = a + (size_t)(2 * p) * col_stride + i0;
                const float *hi = 2 * p + 1 < k ? lo + col_stride : NULL;
                uint32_t *dst = out + (size_t)p * KV_BF16_MR;
                pack_pairs(lo, hi, rows, dst);
                for (int r = rows; r < KV_BF16_MR; r++)
                    dst[r] = 0u;
            }
        }
    }
}

void kv_bf16_pack_b(const float *b, size_t row_stride, size_t col_stride, int k, int n,
                    uint32_t *out)
{
    const int pairs = kv_bf16_pairs(k);
    if (col_stride == 1) { /* rows of n values: two rows give one row of pairs */
        for (int p = 0; p < pairs; p++) {
            const float *lo = b + (size_t)(2 * p) * row_stride;
            kv_bf16_pack_b_pair(lo, 2 * p + 1 < k ? lo + row_stride : NULL, n, pairs, p, out);
        }
        return;
    }
    /* columns of k values: convert each, deal its pairs out */
    for (int j0 = 0; j0 < n; j0 += KV_BF16_NR, out += (size_t)KV_BF16_NR * pairs) {
        const int cols = KV_MIN(KV_BF16_NR, n - j0);
        const float *lines[KV_BF16_NR];
        for (int j = 0; j < cols; j++)
            lines[j] = b + (size_t)(j0 + j) * col_stride;
        deal_lines(lines, cols, k, out, KV_BF16_NR);
    }
}

void kv_bf16_pack_b_pair(const float *lo, const float *hi, int n, int pairs, int p,
                         uint32_t *out)
{
    for (int j0 = 0; j0 < n; j0 += KV_BF16_NR) {
        const int cols = KV_MIN(KV_BF16_NR, n - j0);
        uint32_t *dst = out + (size_t)j0 * pairs + (size_t)p * KV_BF16_NR;
        pack_pairs(lo + j0, hi ? hi + j0 : NULL, cols, dst);
        for (int j = cols; j < KV_BF16_NR; j++)
            dst[j] = 0u;
    }
}

void kv_bf16_gemm(int m, int n, int pairs, const uint32_t *a, const uint32_t *b, float *c,
                  size_t ldc, bool accumulate)
{
    for (int p0 = 0; p0 < pairs; p0 += KV_BF16_KC) {
        const int kc = KV_MIN(KV_BF16_KC, pairs - p0);
        for (int j0 = 0; j0 < n; j0 += KV_BF16_NR) {
            const uint32_t *block = b + (size_t)j0 * pairs + (size_t)p0 * KV_BF16_NR;
            for (int i0 = 0; i0 < m; i0 += KV_BF16_MR)
                kv_bf16_kernel(kc, a + (size_t)i0 * pairs + (size_t)p0 * KV_BF16_MR, block,
                               c + (size_t)i0 * ldc + j0, ldc, KV_MIN(KV_BF16_MR, m - i0),
                               KV_MIN(KV_BF16_NR, n - j0), accumulate || p0 > 0);
        }
    }
    if (pairs == 0 && !accumulate) /* an empty sum */
        for (int i = 0; i < m; i++)
            memset(c + (size_t)i * ldc, 0, (size_t)n * sizeof(float));
}
