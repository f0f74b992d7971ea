/* finish.h — the files of a latent dataset folder beside its shards:
 *
 *   manifest.json  {"complete": false, "settings": ...} from the first run
 *                  on; when every part is done, the final record (counts,
 *                  shards, the latents' statistics)
 *   parts/part-IIII-of-NNNN.json   written by part I when its shards are
 *                  all there: the shard names and the files whose header
 *                  could not be read
 *   index.jsonl, errors.jsonl      the merge of every part's shards
 *
 * Every file is written to a temporary name and renamed. All of them
 * depend only on the settings and the images, never on time or threads, so
 * parts that finish together and write the same file write the same bytes. */
#ifndef KV_DATASET_FINISH_H
#define KV_DATASET_FINISH_H

#include "dataset/plan.h"

/* Creates out_dir (its parent must exist) and out_dir/parts. When
 * out_dir/manifest.json exists its settings must equal settings (else
 * KLVAE_ERR_INVALID_ARGUMENT naming the first that differs); else it is
 * written with "complete": false. */
klvae_status_t kv_ds_folder_prepare(const char *out_dir, const json_t *settings);

/* Writes part s->part's record: its shards, its header errors, data and
 * the model's name as given. */
klvae_status_t kv_ds_part_write(const char *out_dir, const kv_ds_settings *s,
                                const kv_ds_plan *plan, const kv_image_files *files,
                                const char *data);

typedef struct kv_ds_stats {
    int channels;
    double *mean, *std; /* per channel, raw latent space */
    double mean_all, std_all, scaling_factor, shift_factor;
    int64_t images, skipped, shards;
} kv_ds_stats;

/* Merges the parts when all are done: reads every part record and shard
 * header, writes index.jsonl, errors.jsonl and the final manifest.json, and
 * fills stats (may be NULL; free with kv_ds_stats_free). *complete says
 * whether every part was done; when one is not, nothing is written and the
 * call succeeds unless require_complete (then KLVAE_ERR_IO naming it).
 * Errors: KLVAE_ERR_IO, KLVAE_ERR_FORMAT (a damaged or foreign file: the
 * message names it), KLVAE_ERR_OUT_OF_MEMORY. */
klvae_status_t kv_ds_finish(const char *out_dir, bool require_complete, bool *complete,
                            kv_ds_stats *stats);
void kv_ds_stats_free(kv_ds_stats *stats);

/* out_dir/parts/part-IIII-of-NNNN.json (newly allocated). */
char *kv_ds_part_path(const char *out_dir, int part, int parts);

#endif
