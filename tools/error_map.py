#!/usr/bin/env python3
"""Draws where two decodes differ: a PNG heat map of |a - b| (the largest of
the three channels at each pixel) on a log scale from 1e-6 (black) through
1e-4 (red) and 1e-2 (yellow) to 1 and more (white); or with --tone, the
mean of a - b over the channels and each N x N block, blue where a is darker,
red where it is brighter, full colour at the largest shift; or with
--figure, four panels side by side: b as a picture, a as a picture, the heat
map and the tone map (docs/images/blend-vs-exact.png: blend tiling against
the exact decode). Needs numpy and Pillow.

    error_map.py A.raw B.raw SIZE OUT.png [--scale N] [--tone | --figure]

A and B are raw float32 (3, SIZE, SIZE) images in [-1, 1] (tools/bench_stream.py's
outputs); --scale N shrinks the maps by N, keeping each block's largest error
(or its mean shift); the pictures are shrunk by averaging.
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


def blocks(v, s, reduce):
    """v (n, n) in s x s blocks, each reduced by reduce (np.max, np.mean)."""
    n = v.shape[0] // s * s
    return reduce(v[:n, :n].reshape(n // s, s, n // s, s), axis=(1, 3))


def heat(x, y, s):
    err = np.abs(x.astype(np.float64) - y).max(axis=0)
    return colour(blocks(err, s, np.max) if s > 1 else err), err


def tone(x, y, s):
    shift = blocks((x.astype(np.float64) - y).mean(axis=0), s, np.mean)
    v = shift / max(np.abs(shift).max(), 1e-30)
    rgb = np.stack([np.clip(v, 0, 1), np.zeros_like(v), np.clip(-v, 0, 1)], axis=-1)
    return (rgb * 255).astype(np.uint8), shift


def picture(x, s):
    rgb = np.stack([blocks(c, s, np.mean) if s > 1 else c for c in x], axis=-1)
    return (np.clip((rgb + 1.0) * 127.5, 0, 255) + 0.5).astype(np.uint8)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("size", type=int)
    p.add_argument("out")
    p.add_argument("--scale", type=int, default=1)
    p.add_argument("--tone", action="store_true")
    p.add_argument("--figure", action="store_true")
    a = p.parse_args()
    n, s = a.size, a.scale
    x = np.fromfile(a.a, dtype=np.float32).reshape(3, n, n)
    y = np.fromfile(a.b, dtype=np.float32).reshape(3, n, n)
    if a.figure:
        h, err = heat(x, y, s)
        t, shift = tone(x, y, s)
        panels = [picture(y, s), picture(x, s), h, t]
        gap = np.full((h.shape[0], 6, 3), 255, np.uint8)
        strip = np.concatenate([q for p_ in panels for q in (p_, gap)][:-1], axis=1)
        Image.fromarray(strip).save(a.out, optimize=True)
        print(f"{a.out}: max {err.max():.3g}, median {np.median(err):.3g}, "
              f"largest block shift {np.abs(shift).max():.3g}")
        return
    if a.tone:
        rgb, shift = tone(x, y, s)
        Image.fromarray(rgb).save(a.out, optimize=True)
        print(f"{a.out}: largest block shift {np.abs(shift).max():.3g}")
        return
    rgb, err = heat(x, y, s)
    Image.fromarray(rgb).save(a.out, optimize=True)
    print(f"{a.out}: max {err.max():.3g}, median {np.median(err):.3g}")


if __name__ == "__main__":
    main()
