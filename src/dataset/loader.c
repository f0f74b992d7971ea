/* loader.c — see loader.h. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "base/options.h"
#include "dataset/loader.h"
#include "formats/image.h"

typedef struct slot {
    kv_ds_sample sample;
    size_t floats; /* allocated for pixels */
    bool ready;
} slot;

struct kv_ds_loader {
    const kv_ds_settings *s;
    const kv_image_files *files;
    const kv_ds_plan *plan;
    const size_t *jobs;
    size_t njobs;
    int capacity;
    slot *slots;

    pthread_mutex_t lock;
    pthread_cond_t changed; /* a slot became ready or free, or stop */
    size_t next_job;        /* the next job a worker takes */
    size_t consumed;        /* jobs released by the consumer */
    bool stop;
    int nthreads;
    pthread_t *threads;
};

/* The reason of the thread's last error, copied (NULL when out of memory). */
static char *reason_now(void)
{
    const char *m = kv_error_message();
    return strdup(*m ? m : "unreadable");
}

/* Reads and prepares one image into sample (its pixels buffer grown as
 * needed). */
static void prepare(const kv_ds_loader *L, const kv_ds_item *item, slot *sl)
{
    const kv_ds_settings *s = L->s;
    kv_ds_sample *out = &sl->sample;
    out->file = item->file;
    const char *path = L->files->paths[item->file];
    float *src = NULL;
    int h = 0, w = 0;
    klvae_status_t st = kv_image_read("klvae_encode_dataset", path, s->max_pixels, &src, &h, &w);
    if (st == KLVAE_OK && s->use_buckets && (h != item->src_h || w != item->src_w))
        st = kv_error(KLVAE_ERR_FORMAT, "%s: the image is %d x %d, but its header said %d x %d "
                      "when the dataset was planned (did the file change?)",
                      path, h, w, item->src_h, item->src_w);
    if (st == KLVAE_OK) {
        const kv_bucket *b = &s->buckets[item->bucket];
        kv_geometry_cover(h, w, b->h, b->w, &out->geometry);
        if (s->random_crop)
            kv_geometry_random_crop(&out->geometry, s->seed, item->file);
        size_t plane = (size_t)3 * (size_t)b->h * (size_t)b->w;
        size_t need = plane * (s->flip ? 2 : 1);
        if (need > sl->floats) {
            free(out->pixels);
            out->pixels = malloc(need * sizeof *out->pixels);
            sl->floats = out->pixels ? need : 0;
            if (!out->pixels)
                st = kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory preparing %s", path);
        }
        if (st == KLVAE_OK)
            st = kv_geometry_apply(src, &out->geometry, out->pixels);
        if (st == KLVAE_OK && s->flip)
            kv_mirror(out->pixels, 3, b->h, b->w, out->pixels + plane);
    }
    klvae_free(src);
    out->status = st;
    out->error = st == KLVAE_OK ? NULL : reason_now();
}

static void *worker(void *arg)
{
    kv_ds_loader *L = arg;
    pthread_mutex_lock(&L->lock);
    for (;;) {
        while (!L->stop && L->next_job < L->njobs &&
               L->next_job >= L->consumed + (size_t)L->capacity)
            pthread_cond_wait(&L->changed, &L->lock);
        if (L->stop || L->next_job >= L->njobs)
            break;
        size_t job = L->next_job++;
        slot *sl = &L->slots[job % (size_t)L->capacity];
        pthread_mutex_unlock(&L->lock);
        /* the slot is this worker's until it is marked ready */
        prepare(L, &L->plan->items[L->jobs[job]], sl);
        pthread_mutex_lock(&L->lock);
        sl->ready = true;
        pthread_cond_broadcast(&L->changed);
    }
    pthread_mutex_unlock(&L->lock);
    return NULL;
}

void kv_ds_loader_free(kv_ds_loader *L)
{
    if (!L)
        return;
    pthread_mutex_lock(&L->lock);
    L->stop = true;
    pthread_cond_broadcast(&L->changed);
    pthread_mutex_unlock(&L->lock);
    for (int t = 0; t < L->nthreads; t++)
        pthread_join(L->threads[t], NULL);
    for (int i = 0; L->slots && i < L->capacity; i++) {
        free(L->slots[i].sample.pixels);
        free(L->slots[i].sample.error);
    }
    free(L->slots);
    free(L->threads);
    pthread_cond_destroy(&L->changed);
    pthread_mutex_destroy(&L->lock);
    free(L);
}

klvae_status_t kv_ds_loader_create(const kv_ds_settings *s, const kv_image_files *files,
                                   const kv_ds_plan *plan, const size_t *jobs, size_t njobs,
                                   int threads, int capacity, kv_ds_loader **out)
{
    *out = NULL;
    kv_ds_loader *L = calloc(1, sizeof *L);
    if (!L)
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory starting the image loader");
    L->s = s;
    L->files = files;
    L->plan = plan;
    L->jobs = jobs;
    L->njobs = njobs;
    L->capacity = capacity < 1 ? 1 : capacity;
    pthread_mutex_init(&L->lock, NULL);
    pthread_cond_init(&L->changed, NULL);
    L->slots = calloc((size_t)L->capacity, sizeof *L->slots);
    L->threads = calloc((size_t)(threads < 1 ? 1 : threads), sizeof *L->threads);
    for (int t = 0; L->slots && L->threads && t < (threads < 1 ? 1 : threads); t++)
        if (pthread_create(&L->threads[L->nthreads], NULL, worker, L) == 0)
            L->nthreads++;
    if (L->nthreads == 0) {
        kv_ds_loader_free(L);
        return kv_error(KLVAE_ERR_OUT_OF_MEMORY, "cannot start the image loader's threads");
    }
    *out = L;
    return KLVAE_OK;
}

const kv_ds_sample *kv_ds_loader_next(kv_ds_loader *L)
{
    if (L->consumed >= L->njobs)
        return NULL;
    slot *sl = &L->slots[L->consumed % (size_t)L->capacity];
    pthread_mutex_lock(&L->lock);
    while (!sl->ready)
        pthread_cond_wait(&L->changed, &L->lock);
    pthread_mutex_unlock(&L->lock);
    return &sl->sample;
}

void kv_ds_loader_release(kv_ds_loader *L)
{
    slot *sl = &L->slots[L->consumed % (size_t)L->capacity];
    free(sl->sample.error);
    sl->sample.error = NULL;
    pthread_mutex_lock(&L->lock);
    sl->ready = false;
    L->consumed++;
    pthread_cond_broadcast(&L->changed);
    pthread_mutex_unlock(&L->lock);
}
