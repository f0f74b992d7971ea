/* safetensors.h — reading and writing the safetensors format.
 *
 * Format: 8 bytes little-endian header length N, N bytes of UTF-8 JSON
 * ({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__":
 * {string: string}}), then the data buffer; offsets are relative to its
 * start. kv_st_open validates the whole header before any tensor data is
 * read, and makes no assumption about alignment. */
#ifndef KV_SAFETENSORS_H
#define KV_SAFETENSORS_H

#include "base/common.h"
#include "base/numerics.h"

#define KV_ST_MAX_DIMS 8
#define KV_ST_MAX_HEADER 100000000u /* the reference reader's limit */
/* What a header may need, beyond the format's limit. A real entry is
 * 100-200 bytes and a non-empty tensor holds at least one element: the
 * densest real layout, one-element float32 tensors, needs about 15 header
 * bytes per data byte (SD's VAE needs 0.0001, the test fixtures at most
 * 0.15). So a header may have KV_ST_HEADER_SLACK bytes (room for metadata
 * and thousands of entries) plus KV_ST_HEADER_PER_DATA_BYTE bytes per byte
 * of tensor data, checked before the header is read; and after the parse,
 * KV_ST_HEADER_SLACK plus KV_ST_HEADER_PER_TENSOR bytes per tensor. */
#define KV_ST_HEADER_SLACK 1048576u
#define KV_ST_HEADER_PER_DATA_BYTE 16u
#define KV_ST_HEADER_PER_TENSOR 4096u

typedef struct kv_st_tensor {
    char *name;
    char dtype[12];
    int bits; /* bits per element */
    int ndim;
    int64_t shape[KV_ST_MAX_DIMS];
    uint64_t begin, end; /* byte range in the data buffer */
} kv_st_tensor;

typedef struct kv_st_meta {
    char *key, *value;
} kv_st_meta;

typedef struct kv_safetensors {
    char *path;
    int fd;
    uint64_t file_size, data_start;
    kv_st_tensor *tensors; /* sorted by name */
    size_t count;
    kv_st_meta *metadata;
    size_t metadata_count;
} kv_safetensors;

/* Opens and validates: the file is large enough, the header length fits
 * (the limits above), the header is a JSON object with no name twice, every
 * dtype is known, every byte range matches dtype x shape, lies inside the
 * data buffer and overlaps no other. The cost is linear in the header:
 * it is read once into memory and parsed in place (formats/json_scan.h).
 * tensors and metadata come sorted by name and key.
 * Errors: KLVAE_ERR_IO, KLVAE_ERR_FORMAT, KLVAE_ERR_OUT_OF_MEMORY; the
 * message starts with the path. */
klvae_status_t kv_st_open(const char *path, kv_safetensors *st);
void kv_st_close(kv_safetensors *st);

const kv_st_tensor *kv_st_find(const kv_safetensors *st, const char *name);
/* The tensor named prefixes[p] + name for the first p (of count) that
 * exists, or NULL. */
const kv_st_tensor *kv_st_find_prefixed(const kv_safetensors *st, const char *const *prefixes,
                                        size_t count, const char *name);
const char *kv_st_metadata(const kv_safetensors *st, const char *key);
size_t kv_st_numel(const kv_st_tensor *t);

/* Whether kv_st_read_f32 converts t's dtype (F32, F16, BF16 or F64): a
 * caller that loads several tensors checks them all before reading any. */
bool kv_st_is_float(const kv_st_tensor *t);

/* Reads a F32, F16, BF16 or F64 tensor as float32 into dst (numel floats).
 * Other dtypes: KLVAE_ERR_UNSUPPORTED. */
klvae_status_t kv_st_read_f32(const kv_safetensors *st, const kv_st_tensor *t, float *dst);

/* Writing: float32 tensors fetched one at a time through a callback. */
typedef struct kv_st_entry {
    const char *name;
    int ndim;
    int64_t shape[KV_ST_MAX_DIMS];
} kv_st_entry;

/* Fills dst with the numel values of entry index. */
typedef klvae_status_t (*kv_st_fetch_fn)(void *ctx, size_t index, float *dst);

struct kv_atomic_file;

/* Writes path atomically (temporary file, fsync, rename). metadata is
 * metadata_count key/value pairs (may be 0). With pending non-NULL the file
 * is finished but not renamed: the caller publishes or aborts *pending. */
klvae_status_t kv_st_write(const char *path, const kv_st_entry *entries, size_t count,
                           const kv_st_meta *metadata, size_t metadata_count,
                           kv_st_fetch_fn fetch, void *ctx, struct kv_atomic_file *pending);

/* Writing tensors that are already in memory, of any dtype this file
 * reads (F32, F16, BF16, F64, I32, I64, ...): entry i is data[i], numel x
 * the dtype's size bytes, written as they are (little-endian hosts). */
typedef struct kv_st_raw {
    const char *name;
    const char *dtype;
    int ndim;
    int64_t shape[KV_ST_MAX_DIMS];
    const void *data;
} kv_st_raw;

/* Writes path atomically (temporary file, fsync, rename), the header's keys
 * sorted and the data 8-byte aligned, so the same tensors and metadata give
 * the same bytes. count may be 0 (a file of metadata alone).
 * Errors: KLVAE_ERR_INVALID_ARGUMENT (an unknown dtype), KLVAE_ERR_IO,
 * KLVAE_ERR_OUT_OF_MEMORY; nothing is left at path or beside it on error. */
klvae_status_t kv_st_write_raw(const char *path, const kv_st_raw *tensors, size_t count,
                               const kv_st_meta *metadata, size_t metadata_count);

/* Bits per element of a safetensors dtype name, or 0 when unknown. */
int kv_st_dtype_bits(const char *dtype);

/* IEEE half to float (bfloat16: kv_bf16_to_float, base/numerics.h). */
float kv_half_to_float(uint16_t h);

#endif
