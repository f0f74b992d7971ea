/* trainer.h — what the tests may see of a trainer. */
#ifndef KV_TRAINER_H
#define KV_TRAINER_H

#include "model/model.h"

/* For tests: the gradients of the last step (they stay until the next step
 * zeroes them) and the discriminator. */
struct kv_disc;
const klvae_model_t *kv_trainer_grads(const klvae_trainer_t *t);
const struct kv_disc *kv_trainer_disc(const klvae_trainer_t *t);
const struct kv_disc *kv_trainer_disc_grads(const klvae_trainer_t *t);

#endif /* KV_TRAINER_H */
