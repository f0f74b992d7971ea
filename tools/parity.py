#!/usr/bin/env python3
"""make parity: the full SD KL-f8 config (83.7 M parameters) at 64 x 64,
libklvae against diffusers on the same random weights and inputs.

Weights are diffusers' initialisation perturbed so that norms and biases are
not trivial; the check loads them from a diffusers folder and from a CompVis
single file (names converted by diffusers' own conventions, see
tools/make_fixtures.py). Prints the max abs errors; exits non-zero above the
architecture's bound of 1e-4.
"""
import ctypes
import os
import sys
import tempfile

import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_fixtures import compvis_name  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOUND = 1e-4


def main():
    torch.manual_seed(0)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    config = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    vae = AutoencoderKL(**config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    x = torch.rand((2, 3, 64, 64), generator=g) * 2 - 1
    with torch.inference_mode():
        dist = vae.encode(x).latent_dist
        # .contiguous(): PyTorch may hand back channels-last strides
        mean = dist.mean.contiguous().numpy()
        logvar = dist.logvar.contiguous().numpy()
        decoded = vae.decode(dist.mean).sample.contiguous().numpy()

    lib = ctypes.CDLL(os.path.join(ROOT, "lib", "libklvae.so"))
    vp, ci = ctypes.c_void_p, ctypes.c_int
    lib.klvae_model_load.argtypes = [ctypes.c_char_p, vp, ctypes.POINTER(vp)]
    lib.klvae_encode.argtypes = [vp, vp, ci, ci, ci, vp, vp]
    lib.klvae_decode.argtypes = [vp, vp, ci, ci, ci, vp]
    lib.klvae_model_free.argtypes = [vp]
    lib.klvae_last_error.restype = ctypes.c_char_p
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "diffusers")
        vae.save_pretrained(folder, safe_serialization=True)
        single = os.path.join(tmp, "sd.safetensors")
        state = vae.state_dict()
        save_file({"first_stage_model." + compvis_name(k, 4):
                   (v[:, :, None, None] if ".to_" in k and v.ndim == 2 else v).contiguous()
                   for k, v in state.items()}, single)
        xs = np.ascontiguousarray(x.numpy())
        ms = np.ascontiguousarray(mean)
        for label, path in (("diffusers folder", folder), ("CompVis single file", single)):
            m = vp()
            if lib.klvae_model_load(path.encode(), None, ctypes.byref(m)) != 0:
                sys.exit("load %s: %s" % (path, lib.klvae_last_error().decode()))
            got_m = np.zeros(mean.shape, np.float32)
            got_l = np.zeros(logvar.shape, np.float32)
            got_d = np.zeros(decoded.shape, np.float32)
            assert lib.klvae_encode(m, xs.ctypes.data, 2, 64, 64, got_m.ctypes.data, got_l.ctypes.data) == 0
            assert lib.klvae_decode(m, ms.ctypes.data, 2, 8, 8, got_d.ctypes.data) == 0
            lib.klvae_model_free(m)
            errs = [np.abs(got_m - mean).max(), np.abs(got_l - logvar).max(), np.abs(got_d - decoded).max()]
            worst = max(worst, max(errs))
            print("SD config, 2 x 3 x 64 x 64, %-20s max abs error: mean %.2e  logvar %.2e  decoded %.2e"
                  % (label, *errs))
    print("bound %.0e: %s" % (BOUND, "ok" if worst <= BOUND else "EXCEEDED"))
    sys.exit(0 if worst <= BOUND else 1)


if __name__ == "__main__":
    main()
