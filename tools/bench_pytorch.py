#!/usr/bin/env python3
"""Times diffusers' AutoencoderKL (PyTorch, CPU) the way tools/bench_klvae.c
times libklvae, for tools/bench.py. Prints one JSON line. --dtype bf16: the
model and its inputs cast with .to(torch.bfloat16), what a CPU user runs for
speed (oneDNN's AVX512-BF16 or AMX kernels where the CPU has them).

    bench_pytorch.py encode|decode|both SIZE [--batch N] [--threads T] [--runs R]
                     [--dtype fp32|bf16]
"""
import argparse
import json
import os
import resource
import statistics
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("op", choices=["encode", "decode", "both"])
    p.add_argument("size", type=int)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    a = p.parse_args()
    import torch
    from diffusers import AutoencoderKL

    threads = a.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                        down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand((a.batch, 3, a.size, a.size), generator=g) * 2 - 1
    z = torch.randn((a.batch, 4, a.size // 8, a.size // 8), generator=g)
    if a.dtype == "bf16":
        vae, x, z = vae.to(torch.bfloat16), x.to(torch.bfloat16), z.to(torch.bfloat16)
    times = []
    with torch.inference_mode():
        for r in range(-1, a.runs):  # run -1 warms up
            t0 = time.perf_counter()
            if a.op in ("encode", "both"):
                vae.encode(x).latent_dist.mean
            if a.op in ("decode", "both"):
                vae.decode(z).sample
            if r >= 0:
                times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"impl": "pytorch", "op": a.op, "size": a.size, "batch": a.batch,
                      "threads": threads, "precision": a.dtype, "times": [round(t, 4) for t in times],
                      "median": round(statistics.median(times), 4), "peak_rss_mb": round(peak, 1),
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
