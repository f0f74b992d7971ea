#!/bin/sh
# docs_test.sh — the documents against the code they describe:
#   - the option table of docs/options.md lists exactly the keys that
#     'klvae options' prints (same set, same order, same defaults);
#   - every klvae_* function declared in include/klvae.h is in docs/api.md,
#     and every klvae_* name in docs/*.md (this project's guides) is declared
#     there; every status code of the header is in docs/api.md and
#     docs/guide.md.
# Run after make (it needs bin/klvae), from anywhere.
set -u
cd "$(dirname "$0")/.."
KLVAE=bin/klvae
HEADER=include/klvae.h
OPTIONS_DOC=docs/options.md
API_DOC=docs/api.md
GUIDE_DOC=docs/guide.md
NAMED_DOCS="docs/guide.md docs/cli.md docs/options.md docs/api.md docs/design.md docs/training.md docs/abi.md"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/klvae-docs-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
passed=0
failed=0
ok() { passed=$((passed + 1)); }
bad() { failed=$((failed + 1)); echo "FAIL: $*"; }
indent() { sed 's/^/    /' "$1"; }
# identifiers of a file that start with $2, one per line, sorted, unique
identifiers() { tr -c 'A-Za-z0-9_' '\n' <"$1" | grep "^$2" | sort -u; }

for f in $HEADER $NAMED_DOCS; do
    [ -f "$f" ] && ok || bad "$f is missing"
done

# ---- (a) docs/options.md's table against 'klvae options' ----

if [ -x "$KLVAE" ] && "$KLVAE" options >"$tmp/options.out" 2>"$tmp/err"; then ok
else bad "'$KLVAE options' did not run (build with make first): $(cat "$tmp/err" 2>/dev/null)"; fi
: >>"$tmp/options.out"
# "--key  (default: value)" -> "key value"
sed -n 's/^--\([A-Za-z0-9_]*\)  (default: \(.*\))$/\1 \2/p' "$tmp/options.out" >"$tmp/cli.kd"
cut -d' ' -f1 "$tmp/cli.kd" >"$tmp/cli.keys"
[ -s "$tmp/cli.keys" ] && ok || bad "'klvae options' printed no option keys"

# The table sits between two marker comments; its rows are "| `key` | `default` | ...".
if grep -q '<!-- options-table-begin' "$OPTIONS_DOC" 2>/dev/null &&
   grep -q '<!-- options-table-end' "$OPTIONS_DOC"; then ok
else bad "$OPTIONS_DOC lacks the <!-- options-table-begin --> / <!-- options-table-end --> markers"; fi
awk '/<!-- options-table-begin/ { on = 1; next } /<!-- options-table-end/ { on = 0 } on' \
    "$OPTIONS_DOC" 2>/dev/null >"$tmp/table.md"
awk -F'|' '/^[ ]*\|/ {
        key = $2; def = $3
        gsub(/[ `]/, "", key); gsub(/`/, "", def); gsub(/^ +| +$/, "", def)
        if (key == "key" || key ~ /^:?-+:?$/) next
        print key " " def
    }' "$tmp/table.md" >"$tmp/doc.kd"
cut -d' ' -f1 "$tmp/doc.kd" >"$tmp/doc.keys"
[ -s "$tmp/doc.keys" ] && ok || bad "no option rows found in the table of $OPTIONS_DOC"

sort "$tmp/cli.keys" >"$tmp/cli.sorted"
sort "$tmp/doc.keys" >"$tmp/doc.sorted"
sort -u "$tmp/doc.keys" | comm -23 "$tmp/cli.sorted" - >"$tmp/undocumented"
sort -u "$tmp/cli.keys" | comm -13 - "$tmp/doc.sorted" | sort -u >"$tmp/unknown"
uniq -d "$tmp/doc.sorted" >"$tmp/duplicates"
if [ -s "$tmp/undocumented" ] || [ -s "$tmp/unknown" ]; then
    msg="the keys of $OPTIONS_DOC differ from 'klvae options':"
    if [ -s "$tmp/undocumented" ]; then
        msg="$msg
  printed by 'klvae options' but not in the table:
$(indent "$tmp/undocumented")"
    fi
    if [ -s "$tmp/unknown" ]; then
        msg="$msg
  in the table but not printed by 'klvae options':
$(indent "$tmp/unknown")"
    fi
    bad "$msg"
else
    ok
fi
if [ -s "$tmp/duplicates" ]; then bad "keys listed twice in $OPTIONS_DOC:
$(indent "$tmp/duplicates")"
else ok; fi
# Same order (checked only when the sets agree, to keep one message per fault).
if [ ! -s "$tmp/undocumented" ] && [ ! -s "$tmp/unknown" ] && [ ! -s "$tmp/duplicates" ]; then
    if cmp -s "$tmp/cli.keys" "$tmp/doc.keys"; then ok
    else bad "$OPTIONS_DOC lists the keys in another order than 'klvae options':
$(paste "$tmp/cli.keys" "$tmp/doc.keys" | awk '{ printf "    %-26s %s%s\n", $1, $2, ($1 == $2 ? "" : "   <-") }')"; fi
fi
# Same defaults.
awk 'NR == FNR { want[$1] = $2; next }
     ($1 in want) && want[$1] != $2 {
         printf "    %s: the table says \"%s\", klvae options says \"%s\"\n", $1, $2, want[$1] }' \
    "$tmp/cli.kd" "$tmp/doc.kd" >"$tmp/defaults"
if [ -s "$tmp/defaults" ]; then bad "defaults in $OPTIONS_DOC differ:
$(cat "$tmp/defaults")"
else ok; fi

# ---- (b) docs/api.md against include/klvae.h ----

# Functions: the name ending each "KLVAE_API ... name(" line.
grep '^KLVAE_API' "$HEADER" | sed 's/(.*//' |
    sed -n 's/.*[^A-Za-z0-9_]\(klvae_[A-Za-z0-9_]*\)[ ]*$/\1/p' | sort -u >"$tmp/header.funcs"
[ -s "$tmp/header.funcs" ] && ok || bad "found no KLVAE_API functions in $HEADER"
# Everything the header declares under a klvae_ name: functions, typedefs (of
# function pointers too), tags.
{
    cat "$tmp/header.funcs"
    sed -n 's/^typedef [^(]*(\*\(klvae_[A-Za-z0-9_]*\)).*/\1/p' "$HEADER"
    grep -E '^typedef (struct|enum) klvae_' "$HEADER" | tr -c 'A-Za-z0-9_' '\n' | grep '^klvae_'
    grep -E '^\} *klvae_[A-Za-z0-9_]*;' "$HEADER" | tr -c 'A-Za-z0-9_' '\n' | grep '^klvae_'
} | sort -u >"$tmp/header.decl"

identifiers "$API_DOC" klvae_ >"$tmp/api.names"
comm -23 "$tmp/header.funcs" "$tmp/api.names" >"$tmp/missing"
if [ -s "$tmp/missing" ]; then bad "functions declared in $HEADER but absent from $API_DOC:
$(indent "$tmp/missing")"
else ok; fi

for doc in $NAMED_DOCS; do
    [ -f "$doc" ] || continue
    # a bare "klvae_" is the prefix itself ("only klvae_* is exported");
    # klvae_plugin_entry is the CUDA plugin's entry point (src/backend/plugin.h), not the API's
    identifiers "$doc" klvae_ | grep -v -E '^klvae_(plugin_entry)?$' |
        comm -23 - "$tmp/header.decl" >"$tmp/undeclared"
    if [ -s "$tmp/undeclared" ]; then bad "$doc names klvae_ identifiers that $HEADER does not declare:
$(indent "$tmp/undeclared")"
    else ok; fi
done

# Status codes and the other KLVAE_ macros.
identifiers "$HEADER" KLVAE_ | grep -E '^KLVAE_(OK|ERR_[A-Z_]+)$' >"$tmp/header.status"
[ -s "$tmp/header.status" ] && ok || bad "found no status codes in $HEADER"
for doc in $API_DOC $GUIDE_DOC; do
    identifiers "$doc" KLVAE_ | comm -23 "$tmp/header.status" - >"$tmp/missing"
    if [ -s "$tmp/missing" ]; then bad "status codes of $HEADER absent from $doc:
$(indent "$tmp/missing")"
    else ok; fi
done
identifiers "$HEADER" KLVAE_ >"$tmp/header.macros"
# Environment variables the library reads (a quoted name in src/ or cuda/) are not in the
# header either; a doc that names one the code does not read still fails.
grep -rhoE '"KLVAE_[A-Z0-9_]+"' src cuda | tr -d '"' >>"$tmp/header.macros"
sort -u -o "$tmp/header.macros" "$tmp/header.macros"
for doc in $NAMED_DOCS; do
    [ -f "$doc" ] || continue
    # variables of the test and build scripts, and symbol version nodes (src/libklvae.map)
    identifiers "$doc" KLVAE_ | grep -v -E '^(KLVAE_REQUIRE_BINDINGS|KLVAE_LIBRARY|KLVAE_NO_DEPS|KLVAE_[0-9][0-9_.]*)$' |
        comm -23 - "$tmp/header.macros" >"$tmp/undeclared"
    if [ -s "$tmp/undeclared" ]; then bad "$doc names KLVAE_ identifiers that $HEADER does not define:
$(indent "$tmp/undeclared")"
    else ok; fi
done

echo "docs: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
