#!/bin/sh
# tools/demo.sh DIR MINUTES — the work of `make demo` (the README's main
# command): trains an autoencoder from scratch on the built-in procedural
# images for MINUTES minutes and leaves DIR/ (grid.png, loss.png, log.csv,
# eval.csv, a checkpoint, model/).
#
# Where the CUDA plugin was built and a GPU answers (nvidia-smi), the full SD
# config (83.7 M parameters) at 256x256, batch 8, bf16, on the GPU; if that
# cannot start (no usable driver or device: the message says why), or on a
# machine without a GPU, the 'small' config (3.9 M) at 64x64 on the CPU.
# Pixel + KL + GAN-free losses both ways: a fresh machine has no LPIPS weights
# (docs/training.md says how to add them).
set -u
DIR=${1:-demo-run}
MINUTES=${2:-3}
cd "$(dirname "$0")/.." || exit 1

cpu_demo() {
    echo "klvae demo: training the 'small' autoencoder (3.9 M parameters) on procedural"
    echo "64x64 images for $MINUTES minutes on the CPU; pixel + KL loss (no LPIPS"
    echo "weights on a fresh machine; see docs/training.md). Output: $DIR/"
    rm -rf "$DIR"
    ./bin/klvae train --config small --size 64 --batch 4 --learning-rate 3e-4 \
        --perceptual-weight 0 --backend cpu --steps 100000 --minutes "$MINUTES" \
        --grid-every 50 --checkpoint-every 200 --eval-images 8 --out "$DIR"
}

gpu_demo() {
    echo "klvae demo: a GPU answers, so the full SD autoencoder (83.7 M parameters) on"
    echo "procedural 256x256 images, batch 8, bf16, for $MINUTES minutes on the GPU; pixel +"
    echo "KL loss (no LPIPS weights on a fresh machine; see docs/training.md). Output: $DIR/"
    rm -rf "$DIR"
    ./bin/klvae train --config sd --size 256 --batch 8 --learning-rate 1e-4 \
        --perceptual-weight 0 --backend cuda --precision bf16 --steps 100000 \
        --minutes "$MINUTES" --grid-every 100 --checkpoint-every 500 --eval-images 8 \
        --out "$DIR"
}

if [ -f lib/libklvae_cuda.so ] && command -v nvidia-smi >/dev/null 2>&1 &&
    nvidia-smi -L >/dev/null 2>&1; then
    gpu_demo && exit 0
    if [ -f "$DIR/log.csv" ]; then
        exit 1 # it trained, then failed: the message above says why
    fi
    echo "klvae demo: the GPU demo could not start (the message above says why); the CPU one"
    echo "instead"
fi
cpu_demo || exit 1
echo "look at $DIR/grid.png (top: held-out inputs, bottom: reconstructions)"
echo "and $DIR/loss.png; the model is $DIR/model/"
