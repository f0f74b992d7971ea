#!/bin/sh
# cli_test.sh — the klvae command-line tool, run as a user would: every
# command's --help, errors on stderr with non-zero exits, odd image sizes
# padded and cropped back, encode + decode equal to reconstruct, convert.
# Also checks that libklvae.so exports nothing but klvae_* symbols.
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

for cmd in info encode decode reconstruct convert options; do
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
check_fails "cuda unavailable" 1 "unavailable" $KLVAE info $MODEL --backend cuda
[ ! -e "$tmp/x.safetensors" ] && ok || bad "a failed encode left a file"

check "info" $KLVAE info $SINGLE --norm-num-groups 4
grep -q "^mid_block_add_attention *false" "$tmp/out" && grep -q "^parameters *53279 " "$tmp/out" \
    && grep -q "^backend *cpu" "$tmp/out" && ok || bad "info output: $(cat "$tmp/out")"

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

# Only klvae_* leaves the shared library (KLVAE_0 is the version node).
extra=$(nm -D --defined-only lib/libklvae.so | awk '{print $3}' | grep -v '^klvae_' | grep -v '^KLVAE_0$')
[ -z "$extra" ] && ok || bad "libklvae.so exports: $extra"
soname=$(readelf -d lib/libklvae.so | sed -n 's/.*SONAME.*\[\(.*\)\]/\1/p')
[ "$soname" = "libklvae.so.0" ] && ok || bad "soname is '$soname'"

echo "cli: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
