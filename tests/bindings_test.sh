#!/bin/sh
# bindings_test.sh — the Python (examples/python) and Rust (examples/rust)
# bindings against the freshly built library. A binding whose toolchain is
# missing (python3 with numpy and pytest; cargo) is reported as SKIPPED, which
# is a failure when KLVAE_REQUIRE_BINDINGS=1 (CI sets it: 'make deps' installs
# both toolchains). Run after make, from anywhere.
set -u
cd "$(dirname "$0")/.."
top=$PWD
status=0
skip() {
    echo "$1: SKIPPED ($2)"
    [ "${KLVAE_REQUIRE_BINDINGS:-0}" = 1 ] && status=1
}

PYTHON=${PYTHON:-python3}
if "$PYTHON" -c "import numpy, pytest" >/dev/null 2>&1; then
    # build/pydeps: Python's safetensors reader, when tools/deps.sh put it there
    PYTHONPATH="$top/build/pydeps${PYTHONPATH:+:$PYTHONPATH}" \
        KLVAE_LIBRARY="$top/lib/libklvae.so.0" "$PYTHON" -m pytest -q -p no:cacheprovider \
        examples/python/tests || status=1
else
    skip "python" "$PYTHON cannot import numpy and pytest; 'make deps' installs them"
fi

if command -v cargo >/dev/null 2>&1; then
    # build output outside the source tree, so that a read-only checkout works
    (cd examples/rust && PKG_CONFIG_PATH="$top/build${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}" \
        CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$top/build/rust}" cargo test --offline -q) || status=1
else
    skip "rust" "cargo is not installed; 'make deps' installs it"
fi
exit $status
