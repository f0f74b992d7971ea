/* op_test_util.h — what the op tests of tests/ops/ share: one file per op
 * family (tests/ops/test_FAMILY.c), each testing that family's ops of
 * src/backend/backend.h on the CPU backend.
 *
 * Two kinds of test use these helpers:
 *   - forward tests compare a float32 op with a naive float64 loop written
 *     from the op's specification, on small random tensors with odd sizes
 *     and batch > 1: within OP_TOLERANCE relative to the size of the values
 *     (float32 rounding over sums of at most a few thousand terms stays near
 *     1e-6);
 *   - gradient tests build a scalar L = sum(R * op(inputs)) with a random
 *     upstream R, differentiate a float64 forward numerically (central
 *     differences, h = FD_STEP, so truncation and rounding errors are far
 *     below the float32 errors under test), and compare with the op's
 *     float32 backward: max |analytic - numeric| must be below
 *     GRAD_TOLERANCE times the largest |numeric| of that gradient. Where a
 *     gradient has thousands of elements, a fixed random sample of FD_SAMPLES
 *     of them is differentiated. */
#ifndef KV_OP_TEST_UTIL_H
#define KV_OP_TEST_UTIL_H

#include "backend/backend.h"
#include "test_util.h"

#define OP_TOLERANCE 1e-5
#define GRAD_TOLERANCE 1e-4
#define FD_STEP 1e-5
#define FD_SAMPLES 60

/* A CPU backend with that many worker threads (the op tests compare 1 and
 * 2 threads where the split of the work could change results). */
kv_backend *op_backend(int threads);

/* The same computing in precision=bf16: bf16 products where the CPU has
 * AVX512-BF16 (op_bf16() says whether it does), else the fp32 backend. */
kv_backend *op_backend_bf16(int threads);
bool op_bf16(void);

/* The bound on a single op with bf16 operands and float32 accumulation
 * against float64 on the unrounded inputs (design/architecture.md: bf16
 * single ops within 1e-2 relative L2), and the least error that shows the
 * operands really were rounded (float32 products stay near 1e-7). */
#define OP_BF16_TOLERANCE 1e-2
#define OP_BF16_ROUNDED 1e-4

/* Non-owning tensors over test arrays: (n, c, h, w), and 1-D of n values. */
kv_tensor op_tensor4(float *data, int n, int c, int h, int w);
kv_tensor op_tensor1(float *data, int n);

/* A test case of suite s with a 60 s timeout and the tag "ops"
 * (CK_INCLUDE_TAGS=ops runs every op test of every family). The op tests'
 * cases are "forward" (forward ops), "backward" (the backward ops) and
 * "training" (the losses, which give their gradient with their value, and
 * the optimizer), and CK_RUN_CASE=backward runs the backward ops' tests of every family. */
TCase *op_tcase(Suite *s, const char *name);

/* ||got - want|| / ||want|| (L2); INFINITY when got holds a NaN or an
 * infinity. */
double op_relative_l2(const float *got, const double *want, size_t n);

/* max |got - want| / max(1, max |want|); INFINITY when got holds a NaN. */
double op_relative_error(const float *got, const double *want, size_t n);

/* act(v) in double, as PyTorch defines each activation (Mish's softplus
 * with PyTorch's threshold of 20). */
double op_activation_reference(kv_activation act, double v);

/* ---- finite differences ---- */

/* A float64 loss over inputs the test can perturb (through ctx). */
typedef double (*op_loss_fn)(void *ctx);

/* Fails the test unless the float32 gradient analytic of x (n values, which
 * f reads through ctx) matches central differences of f; what names the
 * gradient in the failure message. */
void op_check_gradient(const char *what, double *x, size_t n, const float *analytic, op_loss_fn f,
                       void *ctx);

/* Uniform values in [lo, hi) drawn as float32 into f, and the same values
 * in double into d: the op and its float64 reference see the same inputs. */
void op_fill_both(double *d, float *f, size_t n, test_rng *rng, double lo, double hi);

/* n zeroed doubles (never NULL). */
double *op_dalloc(size_t n);

/* The data of the one-input ops' gradient tests (upsample, max pool, the
 * activations, unit normalisation): x of shape (n, c, h, w) = (2, 3, 5, 7)
 * and an upstream r of the op's output shape, in float32 for the op and
 * double for the reference, drawn in [-1, 1) from seed, with x kept away
 * from the kinks at 0; zeroed float32 buffers y (output shape), dx (input
 * shape) and norms (2, 1, 5, 7) for the op to write. */
typedef enum op_unary_output {
    OP_OUTPUT_SAME,    /* (n, c, h, w) */
    OP_OUTPUT_DOUBLED, /* (n, c, 2h, 2w) */
    OP_OUTPUT_HALVED   /* (n, c, h/2, w/2) */
} op_unary_output;

typedef struct op_unary_case {
    int n, c, h, w;
    size_t nx, ny;
    float *x, *r, *y, *dx, *norms;
    double *xd, *rd;
} op_unary_case;

op_unary_case op_unary_case_new(uint64_t seed, op_unary_output output);
void op_unary_case_free(op_unary_case *s);

#endif
