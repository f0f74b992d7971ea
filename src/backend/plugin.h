/* plugin.h — the contract between libklvae.so and a backend plugin
 * (libklvae_cuda.so), which the core loads with dlopen on first use.
 *
 * The plugin exports one symbol, KV_PLUGIN_ENTRY_NAME, a function returning
 * its kv_plugin table. The core checks abi_version before it touches
 * anything else: the table, kv_backend_ops, kv_tensor and every struct in
 * src/backend/backend.h are the ABI, and any change to them increments
 * KV_PLUGIN_ABI_VERSION (a plugin built against another version is refused
 * with KLVAE_ERR_BACKEND_UNAVAILABLE, "version mismatch").
 *
 * The plugin never links libklvae.so (the core exports only klvae_*): what
 * it needs from the core comes in kv_plugin_host, passed to every call. */
#ifndef KV_PLUGIN_H
#define KV_PLUGIN_H

#include "backend/backend.h"

#define KV_PLUGIN_ABI_VERSION 5
#define KV_PLUGIN_ENTRY_NAME "klvae_plugin_entry"

/* Services of the core for the plugin. */
typedef struct kv_plugin_host {
    uint32_t struct_size;
    /* Records the calling thread's error message (what klvae_last_error
     * returns) and returns status. */
    klvae_status_t (*set_error)(klvae_status_t status, const char *message);
} kv_plugin_host;

/* kv_precision (option precision) is declared in backend.h, which the core's
 * kv_backend_settings also uses. */
typedef struct kv_plugin_settings {
    uint32_t struct_size;
    int device;             /* GPU index (option device) */
    kv_precision precision;
} kv_plugin_settings;

/* Data-parallel training (ABI 4): what the plugin needs of the program's
 * communicator to bootstrap its own (NCCL): the ranks and a broadcast in
 * host memory, the callback of klvae_comm_t. */
typedef struct kv_plugin_comm_host {
    uint32_t struct_size;
    int rank, size;
    void *ctx;
    int (*allreduce_sum)(void *ctx, void *data, size_t count, klvae_comm_type_t type);
    int (*broadcast)(void *ctx, void *data, size_t bytes, int root);
} kv_plugin_comm_host;

/* A plugin's device communicator (opaque to the core). */
struct kv_device_comm;

typedef struct kv_plugin {
    uint32_t abi_version; /* KV_PLUGIN_ABI_VERSION of the plugin's build */
    uint32_t struct_size; /* sizeof(kv_plugin) of the plugin's build */
    const char *name;     /* "cuda" */
    const char *version;  /* the plugin's libklvae version, e.g. "0.1.0" */

    /* Whether a driver and a device are usable, without creating anything:
     * KLVAE_OK, or KLVAE_ERR_BACKEND_UNAVAILABLE with the reason ("no CUDA
     * driver", "no CUDA device", "device 3 does not exist (2 devices)",
     * "driver too old for this plugin") set through host. */
    klvae_status_t (*probe)(const kv_plugin_host *host, int device);

    /* Creates a backend on the device. Errors: KLVAE_ERR_BACKEND_UNAVAILABLE
     * (as probe), KLVAE_ERR_OUT_OF_MEMORY, KLVAE_ERR_BACKEND. */
    klvae_status_t (*create)(const kv_plugin_host *host, const kv_plugin_settings *settings,
                             kv_backend **out);

    /* Runs the backend's following work on the caller's stream (a
     * cudaStream_t as void *; NULL: the backend's own stream), after the
     * work queued on the old one. All or nothing: on failure the backend
     * stays on its old stream. Used by the klvae_*_device entry points. */
    klvae_status_t (*set_stream)(kv_backend *be, void *stream);
    /* Waits until the backend's work on its current stream is done. */
    klvae_status_t (*synchronize)(kv_backend *be);

    /* For the klvae_*_device entry points: dst (a tensor of this backend) =
     * the numel(dst) float32 values, NCHW order, of the caller's device
     * array src; export_device the other way. Queued on the current stream
     * (no wait), converting to and from the backend's storage format, so
     * that the ops only ever see the backend's own tensors. */
    klvae_status_t (*import_device)(kv_backend *be, kv_tensor *dst, const float *src);
    klvae_status_t (*export_device)(kv_backend *be, float *dst, const kv_tensor *src);

    /* ---- ABI 4: data-parallel gradient sums on the device; all four NULL
     * in a plugin without them (the trainer then sums on the host) ---- */

    /* Creates backend be's communicator over comm's ranks (NCCL, loaded
     * with dlopen: KLVAE_NCCL_LIBRARY, else libnccl.so.2): rank 0 makes the
     * unique id and comm->broadcast gives it to every rank. Collective, and
     * every rank returns KLVAE_ERR_BACKEND_UNAVAILABLE when NCCL cannot be
     * loaded on any rank (the message says where and why: the ranks agree
     * through comm->allreduce_sum first). Other errors: KLVAE_ERR_COMM (a
     * callback failed), KLVAE_ERR_BACKEND (NCCL failed). */
    klvae_status_t (*comm_create)(kv_backend *be, const kv_plugin_comm_host *comm,
                                  struct kv_device_comm **out);
    /* Queues the sum over all ranks, in place, of count float32 tensors of
     * be (one gradient bucket): on the communicator's own stream, after the
     * work queued so far on be's stream, so that be's stream goes on with
     * the backward meanwhile. Returns without waiting. Every rank queues
     * tensors of the same sizes in the same order. */
    klvae_status_t (*comm_allreduce)(struct kv_device_comm *c, kv_tensor *const *tensors,
                                     size_t count);
    /* Makes be's stream wait (on the device) for every sum queued so far,
     * and reports an error NCCL found meanwhile. */
    klvae_status_t (*comm_wait)(struct kv_device_comm *c);
    /* Waits for the queued sums and frees c (NULL: nothing). */
    void (*comm_destroy)(struct kv_device_comm *c);
} kv_plugin;

/* Whether plugin p (of struct_size) has the data-parallel functions. */
static inline bool kv_plugin_has_comm(const kv_plugin *p)
{
    return p && p->struct_size >= sizeof(kv_plugin) && p->comm_create && p->comm_allreduce &&
           p->comm_wait && p->comm_destroy;
}

typedef const kv_plugin *(*kv_plugin_entry_fn)(void);

#endif
