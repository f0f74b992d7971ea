/* data_parallel.c — klvae_trainer_set_comm: a trainer joins a data-parallel
 * run (include/klvae.h, "Data-parallel training"). The ranks check that
 * their trainers agree, take rank 0's state, and the trainer's hooks send
 * the backward's gradients to the sums (train/dp.h). The step's side of it
 * is in trainer.c (the global batch's averages, the adaptive weight, the
 * sums at the end of the last micro-batch) and discriminator.c (BatchNorm
 * statistics over the global batch). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "train/trainer_state.h"

/* The model's backward finished a gradient (model.h, grad_written). */
static klvae_status_t model_grad_written(void *ctx, const kv_tensor *grad)
{
    klvae_trainer_t *t = ctx;
    return t->dp ? kv_dp_grad_written(t->dp, &t->dp->model, grad->data) : KLVAE_OK;
}

/* BatchNorm statistics over every rank's batch (discriminator.h). */
static klvae_status_t disc_sum_across(void *ctx, double *values, size_t count)
{
    klvae_trainer_t *t = ctx;
    return kv_dp_sum(t->dp, values, count, "the discriminator's BatchNorm statistics");
}

void kv_trainer_detach_comm(klvae_trainer_t *t)
{
    if (t->m->grad_written == model_grad_written && t->m->grad_written_ctx == t) {
        t->m->grad_written = NULL;
        t->m->grad_written_ctx = NULL;
    }
    t->disc->sum_across = NULL;
    t->disc->sum_across_ctx = NULL;
    kv_dp_free(t->dp);
    t->dp = NULL;
}

/* The first line where a and b differ, as "KEY" (a line is KEY=VALUE), into
 * key; false when they are the same. */
static bool first_difference(const char *a, const char *b, char *key, size_t size)
{
    while (*a || *b) {
        size_t la = strcspn(a, "\n"), lb = strcspn(b, "\n");
        if (la != lb || memcmp(a, b, la) != 0) {
            const char *line = *a ? a : b;
            size_t n = strcspn(line, "=\n");
            snprintf(key, size, "%.*s", (int)KV_MIN(n, size - 1), line);
            return true;
        }
        a += la + (a[la] == '\n');
        b += lb + (b[lb] == '\n');
    }
    return false;
}

/* Every rank's trainer is rank 0's: options (but the machine's), model
 * structure, discriminator. KLVAE_ERR_CONFIG on every rank naming the first
 * rank that differs and what; a rank that could not prepare (so far: mine)
 * is named to all too. */
static klvae_status_t check_identity(klvae_trainer_t *t, kv_dp *dp, klvae_status_t so_far)
{
    char *mine = so_far == KLVAE_OK ? kv_trainer_identity_text(t) : NULL;
    double length = mine ? (double)strlen(mine) + 1 : 0;
    klvae_status_t st = so_far;
    if (st == KLVAE_OK && !mine)
        st = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory in klvae_trainer_set_comm");
    int rank, fact;
    st = kv_dp_agree(dp, st, &length, 0, &rank, &fact); /* everyone can go on */
    if (st == KLVAE_OK)
        st = kv_dp_broadcast(dp, &length, sizeof length, "the trainer's settings");
    char *theirs = st == KLVAE_OK ? malloc((size_t)length) : NULL;
    if (st == KLVAE_OK && !theirs)
        st = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory in klvae_trainer_set_comm");
    if (st == KLVAE_OK && dp->comm.rank == 0)
        memcpy(theirs, mine, (size_t)length);
    /* a rank that cannot take part now leaves the others waiting: say so */
    if (st == KLVAE_OK)
        st = kv_dp_broadcast(dp, theirs, (size_t)length, "the trainer's settings");
    char key[128] = "";
    bool differs = st == KLVAE_OK && first_difference(theirs, mine, key, sizeof key);
    klvae_status_t verdict =
        differs ? kv_error(KLVAE_ERR_CONFIG,
                           "its trainer differs from rank 0's in %s (every rank needs the same "
                           "model and trainer options; backend, device and threads may differ)",
                           key)
                : KLVAE_OK;
    free(mine);
    free(theirs);
    if (st != KLVAE_OK)
        return st;
    return kv_dp_agree(dp, verdict, NULL, 0, &rank, &fact);
}

static klvae_status_t set_comm_unlocked(klvae_trainer_t *t, const klvae_comm_t *comm)
{
    if (!comm) {
        kv_trainer_detach_comm(t);
        return KLVAE_OK;
    }
    kv_dp *dp = NULL;
    klvae_status_t st = kv_dp_create(comm, t->be, t->s.bucket_mb, &dp);
    if (st != KLVAE_OK)
        return st;
    st = kv_dp_net_init(dp, &dp->model, "the autoencoder", t->model_net.grads,
                        t->model_net.trained);
    if (st == KLVAE_OK)
        st = kv_dp_net_init(dp, &dp->disc, "the discriminator", t->disc_net.grads, NULL);
    st = check_identity(t, dp, st);
    if (st == KLVAE_OK) /* every rank asks for the same: checked above */
        st = kv_dp_start_device(dp, t->m->plugin, t->s.allreduce);
    if (st != KLVAE_OK) { /* every rank is as it was */
        kv_dp_free(dp);
        return st;
    }
    kv_trainer_detach_comm(t);
    st = kv_trainer_broadcast_state(t, dp);
    if (st != KLVAE_OK) {
        kv_dp_free(dp);
        return st;
    }
    t->dp = dp;
    t->m->grad_written = model_grad_written;
    t->m->grad_written_ctx = t;
    if (t->s.dp_exact) {
        t->disc->sum_across = disc_sum_across;
        t->disc->sum_across_ctx = t;
    }
    return KLVAE_OK;
}

KLVAE_API klvae_status_t klvae_trainer_set_comm(klvae_trainer_t *t, const klvae_comm_t *comm)
{
    kv_error_clear();
    if (!t)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "klvae_trainer_set_comm: trainer is NULL");
    klvae_status_t st = kv_busy_enter(&t->busy, "klvae_trainer_set_comm");
    if (st != KLVAE_OK)
        return st;
    /* it writes the model's weights: no encode or decode meanwhile */
    st = kv_busy_enter(&t->m->busy, "klvae_trainer_set_comm (its model)");
    if (st == KLVAE_OK)
        st = kv_busy_leave(&t->m->busy, set_comm_unlocked(t, comm));
    return kv_busy_leave(&t->busy, st);
}
