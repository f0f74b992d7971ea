#!/usr/bin/env python3
"""The PyTorch side of tests/gpu/check.sh: diffusers' AutoencoderKL (SD config,
random weights) on the GPU, timed the way tools/bench_cuda.c times libklvae,
and a bf16 matrix product for the GPU's practical peak. One JSON line per case.

    bench_cuda_torch.py [--cases decode:512:1,decode:1024:1,...] [--runs R]
                        [--dtype bf16|fp32] [--matmul] [--cudnn-benchmark]

Each case: inputs already on the GPU, one warm-up call (two at the largest
sizes do no harm), then R calls each ended by torch.cuda.synchronize(); the
median in ms. Peak memory is torch.cuda.max_memory_allocated() over the
timed calls (weights included, as the klvae figure includes its weights).
The model is in eval mode, channels_last, eager (no torch.compile), with
diffusers' default attention processor (PyTorch's scaled_dot_product_attention).
--matmul: an 8192^3 bf16 torch.matmul on random data (ten timed after three
warm-ups): TFLOP/s.
"""
import argparse
import json
import statistics
import time


def sd_vae(torch, dtype):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                        down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32)
    return vae.to(device="cuda", dtype=dtype, memory_format=torch.channels_last).eval()


def run_case(torch, vae, op, size, batch, runs, dtype):
    g = torch.Generator(device="cuda").manual_seed(1)
    if op == "decode":
        x = torch.randn((batch, 4, size // 8, size // 8), generator=g, device="cuda") * 6
    else:
        x = torch.rand((batch, 3, size, size), generator=g, device="cuda") * 2 - 1
    x = x.to(dtype).contiguous(memory_format=torch.channels_last)

    def call():
        if op == "decode":
            return vae.decode(x).sample
        return vae.encode(x).latent_dist.mean

    with torch.inference_mode():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        first = (time.perf_counter() - t0) * 1e3
        call()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            call()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 1048576.0
    return {"tool": "diffusers", "op": op, "size": size, "batch": batch,
            "precision": "bf16" if dtype == torch.bfloat16 else "fp32",
            "times_ms": [round(t, 3) for t in times], "median_ms": round(statistics.median(times), 3),
            "first_ms": round(first, 1), "peak_allocated_mb": round(peak, 1),
            "cudnn_benchmark": torch.backends.cudnn.benchmark}


def matmul_rate(torch):
    n = 8192
    a = torch.randn((n, n), device="cuda", dtype=torch.bfloat16)
    b = torch.randn((n, n), device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch.matmul(a, b)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        torch.matmul(a, b)
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / 10
    return {"tool": "matmul", "n": n, "ms": round(ms, 4), "tflops": round(2 * n ** 3 / ms / 1e9, 1)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="decode:512:1")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--matmul", action="store_true")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="torch.backends.cudnn.benchmark = True (cuDNN's algorithm search, as "
                        "libklvae does); the default is PyTorch's default, False")
    a = p.parse_args()
    import torch

    info = {"tool": "env", "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
    try:
        import diffusers
        info["diffusers"] = diffusers.__version__
    except ImportError as e:
        info["diffusers_error"] = str(e)
    print(json.dumps(info), flush=True)
    if a.matmul:
        print(json.dumps(matmul_rate(torch)), flush=True)
    if "diffusers" not in info:
        return
    torch.backends.cudnn.benchmark = a.cudnn_benchmark
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    vae = sd_vae(torch, dtype)
    for case in a.cases.split(","):
        if not case:
            continue
        op, size, batch = case.split(":")
        try:
            r = run_case(torch, vae, op, int(size), int(batch), a.runs, dtype)
        except torch.cuda.OutOfMemoryError as e:
            r = {"tool": "diffusers", "op": op, "size": int(size), "batch": int(batch),
                 "error": "out of memory: %s" % str(e)[:200]}
            torch.cuda.empty_cache()
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
