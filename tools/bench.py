#!/usr/bin/env python3
"""make bench: encode, decode, one training step and a dataset encode, libklvae and PyTorch side by side.

Encode and decode of the SD KL-f8 config on this CPU, and one training step,
libklvae and diffusers/PyTorch side by side in the same run.

Every case runs in a fresh process (so its peak resident size is its own), the
two implementations alternate case by case, and each reports the median of
--runs timed runs after one warm-up. Weights are random: speed does not depend
on their values. PyTorch is optional: without it, only libklvae is timed.

The training part times one full step (klvae_trainer_step against the same
step in PyTorch, tools/bench_train_pytorch.py) of --train-config at each of
--train-sizes with batch --train-batch, learning rate 1e-5, posterior sample,
LPIPS-VGG16 on, twice: with the GAN off (libklvae's default before
disc_start: no discriminator work at all) and on (discriminator forward and
backward, adaptive weight, discriminator Adam; x' of the generator pass
reused for the discriminator step). The LPIPS weights are a random
full-width VGG16 file written once to a temporary folder with numpy (or the
standard library alone, slower), so libklvae needs no PyTorch for it.

The dataset part times `klvae encode-dataset`'s work (klvae_encode_dataset,
tools/bench_dataset_klvae.c) against a PyTorch/diffusers loop doing the same
(tools/bench_dataset_pytorch.py: PIL read, resize, centre crop, encode,
mean and logvar stored in safetensors shards) on --dataset-images generated
images of 280-520 pixels a side (PNG and JPEG), at --dataset-size with
--dataset-batch images per encode call, same weights (a random SD model saved
once), same threads. The two run in turn, each run in a fresh process, for
--dataset-runs rounds; the median of each side's rounds is reported.

    python3 tools/bench.py [--sizes 256 512] [--threads T] [--runs 5] [--batch 1]
                           [--train-sizes 256] [--train-batch 1] [--train-config sd]
                           [--train-runs R] [--no-train | --train-only]
                           [--dataset-images 16] [--dataset-size 256] [--dataset-batch 4]
                           [--dataset-runs 3] [--no-dataset | --dataset-only]
"""
import argparse
import json
import math
import os
import platform
import struct
import subprocess
import sys
import tempfile

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


VGG16_CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256),
               (12, 256, 256), (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512),
               (24, 512, 512), (26, 512, 512), (28, 512, 512)]  # (features index, in, out)
LPIPS_TAP_WIDTHS = [64, 128, 256, 512, 512]


def write_random_lpips(path, seed=0):
    """A random LPIPS-VGG16 v0.1 file with the real shapes, in the names
    libklvae loads (features.N.weight/bias, linK.model.1.weight): conv weights
    randn * sqrt(2 / fan_in), biases 0.01 randn, lin weights U(0.05, 1) * 4 /
    width (positive, as the published ones). Safetensors written by hand:
    8-byte little-endian header length, JSON header, raw float32 data."""
    try:
        import numpy as np
        rng = np.random.default_rng(seed)

        def normal(n, std):
            return (rng.standard_normal(n, dtype=np.float32) * np.float32(std)).astype("<f4").tobytes()

        def uniform(n, lo, hi):
            return rng.uniform(lo, hi, n).astype("<f4").tobytes()
    except ImportError:  # the standard library alone: about 15 s for 14.7 M values
        import array
        import random
        rnd = random.Random(seed)

        def pack(values):
            a = array.array("f", values)
            if sys.byteorder != "little":
                a.byteswap()
            return a.tobytes()

        def normal(n, std):
            return pack(rnd.gauss(0.0, std) for _ in range(n))

        def uniform(n, lo, hi):
            return pack(rnd.uniform(lo, hi) for _ in range(n))

    tensors = []  # (name, shape, bytes)
    for idx, cin, cout in VGG16_CONVS:
        tensors.append(("features.%d.weight" % idx, [cout, cin, 3, 3],
                        normal(cout * cin * 9, math.sqrt(2.0 / (cin * 9)))))
        tensors.append(("features.%d.bias" % idx, [cout], normal(cout, 0.01)))
    for k, w in enumerate(LPIPS_TAP_WIDTHS):
        lin = uniform(w, 0.05 * 4.0 / w, 4.0 / w)
        tensors.append(("lin%d.model.1.weight" % k, [1, w, 1, 1], lin))
    header, offset = {"__metadata__": {"format": "pt", "note": "random weights for make bench"}}, 0
    for name, shape, data in tensors:
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, _, data in tensors:
            f.write(data)


def have_pytorch():
    """Asked in a child process: on Linux a child's getrusage peak RSS starts
    at the parent's size (ru_maxrss survives fork and exec), so importing
    torch here (about 700 MB) would set a floor under every case's peak."""
    return subprocess.run([sys.executable, "-c", "import torch, diffusers"],
                          capture_output=True).returncode == 0


def fmt_row(size, label, k, t):
    """One row of the table; k or t is None when that side did not run."""
    return "| %d² | %s | %s | %s | %s | %s | %s |" % (
        size, label, "%.3f" % k["median"] if k else "-", "%.3f" % t["median"] if t else "-",
        "%.2f" % (k["median"] / t["median"]) if k and t else "-",
        "%.0f" % k["peak_rss_mb"] if k else "-", "%.0f" % t["peak_rss_mb"] if t else "-")


def write_dataset_images(folder, count, seed=1):
    """count smooth noisy pictures of 280-520 pixels a side, every other one a
    JPEG (with PIL; PNG only, written by hand, without it)."""
    import random
    import zlib
    rnd = random.Random(seed)
    try:
        import numpy as np
        from PIL import Image
    except ImportError:
        np = Image = None
    for i in range(count):
        h, w = rnd.randint(280, 520), rnd.randint(280, 520)
        if Image is not None:
            y, x = np.mgrid[0:h, 0:w]
            a = np.stack([np.sin(x / 17.0 + i) + np.cos(y / 23.0), np.sin((x + y) / 31.0),
                          np.cos(x * y / 5000.0)], -1)
            a = (a - a.min()) / (a.max() - a.min()) * 255
            a += np.random.default_rng(i).normal(0, 8, a.shape)
            img = Image.fromarray(a.clip(0, 255).astype(np.uint8))
            img.save(os.path.join(folder, "im%03d.%s" % (i, "jpg" if i % 2 else "png")), quality=92)
            continue
        rows = b"".join(b"\0" + bytes((x * 7 + y * 3 + c * 50 + i) % 256 for x in range(w)
                                      for c in range(3)) for y in range(h))
        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(
                ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
        png += chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
        with open(os.path.join(folder, "im%03d.png" % i), "wb") as f:
            f.write(png)


def dataset_part(a, torch_ok):
    """Times the dataset encode, the two sides in turn; returns [(k, t)] of one
    row (median JSONs)."""
    tool = os.path.join(ROOT, "build", "bench_dataset_klvae")
    with tempfile.TemporaryDirectory(prefix="klvae-bench-dataset-") as tmp:
        model, data = os.path.join(tmp, "sd"), os.path.join(tmp, "images")
        os.mkdir(data)
        write_dataset_images(data, a.dataset_images)
        subprocess.run([tool, "--create-model", model], check=True)
        common = [model, data, str(a.dataset_size), "--batch", str(a.dataset_batch),
                  "--threads", str(a.threads), "--runs", "1"]
        ks, ts = [], []
        for r in range(a.dataset_runs):
            k = run([tool] + common)
            t = run([sys.executable, os.path.join(ROOT, "tools", "bench_dataset_pytorch.py")]
                    + common) if torch_ok else None
            ks += [k] if k else []
            ts += [t] if t else []
            print("dataset %d^2 round %d: libklvae %s   pytorch %s%s" % (
                a.dataset_size, r + 1, "%.3f images/s" % k["images_per_second"] if k else "failed",
                "%.3f images/s" % t["images_per_second"] if t else "-",
                "   speed-up %.2f" % (t["median"] / k["median"]) if k and t else ""), flush=True)

        def med(rs):
            if not rs:
                return None
            times = sorted(x["median"] for x in rs)
            m = dict(rs[0])
            m["median"] = times[len(times) // 2] if len(times) % 2 else 0.5 * (
                times[len(times) // 2 - 1] + times[len(times) // 2])
            m["images_per_second"] = m["images"] / m["median"]
            m["peak_rss_mb"] = max(x["peak_rss_mb"] for x in rs)
            return m
        return med(ks), med(ts)


TRAIN_CASES = [(0, "train step (LPIPS, GAN off)"), (1, "train step (LPIPS + GAN)")]


def train_part(a, klvae, torch_ok):
    """Times the training step, GAN off and on, both implementations
    alternating; returns [(size, label, libklvae json, pytorch json)]."""
    runs = a.train_runs if a.train_runs is not None else a.runs
    rows = []
    with tempfile.TemporaryDirectory(prefix="klvae-bench-") as tmp:
        lpips = os.path.join(tmp, "lpips_vgg_random.safetensors")
        # in a child process, to keep this one small (see have_pytorch)
        subprocess.run([sys.executable, os.path.abspath(__file__), "--write-lpips", lpips], check=True)
        common = ["--batch", str(a.train_batch), "--threads", str(a.threads), "--runs", str(runs),
                  "--config", a.train_config, "--lpips", lpips]
        for size in a.train_sizes:
            for gan, label in TRAIN_CASES:
                case = common + ["--gan", str(gan)]
                k = run([klvae, "train", str(size)] + case)
                t = run([sys.executable, os.path.join(ROOT, "tools", "bench_train_pytorch.py"),
                         "train", str(size)] + case) if torch_ok else None
                rows.append((size, label, k, t))
                line = "%4d^2 %-27s" % (size, label)
                line += " libklvae %7.3f s (peak %6.0f MB)" % (k["median"], k["peak_rss_mb"]) if k \
                    else " libklvae failed"
                if t:
                    line += "   pytorch %7.3f s (peak %6.0f MB)" % (t["median"], t["peak_rss_mb"])
                    if k:
                        line += "   ratio %.2f" % (k["median"] / t["median"])
                elif torch_ok:
                    line += "   pytorch failed"
                print(line, flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--no-pytorch", action="store_true")
    p.add_argument("--train-sizes", type=int, nargs="+", default=[256],
                   help="image sizes of the training-step cases (default 256)")
    p.add_argument("--train-batch", type=int, default=1, help="training batch (default 1)")
    p.add_argument("--train-config", choices=["sd", "small", "tiny"], default="sd",
                   help="model config of the training cases (default sd)")
    p.add_argument("--train-runs", type=int, default=None,
                   help="timed training steps per case (default: --runs)")
    p.add_argument("--dataset-images", type=int, default=16,
                   help="images of the dataset case (default 16)")
    p.add_argument("--dataset-size", type=int, default=256, help="its crop (default 256)")
    p.add_argument("--dataset-batch", type=int, default=4,
                   help="images per encode call in it (default 4)")
    p.add_argument("--dataset-runs", type=int, default=3,
                   help="rounds of the two sides in turn (default 3)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--no-train", action="store_true", help="skip the training step")
    g.add_argument("--train-only", action="store_true", help="skip encode/decode")
    g.add_argument("--dataset-only", action="store_true",
                   help="only the dataset encode")
    p.add_argument("--no-dataset", action="store_true", help="skip the dataset encode")
    p.add_argument("--write-lpips", metavar="PATH", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.write_lpips:  # the child process of train_part
        write_random_lpips(a.write_lpips)
        return
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
    if a.dataset_only:
        a.no_train, a.sizes = True, []
    for size in ([] if a.train_only else a.sizes):
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
    train_rows = [] if a.no_train else train_part(a, klvae, torch_ok)
    dataset = None if a.no_dataset or a.train_only else dataset_part(a, torch_ok)
    print()
    if rows or train_rows:
        print("| size | op | libklvae median (s) | PyTorch median (s) | libklvae / PyTorch | "
              "libklvae peak RSS (MB) | PyTorch peak RSS (MB) |")
        print("|---|---|---|---|---|---|---|")
    for size, op, k, t in rows:
        print(fmt_row(size, "encode+decode" if op == "both" else op, k, t))
    for size, label, k, t in train_rows:
        print(fmt_row(size, label, k, t))
    if dataset:
        k, t = dataset
        print("\n| dataset encode, %d images at %d², batch %d | libklvae | PyTorch | "
              "libklvae speed-up |" % (a.dataset_images, a.dataset_size, a.dataset_batch))
        print("|---|---|---|---|")
        print("| images/s (median of %d rounds) | %s | %s | %s |" % (
            a.dataset_runs, "%.3f" % k["images_per_second"] if k else "-",
            "%.3f" % t["images_per_second"] if t else "-",
            "**%.2f×**" % (t["median"] / k["median"]) if k and t else "-"))
        print("| peak RSS (MB) | %s | %s | |" % ("%.0f" % k["peak_rss_mb"] if k else "-",
                                               "%.0f" % t["peak_rss_mb"] if t else "-"))
    torch_version = next((r[3]["torch"] for r in rows + train_rows if r[3]), None)
    if torch_ok and rows and rows[0][3]:
        print("\nbatch %d, %d runs each after a warm-up, torch %s" % (a.batch, a.runs, rows[0][3]["torch"]))
    if train_rows:
        print("%straining: config %s, batch %d, %d steps each after a warm-up step; "
              "Adam lr 1e-5, posterior sample, random LPIPS-VGG16 weights; "
              "the GAN case reuses the generator's x' for the discriminator step%s" % (
                  "" if torch_ok and rows and rows[0][3] else "\n", a.train_config, a.train_batch,
                  a.train_runs if a.train_runs is not None else a.runs,
                  ", torch %s" % torch_version if torch_version else ""))


if __name__ == "__main__":
    main()
