#!/usr/bin/env python3
"""Draws where two decodes differ: a PNG heat map of |a - b| (the largest of
the three channels at each pixel) on a log scale from 1e-6 (black) through
1e-4 (red) and 1e-2 (yellow) to 1 and more (white); or with --tone, the
mean of a - b over the channels and each N x N block, blue where a is darker,
red where it is brighter, full colour at the largest shift. For
docs/performance.md: blend tiling against the exact (streamed or untiled)
decode, whose tone map shows each tile's own brightness, and exact against
untiled, whose map is float rounding. Needs numpy and Pillow.

    error_map.py A.raw B.raw SIZE OUT.png [--scale N] [--tone]

A and B are raw float32 (3, SIZE, SIZE) images (tools/bench_stream.py's
outputs); --scale N shrinks the map by N, keeping each block's largest error
(or its mean shift).
"""
import argparse

import numpy as np
from PIL import Image


def colour(err):
    """log10(err) in [-6, 0] -> black, red, yellow, white."""
    t = np.clip((np.log10(np.maximum(err, 1e-12)) + 6.0) / 6.0, 0.0, 1.0)
    r = np.clip(3 * t, 0, 1)
    g = np.clip(3 * t - 1, 0, 1)
    b = np.clip(3 * t - 2, 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).astype(np.uint8)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("size", type=int)
    p.add_argument("out")
    p.add_argument("--scale", type=int, default=1)
    p.add_argument("--tone", action="store_true")
    a = p.parse_args()
    n = a.size
    x = np.fromfile(a.a, dtype=np.float32).reshape(3, n, n)
    y = np.fromfile(a.b, dtype=np.float32).reshape(3, n, n)
    s = a.scale
    if a.tone:
        shift = (x.astype(np.float64) - y).mean(axis=0)
        shift = shift[: n // s * s, : n // s * s].reshape(n // s, s, n // s, s).mean(axis=(1, 3))
        v = shift / np.abs(shift).max()
        rgb = np.stack([np.clip(v, 0, 1), np.zeros_like(v), np.clip(-v, 0, 1)], axis=-1)
        Image.fromarray((rgb * 255).astype(np.uint8)).save(a.out, optimize=True)
        print(f"{a.out}: largest block shift {np.abs(shift).max():.3g}")
        return
    err = np.abs(x.astype(np.float64) - y).max(axis=0)
    if s > 1:
        err = err[: n // s * s, : n // s * s].reshape(n // s, s, n // s, s).max(axis=(1, 3))
    Image.fromarray(colour(err)).save(a.out, optimize=True)
    print(f"{a.out}: max {err.max():.3g}, median {np.median(err):.3g}")


if __name__ == "__main__":
    main()
