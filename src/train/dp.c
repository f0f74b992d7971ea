/* dp.c — see dp.h. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/plugin.h"
#include "train/dp.h"

/* The most elements one callback gets (klvae.h promises 2^28), so that a
 * program's int counts (MPI's) never overflow. */
#define KV_DP_CHUNK ((size_t)1 << 28)
#define KV_DP_MESSAGE 1024

typedef struct kv_dp_grad_ref {
    const void *data;
    size_t index;
} kv_dp_grad_ref;

static klvae_status_t comm_failed(const char *call, int rc, const char *what)
{
    return kv_error(KLVAE_ERR_COMM,
                    "the communicator's %s failed (returned %d) with %s; the other ranks may "
                    "be waiting: abort the run",
                    call, rc, what);
}

static klvae_status_t sum_chunked(kv_dp *dp, void *data, size_t count, klvae_comm_type_t type,
                                  const char *what)
{
    const size_t size = type == KLVAE_COMM_FLOAT64 ? sizeof(double) : sizeof(float);
    for (size_t at = 0; at < count; at += KV_DP_CHUNK) {
        int rc = dp->comm.allreduce_sum(dp->comm.ctx, (char *)data + at * size,
                                        KV_MIN(KV_DP_CHUNK, count - at), type);
        if (rc != 0)
            return comm_failed("allreduce_sum", rc, what);
    }
    return KLVAE_OK;
}

klvae_status_t kv_dp_sum(kv_dp *dp, double *values, size_t count, const char *what)
{
    return sum_chunked(dp, values, count, KLVAE_COMM_FLOAT64, what);
}

static klvae_status_t broadcast_from(kv_dp *dp, void *data, size_t bytes, int root,
                                     const char *what)
{
    const size_t chunk = KV_DP_CHUNK * sizeof(float);
    for (size_t at = 0; at < bytes; at += chunk) {
        int rc = dp->comm.broadcast(dp->comm.ctx, (char *)data + at, KV_MIN(chunk, bytes - at),
                                    root);
        if (rc != 0)
            return comm_failed("broadcast", rc, what);
    }
    return KLVAE_OK;
}

klvae_status_t kv_dp_broadcast(kv_dp *dp, void *data, size_t bytes, const char *what)
{
    return broadcast_from(dp, data, bytes, 0, what);
}

/* A host buffer of at least floats floats (dp->staging). */
static klvae_status_t staging(kv_dp *dp, size_t floats)
{
    if (floats <= dp->staging_floats)
        return KLVAE_OK;
    float *grown = realloc(dp->staging, floats * sizeof *grown);
    if (!grown)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory summing gradients over the ranks");
    dp->staging = grown;
    dp->staging_floats = floats;
    return KLVAE_OK;
}

klvae_status_t kv_dp_sum_tensor(kv_dp *dp, kv_tensor *t, const char *what)
{
    const size_t n = kv_tensor_numel(t);
    klvae_status_t st = staging(dp, n);
    if (st == KLVAE_OK)
        st = dp->be->ops->download(dp->be, dp->staging, t);
    if (st == KLVAE_OK)
        st = sum_chunked(dp, dp->staging, n, KLVAE_COMM_FLOAT32, what);
    if (st == KLVAE_OK)
        st = dp->be->ops->upload(dp->be, t, dp->staging);
    return st;
}

klvae_status_t kv_dp_agree(kv_dp *dp, klvae_status_t mine, const double *facts, int count,
                           int *differs, int *fact)
{
    *differs = -1;
    *fact = -1;
    char message[KV_DP_MESSAGE];
    snprintf(message, sizeof message, "%s", kv_error_message()); /* before any other call */
    const int size = dp->comm.size, slot = 1 + count;
    double *all = calloc((size_t)size * slot, sizeof *all);
    if (!all) /* the others wait for this rank: nothing better to do than fail */
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory agreeing with the other ranks");
    double *own = all + (size_t)dp->comm.rank * slot;
    own[0] = (double)mine;
    for (int i = 0; i < count; i++)
        own[1 + i] = facts[i];
    klvae_status_t st = kv_dp_sum(dp, all, (size_t)size * slot, "the ranks' statuses");
    int failed = -1;
    for (int r = 0; st == KLVAE_OK && r < size && failed < 0; r++)
        if (all[(size_t)r * slot] != 0.0)
            failed = r;
    for (int r = 1; st == KLVAE_OK && failed < 0 && r < size && *differs < 0; r++)
        for (int i = 0; i < count && *differs < 0; i++)
            if (all[(size_t)r * slot + 1 + i] != all[1 + i]) {
                *differs = r;
                *fact = i;
            }
    klvae_status_t theirs = failed >= 0 ? (klvae_status_t)all[(size_t)failed * slot] : KLVAE_OK;
    free(all);
    if (st != KLVAE_OK || failed < 0)
        return st;
    st = broadcast_from(dp, message, sizeof message, failed, "an error message");
    if (st != KLVAE_OK)
        return st;
    message[sizeof message - 1] = '\0';
    if (theirs <= KLVAE_OK || theirs > KV_STATUS_LAST)
        theirs = KLVAE_ERR_INTERNAL;
    return kv_error(theirs, "rank %d: %s", failed, message);
}

/* ---- gradients ---- */

static int compare_refs(const void *a, const void *b)
{
    const char *x = ((const kv_dp_grad_ref *)a)->data, *y = ((const kv_dp_grad_ref *)b)->data;
    return x < y ? -1 : x > y;
}

static void net_free(kv_dp_net *n)
{
    kv_buckets_free(&n->buckets);
    free(n->by_data);
    free(n->launch);
    memset(n, 0, sizeof *n);
}

klvae_status_t kv_dp_net_init(kv_dp *dp, kv_dp_net *n, const char *name, kv_param_set grads,
                              const bool *trained)
{
    net_free(n);
    n->name = name;
    n->grads = grads;
    const size_t count = grads.count ? grads.count : 1;
    size_t *bytes = malloc(count * sizeof *bytes);
    n->by_data = malloc(count * sizeof *n->by_data);
    n->launch = malloc(count * sizeof *n->launch);
    klvae_status_t st = KLVAE_OK;
    if (!bytes || !n->by_data || !n->launch)
        st = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory for the gradient sums");
    for (size_t i = 0; st == KLVAE_OK && i < grads.count; i++) {
        bytes[i] = kv_tensor_numel(grads.params[i].tensor) * sizeof(float);
        n->by_data[i].data = grads.params[i].tensor->data;
        n->by_data[i].index = i;
    }
    if (st == KLVAE_OK) {
        qsort(n->by_data, grads.count, sizeof *n->by_data, compare_refs);
        st = kv_buckets_init(&n->buckets, grads.count, bytes, trained, dp->bucket_bytes);
    }
    free(bytes);
    if (st != KLVAE_OK)
        net_free(n);
    return st;
}

/* Bucket k of n summed over the ranks: queued on the device; in place,
 * tensor by tensor, when the backend's memory is the host's (no copies:
 * on the CPU they would cost more than the extra calls); else through the
 * host, packed into one buffer (one callback per bucket). */
static klvae_status_t launch(kv_dp *dp, kv_dp_net *n, size_t k)
{
    const kv_buckets *b = &n->buckets;
    const size_t first = kv_buckets_first(b, k), count = kv_buckets_size(b, k);
    for (size_t i = 0; i < count; i++)
        n->launch[i] = n->grads.params[b->order[first + i]].tensor;
    if (dp->device)
        return dp->plugin->comm_allreduce(dp->device, n->launch, count);
    char what[96];
    snprintf(what, sizeof what, "%s's gradients", n->name);
    klvae_status_t st = KLVAE_OK;
    if (dp->be->host_memory) {
        for (size_t i = 0; st == KLVAE_OK && i < count; i++)
            st = sum_chunked(dp, n->launch[i]->data, kv_tensor_numel(n->launch[i]),
                             KLVAE_COMM_FLOAT32, what);
        return st;
    }
    size_t floats = 0;
    for (size_t i = 0; i < count; i++)
        floats += kv_tensor_numel(n->launch[i]);
    st = staging(dp, floats);
    size_t at = 0;
    for (size_t i = 0; st == KLVAE_OK && i < count; i++) {
        st = dp->be->ops->download(dp->be, dp->staging + at, n->launch[i]);
        at += kv_tensor_numel(n->launch[i]);
    }
    if (st == KLVAE_OK)
        st = sum_chunked(dp, dp->staging, floats, KLVAE_COMM_FLOAT32, what);
    at = 0;
    for (size_t i = 0; st == KLVAE_OK && i < count; i++) {
        st = dp->be->ops->upload(dp->be, n->launch[i], dp->staging + at);
        at += kv_tensor_numel(n->launch[i]);
    }
    return st;
}

klvae_status_t kv_dp_grads_begin(kv_dp *dp, kv_dp_net *n)
{
    (void)dp;
    kv_buckets_begin(&n->buckets);
    n->armed = true;
    return KLVAE_OK;
}

klvae_status_t kv_dp_grad_written(kv_dp *dp, kv_dp_net *n, const void *data)
{
    if (!n->armed)
        return KLVAE_OK;
    kv_dp_grad_ref key = {data, 0};
    const kv_dp_grad_ref *ref =
        bsearch(&key, n->by_data, n->grads.count, sizeof *n->by_data, compare_refs);
    if (!ref) /* not one of this network's gradients (the adaptive weight's) */
        return KLVAE_OK;
    klvae_status_t st = kv_buckets_written(&n->buckets, ref->index);
    size_t k;
    while (st == KLVAE_OK && kv_buckets_next(&n->buckets, false, &k))
        st = launch(dp, n, k);
    return st;
}

klvae_status_t kv_dp_grads_end(kv_dp *dp, kv_dp_net *n)
{
    n->armed = false;
    klvae_status_t st = KLVAE_OK;
    size_t k;
    while (st == KLVAE_OK && kv_buckets_next(&n->buckets, true, &k))
        st = launch(dp, n, k);
    if (st == KLVAE_OK && dp->device)
        st = dp->plugin->comm_wait(dp->device);
    return st;
}

/* ---- create ---- */

static klvae_status_t check_comm(const klvae_comm_t *c)
{
    const size_t needed = offsetof(klvae_comm_t, broadcast) + sizeof c->broadcast;
    if (!c)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT, "klvae_trainer_set_comm: comm is NULL");
    if (c->struct_size < needed)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "klvae_trainer_set_comm: comm->struct_size is %u; set it to "
                        "sizeof(klvae_comm_t) (%zu)",
                        c->struct_size, sizeof(klvae_comm_t));
    if (c->size < 1 || c->rank < 0 || c->rank >= c->size)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "klvae_trainer_set_comm: rank %d of %d ranks; the size must be at least "
                        "1 and the rank in 0 .. size - 1",
                        c->rank, c->size);
    if (!c->allreduce_sum || !c->broadcast)
        return kv_error(KLVAE_ERR_INVALID_ARGUMENT,
                        "klvae_trainer_set_comm: comm->%s is NULL",
                        !c->allreduce_sum ? "allreduce_sum" : "broadcast");
    return KLVAE_OK;
}

/* The plugin's device communicator, for allreduce auto or nccl. Every
 * rank's backend must have one (a rank on the CPU among GPU ranks: auto
 * sums on the host everywhere), which the ranks agree on first. */
static klvae_status_t make_device_comm(kv_dp *dp, const kv_plugin *plugin, bool required)
{
    const bool mine = kv_plugin_has_comm(plugin);
    if (!mine && required)
        kv_error(KLVAE_ERR_BACKEND_UNAVAILABLE,
                 "allreduce=nccl sums gradients on GPUs: it needs the CUDA backend (%s)",
                 plugin ? "this plugin has no NCCL support" : "the model runs on the CPU");
    int rank, fact;
    const double facts[1] = {mine ? 1.0 : 0.0};
    klvae_status_t st =
        kv_dp_agree(dp, !mine && required ? KLVAE_ERR_BACKEND_UNAVAILABLE : KLVAE_OK, facts, 1,
                    &rank, &fact);
    if (st != KLVAE_OK)
        return st;
    if (rank >= 0 || !mine) { /* not every rank can: the host for all */
        if (required)
            return kv_error(KLVAE_ERR_BACKEND_UNAVAILABLE,
                            "allreduce=nccl: rank %d's model runs on another backend than rank "
                            "0's; NCCL needs every rank on the CUDA backend",
                            rank);
        return KLVAE_OK;
    }
    kv_plugin_comm_host host = {sizeof host,          dp->comm.rank,          dp->comm.size,
                                dp->comm.ctx,         dp->comm.allreduce_sum, dp->comm.broadcast};
    st = plugin->comm_create(dp->be, &host, &dp->device);
    if (st == KLVAE_ERR_BACKEND_UNAVAILABLE && !required) { /* every rank alike: sum on the host */
        kv_error_clear();
        dp->device = NULL;
        return KLVAE_OK;
    }
    if (st == KLVAE_OK)
        dp->plugin = plugin;
    else
        dp->device = NULL;
    return st;
}

klvae_status_t kv_dp_create(const klvae_comm_t *comm, kv_backend *be, double bucket_mb,
                            kv_dp **out)
{
    *out = NULL;
    klvae_status_t st = check_comm(comm);
    if (st != KLVAE_OK)
        return st;
    kv_dp *dp = calloc(1, sizeof *dp);
    if (!dp)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory in klvae_trainer_set_comm");
    memcpy(&dp->comm, comm, KV_MIN((size_t)comm->struct_size, sizeof dp->comm));
    dp->comm.struct_size = sizeof dp->comm;
    dp->be = be;
    dp->bucket_bytes = KV_MAX((size_t)(bucket_mb * 1048576.0), sizeof(float));
    *out = dp;
    return KLVAE_OK;
}

klvae_status_t kv_dp_start_device(kv_dp *dp, const struct kv_plugin *plugin,
                                  const char *allreduce)
{
    if (strcmp(allreduce, "host") == 0)
        return KLVAE_OK;
    return make_device_comm(dp, plugin, strcmp(allreduce, "nccl") == 0);
}

const char *kv_dp_allreduce_name(const kv_dp *dp)
{
    return dp->device ? "nccl" : "host";
}

void kv_dp_free(kv_dp *dp)
{
    if (!dp)
        return;
    if (dp->device)
        dp->plugin->comm_destroy(dp->device);
    net_free(&dp->model);
    net_free(&dp->disc);
    free(dp->staging);
    free(dp);
}
