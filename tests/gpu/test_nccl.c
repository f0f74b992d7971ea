/* test_nccl.c — the NCCL path of data-parallel training on a GPU machine
 * (tests/gpu/check_nccl.sh runs it; built by make gpu-binaries as
 * build/gpu/test_nccl). With one GPU the world is one rank:
 *
 *   1. the plugin's communicator (comm_create: NCCL loaded with dlopen, the
 *      unique id sent through the host's broadcast callback);
 *   2. the core's gradient buckets (src/train/dp.c) over the tensors of the
 *      SD model, launched through comm_allreduce while a simulated backward
 *      writes them (last layer first), then comm_wait: a sum over one rank
 *      leaves every value bit for bit, on the recorded first pass and on a
 *      planned one, which is timed;
 *   3. two training steps of the fixture model on the CUDA backend (fp32
 *      with allreduce=nccl, bf16 with auto) through a communicator of one
 *      rank, whose gradients NCCL sums bucket by bucket during the
 *      backward, against the same steps without a communicator: the same
 *      losses and checkpoints byte for byte.
 *
 * Prints PASS/FAIL/SKIP lines and a last line "N passed, N failed".
 * --quick (make check on a machine without a GPU): SKIPPED, exit 0, when
 * no GPU can be used; it shows that the program builds and the plugin
 * loads. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cuda_harness.h"
#include "train/discriminator.h"
#include "train/dp.h"
#include "train/trainer.h"

static int passed, failed;

static void verdict(bool ok, const char *what, const char *detail)
{
    printf("%s  %s%s%s\n", ok ? "PASS" : "FAIL", what, detail[0] ? ": " : "", detail);
    if (ok)
        passed++;
    else
        failed++;
}

/* A world of one rank: the sums and broadcasts leave everything as it is. */
static int one_sum(void *ctx, void *data, size_t count, klvae_comm_type_t type)
{
    (void)ctx, (void)data, (void)count, (void)type;
    return 0;
}

static int one_broadcast(void *ctx, void *data, size_t bytes, int root)
{
    (void)ctx, (void)data, (void)bytes, (void)root;
    return 0;
}

static const klvae_comm_t world_of_one = {sizeof(klvae_comm_t), 0, 1, NULL, one_sum,
                                          one_broadcast};

/* Every parameter of m, downloaded end to end into a new host array. */
static float *download_all(klvae_model_t *m, size_t *total)
{
    size_t n = 0;
    for (size_t i = 0; i < m->num_params; i++)
        n += kv_tensor_numel(m->params[i].tensor);
    float *host = malloc(n * sizeof *host), *at = host;
    for (size_t i = 0; host && i < m->num_params; i++) {
        if (m->be->ops->download(m->be, at, m->params[i].tensor) != KLVAE_OK) {
            free(host);
            return NULL;
        }
        at += kv_tensor_numel(m->params[i].tensor);
    }
    *total = n;
    return host;
}

/* One "backward" over m's tensors as gradients: written last to first. */
static klvae_status_t backward(kv_dp *dp, klvae_model_t *m, const kv_plugin *p)
{
    klvae_status_t st = kv_dp_grads_begin(dp, &dp->model);
    for (size_t i = m->num_params; st == KLVAE_OK && i-- > 0;)
        st = kv_dp_grad_written(dp, &dp->model, m->params[i].tensor->data);
    if (st == KLVAE_OK)
        st = kv_dp_grads_end(dp, &dp->model);
    if (st == KLVAE_OK)
        st = p->synchronize(m->be);
    return st;
}

static void bucketed_sums(const kv_plugin *p)
{
    kv_backend *be = NULL;
    klvae_model_t *m = NULL;
    char detail[256] = "";
    klvae_status_t st = harness_backend(p, 0, KV_PRECISION_FP32, &be);
    if (st == KLVAE_OK)
        st = harness_model(be, "sd", 1, "fp32", &m); /* owns be from here */
    kv_dp *dp = NULL;
    if (st == KLVAE_OK)
        st = kv_dp_create(&world_of_one, be, 25.0, &dp);
    if (st == KLVAE_OK)
        st = kv_dp_start_device(dp, p, "nccl");
    snprintf(detail, sizeof detail, "%s", st == KLVAE_OK ? "" : klvae_last_error());
    verdict(st == KLVAE_OK && strcmp(kv_dp_allreduce_name(dp), "nccl") == 0,
            "NCCL communicator of one rank, bootstrapped through the broadcast", detail);
    size_t total = 0;
    float *before = st == KLVAE_OK ? download_all(m, &total) : NULL;
    if (st == KLVAE_OK)
        st = kv_dp_net_init(dp, &dp->model, "the SD model", kv_model_param_set(m), NULL);
    for (int pass = 0; st == KLVAE_OK && before && pass < 3; pass++) {
        double t0 = harness_now();
        st = backward(dp, m, p);
        double ms = (harness_now() - t0) * 1e3;
        size_t n = 0;
        float *after = st == KLVAE_OK ? download_all(m, &n) : NULL;
        bool same = after && n == total && memcmp(before, after, n * sizeof *after) == 0;
        snprintf(detail, sizeof detail, "%zu tensors, %.1f MiB in %zu buckets, %.2f ms%s",
                 m->num_params, total * 4.0 / 1048576.0, dp->model.buckets.count, ms,
                 st == KLVAE_OK ? "" : klvae_last_error());
        verdict(st == KLVAE_OK && same,
                pass == 0 ? "bucketed sum, first backward (recorded, summed at its end)"
                          : "bucketed sum, planned buckets launched during the backward",
                detail);
        free(after);
    }
    free(before);
    kv_dp_free(dp);
    if (m)
        klvae_model_free(m);
    else if (be)
        kv_backend_destroy(be);
}

/* ---- training steps with and without NCCL ---- */

#define TRAIN_FIXTURE "tests/fixtures/train/"

/* The fixture model on the CUDA backend (precision) and a trainer with every
 * random choice and the data-parallel paths on: posterior samples, LPIPS
 * dropout, the GAN from step 0 (BatchNorm statistics and the adaptive
 * weight through the communicator), EMA, a learned logvar, grad_accum 2
 * (the buckets start with the last micro-batch's backward) and clipping by
 * the global norm. */
static klvae_status_t fixture_trainer(const char *precision, const char *allreduce,
                                      klvae_model_t **m, klvae_trainer_t **t)
{
    static const char *const kv[][2] = {
        {"learning_rate", "1e-4"},   {"adam_eps", "1e-5"},        {"pixel_loss", "l1"},
        {"lpips_weights", TRAIN_FIXTURE "lpips.safetensors"},
        {"lpips_dropout", "0.5"},    {"kl_weight", "0.01"},       {"posterior", "sample"},
        {"disc_start", "0"},         {"disc_layers", "3"},        {"disc_channels", "8"},
        {"disc_weights", TRAIN_FIXTURE "disc.safetensors"},
        {"ema_decay", "0.9"},        {"learn_logvar", "true"},    {"grad_accum", "2"},
        {"grad_clip", "0.5"},        {"seed", "5"},               {"backend", "cuda"},
    };
    klvae_options_t *o = NULL;
    *m = NULL;
    *t = NULL;
    klvae_status_t st = klvae_options_create(&o);
    for (size_t i = 0; st == KLVAE_OK && i < sizeof kv / sizeof kv[0]; i++)
        st = klvae_options_set(o, kv[i][0], kv[i][1]);
    if (st == KLVAE_OK)
        st = klvae_options_set(o, "precision", precision);
    if (st == KLVAE_OK)
        st = klvae_options_set(o, "allreduce", allreduce);
    if (st == KLVAE_OK)
        st = klvae_model_load(TRAIN_FIXTURE "vae", o, m);
    if (st == KLVAE_OK)
        st = klvae_trainer_create(*m, o, t);
    klvae_options_free(o);
    return st;
}

static int same_file(const char *a, const char *b)
{
    FILE *fa = fopen(a, "rb"), *fb = fopen(b, "rb");
    int same = fa && fb;
    while (same) {
        int ca = fgetc(fa), cb = fgetc(fb);
        same = ca == cb;
        if (ca == EOF || cb == EOF)
            break;
    }
    if (fa)
        fclose(fa);
    if (fb)
        fclose(fb);
    return same;
}

static bool same_losses(const klvae_step_stats_t *a, const klvae_step_stats_t *b)
{
    return a->total_loss == b->total_loss && a->rec_loss == b->rec_loss &&
           a->perceptual_loss == b->perceptual_loss && a->nll_loss == b->nll_loss &&
           a->kl_loss == b->kl_loss && a->g_loss == b->g_loss && a->d_weight == b->d_weight &&
           a->d_loss == b->d_loss && a->logits_real == b->logits_real &&
           a->logits_fake == b->logits_fake && a->logvar == b->logvar;
}

/* Two steps of a trainer with a communicator of one rank whose gradients
 * NCCL sums (bucket by bucket during the backward) against the same steps
 * without a communicator: the same losses and checkpoints byte for byte
 * (weights, float32 master weights in bf16, both optimisers, EMA, the
 * discriminator and its BatchNorm statistics). A sum over one rank changes
 * no value, and a world of one is the single process's step bit for bit
 * (tests/test_dp.c checks that on the CPU), so any difference is the NCCL
 * path's: a bucket summed before the backward wrote it, or read by Adam
 * before its sum was done. */
static void training_steps(const char *precision, const char *allreduce, const char *dir)
{
    klvae_model_t *ma = NULL, *mb = NULL;
    klvae_trainer_t *ta = NULL, *tb = NULL;
    char what[160], detail[512] = "", a_ck[600], b_ck[600];
    snprintf(what, sizeof what, "[%s] 2 training steps with allreduce=%s (world of one) = without",
             precision, allreduce);
    snprintf(a_ck, sizeof a_ck, "%s/single-%s.ckpt", dir, precision);
    snprintf(b_ck, sizeof b_ck, "%s/nccl-%s.ckpt", dir, precision);
    klvae_status_t st = fixture_trainer(precision, allreduce, &ma, &ta);
    if (st == KLVAE_OK)
        st = fixture_trainer(precision, allreduce, &mb, &tb);
    if (st == KLVAE_OK)
        st = klvae_trainer_set_comm(tb, &world_of_one);
    char summed[16] = "";
    if (st == KLVAE_OK)
        st = klvae_trainer_get(tb, "allreduce", summed, sizeof summed);
    const int n = 4, h = 32, w = 40;
    const size_t count = (size_t)n * 3 * h * w;
    float *x = malloc(count * sizeof *x);
    bool losses = true;
    for (int k = 0; k < 2 && st == KLVAE_OK && x; k++) {
        for (size_t i = 0; i < count; i++)
            x[i] = (float)((i * 7919 + (size_t)k * 104729) % 2001) / 1000.0f - 1.0f;
        klvae_step_stats_t sa = KLVAE_STEP_STATS_INIT, sb = KLVAE_STEP_STATS_INIT;
        st = klvae_trainer_step(ta, x, n, h, w, &sa);
        if (st == KLVAE_OK)
            st = klvae_trainer_step(tb, x, n, h, w, &sb);
        losses = losses && st == KLVAE_OK && same_losses(&sa, &sb);
    }
    if (st == KLVAE_OK)
        st = klvae_trainer_save(ta, a_ck);
    if (st == KLVAE_OK)
        st = klvae_trainer_save(tb, b_ck);
    const bool files = st == KLVAE_OK && same_file(a_ck, b_ck);
    if (st != KLVAE_OK)
        snprintf(detail, sizeof detail, "%s: %s", klvae_status_string(st), klvae_last_error());
    else
        snprintf(detail, sizeof detail, "summed by %s; losses %s, checkpoints %s", summed,
                 losses ? "equal" : "DIFFER", files ? "equal byte for byte" : "DIFFER");
    verdict(st == KLVAE_OK && strcmp(summed, "nccl") == 0 && losses && files, what, detail);
    unlink(a_ck);
    unlink(b_ck);
    free(x);
    klvae_trainer_free(ta);
    klvae_trainer_free(tb);
    klvae_model_free(ma);
    klvae_model_free(mb);
}

static void training(const char *plugin_path)
{
    if (plugin_path)
        setenv("KLVAE_CUDA_PLUGIN", plugin_path, 1);
    char dir[] = "/tmp/klvae-nccl-XXXXXX";
    if (!mkdtemp(dir)) {
        verdict(false, "training steps", "cannot make a temporary folder");
        return;
    }
    training_steps("fp32", "nccl", dir);
    training_steps("bf16", "auto", dir); /* auto: NCCL on the CUDA backend */
    rmdir(dir);
}

int main(int argc, char **argv)
{
    const char *path = NULL;
    bool quick = false;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--plugin") == 0 && i + 1 < argc)
            path = argv[++i];
        else if (strcmp(argv[i], "--quick") == 0)
            quick = true;
    }
    char why[1024];
    const kv_plugin *p = harness_open(path, why, sizeof why);
    if (!p) {
        printf("%s: the plugin: %s\n", quick ? "SKIPPED" : "FAILED", why);
        return quick ? 0 : 1;
    }
    if (harness_probe(p, 0) != KLVAE_OK) {
        printf("%s: no usable GPU for the NCCL check: %s\n", quick ? "SKIPPED" : "FAILED",
               klvae_last_error());
        return quick ? 0 : 1;
    }
    if (!kv_plugin_has_comm(p)) {
        printf("FAILED: the plugin has no data-parallel functions (ABI 4)\n0 passed, 1 failed\n");
        return 1;
    }
    bucketed_sums(p);
    training(path);
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
