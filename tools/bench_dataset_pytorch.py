#!/usr/bin/env python3
"""The peer of `klvae encode-dataset` for tools/bench.py: a PyTorch/diffusers
loop that does the same work as the training scripts that cache latents do
(diffusers' train_text_to_image_sdxl.py, kohya's cache_latents): read each
image with PIL, resize its shorter side to SIZE (PIL bilinear, antialiased, as
libklvae's), crop the centre SIZE x SIZE, encode batches of --batch images with
AutoencoderKL, and store the posterior's mean and logvar as float32 in
safetensors shards of --shard-size images (safetensors.numpy). Prints one JSON
line with the wall time of each run (file listing to the last shard written;
the model is loaded before the clock starts, as on the libklvae side) and the
median.

    bench_dataset_pytorch.py MODEL_DIR DATA_DIR SIZE [--batch 4] [--threads T]
                             [--runs 3] [--shard-size 512] [--device cpu|cuda]
                             [--dtype fp32|bf16]

On a GPU (--device cuda) the model runs in --dtype and the stored mean and logvar
are converted to float32 first, as a caching script does.
"""
import argparse
import json
import os
import resource
import statistics
import tempfile
import time


def list_images(root):
    """Every PNG and JPEG under root, sorted by path (libklvae's order)."""
    found = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and name.lower().endswith((".png", ".jpg", ".jpeg")):
                found.append(os.path.join(folder, name))
    return sorted(found, key=os.fsencode)


def preprocess(path, size, np):
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = size / min(w, h)
        rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((rw, rh), Image.BILINEAR)
        left, top = (rw - size) // 2, (rh - size) // 2
        im = im.crop((left, top, left + size, top + size))
        a = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return a.transpose(2, 0, 1)


def encode_dataset(vae, files, out_dir, size, batch, shard_size, torch, np, save_file,
                   device="cpu", dtype=None):
    means, logvars, shard = [], [], 0

    def flush():
        nonlocal means, logvars, shard
        if means:
            save_file({"mean": np.concatenate(means), "logvar": np.concatenate(logvars)},
                      os.path.join(out_dir, "shard-%06d.safetensors" % shard))
            shard += 1
            means, logvars = [], []

    stored = 0
    for i in range(0, len(files), batch):
        x = torch.from_numpy(np.stack([preprocess(f, size, np) for f in files[i:i + batch]]))
        dist = vae.encode(x.to(device=device, dtype=dtype)).latent_dist
        means.append(dist.mean.float().cpu().numpy())
        logvars.append(dist.logvar.float().cpu().numpy())
        stored += x.shape[0]
        if stored % shard_size == 0:
            flush()
    flush()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("size", type=int)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--shard-size", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--backend", help=argparse.SUPPRESS)  # libklvae's flags, ignored here
    p.add_argument("--precision", help=argparse.SUPPRESS)
    a = p.parse_args()
    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from safetensors.numpy import save_file

    threads = a.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    vae = AutoencoderKL.from_pretrained(a.model).eval().to(device=a.device, dtype=dtype)
    times = []
    with torch.inference_mode():
        # warm-up, as libklvae's side
        vae.encode(torch.zeros(1, 3, a.size, a.size, device=a.device, dtype=dtype))
        for _ in range(a.runs):
            with tempfile.TemporaryDirectory(prefix="klvae-bench-torch-") as out:
                t0 = time.perf_counter()
                files = list_images(a.data)
                encode_dataset(vae, files, out, a.size, a.batch, a.shard_size, torch, np,
                               save_file, a.device, dtype)
                times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    med = statistics.median(times)
    print(json.dumps({"impl": "pytorch", "op": "dataset", "size": a.size, "batch": a.batch,
                      "threads": threads, "device": a.device, "dtype": a.dtype,
                      "images": len(files),
                      "times": [round(t, 3) for t in times], "median": round(med, 3),
                      "images_per_second": round(len(files) / med, 4),
                      "peak_rss_mb": round(peak, 1), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
