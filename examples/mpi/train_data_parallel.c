/* train_data_parallel.c — data-parallel training with libklvae and MPI: the
 * library links no MPI, so the program hands each rank's trainer its
 * communicator as two callbacks (klvae_comm_t, include/klvae.h).
 *
 *   mpicc -std=c11 train_data_parallel.c -o train_data_parallel $(pkg-config --cflags --libs klvae)
 *   mpirun -np 2 ./train_data_parallel [STEPS] [CHECKPOINT]
 *
 * Every rank trains the same small model on its share of each global batch
 * (here random images; a real program reads its share of a dataset), the
 * ranks sum their gradients through MPI, and every rank ends with the same
 * weights: the program checks that by encoding a fixed image on every rank
 * and comparing the bits. Rank 0 alone prints and writes the checkpoint.
 * On the CUDA backend (option backend=cuda, one GPU per rank: device = the
 * rank on its machine) the gradients go through NCCL instead, which the
 * library bootstraps through the same broadcast callback. */
#include <limits.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <klvae.h>

#define SIZE 32      /* image side */
#define PER_RANK 2   /* images per rank and step: the global batch is PER_RANK * ranks */

/* ---- the communicator: MPI_COMM_WORLD ---- */

static int sum_over_ranks(void *ctx, void *data, size_t count, klvae_comm_type_t type)
{
    (void)ctx; /* MPI_COMM_WORLD; a program with its own communicator passes it here */
    MPI_Datatype t = type == KLVAE_COMM_FLOAT64 ? MPI_DOUBLE : MPI_FLOAT;
    /* the library passes at most 2^28 elements: MPI's int count is enough */
    return MPI_Allreduce(MPI_IN_PLACE, data, (int)count, t, MPI_SUM, MPI_COMM_WORLD) ==
                   MPI_SUCCESS
               ? 0
               : 1;
}

static int broadcast(void *ctx, void *data, size_t bytes, int root)
{
    (void)ctx;
    for (size_t at = 0; at < bytes; at += INT_MAX) { /* the state may exceed 2 GB */
        int n = (int)(bytes - at < (size_t)INT_MAX ? bytes - at : (size_t)INT_MAX);
        if (MPI_Bcast((char *)data + at, n, MPI_BYTE, root, MPI_COMM_WORLD) != MPI_SUCCESS)
            return 1;
    }
    return 0;
}

/* ---- helpers ---- */

/* A library failure on one rank: the others may be waiting for it in a
 * collective, so end them all. */
static void check(klvae_status_t st, const char *what, int rank)
{
    if (st == KLVAE_OK)
        return;
    fprintf(stderr, "rank %d: %s: %s (%s)\n", rank, what, klvae_last_error(),
            klvae_status_string(st));
    MPI_Abort(MPI_COMM_WORLD, 1);
}

/* Image k of the global batch of a step, in [-1, 1]: every rank computes its
 * own share of the same global batches. */
static void image(int step, int k, float *out)
{
    unsigned s = (unsigned)(step * 7919 + k * 104729 + 1);
    for (int i = 0; i < 3 * SIZE * SIZE; i++) {
        s = s * 1664525u + 1013904223u;
        out[i] = (float)(s >> 8) / 8388608.0f - 1.0f;
    }
}

/* FNV-1a of the encoder's output on a fixed image: equal on two ranks when
 * their weights are. */
static unsigned long long weights_checksum(klvae_model_t *m, int rank)
{
    float x[3 * SIZE * SIZE], mean[4 * SIZE * SIZE], logvar[4 * SIZE * SIZE];
    image(-1, 0, x);
    check(klvae_encode(m, x, 1, SIZE, SIZE, mean, logvar), "encode", rank);
    const int f = klvae_model_downsampling_factor(m), zc = klvae_model_latent_channels(m);
    const unsigned char *bytes = (const unsigned char *)mean;
    unsigned long long h = 1469598103934665603ull;
    for (size_t i = 0; i < sizeof(float) * (size_t)zc * (SIZE / f) * (SIZE / f); i++)
        h = (h ^ bytes[i]) * 1099511628211ull;
    return h;
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    int rank, ranks;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &ranks);
    const int steps = argc > 1 ? atoi(argv[1]) : 3;
    const char *checkpoint = argc > 2 ? argv[2] : NULL;

    /* the same options on every rank (threads and device may differ) */
    klvae_options_t *o = NULL;
    check(klvae_options_create(&o), "options", rank);
    const char *settings[][2] = {{"config", "tiny"},   {"seed", "1"},
                                 {"threads", "1"},     {"learning_rate", "1e-4"},
                                 {"disc_start", "0"},  {"disc_layers", "2"}};
    for (size_t i = 0; i < sizeof settings / sizeof settings[0]; i++)
        check(klvae_options_set(o, settings[i][0], settings[i][1]), settings[i][0], rank);
    klvae_model_t *m = NULL;
    klvae_trainer_t *t = NULL;
    check(klvae_model_create(o, &m), "model", rank);
    check(klvae_trainer_create(m, o, &t), "trainer", rank);

    /* join the run: the ranks check that they agree and take rank 0's state */
    klvae_comm_t comm = {sizeof comm, rank, ranks, NULL, sum_over_ranks, broadcast};
    check(klvae_trainer_set_comm(t, &comm), "data-parallel", rank);

    float *x = malloc(sizeof(float) * PER_RANK * 3 * SIZE * SIZE);
    if (!x)
        MPI_Abort(MPI_COMM_WORLD, 1);
    for (int s = 0; s < steps; s++) {
        for (int k = 0; k < PER_RANK; k++) /* this rank's images of the global batch */
            image(s, rank * PER_RANK + k, x + (size_t)k * 3 * SIZE * SIZE);
        klvae_step_stats_t stats = KLVAE_STEP_STATS_INIT;
        check(klvae_trainer_step(t, x, PER_RANK, SIZE, SIZE, &stats), "step", rank);
        if (rank == 0) /* the losses of the global batch, the same on every rank */
            printf("step %lld: total %.4f rec %.4f d_loss %.4f (global batch %d on %d ranks)\n",
                   (long long)stats.step, stats.total_loss, stats.rec_loss, stats.d_loss,
                   PER_RANK * ranks, ranks);
    }

    /* every rank holds the same weights */
    unsigned long long mine = weights_checksum(m, rank), low = 0, high = 0;
    MPI_Allreduce(&mine, &low, 1, MPI_UNSIGNED_LONG_LONG, MPI_MIN, MPI_COMM_WORLD);
    MPI_Allreduce(&mine, &high, 1, MPI_UNSIGNED_LONG_LONG, MPI_MAX, MPI_COMM_WORLD);
    int status = low == high ? 0 : 1;
    if (rank == 0) {
        printf("%s (checksum %016llx)\n",
               status ? "the ranks' weights DIFFER" : "every rank holds the same weights", mine);
        if (checkpoint)
            check(klvae_trainer_save(t, checkpoint), "checkpoint", rank);
    }
    free(x);
    klvae_trainer_free(t);
    klvae_model_free(m);
    klvae_options_free(o);
    MPI_Finalize();
    return status;
}
