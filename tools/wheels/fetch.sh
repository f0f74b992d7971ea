#!/bin/sh
# tools/wheels/fetch.sh — downloads the Python wheels that tests/gpu/check.sh
# needs on the GPU machine and that its image lacks: diffusers (for the
# PyTorch side of the benchmark) and importlib_metadata, which diffusers
# imports. Everything else diffusers needs (torch, numpy, huggingface_hub,
# safetensors, regex, requests, filelock, Pillow, zipp) is in that image.
# Run it here (it needs PyPI), then carry tools/wheels with the device call;
# check.sh installs them with pip --no-index into a private folder.
# The wheels are pure Python, so one download serves any Python 3.
set -e
cd "$(dirname "$0")"
DIFFUSERS_VERSION=${DIFFUSERS_VERSION:-0.42.1}
IMPORTLIB_METADATA_VERSION=${IMPORTLIB_METADATA_VERSION:-8.7.0}
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d . "diffusers==$DIFFUSERS_VERSION" \
    "importlib_metadata==$IMPORTLIB_METADATA_VERSION"
ls -l ./*.whl
