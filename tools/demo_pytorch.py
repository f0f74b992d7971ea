#!/usr/bin/env python3
"""The `make demo` run in PyTorch: the same model config (small), the same
procedural images in the same order, the same loss (L1 summed per image +
1e-6 KL, posterior sample, no LPIPS, GAN off), the same Adam (lr 3e-4,
betas 0.5/0.9) and the same held-out PSNR. It shows that the demo's learning
curve is the recipe's own. Weights start from diffusers' initialisation, not
libklvae's, so the curves agree in trend, not bit for bit.

    make build/dump_procedural && python3 tools/demo_pytorch.py [--steps 500]
Needs: pip install torch diffusers numpy
"""
import argparse
import os
import subprocess
import tempfile
import time

import numpy as np
import torch
from diffusers import AutoencoderKL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def psnr(vae, images):
    with torch.no_grad():
        rec = vae.decode(vae.encode(images).latent_dist.mean).sample
    a = ((images * 0.5 + 0.5).clamp(0, 1) * 255).round()
    b = ((rec * 0.5 + 0.5).clamp(0, 1) * 255).round()
    mse = ((a - b) / 255).pow(2).mean(dim=(1, 2, 3))
    return (10 * torch.log10(1 / mse)).mean().item()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        train_path, eval_path = os.path.join(tmp, "train.f32"), os.path.join(tmp, "eval.f32")
        subprocess.run([os.path.join(ROOT, "build", "dump_procedural"), "0", str(a.size),
                        str(a.steps * a.batch), "8", train_path, eval_path], check=True)
        shape = (-1, 3, a.size, a.size)
        train = torch.from_numpy(np.fromfile(train_path, dtype=np.float32).reshape(shape))
        held_out = torch.from_numpy(np.fromfile(eval_path, dtype=np.float32).reshape(shape))
    vae = AutoencoderKL(block_out_channels=[32, 64, 128, 128], layers_per_block=1,
                        norm_num_groups=16, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4)
    opt = torch.optim.Adam(vae.parameters(), lr=3e-4, betas=(0.5, 0.9), eps=1e-8)
    print("step 0: held-out PSNR %.2f dB" % psnr(vae, held_out), flush=True)
    t0 = time.time()
    for step in range(a.steps):
        x = train[step * a.batch:(step + 1) * a.batch]
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample()).sample
        loss = (x - rec).abs().sum() / a.batch + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == a.steps:
            print("step %d: held-out PSNR %.2f dB (%.3f s/step)"
                  % (step + 1, psnr(vae, held_out), (time.time() - t0) / (step + 1)), flush=True)


if __name__ == "__main__":
    main()
