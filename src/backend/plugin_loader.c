/* plugin_loader.c — finds, loads and checks the CUDA plugin once per process
 * and creates its backend (the search order is in plugin_loader.h). */
#include <dlfcn.h>
#include <limits.h>
#include <link.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend/plugin_loader.h"

#ifndef PATH_MAX
#define PATH_MAX 4096
#endif

#define REASON_CAPACITY 1024

/* ---- the core's services for the plugin ---- */

static klvae_status_t host_set_error(klvae_status_t status, const char *message)
{
    return kv_error(status, "%s", message ? message : "");
}

static const kv_plugin_host host_services = {sizeof(kv_plugin_host), host_set_error};

/* ---- the once-per-process outcome ---- */

static pthread_mutex_t load_lock = PTHREAD_MUTEX_INITIALIZER;
static bool load_done;
static void *load_handle;
static const kv_plugin *load_plugin;
static char load_path[PATH_MAX];
static char load_reason[REASON_CAPACITY];

static void set_reason(const char *fmt, ...) KV_PRINTF(1, 2);

static void set_reason(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(load_reason, sizeof load_reason, fmt, ap);
    va_end(ap);
}

static bool file_exists(const char *path)
{
    return access(path, F_OK) == 0;
}

/* Folder part of path into dir (without the trailing '/'); "." when path
 * has none. */
static void dir_of(const char *path, char *dir, size_t size)
{
    const char *slash = strrchr(path, '/');
    if (!slash)
        snprintf(dir, size, ".");
    else if (slash == path)
        snprintf(dir, size, "/");
    else
        snprintf(dir, size, "%.*s", (int)(slash - path), path);
}

/* Whether snprintf's result n fitted a buffer of size bytes. */
static bool fits(int n, size_t size)
{
    return n >= 0 && (size_t)n < size;
}

/* The candidate files of step 2 (see plugin_loader.h): up to two. */
static int beside_core(char candidates[2][PATH_MAX])
{
    Dl_info info;
    struct link_map *map = NULL;
    memset(&info, 0, sizeof info);
    if (!dladdr1((void *)kv_plugin_load, &info, (void **)&map, RTLD_DL_LINKMAP))
        return 0;
    char object[PATH_MAX], resolved[PATH_MAX], dir[PATH_MAX];
    bool executable = map && map->l_name && map->l_name[0] == '\0';
    if (executable) {
        /* the static library inside a program: dli_fname is argv[0] */
        ssize_t n = readlink("/proc/self/exe", object, sizeof object - 1);
        if (n <= 0)
            return 0;
        object[n] = '\0';
    } else {
        if (!info.dli_fname || !*info.dli_fname)
            return 0;
        snprintf(object, sizeof object, "%s", info.dli_fname);
        if (realpath(object, resolved))
            snprintf(object, sizeof object, "%s", resolved);
    }
    dir_of(object, dir, sizeof dir);
    if (strcmp(dir, "/") == 0)
        dir[0] = '\0';
    int count = 0;
    if (fits(snprintf(candidates[count], PATH_MAX, "%s/" KV_PLUGIN_FILE, dir), PATH_MAX))
        count++;
    char lib[PATH_MAX];
    if (executable && fits(snprintf(lib, sizeof lib, "%s/../lib", dir), sizeof lib)) {
        if (realpath(lib, resolved))
            snprintf(lib, sizeof lib, "%s", resolved);
        if (fits(snprintf(candidates[count], PATH_MAX, "%s/" KV_PLUGIN_FILE, lib), PATH_MAX))
            count++;
    }
    return count;
}

/* Checks the table and the entry point of an opened plugin; false with the
 * reason set. */
static bool check_plugin(void *handle, const char *path, const kv_plugin **out)
{
    dlerror();
    void *symbol = dlsym(handle, KV_PLUGIN_ENTRY_NAME);
    if (!symbol) {
        set_reason("CUDA plugin %s: no entry point " KV_PLUGIN_ENTRY_NAME
                   " (it is not a libklvae plugin)",
                   path);
        return false;
    }
    kv_plugin_entry_fn entry;
    memcpy(&entry, &symbol, sizeof entry);
    const kv_plugin *p = entry();
    if (!p) {
        set_reason("CUDA plugin %s: its entry point " KV_PLUGIN_ENTRY_NAME " returned no table",
                   path);
        return false;
    }
    if (p->abi_version != KV_PLUGIN_ABI_VERSION) {
        set_reason("CUDA plugin %s: ABI version %u, this libklvae needs %d (version mismatch: "
                   "use the plugin built with this libklvae)",
                   path, (unsigned)p->abi_version, KV_PLUGIN_ABI_VERSION);
        return false;
    }
    if (p->struct_size < sizeof(kv_plugin)) {
        set_reason("CUDA plugin %s: its table has %u bytes, this libklvae needs at least %zu "
                   "(version mismatch)",
                   path, (unsigned)p->struct_size, sizeof(kv_plugin));
        return false;
    }
    if (!p->name || strcmp(p->name, "cuda") != 0) {
        set_reason("CUDA plugin %s: it is a plugin for backend '%s', not 'cuda'", path,
                   p->name ? p->name : "(null)");
        return false;
    }
    const char *missing = !p->probe         ? "probe"
                          : !p->create      ? "create"
                          : !p->set_stream  ? "set_stream"
                          : !p->synchronize ? "synchronize"
                          : !p->import_device ? "import_device"
                          : !p->export_device ? "export_device"
                                            : NULL;
    if (missing) {
        set_reason("CUDA plugin %s: its table lacks the function %s", path, missing);
        return false;
    }
    *out = p;
    return true;
}

/* Keeps an opened plugin when it checks out; else sets the reason and
 * closes it. shown is the name for messages when the linker cannot say. */
static bool adopt_plugin(void *handle, const char *shown)
{
    char where[PATH_MAX];
    snprintf(where, sizeof where, "%s", shown);
    struct link_map *map = NULL;
    if (dlinfo(handle, RTLD_DI_LINKMAP, &map) == 0 && map && map->l_name && map->l_name[0])
        snprintf(where, sizeof where, "%s", map->l_name);
    const kv_plugin *p = NULL;
    if (!check_plugin(handle, where, &p)) {
        dlclose(handle);
        return false;
    }
    load_handle = handle;
    load_plugin = p;
    snprintf(load_path, sizeof load_path, "%s", where);
    return true;
}

/* Opens a file given by a path (with a '/') and checks it. */
static bool open_plugin(const char *path, const char *shown)
{
    dlerror();
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        const char *why = dlerror();
        set_reason("CUDA plugin %s: cannot load it: %s", shown, why ? why : "unknown dlopen error");
        return false;
    }
    return adopt_plugin(handle, shown);
}

/* Whether the NVIDIA driver's library loads; otherwise the reason names the
 * plugin that was found and left unloaded. A plugin found beside the core
 * (where make install puts both) is loaded only where a driver is, since
 * loading it maps cuDNN and cuBLAS (about 150 MB of memory) just for its
 * probe to find no driver; one named by KLVAE_CUDA_PLUGIN is loaded as
 * asked, and one only the dynamic linker finds must be loaded to be found. */
static bool driver_present(const char *plugin)
{
    dlerror();
    void *driver = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
    if (driver) {
        dlclose(driver);
        return true;
    }
    const char *why = dlerror();
    set_reason("CUDA plugin %s: no CUDA driver (libcuda.so.1 is not installed or does not load: "
               "%s); the plugin was not loaded",
               plugin, why ? why : "unknown dlopen error");
    return false;
}

static void load_once(void)
{
    const char *env = getenv("KLVAE_CUDA_PLUGIN");
    if (env && *env) {
        char path[PATH_MAX];
        /* a path, never a name for the linker's search */
        snprintf(path, sizeof path, "%s%s", strchr(env, '/') ? "" : "./", env);
        if (!file_exists(path)) {
            set_reason("CUDA plugin not found: KLVAE_CUDA_PLUGIN is %s, which does not exist", env);
            return;
        }
        open_plugin(path, env);
        return;
    }
    char candidates[2][PATH_MAX];
    int count = beside_core(candidates);
    for (int i = 0; i < count; i++)
        if (file_exists(candidates[i])) {
            if (driver_present(candidates[i]))
                open_plugin(candidates[i], candidates[i]);
            return;
        }
    /* the dynamic linker's search (loaded to learn whether it is there) */
    dlerror();
    void *handle = dlopen(KV_PLUGIN_FILE, RTLD_NOW | RTLD_LOCAL);
    if (handle) {
        adopt_plugin(handle, KV_PLUGIN_FILE);
        return;
    }
    const char *why = dlerror();
    if (why && strncmp(why, KV_PLUGIN_FILE ": cannot open shared object file",
                       strlen(KV_PLUGIN_FILE ": cannot open shared object file")) != 0) {
        /* found, but it or a library it needs would not load */
        set_reason("CUDA plugin " KV_PLUGIN_FILE ": cannot load it: %s", why);
        return;
    }
    char looked[REASON_CAPACITY] = "";
    size_t used = 0;
    for (int i = 0; i < count && used < sizeof looked; i++) {
        int n = snprintf(looked + used, sizeof looked - used, "%s, ", candidates[i]);
        if (n > 0)
            used += (size_t)n;
    }
    set_reason("CUDA plugin not found (looked in: %sthe dynamic linker's search path for "
               KV_PLUGIN_FILE "; set KLVAE_CUDA_PLUGIN to its path)",
               looked);
}

klvae_status_t kv_plugin_load(const kv_plugin **plugin, const char **path)
{
    pthread_mutex_lock(&load_lock);
    if (!load_done) {
        load_once();
        load_done = true;
    }
    const kv_plugin *p = load_plugin;
    klvae_status_t st = p ? KLVAE_OK : kv_error(KLVAE_ERR_BACKEND_UNAVAILABLE, "%s", load_reason);
    pthread_mutex_unlock(&load_lock);
    *plugin = p;
    if (path)
        *path = p ? load_path : NULL; /* fixed once loaded */
    return st;
}

void kv_plugin_reset_for_tests(void)
{
    pthread_mutex_lock(&load_lock);
    if (load_handle)
        dlclose(load_handle);
    load_handle = NULL;
    load_plugin = NULL;
    load_path[0] = '\0';
    load_reason[0] = '\0';
    load_done = false;
    pthread_mutex_unlock(&load_lock);
}

/* ---- the backend ---- */

/* A valid error status of a plugin call, or KLVAE_ERR_BACKEND. */
static klvae_status_t plugin_status(klvae_status_t st)
{
    return st > KLVAE_OK && st <= KV_STATUS_LAST ? st : KLVAE_ERR_BACKEND;
}

klvae_status_t kv_cuda_backend_create(const kv_backend_settings *settings, kv_backend **out,
                                      const kv_plugin **plugin)
{
    *out = NULL;
    *plugin = NULL;
    const kv_plugin *p = NULL;
    const char *path = NULL;
    klvae_status_t st = kv_plugin_load(&p, &path);
    if (st != KLVAE_OK)
        return st;
    char message[REASON_CAPACITY];

    kv_error_clear();
    st = p->probe(&host_services, settings->device);
    if (st != KLVAE_OK) {
        snprintf(message, sizeof message, "%s", kv_error_message());
        return kv_error(KLVAE_ERR_BACKEND_UNAVAILABLE, "CUDA plugin %s: %s", path,
                        *message ? message : "its probe gave no reason");
    }

    kv_plugin_settings ps;
    memset(&ps, 0, sizeof ps);
    ps.struct_size = sizeof ps;
    ps.device = settings->device;
    ps.precision = settings->precision;
    kv_backend *be = NULL;
    kv_error_clear();
    st = p->create(&host_services, &ps, &be);
    if (st != KLVAE_OK) {
        snprintf(message, sizeof message, "%s", kv_error_message());
        return kv_error(plugin_status(st), "CUDA plugin %s: cannot create the backend on device "
                                           "%d: %s",
                        path, settings->device, *message ? message : "it gave no reason");
    }
    if (!be || !be->ops)
        return kv_error(KLVAE_ERR_BACKEND_UNAVAILABLE,
                        "CUDA plugin %s: create succeeded but returned no backend", path);
    /* The memory functions and every inference op must be there; training
     * ops may be NULL (the trainer asks for them before it starts). */
    const kv_backend_ops *ops = be->ops;
    const char *missing = !ops->destroy    ? "destroy"
                          : !ops->alloc    ? "alloc"
                          : !ops->release  ? "release"
                          : !ops->trim     ? "trim"
                          : !ops->upload   ? "upload"
                          : !ops->download ? "download"
                                           : kv_backend_missing_op(be, KV_OP_INFERENCE);
    if (missing) {
        if (ops->destroy)
            ops->destroy(be);
        return kv_error(KLVAE_ERR_BACKEND_UNAVAILABLE,
                        "CUDA plugin %s: its backend lacks the op %s, which inference needs",
                        path, missing);
    }
    kv_error_clear();
    *out = be;
    *plugin = p;
    return KLVAE_OK;
}
