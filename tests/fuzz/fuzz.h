/* fuzz.h — what the libFuzzer harnesses of tests/fuzz/ share: a scratch
 * folder for the input file, and the invariants every parser keeps. A
 * broken invariant prints what broke and aborts, which libFuzzer reports as
 * a crash with the input that caused it (docs/reliability.md). */
#ifndef KV_FUZZ_H
#define KV_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "klvae.h"

#define FUZZ_CHECK(cond, ...)                                                                   \
    do {                                                                                        \
        if (!(cond)) {                                                                          \
            fprintf(stderr, "fuzz invariant broken (%s:%d): ", __FILE__, __LINE__);             \
            fprintf(stderr, __VA_ARGS__);                                                       \
            fputc('\n', stderr);                                                                \
            abort();                                                                            \
        }                                                                                       \
    } while (0)

/* This process's scratch folder (created on first use, removed at exit). */
const char *fuzz_dir(void);

/* fuzz_dir()/name, in a static buffer per call site's use: copy it if it
 * must outlive the next call. */
const char *fuzz_path(const char *name);

/* Writes data to path (replacing it); aborts if it cannot. */
void fuzz_write(const char *path, const void *data, size_t size);

/* The invariant of every failed call: a status that is a known error (and
 * not KLVAE_ERR_INTERNAL, a bug by definition) and a message that is not
 * empty. */
void fuzz_check_failure(klvae_status_t st, const char *call);

/* Where a harness may write seeds it makes at start-up (a real checkpoint
 * is too large to commit): $KLVAE_FUZZ_SEED_DIR, or NULL. */
const char *fuzz_seed_dir(void);

#endif
