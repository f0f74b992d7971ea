/* threadpool.c — see threadpool.h.
 *
 * A training step runs thousands of short parallel ops; waking a sleeping
 * thread through the kernel for each costs tens of microseconds. So both
 * sides spin briefly first: a worker that finished a job watches for the
 * next one, and the caller watches for the workers to finish, for about
 * SPIN_ROUNDS pause instructions, before they block on the condition
 * variables. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cpu/threadpool.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield")
#else
#define cpu_relax() ((void)0)
#endif

/* About 50-100 microseconds of pause instructions. */
#define SPIN_ROUNDS 4000

struct kv_pool {
    int threads;
    pthread_t *workers;
    int started;

    pthread_mutex_t lock;
    pthread_cond_t wake;     /* a new job (or shutdown) was posted */
    pthread_cond_t finished; /* the last worker left the current job */
    atomic_ulong generation; /* written under lock, read by spinning workers */
    atomic_bool shutdown;

    /* The current job. */
    kv_task_fn fn;
    void *arg;
    int ntasks;
    atomic_int next_task;
    atomic_int busy_workers;
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

/* Waits for a job newer than seen: spinning first, then asleep. */
static unsigned long wait_for_job(kv_pool *pool, unsigned long seen)
{
    for (int i = 0; i < SPIN_ROUNDS; i++) {
        unsigned long g = atomic_load_explicit(&pool->generation, memory_order_acquire);
        if (g != seen || atomic_load(&pool->shutdown))
            return g;
        cpu_relax();
    }
    pthread_mutex_lock(&pool->lock);
    while (!atomic_load(&pool->shutdown) && atomic_load(&pool->generation) == seen)
        pthread_cond_wait(&pool->wake, &pool->lock);
    unsigned long g = atomic_load(&pool->generation);
    pthread_mutex_unlock(&pool->lock);
    return g;
}

static void *worker_main(void *p)
{
    worker_start *start = p;
    kv_pool *pool = start->pool;
    int index = start->index;
    free(start);

    unsigned long seen = 0;
    for (;;) {
        seen = wait_for_job(pool, seen);
        if (atomic_load(&pool->shutdown))
            break;
        run_tasks(pool, index);
        if (atomic_fetch_sub(&pool->busy_workers, 1) == 1) {
            /* the lock orders this signal after the caller's check */
            pthread_mutex_lock(&pool->lock);
            pthread_cond_signal(&pool->finished);
            pthread_mutex_unlock(&pool->lock);
        }
    }
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
    atomic_init(&pool->busy_workers, 0);
    atomic_init(&pool->generation, 0);
    atomic_init(&pool->shutdown, false);
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
    atomic_store(&pool->busy_workers, pool->started);
    /* release: a worker that sees the new generation sees the job too */
    atomic_fetch_add_explicit(&pool->generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->lock);

    run_tasks(pool, 0);

    for (int i = 0; i < SPIN_ROUNDS && atomic_load(&pool->busy_workers) > 0; i++)
        cpu_relax();
    if (atomic_load(&pool->busy_workers) > 0) {
        pthread_mutex_lock(&pool->lock);
        while (atomic_load(&pool->busy_workers) > 0)
            pthread_cond_wait(&pool->finished, &pool->lock);
        pthread_mutex_unlock(&pool->lock);
    }
}

void kv_pool_run_sized(kv_pool *pool, int ntasks, kv_task_fn fn, void *arg, size_t values)
{
    if (values < KV_POOL_INLINE_VALUES) {
        for (int t = 0; t < ntasks; t++)
            fn(arg, t, 0);
        return;
    }
    kv_pool_run(pool, ntasks, fn, arg);
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
    atomic_store(&pool->shutdown, true);
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
