#!/usr/bin/env python3
"""How far precision=bf16 on the CPU is from fp32, next to PyTorch's own bf16.

The full SD KL-f8 config with diffusers' default initialisation (the model
tools/bf16_reference.py measures), saved as a diffusers folder and loaded by
both. On the same inputs (images uniform in [-1, 1] for encode, latents
N(0, 4^2) for decode, as bf16_reference.py), each implementation's bf16
result is compared with its own fp32 result, as relative L2 error (encode:
mean and logvar as one vector, as bf16_reference.py), and libklvae's fp32
with PyTorch's fp32 as a check that the two run the same model. PyTorch's
bf16 is the model cast with .to(torch.bfloat16), what a CPU user runs.
Non-finite values are counted and fail the run.

    python3 tools/bf16_accuracy.py [--sizes 64 256] [--seeds 2] [--threads T]

Prints one line per case and a table; exits 1 when a bf16 result has a NaN
or an infinity, or when libklvae is not computing in bf16 (a CPU without
AVX512-BF16). Needs torch, diffusers, numpy and lib/libklvae.so.
"""
import argparse
import ctypes
import os
import sys
import tempfile

import numpy as np
import torch
from diffusers import AutoencoderKL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4,
                 block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
                 act_fn="silu", sample_size=512)


def rel_l2(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


class Klvae:
    """The few functions of lib/libklvae.so this needs, through ctypes."""

    def __init__(self):
        lib = ctypes.CDLL(os.path.join(ROOT, "lib", "libklvae.so"))
        vp, ci = ctypes.c_void_p, ctypes.c_int
        lib.klvae_options_create.argtypes = [ctypes.POINTER(vp)]
        lib.klvae_options_set.argtypes = [vp, ctypes.c_char_p, ctypes.c_char_p]
        lib.klvae_options_free.argtypes = [vp]
        lib.klvae_model_load.argtypes = [ctypes.c_char_p, vp, ctypes.POINTER(vp)]
        lib.klvae_model_get.argtypes = [vp, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]
        lib.klvae_encode.argtypes = [vp, vp, ci, ci, ci, vp, vp]
        lib.klvae_decode.argtypes = [vp, vp, ci, ci, ci, vp]
        lib.klvae_model_free.argtypes = [vp]
        lib.klvae_last_error.restype = ctypes.c_char_p
        self.lib = lib

    def check(self, status, what):
        if status != 0:
            sys.exit("libklvae %s: %s" % (what, self.lib.klvae_last_error().decode()))

    def load(self, folder, precision, threads):
        lib, o, m = self.lib, ctypes.c_void_p(), ctypes.c_void_p()
        self.check(lib.klvae_options_create(ctypes.byref(o)), "options")
        for key, value in (("backend", "cpu"), ("precision", precision), ("threads", str(threads))):
            self.check(lib.klvae_options_set(o, key.encode(), value.encode()), key)
        self.check(lib.klvae_model_load(folder.encode(), o, ctypes.byref(m)), "load")
        lib.klvae_options_free(o)
        buf = ctypes.create_string_buffer(256)
        self.check(lib.klvae_model_get(m, b"precision", buf, 256), "precision")
        used = buf.value.decode()
        self.check(lib.klvae_model_get(m, b"precision_reason", buf, 256), "precision_reason")
        return m, used, buf.value.decode()

    def encode(self, m, images):
        n, _, h, w = images.shape
        x = np.ascontiguousarray(images, np.float32)
        mean = np.zeros((n, 4, h // 8, w // 8), np.float32)
        logvar = np.zeros_like(mean)
        self.check(self.lib.klvae_encode(m, x.ctypes.data, n, h, w, mean.ctypes.data,
                                         logvar.ctypes.data), "encode")
        return np.concatenate([mean, logvar], 1)

    def decode(self, m, latents):
        n, _, h, w = latents.shape
        z = np.ascontiguousarray(latents, np.float32)
        out = np.zeros((n, 3, 8 * h, 8 * w), np.float32)
        self.check(self.lib.klvae_decode(m, z.ctypes.data, n, h, w, out.ctypes.data), "decode")
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    k = Klvae()
    rows, failed = [], False
    for seed in range(a.seeds):
        torch.manual_seed(1000 + seed)  # the seeds of tools/bf16_reference.py
        model = AutoencoderKL(**SD_CONFIG).eval()
        with tempfile.TemporaryDirectory(prefix="klvae-bf16-") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            m32, _, _ = k.load(tmp, "fp32", a.threads)
            m16, used, reason = k.load(tmp, "bf16", a.threads)
        if used != "bf16":
            sys.exit("libklvae computes in %s: %s" % (used, reason))
        model16 = AutoencoderKL(**SD_CONFIG).eval()
        model16.load_state_dict(model.state_dict())
        model16 = model16.to(torch.bfloat16)
        for size in a.sizes:
            images = torch.rand(1, 3, size, size) * 2 - 1
            latents = torch.randn(1, 4, size // 8, size // 8) * 4
            with torch.inference_mode():
                post = model.encode(images).latent_dist
                t_enc32 = torch.cat([post.mean, post.logvar], 1).numpy()
                t_dec32 = model.decode(latents).sample.numpy()
                post = model16.encode(images.bfloat16()).latent_dist
                t_enc16 = torch.cat([post.mean, post.logvar], 1).float().numpy()
                t_dec16 = model16.decode(latents.bfloat16()).sample.float().numpy()
            k_enc32, k_enc16 = k.encode(m32, images.numpy()), k.encode(m16, images.numpy())
            k_dec32, k_dec16 = k.decode(m32, latents.numpy()), k.decode(m16, latents.numpy())
            for op, t32, t16, k32, k16 in (("encode", t_enc32, t_enc16, k_enc32, k_enc16),
                                           ("decode", t_dec32, t_dec16, k_dec32, k_dec16)):
                bad = int(np.size(k16) - np.isfinite(k16).sum())
                failed |= bad > 0
                row = (size, seed, op, rel_l2(k16, k32), rel_l2(t16, t32), rel_l2(k32, t32), bad)
                rows.append(row)
                print("%4d^2 seed %d %-6s libklvae bf16 %.3e   pytorch bf16 %.3e   fp32 vs fp32 "
                      "%.1e   non-finite %d" % row, flush=True)
        k.lib.klvae_model_free(m32)
        k.lib.klvae_model_free(m16)
    print("\n| size | seed | op | libklvae bf16 vs fp32 | PyTorch bf16 vs fp32 | ratio | "
          "libklvae fp32 vs PyTorch fp32 |")
    print("|---|---|---|---|---|---|---|")
    for size, seed, op, kerr, terr, same, bad in rows:
        print("| %d² | %d | %s | %.2e | %.2e | %.2f | %.1e |" % (size, seed, op, kerr, terr,
                                                              kerr / terr, same))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
