#!/bin/sh
# install_test.sh — make install into a temporary DESTDIR, then build and run
# a C program against that copy through pkg-config alone, as a user would;
# then build every example (examples/c/*.c, examples/cpp/*.cpp) the same way,
# warning-free, and run each on small inputs.
set -u
cd "$(dirname "$0")/.."
tmp=$(mktemp -d "${TMPDIR:-/tmp}/klvae-install-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
prefix=/opt/klvae-install-test
stage="$tmp/stage"
passed=0
failed=0
ok() { passed=$((passed + 1)); }
bad() { failed=$((failed + 1)); echo "FAIL: $*"; }

if make -s install PREFIX=$prefix DESTDIR="$stage" >"$tmp/log" 2>&1; then ok; else bad "make install: $(cat "$tmp/log")"; fi
root="$stage$prefix"
for f in include/klvae.h lib/libklvae.so.0.2.0 lib/libklvae.a lib/pkgconfig/klvae.pc bin/klvae \
         share/man/man1/klvae.1; do
    [ -f "$root/$f" ] && ok || bad "$f not installed"
done
[ "$(readlink "$root/lib/libklvae.so.0")" = libklvae.so.0.2.0 ] && ok || bad "libklvae.so.0 link"
[ "$(readlink "$root/lib/libklvae.so")" = libklvae.so.0 ] && ok || bad "libklvae.so link"
# The .pc file names the real prefix, never the staging folder.
grep -q "^prefix=$prefix\$" "$root/lib/pkgconfig/klvae.pc" && ok || bad "klvae.pc prefix: $(head -3 "$root/lib/pkgconfig/klvae.pc")"
grep -q "$stage" "$root/lib/pkgconfig/klvae.pc" && bad "klvae.pc mentions DESTDIR" || ok

cat > "$tmp/user.c" <<'C'
#include <klvae.h>
#include <stdio.h>
#include <stdlib.h>
int main(void) {
    if (klvae_version() / 10000 != KLVAE_VERSION_MAJOR) return 3;
    klvae_options_t *o = NULL; klvae_model_t *m = NULL;
    if (klvae_options_create(&o) || klvae_options_set(o, "config", "tiny") || klvae_model_create(o, &m)) {
        fprintf(stderr, "%s\n", klvae_last_error()); return 1; }
    int f = klvae_model_downsampling_factor(m), z = klvae_model_latent_channels(m);
    float *x = calloc(2 * 3 * 16 * 16, 4), *mu = calloc(2 * z * 256 / (f * f), 4), *y = calloc(2 * 3 * 256, 4);
    for (int i = 0; i < 2 * 3 * 256; i++) x[i] = (float)(i % 7) / 7.0f - 0.5f;
    if (klvae_encode(m, x, 2, 16, 16, mu, NULL) || klvae_decode(m, mu, 2, 16 / f, 16 / f, y)) {
        fprintf(stderr, "%s\n", klvae_last_error()); return 1; }
    printf("installed libklvae %s works: %lld parameters\n", klvae_version_string(),
           (long long)klvae_model_parameter_count(m));
    free(x); free(mu); free(y); klvae_model_free(m); klvae_options_free(o); return 0; }
C
export PKG_CONFIG_PATH="$root/lib/pkgconfig" PKG_CONFIG_SYSROOT_DIR="$stage"
flags=$(pkg-config --cflags --libs klvae 2>"$tmp/err") && ok || bad "pkg-config: $(cat "$tmp/err")"
[ "$(pkg-config --modversion klvae)" = 0.2.0 ] && ok || bad "pkg-config version"
if cc "$tmp/user.c" $flags -o "$tmp/user" 2>"$tmp/err"; then ok; else bad "compile against the installed copy: $(cat "$tmp/err")"; fi
if LD_LIBRARY_PATH="$root/lib" "$tmp/user" >"$tmp/out" 2>"$tmp/err" && grep -q "works" "$tmp/out"; then ok
else bad "run against the installed copy: $(cat "$tmp/err")"; fi
# The program really used the installed library, not the build tree.
if LD_LIBRARY_PATH="$root/lib" ldd "$tmp/user" | grep -q "$root/lib/libklvae.so.0"; then ok; else bad "not linked to the installed copy"; fi
# Static linking through pkg-config --static works too.
sflags=$(pkg-config --static --cflags --libs klvae)
if cc "$tmp/user.c" -o "$tmp/user-static" "$root/lib/libklvae.a" $(echo "$sflags" | sed 's/-lklvae//') 2>"$tmp/err" \
   && "$tmp/user-static" >/dev/null; then ok; else bad "static link: $(cat "$tmp/err")"; fi
if "$root/bin/klvae" --version >/dev/null; then ok; else bad "installed klvae does not run"; fi

# ---- the examples, built against the installed copy with pkg-config alone ----
ex="$tmp/examples"
mkdir -p "$ex"
for src in examples/c/*.c; do
    name=$(basename "$src" .c)
    if cc -std=c11 -Wall -Wextra -Werror "$src" $flags -lm -o "$ex/$name" 2>"$tmp/err"; then ok
    else bad "compile $src against the installed copy: $(cat "$tmp/err")"; fi
done
for src in examples/cpp/*.cpp; do
    name=$(basename "$src" .cpp)
    if g++ -std=c++17 -Wall -Wextra -Wpedantic -Werror -Iexamples/cpp "$src" $flags \
           -o "$ex/$name-cpp" 2>"$tmp/err"; then ok
    else bad "compile $src against the installed copy: $(cat "$tmp/err")"; fi
done
# Small PNGs, written by the installed library: 32 x 24 fits f = 8, 53 x 37 does not.
cat > "$tmp/mkimg.c" <<'C'
#include <klvae.h>
#include <math.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    if (argc != 4) return 2;
    int h = atoi(argv[2]), w = atoi(argv[3]);
    float *p = malloc(sizeof(float) * 3 * h * w);
    if (!p) return 1;
    for (int c = 0; c < 3; c++) for (int y = 0; y < h; y++) for (int x = 0; x < w; x++)
        p[(c * h + y) * w + x] = (float)sin(0.3 * x + 0.2 * y + c);
    int rc = klvae_image_write_png(argv[1], p, h, w); free(p); return rc; }
C
mkdir -p "$tmp/pics"
if cc "$tmp/mkimg.c" $flags -lm -o "$tmp/mkimg" 2>"$tmp/err" \
   && LD_LIBRARY_PATH="$root/lib" "$tmp/mkimg" "$tmp/pics/a.png" 24 32 \
   && LD_LIBRARY_PATH="$root/lib" "$tmp/mkimg" "$tmp/pics/b.png" 37 53; then ok
else bad "could not make the test images: $(cat "$tmp/err")"; fi
fixture=tests/fixtures/noquant/diffusers # f = 8, 0.1 M parameters
[ -f "$fixture/config.json" ] && ok || bad "$fixture is missing"
# run NAME ARGS...: runs an example against the installed copy; output in $tmp/out, $tmp/err
run() {
    name=$1
    shift
    LD_LIBRARY_PATH="$root/lib" "$ex/$name" "$@" >"$tmp/out" 2>"$tmp/err"
}
if run reconstruct "$fixture" "$tmp/pics/a.png" "$tmp/a-rec.png" && grep -q "PSNR" "$tmp/out" \
   && [ -s "$tmp/a-rec.png" ]; then ok
else bad "examples/c/reconstruct: $(cat "$tmp/out" "$tmp/err")"; fi
if LD_LIBRARY_PATH="$root/lib" ldd "$ex/reconstruct" | grep -q "$root/lib/libklvae.so.0"; then ok
else bad "examples/c/reconstruct is not linked to the installed copy"; fi
# Its failure path: 53 x 37 is no multiple of 8; exit 1 with the library's message.
run reconstruct "$fixture" "$tmp/pics/b.png" "$tmp/b-rec.png"
rc=$?
if [ $rc -eq 1 ] && grep -q "encode: .*not a multiple of the downsampling factor 8.*(invalid argument)" "$tmp/err" \
   && [ ! -e "$tmp/b-rec.png" ]; then ok
else bad "examples/c/reconstruct on a 53 x 37 image: exit $rc, $(cat "$tmp/err")"; fi
if run sample_latents && grep -q "RMS change" "$tmp/out"; then ok
else bad "examples/c/sample_latents: $(cat "$tmp/out" "$tmp/err")"; fi
if run encode_folder "$fixture" "$tmp/pics" "$tmp/latents" --threads 1 \
   && grep -q "2 of 2 images encoded" "$tmp/out" \
   && [ -s "$tmp/latents/a.safetensors" ] && [ -s "$tmp/latents/b.safetensors" ]; then ok
else bad "examples/c/encode_folder: $(cat "$tmp/out" "$tmp/err")"; fi
# Its files are klvae's latent files: klvae decode reads one and crops the
# padding away (the PNG's IHDR: width 53, height 37, big-endian at byte 16).
if LD_LIBRARY_PATH="$root/lib" "$root/bin/klvae" decode "$fixture" "$tmp/latents/b.safetensors" \
       "$tmp/b-dec.png" >/dev/null 2>"$tmp/err" \
   && [ "$(od -An -tu1 -j16 -N8 "$tmp/b-dec.png" | tr -s ' ' | sed 's/^ //')" = "0 0 0 53 0 0 0 37" ]
then ok
else bad "klvae decode of encode_folder's latents: $(cat "$tmp/err")"; fi
if run train "$tmp/run" --steps 2 --batch 2 --size 32 --config tiny --threads 1 \
   && grep -q "^step 2/2 " "$tmp/out" && [ -s "$tmp/run/checkpoint.safetensors" ] \
   && [ -s "$tmp/run/model/config.json" ] \
   && [ -s "$tmp/run/model/diffusion_pytorch_model.safetensors" ]; then ok
else bad "examples/c/train: $(cat "$tmp/out" "$tmp/err")"; fi
# The C++ example pads and crops: on the 53 x 37 image it gives klvae reconstruct's PNG.
if run reconstruct-cpp "$fixture" "$tmp/pics/b.png" "$tmp/b-cpp.png" && grep -q "PSNR" "$tmp/out" \
   && LD_LIBRARY_PATH="$root/lib" "$root/bin/klvae" reconstruct "$fixture" "$tmp/pics/b.png" \
          "$tmp/b-klvae.png" -q >/dev/null 2>&1 \
   && cmp -s "$tmp/b-cpp.png" "$tmp/b-klvae.png"; then ok
else bad "examples/cpp/reconstruct: $(cat "$tmp/out" "$tmp/err")"; fi
if ! run reconstruct-cpp "$tmp/no-such-model" "$tmp/pics/a.png" "$tmp/x.png" \
   && grep -q "^klvae_model_load: .*no-such-model" "$tmp/err"; then ok
else bad "examples/cpp/reconstruct does not report a missing model: $(cat "$tmp/err")"; fi
unset PKG_CONFIG_PATH PKG_CONFIG_SYSROOT_DIR
if make -s uninstall PREFIX=$prefix DESTDIR="$stage" >/dev/null 2>&1 && [ ! -e "$root/include/klvae.h" ] \
   && [ ! -e "$root/lib/libklvae.so.0.2.0" ]; then ok; else bad "make uninstall"; fi

echo "install: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
