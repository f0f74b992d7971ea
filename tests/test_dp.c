/* test_dp.c — data-parallel training through the public API
 * (klvae_trainer_set_comm), with ranks as threads of this process and a
 * communicator over shared memory, so that it runs without MPI (and under
 * ASan): N ranks with b images each against one process with N b images
 * (issue 11: every loss and every parameter of both networks within 1e-5
 * relative, compared with adam_eps 1e-5 because Adam's first steps amplify
 * the rounding of near-zero gradients), bit-identical weights on every rank,
 * gradient accumulation and clipping, data_parallel=ddp, resume on another
 * number of ranks, and the failures every rank must see.
 * tests/mpi_test.sh does the same with MPI processes and the klvae tool. */
#include <pthread.h>

#include "model/model.h"
#include "test_util.h"
#include "train/discriminator.h"
#include "train/trainer.h"

#define TRAIN "fixtures/train/"
#define REL 1e-5
#define MAX_RANKS 3
#define MAX_STEPS 4
#define H 32
#define W 40

/* ---- a communicator over threads ---- */

typedef struct world {
    int size;
    pthread_barrier_t barrier;
    void *slot[MAX_RANKS];
    int fail_rank; /* callbacks of this rank return 7 (-1: none) */
} world;

typedef struct rank_ctx {
    world *w;
    int rank;
} rank_ctx;

/* The sum in rank order, the same bits on every rank. */
static int world_allreduce(void *ctx, void *data, size_t count, klvae_comm_type_t type)
{
    rank_ctx *r = ctx;
    world *w = r->w;
    if (w->fail_rank == r->rank)
        return 7;
    const size_t size = type == KLVAE_COMM_FLOAT64 ? sizeof(double) : sizeof(float);
    w->slot[r->rank] = data;
    pthread_barrier_wait(&w->barrier);
    void *sum = malloc(count * size);
    ck_assert_ptr_nonnull(sum);
    for (size_t i = 0; i < count; i++) {
        if (type == KLVAE_COMM_FLOAT64) {
            double s = 0.0;
            for (int k = 0; k < w->size; k++)
                s += ((const double *)w->slot[k])[i];
            ((double *)sum)[i] = s;
        } else {
            float s = 0.0f;
            for (int k = 0; k < w->size; k++)
                s += ((const float *)w->slot[k])[i];
            ((float *)sum)[i] = s;
        }
    }
    pthread_barrier_wait(&w->barrier); /* every rank has read every slot */
    memcpy(data, sum, count * size);
    free(sum);
    return 0;
}

static int world_broadcast(void *ctx, void *data, size_t bytes, int root)
{
    rank_ctx *r = ctx;
    world *w = r->w;
    if (w->fail_rank == r->rank)
        return 7;
    if (r->rank == root)
        w->slot[root] = data;
    pthread_barrier_wait(&w->barrier);
    if (r->rank != root)
        memcpy(data, w->slot[root], bytes);
    pthread_barrier_wait(&w->barrier);
    return 0;
}

/* ---- trainers ---- */

/* Every random choice on: posterior samples, LPIPS dropout, the GAN from
 * step 0 (BatchNorm, the adaptive weight), EMA and a learned logvar. The
 * learning rate is LDM's scale (4.5e-6 per image of the batch), the pixel
 * loss l2 (sd-vae-ft-mse's): with L1, the sign flips at the rare pixel that
 * the rounding of another order of summation moves across zero change the
 * adaptive weight by 1e-5 each, 1e-3 after a step at learning rate 1e-4
 * (measured; l2 agrees to 2e-7 there). */
static klvae_options_t *dp_options(void)
{
    klvae_options_t *o = NULL;
    ck_assert_ok(klvae_options_create(&o));
    static const char *const kv[][2] = {
        {"learning_rate", "1e-5"},  {"adam_eps", "1e-5"},       {"pixel_loss", "l2"},
        {"lpips_weights", TRAIN "lpips.safetensors"},
        {"lpips_dropout", "0.5"},   {"kl_weight", "0.01"},
        {"posterior", "sample"},    {"disc_start", "0"},
        {"disc_layers", "3"},       {"disc_channels", "8"},
        {"disc_weights", TRAIN "disc.safetensors"},
        {"ema_decay", "0.9"},       {"learn_logvar", "true"},
        {"seed", "5"},              {"threads", "1"},
    };
    for (size_t i = 0; i < sizeof kv / sizeof kv[0]; i++)
        ck_assert_ok(klvae_options_set(o, kv[i][0], kv[i][1]));
    return o;
}

typedef struct run {
    klvae_model_t *m;
    klvae_trainer_t *t;
} run;

static run make_run(const klvae_options_t *o)
{
    run r = {NULL, NULL};
    ck_assert_ok(klvae_model_load(TRAIN "vae", o, &r.m));
    ck_assert_ok(klvae_trainer_create(r.m, o, &r.t));
    return r;
}

static void free_run(run *r)
{
    klvae_trainer_free(r->t);
    klvae_model_free(r->m);
}

/* The global batch of step k: n images. */
static float *global_batch(int k, int n)
{
    size_t count = (size_t)n * 3 * H * W;
    float *x = test_alloc(count);
    test_rng rng = test_rng_new(7000 + (uint64_t)k);
    test_fill(x, count, &rng, -1, 1);
    return x;
}

/* Rank r's share of a global batch of size * b images with grad_accum a:
 * micro-batch m of the global batch is every rank's micro-batch m, rank 0's
 * first (klvae.h). */
static float *share_of(const float *global, int size, int r, int b, int a)
{
    const size_t image = (size_t)3 * H * W, micro = (size_t)(b / a);
    float *x = test_alloc((size_t)b * image);
    for (int m = 0; m < a; m++)
        memcpy(x + m * micro * image, global + ((size_t)m * size * micro + r * micro) * image,
               micro * image * sizeof(float));
    return x;
}

/* ---- ranks as threads ---- */

typedef struct rank_job {
    rank_ctx ctx;
    run r;
    int size, b, accum, from, steps;
    bool identical; /* every rank gets rank 0's images */
    klvae_status_t status;
    klvae_step_stats_t stats[MAX_STEPS];
} rank_job;

static void *rank_main(void *arg)
{
    rank_job *j = arg;
    klvae_comm_t c = {sizeof c, j->ctx.rank, j->size, &j->ctx, world_allreduce, world_broadcast};
    j->status = klvae_trainer_set_comm(j->r.t, &c);
    for (int k = j->from; j->status == KLVAE_OK && k < j->steps; k++) {
        float *g = global_batch(k, j->size * j->b);
        float *x = share_of(g, j->size, j->identical ? 0 : j->ctx.rank, j->b, j->accum);
        j->stats[k] = (klvae_step_stats_t)KLVAE_STEP_STATS_INIT;
        j->status = klvae_trainer_step(j->r.t, x, j->b, H, W, &j->stats[k]);
        free(g);
        free(x);
    }
    return NULL;
}

/* Runs the jobs' ranks together, steps from .. steps-1. */
static void run_ranks(rank_job *jobs, int size, world *w)
{
    w->size = size;
    w->fail_rank = w->fail_rank ? w->fail_rank : -1;
    pthread_barrier_init(&w->barrier, NULL, (unsigned)size);
    pthread_t threads[MAX_RANKS];
    for (int r = 0; r < size; r++) {
        jobs[r].ctx.w = w;
        jobs[r].ctx.rank = r;
        jobs[r].size = size;
        ck_assert_int_eq(pthread_create(&threads[r], NULL, rank_main, &jobs[r]), 0);
    }
    for (int r = 0; r < size; r++)
        pthread_join(threads[r], NULL);
    pthread_barrier_destroy(&w->barrier);
}

/* One process with the whole batch, steps from .. steps-1. */
static void run_single(run *r, int n, int from, int steps, klvae_step_stats_t *stats)
{
    for (int k = from; k < steps; k++) {
        float *x = global_batch(k, n);
        stats[k] = (klvae_step_stats_t)KLVAE_STEP_STATS_INIT;
        ck_assert_ok(klvae_trainer_step(r->t, x, n, H, W, &stats[k]));
        free(x);
    }
}

/* ---- comparisons ---- */

static void assert_loss(const char *what, int k, double got, double want)
{
    ck_assert_msg(fabs(got - want) <= REL * fabs(want) + 1e-9,
                  "step %d %s: %.9g, single process %.9g (relative %.2e)", k, what, got, want,
                  fabs(got - want) / fabs(want));
}

static void assert_losses(const klvae_step_stats_t *got, const klvae_step_stats_t *want,
                          int steps)
{
    for (int k = 0; k < steps; k++) {
        const double a[] = {got[k].total_loss,  got[k].rec_loss,    got[k].perceptual_loss,
                            got[k].nll_loss,    got[k].kl_loss,     got[k].g_loss,
                            got[k].d_weight,    got[k].d_loss,      got[k].logits_real,
                            got[k].logits_fake, got[k].logvar},
                     b[] = {want[k].total_loss,  want[k].rec_loss,    want[k].perceptual_loss,
                            want[k].nll_loss,    want[k].kl_loss,     want[k].g_loss,
                            want[k].d_weight,    want[k].d_loss,      want[k].logits_real,
                            want[k].logits_fake, want[k].logvar};
        static const char *const names[] = {"total", "rec",  "perceptual", "nll",
                                            "kl",    "g",    "d_weight",   "d_loss",
                                            "logits_real", "logits_fake", "logvar"};
        for (size_t i = 0; i < KV_ARRAY_LEN(a); i++)
            assert_loss(names[i], k, a[i], b[i]);
        ck_assert_int_eq(got[k].step, want[k].step);
    }
}

/* max |a - b| <= REL * max |b| for one tensor */
static void assert_close(const char *what, const float *a, const float *b, size_t n)
{
    double scale = 0.0, worst = test_max_abs_diff(a, b, n);
    for (size_t i = 0; i < n; i++)
        scale = fmax(scale, fabs(b[i]));
    ck_assert_msg(worst <= REL * scale, "%s differs by %.3g (max |single process| %.3g)", what,
                  worst, scale);
}

/* Every parameter of both networks, the BatchNorm running statistics, and
 * the step count: within REL (bitwise: exactly). */
static void assert_same_weights(const run *a, const run *b, bool bitwise)
{
    const klvae_model_t *ma = a->m, *mb = b->m;
    for (size_t i = 0; i < ma->num_params; i++) {
        const float *x = ma->params[i].tensor->data, *y = mb->params[i].tensor->data;
        size_t n = kv_tensor_numel(ma->params[i].tensor);
        if (bitwise)
            ck_assert_msg(memcmp(x, y, n * sizeof(float)) == 0, "%s differs",
                          ma->params[i].name);
        else
            assert_close(ma->params[i].name, x, y, n);
    }
    const kv_disc *da = kv_trainer_disc(a->t), *db = kv_trainer_disc(b->t);
    for (int i = 0; i < da->num_params; i++) {
        const float *x = da->params[i].tensor->data, *y = db->params[i].tensor->data;
        size_t n = kv_tensor_numel(da->params[i].tensor);
        if (bitwise)
            ck_assert_msg(memcmp(x, y, n * sizeof(float)) == 0, "disc %s differs",
                          da->params[i].name);
        else
            assert_close(da->params[i].name, x, y, n);
    }
    for (int i = 0; i < da->convs; i++) {
        if (!da->running_mean[i])
            continue;
        size_t n = (size_t)da->bn[i].weight.shape[0];
        if (bitwise) {
            ck_assert(memcmp(da->running_mean[i], db->running_mean[i], n * sizeof(float)) == 0);
            ck_assert(memcmp(da->running_var[i], db->running_var[i], n * sizeof(float)) == 0);
        } else {
            assert_close("running mean", da->running_mean[i], db->running_mean[i], n);
            assert_close("running var", da->running_var[i], db->running_var[i], n);
        }
    }
    ck_assert_int_eq(klvae_trainer_step_count(a->t), klvae_trainer_step_count(b->t));
}

/* The test can fail: the steps moved decoder.conv_out.weight by more than
 * ten times the tolerance. */
static void assert_moved(const klvae_options_t *o, const run *trained)
{
    run fresh = make_run(o);
    const kv_tensor *a = &fresh.m->dec.conv_out.weight, *b = &trained->m->dec.conv_out.weight;
    size_t n = kv_tensor_numel(a);
    double scale = 0.0;
    for (size_t i = 0; i < n; i++)
        scale = fmax(scale, fabs(((const float *)b->data)[i]));
    ck_assert_double_gt(test_max_abs_diff(a->data, b->data, n), 10 * REL * scale);
    free_run(&fresh);
}

/* size ranks of b images (grad_accum a) against one process with size * b,
 * three steps, with options o. */
static void compare_with_single(klvae_options_t *o, int size, int b, int a)
{
    rank_job jobs[MAX_RANKS];
    memset(jobs, 0, sizeof jobs);
    for (int r = 0; r < size; r++) {
        jobs[r].r = make_run(o);
        jobs[r].b = b;
        jobs[r].accum = a;
        jobs[r].steps = 3;
    }
    world w = {0};
    run_ranks(jobs, size, &w);
    for (int r = 0; r < size; r++)
        ck_assert_msg(jobs[r].status == KLVAE_OK, "rank %d: %s (%s)", r,
                      klvae_status_string(jobs[r].status), klvae_last_error());
    run single = make_run(o);
    klvae_step_stats_t want[MAX_STEPS];
    run_single(&single, size * b, 0, 3, want);
    for (int r = 0; r < size; r++) {
        assert_losses(jobs[r].stats, want, 3);
        assert_same_weights(&jobs[r].r, &jobs[0].r, true); /* every rank alike */
    }
    assert_same_weights(&jobs[0].r, &single, false);
    assert_moved(o, &single);
    free_run(&single);
    for (int r = 0; r < size; r++)
        free_run(&jobs[r].r);
}

/* A world of one rank runs the data-parallel code (its sums, the global
 * averages, the adaptive weight and BatchNorm through the communicator, the
 * buckets) and must give the single process's step bit for bit: what
 * tests/gpu/test_nccl.c asserts of the NCCL path on one GPU. */
START_TEST(a_world_of_one_steps_as_the_single_process_bit_for_bit)
{
    klvae_options_t *o = dp_options();
    ck_assert_ok(klvae_options_set(o, "grad_accum", "2"));
    ck_assert_ok(klvae_options_set(o, "grad_clip", "0.5"));
    rank_job job;
    memset(&job, 0, sizeof job);
    job.r = make_run(o);
    job.b = 4;
    job.accum = 2;
    job.steps = 3;
    world w = {0};
    run_ranks(&job, 1, &w);
    ck_assert_msg(job.status == KLVAE_OK, "%s (%s)", klvae_status_string(job.status),
                  klvae_last_error());
    run single = make_run(o);
    klvae_step_stats_t want[MAX_STEPS];
    run_single(&single, 4, 0, 3, want);
    for (int k = 0; k < 3; k++) {
        const klvae_step_stats_t *a = &job.stats[k], *b = &want[k];
        ck_assert_msg(a->total_loss == b->total_loss && a->rec_loss == b->rec_loss &&
                          a->perceptual_loss == b->perceptual_loss && a->kl_loss == b->kl_loss &&
                          a->g_loss == b->g_loss && a->d_weight == b->d_weight &&
                          a->d_loss == b->d_loss && a->logits_real == b->logits_real &&
                          a->logits_fake == b->logits_fake && a->logvar == b->logvar,
                      "step %d: the losses differ (total %.17g against %.17g)", k, a->total_loss,
                      b->total_loss);
    }
    assert_same_weights(&job.r, &single, true);
    free_run(&single);
    free_run(&job.r);
    klvae_options_free(o);
}
END_TEST

START_TEST(two_ranks_step_as_one_process_with_their_batches)
{
    klvae_options_t *o = dp_options();
    compare_with_single(o, 2, 2, 1);
    klvae_options_free(o);
}
END_TEST

START_TEST(three_ranks_step_as_one_process_with_their_batches)
{
    klvae_options_t *o = dp_options();
    /* small buckets: many sums launched during the backward */
    ck_assert_ok(klvae_options_set(o, "allreduce_bucket_mb", "0.01"));
    compare_with_single(o, 3, 1, 1);
    klvae_options_free(o);
}
END_TEST

START_TEST(accumulation_clipping_and_fresh_updates_compose)
{
    klvae_options_t *o = dp_options();
    ck_assert_ok(klvae_options_set(o, "grad_accum", "2"));
    ck_assert_ok(klvae_options_set(o, "grad_clip", "0.05")); /* clips: the norms are larger */
    ck_assert_ok(klvae_options_set(o, "disc_update", "fresh"));
    compare_with_single(o, 2, 2, 2);
    klvae_options_free(o);
}
END_TEST

/* data_parallel=ddp is each rank's own step, summed: at step 0 (the same
 * weights everywhere) its adaptive weight, logits (BatchNorm over the
 * rank's own batch) and losses are the mean of what one process makes of
 * each rank's batch alone. data_parallel=exact gives other logits. */
START_TEST(ddp_is_the_mean_of_each_ranks_own_step)
{
    klvae_options_t *o = dp_options();
    ck_assert_ok(klvae_options_set(o, "posterior", "mode")); /* no noise: rank 1's would differ */
    ck_assert_ok(klvae_options_set(o, "lpips_dropout", "0"));
    for (int exact = 0; exact < 2; exact++) {
        ck_assert_ok(klvae_options_set(o, "data_parallel", exact ? "exact" : "ddp"));
        rank_job jobs[2];
        memset(jobs, 0, sizeof jobs);
        for (int r = 0; r < 2; r++) {
            jobs[r].r = make_run(o);
            jobs[r].b = 2;
            jobs[r].accum = 1;
            jobs[r].steps = 1;
        }
        world w = {0};
        run_ranks(jobs, 2, &w);
        ck_assert_ok(jobs[0].status);
        ck_assert_ok(jobs[1].status);
        char value[16];
        ck_assert_ok(klvae_trainer_get(jobs[0].r.t, "data_parallel", value, sizeof value));
        ck_assert_str_eq(value, exact ? "exact" : "ddp");
        /* each rank's batch alone, in one process */
        klvae_step_stats_t alone[2];
        float *g = global_batch(0, 4);
        for (int r = 0; r < 2; r++) {
            run one = make_run(o);
            float *x = share_of(g, 2, r, 2, 1);
            alone[r] = (klvae_step_stats_t)KLVAE_STEP_STATS_INIT;
            ck_assert_ok(klvae_trainer_step(one.t, x, 2, H, W, &alone[r]));
            free(x);
            free_run(&one);
        }
        free(g);
        const klvae_step_stats_t *s = &jobs[0].stats[0];
        const double mean_real = 0.5 * (alone[0].logits_real + alone[1].logits_real);
        if (exact) { /* the global batch's statistics: other logits */
            ck_assert_double_gt(fabs(s->logits_real - mean_real), 1e3 * REL * fabs(mean_real));
        } else {
            assert_loss("logits_real", 0, s->logits_real, mean_real);
            assert_loss("logits_fake", 0, s->logits_fake,
                        0.5 * (alone[0].logits_fake + alone[1].logits_fake));
            assert_loss("d_weight", 0, s->d_weight, 0.5 * (alone[0].d_weight + alone[1].d_weight));
            assert_loss("g", 0, s->g_loss, 0.5 * (alone[0].g_loss + alone[1].g_loss));
            assert_loss("nll", 0, s->nll_loss, 0.5 * (alone[0].nll_loss + alone[1].nll_loss));
            assert_loss("d_loss", 0, s->d_loss, 0.5 * (alone[0].d_loss + alone[1].d_loss));
            assert_loss("total", 0, s->total_loss,
                        0.5 * (alone[0].total_loss + alone[1].total_loss));
        }
        assert_same_weights(&jobs[1].r, &jobs[0].r, true); /* running statistics: rank 0's */
        free_run(&jobs[0].r);
        free_run(&jobs[1].r);
    }
    klvae_options_free(o);
}
END_TEST

/* A checkpoint of 2 ranks (global batch 6) resumes on 1 and on 3 ranks
 * (loaded on rank 0 only: klvae_trainer_set_comm copies it) and continues
 * as the 2 ranks would have. */
START_TEST(checkpoint_of_two_ranks_resumes_on_one_and_three)
{
    klvae_options_t *o = dp_options();
    char *dir = test_tmpdir(), *ckpt = test_join(dir, "two.safetensors");
    rank_job two[2];
    memset(two, 0, sizeof two);
    for (int r = 0; r < 2; r++) {
        two[r].r = make_run(o);
        two[r].b = 3;
        two[r].accum = 1;
        two[r].steps = 1;
    }
    world w = {0};
    run_ranks(two, 2, &w);
    ck_assert_ok(two[0].status);
    ck_assert_ok(two[1].status);
    ck_assert_ok(klvae_trainer_save(two[0].r.t, ckpt));
    for (int r = 0; r < 2; r++) /* ... and on: steps 1 and 2 */
        two[r].from = 1, two[r].steps = 3;
    run_ranks(two, 2, &w);
    ck_assert_ok(two[0].status);

    run one = make_run(o);
    ck_assert_ok(klvae_trainer_load(one.t, ckpt));
    klvae_step_stats_t stats[MAX_STEPS];
    run_single(&one, 6, 1, 3, stats);
    assert_losses(stats + 1, two[0].stats + 1, 2);
    assert_same_weights(&one, &two[0].r, false);

    rank_job three[3];
    memset(three, 0, sizeof three);
    for (int r = 0; r < 3; r++) {
        three[r].r = make_run(o);
        three[r].b = 2;
        three[r].accum = 1;
        three[r].from = 1;
        three[r].steps = 3;
    }
    ck_assert_ok(klvae_trainer_load(three[0].r.t, ckpt));
    run_ranks(three, 3, &w);
    for (int r = 0; r < 3; r++) {
        ck_assert_ok(three[r].status);
        ck_assert_int_eq(three[r].stats[1].step, 1); /* the copied step counter */
        assert_same_weights(&three[r].r, &three[0].r, true);
    }
    assert_losses(three[0].stats + 1, two[0].stats + 1, 2);
    assert_same_weights(&three[0].r, &two[0].r, false);
    for (int r = 0; r < 3; r++)
        free_run(&three[r].r);
    free_run(&one);
    free_run(&two[0].r);
    free_run(&two[1].r);
    test_rmtree(dir);
    free(dir);
    free(ckpt);
    klvae_options_free(o);
}
END_TEST

/* ---- failures every rank sees ---- */

typedef struct fail_job {
    rank_ctx ctx;
    run r;
    int size, n;
    bool nan;           /* this rank's images hold a NaN */
    double kl_weight;   /* this rank's option (set before) */
    klvae_status_t set_status, step_status, again_status;
    char set_error[512], step_error[512];
    int64_t steps_after;
} fail_job;

static void *fail_main(void *arg)
{
    fail_job *j = arg;
    klvae_comm_t c = {sizeof c, j->ctx.rank, j->size, &j->ctx, world_allreduce, world_broadcast};
    j->set_status = klvae_trainer_set_comm(j->r.t, &c);
    snprintf(j->set_error, sizeof j->set_error, "%s", klvae_last_error());
    if (j->set_status != KLVAE_OK)
        return NULL;
    const size_t count = (size_t)2 * 3 * H * W;
    float *x = global_batch(0, 2);
    if (j->nan)
        x[count / 2] = NAN;
    j->step_status = klvae_trainer_step(j->r.t, x, j->n, H, W, NULL);
    snprintf(j->step_error, sizeof j->step_error, "%s", klvae_last_error());
    j->steps_after = klvae_trainer_step_count(j->r.t);
    if (j->nan) /* the next batch is good: every rank goes on */
        x[count / 2] = 0.0f;
    j->again_status = klvae_trainer_step(j->r.t, x, 2, H, W, NULL);
    free(x);
    return NULL;
}

static void run_fail(fail_job *jobs, int size, world *w)
{
    w->size = size;
    pthread_barrier_init(&w->barrier, NULL, (unsigned)size);
    pthread_t threads[MAX_RANKS];
    for (int r = 0; r < size; r++) {
        jobs[r].ctx.w = w;
        jobs[r].ctx.rank = r;
        jobs[r].size = size;
        ck_assert_int_eq(pthread_create(&threads[r], NULL, fail_main, &jobs[r]), 0);
    }
    for (int r = 0; r < size; r++)
        pthread_join(threads[r], NULL);
    pthread_barrier_destroy(&w->barrier);
}

START_TEST(a_ranks_bad_batch_stops_every_rank_before_anything_runs)
{
    klvae_options_t *o = dp_options();
    fail_job jobs[2];
    memset(jobs, 0, sizeof jobs);
    for (int r = 0; r < 2; r++) {
        jobs[r].r = make_run(o);
        jobs[r].n = 2;
    }
    jobs[1].nan = true;
    world w = {.fail_rank = -1};
    run_fail(jobs, 2, &w);
    for (int r = 0; r < 2; r++) {
        ck_assert_ok(jobs[r].set_status);
        ck_assert_int_eq(jobs[r].step_status, KLVAE_ERR_NONFINITE);
        ck_assert_msg(strstr(jobs[r].step_error, "rank 1: ") &&
                          strstr(jobs[r].step_error, "image 1 of the batch"),
                      "rank %d: %s", r, jobs[r].step_error);
        ck_assert_int_eq(jobs[r].steps_after, 0);
        ck_assert_ok(jobs[r].again_status);
    }
    assert_same_weights(&jobs[1].r, &jobs[0].r, true);
    /* a rank with another batch size: both refuse, naming it */
    for (int r = 0; r < 2; r++)
        free_run(&jobs[r].r);
    memset(jobs, 0, sizeof jobs);
    for (int r = 0; r < 2; r++) {
        jobs[r].r = make_run(o);
        jobs[r].n = r == 0 ? 2 : 1;
    }
    run_fail(jobs, 2, &w);
    for (int r = 0; r < 2; r++) {
        ck_assert_int_eq(jobs[r].step_status, KLVAE_ERR_INVALID_ARGUMENT);
        ck_assert_msg(strstr(jobs[r].step_error, "rank 1's n differs"), "rank %d: %s", r,
                      jobs[r].step_error);
        ck_assert_int_eq(jobs[r].steps_after, 0);
        free_run(&jobs[r].r);
    }
    klvae_options_free(o);
}
END_TEST

START_TEST(ranks_with_other_options_are_refused_and_state_is_rank_0s)
{
    klvae_options_t *o = dp_options();
    fail_job jobs[3];
    memset(jobs, 0, sizeof jobs);
    jobs[0].r = make_run(o);
    jobs[1].r = make_run(o);
    ck_assert_ok(klvae_options_set(o, "kl_weight", "0.02"));
    jobs[2].r = make_run(o);
    world w = {.fail_rank = -1};
    run_fail(jobs, 3, &w);
    for (int r = 0; r < 3; r++) {
        ck_assert_int_eq(jobs[r].set_status, KLVAE_ERR_CONFIG);
        ck_assert_msg(strstr(jobs[r].set_error, "rank 2: ") &&
                          strstr(jobs[r].set_error, "kl_weight"),
                      "rank %d: %s", r, jobs[r].set_error);
        free_run(&jobs[r].r);
    }
    /* threads may differ; a rank that has stepped alone takes rank 0's state */
    ck_assert_ok(klvae_options_set(o, "kl_weight", "0.01"));
    memset(jobs, 0, sizeof jobs);
    jobs[0].r = make_run(o);
    ck_assert_ok(klvae_options_set(o, "threads", "2"));
    jobs[1].r = make_run(o);
    float *x = global_batch(9, 2);
    ck_assert_ok(klvae_trainer_step(jobs[1].r.t, x, 2, H, W, NULL));
    free(x);
    rank_job rj[2];
    memset(rj, 0, sizeof rj);
    rj[0].r = jobs[0].r;
    rj[1].r = jobs[1].r;
    run_ranks(rj, 2, &w); /* set_comm, no step */
    ck_assert_ok(rj[0].status);
    ck_assert_ok(rj[1].status);
    ck_assert_int_eq(klvae_trainer_step_count(rj[1].r.t), 0);
    assert_same_weights(&rj[1].r, &rj[0].r, true);
    char value[16];
    ck_assert_ok(klvae_trainer_get(rj[1].r.t, "allreduce", value, sizeof value));
    ck_assert_str_eq(value, "host");
    /* leaving: a single process again, which steps alone */
    ck_assert_ok(klvae_trainer_set_comm(rj[1].r.t, NULL));
    x = global_batch(0, 2);
    ck_assert_ok(klvae_trainer_step(rj[1].r.t, x, 2, H, W, NULL));
    free(x);
    free_run(&rj[0].r);
    free_run(&rj[1].r);
    klvae_options_free(o);
}
END_TEST

START_TEST(communicator_errors)
{
    klvae_options_t *o = dp_options();
    run r = make_run(o);
    world w = {.size = 2, .fail_rank = -1};
    rank_ctx ctx = {&w, 0};
    klvae_comm_t good = {sizeof good, 0, 2, &ctx, world_allreduce, world_broadcast};
    klvae_comm_t c = good;
    c.struct_size = 8;
    ck_assert_status(klvae_trainer_set_comm(r.t, &c), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("struct_size");
    c = good;
    c.rank = 2;
    ck_assert_status(klvae_trainer_set_comm(r.t, &c), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("rank 2 of 2");
    c = good;
    c.size = 0;
    c.rank = 0;
    ck_assert_status(klvae_trainer_set_comm(r.t, &c), KLVAE_ERR_INVALID_ARGUMENT);
    c = good;
    c.broadcast = NULL;
    ck_assert_status(klvae_trainer_set_comm(r.t, &c), KLVAE_ERR_INVALID_ARGUMENT);
    ck_assert_error_mentions("broadcast");
    ck_assert_status(klvae_trainer_set_comm(NULL, &good), KLVAE_ERR_INVALID_ARGUMENT);
    /* a callback that fails (on a world of one) */
    world alone = {.size = 1, .fail_rank = 0};
    pthread_barrier_init(&alone.barrier, NULL, 1);
    rank_ctx actx = {&alone, 0};
    klvae_comm_t one = {sizeof one, 0, 1, &actx, world_allreduce, world_broadcast};
    ck_assert_status(klvae_trainer_set_comm(r.t, &one), KLVAE_ERR_COMM);
    ck_assert_error_mentions("allreduce_sum failed (returned 7)");
    /* still a single process: it steps alone */
    float *x = global_batch(0, 2);
    ck_assert_ok(klvae_trainer_step(r.t, x, 2, H, W, NULL));
    /* a world of one works, and gives the single process's step */
    alone.fail_rank = -1;
    ck_assert_ok(klvae_trainer_set_comm(r.t, &one));
    ck_assert_ok(klvae_trainer_step(r.t, x, 2, H, W, NULL));
    /* allreduce=nccl needs the CUDA backend */
    run other = make_run(o);
    klvae_options_t *n = dp_options();
    ck_assert_ok(klvae_options_set(n, "allreduce", "nccl"));
    run cpu_nccl = make_run(n);
    ck_assert_status(klvae_trainer_set_comm(cpu_nccl.t, &one), KLVAE_ERR_BACKEND_UNAVAILABLE);
    ck_assert_error_mentions("allreduce=nccl");
    free(x);
    pthread_barrier_destroy(&alone.barrier);
    free_run(&cpu_nccl);
    free_run(&other);
    free_run(&r);
    klvae_options_free(n);
    klvae_options_free(o);
}
END_TEST

Suite *suite_dp(void)
{
    Suite *s = suite_create("dp");
    TCase *c = tcase_create("dp");
    tcase_set_timeout(c, 300);
    tcase_add_test(c, a_world_of_one_steps_as_the_single_process_bit_for_bit);
    tcase_add_test(c, two_ranks_step_as_one_process_with_their_batches);
    tcase_add_test(c, three_ranks_step_as_one_process_with_their_batches);
    tcase_add_test(c, accumulation_clipping_and_fresh_updates_compose);
    tcase_add_test(c, ddp_is_the_mean_of_each_ranks_own_step);
    tcase_add_test(c, checkpoint_of_two_ranks_resumes_on_one_and_three);
    tcase_add_test(c, a_ranks_bad_batch_stops_every_rank_before_anything_runs);
    tcase_add_test(c, ranks_with_other_options_are_refused_and_state_is_rank_0s);
    tcase_add_test(c, communicator_errors);
    suite_add_tcase(s, c);
    return s;
}
