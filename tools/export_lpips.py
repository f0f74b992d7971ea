#!/usr/bin/env python3
"""Build the LPIPS-VGG16 weights file that libklvae loads (--lpips FILE,
option lpips_weights) from the public weights, for users who have them.

LPIPS (Zhang et al. 2018, richzhang/PerceptualSimilarity) is two parts:

  the trunk  torchvision's ImageNet VGG16 `features` (13 convolutions), file
             vgg16-397923af.pth from download.pytorch.org, keys
             features.N.weight / features.N.bias;
  the heads  the five 1x1 "lin" layers of LPIPS v0.1, file
             lpips/weights/v0.1/vgg.pth of the `lpips` pip package, keys
             linK.model.1.weight (K = 0..4).

The output is one float32 safetensors file with exactly those names (the
classifier part of VGG16 is left out). Usage, any one of:

    # both files on disk
    python3 tools/export_lpips.py --vgg vgg16-397923af.pth --lin vgg.pth -o lpips_vgg.safetensors
    # with `pip install lpips torchvision` (downloads the VGG16 weights once)
    python3 tools/export_lpips.py --from-package -o lpips_vgg.safetensors

Needs torch and safetensors (and lpips + torchvision for --from-package).
The file is checked before it is written: 13 convolutions with VGG16's
shapes, 5 non-negative lin weights with the matching widths.
"""
import argparse
import sys

VGG16_CONVS = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
VGG16_WIDTHS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
TAP_WIDTHS = [64, 128, 256, 512, 512]


def load_state(path):
    import torch
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


def from_files(vgg_path, lin_path):
    vgg, lin = load_state(vgg_path), load_state(lin_path)
    out = {}
    for n in VGG16_CONVS:
        for part in ("weight", "bias"):
            key = f"features.{n}.{part}"
            if key not in vgg:
                sys.exit(f"{vgg_path}: no tensor '{key}': not torchvision's VGG16 state dict")
            out[key] = vgg[key]
    for k in range(5):
        key = f"lin{k}.model.1.weight"
        if key not in lin:
            sys.exit(f"{lin_path}: no tensor '{key}': not an LPIPS v0.1 lin file")
        out[key] = lin[key]
    return out


def from_package():
    try:
        import lpips
    except ImportError:
        sys.exit("--from-package needs: pip install lpips torchvision")
    model = lpips.LPIPS(net="vgg", version="0.1", verbose=False)
    state = model.state_dict()
    out = {}
    # lpips splits VGG16's features into slices but keeps torchvision's
    # indices: net.slice1.0 is features.0, net.slice2.5 is features.5, ...
    for key, value in state.items():
        if key.startswith("net.slice"):
            index = key.split(".")[2]
            part = key.split(".")[3]
            out[f"features.{index}.{part}"] = value
        elif key.startswith("lin") and key.endswith("model.1.weight"):
            out[key] = value
    return out


def check(tensors):
    for n, width in zip(VGG16_CONVS, VGG16_WIDTHS):
        w = tensors.get(f"features.{n}.weight")
        if w is None or tuple(w.shape[0:1]) != (width,) or tuple(w.shape[2:]) != (3, 3):
            sys.exit(f"features.{n}.weight: expected ({width}, C, 3, 3), got "
                     f"{None if w is None else tuple(w.shape)}")
    for k, width in enumerate(TAP_WIDTHS):
        w = tensors[f"lin{k}.model.1.weight"]
        if tuple(w.shape) != (1, width, 1, 1):
            sys.exit(f"lin{k}.model.1.weight: expected (1, {width}, 1, 1), got {tuple(w.shape)}")
        if (w < 0).any():
            sys.exit(f"lin{k}.model.1.weight has negative entries: not trained LPIPS heads")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vgg", help="torchvision VGG16 state dict (vgg16-397923af.pth)")
    p.add_argument("--lin", help="LPIPS v0.1 lin weights (lpips/weights/v0.1/vgg.pth)")
    p.add_argument("--from-package", action="store_true",
                   help="take both from the installed lpips package")
    p.add_argument("-o", "--output", required=True, help="the .safetensors file to write")
    args = p.parse_args()
    if args.from_package == bool(args.vgg or args.lin) or (not args.from_package and
                                                          not (args.vgg and args.lin)):
        p.error("give either --vgg FILE and --lin FILE, or --from-package")
    tensors = from_package() if args.from_package else from_files(args.vgg, args.lin)
    check(tensors)
    from safetensors.torch import save_file
    tensors = {k: v.detach().float().contiguous() for k, v in tensors.items()}
    save_file(tensors, args.output, metadata={"format": "pt", "source": "lpips-vgg16-v0.1"})
    print(f"wrote {args.output}: {len(tensors)} tensors "
          f"({sum(t.numel() for t in tensors.values()) / 1e6:.1f} M parameters)")


if __name__ == "__main__":
    main()
