/* dp.h — data-parallel training: the trainer's side of the program's
 * communicator (klvae_comm_t, include/klvae.h). Sums of host values, the
 * agreement of the ranks at the start of a step, broadcasts, and the
 * gradient sums: by buckets (train/buckets.h), through the communicator's
 * allreduce_sum on the host, or on the GPUs with the CUDA plugin's NCCL
 * communicator (src/backend/plugin.h, cuda/comm.cu). Every function here
 * is a collective: every rank calls it in the same order. */
#ifndef KV_DP_H
#define KV_DP_H

#include "backend/backend.h"
#include "train/buckets.h"
#include "train/param_set.h"

struct kv_plugin;
struct kv_device_comm;

/* One network's gradients as the sums see them. */
typedef struct kv_dp_net {
    const char *name; /* "the autoencoder", "the discriminator": for messages */
    kv_param_set grads;
    kv_buckets buckets;
    struct kv_dp_grad_ref *by_data; /* the gradients by data pointer, sorted */
    kv_tensor **launch;             /* room for one bucket's tensors */
    bool armed;                     /* between kv_dp_grads_begin and kv_dp_grads_end */
} kv_dp_net;

typedef struct kv_dp {
    klvae_comm_t comm; /* the program's, copied */
    kv_backend *be;
    const struct kv_plugin *plugin; /* with device: the plugin that made it */
    struct kv_device_comm *device;  /* NULL: gradients are summed on the host */
    float *staging;                 /* host bucket for host sums */
    size_t staging_floats;
    size_t bucket_bytes;
    kv_dp_net model, disc;
} kv_dp;

/* Checks comm (KLVAE_ERR_INVALID_ARGUMENT naming what is wrong) and makes
 * the trainer's side of it, summing on the host (not a collective). */
klvae_status_t kv_dp_create(const klvae_comm_t *comm, kv_backend *be, double bucket_mb,
                            kv_dp **out);
/* For allreduce (the option: "auto", "host", "nccl"): nccl makes the
 * plugin's device communicator (KLVAE_ERR_BACKEND_UNAVAILABLE when there is
 * none), auto does when the backend is a plugin's that has one and NCCL
 * loads on every rank. Collective. */
klvae_status_t kv_dp_start_device(kv_dp *dp, const struct kv_plugin *plugin,
                                  const char *allreduce);
void kv_dp_free(kv_dp *dp);

/* "nccl" or "host". */
const char *kv_dp_allreduce_name(const kv_dp *dp);

/* values[0 .. count) = their sum over the ranks. what names them for an
 * error (KLVAE_ERR_COMM). */
klvae_status_t kv_dp_sum(kv_dp *dp, double *values, size_t count, const char *what);
/* The same for a tensor of the trainer's backend, through the host. */
klvae_status_t kv_dp_sum_tensor(kv_dp *dp, kv_tensor *t, const char *what);
/* bytes at data: rank 0's on every rank. */
klvae_status_t kv_dp_broadcast(kv_dp *dp, void *data, size_t bytes, const char *what);

/* Every rank's status (mine, with the calling thread's message) and facts
 * (count numbers, 0 .. 8) are shared. When a rank failed, every rank
 * returns the status of the lowest one that did, with its message after
 * "rank R: ". Else KLVAE_OK, and *differs is the lowest rank whose facts
 * are not rank 0's (-1: none), with *fact the first fact that differs. */
klvae_status_t kv_dp_agree(kv_dp *dp, klvae_status_t mine, const double *facts, int count,
                           int *differs, int *fact);

/* The gradient sums of one network (dp->model or dp->disc, made by
 * kv_dp_net_init with its trainer's gradients; trained: which are summed,
 * NULL all). Between begin and end, kv_dp_grad_written reports each
 * gradient the backward has finished (by its data pointer) and launches
 * the buckets it completes; end launches the rest and makes the backend
 * wait for all of them. */
klvae_status_t kv_dp_net_init(kv_dp *dp, kv_dp_net *n, const char *name, kv_param_set grads,
                              const bool *trained);
klvae_status_t kv_dp_grads_begin(kv_dp *dp, kv_dp_net *n);
klvae_status_t kv_dp_grad_written(kv_dp *dp, kv_dp_net *n, const void *data);
klvae_status_t kv_dp_grads_end(kv_dp *dp, kv_dp_net *n);

#endif
