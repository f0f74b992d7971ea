/* test_posterior.c — the posterior family (src/backend/backend.h, "Family
 * posterior"): splitting the moments with the logvar clamp, sampling z with
 * the shared Philox generator, the KL sum against float64 loops, and the
 * backward against finite differences (op_test_util.h). */
#include "base/philox.h"
#include "op_test_util.h"

/* ---- forward ---- */

START_TEST(posterior_split_takes_halves_and_clamps_logvar)
{
    const int n = 2, z = 3, h = 2, w = 5, block = z * h * w;
    float moments[2 * 2 * 30], mean[60], logvar[60];
    test_rng rng = test_rng_new(600);
    test_fill(moments, 120, &rng, -50, 50); /* beyond both clamp limits */
    kv_backend *be = op_backend(1);
    kv_tensor tm = op_tensor4(moments, n, 2 * z, h, w), tmu = op_tensor4(mean, n, z, h, w),
              tlv = op_tensor4(logvar, n, z, h, w);
    ck_assert_ok(be->ops->posterior_split(be, &tm, &tmu, &tlv));
    int clamped = 0;
    for (int b = 0; b < n; b++)
        for (int i = 0; i < block; i++) {
            ck_assert_float_eq(mean[b * block + i], moments[b * 2 * block + i]);
            float raw = moments[b * 2 * block + block + i];
            float want = raw < -30 ? -30 : raw > 20 ? 20 : raw;
            clamped += raw != want;
            ck_assert_float_eq(logvar[b * block + i], want);
        }
    ck_assert_int_gt(clamped, 0);
    kv_backend_destroy(be);
}
END_TEST

START_TEST(gaussian_sample_matches_float64_reference)
{
    /* z = mean + exp(0.5 clamp(logvar)) * eps, eps the Philox normal of the
     * element's index in the whole tensor; an odd count over more than one
     * of the CPU's tasks (a task draws eps in pairs), logvars beyond both
     * ends of the clamp. */
    const int n = 3, z = 5, h = 23, w = 29;
    const size_t count = (size_t)n * z * h * w;
    const uint64_t seed = 1234567;
    test_rng rng = test_rng_new(1900);
    float *mean = test_alloc(count), *logvar = test_alloc(count), *z1 = test_alloc(count),
          *z2 = test_alloc(count);
    test_fill(mean, count, &rng, -1, 1);
    test_fill(logvar, count, &rng, -6, 4);
    for (size_t i = 0; i < count; i += 101)
        logvar[i] = i % 2 ? 26.0f : -45.0f;
    kv_backend *one = op_backend(1), *two = op_backend(2);
    kv_tensor tm = op_tensor4(mean, n, z, h, w), tl = op_tensor4(logvar, n, z, h, w);
    kv_tensor tz1 = op_tensor4(z1, n, z, h, w), tz2 = op_tensor4(z2, n, z, h, w);
    ck_assert_ok(two->ops->gaussian_sample(two, &tm, &tl, seed, 0, &tz2));
    ck_assert_ok(one->ops->gaussian_sample(one, &tm, &tl, seed, 0, &tz1));
    /* float32 rounds std, the product and the sum: relative to the size of
     * the terms, element by element (std spans e^-15 .. e^10) */
    for (size_t i = 0; i < count; i++) {
        double lv = logvar[i] < -30 ? -30 : (logvar[i] > 20 ? 20 : logvar[i]);
        double std = exp(0.5 * lv), eps = kv_philox_normal(seed, i);
        double want = mean[i] + std * eps, size = fabs(mean[i]) + std * fabs(eps);
        ck_assert_msg(fabs(z2[i] - want) <= 1e-6 * size, "element %zu: %.9g, want %.9g", i,
                      (double)z2[i], want);
    }
    ck_assert_msg(memcmp(z1, z2, count * sizeof(float)) == 0, "1 and 2 threads differ");
    kv_backend_destroy(one);
    kv_backend_destroy(two);
    free(mean), free(logvar), free(z1), free(z2);
}
END_TEST

/* first places a tensor in a larger one: the images [k, n) sampled on their
 * own with first = k * (elements per image) are the whole batch's z of
 * those images, bit for bit, for an odd first (mid-pair) and an even one. */
START_TEST(gaussian_sample_first_continues_the_whole_tensor)
{
    const int n = 4, z = 3, h = 5, w = 7; /* 105 elements per image: odd */
    const size_t image = (size_t)z * h * w, count = (size_t)n * image;
    const uint64_t seed = 99;
    test_rng rng = test_rng_new(1901);
    float *mean = test_alloc(count), *logvar = test_alloc(count), *whole = test_alloc(count),
          *part = test_alloc(count);
    test_fill(mean, count, &rng, -1, 1);
    test_fill(logvar, count, &rng, -4, 2);
    kv_backend *be = op_backend(2);
    kv_tensor tm = op_tensor4(mean, n, z, h, w), tl = op_tensor4(logvar, n, z, h, w),
              tw = op_tensor4(whole, n, z, h, w);
    ck_assert_ok(be->ops->gaussian_sample(be, &tm, &tl, seed, 0, &tw));
    for (int k = 1; k <= 2; k++) {
        const size_t at = (size_t)k * image;
        kv_tensor pm = op_tensor4(mean + at, n - k, z, h, w),
                  pl = op_tensor4(logvar + at, n - k, z, h, w),
                  pz = op_tensor4(part, n - k, z, h, w);
        ck_assert_ok(be->ops->gaussian_sample(be, &pm, &pl, seed, at, &pz));
        ck_assert_msg(memcmp(part, whole + at, (count - at) * sizeof(float)) == 0,
                      "images %d.. sampled with first %zu differ from the whole tensor's", k, at);
        /* and without first they draw other numbers */
        ck_assert_ok(be->ops->gaussian_sample(be, &pm, &pl, seed, 0, &pz));
        ck_assert_msg(memcmp(part, whole + at, image * sizeof(float)) != 0, "first is ignored");
    }
    kv_backend_destroy(be);
    free(mean), free(logvar), free(whole), free(part);
}
END_TEST

/* sum of 0.5 (mu^2 + exp(s) - 1 - s), s = clamp(logvar), in double */
static double kl_sum_reference(const float *moments, int n, int z, size_t plane)
{
    double want = 0.0;
    for (int b = 0; b < n; b++)
        for (int c = 0; c < z; c++)
            for (size_t i = 0; i < plane; i++) {
                double mu = moments[((size_t)b * 2 * z + c) * plane + i];
                double l = moments[((size_t)b * 2 * z + z + c) * plane + i];
                double s = l < -30 ? -30 : (l > 20 ? 20 : l);
                want += 0.5 * (mu * mu + exp(s) - 1 - s);
            }
    return want;
}

START_TEST(kl_sum_matches_float64_reference)
{
    const int n = 3, z = 5, h = 7, w = 9;
    const size_t plane = (size_t)h * w, count = (size_t)n * 2 * z * plane;
    test_rng rng = test_rng_new(1901);
    float *moments = test_alloc(count);
    test_fill(moments, count, &rng, -3, 3);
    /* logvars below the clamp (batch 1, channels z and z+1) */
    moments[(size_t)(2 * z + z) * plane + 4] = -45.0f;
    moments[(size_t)(2 * z + z + 1) * plane + 8] = -31.0f;
    kv_backend *be = op_backend(2);
    kv_tensor tm = op_tensor4(moments, n, 2 * z, h, w);
    double kl = 0.0, want = kl_sum_reference(moments, n, z, plane);
    ck_assert_ok(be->ops->kl_sum(be, &tm, &kl));
    ck_assert_msg(fabs(kl - want) <= 1e-9 * fabs(want), "kl %.17g, want %.17g", kl, want);
    /* and one above it (batch 2): exp(20), not exp(23) */
    moments[(size_t)(2 * 2 * z + z + 2) * plane + 5] = 23.0f;
    want = kl_sum_reference(moments, n, z, plane);
    ck_assert_ok(be->ops->kl_sum(be, &tm, &kl));
    ck_assert_msg(fabs(kl - want) <= 1e-9 * fabs(want), "kl %.17g, want %.17g", kl, want);
    kv_backend_destroy(be);
    free(moments);
}
END_TEST

/* ---- backward ---- */

typedef struct post_ctx {
    int n, z, hw;
    double *moments, *r;
    double kl_weight;
    uint64_t seed, first; /* an odd first: eps of a share of a larger batch */
} post_ctx;

static double post_loss(void *p)
{
    post_ctx *q = p;
    double total = 0.0;
    for (int n = 0; n < q->n; n++)
        for (int c = 0; c < q->z; c++)
            for (int i = 0; i < q->hw; i++) {
                double mu = q->moments[((size_t)n * 2 * q->z + c) * q->hw + i];
                double l = q->moments[((size_t)n * 2 * q->z + q->z + c) * q->hw + i];
                double s = l < -30 ? -30 : (l > 20 ? 20 : l);
                size_t zi = ((size_t)n * q->z + c) * q->hw + i;
                double eps = kv_philox_normal(q->seed, q->first + zi);
                double zv = mu + exp(0.5 * s) * eps;
                total += zv * q->r[zi] + q->kl_weight * 0.5 * (mu * mu + exp(s) - 1 - s);
            }
    return total;
}

START_TEST(posterior_backward_matches_finite_differences)
{
    post_ctx q = {2, 3, 4 * 5, NULL, NULL, 0.3, 77, 12345};
    size_t nm = (size_t)q.n * 2 * q.z * q.hw, nz = (size_t)q.n * q.z * q.hw;
    test_rng rng = test_rng_new(1400);
    float *m = test_alloc(nm), *r = test_alloc(nz), *dm = test_alloc(nm);
    q.moments = op_dalloc(nm), q.r = op_dalloc(nz);
    op_fill_both(q.moments, m, nm, &rng, -3, 3);
    op_fill_both(q.r, r, nz, &rng, -1, 1);
    /* some logvars beyond the clamp: no gradient there */
    m[nz / q.n + 1] = -40.0f, q.moments[nz / q.n + 1] = -40.0;
    kv_backend *be = op_backend(2);
    kv_tensor tm = op_tensor4(m, q.n, 2 * q.z, 4, 5), tr = op_tensor4(r, q.n, q.z, 4, 5),
              tdm = op_tensor4(dm, q.n, 2 * q.z, 4, 5);
    ck_assert_ok(be->ops->posterior_backward(be, &tm, &tr, (float)q.kl_weight, true, q.seed,
                                             q.first, &tdm));
    op_check_gradient("posterior dmoments", q.moments, nm, dm, post_loss, &q);
    ck_assert_float_eq(dm[nz / q.n + 1], 0.0f);
    double kl, want = 0;
    ck_assert_ok(be->ops->kl_sum(be, &tm, &kl));
    for (int n = 0; n < q.n; n++)
        for (int c = 0; c < q.z; c++)
            for (int i = 0; i < q.hw; i++) {
                double mu = q.moments[((size_t)n * 2 * q.z + c) * q.hw + i];
                double l = q.moments[((size_t)n * 2 * q.z + q.z + c) * q.hw + i];
                double s = l < -30 ? -30 : (l > 20 ? 20 : l);
                want += 0.5 * (mu * mu + exp(s) - 1 - s);
            }
    ck_assert_double_le(fabs(kl - want), 1e-9 * fabs(want));
    kv_backend_destroy(be);
    free(m), free(r), free(dm), free(q.moments), free(q.r);
}
END_TEST

Suite *suite_posterior_ops(void)
{
    Suite *s = suite_create("posterior");
    TCase *forward = op_tcase(s, "forward"), *backward = op_tcase(s, "backward");
    tcase_add_test(forward, posterior_split_takes_halves_and_clamps_logvar);
    tcase_add_test(forward, gaussian_sample_matches_float64_reference);
    tcase_add_test(forward, gaussian_sample_first_continues_the_whole_tensor);
    tcase_add_test(forward, kl_sum_matches_float64_reference);
    tcase_add_test(backward, posterior_backward_matches_finite_differences);
    return s;
}
