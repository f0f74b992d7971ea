/* selection.c — choosing and creating a backend by name (the CUDA plugin
 * itself is found and loaded in plugin_loader.c). */
#include <stdio.h>
#include <string.h>

#include "backend/plugin_loader.h"

klvae_status_t kv_backend_create(const char *name, const kv_backend_settings *settings,
                                 kv_backend **out, kv_backend_info *info)
{
    *out = NULL;
    if (info) {
        info->plugin = NULL;
        info->reason[0] = '\0';
    }
    if (strcmp(name, "cpu") == 0)
        return kv_cpu_backend_create(settings, out);
    if (strcmp(name, "cuda") != 0 && strcmp(name, "auto") != 0)
        return kv_error(KLVAE_ERR_OPTION, "unknown backend '%s' (expected auto, cpu or cuda)",
                        name);
    const kv_plugin *plugin = NULL;
    klvae_status_t st = kv_cuda_backend_create(settings, out, &plugin);
    if (st == KLVAE_OK) {
        if (info)
            info->plugin = plugin;
        return KLVAE_OK;
    }
    if (strcmp(name, "cuda") == 0)
        return st == KLVAE_ERR_BACKEND_UNAVAILABLE
                   ? kv_error_prefix(st, "backend 'cuda' is unavailable")
                   : st;
    /* auto: the CPU, and why */
    if (info)
        snprintf(info->reason, sizeof info->reason, "%s", kv_error_message());
    kv_error_clear();
    return kv_cpu_backend_create(settings, out);
}

void kv_backend_destroy(kv_backend *be)
{
    if (be)
        be->ops->destroy(be);
}
