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

/* Work below this many values runs on the calling thread alone: waking the
 * workers (a broadcast, and a futex wake for each one asleep) costs more
 * than such an op (tens of microseconds at most). The tasks are the same
 * either way, so the results are too. */
#define KV_POOL_INLINE_VALUES 32768

/* kv_pool_run for work that touches about values values (read plus
 * written): the calling thread alone when that is under
 * KV_POOL_INLINE_VALUES. */
void kv_pool_run_sized(kv_pool *pool, int ntasks, kv_task_fn fn, void *arg, size_t values);

int kv_pool_threads(const kv_pool *pool);

/* Stops and joins the workers. NULL is a no-op. */
void kv_pool_free(kv_pool *pool);

#endif
