/* team.c — see team.h. Compiled twice by the Makefile: with MPI (KV_WITH_MPI,
 * mpicc's flags) for bin/klvae when mpicc is found, and without for the
 * unit tests and for builds without MPI. */
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef KV_WITH_MPI
#include <mpi.h>
#endif

#include "cli/cli.h"
#include "cli/team.h"

/* What MPI launchers put in the environment of the processes they start:
 * the number of ranks. Open MPI, MPICH / Intel MPI (Hydra's PMI), MVAPICH. */
static const char *const size_variables[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE",
                                             "MV2_COMM_WORLD_SIZE"};

int team_launched_size(const char **variable)
{
    for (size_t i = 0; i < sizeof size_variables / sizeof size_variables[0]; i++) {
        const char *v = getenv(size_variables[i]);
        if (v && *v && atoi(v) >= 1) {
            if (variable)
                *variable = size_variables[i];
            return atoi(v);
        }
    }
    return 0;
}

static void alone(team *t)
{
    memset(t, 0, sizeof *t);
    t->size = 1;
    t->local_size = 1;
}

#ifdef KV_WITH_MPI

/* ---- the communicator of klvae_comm_t over MPI_COMM_WORLD ---- */

static int mpi_allreduce_sum(void *ctx, void *data, size_t count, klvae_comm_type_t type)
{
    (void)ctx;
    const MPI_Datatype dt = type == KLVAE_COMM_FLOAT64 ? MPI_DOUBLE : MPI_FLOAT;
    const size_t size = type == KLVAE_COMM_FLOAT64 ? sizeof(double) : sizeof(float);
    for (size_t at = 0; at < count; at += INT_MAX) {
        int n = (int)(count - at < (size_t)INT_MAX ? count - at : (size_t)INT_MAX);
        int rc = MPI_Allreduce(MPI_IN_PLACE, (char *)data + at * size, n, dt, MPI_SUM,
                               MPI_COMM_WORLD);
        if (rc != MPI_SUCCESS)
            return rc;
    }
    return 0;
}

static int mpi_broadcast(void *ctx, void *data, size_t bytes, int root)
{
    (void)ctx;
    for (size_t at = 0; at < bytes; at += INT_MAX) {
        int n = (int)(bytes - at < (size_t)INT_MAX ? bytes - at : (size_t)INT_MAX);
        int rc = MPI_Bcast((char *)data + at, n, MPI_BYTE, root, MPI_COMM_WORLD);
        if (rc != MPI_SUCCESS)
            return rc;
    }
    return 0;
}

void team_join(team *t)
{
    alone(t);
    if (team_launched_size(NULL) == 0)
        return; /* not under a launcher: no MPI at all */
    if (MPI_Init(NULL, NULL) != MPI_SUCCESS)
        die("cannot initialise MPI");
    /* a failed call returns its code: the library names it, and the rank
     * that met it ends the job with a message instead of MPI's default */
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_rank(MPI_COMM_WORLD, &t->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &t->size);
    MPI_Comm local;
    if (MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &local) ==
        MPI_SUCCESS) {
        MPI_Comm_rank(local, &t->local_rank);
        MPI_Comm_size(local, &t->local_size);
        MPI_Comm_free(&local);
    }
    t->mpi = true;
    klvae_comm_t c = {sizeof c, t->rank, t->size, NULL, mpi_allreduce_sum, mpi_broadcast};
    t->comm = c;
}

void team_leave(team *t)
{
    if (t->mpi)
        MPI_Finalize();
    t->mpi = false;
}

int team_agree(team *t, bool ok, char *message, size_t size)
{
    if (!t->mpi)
        return ok ? -1 : 0;
    int mine = ok ? t->size : t->rank, first = t->size;
    if (MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD) != MPI_SUCCESS)
        team_abort(t, 1);
    if (first == t->size)
        return -1;
    if (MPI_Bcast(message, (int)size, MPI_CHAR, first, MPI_COMM_WORLD) != MPI_SUCCESS)
        team_abort(t, 1);
    message[size - 1] = '\0';
    return first;
}

bool team_any(team *t, bool flag)
{
    if (!t->mpi)
        return flag;
    int mine = flag, any = 0;
    if (MPI_Allreduce(&mine, &any, 1, MPI_INT, MPI_LOR, MPI_COMM_WORLD) != MPI_SUCCESS)
        team_abort(t, 1);
    return any != 0;
}

void team_abort(team *t, int code)
{
    fflush(stdout);
    fflush(stderr);
    if (t->mpi)
        MPI_Abort(MPI_COMM_WORLD, code);
    exit(code);
}

#else /* without MPI: a team of one */

void team_join(team *t)
{
    alone(t);
    const char *variable = NULL;
    int size = team_launched_size(&variable);
    if (size > 1)
        die_usage("started by an MPI launcher as one of %d processes (%s=%d), but this klvae "
                  "was built without MPI: the %d processes would train %d independent copies. "
                  "Build it where Open MPI's mpicc is installed (apt-get install "
                  "libopenmpi-dev openmpi-bin; make), or start klvae train alone",
                  size, variable, size, size, size);
}

void team_leave(team *t)
{
    (void)t;
}

int team_agree(team *t, bool ok, char *message, size_t size)
{
    (void)t, (void)message, (void)size;
    return ok ? -1 : 0;
}

bool team_any(team *t, bool flag)
{
    (void)t;
    return flag;
}

void team_abort(team *t, int code)
{
    (void)t;
    fflush(stdout);
    fflush(stderr);
    exit(code);
}

#endif
