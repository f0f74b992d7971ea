#!/bin/sh
# fault_test.sh — crashes and failures in the middle of a save. SIGKILL at
# every system call that touches the output of
#   1. klvae convert (klvae_model_save) replacing a model folder, with the
#      folder swap and again with it refused (EINVAL: the two-rename way);
#   2. klvae train --resume (klvae_trainer_save's checkpoint, the model/
#      export, loss.png, the logs);
# and an error (EIO) at each of those calls of klvae convert. After each: the
# output is the previous state or the new one, byte for byte, and loads
# (bin/klvae info for models; klvae train --resume for checkpoints); after an
# error, or after the next successful write, no temporary file or folder is
# left. With strace (make deps installs it) the points are exact:
# `strace -e inject=CALL:signal=SIGKILL:when=K`, K over every such call
# (for writes: the first, middle and last of each file). Without strace, or
# where ptrace is not allowed, the kills come at random times instead.
# Run after make, from anywhere; FAULT_VERBOSE=1 prints every point.
set -u
cd "$(dirname "$0")/.."
KLVAE=$PWD/bin/klvae
tmp=$(mktemp -d "${TMPDIR:-/tmp}/klvae-fault-XXXXXX")
tmp=$(cd "$tmp" && pwd -P) # the traces show resolved paths
trap 'rm -rf "$tmp"' EXIT
passed=0
failed=0
points_run=0
ok() { passed=$((passed + 1)); }
bad() { failed=$((failed + 1)); echo "FAIL: $*"; }
note() { [ "${FAULT_VERBOSE:-0}" = 1 ] && echo "$*"; return 0; }

# the calls that change what is on disk (close, reads and stats change nothing)
CALLS=mkdir,openat,fchmod,chmod,flock,write,fsync,rename,renameat2,unlink,unlinkat,rmdir
# strace can kill here?
exact=0
if command -v strace >/dev/null 2>&1 && strace -qq -o /dev/null true 2>/dev/null; then
    exact=1
else
    echo "fault: strace is missing or cannot trace here: kills at random times instead"
fi

# points TRACE DIR [REGEX]: "CALL K" for each call in TRACE (strace -y) that
# names a path under DIR (and matches REGEX), K counting that call from the
# start; of the writes, the first, middle and last to each file (temporary
# names taken as one: a kill between two writes leaves the same state).
points() {
    awk -v dir="$2" -v keep="${3:-.}" '
        /^[a-z0-9_]+\(/ { name = $0; sub(/\(.*/, "", name); n[name]++ }
        index($0, dir) == 0 || !(name in n) || $0 !~ keep { next }
        name != "write" { print name, n[name]; next }
        {
            f = $0; sub(/^[^<]*</, "", f); sub(/>.*/, "", f); gsub(/klvae-[A-Za-z0-9]+/, "", f)
            if (!(f in count)) order[++files] = f
            k[f, ++count[f]] = n[name]
        }
        END {
            for (i = 1; i <= files; i++) {
                f = order[i]; c = count[f]
                print "write", k[f, 1]
                if (c > 2) print "write", k[f, int((c + 1) / 2)]
                if (c > 1) print "write", k[f, c]
            }
        }' "$1"
}

# fingerprint DIR: the hashes of a model folder's two files, or "missing"
fingerprint() {
    if [ -f "$1/config.json" ] && [ -f "$1/diffusion_pytorch_model.safetensors" ]; then
        cat "$1/config.json" "$1/diffusion_pytorch_model.safetensors" | cksum
    else
        echo missing
    fi
}

# leftovers DIR: the temporary files and folders of libklvae under DIR
leftovers() { find "$1" -name '*.tmp.klvae-*' -o -name '*.old.klvae-*' | sed "s|$tmp/||"; }

# ---- 1. klvae convert replacing a model folder ----

A=tests/fixtures/noquant/diffusers
B=tests/fixtures/gelu/diffusers
out=$tmp/m
dst=$out/model
mkdir -p "$out" "$tmp/ref"
"$KLVAE" convert $A "$tmp/ref/a" -q && "$KLVAE" convert $B "$tmp/ref/b" -q || bad "convert"
fa=$(fingerprint "$tmp/ref/a")
fb=$(fingerprint "$tmp/ref/b")
[ "$fa" != "$fb" ] && [ "$fa" != missing ] && ok || bad "the two reference models"
# Each state after a fault is compared byte for byte with these two, which load:
"$KLVAE" info "$tmp/ref/a" >/dev/null 2>&1 && "$KLVAE" info "$tmp/ref/b" >/dev/null 2>&1 && ok ||
    bad "the reference models do not load"

# reset_a: the target holds model A, saved cleanly: the next successful
# write after a fault, so nothing of libklvae's may be left after it
reset_a() {
    if ! "$KLVAE" convert $A "$dst" -q 2>"$tmp/err"; then bad "$1: the next save failed: $(cat "$tmp/err")"
    elif [ "$(fingerprint "$dst")" != "$fa" ]; then bad "$1: the next save did not give model A"
    elif [ -n "$(leftovers "$out")" ]; then bad "$1: left after the next save: $(leftovers "$out")"
    else ok; fi
}

# check_model WHAT: after a kill, the target is model A (the previous one) or
# B (the new one), byte for byte, so it loads; in fallback mode the folder
# may be missing with model A moved aside (the next save puts it back)
check_model() {
    f=$(fingerprint "$dst")
    if [ "$f" = missing ] && [ "$mode" = fallback ] && [ ! -e "$dst" ]; then
        aside=$(ls -d "$dst".old.klvae-* 2>/dev/null | head -n 1)
        if [ -n "$aside" ] && [ "$(fingerprint "$aside")" = "$fa" ]; then ok
        else bad "$1: no model, and none moved aside ($(ls "$out"))"; fi
    elif [ "$f" != "$fa" ] && [ "$f" != "$fb" ]; then
        bad "$1: the folder is neither the old nor the new model: $(ls -l "$dst" 2>&1)"
    elif [ "$(ls "$dst" | wc -l)" -ne 2 ]; then
        bad "$1: the model folder holds more: $(ls "$dst")"
    else ok; fi
}

# kill_convert MODE: MODE exchange (the folder swap) or fallback (renameat2
# refused with EINVAL, as on NFS)
kill_convert() {
    mode=$1
    extra=""
    keep=.
    # the calls only the two-rename way makes differently
    [ "$mode" = fallback ] && extra="-e inject=renameat2:error=EINVAL" &&
        keep='^(mkdir|rename|renameat2|rmdir|unlink|unlinkat|chmod)\('

    reset_a "setup"
    # shellcheck disable=SC2086
    strace -qq -y -s 0 -o "$tmp/trace" -e trace=$CALLS $extra "$KLVAE" convert $B "$dst" -q
    [ "$(fingerprint "$dst")" = "$fb" ] && ok || bad "convert ($mode) under strace"
    points "$tmp/trace" "$dst" "$keep" >"$tmp/points"
    n=$(wc -l <"$tmp/points")
    [ "$n" -ge 8 ] && ok || bad "only $n kill points in $tmp/trace"
    while read -r call k; do
        reset_a "convert ($mode) killed at $call #$k"
        note "convert ($mode): SIGKILL at $call #$k"
        # shellcheck disable=SC2086
        strace -qq -o /dev/null -e trace=$call $extra -e inject=$call:signal=SIGKILL:when=$k \
            "$KLVAE" convert $B "$dst" -q 2>/dev/null
        check_model "convert ($mode) killed at $call #$k"
        points_run=$((points_run + 1))
    done <"$tmp/points"
    reset_a "convert ($mode), last point"
    echo "fault: klvae convert ($mode): SIGKILL at $n points"
}

# An error at each call that can fail a save: the old model, whole, and
# nothing left behind; the message names what failed.
error_convert() {
    reset_a "setup"
    strace -qq -y -s 0 -o "$tmp/trace" -e trace=$CALLS "$KLVAE" convert $B "$dst" -q
    points "$tmp/trace" "$dst" | grep -v -E '^(flock|fchmod|unlink|unlinkat|rmdir) ' >"$tmp/points"
    n=$(wc -l <"$tmp/points")
    while read -r call k; do
        reset_a "error at $call #$k"
        strace -qq -o /dev/null -e trace=$call -e inject=$call:error=EIO:when=$k \
            "$KLVAE" convert $B "$dst" -q 2>"$tmp/err"
        rc=$?
        f=$(fingerprint "$dst")
        if [ $rc -eq 0 ] && [ "$f" = "$fb" ]; then ok # a call whose failure is harmless
        elif [ $rc -ne 1 ]; then bad "EIO at $call #$k: exit $rc: $(cat "$tmp/err")"
        elif [ "$f" != "$fa" ]; then bad "EIO at $call #$k: the folder changed on error"
        elif [ -n "$(leftovers "$out")" ]; then bad "EIO at $call #$k: left behind: $(leftovers "$out")"
        elif ! grep -q "$out.*Input/output error" "$tmp/err"; then
            bad "EIO at $call #$k: the message lacks the path or the OS error: $(cat "$tmp/err")"
        else ok; fi
        points_run=$((points_run + 1))
    done <"$tmp/points"
    reset_a "errors, last point"
    echo "fault: klvae convert: EIO at $n points"
}

# ---- 2. klvae train --resume: checkpoint, model/ export, plot, logs ----

run=$tmp/run
pristine=$tmp/start
"$KLVAE" train --config tiny --size 16 --batch 2 --steps 1 --checkpoint-every 1000 \
    --grid-every 1000 --eval-images 0 --threads 1 --disc-channels 4 --disc-layers 1 \
    --perceptual-weight 0 -q --out "$pristine" >/dev/null 2>&1 && ok || bad "the first training run"
ckpt() { cksum <"$1/checkpoint.safetensors" 2>/dev/null || echo missing; }
c1=$(ckpt "$pristine")
m1=$(fingerprint "$pristine/model")

# check_run WHAT: the checkpoint is step 1's or step 2's, and model/ too,
# byte for byte (both states load: the first run made one, the traced run
# the other, and next_run resumes from whichever is there); log.csv keeps
# its header and step 0's row
check_run() {
    c=$(ckpt "$run")
    m=$(fingerprint "$run/model")
    if [ "$c" != "$c1" ] && [ "$c" != "$c2" ]; then bad "$1: the checkpoint is neither step 1's nor step 2's"
    elif [ "$m" != "$m1" ] && [ "$m" != "$m2" ]; then bad "$1: model/ is neither step 1's nor step 2's"
    elif [ "$(head -n 1 "$run/log.csv")" != "$(head -n 1 "$pristine/log.csv")" ] ||
         ! grep -q '^0,' "$run/log.csv"; then bad "$1: log.csv lost rows: $(cut -c1-20 "$run/log.csv")"
    else ok; fi
}

# then the next run (to step 3) resumes from that checkpoint, and after its
# successful writes nothing of libklvae's may be left
next_run() {
    if ! "$KLVAE" train --resume "$run" --steps 3 -q >/dev/null 2>"$tmp/err"; then
        bad "$1: the next run failed (the checkpoint does not load?): $(cat "$tmp/err")"
    elif [ -n "$(leftovers "$tmp")" ]; then bad "$1: left after the next run: $(leftovers "$tmp")"
    else ok; fi
}

fresh_run() { rm -rf "$run" && cp -a "$pristine" "$run"; }

kill_train() {
    fresh_run
    strace -qq -y -s 0 -o "$tmp/trace" -e trace=$CALLS "$KLVAE" train --resume "$run" --steps 2 -q \
        >/dev/null 2>&1 || bad "train under strace"
    c2=$(ckpt "$run")
    m2=$(fingerprint "$run/model")
    [ "$c2" != "$c1" ] && [ "$m2" != "$m1" ] && ok || bad "training did not change the checkpoint and model"
    "$KLVAE" info "$pristine/model" >/dev/null 2>&1 && "$KLVAE" info "$run/model" >/dev/null 2>&1 && ok ||
        bad "the models of steps 1 and 2 do not load"
    # every call on the checkpoint and the logs; of the model export (whose
    # every call the convert part kills) and loss.png, the renames and folders
    points "$tmp/trace" "$run" \
        'checkpoint|log\.csv|eval\.csv|^(mkdir|rename|renameat2|rmdir|unlinkat|chmod)\(' >"$tmp/points"
    n=$(wc -l <"$tmp/points")
    [ "$n" -ge 20 ] && ok || bad "only $n kill points in the training run"
    while read -r call k; do
        fresh_run
        note "train: SIGKILL at $call #$k"
        strace -qq -o /dev/null -e trace=$call -e inject=$call:signal=SIGKILL:when=$k \
            "$KLVAE" train --resume "$run" --steps 2 -q >/dev/null 2>&1
        check_run "train killed at $call #$k"
        next_run "train killed at $call #$k"
        points_run=$((points_run + 1))
    done <"$tmp/points"
    echo "fault: klvae train --resume: SIGKILL at $n points"
}

# ---- without strace: kills at random times ----

random_ms() { echo $(($(od -An -N2 -tu2 /dev/urandom) % $1)); }

kill_randomly() {
    mode=exchange
    c2=missing
    m2=missing
    fresh_run
    "$KLVAE" train --resume "$run" --steps 2 -q >/dev/null 2>&1
    c2=$(ckpt "$run")
    m2=$(fingerprint "$run/model")
    i=0
    while [ $i -lt 40 ]; do
        i=$((i + 1))
        reset_a "random kill $i"
        "$KLVAE" convert $B "$dst" -q 2>/dev/null &
        pid=$!
        sleep "0.0$(printf '%02d' "$(random_ms 60)")"
        kill -9 $pid 2>/dev/null
        wait $pid 2>/dev/null
        check_model "convert killed at random ($i)"
        fresh_run
        "$KLVAE" train --resume "$run" --steps 2 -q >/dev/null 2>&1 &
        pid=$!
        sleep "0.$(printf '%03d' "$(random_ms 200)")"
        kill -9 $pid 2>/dev/null
        wait $pid 2>/dev/null
        check_run "train killed at random ($i)"
        next_run "train killed at random ($i)"
        points_run=$((points_run + 2))
    done
    echo "fault: $points_run kills at random times"
}

if [ $exact = 1 ]; then
    kill_convert exchange
    kill_convert fallback
    error_convert
    kill_train
else
    kill_randomly
fi
echo "fault: $points_run points; $passed passed, $failed failed"
[ "$failed" -eq 0 ]
