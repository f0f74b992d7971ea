#!/usr/bin/env python3
"""Times diffusers' AutoencoderKL decode of one latent, tiled (enable_tiling:
diffusers' own tile size and overlap) or not, for tools/bench_stream.py (CPU,
float32) and tests/gpu/check.sh (--device cuda --dtype bf16). Prints one JSON
line with the times, their median, the process's peak RSS and on a GPU the
peak memory torch allocated; --output writes the last result (raw float32).

    bench_stream_torch.py MODEL_DIR SIZE --input Z.raw [--tiled] [--runs R]
                          [--threads T] [--output OUT.raw] [--device cpu|cuda]
                          [--dtype fp32|bf16] [--warmup]

--warmup decodes a 512x512 latent crop first (cuDNN's first-call costs).
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
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--warmup", action="store_true")
    a = p.parse_args()
    import numpy as np
    import torch
    from diffusers import AutoencoderKL

    threads = a.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    cuda = a.device.startswith("cuda")
    vae = AutoencoderKL.from_pretrained(a.model).to(a.device, dtype).eval()
    if a.tiled:
        vae.enable_tiling()
    lat = a.size // 8
    z = torch.from_numpy(np.fromfile(a.input, dtype=np.float32).reshape(1, 4, lat, lat))
    z = z.to(a.device, dtype)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times, out = [], None
    with torch.inference_mode():
        if a.warmup:
            vae.decode(z[:, :, :64, :64]).sample
            sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(a.runs):
            t0 = time.perf_counter()
            out = vae.decode(z).sample
            sync()
            times.append(time.perf_counter() - t0)
    if a.output:
        out.float().cpu().numpy().astype(np.float32).tofile(a.output)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    res = {"tool": "diffusers_stream", "impl": "diffusers", "op": "decode", "size": a.size, "tiled": a.tiled,
           "tile": vae.tile_sample_min_size, "overlap": vae.tile_overlap_factor,
           "device": a.device, "dtype": a.dtype, "threads": threads,
           "times": [round(t, 3) for t in times], "median": round(statistics.median(times), 3),
           "peak_rss_mb": round(peak), "torch": torch.__version__}
    if cuda:
        res["peak_device_mb"] = round(torch.cuda.max_memory_allocated() / 1048576.0, 1)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
