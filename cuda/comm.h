/* comm.h — the plugin's data-parallel functions (comm.cu), for the plugin
 * table in cuda_backend.cu: kv_plugin's comm_create, comm_allreduce,
 * comm_wait and comm_destroy (src/backend/plugin.h, ABI 4). */
#ifndef KV_CUDA_COMM_H
#define KV_CUDA_COMM_H

#include "backend/plugin.h"

klvae_status_t kv_cuda_comm_create(kv_backend *be, const kv_plugin_comm_host *comm,
                                   struct kv_device_comm **out);
klvae_status_t kv_cuda_comm_allreduce(struct kv_device_comm *c, kv_tensor *const *tensors,
                                      size_t count);
klvae_status_t kv_cuda_comm_wait(struct kv_device_comm *c);
void kv_cuda_comm_destroy(struct kv_device_comm *c);

#endif
