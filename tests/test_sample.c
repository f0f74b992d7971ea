/* test_sample.c — klvae_sample and the Philox generator behind it. */
#include "base/philox.h"
#include "test_util.h"

/* Random123's known-answer vectors for Philox-4x32-10 (kat_vectors). */
START_TEST(philox_matches_published_known_answers)
{
    static const struct {
        uint32_t counter[4], key[2], out[4];
    } kat[] = {
        {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}},
        {{0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff},
         {0xffffffff, 0xffffffff},
         {0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}},
        {{0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344},
         {0xa4093822, 0x299f31d0},
         {0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}},
    };
    for (size_t i = 0; i < sizeof kat / sizeof kat[0]; i++) {
        kv_philox_block b = kv_philox4x32_10_full(kat[i].counter, kat[i].key);
        for (int w = 0; w < 4; w++)
            ck_assert_msg(b.w[w] == kat[i].out[w], "vector %zu word %d: %08x, expected %08x", i,
                          w, b.w[w], kat[i].out[w]);
    }
}
END_TEST

START_TEST(deterministic_math_matches_libm)
{
    /* log, sincos and exp written with IEEE operations only: within a few
     * double ulps of glibc's. */
    test_rng rng = test_rng_new(11);
    double worst_log = 0, worst_sin = 0, worst_cos = 0, worst_exp = 0;
    for (int i = 0; i < 200000; i++) {
        double u = test_uniform(&rng);
        double lu = u > 0 ? u : 0.5;
        worst_log = fmax(worst_log, fabs(kv_det_log(lu) - log(lu)) / fmax(fabs(log(lu)), 1e-300));
        double s, c;
        kv_det_sincos_2pi(u, &s, &c);
        worst_sin = fmax(worst_sin, fabs(s - sin(2 * M_PI * u)));
        worst_cos = fmax(worst_cos, fabs(c - cos(2 * M_PI * u)));
        double x = -30.0 + 60.0 * test_uniform(&rng);
        worst_exp = fmax(worst_exp, fabs(kv_det_exp(x) - exp(x)) / exp(x));
    }
    ck_assert_double_lt(worst_log, 1e-15);
    ck_assert_double_lt(worst_sin, 1e-15);
    ck_assert_double_lt(worst_cos, 1e-15);
    ck_assert_double_lt(worst_exp, 1e-15);
    ck_assert_double_eq(kv_det_log(1.0), 0.0);
    double s, c;
    kv_det_sincos_2pi(0.25, &s, &c);
    ck_assert_double_eq(s, 1.0);
}
END_TEST

/* eps for n values: sample with mean 0 and logvar 0, so z = eps. */
static float *draw_eps(klvae_model_t *m, int n, int h, int w, uint64_t seed)
{
    int zc = klvae_model_latent_channels(m);
    size_t count = (size_t)n * zc * h * w;
    float *zero = test_alloc(count), *eps = test_alloc(count);
    ck_assert_ok(klvae_sample(m, zero, zero, n, h, w, seed, eps));
    free(zero);
    return eps;
}

START_TEST(same_seed_same_z_for_any_thread_count)
{
    klvae_model_t *one = test_tiny_model(1), *two = test_tiny_model(2), *three = test_tiny_model(3);
    const int n = 3, h = 17, w = 23;
    size_t count = (size_t)n * 4 * h * w;
    test_rng rng = test_rng_new(12);
    float *mean = test_alloc(count), *logvar = test_alloc(count);
    float *z1 = test_alloc(count), *z2 = test_alloc(count), *z3 = test_alloc(count);
    test_fill(mean, count, &rng, -2, 2);
    test_fill(logvar, count, &rng, -6, 2);
    ck_assert_ok(klvae_sample(one, mean, logvar, n, h, w, 42, z1));
    ck_assert_ok(klvae_sample(two, mean, logvar, n, h, w, 42, z2));
    ck_assert_ok(klvae_sample(three, mean, logvar, n, h, w, 42, z3));
    ck_assert_int_eq(memcmp(z1, z2, count * sizeof(float)), 0);
    ck_assert_int_eq(memcmp(z1, z3, count * sizeof(float)), 0);
    ck_assert_ok(klvae_sample(two, mean, logvar, n, h, w, 43, z2));
    size_t same = 0;
    for (size_t i = 0; i < count; i++)
        same += z1[i] == z2[i];
    ck_assert_uint_lt(same, count / 100); /* another seed, other draws */
    free(mean), free(logvar), free(z1), free(z2), free(z3);
    klvae_model_free(one), klvae_model_free(two), klvae_model_free(three);
}
END_TEST

START_TEST(eps_is_standard_normal)
{
    klvae_model_t *m = test_tiny_model(0);
    const int n = 1, h = 500, w = 500; /* 4 channels: 10^6 draws */
    const size_t count = (size_t)n * 4 * h * w;
    float *eps = draw_eps(m, n, h, w, 2024);
    double sum = 0, sumsq = 0, sum3 = 0, sum4 = 0, lag = 0;
    size_t beyond2 = 0;
    for (size_t i = 0; i < count; i++) {
        double e = eps[i];
        ck_assert(isfinite(e));
        sum += e;
        sumsq += e * e;
        sum3 += e * e * e;
        sum4 += e * e * e * e;
        beyond2 += fabs(e) > 2.0;
        if (i)
            lag += e * eps[i - 1];
    }
    double mean = sum / count, var = sumsq / count - mean * mean;
    /* Bounds are about 5 standard errors of each statistic. */
    ck_assert_msg(fabs(mean) < 0.005, "mean %g", mean);
    ck_assert_msg(fabs(var - 1.0) < 0.007, "variance %g", var);
    ck_assert_msg(fabs(sum3 / count) < 0.013, "third moment %g", sum3 / count);
    ck_assert_msg(fabs(sum4 / count - 3.0) < 0.05, "fourth moment %g", sum4 / count);
    ck_assert_msg(fabs(lag / count) < 0.005, "lag-1 correlation %g", lag / count);
    double tail = (double)beyond2 / count; /* P(|e| > 2) = 0.0455 */
    ck_assert_msg(fabs(tail - 0.0455) < 0.001, "P(|eps| > 2) = %g", tail);
    free(eps);
    klvae_model_free(m);
}
END_TEST

START_TEST(z_is_mean_plus_std_times_eps_exactly)
{
    klvae_model_t *m = test_tiny_model(0);
    const int n = 2, h = 7, w = 9;
    const size_t count = (size_t)n * 4 * h * w;
    test_rng rng = test_rng_new(13);
    float *mean = test_alloc(count), *logvar = test_alloc(count), *z = test_alloc(count);
    test_fill(mean, count, &rng, -3, 3);
    test_fill(logvar, count, &rng, -40, 30); /* beyond both clamp limits */
    float *eps = draw_eps(m, n, h, w, 99);
    ck_assert_ok(klvae_sample(m, mean, logvar, n, h, w, 99, z));
    for (size_t i = 0; i < count; i++) {
        float lv = logvar[i] < -30.0f ? -30.0f : (logvar[i] > 20.0f ? 20.0f : logvar[i]);
        volatile float std = (float)exp(0.5 * (double)lv);
        volatile float scaled = std * eps[i];
        volatile float want = mean[i] + scaled;
        ck_assert_msg(z[i] == want, "element %zu: z %.9g, expected %.9g", i, z[i], want);
    }
    /* z may overwrite mean. */
    float *copy = test_alloc(count);
    memcpy(copy, z, count * sizeof(float));
    ck_assert_ok(klvae_sample(m, mean, logvar, n, h, w, 99, mean));
    ck_assert_int_eq(memcmp(copy, mean, count * sizeof(float)), 0);
    free(mean), free(logvar), free(z), free(eps), free(copy);
    klvae_model_free(m);
}
END_TEST

START_TEST(eps_of_an_element_does_not_depend_on_the_batch)
{
    /* Element i of the batch tensor depends on (seed, i) only. */
    klvae_model_t *m = test_tiny_model(0);
    float *big = draw_eps(m, 3, 5, 6, 5), *small = draw_eps(m, 1, 5, 6, 5);
    ck_assert_int_eq(memcmp(big, small, 4 * 5 * 6 * sizeof(float)), 0);
    for (int i = 0; i < 4 * 5 * 6; i++)
        ck_assert_float_eq(small[i], kv_philox_normal(5, (uint64_t)i));
    free(big), free(small);
    klvae_model_free(m);
}
END_TEST

Suite *suite_sample(void)
{
    Suite *s = suite_create("sample");
    TCase *tc = tcase_create("philox");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, philox_matches_published_known_answers);
    tcase_add_test(tc, deterministic_math_matches_libm);
    tcase_add_test(tc, same_seed_same_z_for_any_thread_count);
    tcase_add_test(tc, eps_is_standard_normal);
    tcase_add_test(tc, z_is_mean_plus_std_times_eps_exactly);
    tcase_add_test(tc, eps_of_an_element_does_not_depend_on_the_batch);
    suite_add_tcase(s, tc);
    return s;
}
