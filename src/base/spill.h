/* spill.h — host memory for large blocks, and the spill file: a temporary
 * file that holds blocks when memory cannot, mapped into memory a window
 * at a time.
 *
 * The file is created without a name (O_TMPFILE, else a name that is
 * removed at once), so it disappears when it is closed, however the
 * process ends. Its space is reserved with fallocate before a block is
 * used, so a full disk is an error (KLVAE_ERR_IO naming the folder), never
 * a SIGBUS on a mapped page; freed blocks are reused, so the file grows to
 * the largest amount held at once. */
#ifndef KV_SPILL_H
#define KV_SPILL_H

#include "base/common.h"

/* Page-aligned host memory of at least bytes, from mmap, so that freeing
 * returns it to the system at once (the resident size follows what is
 * live). NULL with kv_error set when there is none. */
void *kv_host_block_alloc(size_t bytes);
void kv_host_block_free(void *block, size_t bytes);

typedef struct kv_spill kv_spill;

/* Creates the spill file in folder dir. KLVAE_ERR_IO naming dir and the
 * OS's reason when it cannot. */
klvae_status_t kv_spill_open(const char *dir, kv_spill **out);
/* Closes (and so removes) the file; NULL is a no-op. */
void kv_spill_close(kv_spill *s);

/* A block of bytes in the file, its space reserved: *offset. */
klvae_status_t kv_spill_alloc(kv_spill *s, size_t bytes, uint64_t *offset);
void kv_spill_free(kv_spill *s, uint64_t offset, size_t bytes);

/* Maps the block at offset (from kv_spill_alloc) for reading and writing;
 * what is written reaches the file. Unmap it when done. */
klvae_status_t kv_spill_map(kv_spill *s, uint64_t offset, size_t bytes, void **ptr);
void kv_spill_unmap(void *ptr, size_t bytes);

/* The most bytes the file held at once, and its folder. */
uint64_t kv_spill_peak(const kv_spill *s);
const char *kv_spill_dir(const kv_spill *s);

#endif /* KV_SPILL_H */
