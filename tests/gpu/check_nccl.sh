#!/bin/sh
# tests/gpu/check_nccl.sh OUT_DIR [SECONDS] — the NCCL path of data-parallel
# training on a GPU machine (issue 11), in at most SECONDS (default 120):
# build/gpu/test_nccl (make gpu-binaries; built here when missing) with a
# world of one rank on GPU 0:
#   - the plugin's NCCL communicator, bootstrapped through the host callbacks;
#   - the core's gradient buckets over the SD model's 83 M parameters,
#     launched through NCCL during a simulated backward: every value kept bit
#     for bit (a sum over one rank), on the recorded first pass and on
#     planned ones, timed;
#   - two training steps of the fixture model on the CUDA backend (fp32 with
#     allreduce=nccl, bf16 with auto) through a communicator of one rank
#     against the same steps without one: the same losses and checkpoints,
#     byte for byte.
# NCCL: LD_LIBRARY_PATH as tests/gpu/check.sh sets it (PyTorch's
# site-packages nvidia/*/lib, /usr/local/cuda/lib64), and KLVAE_NCCL_LIBRARY
# when libnccl.so.2 is found there. Full output in OUT_DIR/test_nccl.log;
# prints the PASS/FAIL/SKIP lines and "nccl: N passed, N failed" last.
# tests/gpu/check.sh calls it; alone, a device call carries
# lib/libklvae_cuda.so build/gpu and runs: sh tests/gpu/check_nccl.sh $OUT
set -u
OUT=${1:?usage: tests/gpu/check_nccl.sh OUT_DIR [SECONDS]}
LIMIT=${2:-120}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
LOG=$OUT/test_nccl.log
PY=${PYTHON:-python3}
PLUGIN=lib/libklvae_cuda.so
BIN=build/gpu/test_nccl

if [ -z "${KLVAE_NCCL_LIBRARY:-}" ]; then
    DIRS=$($PY -c 'import glob, os, nvidia; print(":".join(d for b in nvidia.__path__ for d in sorted(glob.glob(os.path.join(b, "*", "lib")))))' 2>/dev/null)
    export LD_LIBRARY_PATH="${DIRS:+$DIRS:}/usr/local/cuda/lib64:/usr/local/cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    for d in $(echo "$LD_LIBRARY_PATH" | tr ':' ' '); do
        if [ -f "$d/libnccl.so.2" ]; then
            export KLVAE_NCCL_LIBRARY="$d/libnccl.so.2"
            break
        fi
    done
fi
echo "KLVAE_NCCL_LIBRARY=${KLVAE_NCCL_LIBRARY:-(none found: the plugin tries libnccl.so.2)}" >"$LOG"

if [ ! -x "$BIN" ]; then
    [ -f "$BIN" ] && chmod +x "$BIN" 2>/dev/null
    [ -x "$BIN" ] || timeout -k 5 120 make -j8 build/gpu/test_nccl >>"$LOG" 2>&1 ||
        echo "building $BIN failed (see $LOG)"
fi
if [ ! -x "$BIN" ] || [ ! -f "$PLUGIN" ]; then
    echo "nccl: FAILED: $BIN or $PLUGIN is missing (make gpu-binaries lib/libklvae_cuda.so)"
    exit 1
fi
timeout -k 5 "$LIMIT" env NCCL_DEBUG=${NCCL_DEBUG:-WARN} "$BIN" --plugin "$PLUGIN" >>"$LOG" 2>&1
rc=$?
grep -E "^(PASS|FAIL|SKIP)" "$LOG"
case $rc in
124 | 137) echo "nccl: FAILED: timed out after $LIMIT s (see $LOG)" ;;
*) echo "nccl: $(tail -1 "$LOG")" ;;
esac
exit $rc
