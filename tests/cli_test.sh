#!/bin/sh
# cli_test.sh — the klvae command-line tool, run as a user would: every
# command's --help, errors on stderr with non-zero exits, odd image sizes
# padded and cropped back, encode + decode equal to reconstruct, convert.
# Also checks that libklvae.so exports nothing but klvae_* symbols, links no
# CUDA library, and finds the CUDA plugin where plugin_loader.h says.
set -u
cd "$(dirname "$0")/.."
KLVAE=bin/klvae
tmp=$(mktemp -d "${TMPDIR:-/tmp}/klvae-cli-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
passed=0
failed=0
ok() { passed=$((passed + 1)); }
bad() { failed=$((failed + 1)); echo "FAIL: $*"; }
check() { # check NAME COMMAND...: the command must succeed
    name=$1; shift
    if "$@" >"$tmp/out" 2>"$tmp/err"; then ok; else bad "$name: $(cat "$tmp/err")"; fi
}
check_fails() { # check_fails NAME EXPECTED_RC TEXT COMMAND...: must fail, say TEXT on stderr
    name=$1; want=$2; text=$3; shift 3
    "$@" >"$tmp/out" 2>"$tmp/err"; rc=$?
    if [ "$rc" -ne "$want" ]; then bad "$name: exit $rc, expected $want"
    elif ! grep -q -- "$text" "$tmp/err"; then bad "$name: stderr lacks '$text': $(cat "$tmp/err")"
    elif [ -s "$tmp/out" ]; then bad "$name: wrote to stdout on error"
    else ok; fi
}

MODEL=tests/fixtures/noquant/diffusers         # f = 8
SINGLE=tests/fixtures/noattn/compvis.safetensors

# A 37 x 53 RGB test picture (sides not multiples of 8), made with the library.
cat > "$tmp/mkimg.c" <<'C'
#include <klvae.h>
#include <math.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    int h = 37, w = 53; float *p = malloc(sizeof(float) * 3 * h * w);
    for (int c = 0; c < 3; c++) for (int y = 0; y < h; y++) for (int x = 0; x < w; x++)
        p[(c * h + y) * w + x] = (float)sin(0.2 * x + 0.3 * y + c);
    int rc = klvae_image_write_png(argv[1], p, h, w); free(p); (void)argc; return rc; }
C
cc -Iinclude "$tmp/mkimg.c" -o "$tmp/mkimg" -Llib -lklvae -Wl,-rpath,"$PWD/lib" -lm && "$tmp/mkimg" "$tmp/in.png" || bad "could not make the test image"

for cmd in info encode decode reconstruct convert options train eval; do
    if $KLVAE $cmd --help >"$tmp/out" 2>&1 && grep -q "usage: klvae $cmd" "$tmp/out"; then ok; else bad "$cmd --help"; fi
done
if $KLVAE --help | grep -q "usage: klvae COMMAND"; then ok; else bad "--help"; fi
if $KLVAE --version | grep -q "klvae [0-9]"; then ok; else bad "--version"; fi

check_fails "unknown command" 2 "unknown command 'frobnicate'" $KLVAE frobnicate
check_fails "no command" 2 "usage" $KLVAE
check_fails "unknown option" 2 "unknown option 'colour'" $KLVAE info $MODEL --colour red
check_fails "bad option value" 2 "bad value 'many' for option 'threads'" $KLVAE info $MODEL --threads many
check_fails "missing value" 2 "needs a value" $KLVAE info $MODEL --threads
check_fails "wrong argument count" 2 "expected 3 arguments" $KLVAE encode $MODEL "$tmp/in.png"
check_fails "missing model" 1 "no-such-model" $KLVAE info "$tmp/no-such-model.safetensors"
check_fails "missing image" 1 "missing.png" $KLVAE encode $MODEL "$tmp/missing.png" "$tmp/x.safetensors"
check_fails "seed without sample" 2 "only makes sense with --sample" $KLVAE encode $MODEL "$tmp/in.png" "$tmp/x.safetensors" --seed 3
# (a plugin that does not exist, so that this holds on a GPU machine too)
check_fails "cuda unavailable" 1 "unavailable" env KLVAE_CUDA_PLUGIN="$tmp/none.so" $KLVAE info $MODEL --backend cuda
[ ! -e "$tmp/x.safetensors" ] && ok || bad "a failed encode left a file"

check "info" $KLVAE info $SINGLE --norm-num-groups 4
grep -q "^mid_block_add_attention *false" "$tmp/out" && grep -q "^parameters *53279 " "$tmp/out" \
    && grep -q "^backend *cpu" "$tmp/out" && ok || bad "info output: $(cat "$tmp/out")"
# precision=bf16 on the CPU: bf16 where the CPU has AVX512-BF16, else fp32 and why
check "info bf16" $KLVAE info $SINGLE --norm-num-groups 4 --backend cpu --precision bf16
if grep -q avx512_bf16 /proc/cpuinfo 2>/dev/null; then
    grep -q "^precision *bf16$" "$tmp/out" && ok || bad "info bf16: $(grep precision "$tmp/out")"
else
    grep -q "^precision *fp32 (precision=bf16 computes in fp32 here: this CPU has no AVX512-BF16" \
        "$tmp/out" && ok || bad "info bf16: $(grep precision "$tmp/out")"
fi
# KLVAE_CPU_NO_BF16: as on a CPU without the instructions, whatever this one has:
# fp32 and why, and the very bits of precision=fp32
check "info bf16 hidden" env KLVAE_CPU_NO_BF16=1 $KLVAE info $SINGLE --norm-num-groups 4 --backend cpu --precision bf16
grep -q "^precision *fp32 (precision=bf16 computes in fp32 here: KLVAE_CPU_NO_BF16 is set" \
    "$tmp/out" && ok || bad "info bf16 hidden: $(grep precision "$tmp/out")"
check "encode fp32" $KLVAE encode $MODEL "$tmp/in.png" "$tmp/fp32.safetensors" --precision fp32
check "encode bf16 hidden" env KLVAE_CPU_NO_BF16=1 $KLVAE encode $MODEL "$tmp/in.png" \
    "$tmp/nobf16.safetensors" --precision bf16
cmp -s "$tmp/fp32.safetensors" "$tmp/nobf16.safetensors" && ok || bad "bf16 without the instructions is not fp32's bits"
if grep -q avx512_bf16 /proc/cpuinfo 2>/dev/null; then
    check "encode bf16" $KLVAE encode $MODEL "$tmp/in.png" "$tmp/bf16.safetensors" --precision bf16
    cmp -s "$tmp/fp32.safetensors" "$tmp/bf16.safetensors" && bad "bf16 gave fp32's bits" || ok
fi
check_fails "tf32 on the cpu" 1 "precision=tf32 needs the CUDA backend" \
    $KLVAE info $MODEL --backend cpu --precision tf32

check "encode" $KLVAE encode $MODEL "$tmp/in.png" "$tmp/lat.safetensors"
check "decode" $KLVAE decode $MODEL "$tmp/lat.safetensors" "$tmp/dec.png"
check "reconstruct" $KLVAE reconstruct $MODEL "$tmp/in.png" "$tmp/rec.png"
grep -q "PSNR" "$tmp/err" && ok || bad "reconstruct prints no PSNR"
# encode then decode is reconstruct, and the padding is cropped back to 37 x 53
cmp -s "$tmp/dec.png" "$tmp/rec.png" && ok || bad "decode(encode(x)) differs from reconstruct(x)"
python3 - "$tmp/dec.png" <<'PY' && ok || bad "decoded image is not 37 x 53"
import struct, sys
data = open(sys.argv[1], "rb").read()
w, h = struct.unpack(">II", data[16:24])
sys.exit(0 if (w, h) == (53, 37) else 1)
PY

# --memory-limit: a decode too large for the limit runs streamed (in bands,
# spilling to --spill-dir), says so, and writes the untiled image
mkdir -p "$tmp/spill"
check "streamed decode" $KLVAE decode $MODEL "$tmp/lat.safetensors" "$tmp/streamed.png" \
    --memory-limit 1M --spill-dir "$tmp/spill"
grep -q "streamed: .* bands" "$tmp/err" && ok || bad "decode --memory-limit 1M: $(cat "$tmp/err")"
cmp -s "$tmp/streamed.png" "$tmp/dec.png" && ok || python3 - "$tmp/streamed.png" "$tmp/dec.png" <<'PY' && ok || bad "the streamed decode differs from the untiled one"
import sys, zlib, struct
def pixels(path):
    d = open(path, "rb").read(); i = 8; idat = b""
    while i < len(d):
        n, t = struct.unpack(">I4s", d[i:i + 8]); idat += d[i + 8:i + 8 + n] if t == b"IDAT" else b""; i += 12 + n
    return zlib.decompress(idat)
a, b = pixels(sys.argv[1]), pixels(sys.argv[2])  # 8-bit: at most one level, rarely
sys.exit(0 if len(a) == len(b) and all(abs(x - y) <= 1 for x, y in zip(a, b)) else 1)
PY
[ -z "$(ls -A "$tmp/spill")" ] && ok || bad "the spill folder is not empty: $(ls -A "$tmp/spill")"
check_fails "memory limit syntax" 2 "bad value '4X' for option 'memory_limit'" \
    $KLVAE decode $MODEL "$tmp/lat.safetensors" "$tmp/x.png" --memory-limit 4X
check_fails "spill folder missing" 1 "cannot create the spill file in $tmp/no-such-dir" \
    $KLVAE decode $MODEL "$tmp/lat.safetensors" "$tmp/x.png" --memory-limit 1M --spill-dir "$tmp/no-such-dir"
[ ! -e "$tmp/x.png" ] && ok || bad "a failed decode left an image"

# --sample with a seed is repeatable; another seed differs; --scaled round trips
check "sample 1" $KLVAE encode $MODEL "$tmp/in.png" "$tmp/s1.safetensors" --sample --seed 5
check "sample 2" $KLVAE encode $MODEL "$tmp/in.png" "$tmp/s2.safetensors" --sample --seed 5
check "sample 3" $KLVAE encode $MODEL "$tmp/in.png" "$tmp/s3.safetensors" --sample --seed 6
cmp -s "$tmp/s1.safetensors" "$tmp/s2.safetensors" && ok || bad "same seed, different latents"
cmp -s "$tmp/s1.safetensors" "$tmp/s3.safetensors" && bad "different seeds, same latents" || ok
check "scaled encode" $KLVAE encode $MODEL "$tmp/in.png" "$tmp/scaled.safetensors" --scaled
check "scaled decode" $KLVAE decode $MODEL "$tmp/scaled.safetensors" "$tmp/scaled.png"
# unscaling is (z * s) / s: a float rounding, so compare pixel values loosely
python3 - "$tmp/scaled.png" "$tmp/dec.png" <<'PY' && ok || bad "scaled latents decode differently"
import sys, zlib, struct
def pixels(path):
    d = open(path, "rb").read(); i = 8; idat = b""
    while i < len(d):
        n, t = struct.unpack(">I4s", d[i:i + 8]); idat += d[i + 8:i + 8 + n] if t == b"IDAT" else b""; i += 12 + n
    return zlib.decompress(idat)
a, b = pixels(sys.argv[1]), pixels(sys.argv[2])
sys.exit(0 if len(a) == len(b) and sum(x != y for x, y in zip(a, b)) < len(a) // 50 else 1)
PY

check "convert" $KLVAE convert $SINGLE "$tmp/converted" --norm-num-groups 4
check "converted info" $KLVAE info "$tmp/converted"
grep -q "^norm_num_groups *4" "$tmp/out" && ok || bad "converted config lost norm_num_groups"

# ---- train and eval (tiny config, f = 2: seconds, not minutes) ----
TRAIN="$KLVAE train --config tiny --size 16 --batch 2 --learning-rate 1e-3 --perceptual-weight 0 --eval-images 3 -q"
rows() { tail -n +2 "$1" | wc -l | tr -d ' '; }
check "train" $TRAIN --steps 4 --grid-every 2 --checkpoint-every 2 --out "$tmp/run"
grep -q "held-out PSNR: .* dB at step 0 -> .* dB at step 4" "$tmp/out" && ok || bad "train did not print the held-out PSNR: $(cat "$tmp/out")"
for f in log.csv eval.csv grid.png loss.png checkpoint.safetensors grids/step_000000.png \
         grids/step_000002.png grids/step_000004.png model/config.json; do
    [ -s "$tmp/run/$f" ] && ok || bad "train left no $f"
done
[ "$(rows "$tmp/run/log.csv")" = 4 ] && ok || bad "log.csv has $(rows "$tmp/run/log.csv") rows, not 4"
[ "$(cut -d, -f1 "$tmp/run/eval.csv" | tr '\n' ' ')" = "step 0 2 4 " ] && ok || bad "eval.csv steps: $(cut -d, -f1 "$tmp/run/eval.csv")"
check "trained model loads" $KLVAE info "$tmp/run/model"
[ -e "$tmp/run/model_ema" ] && bad "model_ema without --ema-decay" || ok
check "train with EMA" $TRAIN --steps 1 --ema-decay 0.9 --out "$tmp/ema"
[ -s "$tmp/ema/model_ema/diffusion_pytorch_model.safetensors" ] && ok || bad "no model_ema/ with --ema-decay"

# Resuming is exact: 2 + 2 steps give the bytes of 4 steps, and the same losses.
check "train 2" $TRAIN --steps 2 --out "$tmp/half"
check "resume to 4" $KLVAE train --resume "$tmp/half" --steps 4 -q
cmp -s "$tmp/run/model/diffusion_pytorch_model.safetensors" "$tmp/half/model/diffusion_pytorch_model.safetensors" \
    && ok || bad "2 steps + resume + 2 steps differ from 4 steps"
cut -d, -f1,4- "$tmp/run/log.csv" > "$tmp/a.csv"; cut -d, -f1,4- "$tmp/half/log.csv" > "$tmp/b.csv"
cmp -s "$tmp/a.csv" "$tmp/b.csv" && ok || bad "resumed log.csv differs: $(diff "$tmp/a.csv" "$tmp/b.csv" | head -5)"
# the resumed run evaluates the same held-out images (its --eval-images came from the checkpoint)
cmp -s "$tmp/run/eval.csv" "$tmp/half/eval.csv" && ok || bad "resumed eval.csv differs: $(diff "$tmp/run/eval.csv" "$tmp/half/eval.csv" | head -5)"
check_fails "resume past the end" 1 "already at step 4" $KLVAE train --resume "$tmp/half" --steps 4

# Ctrl-C: the step finishes, a checkpoint and the model are written, exit 130.
$TRAIN --steps 1000000 --grid-every 1000000 --out "$tmp/int" >"$tmp/int.out" 2>"$tmp/int.err" &
pid=$!
for i in $(seq 1 300); do [ -s "$tmp/int/log.csv" ] && [ "$(rows "$tmp/int/log.csv")" -ge 2 ] && break; sleep 0.1; done
kill -INT $pid; wait $pid; rc=$?
[ "$rc" = 130 ] && ok || bad "interrupted train exited $rc, not 130"
[ -s "$tmp/int/checkpoint.safetensors" ] && [ -s "$tmp/int/model/config.json" ] && ok || bad "no checkpoint or model after Ctrl-C"
grep -q "train --resume" "$tmp/int.err" && ok || bad "Ctrl-C did not say how to resume: $(cat "$tmp/int.err")"
done_steps=$(rows "$tmp/int/log.csv")
check "resume after Ctrl-C" $KLVAE train --resume "$tmp/int" --steps $((done_steps + 1)) -q
[ "$(rows "$tmp/int/log.csv")" = $((done_steps + 1)) ] && ok || bad "resumed log.csv has $(rows "$tmp/int/log.csv") rows"

# A folder of images, one of them unreadable: reported once, skipped.
mkdir -p "$tmp/data/sub"
cp "$tmp/in.png" "$tmp/data/a.png"; cp "$tmp/in.png" "$tmp/data/sub/b.PNG"
echo "not a picture" > "$tmp/data/bad.png"
check "train on a folder" $TRAIN --steps 3 --data "$tmp/data" --out "$tmp/folder"
[ "$(grep -c "skipping $tmp/data/bad.png" "$tmp/err")" = 1 ] && ok || bad "bad.png not reported exactly once: $(cat "$tmp/err")"
check "train with LPIPS and the GAN" $KLVAE train --config tiny --size 32 --batch 2 --steps 2 --disc-start 1 \
    --disc-layers 2 --lpips tests/fixtures/train/lpips.safetensors --eval-images 0 -q --out "$tmp/gan"
awk -F, 'NR == 2 && $6 > 0 { lp = 1 } NR == 3 && $11 > 0 && $12 > 0 { gan = 1 } END { exit !(lp && gan) }' \
    "$tmp/gan/log.csv" && ok || bad "LPIPS or GAN losses missing from log.csv: $(cat "$tmp/gan/log.csv")"
$KLVAE train --config tiny --size 16 --batch 2 --steps 1 --eval-images 0 -q --out "$tmp/nolpips" 2>"$tmp/err" >/dev/null
[ "$(grep -c "NO LPIPS WEIGHTS" "$tmp/err")" = 1 ] && ok || bad "no loud one-time LPIPS warning: $(cat "$tmp/err")"

check_fails "train: size not a multiple" 2 "not a multiple of the model's downsampling factor 8" $KLVAE train --config small --size 20 --steps 1 --out "$tmp/x1"
check_fails "train: batch 0" 2 "batch needs an integer" $TRAIN --batch 0 --out "$tmp/x2"
check_fails "train: bad steps" 2 "steps needs an integer" $TRAIN --steps many --out "$tmp/x3"
check_fails "train: missing data" 1 "$tmp/no-data" $TRAIN --steps 1 --data "$tmp/no-data" --out "$tmp/x4"
check_fails "train: missing checkpoint" 1 "no-run" $KLVAE train --resume "$tmp/no-run/checkpoint.safetensors" --out "$tmp/x5"
check_fails "train: model and resume" 2 "exclude each other" $TRAIN --model "$MODEL" --resume "$tmp/run"
check_fails "train: positional" 2 "no positional arguments" $TRAIN "$tmp/data"
check_fails "train: unknown flag" 2 "unknown option 'epochs'" $TRAIN --epochs 3
check_fails "train: missing LPIPS file" 1 "no-lpips" $TRAIN --steps 1 --lpips "$tmp/no-lpips.safetensors" --out "$tmp/x6"

check "eval procedural" $KLVAE eval "$tmp/run/model" --size 16 --images 2
[ "$(grep -c "^procedural#[01]  16x16  PSNR" "$tmp/out")" = 2 ] && grep -q "^mean over 2 images: PSNR" "$tmp/out" \
    && ok || bad "eval output: $(cat "$tmp/out")"
check "eval a folder with LPIPS" $KLVAE eval "$tmp/run/model" --data "$tmp/data" --lpips tests/fixtures/train/lpips.safetensors
grep -q "^mean over 2 images: PSNR .* SSIM .* LPIPS" "$tmp/out" && grep -q "skipping $tmp/data/bad.png" "$tmp/err" \
    && ok || bad "eval --data output: $(cat "$tmp/out" "$tmp/err")"
check "eval centre crops" $KLVAE eval "$tmp/run/model" --data "$tmp/data" --size 32
grep -q "32x32" "$tmp/out" && ok || bad "eval --size did not crop: $(cat "$tmp/out")"
check_fails "eval: no model" 1 "no-model" $KLVAE eval "$tmp/no-model"

# The pixel budget (the option max_image_pixels as a flag): in.png has 53 x 37 = 1961 pixels.
check_fails "encode over the pixel budget" 1 "more than the budget of 1960 pixels (option max_image_pixels)" \
    $KLVAE encode $MODEL "$tmp/in.png" "$tmp/x.safetensors" --max-image-pixels 1960
check "encode at the pixel budget" $KLVAE encode $MODEL "$tmp/in.png" "$tmp/budget.safetensors" --max-image-pixels 1961
check_fails "eval over the pixel budget" 1 "no image could be evaluated" \
    $KLVAE eval "$tmp/run/model" --data "$tmp/data" --max-image-pixels 1960
grep -q "skipping $tmp/data/a.png: .*max_image_pixels" "$tmp/err" && ok || bad "eval did not say why it skipped a.png: $(cat "$tmp/err")"
check_fails "train over the pixel budget" 1 "max_image_pixels" \
    $TRAIN --steps 1 --data "$tmp/data" --max-image-pixels 1960 --out "$tmp/x7"
check_fails "eval: empty folder" 1 "no PNG or JPEG file" $KLVAE eval "$tmp/run/model" --data "$tmp/run/grids/../model"

# Only klvae_* leaves the shared library (KLVAE_0, KLVAE_0.2, ... are version nodes).
extra=$(nm -D --defined-only lib/libklvae.so | awk '{print $3}' | grep -v '^klvae_' | grep -v '^KLVAE_[0-9][0-9.]*$')
[ -z "$extra" ] && ok || bad "libklvae.so exports: $extra"
soname=$(readelf -d lib/libklvae.so | sed -n 's/.*SONAME.*\[\(.*\)\]/\1/p')
[ "$soname" = "libklvae.so.0" ] && ok || bad "soname is '$soname'"

# libklvae.so never links CUDA (the CUDA backend is a plugin loaded with dlopen),
# so it loads on machines without CUDA.
needed=$(readelf -d lib/libklvae.so | sed -n 's/.*NEEDED.*\[\(.*\)\]/\1/p')
cuda_needed=$(echo "$needed" | grep -E '^lib(cuda|cudart|cudnn|cublas|cublasLt|nvrtc)[.-]' || true)
[ -n "$needed" ] && [ -z "$cuda_needed" ] && ok || bad "libklvae.so needs CUDA libraries: $cuda_needed"
# Where the plugin is looked for, seen from a program linked with the shared
# library: beside libklvae.so (dladdr), then the linker's search path.
cat > "$tmp/which.c" <<'C'
#include <klvae.h>
#include <stdio.h>
int main(void) {
    klvae_options_t *o = NULL; klvae_model_t *m = NULL; char reason[1024] = "";
    klvae_options_create(&o); klvae_options_set(o, "config", "tiny");
    if (klvae_model_create(o, &m) != KLVAE_OK) { printf("error: %s\n", klvae_last_error()); return 1; }
    klvae_model_get(m, "backend_reason", reason, sizeof reason);
    printf("%s|%s\n", klvae_model_backend(m), reason);
    klvae_model_free(m); klvae_options_free(o); return 0; }
C
mkdir -p "$tmp/core" "$tmp/elsewhere"
cp -P lib/libklvae.so* "$tmp/core/"
if cc -Iinclude "$tmp/which.c" -o "$tmp/which" -L"$tmp/core" -lklvae; then ok; else bad "could not build the plugin probe program"; fi
which_backend() { env -u KLVAE_CUDA_PLUGIN -u KLVAE_BACKEND LD_LIBRARY_PATH="$1" "$tmp/which" 2>&1; }
out=$(which_backend "$tmp/core")
case "$out" in "cpu|CUDA plugin not found (looked in: $tmp/core/libklvae_cuda.so"*) ok ;;
    *) bad "without a plugin: '$out'" ;; esac
FAKE=build/tests/plugins/fake_working.so
if [ -f "$FAKE" ]; then
    cp "$FAKE" "$tmp/core/libklvae_cuda.so"
    out=$(which_backend "$tmp/core")
    # beside the library it is loaded only where the NVIDIA driver loads
    printf '#include <dlfcn.h>\nint main(void) { return dlopen("libcuda.so.1", RTLD_LAZY) ? 0 : 1; }\n' \
        >"$tmp/driver.c"
    cc "$tmp/driver.c" -o "$tmp/driver" -ldl || bad "could not build the driver probe"
    if "$tmp/driver"; then
        [ "$out" = "cuda|" ] && ok || bad "plugin beside libklvae.so not used: '$out'"
    else
        case "$out" in
        "cpu|CUDA plugin $tmp/core/libklvae_cuda.so: no CUDA driver"*"the plugin was not loaded") ok ;;
        *) bad "plugin beside libklvae.so without a driver: '$out'" ;;
        esac
    fi
    mv "$tmp/core/libklvae_cuda.so" "$tmp/elsewhere/"
    out=$(which_backend "$tmp/core:$tmp/elsewhere")
    [ "$out" = "cuda|" ] && ok || bad "plugin on LD_LIBRARY_PATH not used: '$out'"
    out=$(KLVAE_CUDA_PLUGIN="$tmp/elsewhere/libklvae_cuda.so" LD_LIBRARY_PATH="$tmp/core" "$tmp/which" 2>&1)
    [ "$out" = "cuda|" ] && ok || bad "KLVAE_CUDA_PLUGIN not used: '$out'"
    out=$(KLVAE_CUDA_PLUGIN="$tmp/elsewhere/libklvae_cuda.so" $KLVAE info $MODEL 2>&1)
    echo "$out" | grep -q "^backend *cuda$" && ok || bad "info with the fake plugin: $out"
    out=$(KLVAE_CUDA_PLUGIN="$tmp/nowhere.so" $KLVAE info $MODEL 2>&1)
    echo "$out" | grep -q "^backend *cpu (auto: CUDA plugin not found: KLVAE_CUDA_PLUGIN is $tmp/nowhere.so" \
        && ok || bad "info without the plugin: $out"
else
    bad "$FAKE is missing (make builds it)"
fi

echo "cli: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
