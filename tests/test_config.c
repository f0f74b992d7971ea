/* test_config.c — config.json: class defaults for missing keys, named
 * configs, validation, JSON written back. */
#include "model/config.h"
#include "test_util.h"

static char *write_config(const char *json)
{
    char *dir = test_tmpdir();
    char path[4200];
    snprintf(path, sizeof path, "%s/config.json", dir);
    test_write_file(path, json, strlen(json));
    return dir;
}

START_TEST(missing_keys_take_diffusers_class_defaults)
{
    char *dir = write_config("{\"_class_name\": \"AutoencoderKL\"}");
    char path[4200];
    snprintf(path, sizeof path, "%s/config.json", dir);
    kv_config cfg;
    ck_assert_ok(kv_config_read_json(path, &cfg));
    ck_assert_int_eq(cfg.num_blocks, 1);
    ck_assert_int_eq(cfg.block_out_channels[0], 64);
    ck_assert_int_eq(cfg.layers_per_block, 1);
    ck_assert_int_eq(cfg.latent_channels, 4);
    ck_assert_int_eq(cfg.norm_num_groups, 32);
    ck_assert_str_eq(cfg.act_fn, "silu");
    ck_assert(cfg.use_quant_conv && cfg.use_post_quant_conv && cfg.mid_block_add_attention);
    ck_assert_double_eq(cfg.scaling_factor, 0.18215);
    ck_assert(!cfg.has_shift_factor);
    kv_config_free(&cfg);
    test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(sd_vae_ft_mse_config_reads_as_sd)
{
    /* The key set of the early sd-vae-ft-mse re-saves (spec/vae.md 1.1). */
    char *dir = write_config(
        "{\"_class_name\": \"AutoencoderKL\", \"_diffusers_version\": \"0.8.0\","
        " \"_name_or_path\": \"stabilityai/sd-vae-ft-mse\", \"act_fn\": \"silu\","
        " \"block_out_channels\": [128, 256, 512, 512],"
        " \"down_block_types\": [\"DownEncoderBlock2D\", \"DownEncoderBlock2D\","
        " \"DownEncoderBlock2D\", \"DownEncoderBlock2D\"], \"in_channels\": 3,"
        " \"latent_channels\": 4, \"layers_per_block\": 2, \"norm_num_groups\": 32,"
        " \"out_channels\": 3, \"sample_size\": 256, \"up_block_types\": [\"UpDecoderBlock2D\","
        " \"UpDecoderBlock2D\", \"UpDecoderBlock2D\", \"UpDecoderBlock2D\"]}");
    char path[4200];
    snprintf(path, sizeof path, "%s/config.json", dir);
    kv_config cfg, sd;
    ck_assert_ok(kv_config_read_json(path, &cfg));
    ck_assert_ok(kv_config_named("sd", &sd));
    const char *keys[] = {"in_channels", "out_channels", "latent_channels", "block_out_channels",
                          "layers_per_block", "norm_num_groups", "act_fn", "use_quant_conv",
                          "use_post_quant_conv", "mid_block_add_attention", "scaling_factor",
                          "shift_factor"};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        char a[64], b[64];
        ck_assert_ok(kv_config_get(&cfg, keys[i], a, sizeof a));
        ck_assert_ok(kv_config_get(&sd, keys[i], b, sizeof b));
        ck_assert_msg(strcmp(a, b) == 0, "%s: %s vs %s", keys[i], a, b);
    }
    ck_assert_int_eq(cfg.sample_size, 256);
    kv_config_free(&cfg);
    kv_config_free(&sd);
    test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(write_then_read_round_trips)
{
    kv_config cfg, back;
    ck_assert_ok(kv_config_named("small", &cfg));
    cfg.latent_channels = 16;
    cfg.has_shift_factor = true;
    cfg.shift_factor = 0.1159;
    cfg.scaling_factor = 0.3611;
    cfg.use_quant_conv = false;
    snprintf(cfg.act_fn, sizeof cfg.act_fn, "swish");
    char *dir = test_tmpdir();
    char path[4200];
    snprintf(path, sizeof path, "%s/config.json", dir);
    ck_assert_ok(kv_config_write_json(&cfg, path));
    ck_assert_ok(kv_config_read_json(path, &back));
    ck_assert_int_eq(back.latent_channels, 16);
    ck_assert(back.has_shift_factor);
    ck_assert_double_eq(back.shift_factor, 0.1159);
    ck_assert_double_eq(back.scaling_factor, 0.3611);
    ck_assert(!back.use_quant_conv && back.use_post_quant_conv);
    ck_assert_str_eq(back.act_fn, "swish");
    ck_assert_int_eq(back.num_blocks, 4);
    ck_assert_int_eq(back.block_out_channels[3], 128);
    kv_config_free(&back);
    test_rmtree(dir);
    free(dir);
}
END_TEST

START_TEST(named_configs_are_valid)
{
    const char *names[] = {"sd", "small", "tiny"};
    for (size_t i = 0; i < 3; i++) {
        kv_config cfg;
        ck_assert_ok(kv_config_named(names[i], &cfg));
        ck_assert_ok(kv_config_validate(&cfg));
    }
    kv_config cfg;
    ck_assert_status(kv_config_named("huge", &cfg), KLVAE_ERR_OPTION);
    ck_assert_error_mentions("huge");
}
END_TEST

Suite *suite_config(void)
{
    Suite *s = suite_create("config");
    TCase *tc = tcase_create("config");
    tcase_add_test(tc, missing_keys_take_diffusers_class_defaults);
    tcase_add_test(tc, sd_vae_ft_mse_config_reads_as_sd);
    tcase_add_test(tc, write_then_read_round_trips);
    tcase_add_test(tc, named_configs_are_valid);
    suite_add_tcase(s, tc);
    return s;
}
