#!/bin/sh
# tests/gpu/check.sh OUT_DIR — the CUDA backend's checks and timings on a GPU
# machine, in one run of at most CHECK_BUDGET seconds (default 470, under 8
# minutes): full logs under OUT_DIR, a short table printed last.
#
#   1. finds cuDNN and cuBLAS (PyTorch's site-packages nvidia/*/lib, then
#      /usr/local/cuda/lib64) for LD_LIBRARY_PATH;
#   2. uses lib/libklvae_cuda.so and build/gpu/test_cuda as carried (make
#      lib/libklvae_cuda.so gpu-binaries here), building what is missing
#      when it can;
#   3. test_cuda --require-gpu: every inference op, whole SD encode/decode
#      at 64^2 and 256^2, sampling bits, klvae_*_device, in fp32, tf32 and
#      bf16, both layouts, cuDNN's fused epilogue on and off, each fp32
#      algorithm, against the CPU backend; a plugin that does not load or a
#      driver that refuses is a failure here, not a skip;
#   4. timings on tensors already on the GPU: libklvae (test_cuda bench) and
#      diffusers (tools/bench_cuda_torch.py; its wheel from tools/wheels/,
#      see tools/wheels/fetch.sh), decode and encode at 512^2 and 1024^2
#      batch 1 first, the 512^2 decode also unfused and in NCHW, then 256^2
#      and batch 8 while time is left; a bf16 8192^3 torch.matmul for the
#      GPU's practical peak;
#   3b. tests/gpu/check_nccl.sh: data-parallel training's NCCL path (its own
#      limit, at most 90 s);
#   5. compute-sanitizer memcheck of test_cuda --tiny (a few ops, fp32 and
#      bf16) under its own 60 s limit, if it is installed (a host that
#      refuses it is reported, and the script goes on);
#   4b. training: the LDM step of the SD model at 256^2, batch 8, bf16, in
#      libklvae (test_cuda bench train:256:8) and in PyTorch eager with AMP
#      bf16 (tools/bench_train_pytorch.py --device cuda); the PyTorch step
#      under torch.compile comes last of all, for reference, if time is left;
#   4c. huge images (issue 13), when 200 s are left (or alone, with
#      CHECK_STREAM=only): the streamed decode on the GPU (klvae_decode from
#      host arrays: test_cuda bench stream:SIZE:LIMIT_GIB) against the
#      untiled one at 1024^2 in fp32 (a check: relative L2 <= 1e-4) and in
#      bf16 (reported); then an 8192^2 bf16 decode with memory_limit 8G
#      against diffusers' enable_tiling() on the same latent and weights
#      (tools/bench_stream_torch.py --device cuda --dtype bf16): time, peak
#      device memory (target <= 8 GB), max abs and relative L2 difference. A
#      streamed decode that fails, times out or disagrees fails the script;
#   4d. (only when CHECK_PARTS names profile) Nsight Compute's kernel times
#      of one 512^2 bf16 decode and encode (tools/ncu_summary.py: the call's
#      kernels grouped by name and family, and their sum, the GPU's busy time,
#      to set beside the call's wall time from step 4);
#   6. the table: op checks, decode 512^2 bf16 speed against diffusers
#      (target >= 1.5x), decode FLOP rate as a share of the matmul rate
#      (target >= 40 %), peak memory of a 1024^2 bf16 decode (target <= 1.5 GB),
#      training images/s against PyTorch (target >= 1.5x), its peak memory
#      (target <= PyTorch's) and model FLOP utilisation.
# Exit status: 0 when test_cuda and check_nccl.sh passed and 4c, where it
# ran, decoded and agreed (the timings are measurements, not checks), 1
# otherwise, saying which failed.
# CHECK_PARTS chooses the steps after 1 and 2 (comma-separated; they run in
# the order above whatever the list's order): checks (3), nccl (3b), timings
# (the inference timings of 4 and 4b), train (the training timings of 4 and
# 4b), memcheck (5), stream (4c), profile (4d). Default: every one but
# profile. CHECK_STREAM=only is CHECK_PARTS=stream (steps 1, 2 and 4c alone);
# CHECK_STREAM=0 takes stream out. CHECK_TEST_ARGS: more arguments for
# test_cuda (--only-ops: the op checks without the whole models and steps).
#
# A device call carries the build:  carry lib/libklvae_cuda.so build/gpu tools/wheels
# (build/gpu holds test_cuda and test_nccl: make gpu-binaries)
# and runs:  sh tests/gpu/check.sh $OUT
# The two test binaries are 25 MB each (OpenBLAS linked in); where the
# working tree's limit is tight, carry them as one archive (make gpu-bundle:
# build/gpu-bundle.tar.xz, 4 MB) and start with: tar xJf build/gpu-bundle.tar.xz
set -u
OUT=${1:?usage: tests/gpu/check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/../.." || exit 1
BUDGET=${CHECK_BUDGET:-470}
START=$(date +%s)
LOG=$OUT/check.log
BENCH=$OUT/bench.jsonl
: >"$LOG"
: >"$BENCH"

PARTS=${CHECK_PARTS:-checks,nccl,timings,train,memcheck,stream}
case ${CHECK_STREAM:-1} in
only) PARTS=stream ;;
0) PARTS=$(echo ",$PARTS," | sed 's/,stream,/,/; s/^,//; s/,$//') ;;
esac
for p in $(echo "$PARTS" | tr ',' ' '); do
    case $p in
    checks | nccl | timings | train | memcheck | stream | profile) ;;
    *) echo "check.sh: unknown part '$p' in CHECK_PARTS (checks, nccl, timings, train, memcheck, stream, profile)" >&2
       exit 2 ;;
    esac
done
part() { case ",$PARTS," in *",$1,"*) return 0 ;; esac; return 1; }

left() { echo $((BUDGET - ($(date +%s) - START))); }
say() { echo "$*" | tee -a "$LOG"; }
# limit SECONDS: the smaller of SECONDS and the time left (0 when under 10 s)
limit() {
    l=$(left)
    if [ "$l" -lt 10 ]; then echo 0; elif [ "$l" -lt "$1" ]; then echo "$l"; else echo "$1"; fi
}

say "== check.sh $(date -u '+%Y-%m-%d %H:%M:%S') UTC, budget ${BUDGET} s, parts $PARTS"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
    --format=csv >>"$LOG" 2>&1 || say "nvidia-smi failed"

# ---- 1. libraries ----
PY=${PYTHON:-python3}
NVLIBS=$($PY - <<'EOF' 2>>"$LOG"
import glob, os
dirs = []
try:
    import nvidia
    for base in list(nvidia.__path__):
        dirs += sorted(glob.glob(os.path.join(base, "*", "lib")))
except Exception:
    pass
print(":".join(d for d in dirs if os.path.isdir(d)))
EOF
)
for d in /usr/local/cuda/lib64 /usr/local/cuda/lib; do
    [ -d "$d" ] && NVLIBS="${NVLIBS:+$NVLIBS:}$d"
done
export LD_LIBRARY_PATH="${NVLIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

# ---- 2. the plugin and the test binary ----
PLUGIN=lib/libklvae_cuda.so
BIN=build/gpu/test_cuda
if [ ! -f "$PLUGIN" ]; then
    INC=$($PY -c 'import nvidia.cudnn, os; print(os.path.join(list(nvidia.cudnn.__path__)[0], "include"))' 2>/dev/null)
    LIBD=$($PY -c 'import nvidia.cudnn, os; print(os.path.join(list(nvidia.cudnn.__path__)[0], "lib"))' 2>/dev/null)
    say "no carried $PLUGIN: building it (cuDNN headers: ${INC:-system})"
    [ -n "$LIBD" ] && [ ! -e "$LIBD/libcudnn.so" ] && ln -s libcudnn.so.9 "$LIBD/libcudnn.so" 2>/dev/null
    timeout -k 5 "$(limit 240)" make -j8 "$PLUGIN" ${INC:+CUDNN_INCLUDE=$INC} ${LIBD:+CUDNN_LIB=$LIBD} \
        >>"$LOG" 2>&1 || say "building the plugin failed (see check.log)"
fi
if [ ! -x "$BIN" ]; then
    say "no carried $BIN: building it"
    timeout -k 5 "$(limit 120)" make -j8 gpu-binaries >>"$LOG" 2>&1 || say "building $BIN failed"
fi
# a carried file may lose its run bits on the way
[ -f "$BIN" ] && [ ! -x "$BIN" ] && chmod +x "$BIN" 2>/dev/null
ldd "$PLUGIN" >>"$LOG" 2>&1

# ---- 3. the checks ----
TEST_RC=none
STREAM_RC=0
T=$(limit 250)
if ! part checks; then
    say "test_cuda's checks skipped (CHECK_PARTS=$PARTS)"
    TEST_RC=0
    : >"$OUT/test_cuda.log"
elif [ -x "$BIN" ] && [ "$T" -gt 0 ]; then
    say "== test_cuda ${CHECK_TEST_ARGS:+$CHECK_TEST_ARGS }(limit ${T} s)"
    T0=$(date +%s)
    # shellcheck disable=SC2086 # CHECK_TEST_ARGS is a list of arguments
    timeout -k 5 "$T" "$BIN" --plugin "$PLUGIN" --require-gpu ${CHECK_TEST_ARGS:-} \
        >"$OUT/test_cuda.log" 2>&1
    TEST_RC=$?
    say "test_cuda took $(($(date +%s) - T0)) s"
    grep -E "^(FAIL|SKIP|INFO)" "$OUT/test_cuda.log" | head -60 | tee -a "$LOG"
    tail -1 "$OUT/test_cuda.log" | tee -a "$LOG"
else
    say "FAILED: no test binary $BIN (build it here: make gpu-binaries)"
fi

# ---- 3b. data-parallel training's NCCL path (tests/gpu/check_nccl.sh) ----
T=$(limit 90)
NCCL_LINE="not run"
NCCL_RC=none
if ! part nccl; then
    NCCL_LINE="skipped (CHECK_PARTS)"
    NCCL_RC=0
elif [ "$T" -gt 0 ]; then
    sh tests/gpu/check_nccl.sh "$OUT" "$T" >"$OUT/check_nccl.out" 2>&1
    NCCL_RC=$?
    tee -a "$LOG" <"$OUT/check_nccl.out"
    NCCL_LINE=$(tail -1 "$OUT/check_nccl.out")
    [ "$NCCL_RC" = 0 ] || say "FAILED: the NCCL check (tests/gpu/check_nccl.sh, exit $NCCL_RC): see $OUT/test_nccl.log"
else
    say "FAILED: no time left for the NCCL check (tests/gpu/check_nccl.sh)"
fi

# ---- 4. timings ----
if grep -q "^FAILED" "$OUT/test_cuda.log" 2>/dev/null || [ "$TEST_RC" = none ]; then
    say "FAILED: the plugin or the GPU cannot be used (above): no timings"
    BUDGET=0
fi
WHEELS_OK=0
if ls tools/wheels/*.whl >/dev/null 2>&1; then
    if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/klvae-site tools/wheels/*.whl >>"$LOG" 2>&1; then
        WHEELS_OK=1
    fi
fi
[ "$WHEELS_OK" = 1 ] && export PYTHONPATH="/tmp/klvae-site${PYTHONPATH:+:$PYTHONPATH}"
$PY -c 'import diffusers' >>"$LOG" 2>&1 || say "diffusers cannot be imported (carry tools/wheels: tools/wheels/fetch.sh)"

klvae_bench() { # cases precision [VAR=value: a variant of the plugin]
    T=$(limit 120)
    [ "$T" -gt 0 ] || return 1
    timeout -k 5 "$T" env ${3:-} "$BIN" bench "$1" --precision "$2" --runs 5 --plugin "$PLUGIN" \
        >>"$BENCH" 2>>"$LOG" || say "bench $* failed or timed out"
}
torch_bench() { # cases [extra flags]
    T=$(limit 150)
    [ "$T" -gt 0 ] || return 1
    timeout -k 5 "$T" env PYTHONUNBUFFERED=1 $PY tools/bench_cuda_torch.py --cases "$1" --runs 5 \
        ${2:-} >>"$BENCH" 2>>"$LOG" || say "torch bench $1 ${2:-} failed or timed out"
}
if part timings; then
    say "== timings"
    klvae_bench decode:512:1,decode:1024:1,encode:512:1 bf16
    torch_bench decode:512:1,decode:1024:1 --matmul
    # the choices to decide by measurement: cuDNN's fused epilogue, the layout
    klvae_bench decode:512:1 bf16 KLVAE_CUDA_FUSED=0
    klvae_bench decode:512:1 bf16 KLVAE_CUDA_LAYOUT=nchw
    klvae_bench decode:512:1 fp32
    klvae_bench decode:512:1 tf32
    torch_bench encode:512:1,decode:512:1 --cudnn-benchmark
fi

# training: the LDM step (L1 + LPIPS-VGG16 + KL + PatchGAN with the adaptive
# weight, Adam) of the SD model at 256^2, batch 8, bf16, in both; LPIPS weights
# drawn at random into one file both read (no download on this machine)
LPIPS_FILE=/tmp/klvae-lpips-random.safetensors
if part train && [ "$(limit 60)" -gt 0 ]; then
    say "== training timings"
    $PY tools/bench_train_pytorch.py train 0 --write-random-lpips "$LPIPS_FILE" >>"$LOG" 2>&1 ||
        say "could not write random LPIPS weights"
fi
T=$(limit 150)
if part train && [ "$T" -gt 0 ] && [ -f "$LPIPS_FILE" ]; then
    timeout -k 5 "$T" "$BIN" bench train:256:8 --precision bf16 --runs 5 --plugin "$PLUGIN" \
        --lpips "$LPIPS_FILE" >>"$BENCH" 2>>"$LOG" || say "klvae train bench failed or timed out"
fi
# mixed precision's cost to a training run: the small config, 400 steps from
# the same start on the same procedural batches, in fp32 and bf16, then the
# held-out PSNR of each (bench_cuda's quality case; target: within 0.5 dB)
for P in fp32 bf16; do
    T=$(limit 90)
    part train && [ "$T" -gt 0 ] || break
    timeout -k 5 "$T" "$BIN" bench quality:64:8 --config small --steps 400 --precision $P \
        --plugin "$PLUGIN" >>"$BENCH" 2>>"$LOG" || say "klvae quality $P failed or timed out"
done
train_torch() { # extra flags
    T=$(limit 150)
    part train && [ "$T" -gt 0 ] && [ -f "$LPIPS_FILE" ] || return 1
    timeout -k 5 "$T" env PYTHONUNBUFFERED=1 $PY tools/bench_train_pytorch.py train 256 --batch 8 \
        --device cuda --amp bf16 --gan 1 --lpips "$LPIPS_FILE" --runs 5 ${1:-} >>"$BENCH" 2>>"$LOG" ||
        say "torch train bench ${1:-} failed or timed out"
}
train_torch

# ---- 5. memcheck ----
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
MEMCHECK="not run"
T=$(limit 60)
if ! part memcheck; then
    MEMCHECK="skipped (CHECK_PARTS)"
elif [ -n "$SAN" ] && [ -x "$BIN" ] && [ "$T" -gt 0 ]; then
    say "== compute-sanitizer memcheck, tiny case (limit ${T} s)"
    KLVAE_CUDA_CONV_SEARCH=0 timeout -k 5 "$T" "$SAN" --tool memcheck --error-exitcode 9 \
        --print-limit 20 "$BIN" --plugin "$PLUGIN" --tiny --require-gpu >"$OUT/memcheck.log" 2>&1
    rc=$?
    case $rc in
    0) MEMCHECK="clean" ;;
    9) MEMCHECK="ERRORS (memcheck.log)" ;;
    124 | 137) MEMCHECK="timed out after ${T} s (not a verdict)" ;;
    *) if grep -qiE "not supported|permission|cannot|unable" "$OUT/memcheck.log"; then
           MEMCHECK="refused by this host (memcheck.log)"
       else
           MEMCHECK="exit $rc (memcheck.log)"
       fi ;;
    esac
    tail -3 "$OUT/memcheck.log" >>"$LOG"
elif [ -z "$SAN" ]; then
    MEMCHECK="compute-sanitizer not found"
fi

# ---- 4b. the rest of the timings, while time is left ----
REST=decode:256:1,encode:256:1,encode:1024:1,decode:512:8,encode:512:8,decode:256:8,decode:1024:8
if part timings; then
    klvae_bench $REST bf16
    torch_bench $REST
fi

# ---- 4c. huge images: the streamed decode (issue 13) ----
stream_fail() {
    say "FAILED (streamed decode): $*"
    STREAM_RC=1
}
SDIR=/tmp/klvae-stream
if part stream && [ -x "$BIN" ] && [ "$(limit 200)" -ge 200 ]; then
    say "== huge images: the streamed decode (4c)"
    rm -rf "$SDIR" && mkdir -p "$SDIR"
    # the latents (standard normal, seeded) both sides read
    $PY -c 'import numpy as np, sys
for s in (1024, 8192):
    np.random.default_rng(s).standard_normal((1, 4, s // 8, s // 8), dtype=np.float32).tofile(
        sys.argv[1] + "/z%d.raw" % s)' "$SDIR" >>"$LOG" 2>&1 || stream_fail "cannot write the latents"
    # exact: streamed (memory_limit 1G) against untiled on the GPU, fp32 (a
    # check) and bf16 (reported)
    for P in fp32 bf16; do
        T=$(limit 90)
        [ "$T" -gt 0 ] || break
        timeout -k 5 "$T" "$BIN" bench stream:1024:0,stream:1024:1 --precision $P --runs 1 \
            --plugin "$PLUGIN" --latents "$SDIR" >>"$BENCH" 2>>"$LOG" ||
            stream_fail "test_cuda bench stream:1024 $P failed or timed out (check.log)"
    done
    $PY - "$SDIR" "$BENCH" <<'PYEOF' >>"$LOG" 2>&1 || stream_fail "streamed 1024^2 fp32 is not the untiled decode (check.log)"
import json, sys
import numpy as np
d, bench = sys.argv[1], sys.argv[2]
bad = 0
for p, tol in (("fp32", 1e-4), ("bf16", None)):
    try:
        u = np.fromfile(f"{d}/klvae_1024_0g_{p}.raw", dtype=np.float32).astype(np.float64)
        s = np.fromfile(f"{d}/klvae_1024_1g_{p}.raw", dtype=np.float32).astype(np.float64)
    except OSError as e:
        print(f"stream 1024 {p}: {e}")
        bad |= tol is not None
        continue
    rel = float(np.linalg.norm(s - u) / np.linalg.norm(u))
    row = {"tool": "stream_error", "size": 1024, "precision": p, "against": "klvae untiled",
           "max_abs": float(np.abs(s - u).max()), "rel_l2": rel, "tolerance": tol}
    print(json.dumps(row))
    open(bench, "a").write(json.dumps(row) + "\n")
    if tol is not None and not rel <= tol:
        bad = 1
sys.exit(bad)
PYEOF
    # 8192^2 bf16 within 8 GB of device memory, and diffusers' tiled decode
    T=$(limit 400)
    if [ "$T" -gt 0 ]; then
        timeout -k 5 "$T" "$BIN" bench stream:8192:8 --precision bf16 --runs 1 --plugin "$PLUGIN" \
            --latents "$SDIR" --save-model "$SDIR/model" >>"$BENCH" 2>>"$LOG" ||
            stream_fail "test_cuda bench stream:8192:8 bf16 failed or timed out after ${T} s (check.log)"
    fi
    T=$(limit 200)
    if [ "$T" -gt 0 ] && [ -d "$SDIR/model" ]; then
        timeout -k 5 "$T" env PYTHONUNBUFFERED=1 $PY tools/bench_stream_torch.py "$SDIR/model" 8192 \
            --input "$SDIR/z8192.raw" --tiled --device cuda --dtype bf16 --warmup \
            --output "$SDIR/diffusers_8192_tiled_bf16.raw" >>"$BENCH" 2>>"$LOG" ||
            say "diffusers' tiled 8192^2 decode failed or timed out (check.log)"
    fi
    $PY - "$SDIR" "$BENCH" <<'PYEOF' >>"$LOG" 2>&1
import json, sys
import numpy as np
d, bench = sys.argv[1], sys.argv[2]
try:
    k = np.fromfile(f"{d}/klvae_8192_8g_bf16.raw", dtype=np.float32).astype(np.float64)
    t = np.fromfile(f"{d}/diffusers_8192_tiled_bf16.raw", dtype=np.float32).astype(np.float64)
except OSError as e:
    sys.exit(f"8192: {e}")
row = {"tool": "stream_error", "size": 8192, "precision": "bf16",
       "against": "diffusers tiled", "max_abs": float(np.abs(k - t).max()),
       "rel_l2": float(np.linalg.norm(k - t) / np.linalg.norm(t)), "tolerance": None}
print(json.dumps(row))
open(bench, "a").write(json.dumps(row) + "\n")
PYEOF
    rm -f "$SDIR"/*.raw
elif part stream; then
    say "4c (huge images) not run: under 200 s left (run it alone: CHECK_STREAM=only)"
    [ "$PARTS" = stream ] && STREAM_RC=1
fi

# ---- 4d. where a call's time goes: Nsight Compute's kernel times ----
if part profile; then
    NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
    if [ -z "$NCU" ]; then
        say "profile: ncu not found"
    fi
    for case in decode encode; do
        T=$(limit 90)
        [ -n "$NCU" ] && [ "$T" -gt 0 ] || break
        say "== ncu: $case 512^2 bf16 (limit ${T} s)"
        # three calls (the first with cuDNN's choices, two more): the summary
        # takes the last one; the clocks stay as the card has them
        # (the bench's own line, timed under ncu, stays out of bench.jsonl)
        timeout -k 5 "$T" "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv \
            --log-file "$OUT/ncu_$case.csv" "$BIN" bench "$case:512:1" --precision bf16 --runs 1 \
            --warmup 0 --plugin "$PLUGIN" >"/tmp/klvae-ncu-$case.out" 2>>"$LOG" ||
            say "ncu $case failed or timed out"
        # where this ncu prints its table to the program's output instead
        grep -q '^"ID"' "$OUT/ncu_$case.csv" 2>/dev/null ||
            grep '^"' "/tmp/klvae-ncu-$case.out" >>"$OUT/ncu_$case.csv"
    done
    if [ -n "$NCU" ]; then
        $PY tools/ncu_summary.py "$OUT"/ncu_decode.csv "$OUT"/ncu_encode.csv >"$OUT/profile.txt" \
            2>>"$LOG" || say "tools/ncu_summary.py failed (profile.txt)"
    fi
fi

# ---- the PyTorch step compiled, for reference, when time is left ----
train_torch --compile

# ---- 6. the table ----
TEST_LINE=$(tail -1 "$OUT/test_cuda.log" 2>/dev/null)
$PY - "$BENCH" "$TEST_RC" "$TEST_LINE" "$MEMCHECK" "$(($(date +%s) - START))" "$NCCL_LINE" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
bench, test_rc, test_line, memcheck, elapsed, nccl_line = sys.argv[1:7]
rows = []
for line in open(bench):
    line = line.strip()
    if line.startswith("{"):
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
env = next((r for r in rows if r.get("tool") == "env"), {})
mm = next((r for r in rows if r.get("tool") == "matmul"), None)
# decode / encode GFLOP per image (/work/shared/spec/anchors.md 3.1)
GFLOP = {("decode", 256): 622.2, ("decode", 512): 2514.5, ("decode", 1024): 10470.4,
         ("encode", 256): 272.7, ("encode", 512): 1116.7, ("encode", 1024): 4879.0}

def find(tool, op, size, batch, prec="bf16", bench=False):
    for r in rows:
        if (r.get("tool") == tool and r.get("op") == op and r.get("size") == size
                and r.get("batch") == batch and r.get("precision", prec) == prec
                and "median_ms" in r and (tool != "diffusers" or r.get("cudnn_benchmark", False) == bench)
                and r.get("variant", "default") == "default"):
            return r
    return None

print()
print("GPU: %s; torch %s, diffusers %s; matmul bf16 8192^3: %s TFLOP/s; %s s"
      % (env.get("gpu", "?"), env.get("torch", "?"), env.get("diffusers", env.get("diffusers_error", "?")),
         mm["tflops"] if mm else "?", elapsed))
print("%-8s %5s %3s %6s %9s %9s %9s %7s %7s %9s %9s %9s %6s" % (
    "op", "size", "n", "prec", "klvae ms", "diff. ms", "diff.+bm", "speedup", "TFLOP/s", "klvae MiB",
    "held MiB", "diff. MiB", "growth"))
for r in rows:
    if r.get("tool") != "klvae" or "median_ms" not in r:
        continue
    op, size, batch, prec = r["op"], r["size"], r["batch"], r["precision"]
    d = find("diffusers", op, size, batch, prec)
    db = find("diffusers", op, size, batch, prec, bench=True)
    g = GFLOP.get((op, size))
    tf = g * batch / r["median_ms"] if g else None
    print("%-8s %5d %3d %6s %9.2f %9s %9s %7s %7s %9.0f %9.0f %9s %6.1f" % (
        op, size, batch, prec, r["median_ms"],
        "%.2f" % d["median_ms"] if d else "-", "%.2f" % db["median_ms"] if db else "-",
        "%.2fx" % (d["median_ms"] / r["median_ms"]) if d else "-", "%.0f" % tf if tf else "-",
        r["peak_in_use_mb"], r["peak_reserved_mb"], "%.0f" % d["peak_allocated_mb"] if d else "-",
        r.get("pool_growth_mb", -1)) + ("  [%s]" % r["variant"] if r.get("variant", "default") != "default" else ""))
print("(diff.+bm: diffusers with torch.backends.cudnn.benchmark; MiB in use at the peak, held ="
      " the pool's; growth: MiB the pool took during the timed calls; [variant]: plugin settings)")
print()
k512 = find("klvae", "decode", 512, 1)
d512 = find("diffusers", "decode", 512, 1)
k1024 = find("klvae", "decode", 1024, 1)
ok_tests = test_rc == "0"
print("%-44s %-42s %s" % ("check", "result", "target"))
print("%-44s %-42s %s" % ("op / model checks (test_cuda)", (test_line or "not run")[:42]
                          if test_rc in ("0", "1") else "exit %s" % test_rc, "all pass"))
print("%-44s %-42s %s" % ("compute-sanitizer memcheck", memcheck[:42], "clean"))
print("%-44s %-42s %s" % ("NCCL path (check_nccl.sh)", nccl_line[:42], "all pass"))
if k512 and d512:
    ratio = d512["median_ms"] / k512["median_ms"]
    print("%-44s %-42s %s" % ("decode 512^2 bf16: diffusers ms / klvae ms",
                              "%.2fx (%.2f / %.2f ms)" % (ratio, d512["median_ms"], k512["median_ms"]),
                              ">= 1.5x  %s" % ("MET" if ratio >= 1.5 else "NOT MET")))
else:
    print("%-44s %-42s %s" % ("decode 512^2 bf16 vs diffusers", "missing", ">= 1.5x"))
if k512 and mm:
    rate = GFLOP[("decode", 512)] / k512["median_ms"]
    share = 100 * rate / mm["tflops"]
    print("%-44s %-42s %s" % ("decode 512^2 bf16 FLOP rate / matmul rate",
                              "%.0f %% (%.0f of %.0f TFLOP/s)" % (share, rate, mm["tflops"]),
                              ">= 40 %%  %s" % ("MET" if share >= 40 else "NOT MET")))
else:
    print("%-44s %-42s %s" % ("decode FLOP rate / matmul rate", "missing", ">= 40 %"))
if k1024:
    gb = k1024["peak_in_use_mb"] * 1048576 / 1e9
    print("%-44s %-42s %s" % ("peak memory, 1024^2 bf16 decode (in use)",
                              "%.2f GB (held %.2f GB)" % (gb, k1024["peak_reserved_mb"] * 1048576 / 1e9),
                              "<= 1.5 GB  %s" % ("MET" if gb <= 1.5 else "NOT MET")))
else:
    print("%-44s %-42s %s" % ("peak memory, 1024^2 bf16 decode", "missing", "<= 1.5 GB"))
# training: klvae's images/s against PyTorch eager AMP bf16 (and compiled)
kt = next((r for r in rows if r.get("tool") == "klvae" and r.get("op") == "train"), None)
pe = next((r for r in rows if r.get("impl") == "pytorch" and r.get("device") == "cuda"
           and not r.get("compile")), None)
pc = next((r for r in rows if r.get("impl") == "pytorch" and r.get("device") == "cuda"
           and r.get("compile")), None)
if kt and pe:
    ratio = kt["images_per_s"] / pe["images_per_s"]
    print("%-44s %-42s %s" % ("train 256^2 b8 bf16: klvae img/s / torch eager",
                              "%.2fx (%.1f / %.1f img/s)" % (ratio, kt["images_per_s"], pe["images_per_s"]),
                              ">= 1.5x  %s" % ("MET" if ratio >= 1.5 else "NOT MET")))
    kmem = kt["peak_in_use_mb"]
    print("%-44s %-42s %s" % ("train peak device memory: klvae / torch",
                              "%.0f / %.0f MiB" % (kmem, pe.get("peak_device_mb", -1)),
                              "<= torch  %s" % ("MET" if kmem <= pe.get("peak_device_mb", 0) else "NOT MET")))
    if pc:
        print("%-44s %-42s %s" % ("train: torch.compile img/s", "%.1f img/s" % pc["images_per_s"],
                                  "(for reference)"))
    if mm:  # 2.7 TFLOP per image: the autoencoder's forward and backward at 256^2
        mfu = 100 * 2.7 * kt["images_per_s"] / mm["tflops"]
        print("%-44s %-42s %s" % ("train model FLOP utilisation (bf16 matmul)", "%.0f %%" % mfu,
                                  "reported"))
else:
    print("%-44s %-42s %s" % ("train 256^2 b8 bf16 vs torch eager", "missing", ">= 1.5x"))
# mixed-precision training against fp32: held-out PSNR after the same steps
qf = next((r for r in rows if r.get("op") == "quality" and r.get("precision") == "fp32"), None)
qb = next((r for r in rows if r.get("op") == "quality" and r.get("precision") == "bf16"), None)
if qf and qb:
    gap = qb["psnr_db"] - qf["psnr_db"]
    print("%-44s %-42s %s" % ("train bf16 vs fp32: held-out PSNR (small, %d st.)" % qb["steps"],
                              "%.2f vs %.2f dB (%+.2f dB)" % (qb["psnr_db"], qf["psnr_db"], gap),
                              "within 0.5 dB  %s" % ("MET" if gap >= -0.5 else "NOT MET")))
else:
    print("%-44s %-42s %s" % ("train bf16 vs fp32: held-out PSNR", "missing", "within 0.5 dB"))
# huge images (4c): the streamed decode
for e in (r for r in rows if r.get("tool") == "stream_error" and r.get("size") == 1024):
    tol = e.get("tolerance")
    print("%-44s %-42s %s" % ("streamed 1024^2 %s vs untiled: rel L2" % e["precision"],
                              "%.2e (max abs %.2e)" % (e["rel_l2"], e["max_abs"]),
                              "<= %g  %s" % (tol, "MET" if e["rel_l2"] <= tol else "NOT MET")
                              if tol else "reported"))
k8 = next((r for r in rows if r.get("tool") == "klvae" and r.get("op") == "stream"
           and r.get("size") == 8192), None)
d8 = next((r for r in rows if r.get("tool") == "diffusers_stream" and r.get("size") == 8192), None)
e8 = next((r for r in rows if r.get("tool") == "stream_error" and r.get("size") == 8192), None)
if k8:
    gb = k8["peak_in_use_mb"] * 1048576 / 1e9
    print("%-44s %-42s %s" % ("decode 8192^2 bf16 streamed, memory_limit 8G",
                              "%.1f s, device peak %.2f GB" % (k8["median_ms"] / 1e3, gb),
                              "<= 8 GB  %s" % ("MET" if gb <= 8.0 else "NOT MET")))
    print("   plan: %s; host RSS %.1f GB" % (k8.get("plan", "?"), k8.get("peak_rss_mb", 0) / 1024))
else:
    print("%-44s %-42s %s" % ("decode 8192^2 bf16 streamed, memory_limit 8G", "missing", "<= 8 GB"))
if d8:
    print("%-44s %-42s %s" % ("diffusers enable_tiling() 8192^2 bf16",
                              "%.1f s, device peak %.2f GB" % (d8["median"], d8["peak_device_mb"] * 1048576 / 1e9),
                              "klvae / diffusers time %.2fx" % (k8["median_ms"] / 1e3 / d8["median"])
                              if k8 else "-"))
if e8:
    print("%-44s %-42s %s" % ("8192^2: klvae streamed vs diffusers tiled",
                              "max abs %.3g, rel L2 %.3g" % (e8["max_abs"], e8["rel_l2"]),
                              "(tiling's error and bf16)"))
EOF
[ -s "$OUT/profile.txt" ] && tee -a "$OUT/summary.txt" <"$OUT/profile.txt"
status=0
[ "$TEST_RC" = 0 ] || { echo "check.sh: test_cuda did not pass (exit $TEST_RC): see $OUT/test_cuda.log" >&2; status=1; }
[ "$NCCL_RC" = 0 ] || { echo "check.sh: the NCCL check did not pass (exit $NCCL_RC): see $OUT/test_nccl.log" >&2; status=1; }
[ "$STREAM_RC" = 0 ] || { echo "check.sh: the streamed decode (4c) failed: see $LOG" >&2; status=1; }
exit $status
