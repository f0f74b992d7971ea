/* bench_dp.c — the cost of data-parallel training on this machine
 * (docs/performance.md, "Data-parallel training"). Built with mpicc by
 * make build/bench_dp; tools/bench_dp.sh runs it.
 *
 *   mpirun -np N build/bench_dp [--config NAME] [--size S] [--batch B] [--steps K]
 *                               [--warmup W] [--threads T] [--alone]
 *
 * Trains K steps (after W unmeasured ones) on a global batch of B random
 * images of S x S, with the GAN on, and prints one JSON line (rank 0): the
 * median step time, the median time spent inside the communicator's
 * callbacks per step (the gradient and loss sums, BatchNorm statistics:
 * waiting for the slower rank included), and, measured on its own after the
 * training, the median time of one MPI_Allreduce of as many floats as the
 * model and the discriminator have parameters. --alone: one process without
 * a communicator (the baseline; N must be 1). --allreduce-only F: no
 * training, the median of 10 MPI_Allreduce of F floats (the gradients of
 * a bigger model, e.g. SD's 86.4 M with its discriminator). */
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <klvae.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- the communicator, timed ---- */

static double comm_seconds; /* inside the callbacks, since the last reset */
static long long comm_floats;

static int sum_over_ranks(void *ctx, void *data, size_t count, klvae_comm_type_t type)
{
    (void)ctx;
    double t0 = now();
    int rc = MPI_Allreduce(MPI_IN_PLACE, data, (int)count,
                           type == KLVAE_COMM_FLOAT64 ? MPI_DOUBLE : MPI_FLOAT, MPI_SUM,
                           MPI_COMM_WORLD);
    comm_seconds += now() - t0;
    comm_floats += (long long)count;
    return rc == MPI_SUCCESS ? 0 : 1;
}

static int broadcast(void *ctx, void *data, size_t bytes, int root)
{
    (void)ctx;
    double t0 = now();
    int rc = MPI_Bcast(data, (int)bytes, MPI_BYTE, root, MPI_COMM_WORLD);
    comm_seconds += now() - t0;
    return rc == MPI_SUCCESS ? 0 : 1;
}

static void check(klvae_status_t st, const char *what)
{
    if (st == KLVAE_OK)
        return;
    fprintf(stderr, "bench_dp: %s: %s\n", what, klvae_last_error());
    MPI_Abort(MPI_COMM_WORLD, 1);
}

static int compare_doubles(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, compare_doubles);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* The median time of one MPI_Allreduce of count floats over the ranks. */
static double allreduce_alone(long long count, int runs)
{
    float *buf = calloc((size_t)count, sizeof *buf);
    double *t = malloc((size_t)runs * sizeof *t);
    for (int r = 0; r < runs; r++) {
        MPI_Barrier(MPI_COMM_WORLD);
        double t0 = now();
        MPI_Allreduce(MPI_IN_PLACE, buf, (int)count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
        t[r] = now() - t0;
    }
    double m = median(t, runs);
    free(buf);
    free(t);
    return m;
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    int rank, ranks;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &ranks);
    const char *config = "small", *threads = "1";
    int size = 64, batch = 8, steps = 10, warmup = 2, alone = 0;
    long long only = 0;
    for (int i = 1; i < argc; i++) {
        const char *v = i + 1 < argc ? argv[i + 1] : "";
        if (!strcmp(argv[i], "--config")) config = v, i++;
        else if (!strcmp(argv[i], "--size")) size = atoi(v), i++;
        else if (!strcmp(argv[i], "--batch")) batch = atoi(v), i++;
        else if (!strcmp(argv[i], "--steps")) steps = atoi(v), i++;
        else if (!strcmp(argv[i], "--warmup")) warmup = atoi(v), i++;
        else if (!strcmp(argv[i], "--threads")) threads = v, i++;
        else if (!strcmp(argv[i], "--alone")) alone = 1;
        else if (!strcmp(argv[i], "--allreduce-only")) only = atoll(v), i++;
        else {
            fprintf(stderr, "bench_dp: unknown argument %s\n", argv[i]);
            MPI_Abort(MPI_COMM_WORLD, 2);
        }
    }
    if (only > 0) {
        double s = allreduce_alone(only, 10);
        if (rank == 0)
            printf("{\"tool\": \"bench_dp\", \"ranks\": %d, \"allreduce_floats\": %lld, "
                   "\"allreduce_alone_s\": %.4f, \"GB_per_s\": %.2f}\n",
                   ranks, only, s, only * 4.0 / s / 1e9);
        MPI_Finalize();
        return 0;
    }
    if (batch % ranks != 0 || (alone && ranks != 1) || steps < 1 || steps > 1000) {
        fprintf(stderr, "bench_dp: --batch %d on %d ranks (--alone needs one)\n", batch, ranks);
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    klvae_options_t *o = NULL;
    check(klvae_options_create(&o), "options");
    const char *kv[][2] = {{"config", config}, {"threads", threads}, {"backend", "cpu"},
                           {"seed", "1"}, {"disc_start", "0"}, {"learning_rate", "1e-5"}};
    for (size_t i = 0; i < sizeof kv / sizeof kv[0]; i++)
        check(klvae_options_set(o, kv[i][0], kv[i][1]), kv[i][0]);
    klvae_model_t *m = NULL;
    klvae_trainer_t *t = NULL;
    check(klvae_model_create(o, &m), "model");
    check(klvae_trainer_create(m, o, &t), "trainer");
    klvae_comm_t comm = {sizeof comm, rank, ranks, NULL, sum_over_ranks, broadcast};
    if (!alone)
        check(klvae_trainer_set_comm(t, &comm), "set_comm");
    const int local = batch / ranks;
    const size_t image = (size_t)3 * size * size;
    float *x = malloc(sizeof(float) * local * image);
    double *step_s = malloc(sizeof(double) * steps), *comm_s = malloc(sizeof(double) * steps);
    long long floats = 0;
    for (int s = 0; s < warmup + steps; s++) {
        unsigned seed = (unsigned)(s * 1000 + rank * 17 + 1);
        for (size_t i = 0; i < (size_t)local * image; i++) {
            seed = seed * 1664525u + 1013904223u;
            x[i] = (float)(seed >> 8) / 8388608.0f - 1.0f;
        }
        comm_seconds = 0.0;
        comm_floats = 0;
        MPI_Barrier(MPI_COMM_WORLD); /* every rank starts the step together */
        double t0 = now();
        check(klvae_trainer_step(t, x, local, size, size, NULL), "step");
        if (s >= warmup) {
            step_s[s - warmup] = now() - t0;
            comm_s[s - warmup] = comm_seconds;
            floats = comm_floats;
        }
    }
    double *share = malloc(sizeof(double) * steps);
    for (int s = 0; s < steps; s++)
        share[s] = comm_s[s] / step_s[s];
    const double step_median = median(step_s, steps), comm_median = median(comm_s, steps),
                 share_median = median(share, steps);
    long long params = klvae_model_parameter_count(m);
    /* the gradients alone: both networks' parameters in one sum (the
     * discriminator's count from what a step sums besides the model's) */
    long long grad_floats = alone ? params : floats;
    double wire = ranks > 1 ? allreduce_alone(grad_floats, 10) : 0.0;
    if (rank == 0)
        printf("{\"tool\": \"bench_dp\", \"config\": \"%s\", \"size\": %d, \"batch\": %d, "
               "\"ranks\": %d, \"threads\": %s, \"communicator\": %s, \"steps\": %d, "
               "\"step_s\": %.4f, \"comm_s\": %.4f, \"comm_share\": %.4f, "
               "\"floats_summed_per_step\": %lld, \"allreduce_alone_s\": %.4f, "
               "\"model_parameters\": %lld}\n",
               config, size, batch, ranks, threads, alone ? "false" : "true", steps,
               step_median, comm_median, share_median, floats, wire, params);
    free(x);
    free(step_s);
    free(comm_s);
    free(share);
    klvae_trainer_free(t);
    klvae_model_free(m);
    klvae_options_free(o);
    MPI_Finalize();
    return 0;
}
