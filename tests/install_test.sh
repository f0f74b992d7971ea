#!/bin/sh
# install_test.sh — make install into a temporary DESTDIR, then build and run
# a C program against that copy through pkg-config alone, as a user would.
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
for f in include/klvae.h lib/libklvae.so.0.1.0 lib/libklvae.a lib/pkgconfig/klvae.pc bin/klvae \
         share/man/man1/klvae.1; do
    [ -f "$root/$f" ] && ok || bad "$f not installed"
done
[ "$(readlink "$root/lib/libklvae.so.0")" = libklvae.so.0.1.0 ] && ok || bad "libklvae.so.0 link"
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
[ "$(pkg-config --modversion klvae)" = 0.1.0 ] && ok || bad "pkg-config version"
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
unset PKG_CONFIG_PATH PKG_CONFIG_SYSROOT_DIR
if make -s uninstall PREFIX=$prefix DESTDIR="$stage" >/dev/null 2>&1 && [ ! -e "$root/include/klvae.h" ] \
   && [ ! -e "$root/lib/libklvae.so.0.1.0" ]; then ok; else bad "make uninstall"; fi

echo "install: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
