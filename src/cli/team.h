/* team.h — the processes of one `klvae train` run: this process alone, or
 * the ranks of an MPI job (mpirun -np N klvae train ...). team.c is built
 * with MPI when the build finds mpicc (Open MPI; the Makefile defines
 * KV_WITH_MPI) and without it otherwise; the library links neither. */
#ifndef KLVAE_CLI_TEAM_H
#define KLVAE_CLI_TEAM_H

#include <stdbool.h>
#include <stddef.h>

#include "klvae.h"

typedef struct team {
    int rank, size;  /* 0 and 1 for a process alone */
    int local_rank, local_size; /* among the ranks on this machine */
    bool mpi;        /* started by an MPI launcher, MPI initialised */
    klvae_comm_t comm; /* the job's communicator, for klvae_trainer_set_comm */
} team;

/* The ranks a launcher (mpirun, mpiexec, srun with PMI) started, from its
 * environment (OMPI_COMM_WORLD_SIZE, PMI_SIZE, ...), or 0 when none did;
 * *variable names the variable. */
int team_launched_size(const char **variable);

/* Joins the run: under a launcher, initialises MPI and takes the rank;
 * else a team of one. Built without MPI and started as one of several
 * ranks, it says so and exits (2) instead of training as many independent
 * copies. */
void team_join(team *t);

/* Leaves MPI (after every rank's last collective). */
void team_leave(team *t);

/* Every rank's verdict: ok, or not with a message. When a rank failed,
 * every rank gets the lowest one's number and message (into message, of
 * size bytes) and a return of that rank; -1 when all are ok. Collective. */
int team_agree(team *t, bool ok, char *message, size_t size);

/* Whether flag is set on any rank. Collective. */
bool team_any(team *t, bool flag);

/* The end of a rank that failed alone while the others may be waiting for
 * it in a collective: MPI_Abort(code), which ends every rank (mpirun
 * reports the rank); exit(code) for a team of one. */
void team_abort(team *t, int code) __attribute__((noreturn));

#endif
