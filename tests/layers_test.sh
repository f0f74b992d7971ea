#!/bin/sh
# layers_test.sh — the tree shows the architecture: src/ is grouped in
# layers (base, formats, backend, model, train and dataset, cli;
# docs/design.md), and an
# #include "dir/file.h" may only name the file's own layer or one below it.
# The CUDA plugin (cuda/) is a backend: it may include base/ and backend/.
# Prints one line per violation and "layers: N passed, N failed".
cd "$(dirname "$0")/.." || exit 1
pass=0
fail=0
rank() {
    case "$1" in
    base) echo 0 ;; formats) echo 1 ;; backend) echo 2 ;; model) echo 3 ;;
    train) echo 4 ;; dataset) echo 4 ;; cli) echo 5 ;; cuda) echo 2 ;; *) echo -1 ;;
    esac
}
check_file() { # file layer
    file=$1
    mine=$(rank "$2")
    bad=0
    for inc in $(sed -n 's/^[[:space:]]*#[[:space:]]*include[[:space:]]*"\([^"]*\)".*/\1/p' "$file"); do
        case "$inc" in
        */*) dir=${inc%%/*} ;;
        *) continue ;; # klvae.h, or a file beside it
        esac
        [ "$dir" = ".." ] && { echo "FAIL: $file includes $inc (a relative path; name the layer's folder)"; bad=1; continue; }
        theirs=$(rank "$dir")
        [ "$theirs" -lt 0 ] && continue
        case "$2:$dir" in
        cuda:base | cuda:backend | cuda:cuda) continue ;;
        cuda:* | *:cuda) theirs=99 ;;
        esac
        if [ "$theirs" -gt "$mine" ]; then
            echo "FAIL: $file ($2) includes $inc ($dir): includes go down the layers only"
            bad=1
        fi
    done
    if [ $bad -eq 0 ]; then pass=$((pass + 1)); else fail=$((fail + 1)); fi
}
for layer in base formats backend model train dataset cli; do
    [ -d "src/$layer" ] || { echo "FAIL: src/$layer is missing"; fail=$((fail + 1)); continue; }
    for f in $(find "src/$layer" -name '*.[ch]'); do
        check_file "$f" "$layer"
    done
done
for f in cuda/*.cu cuda/*.cuh cuda/*.h; do
    [ -f "$f" ] && check_file "$f" cuda
done
# nothing of the library sits loose in src/ (only the linker's version script)
for f in src/*; do
    [ -d "$f" ] && continue
    case "$f" in src/libklvae.map) continue ;; esac
    echo "FAIL: $f sits in src/ outside a layer folder"
    fail=$((fail + 1))
done
echo "layers: $pass passed, $fail failed"
[ $fail -eq 0 ]
