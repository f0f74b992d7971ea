#!/bin/sh
# ops_layout_test.sh — every op of the backend can be found by its name
# (project issue 8). For every op NAME of family FAMILY in the list
# KV_BACKEND_OPS of src/backend/backend.h:
#   - the specification, the comment at the top of backend.h, has NAME as a
#     term (at the start of a line, where its terms stand) under the heading
#     "Family FAMILY";
#   - kv_cpu_NAME is defined (a body, not only the declaration that
#     cpu_ops.h generates) in src/backend/cpu/FAMILY.c or FAMILY_*.c, and
#     nowhere else;
#   - where anything under cuda/ defines kv_cuda_NAME, that is
#     cuda/FAMILY.cu or cuda/FAMILY_*.cu (cuda_ops.h declares every op, the
#     plugin defines those it has);
#   - tests/ops/test_FAMILY.c exists and calls the op (kv_cpu_NAME or
#     ops->NAME).
# And every file is named for what it holds: src/backend/cpu/*.c is a family
# file, a FAMILY_*.c file, cpu_backend.c or threadpool.c; cuda/*.cu the same
# with cuda_backend.cu, memory.cu (the plugin's blocks, upload and
# download, which the CPU has in cpu_backend.c) and comm.cu (data-parallel
# gradient sums with NCCL, no op); tests/ops/*.c is
# test_FAMILY.c or op_test_util.c;
# every "Family" heading of the specification is a family of the list.
# Prints one line per violation and "ops layout: N passed, N failed".
cd "$(dirname "$0")/.." || exit 1
BACKEND_H=src/backend/backend.h
pass=0
fail=0
ok() { pass=$((pass + 1)); }
bad() { fail=$((fail + 1)); echo "FAIL: $*"; }
tmp=$(mktemp -d "${TMPDIR:-/tmp}/klvae-ops-layout-XXXXXX") || exit 1
trap 'rm -rf "$tmp"' EXIT

# "family name" for every X(family, name, ...) of the macro KV_BACKEND_OPS
awk '/^#define KV_BACKEND_OPS\(X\)/ { on = 1 } on { print } on && !/\\$/ { exit }' "$BACKEND_H" |
    sed -n 's/^[[:space:]]*X(\([a-z0-9_]*\),[[:space:]]*\([a-z0-9_]*\),.*/\1 \2/p' >"$tmp/ops"
if [ -s "$tmp/ops" ]; then ok; else bad "no X(family, name, ...) entries found in KV_BACKEND_OPS of $BACKEND_H"; fi
cut -d' ' -f1 "$tmp/ops" | sort -u >"$tmp/families"

# The specification's lines under the heading "Family $1" (up to the next
# heading or the end of the comment).
spec_section() {
    awk -v family="$1" '
        /\*\// { exit }
        /^ \* Family / { on = ($3 == family); next }
        on' "$BACKEND_H"
}

# "file name" for every klvae_status_t function defined by the files named
# on standard input, one per line: a definition is the name, its parameter
# list and a body "{" (a declaration ends in ";"). Every op returns
# klvae_status_t.
definitions() {
    while read -r f; do
        [ -f "$f" ] || continue
        tr '\n' ' ' <"$f" |
            grep -Eo 'klvae_status_t[[:space:]]+[A-Za-z0-9_]+[[:space:]]*\([^;{}]*\)[[:space:]]*\{' |
            sed -E "s|^klvae_status_t[[:space:]]+([A-Za-z0-9_]+).*|$f \\1|"
    done
}
printf '%s\n' src/backend/cpu/*.c | definitions >"$tmp/cpu_defs"
if [ -d cuda ]; then
    find cuda -type f \( -name '*.cu' -o -name '*.cuh' -o -name '*.h' -o -name '*.c' -o -name '*.cpp' \) |
        sort | definitions >"$tmp/cuda_defs"
else
    : >"$tmp/cuda_defs"
fi

# The files (of "file name" lines) that define $2, one per line.
defined_in() { awk -v name="$2" '$2 == name { print $1 }' "$1"; }

# Whether file $1 (a path) is $2/FAMILY.$3 or $2/FAMILY_*.$3 for family $4.
in_family_file() {
    case "$1" in
    "$2/$4.$3" | "$2/$4"_*".$3") return 0 ;;
    esac
    return 1
}

while read -r family name; do
    # the specification
    if spec_section "$family" | grep -Eq "^ \*   $name([[:space:]]|\$)"; then ok
    else bad "$name: the specification in $BACKEND_H does not define it under \"Family $family\""; fi

    # the CPU code
    files=$(defined_in "$tmp/cpu_defs" "kv_cpu_$name")
    if [ -z "$files" ]; then
        bad "$name: kv_cpu_$name is not defined in src/backend/cpu/ (it belongs in src/backend/cpu/$family.c or ${family}_*.c)"
    else
        wrong=""
        for f in $files; do
            in_family_file "$f" src/backend/cpu c "$family" || wrong="$wrong $f"
        done
        if [ -z "$wrong" ]; then ok
        else bad "$name: kv_cpu_$name is defined in$wrong, not in src/backend/cpu/$family.c or ${family}_*.c"; fi
    fi

    # the CUDA code, where the plugin has the op
    files=$(defined_in "$tmp/cuda_defs" "kv_cuda_$name")
    if [ -n "$files" ]; then
        wrong=""
        for f in $files; do
            in_family_file "$f" cuda cu "$family" || wrong="$wrong $f"
        done
        if [ -z "$wrong" ]; then ok
        else bad "$name: kv_cuda_$name is defined in$wrong, not in cuda/$family.cu or cuda/${family}_*.cu"; fi
    fi

    # the test
    test_file="tests/ops/test_$family.c"
    if [ ! -f "$test_file" ]; then
        bad "$name: its family's test $test_file is missing"
    elif grep -Eq "(kv_cpu_|ops->)$name([^A-Za-z0-9_]|\$)" "$test_file"; then ok
    else bad "$name: $test_file does not call it (kv_cpu_$name or ops->$name)"; fi
done <"$tmp/ops"

# Whether $1 is a family, or FAMILY_something for a family.
family_name() {
    while read -r family; do
        case "$1" in
        "$family" | "$family"_*) return 0 ;;
        esac
    done <"$tmp/families"
    return 1
}

for f in src/backend/cpu/*.c; do
    base=$(basename "$f" .c)
    case "$base" in cpu_backend | threadpool) ok; continue ;; esac
    if family_name "$base"; then ok
    else bad "$f is named for no op family of $BACKEND_H (nor is it cpu_backend.c or threadpool.c)"; fi
done
for f in cuda/*.cu; do
    [ -f "$f" ] || continue
    base=$(basename "$f" .cu)
    case "$base" in cuda_backend | memory | comm) ok; continue ;; esac
    if family_name "$base"; then ok
    else bad "$f is named for no op family of $BACKEND_H (nor is it cuda_backend.cu, memory.cu or comm.cu)"; fi
done
for f in tests/ops/*.c; do
    [ -f "$f" ] || continue
    base=$(basename "$f" .c)
    [ "$base" = op_test_util ] && { ok; continue; }
    if grep -qx "${base#test_}" "$tmp/families" && [ "$base" != "${base#test_}" ]; then ok
    else bad "$f is not test_FAMILY.c for an op family of $BACKEND_H (nor op_test_util.c)"; fi
done

# every heading of the specification names a family of the list
awk '/\*\// { exit } /^ \* Family / { print $3 }' "$BACKEND_H" >"$tmp/headings"
if [ -s "$tmp/headings" ]; then ok; else bad "$BACKEND_H has no \"Family FAMILY\" headings"; fi
while read -r heading; do
    if grep -qx "$heading" "$tmp/families"; then ok
    else bad "the heading \"Family $heading\" in $BACKEND_H names no family of KV_BACKEND_OPS"; fi
done <"$tmp/headings"

echo "ops layout: $pass passed, $fail failed"
[ $fail -eq 0 ]
