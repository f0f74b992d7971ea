/* plugin_loader.h — finding, loading and checking the CUDA plugin
 * (src/backend/plugin_loader.c), and creating its backend.
 *
 * The plugin is looked for once per process, on the first request for
 * backend "cuda" or "auto", in this order:
 *
 *   1. the file named by the environment variable KLVAE_CUDA_PLUGIN, when it
 *      is set and not empty — and then only there (a missing file is an
 *      error, not a reason to look elsewhere);
 *   2. KV_PLUGIN_FILE in the folder of the object that holds libklvae's
 *      code: the folder of libklvae.so (found with dladdr), or, when the
 *      static library is linked into a program, the program's folder
 *      (/proc/self/exe) and then ../lib next to it (the bin/ + lib/ layout
 *      of this tree and of make install) — loaded only when the NVIDIA
 *      driver's libcuda.so.1 loads, else the search stops with "no CUDA
 *      driver" (loading the plugin maps cuDNN and cuBLAS, ~150 MB, for
 *      nothing on a machine without a driver);
 *   3. KV_PLUGIN_FILE through the dynamic linker's own search (LD_LIBRARY_PATH,
 *      the RUNPATH of libklvae.so, /etc/ld.so.cache, the system folders).
 *
 * The first file that exists is the one used: if it cannot be loaded, or is
 * not a usable plugin, the search stops there with that reason (a broken
 * install is reported, not skipped). It is opened with
 * dlopen(RTLD_NOW | RTLD_LOCAL), its KV_PLUGIN_ENTRY_NAME is called and the
 * table checked (ABI version, size, name "cuda", every function present).
 * A plugin that passes stays loaded for the life of the process; one that
 * fails is closed again. The outcome, plugin or reason, is kept: later
 * requests get the same answer without looking again (KLVAE_CUDA_PLUGIN is
 * read once). */
#ifndef KV_PLUGIN_LOADER_H
#define KV_PLUGIN_LOADER_H

#include "backend/plugin.h"

/* The file name the search looks for in folders 2 and 3 above. */
#define KV_PLUGIN_FILE "libklvae_cuda.so"

/* The loaded plugin and the path of its file (valid for the process), or
 * KLVAE_ERR_BACKEND_UNAVAILABLE with the reason, which names the file(s)
 * tried and why: "CUDA plugin not found (looked in: ...)", "CUDA plugin
 * PATH: cannot load: <dlerror>", "... no entry point klvae_plugin_entry",
 * "... ABI version 7, this libklvae needs 1 (version mismatch ...)". path may
 * be NULL. Thread-safe. */
klvae_status_t kv_plugin_load(const kv_plugin **plugin, const char **path);

/* Loads the plugin (kv_plugin_load), probes settings->device and creates
 * its backend. On success *plugin is the plugin. Errors (the message has no
 * "backend 'cuda' is unavailable" prefix; kv_backend_create adds it):
 * KLVAE_ERR_BACKEND_UNAVAILABLE (not loadable, probe failed, the backend
 * lacks an op), or what the plugin's create returned
 * (KLVAE_ERR_BACKEND_UNAVAILABLE, KLVAE_ERR_OUT_OF_MEMORY, KLVAE_ERR_BACKEND). */
klvae_status_t kv_cuda_backend_create(const kv_backend_settings *settings, kv_backend **out,
                                      const kv_plugin **plugin);

/* For the test suite only: closes a loaded plugin and forgets the outcome,
 * so that the next request looks again (reading KLVAE_CUDA_PLUGIN again).
 * No backend of the plugin may still exist. */
void kv_plugin_reset_for_tests(void);

#endif
