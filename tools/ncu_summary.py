#!/usr/bin/env python3
"""tools/ncu_summary.py CSV [CSV...] — where one call's GPU time goes, from
Nsight Compute's kernel times.

Each CSV is what tests/gpu/check.sh (step 4d) has ncu write for one
`test_cuda bench OP:SIZE:1 --runs 1 --warmup 0` run:

    ncu --metrics gpu__time_duration.sum --csv --log-file FILE ...

That run makes three calls of the same shape (the first also tries cuDNN's
algorithms); the last call's kernels are found as the tail of the kernel
sequence that repeats the part just before it (last_call). For that call the summary
prints the number of kernels, the sum of their times, and the kernels grouped
by name (largest first) with a family for each: cuDNN's convolutions, cuBLAS
products, or the plugin's own kernels. ncu runs kernels one at a time, so the
sum is the GPU's busy time without launch gaps; check.sh's timings give the
call's wall time beside it.
"""
import csv
import os
import sys

UNITS = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3,
         "second": 1e6, "s": 1e6}


def read_kernels(path):
    """[(kernel name, microseconds)] in launch order."""
    with open(path, newline="") as f:
        lines = [ln for ln in f if ln.startswith('"')]
    start = next((i for i, ln in enumerate(lines) if ln.startswith('"ID"')), None)
    if start is None:
        raise ValueError("%s: no ncu CSV header (\"ID\", ...)" % path)
    out = []
    for row in csv.DictReader(lines[start:]):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        unit = UNITS.get(row.get("Metric Unit", "").strip())
        if unit is None:
            raise ValueError("%s: unknown time unit %r" % (path, row.get("Metric Unit")))
        value = float(row["Metric Value"].replace(",", ""))
        out.append((row["Kernel Name"], value * unit))
    return out


def last_call(kernels):
    """The kernels of the last call. The last two of the three calls launch
    the same L kernels and the first at least those, so L <= N / 3: the
    longest tail no longer than N / 3 that equals the part before it (a
    longer one would also match where the calls repeat a block of kernels)."""
    names = [k[0] for k in kernels]
    for k in range(len(names) // 3, 0, -1):
        if names[-k:] == names[-2 * k:-k]:
            return kernels[-k:], kernels[-2 * k:-k]
    return kernels, []


def short(name):
    name = name[5:] if name.startswith("void ") else name
    depth = 0
    for i, ch in enumerate(name):  # cut the argument list, not template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            name = name[:i]
            break
    return name if len(name) <= 88 else name[:85] + "..."


def family(name):
    n = name.lower()
    if any(t in n for t in ("cudnn", "xmma", "implicit_convolve", "conv", "fprop", "dgrad",
                            "wgrad", "winograd", "fft")):
        return "cuDNN conv"
    if any(t in n for t in ("gemm", "cublas", "cutlass", "nvjet", "sm90_x")):
        return "cuBLAS"
    return "klvae"


def summarize(path):
    kernels = read_kernels(path)
    call, before = last_call(kernels)
    total = sum(t for _, t in call)
    label = os.path.basename(path)
    print("%s: %d kernels in all; the last call %d kernels, %.3f ms of kernel time%s" % (
        label, len(kernels), len(call), total / 1e3,
        " (the call before: %.3f ms)" % (sum(t for _, t in before) / 1e3) if before else ""))
    fam = {}
    groups = {}
    for name, t in call:
        f = family(name)
        fam[f] = fam.get(f, 0.0) + t
        g = groups.setdefault(short(name), [f, 0, 0.0])
        g[1] += 1
        g[2] += t
    print("  by family: " + ", ".join("%s %.3f ms (%.0f %%)" % (f, t / 1e3, 100 * t / total)
                                      for f, t in sorted(fam.items(), key=lambda x: -x[1])))
    print("  %-88s %-10s %5s %9s %6s" % ("kernel", "family", "count", "ms", "share"))
    for name, (f, n, t) in sorted(groups.items(), key=lambda x: -x[1][2])[:25]:
        print("  %-88s %-10s %5d %9.3f %5.1f%%" % (name, f, n, t / 1e3, 100 * t / total))


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    bad = 0
    for path in sys.argv[1:]:
        try:
            summarize(path)
        except (OSError, ValueError) as e:
            print("ncu_summary: %s" % e)
            bad = 1
    return bad


if __name__ == "__main__":
    sys.exit(main())
