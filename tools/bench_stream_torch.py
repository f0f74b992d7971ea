#!/usr/bin/env python3
"""Times diffusers' AutoencoderKL decode (PyTorch, CPU, float32) of one
latent, tiled (enable_tiling: diffusers' own tile size and overlap) or not,
for tools/bench_stream.py. Prints one JSON line with the times, their median
and the process's peak RSS; --output writes the last result (raw float32).

    bench_stream_torch.py MODEL_DIR SIZE --input Z.raw [--tiled] [--runs R]
                          [--threads T] [--output OUT.raw]
"""
import argparse
import json
import os
import resource
import statistics
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("size", type=int)
    p.add_argument("--input", required=True)
    p.add_argument("--output")
    p.add_argument("--tiled", action="store_true")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    threads = a.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    vae = AutoencoderKL.from_pretrained(a.model).float().eval()
    if a.tiled:
        vae.enable_tiling()
    lat = a.size // 8
    z = torch.from_numpy(np.fromfile(a.input, dtype=np.float32).reshape(1, 4, lat, lat))
    times, out = [], None
    with torch.inference_mode():
        for _ in range(a.runs):
            t0 = time.perf_counter()
            out = vae.decode(z).sample
            times.append(time.perf_counter() - t0)
    if a.output:
        out.numpy().astype(np.float32).tofile(a.output)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"impl": "pytorch", "op": "decode", "size": a.size, "tiled": a.tiled,
                      "tile": vae.tile_sample_min_size, "overlap": vae.tile_overlap_factor,
                      "threads": threads, "times": [round(t, 3) for t in times],
                      "median": round(statistics.median(times), 3), "peak_rss_mb": round(peak),
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
