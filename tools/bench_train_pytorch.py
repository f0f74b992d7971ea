#!/usr/bin/env python3
"""Times one training step of diffusers' AutoencoderKL in PyTorch the way
`bench_klvae train` (CPU, float32, for tools/bench.py) and `test_cuda bench
train:SIZE:BATCH` (GPU, for tests/gpu/check.sh) time klvae_trainer_step.
Prints one JSON line.

    bench_train_pytorch.py train SIZE [--batch N] [--threads T] [--runs R]
        [--config sd|small|tiny] [--lpips FILE] [--gan 0|1] [--verbose]
        [--adaptive grad|split] [--device cpu|cuda] [--amp bf16]
        [--compile] [--write-random-lpips FILE]

On the GPU (--device cuda) the step runs under torch.autocast(bf16) with
--amp bf16 (PyTorch's mixed precision: float32 weights and optimiser, bf16
products), the timings synchronise the device, and the JSON has the peak
device memory (torch.cuda.max_memory_allocated) and images/s. --compile
wraps the autoencoder, LPIPS and the discriminator in torch.compile (the
first, untimed, steps compile). --write-random-lpips FILE writes LPIPS-VGG16
weights drawn at random (same shapes, same work) to FILE and exits: a GPU
machine has no LPIPS download, and both benchmarks then read that file.

The step is the latent-diffusion recipe (docs/training.md, "One step", and
/work/shared/spec/training.md sections 1, 2, 5-7) with libklvae's default
settings, written as idiomatic PyTorch:

  posterior = encode(x); z = posterior.sample(); x' = decode(z)
  rec  = |x - x'| + LPIPS(x, x')           (per-image LPIPS broadcast per pixel)
  nll  = sum(rec) / B                      (loss logvar frozen at 0)
  kl   = posterior.kl().sum() / B
  --gan 1: g = -mean(D(x')) with D's parameters frozen (train-mode BatchNorm);
           d_weight = 0.5 ||d nll/dW|| / (||d g/dW|| + 1e-4), clamped to
           [0, 1e4], W = decoder.conv_out.weight
  total = nll + 1e-6 kl (+ d_weight g); backward; Adam(lr 1e-5, betas 0.5, 0.9)
  --gan 1: d_loss = 0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x'.detach())))
           (x' of the generator pass, as libklvae's disc_update=reuse; D(x) and
           D(x') are separate forwards); backward; D's Adam step.

With --gan 0 the discriminator is not built and nothing of it runs, as in
libklvae before disc_start. Without --lpips there is no perceptual term.

--adaptive grad (default) takes the two gradients at conv_out.weight with
torch.autograd.grad(..., retain_graph=True), as latent-diffusion does; that
back-propagates through LPIPS (on x') and D once more than the final
backward. --adaptive split does what libklvae does: d nll/dx' and d g/dx'
once each, conv_out's weight gradient of each, and one backward of the
whole graph with d total/dx' = d nll/dx' + d_weight d g/dx'. Same numbers,
less work.

LPIPS is LPIPS-VGG16 v0.1 written with torch.nn (torchvision's `features`
layout, 13 3x3 convolutions, taps relu1_2 .. relu5_3), frozen and in eval
mode without dropout, loaded from the safetensors file libklvae reads
(`features.N.weight/bias`, `linK.model.1.weight`). The discriminator is
taming's NLayerDiscriminator (ndf 64, 3 layers, BatchNorm, LeakyReLU 0.2)
with taming's initialisation.
"""
import argparse
import json
import math
import os
import resource
import statistics
import sys
import time

CONFIGS = {  # block_out_channels, layers_per_block, norm_num_groups
    "sd": ([128, 256, 512, 512], 2, 32),
    "small": ([32, 64, 128, 128], 1, 16),
    "tiny": ([16, 32], 1, 8),
}

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAP_WIDTHS = (64, 128, 256, 512, 512)


def read_safetensors(path):
    """{name: float32 tensor} of a safetensors file (F32 only), without the
    safetensors package."""
    import torch
    with open(path, "rb") as f:
        data = f.read()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            sys.exit("%s: tensor %s is %s; this benchmark reads F32 only" % (path, name, info["dtype"]))
        begin, end = info["data_offsets"]
        t = torch.frombuffer(bytearray(data[base + begin:base + end]), dtype=torch.float32)
        out[name] = t.reshape(info["shape"])
    return out


def write_random_lpips(path):
    """LPIPS-VGG16 weights of the right shapes, drawn at random (the work of
    the network does not depend on them), as an F32 safetensors file."""
    import numpy as np
    rng = np.random.default_rng(0)
    tensors, cin, idx = {}, 3, 0
    for v in VGG16_CFG:
        if v == "M":
            idx += 1
            continue
        bound = 1.0 / math.sqrt(cin * 9)
        tensors["features.%d.weight" % idx] = rng.uniform(-bound, bound, (v, cin, 3, 3))
        tensors["features.%d.bias" % idx] = rng.uniform(-bound, bound, (v,))
        cin, idx = v, idx + 2  # conv, relu
    for k, c in enumerate(TAP_WIDTHS):
        tensors["lin%d.model.1.weight" % k] = rng.uniform(0, 0.1, (1, c, 1, 1))
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        b = tensors[name].astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + b"".join(blobs))


def build(torch):
    nn = torch.nn

    class LPIPS(nn.Module):
        """LPIPS-VGG16 v0.1, eval semantics (no dropout)."""

        def __init__(self):
            super().__init__()
            layers, cin = [], 3
            for v in VGG16_CFG:
                if v == "M":
                    layers.append(nn.MaxPool2d(2, 2))
                else:
                    layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
                    cin = v
            self.features = nn.Sequential(*layers)  # indices as torchvision's vgg16().features[:30]
            self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAP_WIDTHS)
            self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
            self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

        def load(self, path):
            state = read_safetensors(path)
            with torch.no_grad():
                for i, m in enumerate(self.features):
                    if isinstance(m, nn.Conv2d):
                        m.weight.copy_(state["features.%d.weight" % i])
                        m.bias.copy_(state["features.%d.bias" % i])
                for k, lin in enumerate(self.lins):
                    lin.weight.copy_(state["lin%d.model.1.weight" % k])

        def taps(self, x):
            h, out = (x - self.shift) / self.scale, []
            for i, layer in enumerate(self.features):
                h = layer(h)
                if i in TAPS:
                    out.append(h)
            return out

        @staticmethod
        def unit(f):
            return f / (torch.sqrt(torch.sum(f * f, dim=1, keepdim=True)) + 1e-10)

        def forward(self, a, b):
            total = 0.0
            for lin, fa, fb in zip(self.lins, self.taps(a), self.taps(b)):
                d = (self.unit(fa) - self.unit(fb)) ** 2
                total = total + lin(d).mean(dim=(2, 3), keepdim=True)
            return total  # [B, 1, 1, 1]

    class NLayerDiscriminator(nn.Module):
        """taming's PatchGAN (input_nc 3, ndf 64, n_layers 3, BatchNorm)."""

        def __init__(self, input_nc=3, ndf=64, n_layers=3):
            super().__init__()
            seq = [nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
            mult = 1
            for n in range(1, n_layers + 1):
                prev, mult = mult, min(2 ** n, 8)
                seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2 if n < n_layers else 1, 1, bias=False),
                        nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
            seq.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
            self.main = nn.Sequential(*seq)
            for m in self.modules():  # taming's weights_init
                if isinstance(m, nn.Conv2d):
                    nn.init.normal_(m.weight, 0.0, 0.02)
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.normal_(m.weight, 1.0, 0.02)
                    nn.init.zeros_(m.bias)

        def forward(self, x):
            return self.main(x)

    return LPIPS, NLayerDiscriminator


def main():
    p = argparse.ArgumentParser()
    p.add_argument("op", choices=["train"])
    p.add_argument("size", type=int)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--config", choices=sorted(CONFIGS), default="sd")
    p.add_argument("--lpips", default=None, help="LPIPS-VGG16 safetensors file")
    p.add_argument("--gan", type=int, choices=[0, 1], default=0)
    p.add_argument("--adaptive", choices=["grad", "split"], default="grad")
    p.add_argument("--verbose", action="store_true", help="print each step's losses to stderr")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--amp", choices=["none", "bf16"], default="none")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--write-random-lpips", metavar="FILE")
    a = p.parse_args()
    if a.write_random_lpips:
        write_random_lpips(a.write_random_lpips)
        return
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL

    threads = a.threads or len(os.sched_getaffinity(0))
    dev = torch.device(a.device)
    cuda = a.device == "cuda"
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    LPIPS, NLayerDiscriminator = build(torch)

    widths, layers, groups = CONFIGS[a.config]
    vae = AutoencoderKL(block_out_channels=widths, layers_per_block=layers, norm_num_groups=groups,
                        latent_channels=4, down_block_types=["DownEncoderBlock2D"] * len(widths),
                        up_block_types=["UpDecoderBlock2D"] * len(widths)).to(dev).train()
    opt_ae = torch.optim.Adam(vae.parameters(), lr=1e-5, betas=(0.5, 0.9), eps=1e-8)
    last = vae.decoder.conv_out.weight

    lpips = None
    if a.lpips:
        lpips = LPIPS()
        lpips.load(a.lpips)
        lpips = lpips.to(dev).eval().requires_grad_(False)
    disc = opt_d = None
    if a.gan:
        disc = NLayerDiscriminator().to(dev).train()
        opt_d = torch.optim.Adam(disc.parameters(), lr=1e-5, betas=(0.5, 0.9), eps=1e-8)

    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.rand((a.batch, 3, a.size, a.size), generator=g, device=dev) * 2 - 1
    B = a.batch
    amp = (torch.autocast(device_type=a.device, dtype=torch.bfloat16) if a.amp == "bf16"
           else __import__("contextlib").nullcontext())
    encode, decode = vae.encode, vae.decode
    if a.compile:
        # the adaptive weight takes gradients with retain_graph=True, which a
        # compiled backward that donates its buffers refuses (seen on torch 2.11)
        import torch._functorch.config as functorch_config
        functorch_config.donated_buffer = False
        encode, decode = torch.compile(vae.encode), torch.compile(vae.decode)
        if lpips is not None:
            lpips = torch.compile(lpips)
        if disc is not None:
            disc = torch.compile(disc)

    def step():
        # ---- the autoencoder (generator) step; D frozen as Lightning toggles it
        if disc is not None:
            disc.requires_grad_(False)
        with amp:
            posterior = encode(x).latent_dist
            z = posterior.sample(generator=g)
            xhat = decode(z).sample.float()
            rec = (x - xhat).abs()
            p = None
            if lpips is not None:
                p = lpips(x, xhat).float()
                rec = rec + p
        nll = rec.sum() / B
        kl = posterior.kl().sum() / B
        log = {"rec": rec.mean().item(), "perceptual": p.mean().item() if p is not None else 0.0,
               "nll": nll.item(), "kl": kl.item()}
        opt_ae.zero_grad(set_to_none=True)
        if disc is None:
            total = nll + 1e-6 * kl
            total.backward()
        else:
            with amp:
                g_loss = -torch.mean(disc(xhat).float())
            if a.adaptive == "grad":
                gn = torch.autograd.grad(nll, last, retain_graph=True)[0]
                gg = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
                d_weight = torch.clamp(torch.norm(gn) / (torch.norm(gg) + 1e-4), 0.0, 1e4).detach() * 0.5
                total = nll + 1e-6 * kl + d_weight * g_loss
                total.backward()
            else:
                gx_nll = torch.autograd.grad(nll, xhat, retain_graph=True)[0]
                gx_g = torch.autograd.grad(g_loss, xhat, retain_graph=True)[0]
                gn = torch.autograd.grad(xhat, last, gx_nll, retain_graph=True)[0]
                gg = torch.autograd.grad(xhat, last, gx_g, retain_graph=True)[0]
                d_weight = torch.clamp(torch.norm(gn) / (torch.norm(gg) + 1e-4), 0.0, 1e4).detach() * 0.5
                total = nll + 1e-6 * kl + d_weight * g_loss
                torch.autograd.backward([xhat, 1e-6 * kl], [gx_nll + d_weight * gx_g, None])
            log.update(g=g_loss.item(), d_weight=d_weight.item())
        log["total"] = total.item()
        opt_ae.step()
        # ---- the discriminator step on x and the same x'
        if disc is not None:
            disc.requires_grad_(True)
            with amp:
                logits_real = disc(x).float()
                logits_fake = disc(xhat.detach()).float()
            d_loss = 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            opt_d.step()
            log.update(d_loss=d_loss.item(), logits_real=logits_real.mean().item(),
                       logits_fake=logits_fake.mean().item())
        return log

    times = []
    warm = 3 if a.compile else 1
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for r in range(-warm, a.runs):  # the first runs warm up (and compile)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        log = step()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if r >= 0:
            times.append(dt)
        if a.verbose:
            sys.stderr.write("bench_train_pytorch: step %d %s (%.3f s)\n" % (
                r + 1, " ".join("%s %.6g" % kv for kv in log.items()), dt))
            if not all(math.isfinite(v) for v in log.values()):
                sys.exit("bench_train_pytorch: a loss is not finite")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    median = statistics.median(times)
    out = {"impl": "pytorch", "op": "train", "size": a.size, "batch": a.batch,
           "threads": threads, "config": a.config, "gan": a.gan, "lpips": lpips is not None,
           "adaptive": a.adaptive, "device": a.device, "amp": a.amp, "compile": a.compile,
           "times": [round(t, 4) for t in times], "median": round(median, 4),
           "images_per_s": round(a.batch / median, 3), "peak_rss_mb": round(peak, 1),
           "torch": torch.__version__}
    if cuda:
        out["peak_device_mb"] = round(torch.cuda.max_memory_allocated() / 1048576.0, 1)
        out["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
