#!/usr/bin/env python3
"""make bench: encode and decode of the SD KL-f8 config on this CPU, libklvae
and diffusers/PyTorch side by side in the same run.

Every case runs in a fresh process (so its peak resident size is its own), the
two implementations alternate case by case, and each reports the median of
--runs timed runs after one warm-up. Weights are random: speed does not depend
on their values. PyTorch is optional: without it, only libklvae is timed.

    python3 tools/bench.py [--sizes 256 512] [--threads T] [--runs 5] [--batch 1]
"""
import argparse
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def have_pytorch():
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
        return True
    except ImportError:
        return False


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--no-pytorch", action="store_true")
    a = p.parse_args()
    klvae = os.path.join(ROOT, "build", "bench_klvae")
    if not os.path.exists(klvae):
        sys.exit("build/bench_klvae is missing: run 'make bench'")
    torch_ok = not a.no_pytorch and have_pytorch()
    print("machine: %s, %d threads used (of %d CPUs)" % (cpu_name(), a.threads, os.cpu_count()))
    if not torch_ok:
        print("PyTorch/diffusers not importable: timing libklvae only "
              "(pip install torch diffusers to compare)")
    common = ["--batch", str(a.batch), "--threads", str(a.threads), "--runs", str(a.runs)]
    rows = []
    for size in a.sizes:
        for op in ("encode", "decode", "both"):
            k = run([klvae, op, str(size)] + common)
            t = run([sys.executable, os.path.join(ROOT, "tools", "bench_pytorch.py"), op, str(size)]
                    + common) if torch_ok else None
            rows.append((size, op, k, t))
            line = "%4d^2 %-6s libklvae %7.3f s (peak %6.0f MB)" % (size, op, k["median"], k["peak_rss_mb"])
            if t:
                line += "   pytorch %7.3f s (peak %6.0f MB)   ratio %.2f" % (
                    t["median"], t["peak_rss_mb"], k["median"] / t["median"])
            print(line, flush=True)
    print()
    print("| size | op | libklvae median (s) | PyTorch median (s) | libklvae / PyTorch | "
          "libklvae peak RSS (MB) | PyTorch peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|")
    for size, op, k, t in rows:
        print("| %d² | %s | %.3f | %s | %s | %.0f | %s |" % (
            size, "encode+decode" if op == "both" else op, k["median"],
            "%.3f" % t["median"] if t else "-", "%.2f" % (k["median"] / t["median"]) if t else "-",
            k["peak_rss_mb"], "%.0f" % t["peak_rss_mb"] if t else "-"))
    if torch_ok and rows and rows[0][3]:
        print("\nbatch %d, %d runs each after a warm-up, torch %s" % (a.batch, a.runs, rows[0][3]["torch"]))


if __name__ == "__main__":
    main()
