/* threadpool.c — see threadpool.h. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "threadpool.h"

struct kv_pool {
    int threads;
    pthread_t *workers;
    int started;

    pthread_mutex_t lock;
    pthread_cond_t wake;     /* a new job (or shutdown) was posted */
    pthread_cond_t finished; /* the last worker left the current job */
    unsigned long generation;
    bool shutdown;

    /* The current job. */
    kv_task_fn fn;
    void *arg;
    int ntasks;
    atomic_int next_task;
    int busy_workers;
};

typedef struct {
    kv_pool *pool;
    int index;
} worker_start;

static void run_tasks(kv_pool *pool, int thread)
{
    for (;;) {
        int task = atomic_fetch_add(&pool->next_task, 1);
        if (task >= pool->ntasks)
            return;
        pool->fn(pool->arg, task, thread);
    }
}

static void *worker_main(void *p)
{
    worker_start *start = p;
    kv_pool *pool = start->pool;
    int index = start->index;
    free(start);

    unsigned long seen = 0;
    pthread_mutex_lock(&pool->lock);
    for (;;) {
        while (!pool->shutdown && pool->generation == seen)
            pthread_cond_wait(&pool->wake, &pool->lock);
        if (pool->shutdown)
            break;
        seen = pool->generation;
        pthread_mutex_unlock(&pool->lock);

        run_tasks(pool, index);

        pthread_mutex_lock(&pool->lock);
        if (--pool->busy_workers == 0)
            pthread_cond_signal(&pool->finished);
    }
    pthread_mutex_unlock(&pool->lock);
    return NULL;
}

kv_pool *kv_pool_create(int threads)
{
    if (threads < 1)
        threads = 1;
    kv_pool *pool = calloc(1, sizeof *pool);
    if (!pool) {
        kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory creating a thread pool");
        return NULL;
    }
    pool->threads = threads;
    pthread_mutex_init(&pool->lock, NULL);
    pthread_cond_init(&pool->wake, NULL);
    pthread_cond_init(&pool->finished, NULL);
    atomic_init(&pool->next_task, 0);
    if (threads > 1) {
        pool->workers = calloc((size_t)threads - 1, sizeof *pool->workers);
        if (!pool->workers) {
            kv_pool_free(pool);
            kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory creating a thread pool");
            return NULL;
        }
    }
    for (int i = 1; i < threads; i++) {
        worker_start *start = malloc(sizeof *start);
        if (!start) {
            kv_pool_free(pool);
            kv_error(KLVAE_ERR_OUT_OF_MEMORY, "out of memory creating a thread pool");
            return NULL;
        }
        start->pool = pool;
        start->index = i;
        int rc = pthread_create(&pool->workers[i - 1], NULL, worker_main, start);
        if (rc != 0) {
            free(start);
            kv_pool_free(pool);
            kv_error(KLVAE_ERR_OUT_OF_MEMORY, "cannot start worker thread %d of %d: %s", i,
                     threads - 1, strerror(rc));
            return NULL;
        }
        pool->started++;
    }
    return pool;
}

void kv_pool_run(kv_pool *pool, int ntasks, kv_task_fn fn, void *arg)
{
    if (ntasks <= 0)
        return;
    if (pool->started == 0 || ntasks == 1) {
        for (int t = 0; t < ntasks; t++)
            fn(arg, t, 0);
        return;
    }
    pthread_mutex_lock(&pool->lock);
    pool->fn = fn;
    pool->arg = arg;
    pool->ntasks = ntasks;
    atomic_store(&pool->next_task, 0);
    pool->busy_workers = pool->started;
    pool->generation++;
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->lock);

    run_tasks(pool, 0);

    pthread_mutex_lock(&pool->lock);
    while (pool->busy_workers > 0)
        pthread_cond_wait(&pool->finished, &pool->lock);
    pthread_mutex_unlock(&pool->lock);
}

int kv_pool_threads(const kv_pool *pool)
{
    return pool->threads;
}

void kv_pool_free(kv_pool *pool)
{
    if (!pool)
        return;
    pthread_mutex_lock(&pool->lock);
    pool->shutdown = true;
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->lock);
    for (int i = 0; i < pool->started; i++)
        pthread_join(pool->workers[i], NULL);
    pthread_mutex_destroy(&pool->lock);
    pthread_cond_destroy(&pool->wake);
    pthread_cond_destroy(&pool->finished);
    free(pool->workers);
    free(pool);
}
