#!/usr/bin/env bash
# Builds a C wasmgate plugin into a WebAssembly component.
#
#   sdk/c/build.sh PLUGIN_DIR OUT.wasm [WASMGATE_BIN]
#
# PLUGIN_DIR holds the plugin's .c files (every PLUGIN_DIR/*.c is compiled)
# and any headers they include; they #include "wasmgate.h" and define the
# wg_on_* callbacks they need. The component targets the `resumable-plugin`
# world of wit/plugin.wit. On success the absolute path of OUT.wasm is the
# only thing printed on stdout. Works from any current directory.
#
# WASMGATE_BIN (default: `wasmgate` on PATH, else target/release/wasmgate of
# this repository) writes the bindings and componentizes. Needs clang with
# the wasm32-wasi target, wasm-ld and the WASI sysroot (Debian:
# apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32).
# Environment: CC (default clang), CFLAGS and LDFLAGS (added to the
# defaults), WASI_SYSROOT (a sysroot other than the compiler's default).
set -euo pipefail

die() {
    echo "sdk/c/build.sh: error: $*" >&2
    exit 1
}

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi

SDK_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
REPO=$(cd -- "$SDK_DIR/../.." && pwd -P)

plugin_arg=$1
out_arg=$2

[ -d "$plugin_arg" ] || die "plugin folder '$plugin_arg' does not exist"
PLUGIN_DIR=$(cd -- "$plugin_arg" && pwd -P)
shopt -s nullglob
SOURCES=("$PLUGIN_DIR"/*.c)
shopt -u nullglob
[ ${#SOURCES[@]} -gt 0 ] || die "'$plugin_arg' has no .c files"
[ -f "$SDK_DIR/wasmgate.c" ] && [ -f "$SDK_DIR/wasmgate.h" ] ||
    die "the SDK (wasmgate.c, wasmgate.h) is missing from $SDK_DIR"
for f in "${SOURCES[@]}"; do
    [ "$(basename -- "$f")" = wasmgate.c ] &&
        die "$f would clash with the SDK's wasmgate.c: rename it"
done
for h in plugin.h wasmgate.h; do
    [ -e "$PLUGIN_DIR/$h" ] && die "$PLUGIN_DIR/$h would shadow the SDK's or the bindings' $h: rename it"
done
case "$out_arg" in
    */) die "OUT.wasm '$out_arg' names a folder, not a file" ;;
esac
[ -d "$out_arg" ] && die "OUT.wasm '$out_arg' is a folder, not a file"
out_parent=$(dirname -- "$out_arg")
mkdir -p -- "$out_parent" || die "cannot create the output folder '$out_parent'"
OUT="$(cd -- "$out_parent" && pwd -P)/$(basename -- "$out_arg")"

# --- the tools -----------------------------------------------------------------

if [ $# -eq 3 ]; then
    WASMGATE=$3
    if [[ "$WASMGATE" != */* ]]; then
        WASMGATE=$(command -v -- "$WASMGATE") || die "WASMGATE_BIN '$3' is not a command on PATH"
    fi
    [ -f "$WASMGATE" ] && [ -x "$WASMGATE" ] || die "WASMGATE_BIN '$3' is not an executable file"
elif WASMGATE=$(command -v wasmgate 2>/dev/null); then
    :
elif [ -x "$REPO/target/release/wasmgate" ]; then
    WASMGATE="$REPO/target/release/wasmgate"
else
    die "wasmgate not found: not on PATH and no $REPO/target/release/wasmgate; build it (cargo build --release) or pass its path as the third argument"
fi

CC=${CC:-clang}
command -v -- "$CC" >/dev/null 2>&1 ||
    die "'$CC' not found: install clang with the wasm32 target (Debian/Ubuntu: apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32), or set CC"
clang_major=$("$CC" -dumpversion 2>/dev/null | cut -d. -f1)
clang_major=${clang_major:-14}
PACKAGES="clang lld wasi-libc libclang-rt-${clang_major}-dev-wasm32"

TARGET=(--target=wasm32-wasi)
if [ -n "${WASI_SYSROOT:-}" ]; then
    [ -d "$WASI_SYSROOT" ] || die "WASI_SYSROOT '$WASI_SYSROOT' is not a folder"
    TARGET+=("--sysroot=$WASI_SYSROOT")
fi
# shellcheck disable=SC2206 # CFLAGS and LDFLAGS are word lists on purpose
EXTRA_CFLAGS=(${CFLAGS:-})
# shellcheck disable=SC2206
EXTRA_LDFLAGS=(${LDFLAGS:-})

WORK=$(mktemp -d "${TMPDIR:-/tmp}/wasmgate-c-build.XXXXXX")
trap 'rm -rf -- "$WORK"' EXIT

# Probe the toolchain with a tiny reactor, so that a missing piece is named.
cat >"$WORK/probe.c" <<'EOF'
#include <stdlib.h>
#include <string.h>
__attribute__((export_name("probe"))) int probe(int n) {
    char *p = malloc((size_t)n + 1);
    memset(p, 0, (size_t)n + 1);
    int r = p[0];
    free(p);
    return r + (int)((unsigned long long)n * 3 / 7);
}
EOF
if ! "$CC" "${TARGET[@]}" -O2 -c "$WORK/probe.c" -o "$WORK/probe.o" 2>"$WORK/probe.err"; then
    cat "$WORK/probe.err" >&2
    if grep -q "file not found" "$WORK/probe.err"; then
        die "'$CC' has no WASI sysroot (stdlib.h for wasm32-wasi is missing): apt-get install wasi-libc (all of: $PACKAGES), or set WASI_SYSROOT"
    fi
    die "'$CC' cannot compile for wasm32-wasi (see above): apt-get install $PACKAGES"
fi
if ! "$CC" "${TARGET[@]}" -mexec-model=reactor "$WORK/probe.o" -o "$WORK/probe.wasm" 2>"$WORK/probe.err"; then
    cat "$WORK/probe.err" >&2
    if grep -q "wasm-ld" "$WORK/probe.err" && ! command -v wasm-ld >/dev/null 2>&1 &&
        ! command -v "wasm-ld-$clang_major" >/dev/null 2>&1; then
        die "the WebAssembly linker wasm-ld is missing: apt-get install lld (all of: $PACKAGES)"
    fi
    if grep -q "libclang_rt.builtins-wasm32" "$WORK/probe.err"; then
        die "the compiler runtime for wasm32 is missing: apt-get install libclang-rt-${clang_major}-dev-wasm32 (all of: $PACKAGES)"
    fi
    if grep -q -e "crt1" -e "-lc" "$WORK/probe.err"; then
        die "the WASI C library is missing: apt-get install wasi-libc (all of: $PACKAGES), or set WASI_SYSROOT"
    fi
    die "'$CC' cannot link for wasm32-wasi (see above): apt-get install $PACKAGES"
fi

# --- build -----------------------------------------------------------------------

started=$(date +%s%N)
mkdir -p -- "$WORK/bindings"
"$WASMGATE" bindings c "$WORK/bindings" >/dev/null ||
    die "'$WASMGATE bindings c' failed (see above)"
for f in plugin.h plugin.c plugin_component_type.o; do
    [ -f "$WORK/bindings/$f" ] || die "'$WASMGATE bindings c' wrote no $f"
done

# The bindings are generated code: their warnings are not the author's to fix.
"$CC" "${TARGET[@]}" -O2 -Wall -Wextra "${EXTRA_CFLAGS[@]}" \
    -c "$WORK/bindings/plugin.c" -o "$WORK/bindings.o" ||
    die "compiling the generated bindings failed (see above)"

# The plugin and the SDK: every warning is an error. -mexec-model=reactor: no
# main(); --strip-debug drops the sysroot's DWARF (the name section stays, so
# traps still name functions).
"$CC" "${TARGET[@]}" -mexec-model=reactor -O2 -Wall -Wextra -Werror \
    -I"$WORK/bindings" -I"$SDK_DIR" -I"$PLUGIN_DIR" "${EXTRA_CFLAGS[@]}" \
    "${SOURCES[@]}" "$SDK_DIR/wasmgate.c" "$WORK/bindings.o" \
    "$WORK/bindings/plugin_component_type.o" \
    -Wl,--strip-debug "${EXTRA_LDFLAGS[@]}" -o "$WORK/core.wasm" ||
    die "compiling $PLUGIN_DIR failed (see above)"

"$WASMGATE" componentize "$WORK/core.wasm" -o "$WORK/out.wasm" >/dev/null ||
    die "'$WASMGATE componentize' failed (see above)"
[ -s "$WORK/out.wasm" ] || die "componentize wrote no component"

# Replace OUT atomically, so a gateway watching it never reads half a file.
cp -- "$WORK/out.wasm" "$OUT.tmp.$$" || die "cannot write $OUT"
mv -f -- "$OUT.tmp.$$" "$OUT"
elapsed_ms=$(( ($(date +%s%N) - started) / 1000000 ))
echo "build.sh: built $OUT ($(wc -c <"$OUT") bytes in ${elapsed_ms} ms)" >&2
echo "$OUT"
