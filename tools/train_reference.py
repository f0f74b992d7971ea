#!/usr/bin/env python3
"""Regenerate the training reference fixtures of tests/fixtures/train/.

Needs: pip install torch diffusers safetensors numpy   (CI does not run this;
the fixtures it writes are committed). Deterministic: fixed seeds, one thread.

This docstring is the contract the C trainer's tests rely on. The semantics
are those of /work/shared/spec/training.md (the LDM `LPIPSWithDiscriminator`
step, PL 1.4 mechanics) with the settings below. Everything is computed in
float64 from float32-representable starting values (initial weights and
images are rounded to float32 first, so the float32 files describe exactly the
model that was run). Parameter and activation tensors are stored as F32;
loss values (`loss.*`, and the per-image LPIPS values `lpips.value`,
`lpips.zero_value`, `lpips.0`) are stored as F64.

Networks
--------
VAE      diffusers AutoencoderKL(block_out_channels=[8,16], layers_per_block=1,
         norm_num_groups=4, latent_channels=4, act_fn="silu", 2 x
         DownEncoderBlock2D / UpDecoderBlock2D; quant convs and mid-block
         attention on), f = 2. diffusers init with torch.manual_seed(SEED_VAE),
         then perturbed with a generator seeded SEED_VAE+1 (as
         tools/make_fixtures.py): norm weights 1+0.25*randn, biases
         0.1*randn, other weights *= 1+0.1*randn; rounded to float32.
LPIPS    "tiny VGG16": torchvision VGG16 `features` layout (13 3x3 convs, pad
         1, bias; ReLU after each; 2x2/2 max pools at indices 4, 9, 16, 23,
         floor for odd sizes) with widths 8, 16, 32, 32, 32. Taps = outputs of
         indices 3, 8, 15, 22, 29 (relu1_2 ... relu5_3). Conv weights
         randn*sqrt(2/fan_in), biases 0.05*randn; lin{k} weights [1,w_k,1,1]
         = U(0.05,1)*4/w_k (positive). Input scaling (t-shift)/scale, shift
         (-.030,-.088,-.188), scale (.458,.448,.450). Per tap
         n = f/(sqrt(sum_c f^2)+1e-10); d = (n(a)-n(b))^2; 1x1 conv with lin
         (no bias); mean over H,W; LPIPS_b = sum of the 5 taps. No dropout.
D        taming NLayerDiscriminator semantics, input_nc 3, ndf 8, n_layers 3:
         main.0 conv 3->8 k4 s2 p1 +bias, LReLU(0.2), main.2 conv 8->16 k4 s2
         p1, main.3 BN(16), LReLU, main.5 conv 16->32 k4 s2 p1, main.6 BN(32),
         LReLU, main.8 conv 32->64 k4 s1 p1, main.9 BN(64), LReLU, main.11
         conv 64->1 k4 s1 p1 +bias. Conv weights N(0,0.02), conv biases
         PyTorch default U(+-1/sqrt(fan_in)), BN weight N(1,0.02), bias 0,
         running mean 0 / var 1; rounded to float32. BN always in train mode:
         batch statistics with biased variance; running stats updated with
         momentum 0.1 and the unbiased variance (n/(n-1)), eps 1e-5.
Images   batch 2, 3 x 32 x 40, U[-1,1] (float32 values). D gives 2x1x2x3
         logits; LPIPS taps are 32x40, 16x20, 8x10, 4x5, 2x2; latents 4x16x20.

Training step k = global_step = 0, 1, 2 on batch x.k (B = 2)
-------------------------------------------------------------
A (generator; D's parameters frozen, D in train mode):
    moments = quant_conv(encoder(x)); mean, lv = split; lv = clamp(lv,-30,20)
    x^ = decode(mean)                          (posterior mode: no noise)
    p_b = LPIPS(x, x^)_b                       [B,1,1,1]
    rec = |x - x^| + 1.0 * p_b                 (broadcast; logvar fixed at 0)
    nll = sum(rec)/B;  kl = sum_b 0.5*sum_chw(mean^2 + exp(lv) - 1 - lv) / B
    logits_fake = D(x^)                        (updates BN running stats)
    g_loss = -mean(logits_fake)
    lambda = 0.5 * clamp(|d nll/dW| / (|d g_loss/dW| + 1e-4), 0, 1e4),
             W = decoder.conv_out.weight, Frobenius norms, detached
    f = 1.0 (disc_start 0, disc_factor 1)
    total = nll + 0.01*kl + lambda*f*g_loss;  backward;  Adam step (all VAE
    parameters).
B (discriminator; VAE frozen): a fresh encode/decode of x with the UPDATED
    VAE: x^2 = decode(mean(encode(x))); logits_real = D(x), logits_fake2 =
    D(x^2): two separate train-mode forwards (each updates running stats);
    d_loss = f*0.5*(mean(relu(1-logits_real)) + mean(relu(1+logits_fake2)));
    backward; Adam step (D's conv weights/biases, BN weights/biases).
Adam (both): lr 1e-4, betas (0.5, 0.9), eps 1e-8, no weight decay, t from 1:
    m = b1*m + (1-b1)*g; v = b2*v + (1-b2)*g^2;
    p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
    (evaluated with PyTorch's own operation order; checked bit-equal with
    torch.optim.Adam(foreach=False)).
BN running stats receive 9 updates over the run (A-fake, B-real, B-fake per
step).

Files (tests/fixtures/train/)
-----------------------------
vae/                   diffusers save_pretrained of the initial VAE (F32)
lpips.safetensors      features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.{weight,
                       bias}, lin{0..4}.model.1.weight
disc.safetensors       initial D: main.0.{weight,bias}, main.{2,5,8}.weight,
                       main.{3,6,9}.{weight,bias,running_mean,running_var},
                       main.11.{weight,bias}
steps.safetensors      x.0 x.1 x.2 [2,3,32,40];
                       loss.k.{total,rec,perceptual,nll,kl,g_loss,d_weight,
                       disc_factor,d_loss,logits_real,logits_fake} F64 [1]
                       (rec = mean of the broadcast rec tensor; perceptual =
                       batch mean of p_b; kl unweighted; d_weight = lambda
                       including x0.5; logits_* = means of pass B's logits);
                       grad.vae.<diffusers name> = d total/d param at step 0;
                       grad.disc.<name> = d d_loss/d param at step 0;
                       x_hat.0 = x^ of pass A step 0; lpips.0 [2] = p_b at
                       step 0 (F64); final.vae.<name>, final.disc.<name>
                       after 3 steps, incl. final.disc.main.{3,6,9}.
                       running_{mean,var}.
unit.safetensors       each network alone, initial weights:
  lpips.a, lpips.b [2,3,32,40]; lpips.value [2] (F64) = LPIPS(a,b);
  lpips.grad_b = d sum(lpips.value)/d b.
  lpips.zero_b, lpips.zero_mask, lpips.zero_value, lpips.zero_grad_b: a
  second pair whose image 0 has a constant dark patch that zeroes every
  relu1_2 feature, written only when such a patch exists for the LPIPS
  weights (with the widths above it does not: lpips.b already has 9 pixels
  of exactly zero norm at the first tap, see run.json).
  disc.input [2,3,32,40], disc.upstream [2,1,2,3]; one train-mode forward:
  disc.logits; backward of sum(logits*upstream): disc.grad_input,
  disc.grad.<param name>; disc.running.main.{3,6,9}.running_{mean,var}
  after that one forward.
  vae.x [2,3,32,40], vae.r_decoded [2,3,32,40], vae.r_mean, vae.r_logvar
  [2,4,16,20]; vae.mean, vae.logvar (clamped), vae.decoded = decode(mean);
  loss = sum(decoded*r_decoded) + sum(mean*r_mean) + sum(logvar*r_logvar):
  vae.grad_x, vae.grad.<diffusers name>.
run.json               hyperparameters, shapes, seeds, versions, the logged
                       values, and the margins listed below.

Notes for the comparisons
-------------------------
* LPIPS(a, b) is called with a = x and b = x^; only b gets a gradient.
* Conditioning. The widths (8, 16, 32, 32, 32) and lr 1e-4 are chosen so
  that float32 can meet the 1e-4 comparisons: with widths (4, 8, 16, 16,
  16) a quarter of the first tap's pixels had norms near zero, built by
  cancellation, and Adam at lr 1e-3 amplified float32 round-off over the
  three steps until PyTorch's own float32 run missed this float64 reference
  by 1.5e-4 (--float32-report measures it).
* Zero-norm pixels: a few first-tap pixels of the LPIPS inputs have r = 0
  exactly (counts in run.json, "lpips_tap_norms"). There n = 0, and the reference gradient through that
  pixel is 0: PyTorch's normalisation backward gives NaN there, which the
  ReLU backward (grad where pre > 0, else 0) replaces by 0. A C trainer must
  give 0 there (no NaN). The smallest nonzero r in any evaluation is ~5e-5
  and the r = 0 pixels are >= 2.8e-4 (pre-activation) from turning nonzero,
  far above float32 round-off.
* decoder/encoder mid_block.attentions.0.to_k.bias have a mathematically
  zero gradient (a key bias adds a per-query constant that softmax removes);
  the stored grad.vae/vae.grad values there are float64 round-off (~1e-14).
  Adam turns round-off into full +-lr steps: the float64 reference moves
  them by < 1e-9, a float32 trainer by up to ~3e-3 (3 steps). They have no
  effect on any output. Compare them with an absolute tolerance, or skip.
* `--float32-report` reruns everything in float32 PyTorch and prints the
  deviation from these files, i.e. what a float32 trainer can expect: about
  1e-5 of max|ref| for forward values and gradients, 1.5e-4 relative for the
  losses at step 2 (d_weight is the most sensitive), and final parameters
  within 1e-4 absolute (apart from to_k.bias).
"""
import copy
import json
import math
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "train")
B, H, W = 2, 32, 40
STEPS = 3

SEED_VAE, SEED_LPIPS, SEED_DISC, SEED_DATA, SEED_UNIT, SEED_CHECK = 3100, 3211, 3300, 3400, 3500, 3600

VAE_CONFIG = dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
                  latent_channels=4, act_fn="silu",
                  down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2)

COMPUTE = torch.float64  # --float32-report switches this to float32 (no files written)
CHECKS = True            # finite-difference / manual self-checks (float64 only)

HP = dict(pixel_loss="l1", perceptual_weight=1.0, kl_weight=0.01, posterior="mode",
          logvar=0.0, logvar_learned=False, lpips_dropout=False, disc_start=0,
          disc_factor=1.0, disc_weight=0.5, disc_loss="hinge", d_weight_eps=1e-4,
          d_weight_clamp=[0.0, 1e4], last_layer="decoder.conv_out.weight",
          logvar_clamp=[-30.0, 20.0],
          adam=dict(lr=1e-4, betas=[0.5, 0.9], eps=1e-8, weight_decay=0.0, amsgrad=False),
          bn=dict(eps=1e-5, momentum=0.1, mode="train"), leaky_relu_slope=0.2,
          lpips_eps=1e-10, steps=STEPS, global_steps=list(range(STEPS)), batch=B)

# ---------------------------------------------------------------- helpers


def f32(t):
    """Round to a float32 value, computed on in float64."""
    return t.float().double()


def randn(g, *shape):
    return torch.randn(shape, generator=g, dtype=torch.float64)


def rand_pm1(g, *shape):
    """U[-1, 1] with float32 values."""
    return f32(torch.rand(shape, generator=g, dtype=torch.float32) * 2.0 - 1.0)


def scalar(v):
    return torch.tensor([float(v)], dtype=torch.float64)


def to32(t):
    return t.detach().float().contiguous()


def cv(t):
    """To the compute dtype."""
    return t.to(COMPUTE)


# ---------------------------------------------------------------- VAE


def make_vae():
    torch.manual_seed(SEED_VAE)
    vae = AutoencoderKL(**VAE_CONFIG)
    g = torch.Generator().manual_seed(SEED_VAE + 1)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.25 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.mul_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    return vae.float().double().train()  # float32 values, float64 compute; no dropout anyway


def vae_forward(vae, x):
    """(mean, clamped logvar, posterior, decoded = decode(mean))."""
    post = vae.encode(x).latent_dist
    return post.mean, post.logvar, post, vae.decode(post.mode()).sample


# ---------------------------------------------------------------- LPIPS

VGG_WIDTHS = (8, 16, 32, 32, 32)
VGG_CFG = (0, 0, "M", 1, 1, "M", 2, 2, 2, "M", 3, 3, 3, "M", 4, 4, 4)
TAPS = (3, 8, 15, 22, 29)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_EPS = 1e-10


def vgg_layers():
    """[(feature index, kind, cin, cout)] in the torchvision layout."""
    layers, idx, cin = [], 0, 3
    for c in VGG_CFG:
        if c == "M":
            layers.append((idx, "pool", None, None))
            idx += 1
        else:
            layers.append((idx, "conv", cin, VGG_WIDTHS[c]))
            layers.append((idx + 1, "relu", None, None))
            cin, idx = VGG_WIDTHS[c], idx + 2
    return layers


def make_lpips():
    g = torch.Generator().manual_seed(SEED_LPIPS)
    params = {}
    for idx, kind, cin, cout in vgg_layers():
        if kind == "conv":
            params["features.%d.weight" % idx] = f32(randn(g, cout, cin, 3, 3) * math.sqrt(2.0 / (cin * 9)))
            params["features.%d.bias" % idx] = f32(0.05 * randn(g, cout))
    for k, w in enumerate(VGG_WIDTHS):
        u = torch.rand((1, w, 1, 1), generator=g, dtype=torch.float64)
        params["lin%d.model.1.weight" % k] = f32((0.05 + 0.95 * u) * 4.0 / w)
    return params


def vgg_taps(params, x, preact=None):
    """The five tap tensors of the scaled input. preact, if a dict, receives
    the conv outputs (before ReLU) by feature index."""
    shift = torch.tensor(LPIPS_SHIFT, dtype=x.dtype).view(1, 3, 1, 1)
    scale = torch.tensor(LPIPS_SCALE, dtype=x.dtype).view(1, 3, 1, 1)
    h = (x - shift) / scale
    taps = []
    for idx, kind, _, _ in vgg_layers():
        if kind == "conv":
            h = F.conv2d(h, params["features.%d.weight" % idx], params["features.%d.bias" % idx], padding=1)
            if preact is not None:
                preact[idx] = h
        elif kind == "relu":
            h = F.relu(h)
            if idx in TAPS:
                taps.append(h)
        else:
            h = F.max_pool2d(h, 2, 2)  # floor for odd sizes
    assert [tuple(t.shape[1:]) for t in taps] == [
        (w, x.shape[2] >> k, x.shape[3] >> k) for k, w in enumerate(VGG_WIDTHS)] or x.shape[2:] != (H, W)
    return taps


def unit_normalize(f):
    return f / (torch.sqrt(torch.sum(f * f, dim=1, keepdim=True)) + LPIPS_EPS)


def lpips(params, a, b):
    """[B,1,1,1] LPIPS distance, eval semantics (no dropout)."""
    total = 0.0
    for k, (fa, fb) in enumerate(zip(vgg_taps(params, a), vgg_taps(params, b))):
        d = (unit_normalize(fa) - unit_normalize(fb)) ** 2
        total = total + F.conv2d(d, params["lin%d.model.1.weight" % k]).mean(dim=(2, 3), keepdim=True)
    return total


def tap_norm_stats(params, x):
    """Per tap: [pixels whose norm r is exactly 0, smallest nonzero r, smallest
    |max_c pre-activation| over the r = 0 pixels]. The last two say how far
    each pixel is from the discontinuity of f/(r+eps) at f = 0."""
    out = []
    pre = {}
    with torch.no_grad():
        for tap, f in zip(TAPS, vgg_taps(params, x, pre)):
            r = torch.sqrt((f * f).sum(1))
            nz = r[r > 0]
            zmax = pre[tap - 1].max(1).values[r == 0]
            out.append([int((r == 0).sum()), float(nz.min()) if nz.numel() else None,
                        float(-zmax.max()) if zmax.numel() else None])
    return out


# ---------------------------------------------------------------- discriminator

DISC_NDF = 8


class Discriminator(torch.nn.Module):
    """PatchGAN (taming NLayerDiscriminator semantics, spec section 5)."""

    def __init__(self, input_nc=3, ndf=DISC_NDF, n_layers=3):
        super().__init__()
        layers = [torch.nn.Conv2d(input_nc, ndf, 4, 2, 1), torch.nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [torch.nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                       torch.nn.BatchNorm2d(ndf * mult, eps=1e-5, momentum=0.1),
                       torch.nn.LeakyReLU(0.2)]
        layers.append(torch.nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = torch.nn.Sequential(*layers)

    def forward(self, x):
        return self.main(x)


def make_disc():
    torch.manual_seed(SEED_DISC)  # conv biases: PyTorch's default U(+-1/sqrt(fan_in))
    d = Discriminator()
    g = torch.Generator().manual_seed(SEED_DISC + 1)
    with torch.no_grad():
        for m in d.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.copy_(0.02 * torch.randn(m.weight.shape, generator=g))
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(1.0 + 0.02 * torch.randn(m.weight.shape, generator=g))
                m.bias.zero_()
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
    return d.float().double().train()


def disc_state(d):
    """Parameters and running stats (no num_batches_tracked)."""
    return {k: v for k, v in d.state_dict().items() if not k.endswith("num_batches_tracked")}


def hinge_d_loss(real, fake):
    return 0.5 * (torch.mean(F.relu(1.0 - real)) + torch.mean(F.relu(1.0 + fake)))


def adopt_weight(weight, global_step, threshold):
    return 0.0 if global_step < threshold else weight


# ---------------------------------------------------------------- Adam


class Adam:
    """Spec 3.5 Adam, in PyTorch's operation order (lerp for m, mul+addcmul
    for v, sqrt(v)/sqrt(bc2)+eps, addcdiv by -lr/bc1)."""

    def __init__(self, params, lr, betas, eps):
        self.params, self.lr, self.b1, self.b2, self.eps = list(params), lr, betas[0], betas[1], eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    @torch.no_grad()
    def step(self):
        self.t += 1
        bc1, bc2 = 1.0 - self.b1 ** self.t, 1.0 - self.b2 ** self.t
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad
            m.lerp_(g, 1.0 - self.b1)  # = b1*m + (1-b1)*g
            v.mul_(self.b2).addcmul_(g, g, value=1.0 - self.b2)
            denom = (v.sqrt() / bc2 ** 0.5).add_(self.eps)
            p.addcdiv_(m, denom, value=-(self.lr / bc1))


# ---------------------------------------------------------------- self-checks


def fd(fun, t, index, h=1e-6):
    with torch.no_grad():
        old = t[index].item()
        t[index] = old + h
        up = fun().item()
        t[index] = old - h
        dn = fun().item()
        t[index] = old
    return (up - dn) / (2 * h)


def close(a, b, rtol, atol=0.0):
    return abs(a - b) <= atol + rtol * max(abs(a), abs(b))


def check_normalize():
    """Spec 7.1 normalisation backward vs autograd vs finite differences."""
    g = torch.Generator().manual_seed(SEED_CHECK)
    f = randn(g, 2, 5, 3, 4)
    f[0, :, 1, 1] *= 1e-3  # a small-norm pixel
    f.requires_grad_(True)
    up = randn(g, 2, 5, 3, 4)
    (unit_normalize(f) * up).sum().backward()
    with torch.no_grad():
        r = torch.sqrt((f * f).sum(1, keepdim=True))
        manual = up / (r + LPIPS_EPS) - f * (up * f).sum(1, keepdim=True) / ((r + LPIPS_EPS) ** 2 * r)
    assert torch.allclose(f.grad, manual, rtol=1e-12, atol=1e-12)
    fx = f.detach().clone()
    for index in [(0, 0, 0, 0), (0, 3, 1, 2), (1, 4, 2, 3), (1, 1, 0, 1), (0, 2, 1, 1)]:
        num = fd(lambda: (unit_normalize(fx) * up).sum(), fx, index)
        assert close(num, f.grad[index].item(), 1e-6, 1e-9), (index, num, f.grad[index].item())


def check_lpips_grad(params, a, b, grad_b):
    bb = b.clone()
    for index in [(0, 0, 0, 0), (0, 1, 13, 17), (1, 2, 31, 39), (1, 0, 20, 5), (0, 2, 7, 30)]:
        num = fd(lambda: lpips(params, a, bb).sum(), bb, index)
        assert close(num, grad_b[index].item(), 1e-5, 1e-9), ("lpips", index, num, grad_b[index].item())


def check_adam():
    g = torch.Generator().manual_seed(SEED_CHECK + 1)
    a = randn(g, 7, 5).requires_grad_(True)
    b = a.detach().clone().requires_grad_(True)
    mine = Adam([a], HP["adam"]["lr"], HP["adam"]["betas"], HP["adam"]["eps"])
    ref = torch.optim.Adam([b], lr=HP["adam"]["lr"], betas=tuple(HP["adam"]["betas"]),
                           eps=HP["adam"]["eps"], weight_decay=0.0, foreach=False)
    for i in range(4):
        grad = randn(g, 7, 5) * (10.0 ** (i - 2))
        grad[0, 0] = 0.0
        a.grad, b.grad = grad.clone(), grad.clone()
        mine.step()
        ref.step()
        assert torch.equal(a, b), "Adam differs from torch.optim.Adam at step %d" % (i + 1)


def check_disc_grad(disc0, x, upstream, grads, grad_input):
    d = copy.deepcopy(disc0)
    xx = x.clone()
    fun = lambda: (d(xx) * upstream).sum()
    for index in [(0, 0, 3, 4), (1, 2, 30, 39)]:
        num = fd(fun, xx, index)
        assert close(num, grad_input[index].item(), 1e-5, 1e-10), ("disc input", index, num)
    params = dict(d.named_parameters())
    for name, index in [("main.0.weight", (3, 1, 2, 2)), ("main.5.weight", (7, 3, 0, 1)),
                        ("main.6.weight", (5,)), ("main.9.bias", (11,)), ("main.11.bias", (0,))]:
        num = fd(fun, params[name].data, index)
        assert close(num, grads[name][index].item(), 1e-5, 1e-10), ("disc", name, index, num)


def check_vae_grad(vae0, x, rd, rm, rl, grads):
    v = copy.deepcopy(vae0)

    def fun():
        mean, logvar, _, dec = vae_forward(v, x)
        return (dec * rd).sum() + (mean * rm).sum() + (logvar * rl).sum()

    params = dict(v.named_parameters())
    for name, index in [("encoder.conv_in.weight", (2, 1, 0, 2)),
                        ("encoder.mid_block.attentions.0.to_q.weight", (3, 5)),
                        ("quant_conv.bias", (6,)), ("decoder.conv_norm_out.weight", (1,)),
                        ("decoder.up_blocks.1.resnets.0.conv2.weight", (4, 2, 1, 1))]:
        num = fd(fun, params[name].data, index)
        assert close(num, grads[name][index].item(), 1e-6, 1e-9), ("vae", name, index, num)


# ---------------------------------------------------------------- fixtures


def zero_patch(params, b):
    """b with a constant patch in image 0 whose relu1_2 features vanish.
    Returns (b_zero, patch colour) or (None, None)."""
    w0, b0 = params["features.0.weight"].double(), params["features.0.bias"].double()
    w2, b2 = params["features.2.weight"].double(), params["features.2.bias"].double()
    grid = torch.linspace(-1.0, 1.0, 21, dtype=torch.float64)
    cols = torch.cartesian_prod(grid, grid, grid)  # [N,3]
    shift = torch.tensor(LPIPS_SHIFT, dtype=torch.float64)
    scale = torch.tensor(LPIPS_SCALE, dtype=torch.float64)
    s = (cols - shift) / scale
    h1 = F.relu(s @ w0.sum((2, 3)).T + b0)  # constant-image relu1_1
    pre2 = h1 @ w2.sum((2, 3)).T + b2       # constant-image conv1_2
    worst = pre2.max(1).values
    best = int(worst.argmin())
    if worst[best] > -0.05:
        return None, None
    colour = f32(cols[best])
    bz = b.clone()
    bz[0, :, 8:24, 10:30] = colour.view(3, 1, 1).to(b.dtype)
    pre = {}
    with torch.no_grad():
        vgg_taps(params, bz, pre)
    inner = pre[2][0, :, 10:22, 12:28]
    assert inner.max() <= -0.05, inner.max()
    return bz, colour


def unit_fixtures(vae0, lp, disc0):
    g = torch.Generator().manual_seed(SEED_UNIT)
    u = {}
    stats = {}
    # LPIPS
    a, b = cv(rand_pm1(g, B, 3, H, W)), cv(rand_pm1(g, B, 3, H, W))
    bg = b.clone().requires_grad_(True)
    val = lpips(lp, a, bg)
    val.sum().backward()
    if CHECKS:
        check_lpips_grad(lp, a, b, bg.grad)
    u.update({"lpips.a": to32(a), "lpips.b": to32(b), "lpips.value": val.detach().view(B).clone(),
              "lpips.grad_b": to32(bg.grad)})
    stats["lpips_unit_a_taps"] = tap_norm_stats(lp, a)
    stats["lpips_unit_b_taps"] = tap_norm_stats(lp, b)
    bz, colour = zero_patch(lp, b)
    if bz is not None:
        bzg = bz.clone().requires_grad_(True)
        vz = lpips(lp, a, bzg)
        vz.sum().backward()
        gz = bzg.grad
        assert torch.isfinite(gz).all()
        assert torch.all(gz[0, :, 12:20, 14:26] == 0)  # all paths pass relu1_2 within 2 px
        with torch.no_grad():
            t0 = vgg_taps(lp, bz)[0]
            mask = (torch.sqrt((t0 * t0).sum(1, keepdim=True)) == 0).float()
        assert mask[0, 0, 10:22, 12:28].all()
        if CHECKS:
            check_lpips_grad(lp, a, bz, gz)
        u.update({"lpips.zero_b": to32(bz), "lpips.zero_mask": mask.contiguous(),
                  "lpips.zero_value": vz.detach().view(B).clone(), "lpips.zero_grad_b": to32(gz)})
        stats["lpips_zero_colour"] = colour.tolist()
        stats["lpips_zero_b_taps"] = tap_norm_stats(lp, bz)
    else:
        stats["lpips_zero_colour"] = None
    # Discriminator
    d = copy.deepcopy(disc0)
    x = cv(rand_pm1(g, B, 3, H, W))
    up = cv(f32(randn(g, B, 1, 2, 3)))
    xg = x.clone().requires_grad_(True)
    d_check = copy.deepcopy(disc0)
    bn_in = {}
    hooks = [d.main[i].register_forward_hook(lambda m, i, o, i_=i: bn_in.update({i_: i[0].detach()}))
             for i in (3, 6, 9)]
    logits = d(xg)
    for hk in hooks:
        hk.remove()
    assert logits.shape == (B, 1, 2, 3), logits.shape
    if CHECKS:  # running stats: momentum 0.1, unbiased batch variance
        for i, t in bn_in.items():
            assert torch.allclose(d.main[i].running_mean, 0.1 * t.mean((0, 2, 3)), rtol=1e-13, atol=1e-16)
            assert torch.allclose(d.main[i].running_var, 0.9 + 0.1 * t.var((0, 2, 3), unbiased=True),
                                  rtol=1e-13)
    (logits * up).sum().backward()
    dgrads = {n: p.grad.detach().clone() for n, p in d.named_parameters()}
    if CHECKS:
        check_disc_grad(d_check, x, up, dgrads, xg.grad)
    u.update({"disc.input": to32(x), "disc.upstream": to32(up), "disc.logits": to32(logits),
              "disc.grad_input": to32(xg.grad)})
    u.update({"disc.grad." + n: to32(v) for n, v in dgrads.items()})
    u.update({"disc.running." + n: to32(v) for n, v in disc_state(d).items() if ".running_" in n})
    # VAE
    v = copy.deepcopy(vae0)
    x = cv(rand_pm1(g, B, 3, H, W))
    rd = cv(f32(randn(g, B, 3, H, W)))
    rm, rl = cv(f32(randn(g, B, 4, H // 2, W // 2))), cv(f32(randn(g, B, 4, H // 2, W // 2)))
    xg = x.clone().requires_grad_(True)
    mean, logvar, _, dec = vae_forward(v, xg)
    ((dec * rd).sum() + (mean * rm).sum() + (logvar * rl).sum()).backward()
    vgrads = {n: p.grad.detach().clone() for n, p in v.named_parameters()}
    if CHECKS:
        check_vae_grad(vae0, x, rd, rm, rl, vgrads)
    u.update({"vae.x": to32(x), "vae.r_decoded": to32(rd), "vae.r_mean": to32(rm),
              "vae.r_logvar": to32(rl), "vae.mean": to32(mean), "vae.logvar": to32(logvar),
              "vae.decoded": to32(dec), "vae.grad_x": to32(xg.grad)})
    u.update({"vae.grad." + n: to32(t) for n, t in vgrads.items()})
    for k, t in u.items():
        assert torch.isfinite(t).all(), k
    return u, stats


def train(vae, lp, disc, xs):
    out, logs, stats = {}, [], {}
    vae_params = list(vae.parameters())
    disc_params = list(disc.parameters())
    a = HP["adam"]
    opt_ae = Adam(vae_params, a["lr"], a["betas"], a["eps"])
    opt_d = Adam(disc_params, a["lr"], a["betas"], a["eps"])
    last = vae.decoder.conv_out.weight
    wp, klw = HP["perceptual_weight"], HP["kl_weight"]
    for step, x in enumerate(xs):
        f = adopt_weight(HP["disc_factor"], step, HP["disc_start"])
        # ---- pass A: generator, D frozen
        for p in disc_params:
            p.requires_grad_(False)
        for p in vae_params:
            p.requires_grad_(True)
        captured = {}
        hook = vae.decoder.conv_out.register_forward_hook(lambda m, i, o: captured.update(h=i[0]))
        mean, logvar, post, xhat = vae_forward(vae, x)
        hook.remove()
        p_lp = lpips(lp, x, xhat)
        rec = (x - xhat).abs() + wp * p_lp
        nll = rec.sum() / B
        kl_loss = post.kl().sum() / B
        logits_fake = disc(xhat)
        g_loss = -torch.mean(logits_fake)
        g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g_g = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        lam_raw = (torch.norm(g_nll) / (torch.norm(g_g) + HP["d_weight_eps"])).item()
        stats["lambda_raw_%d" % step] = lam_raw
        lam = min(max(lam_raw, HP["d_weight_clamp"][0]), HP["d_weight_clamp"][1]) * HP["disc_weight"]
        if step == 0 and CHECKS:
            # lambda by hand: conv weight gradients of the two x^ gradients.
            gx_nll, gx_g = torch.autograd.grad([nll], [xhat], retain_graph=True)[0], \
                torch.autograd.grad([g_loss], [xhat], retain_graph=True)[0]
            h = captured["h"]
            wn = torch.nn.grad.conv2d_weight(h, last.shape, gx_nll, padding=1)
            wg = torch.nn.grad.conv2d_weight(h, last.shape, gx_g, padding=1)
            assert torch.allclose(wn, g_nll, rtol=1e-12, atol=1e-12)
            assert torch.allclose(wg, g_g, rtol=1e-12, atol=1e-14)
            wn, wg = wn.detach(), wg.detach()
            manual = 0.5 * min(max(math.sqrt(float((wn ** 2).sum())) /
                                   (math.sqrt(float((wg ** 2).sum())) + 1e-4), 0.0), 1e4)
            assert close(manual, lam, 1e-12), (manual, lam)
        total = nll + klw * kl_loss + lam * f * g_loss
        for p in vae_params:
            p.grad = None
        total.backward()
        if step == 0 and CHECKS:  # finite differences of the total with lambda held fixed
            dcopy = copy.deepcopy(disc)

            def total_fd():
                _, _, post_, xh = vae_forward(vae, x)
                return ((x - xh).abs() + wp * lpips(lp, x, xh)).sum() / B + klw * post_.kl().sum() / B \
                    + lam * f * -torch.mean(dcopy(xh))

            named = dict(vae.named_parameters())
            for name, index in [("decoder.conv_out.weight", (1, 3, 2, 0)), ("encoder.conv_out.bias", (5,)),
                                ("decoder.up_blocks.0.resnets.0.norm1.weight", (7,)),
                                ("encoder.down_blocks.0.resnets.0.conv1.weight", (0, 2, 1, 1))]:
                num = fd(total_fd, named[name].data, index)
                assert close(num, named[name].grad[index].item(), 1e-6, 1e-7), ("total", name, num)
        if step == 0:
            for n, p in vae.named_parameters():
                out["grad.vae." + n] = to32(p.grad)
            out["x_hat.0"] = to32(xhat)
            out["lpips.0"] = p_lp.detach().view(B).clone()
        opt_ae.step()
        log = {"total": total.item(), "rec": rec.mean().item(), "perceptual": p_lp.mean().item(),
               "nll": nll.item(), "kl": kl_loss.item(), "g_loss": g_loss.item(), "d_weight": lam,
               "disc_factor": f}
        stats.setdefault("lpips_taps_xhat", []).append(tap_norm_stats(lp, xhat.detach()))
        stats.setdefault("lpips_taps_x", []).append(tap_norm_stats(lp, x))
        # ---- pass B: discriminator, VAE frozen, fresh reconstruction
        for p in vae_params:
            p.requires_grad_(False)
        for p in disc_params:
            p.requires_grad_(True)
        with torch.no_grad():
            _, _, _, xhat2 = vae_forward(vae, x)
        logits_real = disc(x)
        logits_fake2 = disc(xhat2)
        d_loss = f * hinge_d_loss(logits_real, logits_fake2)
        for p in disc_params:
            p.grad = None
        d_loss.backward()
        if step == 0 and CHECKS:
            dcopy = copy.deepcopy(disc)
            named = dict(dcopy.named_parameters())
            fun = lambda: f * hinge_d_loss(dcopy(x), dcopy(xhat2))
            for name, index in [("main.0.bias", (2,)), ("main.3.weight", (4,)), ("main.8.weight", (9, 30, 1, 2)),
                                ("main.11.weight", (0, 60, 3, 3))]:
                num = fd(fun, named[name].data, index, h=1e-7)  # LeakyReLU kinks lie ~1e-6 away
                got = dict(disc.named_parameters())[name].grad[index].item()
                assert close(num, got, 1e-5, 1e-8), ("d_loss", name, num, got)
        if step == 0:
            for n, p in disc.named_parameters():
                out["grad.disc." + n] = to32(p.grad)
        opt_d.step()
        log.update({"d_loss": d_loss.item(), "logits_real": logits_real.mean().item(),
                    "logits_fake": logits_fake2.mean().item()})
        logs.append(log)
        stats.setdefault("margins", []).append({
            "min_abs_x_minus_xhat": float((x - xhat).detach().abs().min()),
            "min_abs_1_minus_logits_real": float((1.0 - logits_real).detach().abs().min()),
            "min_abs_1_plus_logits_fake": float((1.0 + logits_fake2).detach().abs().min())})
        for k, v in log.items():
            out["loss.%d.%s" % (step, k)] = scalar(v)
    for p in vae_params + disc_params:
        p.requires_grad_(False)
    for n, p in vae.named_parameters():
        out["final.vae." + n] = to32(p)
    for n, t in disc_state(disc).items():
        out["final.disc." + n] = to32(t)
    return out, logs, stats


def reload_check(out, unit):
    """Rebuilds everything from the written files and reruns: the files must
    describe the run exactly (bit-equal results)."""
    global CHECKS
    from safetensors.torch import load_file
    CHECKS = False
    vae = AutoencoderKL.from_pretrained(os.path.join(OUT, "vae")).double().train()
    lp = {k: v.double() for k, v in load_file(os.path.join(OUT, "lpips.safetensors")).items()}
    disc = Discriminator()
    missing, unexpected = disc.load_state_dict(load_file(os.path.join(OUT, "disc.safetensors")), strict=False)
    assert not unexpected and all(k.endswith("num_batches_tracked") for k in missing), (missing, unexpected)
    disc = disc.double().train()
    steps = load_file(os.path.join(OUT, "steps.safetensors"))
    unit2, _ = unit_fixtures(copy.deepcopy(vae), lp, copy.deepcopy(disc))
    out2, _, _ = train(vae, lp, disc, [steps["x.%d" % i].double() for i in range(STEPS)])
    for ref, got in ((out, out2), (unit, unit2)):
        for k, v in got.items():
            assert torch.equal(v, ref[k]), k
    CHECKS = True


def folder_size(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def float32_report():
    """Runs the same fixtures in float32 and prints, per stored tensor, the
    deviation from the float64 files: what a float32 trainer can expect."""
    global COMPUTE, CHECKS
    from safetensors.torch import load_file
    COMPUTE, CHECKS = torch.float32, False
    vae, lp, disc = make_vae().float(), {k: v.float() for k, v in make_lpips().items()}, make_disc().float()
    g = torch.Generator().manual_seed(SEED_DATA)
    xs = [cv(rand_pm1(g, B, 3, H, W)) for _ in range(STEPS)]
    unit, _ = unit_fixtures(copy.deepcopy(vae), lp, copy.deepcopy(disc))
    out, _, _ = train(vae, lp, disc, xs)
    ref = dict(load_file(os.path.join(OUT, "unit.safetensors")))
    ref.update(load_file(os.path.join(OUT, "steps.safetensors")))
    got = dict(unit)
    got.update(out)
    rows = []
    for k in sorted(ref):
        if k not in got:
            continue
        a, b = got[k].double().reshape(ref[k].shape), ref[k].double()
        scale = float(b.abs().max()) or 1.0
        rows.append((float((a - b).abs().max()) / scale, k, scale))
    print("float32 run vs float64 fixtures: max|diff| / max|ref| (worst first)")
    for err, k, scale in sorted(rows, reverse=True)[:40]:
        print("  %-48s %.3g   (max|ref| %.4g)" % (k, err, scale))
    groups = {}
    for err, k, _ in rows:
        grp = ".".join(k.split(".")[:2]) if k.startswith(("grad.", "final.", "disc.grad", "vae.grad")) \
            else k.split(".")[0]
        groups[grp] = max(groups.get(grp, 0.0), err)
    print("worst per group: " + ", ".join("%s %.2g" % kv for kv in sorted(groups.items())))
    for net in ("vae", "disc"):
        keys = [k for k in ref if k.startswith("final.%s." % net)]
        diffs = torch.cat([(got[k].double().reshape(ref[k].shape) - ref[k].double()).abs().flatten()
                           for k in keys])
        nk = [k for k in keys if "to_k.bias" not in k]
        dk = torch.cat([(got[k].double().reshape(ref[k].shape) - ref[k].double()).abs().flatten()
                        for k in nk])
        print("final.%s.*: %d values, max |diff| %.3g (%.3g without to_k.bias), %d above 1e-5, "
              "%d above 1e-4" % (net, diffs.numel(), float(diffs.max()), float(dk.max()),
                                 int((dk > 1e-5).sum()), int((dk > 1e-4).sum())))


def main():
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--float32-report", action="store_true",
                        help="rerun in float32 and compare with the written fixtures (writes nothing)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if args.float32_report:
        float32_report()
        return
    check_normalize()
    check_adam()

    vae, lp, disc = make_vae(), make_lpips(), make_disc()
    g = torch.Generator().manual_seed(SEED_DATA)
    xs = [rand_pm1(g, B, 3, H, W) for _ in range(STEPS)]

    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    # Initial weights (float32 values already, so the files are exact).
    vae.float().save_pretrained(os.path.join(OUT, "vae"), safe_serialization=True)
    vae.double()
    save_file({k: to32(v) for k, v in lp.items()}, os.path.join(OUT, "lpips.safetensors"))
    save_file({k: to32(v) for k, v in disc_state(disc).items()}, os.path.join(OUT, "disc.safetensors"))

    unit, ustats = unit_fixtures(copy.deepcopy(vae), lp, copy.deepcopy(disc))
    save_file(unit, os.path.join(OUT, "unit.safetensors"))

    out, logs, tstats = train(vae, lp, disc, xs)
    for i, x in enumerate(xs):
        out["x.%d" % i] = to32(x)
    for k, t in out.items():
        assert torch.isfinite(t).all(), k
    save_file(out, os.path.join(OUT, "steps.safetensors"))
    reload_check(out, unit)

    versions = {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
                "safetensors": __import__("safetensors").__version__, "numpy": np.__version__}
    run = {
        "generator": "tools/train_reference.py",
        "versions": versions,
        "seeds": {"vae_init": SEED_VAE, "vae_perturb": SEED_VAE + 1, "lpips": SEED_LPIPS,
                  "disc_bias_default_init": SEED_DISC, "disc_init": SEED_DISC + 1,
                  "images": SEED_DATA, "unit": SEED_UNIT, "checks": SEED_CHECK},
        "compute_dtype": "float64", "weights_rounded_to": "float32",
        "vae_config": VAE_CONFIG,
        "lpips": {"widths": list(VGG_WIDTHS), "taps": list(TAPS), "shift": list(LPIPS_SHIFT),
                  "scale": list(LPIPS_SCALE), "eps": LPIPS_EPS, "dropout": False,
                  "layout": [[i, k] for i, k, _, _ in vgg_layers()],
                  "init": "conv W randn*sqrt(2/(9*cin)), b 0.05*randn; lin U(0.05,1)*4/width"},
        "disc": {"input_nc": 3, "ndf": DISC_NDF, "n_layers": 3, "norm": "BatchNorm2d",
                 "init": "conv W N(0,0.02), conv b PyTorch default, BN w N(1,0.02), b 0"},
        "hyperparameters": HP,
        "shapes": {"x": [B, 3, H, W], "latent": [B, 4, H // 2, W // 2], "logits": [B, 1, 2, 3],
                   "lpips_taps": [[VGG_WIDTHS[0], 32, 40], [VGG_WIDTHS[1], 16, 20],
                                  [VGG_WIDTHS[2], 8, 10], [VGG_WIDTHS[3], 4, 5],
                                  [VGG_WIDTHS[4], 2, 2]],
                   "last_layer": list(vae.decoder.conv_out.weight.shape),
                   "vae_parameters": sum(p.numel() for p in vae.parameters()),
                   "disc_parameters": sum(p.numel() for p in disc.parameters()),
                   "lpips_parameters": sum(t.numel() for t in lp.values())},
        "lambda_raw_step0": tstats["lambda_raw_0"],
        "lpips_zero_patch": {"image": 0, "rows": [8, 24], "cols": [10, 30],
                             "colour": ustats["lpips_zero_colour"],
                             "relu1_2_zero_rows": [10, 22], "relu1_2_zero_cols": [12, 28]},
        "lpips_tap_norms": {"note": "per tap [pixels with norm r exactly 0, smallest nonzero r, "
                                    "smallest -max_c(pre-activation) where r = 0]",
                            "unit_a": ustats["lpips_unit_a_taps"],
                            "unit_b": ustats["lpips_unit_b_taps"],
                            "unit_zero_b": ustats.get("lpips_zero_b_taps"),
                            "train_x_hat": tstats["lpips_taps_xhat"],
                            "train_x": tstats["lpips_taps_x"]},
        "kink_margins": tstats["margins"],
        "logs": logs,
    }
    with open(os.path.join(OUT, "run.json"), "w") as fh:
        json.dump(run, fh, indent=1)
        fh.write("\n")
    with open(os.path.join(OUT, "README.md"), "w") as fh:
        fh.write(
            "Generated by tools/train_reference.py (diffusers %s, torch %s); do not edit. "
            "Reference for the C trainer: three LDM training steps (generator pass with L1 + "
            "LPIPS + 0.01*KL + adaptive-weight hinge GAN, then discriminator pass) on a tiny "
            "f = 2 VAE, a tiny-VGG LPIPS and an ndf-8 PatchGAN, computed in float64; the "
            "script's docstring is the exact contract. `vae/` is the initial VAE (diffusers "
            "folder); `lpips.safetensors` the LPIPS weights (torchvision/lpips names); "
            "`disc.safetensors` the initial discriminator with its BatchNorm running stats; "
            "`steps.safetensors` the three input batches `x.k`, the logged losses `loss.k.*` "
            "(F64), the step-0 gradients `grad.vae.*`/`grad.disc.*`, `x_hat.0`, `lpips.0`, and "
            "every parameter and running stat after the three steps (`final.vae.*`, "
            "`final.disc.*`); `unit.safetensors` single-network checks (LPIPS value and "
            "input gradient, including a pair with all-zero relu1_2 features; discriminator "
            "train-mode forward/backward and running stats; VAE encode/decode and gradients "
            "from random upstream tensors); `run.json` the hyperparameters, shapes, seeds, "
            "versions and logged values.\n" % (versions["diffusers"], versions["torch"]))

    print("step  total          rec           perceptual   nll            kl            "
          "g_loss        d_weight      d_loss        logits_real   logits_fake")
    for i, l in enumerate(logs):
        print("%-4d  %s" % (i, "  ".join("%-12.6g" % l[k] for k in (
            "total", "rec", "perceptual", "nll", "kl", "g_loss", "d_weight", "d_loss",
            "logits_real", "logits_fake"))))
    print("lambda_raw at step 0: %.6g (clamp at 1e4)" % tstats["lambda_raw_0"])
    for net in ("vae", "disc"):
        m = max(float(t.abs().max()) for k, t in out.items() if k.startswith("grad.%s." % net))
        print("max |grad.%s.*| at step 0: %.6g" % (net, m))
    taps = [t for k, v in ustats.items() if k.endswith("_taps") for t in v]
    taps += [t for k in ("lpips_taps_xhat", "lpips_taps_x") for s in tstats[k] for t in s]
    print("LPIPS tap norms over all evaluations: smallest nonzero r %.3g, smallest margin of an "
          "r = 0 pixel %.3g" % (min(t[1] for t in taps if t[1] is not None),
                                min(t[2] for t in taps if t[2] is not None)))
    print("smallest |x - x_hat| %.3g, hinge margins %.3g" % (
        min(m["min_abs_x_minus_xhat"] for m in tstats["margins"]),
        min(min(m["min_abs_1_minus_logits_real"], m["min_abs_1_plus_logits_fake"]) for m in tstats["margins"])))
    print("LPIPS zero patch: %s" % ("colour %s" % ustats["lpips_zero_colour"]
                                     if ustats["lpips_zero_colour"] else "skipped"))
    for name in sorted(os.listdir(OUT)):
        p = os.path.join(OUT, name)
        print("%-20s %8d bytes" % (name, folder_size(p) if os.path.isdir(p) else os.path.getsize(p)))
    print("total                %8d bytes" % folder_size(OUT))


if __name__ == "__main__":
    main()
