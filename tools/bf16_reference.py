#!/usr/bin/env python3
"""The error bf16 itself costs on the SD autoencoder, measured in PyTorch.

tests/gpu/test_cuda.c holds whole-model bf16 results to a bound derived from
this figure instead of a wish: at most 1.5 times the relative L2 error of
diffusers' AutoencoderKL in bf16 against the same model in fp32, on the same
inputs (design/architecture.md). The inputs are those test_cuda uses: images
uniform in [-1, 1] for encode, latents N(0, 4^2) for decode, the SD config with
PyTorch's default initialisation (klvae_model_create follows it).

    python3 tools/bf16_reference.py [--sizes 64 256] [--seeds 3] [--out tests/gpu/bf16_reference.json]

Writes a small JSON file: for each op and size, the largest error over the
seeds (the bound takes the worst case), and the versions that measured it.
Runs on the CPU (bf16 matrix products there are what PyTorch uses on a GPU,
up to accumulation order); needs torch and diffusers.
"""
import argparse
import json
import platform

import torch
import diffusers
from diffusers import AutoencoderKL

SD_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4,
                 block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
                 act_fn="silu", sample_size=512)


def rel_l2(got, want):
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm())


def measure(seed, size):
    torch.manual_seed(seed)
    model = AutoencoderKL(**SD_CONFIG).eval()
    images = torch.rand(1, 3, size, size) * 2 - 1
    latents = torch.randn(1, 4, size // 8, size // 8) * 4
    with torch.no_grad():
        mean32 = model.encode(images).latent_dist
        moments32 = torch.cat([mean32.mean, mean32.logvar], 1)
        dec32 = model.decode(latents).sample
        model16 = model.to(torch.bfloat16)
        post16 = model16.encode(images.bfloat16()).latent_dist
        moments16 = torch.cat([post16.mean, post16.logvar], 1).float()
        dec16 = model16.decode(latents.bfloat16()).sample.float()
    return rel_l2(moments16, moments32), rel_l2(dec16, dec32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="tests/gpu/bf16_reference.json")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = {"what": "relative L2 error of diffusers AutoencoderKL (SD config, default init) "
                      "in bf16 against fp32, worst over the seeds; encode: mean and logvar as "
                      "one vector",
              "tool": "tools/bf16_reference.py",
              "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                           "machine": platform.processor() or platform.machine()},
              "encode": {}, "decode": {}}
    for size in args.sizes:
        worst_e = worst_d = 0.0
        for seed in range(args.seeds):
            e, d = measure(1000 + seed, size)
            worst_e, worst_d = max(worst_e, e), max(worst_d, d)
            print(f"size {size} seed {seed}: encode {e:.4g}, decode {d:.4g}", flush=True)
        result["encode"][str(size)] = round(worst_e, 6)
        result["decode"][str(size)] = round(worst_d, 6)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
