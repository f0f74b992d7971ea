#!/usr/bin/env python3
"""Regenerate the reference fixtures of tests/fixtures/ with diffusers.

Needs: pip install torch diffusers safetensors numpy   (CI does not run this;
the fixtures it writes are committed.)

For each small AutoencoderKL config below it writes tests/fixtures/<name>/:
  diffusers/            config.json + diffusion_pytorch_model.safetensors
                        (diffusers' own save_pretrained)
  legacy.safetensors    the same weights with pre-2023 attention names
                        (query/key/value/proj_attn)
  compvis.safetensors   the original LDM names (encoder.down.N.block.M, decoder
                        levels numbered the other way, 1x1-conv attention);
                        checked by converting it back with diffusers' own
                        convert_ldm_vae_checkpoint
  fp16.safetensors      diffusers names, float16
  bf16.safetensors      diffusers names, bfloat16 (first config only)
  io.safetensors        input images x (2 x C x 24 x 40, uniform in [-1, 1]),
                        and diffusers' outputs in float32: mean, logvar
                        (clamped, as latent_dist.logvar), decoded = decode(mean)

Weights start from diffusers' initialisation with a fixed seed, are perturbed
(norm scales and every bias moved away from 1 and 0), then rounded to values
that float16 and bfloat16 both hold exactly, so every file describes the same
float32 model and one set of outputs serves them all.

With --check-save, it also loads a fixture through libklvae (ctypes, lib/),
saves it with klvae_model_save, and checks that diffusers'
AutoencoderKL.from_pretrained loads the saved folder and reproduces the
reference outputs.
"""
import argparse
import ctypes
import json
import os
import re
import shutil
import sys
import tempfile

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
H, W, BATCH = 24, 40, 2


def blocks(n):
    return dict(down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n)


# name -> (config, CompVis prefix). Each exercises something the others do not.
CONFIGS = {
    # 16 latent channels (SD3/FLUX-style), 3 levels (f = 4), non-default groups
    "latent16": (dict(block_out_channels=[16, 32, 32], layers_per_block=1, latent_channels=16,
                      norm_num_groups=8, scaling_factor=1.5305, shift_factor=0.0609, **blocks(3)),
                 "first_stage_model."),
    # no quant_conv / post_quant_conv, 4 levels (f = 8), 2 resnets per level
    "noquant": (dict(block_out_channels=[8, 16, 16, 16], layers_per_block=2, latent_channels=4,
                     norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
                     **blocks(4)),
                ""),
    # mid blocks without attention, 2 levels (f = 2)
    "noattn": (dict(block_out_channels=[8, 16], layers_per_block=2, latent_channels=4,
                    norm_num_groups=4, mid_block_add_attention=False, **blocks(2)),
               "vae."),
    # another resnet activation (act_fn is config-only: single files default to silu)
    "gelu": (dict(block_out_channels=[8, 16], layers_per_block=1, latent_channels=4,
                  norm_num_groups=8, act_fn="gelu", **blocks(2)),
             ""),
}

LEGACY = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}


def legacy_name(name):
    for new, old in LEGACY.items():
        name = name.replace(new, old)
    return name


def compvis_name(name, levels):
    """diffusers -> original LDM name, written from the layer tables of the
    LDM code (not from libklvae's)."""
    n = name
    n = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", n)
    n = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv.", n)

    def up(m):
        return "decoder.up.%d.block.%s." % (levels - 1 - int(m.group(1)), m.group(2))

    def ups(m):
        return "decoder.up.%d.upsample.conv." % (levels - 1 - int(m.group(1)))

    n = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", up, n)
    n = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.", ups, n)
    n = n.replace(".mid_block.resnets.0.", ".mid.block_1.").replace(".mid_block.resnets.1.", ".mid.block_2.")
    n = n.replace(".mid_block.attentions.0.group_norm.", ".mid.attn_1.norm.")
    for a, b in ((".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."), (".to_out.0.", ".proj_out.")):
        n = n.replace(".mid_block.attentions.0" + a, ".mid.attn_1" + b)
    n = n.replace(".conv_shortcut.", ".nin_shortcut.").replace("conv_norm_out.", "norm_out.")
    return n


def representable(t):
    """Rounds to bfloat16 and flushes values that float16 would make
    subnormal, so float32, float16 and bfloat16 files hold equal values."""
    t = t.to(torch.bfloat16).to(torch.float32)
    t[t.abs() < 2.0 ** -14] = 0.0
    assert torch.equal(t.to(torch.float16).to(torch.float32), t)
    return t


def make_model(config, seed):
    torch.manual_seed(seed)
    vae = AutoencoderKL(**config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.25 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.mul_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            p.copy_(representable(p))
    return vae


def reference_outputs(vae, x):
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        mean, logvar = dist.mean.contiguous(), dist.logvar.contiguous()
        decoded = vae.decode(mean).sample.contiguous()
    return mean, logvar, decoded


def write_fixture(name, config, prefix, seed):
    out = os.path.join(FIXTURES, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    vae = make_model(config, seed)
    vae.save_pretrained(os.path.join(out, "diffusers"), safe_serialization=True)
    state = {k: v.contiguous() for k, v in vae.state_dict().items()}
    levels = len(config["block_out_channels"])

    save_file({legacy_name(k): v for k, v in state.items()}, os.path.join(out, "legacy.safetensors"))

    compvis = {}
    for k, v in state.items():
        ck = compvis_name(k, levels)
        if ".mid.attn_1." in ck and v.ndim == 2:
            v = v[:, :, None, None].contiguous()  # LDM stores q/k/v/proj_out as 1x1 convs
        compvis[prefix + ck] = v
    # diffusers' own converter must turn our CompVis file back into the model.
    back = convert_ldm_vae_checkpoint({k[len(prefix):]: v for k, v in compvis.items()}, vae.config)
    assert set(back) == set(state), sorted(set(back) ^ set(state))
    for k in state:
        assert torch.equal(back[k].reshape(state[k].shape), state[k]), k
    save_file(compvis, os.path.join(out, "compvis.safetensors"))

    save_file({k: v.half() for k, v in state.items()}, os.path.join(out, "fp16.safetensors"))
    if name == "latent16":
        save_file({k: v.bfloat16() for k, v in state.items()}, os.path.join(out, "bf16.safetensors"))

    g = torch.Generator().manual_seed(seed + 2)
    cin = config.get("in_channels", 3)
    x = torch.rand((BATCH, cin, H, W), generator=g) * 2.0 - 1.0
    mean, logvar, decoded = reference_outputs(vae, x)
    save_file({"x": x, "mean": mean, "logvar": logvar, "decoded": decoded},
              os.path.join(out, "io.safetensors"))
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("Generated by tools/make_fixtures.py (diffusers %s, torch %s); do not edit.\n\n"
                "config: `%s`\n" % (__import__("diffusers").__version__, torch.__version__,
                                    json.dumps(config)))
    print("%-9s %7d parameters  mean %s  decoded %s" % (
        name, sum(p.numel() for p in vae.parameters()), tuple(mean.shape), tuple(decoded.shape)))


def check_save():
    """klvae_model_load of a single file (config from shapes plus options),
    klvae_model_save, then diffusers loads the folder."""
    lib = ctypes.CDLL(os.path.join(ROOT, "lib", "libklvae.so"))
    vp = ctypes.c_void_p
    lib.klvae_options_create.argtypes = [ctypes.POINTER(vp)]
    lib.klvae_options_set.argtypes = [vp, ctypes.c_char_p, ctypes.c_char_p]
    lib.klvae_options_free.argtypes = [vp]
    lib.klvae_model_load.argtypes = [ctypes.c_char_p, vp, ctypes.POINTER(vp)]
    lib.klvae_model_save.argtypes = [vp, ctypes.c_char_p]
    lib.klvae_model_free.argtypes = [vp]
    lib.klvae_last_error.restype = ctypes.c_char_p
    for name, (config, _) in CONFIGS.items():
        src = os.path.join(FIXTURES, name, "compvis.safetensors")
        opts = vp()
        lib.klvae_options_create(ctypes.byref(opts))
        # What tensor shapes cannot show comes from options.
        for key in ("norm_num_groups", "act_fn", "scaling_factor", "shift_factor"):
            if key in config:
                lib.klvae_options_set(opts, key.encode(), str(config[key]).encode())
        model = vp()
        if lib.klvae_model_load(src.encode(), opts, ctypes.byref(model)) != 0:
            sys.exit("klvae_model_load(%s): %s" % (src, lib.klvae_last_error().decode()))
        lib.klvae_options_free(opts)
        with tempfile.TemporaryDirectory() as tmp:
            folder = os.path.join(tmp, "saved")
            if lib.klvae_model_save(model, folder.encode()) != 0:
                sys.exit("klvae_model_save: %s" % lib.klvae_last_error().decode())
            lib.klvae_model_free(model)
            vae = AutoencoderKL.from_pretrained(folder).eval()
            io = load_file(os.path.join(FIXTURES, name, "io.safetensors"))
            mean, logvar, decoded = reference_outputs(vae, io["x"])
            for key, got in (("mean", mean), ("logvar", logvar), ("decoded", decoded)):
                err = (got - io[key]).abs().max().item()
                assert err == 0.0, (name, key, err)
            ref = AutoencoderKL.from_pretrained(os.path.join(FIXTURES, name, "diffusers"))
            for key in ("scaling_factor", "shift_factor", "act_fn", "latent_channels",
                        "block_out_channels", "norm_num_groups", "use_quant_conv",
                        "use_post_quant_conv", "mid_block_add_attention"):
                assert vae.config[key] == ref.config[key], (name, key)
        print("%-9s CompVis file -> klvae_model_save -> diffusers from_pretrained: same outputs"
              % name)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check-save", action="store_true",
                        help="only check that diffusers loads klvae_model_save's folders")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if not args.check_save:
        for i, (name, (config, prefix)) in enumerate(CONFIGS.items()):
            write_fixture(name, config, prefix, seed=1000 + 17 * i)
    if os.path.exists(os.path.join(ROOT, "lib", "libklvae.so")):
        check_save()
    else:
        print("lib/libklvae.so not built: skipped the klvae_model_save check (run make first)")


if __name__ == "__main__":
    main()
