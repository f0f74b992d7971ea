#!/usr/bin/env python3
"""Write tests/fixtures/blend/io.safetensors: diffusers' tiled decode and
encode (enable_tiling) of the latent16 fixture model, for libklvae's
tiling=blend (tests/test_stream.c).

Needs: pip install torch diffusers safetensors numpy   (CI does not run this;
the file it writes is committed.)

The model is tests/fixtures/latent16/diffusers (f = 4). Tiles of 32 pixels
(8 latents) with diffusers' overlap factor 0.25, set on the model as
enable_tiling() reads them (tile_sample_min_size, tile_latent_min_size):
  z              (2, 16, 13, 11) uniform in [-1, 1]
  decoded_tiled  vae.decode(z) with tiling: (2, 3, 52, 44)
  x              (2, 3, 52, 44) uniform in [-1, 1]
  mean_tiled, logvar_tiled
                 vae.encode(x).latent_dist with tiling (logvar clamped)
In float32 on the CPU. Run: python3 tools/make_blend_fixture.py
"""
import os

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "tests", "fixtures", "latent16", "diffusers")
OUT = os.path.join(ROOT, "tests", "fixtures", "blend")
TILE, OVERLAP = 32, 0.25


def main():
    torch.manual_seed(1234)
    vae = AutoencoderKL.from_pretrained(MODEL).float().eval()
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.enable_tiling()
    vae.tile_sample_min_size = TILE
    vae.tile_latent_min_size = TILE // f
    vae.tile_overlap_factor = OVERLAP
    z = torch.rand(2, vae.config.latent_channels, 13, 11) * 2 - 1
    x = torch.rand(2, 3, 13 * f, 11 * f) * 2 - 1
    with torch.no_grad():
        decoded = vae.decode(z).sample
        posterior = vae.encode(x).latent_dist
    assert decoded.shape == (2, 3, 13 * f, 11 * f), decoded.shape
    tensors = {"z": z, "decoded_tiled": decoded, "x": x, "mean_tiled": posterior.mean,
               "logvar_tiled": posterior.logvar}
    os.makedirs(OUT, exist_ok=True)
    save_file({k: v.contiguous().float() for k, v in tensors.items()},
              os.path.join(OUT, "io.safetensors"))
    import diffusers
    with open(os.path.join(OUT, "README.md"), "w") as fp:
        fp.write("# blend fixture\n\n"
                 "diffusers' tiled decode and encode (`enable_tiling`) of `../latent16/diffusers`,\n"
                 f"tiles of {TILE} pixels, overlap factor {OVERLAP}: z (2, 16, 13, 11) and x\n"
                 "(2, 3, 52, 44) uniform in [-1, 1], decoded_tiled, mean_tiled, logvar_tiled.\n"
                 "Written by `tools/make_blend_fixture.py` with diffusers "
                 f"{diffusers.__version__} and torch {torch.__version__}.\n")


if __name__ == "__main__":
    main()
