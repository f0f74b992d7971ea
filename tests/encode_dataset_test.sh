#!/bin/sh
# encode_dataset_test.sh — `klvae encode-dataset` and `klvae latent-stats` as a
# user runs them:
#   - help, usage errors, a list file instead of a folder;
#   - round trip: a shard's latent, decoded by `klvae decode`, is the PNG that
#     `klvae reconstruct` makes of the image the dataset took (a plain crop),
#     byte for byte;
#   - resume after kills: SIGKILL at every rename and fsync and at the first,
#     middle and last write of each file the run writes (strace -e inject, as
#     tests/fault_test.sh), then the same command again: the folder is byte for
#     byte the one of an uninterrupted run, with no temporary file left;
#     without strace, kills at random times;
#   - a full disk (ENOSPC at a shard's write) and a folder without write
#     permission stop the run with exit 1, a message naming the file and the
#     OS error, and no half-written shard; the same command then finishes;
#   - --part 0/2 and 1/2 make the folder `mpirun -np 2` makes (when Open MPI's
#     mpirun is installed), every image in the index once.
# Run after make, from anywhere.
set -u
cd "$(dirname "$0")/.."
top=$PWD
KLVAE=$PWD/bin/klvae
MODEL=$PWD/tests/fixtures/noquant/diffusers # f = 8
tmp=$(mktemp -d "${TMPDIR:-/tmp}/klvae-dataset-XXXXXX")
tmp=$(cd "$tmp" && pwd -P)
chmod 755 "$tmp"
trap 'rm -rf "$tmp"' EXIT
passed=0
failed=0
ok() { passed=$((passed + 1)); }
bad() { failed=$((failed + 1)); echo "FAIL: $*"; }
leftovers() { find "$1" -name '*.tmp.klvae-*' | sed "s|$tmp/||"; }

# ---- images: PNGs of odd sizes made with the library, two bad files ----
cat > "$tmp/mkimg.c" <<'C'
#include <klvae.h>
#include <math.h>
#include <stdlib.h>
/* mkimg PATH H W SEED [CROP_PATH TOP LEFT SIZE]: an 8-bit picture, and a crop of it */
int main(int argc, char **argv) {
    int h = atoi(argv[2]), w = atoi(argv[3]), seed = atoi(argv[4]);
    float *p = malloc(sizeof(float) * 3 * h * w);
    for (int c = 0; c < 3; c++) for (int y = 0; y < h; y++) for (int x = 0; x < w; x++) {
        int v = (int)(127.5 + 127.5 * sin(0.21 * x * (c + 1) + 0.37 * y + seed)) % 256;
        p[(c * h + y) * w + x] = v * (2.0f / 255.0f) - 1.0f; }
    int rc = klvae_image_write_png(argv[1], p, h, w);
    if (argc == 9) {
        int top = atoi(argv[6]), left = atoi(argv[7]), s = atoi(argv[8]);
        float *q = malloc(sizeof(float) * 3 * s * s);
        for (int c = 0; c < 3; c++) for (int y = 0; y < s; y++) for (int x = 0; x < s; x++)
            q[(c * s + y) * s + x] = p[(c * h + top + y) * w + left + x];
        rc |= klvae_image_write_png(argv[5], q, s, s);
    }
    return rc; }
C
cc -Iinclude "$tmp/mkimg.c" -o "$tmp/mkimg" -Llib -lklvae -Wl,-rpath,"$top/lib" -lm ||
    { echo "FAIL: cannot build the image maker"; exit 1; }
data=$tmp/data
mkdir -p "$data/sub"
i=0
for size in "37 53" "64 41" "29 90" "75 75" "50 33" "101 67" "40 40" "24 30"; do
    set -- $size
    dir=$data
    [ $i -ge 4 ] && dir=$data/sub
    "$tmp/mkimg" "$dir/img$i.png" "$1" "$2" $i || bad "cannot make image $i"
    i=$((i + 1))
done
echo "not an image" > "$data/bad.png"
head -c 60 "$data/img0.png" > "$data/truncated.png"

# ---- help, usage errors ----
for cmd in encode-dataset latent-stats; do
    "$KLVAE" $cmd --help 2>&1 | grep -q "usage: klvae $cmd" && ok || bad "$cmd --help"
done
"$KLVAE" --help | grep -q "encode-dataset" && ok || bad "--help lists no encode-dataset"
usage() { # usage NAME TEXT ARGS...: exit 2 and TEXT on stderr
    name=$1; text=$2; shift 2
    "$KLVAE" "$@" >/dev/null 2>"$tmp/err"; rc=$?
    [ $rc -eq 2 ] && grep -q -- "$text" "$tmp/err" && ok || bad "$name: exit $rc, $(cat "$tmp/err")"
}
usage "no data" "needs --data DIR or --list FILE" encode-dataset "$MODEL" --out "$tmp/x"
usage "both" "needs --data DIR or --list FILE" encode-dataset "$MODEL" --data "$data" --list "$tmp/l" --out "$tmp/x"
usage "no out" "needs --out" encode-dataset "$MODEL" --data "$data"
usage "bad part" "bad value '2/2' for option 'part'" encode-dataset "$MODEL" --data "$data" --out "$tmp/x" --part 2/2
usage "bad buckets" "option 'buckets'" encode-dataset "$MODEL" --data "$data" --out "$tmp/x" --buckets 64
"$KLVAE" encode-dataset "$MODEL" --data "$data" --out "$tmp/x" --size 20 -q 2>"$tmp/err"
[ $? -eq 1 ] && grep -q "size 20 is not a multiple" "$tmp/err" && ok || bad "size 20: $(cat "$tmp/err")"
[ ! -e "$tmp/x" ] && ok || bad "a refused run left $tmp/x"

# ---- the reference run: buckets, flip, fp16, two bad files ----
ARGS="--buckets 48,16 --flip --dtype fp16 --shard-size 2 --encode-batch 1 --backend cpu --threads 2"
ref=$tmp/ref
"$KLVAE" encode-dataset "$MODEL" --data "$data" --out "$ref" $ARGS >"$tmp/out" 2>"$tmp/err" &&
    ok || bad "reference run: $(cat "$tmp/err")"
grep -q "skipping bad.png: .*neither a PNG nor a JPEG" "$tmp/err" && ok || bad "no line for bad.png"
grep -q "skipping truncated.png" "$tmp/err" && ok || bad "no line for truncated.png"
grep -q "part 0/1 done: 8 images" "$tmp/err" && ok || bad "summary: $(cat "$tmp/err")"
grep -q "dataset complete" "$tmp/err" && ok || bad "not complete: $(cat "$tmp/err")"
grep -q "^implied scaling_factor" "$tmp/out" && ok || bad "no statistics printed"
[ "$(wc -l < "$ref/index.jsonl")" -eq 8 ] && ok || bad "index.jsonl has $(wc -l < "$ref/index.jsonl") lines"
[ "$(wc -l < "$ref/errors.jsonl")" -eq 2 ] && ok || bad "errors.jsonl: $(cat "$ref/errors.jsonl")"
grep -q '"complete": true' "$ref/manifest.json" && ok || bad "manifest not complete"
# again: nothing to do, nothing changes
cp -r "$ref" "$tmp/ref2"
"$KLVAE" encode-dataset "$MODEL" --data "$data" --out "$tmp/ref2" $ARGS -q && diff -r "$ref" "$tmp/ref2" >/dev/null &&
    ok || bad "a second run changed the finished folder"
# latent-stats prints and rewrites the same manifest
"$KLVAE" latent-stats "$tmp/ref2" >"$tmp/out" 2>"$tmp/err" && grep -q "^all " "$tmp/out" &&
    cmp -s "$ref/manifest.json" "$tmp/ref2/manifest.json" && ok || bad "latent-stats: $(cat "$tmp/err")"
"$KLVAE" latent-stats "$data" >/dev/null 2>"$tmp/err"
[ $? -eq 1 ] && grep -q "no latent dataset folder" "$tmp/err" && ok || bad "latent-stats on images: $(cat "$tmp/err")"
# other options into the same folder: refused, unchanged
"$KLVAE" encode-dataset "$MODEL" --data "$data" --out "$tmp/ref2" --size 16 -q 2>"$tmp/err"
[ $? -eq 1 ] && grep -q "other settings" "$tmp/err" && diff -r "$ref" "$tmp/ref2" >/dev/null &&
    ok || bad "other settings: $(cat "$tmp/err")"

# ---- a list file naming the same images as the folder does: the same shards ----
(cd "$data" && find . -name '*.png' | sed 's|^\./||' | LC_ALL=C sort) > "$tmp/list.txt"
{ echo "# the images of the folder, as the walk names them"; cat "$tmp/list.txt"; } > "$data/list.txt"
same_shards() { for f in "$1"/shard-*.safetensors; do cmp -s "$f" "$2/${f##*/}" || return 1; done; }
"$KLVAE" encode-dataset "$MODEL" --list "$data/list.txt" --out "$tmp/listed" $ARGS -q &&
    same_shards "$ref" "$tmp/listed" && ok || bad "a list of the same files gives other shards"
rm "$data/list.txt"

# ---- round trip: decode(shard row) = reconstruct(the image it came from) ----
rt=$tmp/rt
mkdir -p "$rt/data"
"$tmp/mkimg" "$rt/data/a.png" 32 45 7 "$rt/crop.png" 0 6 32 || bad "cannot make the round-trip image"
"$KLVAE" encode-dataset "$MODEL" --data "$rt/data" --out "$rt/out" --size 32 --backend cpu -q &&
    python3 - "$rt/out/shard-0000-000000.safetensors" "$rt/latent.safetensors" <<'PY' &&
import json, struct, sys
data = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", data[:8])[0]
header = json.loads(data[8:8 + n])
t = header["mean"]
assert t["dtype"] == "F32" and t["shape"] == [1, 4, 4, 4], t
begin, end = t["data_offsets"]
raw = data[8 + n + begin:8 + n + end]
out = json.dumps({"latent": {"dtype": "F32", "shape": [1, 4, 4, 4],
                             "data_offsets": [0, len(raw)]}}).encode()
out += b" " * (-len(out) % 8)
open(sys.argv[2], "wb").write(struct.pack("<Q", len(out)) + out + raw)
PY
    "$KLVAE" decode "$MODEL" "$rt/latent.safetensors" "$rt/decoded.png" --backend cpu -q &&
    "$KLVAE" reconstruct "$MODEL" "$rt/crop.png" "$rt/reconstructed.png" --backend cpu -q &&
    cmp -s "$rt/decoded.png" "$rt/reconstructed.png" && ok ||
    bad "the shard's latent does not decode to the reconstruction of its image"

# ---- kills ----
same_as_ref() { # same_as_ref DIR WHAT
    if diff -r "$ref" "$1" >"$tmp/diff" 2>&1 && [ -z "$(leftovers "$1")" ]; then ok
    else bad "$2: the resumed folder differs from an uninterrupted run: $(head -5 "$tmp/diff") $(leftovers "$1")"; fi
}
resume() { "$KLVAE" encode-dataset "$MODEL" --data "$data" --out "$1" $ARGS -q 2>"$tmp/err" ||
    bad "resume of $1: $(cat "$tmp/err")"; }
kills=0
if command -v strace >/dev/null 2>&1 && strace -qq -o /dev/null true 2>/dev/null; then
    # the main thread writes every file; the loader threads only read
    strace -qq -y -s 0 -o "$tmp/trace" -e trace=write,fsync,rename \
        "$KLVAE" encode-dataset "$MODEL" --data "$data" --out "$tmp/traced" $ARGS -q ||
        bad "run under strace"
    awk -v dir="$tmp/traced" '
        /^[a-z0-9_]+\(/ { name = $0; sub(/\(.*/, "", name); n[name]++ }
        index($0, dir) == 0 { next }
        name != "write" { print name, n[name]; next }
        { f = $0; sub(/^[^<]*</, "", f); sub(/>.*/, "", f); gsub(/klvae-[A-Za-z0-9]+/, "", f)
          if (!(f in c)) order[++files] = f; k[f, ++c[f]] = n[name] }
        END { for (i = 1; i <= files; i++) { f = order[i]
                  print "write", k[f, 1]; if (c[f] > 2) print "write", k[f, int((c[f] + 1) / 2)]
                  if (c[f] > 1) print "write", k[f, c[f]] } }' "$tmp/trace" > "$tmp/points"
    [ "$(grep -c rename "$tmp/points")" -ge 9 ] && ok || bad "the trace shows too few renames: $(cat "$tmp/points")"
    while read -r call k; do
        out=$tmp/kill-$call-$k
        strace -qq -o /dev/null -e trace=$call -e inject=$call:signal=SIGKILL:when=$k \
            "$KLVAE" encode-dataset "$MODEL" --data "$data" --out "$out" $ARGS -q 2>/dev/null
        resume "$out"
        same_as_ref "$out" "killed at $call $k"
        rm -rf "$out"
        kills=$((kills + 1))
    done < "$tmp/points"
    # a full disk at the second shard's data, then the same command again
    k=$(awk '$1 == "write" { n++ } n == 4 { print $2; exit }' "$tmp/points")
    out=$tmp/full
    strace -qq -o /dev/null -e trace=write -e inject=write:error=ENOSPC:when=$k \
        "$KLVAE" encode-dataset "$MODEL" --data "$data" --out "$out" $ARGS -q 2>"$tmp/err"
    rc=$?
    [ $rc -eq 1 ] && grep -q "No space left on device" "$tmp/err" && grep -q "cannot write $out/" "$tmp/err" &&
        ok || bad "disk full: exit $rc, $(cat "$tmp/err")"
    [ -z "$(leftovers "$out")" ] && ok || bad "disk full left $(leftovers "$out")"
    resume "$out"
    same_as_ref "$out" "after a full disk"
else
    echo "encode-dataset: strace is missing or cannot trace here: kills at random times instead"
    for delay in 0.05 0.1 0.2 0.3 0.5; do
        out=$tmp/kill-$delay
        "$KLVAE" encode-dataset "$MODEL" --data "$data" --out "$out" $ARGS -q 2>/dev/null &
        pid=$!
        sleep $delay
        kill -9 $pid 2>/dev/null
        wait $pid 2>/dev/null
        resume "$out"
        same_as_ref "$out" "killed after $delay s"
        kills=$((kills + 1))
    done
fi
echo "encode-dataset: $kills kill points, each resumed to the uninterrupted run's bytes"

# ---- no permission to write: as an unprivileged user (root writes anywhere) ----
noperm=$tmp/noperm
mkdir -p "$noperm/out"
as_user=""
if [ "$(id -u)" -eq 0 ]; then
    command -v setpriv >/dev/null 2>&1 && as_user="setpriv --reuid=65534 --regid=65534 --clear-groups"
fi
if [ "$(id -u)" -ne 0 ] || [ -n "$as_user" ]; then
    cp -r "$MODEL" "$noperm/model" # readable by that user wherever the checkout is
    chmod -R a+rX "$data" "$noperm/model"
    chmod 555 "$noperm/out"
    $as_user "$KLVAE" encode-dataset "$noperm/model" --data "$data" --out "$noperm/out" $ARGS -q \
        2>"$tmp/err"
    rc=$?
    [ $rc -eq 1 ] && grep -q "cannot create folder $noperm/out/parts: Permission denied" "$tmp/err" &&
        ok || bad "no permission: exit $rc, $(cat "$tmp/err")"
    [ -z "$(ls "$noperm/out")" ] && ok || bad "a refused run wrote $(ls "$noperm/out")"
    chmod 755 "$noperm/out"
else
    echo "encode-dataset: the permission test is SKIPPED (root without setpriv)"
fi

# ---- parts, and mpirun ----
P="--size 16 --shard-size 3 --backend cpu --threads 1"
"$KLVAE" encode-dataset "$MODEL" --data "$data" --out "$tmp/parts" $P --part 0/2 2>"$tmp/err" &&
    grep -q "other parts are not finished" "$tmp/err" && [ ! -e "$tmp/parts/index.jsonl" ] &&
    ok || bad "part 0/2 alone: $(cat "$tmp/err")"
"$KLVAE" encode-dataset "$MODEL" --data "$data" --out "$tmp/parts" $P --part 1/2 >/dev/null 2>"$tmp/err" &&
    grep -q "dataset complete" "$tmp/err" && ok || bad "part 1/2 did not complete the dataset"
[ "$(sed 's/.*"path":"\([^"]*\)".*/\1/' "$tmp/parts/index.jsonl" | sort | uniq -d)" = "" ] &&
    [ "$(wc -l < "$tmp/parts/index.jsonl")" -eq 8 ] && ok || bad "parts: the index is not every image once"
if command -v mpirun >/dev/null 2>&1 && mpirun --version 2>/dev/null | grep -qi "open mpi"; then
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 \
        mpirun -np 2 "$KLVAE" encode-dataset "$MODEL" --data "$data" --out "$tmp/mpi" $P -q \
        >"$tmp/mpi.log" 2>&1 && diff -r "$tmp/parts" "$tmp/mpi" >/dev/null && ok ||
        bad "mpirun -np 2 differs from --part 0/2 + 1/2: $(tail -5 "$tmp/mpi.log")"
else
    echo "encode-dataset: mpirun -np 2 is SKIPPED (no Open MPI mpirun)"
fi

echo "encode-dataset: $passed passed, $failed failed"
[ $failed -eq 0 ]
