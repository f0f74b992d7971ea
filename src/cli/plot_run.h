/* plot_run.h — the loss-curve picture of a training run folder. */
#ifndef KLVAE_PLOT_RUN_H
#define KLVAE_PLOT_RUN_H

/* Reads RUN_DIR/log.csv and RUN_DIR/eval.csv (as `klvae train` writes them)
 * and writes RUN_DIR/loss.png: the reconstruction loss per step with a
 * smoothed curve, the held-out PSNR, the KL term, and the GAN losses once
 * the discriminator is on. Prints a warning and writes nothing when the
 * logs cannot be read; never stops the run. */
void write_loss_plot(const char *run_dir);

#endif
