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
 *   3. when the CUDA backend can train (another issue's work; until then
 *      SKIP with the trainer's reason): one training step of a small model
 *      with allreduce=nccl against the same step without a communicator,
 *      every weight bit for bit.
 *
 * Prints PASS/FAIL/SKIP lines and a last line "N passed, N failed".
 * --quick (make check on a machine without a GPU): SKIPPED, exit 0, when
 * no GPU can be used; it shows that the program builds and the plugin
 * loads. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

/* ---- a training step with and without NCCL ---- */

static klvae_status_t small_trainer(const kv_plugin *p, const char *allreduce,
                                    klvae_model_t **m, klvae_trainer_t **t)
{
    kv_backend *be = NULL;
    *m = NULL;
    *t = NULL;
    klvae_status_t st = harness_backend(p, 0, KV_PRECISION_FP32, &be);
    if (st != KLVAE_OK)
        return st;
    st = harness_model(be, "tiny", 3, "fp32", m); /* owns be when it succeeds */
    if (st != KLVAE_OK) {
        kv_backend_destroy(be);
        return st;
    }
    klvae_options_t *o = NULL;
    klvae_options_create(&o);
    const char *kv[][2] = {{"disc_start", "0"}, {"disc_layers", "2"}, {"seed", "4"},
                           {"learning_rate", "1e-4"}, {"allreduce", allreduce}};
    for (size_t i = 0; i < sizeof kv / sizeof kv[0]; i++)
        klvae_options_set(o, kv[i][0], kv[i][1]);
    if (st == KLVAE_OK)
        st = klvae_trainer_create(*m, o, t);
    klvae_options_free(o);
    return st;
}

static void training_step(const kv_plugin *p)
{
    klvae_model_t *ma = NULL, *mb = NULL;
    klvae_trainer_t *ta = NULL, *tb = NULL;
    klvae_status_t st = small_trainer(p, "nccl", &ma, &ta);
    if (st == KLVAE_ERR_UNSUPPORTED) {
        printf("SKIP  a training step with NCCL against one without: CUDA training is not "
               "available yet (%s)\n", klvae_last_error());
        if (ma)
            klvae_model_free(ma);
        return;
    }
    if (st == KLVAE_OK)
        st = small_trainer(p, "nccl", &mb, &tb);
    if (st == KLVAE_OK)
        st = klvae_trainer_set_comm(tb, &world_of_one);
    const int n = 2, s = 32;
    float *x = malloc(sizeof(float) * n * 3 * s * s);
    for (int i = 0; x && i < n * 3 * s * s; i++)
        x[i] = (float)((i * 7919) % 2001) / 1000.0f - 1.0f;
    if (st == KLVAE_OK)
        st = klvae_trainer_step(ta, x, n, s, s, NULL);
    if (st == KLVAE_OK)
        st = klvae_trainer_step(tb, x, n, s, s, NULL);
    char detail[256] = "";
    bool same = st == KLVAE_OK;
    size_t na = 0, nb = 0;
    float *a = same ? download_all(ma, &na) : NULL, *b = same ? download_all(mb, &nb) : NULL;
    same = a && b && na == nb && memcmp(a, b, na * sizeof *a) == 0;
    char allreduce[16] = "";
    if (tb)
        klvae_trainer_get(tb, "allreduce", allreduce, sizeof allreduce);
    snprintf(detail, sizeof detail, "summed on the %s%s%s", allreduce,
             st == KLVAE_OK ? "" : "; ", st == KLVAE_OK ? "" : klvae_last_error());
    verdict(same && strcmp(allreduce, "nccl") == 0,
            "a training step with NCCL (world of one) equals the step without, bit for bit",
            detail);
    free(a);
    free(b);
    free(x);
    klvae_trainer_free(ta);
    klvae_trainer_free(tb);
    klvae_model_free(ma);
    klvae_model_free(mb);
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
    training_step(p);
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
