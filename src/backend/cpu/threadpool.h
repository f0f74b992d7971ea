/* threadpool.h — a fixed pool of worker threads that runs "task i of n"
 * functions. The calling thread works too, so a pool of T threads starts
 * T - 1 workers. Tasks are handed out dynamically, but callers split work
 * into tasks that do not depend on the thread count, so results are the same
 * for any number of threads. */
#ifndef KV_THREADPOOL_H
#define KV_THREADPOOL_H

#include "base/common.h"

typedef struct kv_pool kv_pool;

/* fn(arg, task, thread): task in [0, ntasks), thread in [0, threads). */
typedef void (*kv_task_fn)(void *arg, int task, int thread);

/* Starts threads - 1 workers. Returns NULL (with kv_error) on failure. */
kv_pool *kv_pool_create(int threads);

/* Runs fn for every task and returns when all are done. Not reentrant: a
 * task must not call kv_pool_run on the same pool. */
void kv_pool_run(kv_pool *pool, int ntasks, kv_task_fn fn, void *arg);

int kv_pool_threads(const kv_pool *pool);

/* Stops and joins the workers. NULL is a no-op. */
void kv_pool_free(kv_pool *pool);

#endif
