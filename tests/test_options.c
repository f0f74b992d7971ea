/* test_options.c — the options object: set, get, defaults, the key table. */
#include "test_util.h"

START_TEST(set_then_get_returns_the_value)
{
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    static const char *const pairs[][2] = {
        {"threads", "3"},         {"block_out_channels", "32,64,64"}, {"use_quant_conv", "false"},
        {"scaling_factor", "1e-1"}, {"shift_factor", "none"},           {"seed", "18446744073709551615"},
        {"backend", "cpu"},       {"act_fn", "mish"},                 {"config", "small"},
    };
    char buf[64];
    for (size_t i = 0; i < sizeof pairs / sizeof pairs[0]; i++) {
        ck_assert_ok(klvae_options_set(o, pairs[i][0], pairs[i][1]));
        ck_assert_ok(klvae_options_get(o, pairs[i][0], buf, sizeof buf));
        ck_assert_str_eq(buf, pairs[i][1]);
    }
    /* Setting again replaces. */
    ck_assert_ok(klvae_options_set(o, "threads", "5"));
    ck_assert_ok(klvae_options_get(o, "threads", buf, sizeof buf));
    ck_assert_str_eq(buf, "5");
    klvae_options_free(o);
}
END_TEST

START_TEST(dashes_are_underscores)
{
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    ck_assert_ok(klvae_options_set(o, "latent-channels", "16"));
    char buf[16];
    ck_assert_ok(klvae_options_get(o, "latent_channels", buf, sizeof buf));
    ck_assert_str_eq(buf, "16");
    klvae_options_free(o);
}
END_TEST

START_TEST(unset_keys_give_defaults_and_null_means_defaults)
{
    char buf[64];
    ck_assert_ok(klvae_options_get(NULL, "block_out_channels", buf, sizeof buf));
    ck_assert_str_eq(buf, "128,256,512,512");
    ck_assert_ok(klvae_options_get(NULL, "backend", buf, sizeof buf));
    ck_assert_str_eq(buf, "auto");
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    ck_assert_ok(klvae_options_get(o, "norm_num_groups", buf, sizeof buf));
    ck_assert_str_eq(buf, "32");
    klvae_options_free(o);
}
END_TEST

START_TEST(get_refuses_a_small_buffer)
{
    char buf[4] = "abc";
    ck_assert_status(klvae_options_get(NULL, "block_out_channels", buf, sizeof buf),
                     KLVAE_ERR_BUFFER_TOO_SMALL);
    ck_assert_error_mentions("too small");
    ck_assert_str_eq(buf, "abc"); /* unchanged */
    ck_assert_uint_eq(klvae_last_needed_size(), strlen("128,256,512,512") + 1);
    /* the size query: no buffer at all */
    ck_assert_status(klvae_options_get(NULL, "block_out_channels", NULL, 0),
                     KLVAE_ERR_BUFFER_TOO_SMALL);
    ck_assert_uint_eq(klvae_last_needed_size(), strlen("128,256,512,512") + 1);
    char fits[17];
    ck_assert_ok(klvae_options_get(NULL, "block_out_channels", fits, sizeof fits));
    ck_assert_str_eq(fits, "128,256,512,512");
    ck_assert_uint_eq(klvae_last_needed_size(), 0);
    /* a NULL buffer that claims a size is still a bad argument */
    ck_assert_status(klvae_options_get(NULL, "block_out_channels", NULL, 8),
                     KLVAE_ERR_INVALID_ARGUMENT);
}
END_TEST

START_TEST(describe_lists_every_key_once)
{
    int count = 0;
    const char *key, *def, *help;
    const char *names[128];
    while (klvae_option_describe(count, &key, &def, &help) == KLVAE_OK) {
        ck_assert_ptr_nonnull(key);
        ck_assert_ptr_nonnull(def);
        ck_assert_msg(help && strlen(help) > 10, "option %s has no help", key);
        for (int j = 0; j < count; j++)
            ck_assert_str_ne(names[j], key);
        names[count++] = key;
        /* Every described key is accepted with its own default. */
        klvae_options_t *o = NULL;
        ck_assert_ok(klvae_options_create(&o));
        if (*def)
            ck_assert_ok(klvae_options_set(o, key, def));
        klvae_options_free(o);
        ck_assert_int_lt(count, 128);
    }
    ck_assert_status(klvae_option_describe(count, NULL, NULL, NULL), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_status(klvae_option_describe(-1, NULL, NULL, NULL), KLVAE_ERR_INVALID_ARGUMENT);
    /* The keys the architecture fixes for the model and the runtime. */
    const char *required[] = {"backend", "device", "threads", "precision", "seed", "config",
                              "in_channels", "out_channels", "latent_channels",
                              "block_out_channels", "layers_per_block", "norm_num_groups",
                              "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention",
                              "scaling_factor", "shift_factor"};
    for (size_t r = 0; r < sizeof required / sizeof required[0]; r++) {
        bool found = false;
        for (int j = 0; j < count; j++)
            found |= strcmp(names[j], required[r]) == 0;
        ck_assert_msg(found, "option %s is not described", required[r]);
    }
}
END_TEST

START_TEST(model_keys_shape_a_created_model)
{
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    ck_assert_ok(klvae_options_set(o, "config", "tiny"));
    ck_assert_ok(klvae_options_set(o, "block_out_channels", "8,16,16"));
    ck_assert_ok(klvae_options_set(o, "latent_channels", "16"));
    ck_assert_ok(klvae_options_set(o, "norm_num_groups", "4"));
    ck_assert_ok(klvae_options_set(o, "use_post_quant_conv", "false"));
    ck_assert_ok(klvae_options_set(o, "shift_factor", "0.25"));
    klvae_model_t *m = NULL;
    ck_assert_ok(klvae_model_create(o, &m));
    ck_assert_int_eq(klvae_model_latent_channels(m), 16);
    ck_assert_int_eq(klvae_model_downsampling_factor(m), 4);
    ck_assert_float_eq(klvae_model_shift_factor(m), 0.25f);
    char buf[32];
    ck_assert_ok(klvae_model_get(m, "use_post_quant_conv", buf, sizeof buf));
    ck_assert_str_eq(buf, "false");
    klvae_model_free(m);
    /* A model config that is impossible is refused at create. */
    ck_assert_ok(klvae_options_set(o, "norm_num_groups", "5"));
    ck_assert_status(klvae_model_create(o, &m), KLVAE_ERR_CONFIG);
    ck_assert_error_mentions("norm_num_groups");
    ck_assert_ptr_null(m);
    klvae_options_free(o);
}
END_TEST

Suite *suite_options(void)
{
    Suite *s = suite_create("options");
    TCase *tc = tcase_create("options");
    tcase_add_test(tc, set_then_get_returns_the_value);
    tcase_add_test(tc, dashes_are_underscores);
    tcase_add_test(tc, unset_keys_give_defaults_and_null_means_defaults);
    tcase_add_test(tc, get_refuses_a_small_buffer);
    tcase_add_test(tc, describe_lists_every_key_once);
    tcase_add_test(tc, model_keys_shape_a_created_model);
    suite_add_tcase(s, tc);
    return s;
}
