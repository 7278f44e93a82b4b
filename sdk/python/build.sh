#!/usr/bin/env bash
# Builds a Python wasmgate plugin into a WebAssembly component.
#
#   sdk/python/build.sh PLUGIN_DIR OUT.wasm
#
# PLUGIN_DIR holds app.py (the plugin: a wasmgate.Handler subclass passed to
# wasmgate.export) and any other pure-Python modules it imports. The
# component targets the `resumable-plugin` world of wit/plugin.wit. On
# success the absolute path of OUT.wasm is the only thing printed on stdout.
#
# The toolchain (componentize-py, pinned in requirements.txt) lives in a venv
# at TOOLCHAINS/python, created on first use and reinstalled when
# requirements.txt changes. TOOLCHAINS is $WASMGATE_TOOLCHAINS, by default
# target/toolchains next to sdk/ (point several checkouts or projects at one
# folder to install the toolchain once). Set PYTHON to choose the interpreter
# that creates it (default: python3, 3.9 or newer). Works from any current
# directory.
set -euo pipefail

die() {
    echo "sdk/python/build.sh: error: $*" >&2
    exit 1
}

if [ $# -ne 2 ]; then
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi

SDK_DIR=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)
REPO=$(cd -- "$SDK_DIR/../.." && pwd -P)
WIT_DIR="$REPO/wit"
WORLD="resumable-plugin"
TOOLCHAINS=${WASMGATE_TOOLCHAINS:-$REPO/target/toolchains}
VENV="$TOOLCHAINS/python"
REQUIREMENTS="$SDK_DIR/requirements.txt"
STAMP="$VENV/.wasmgate-requirements.txt"

plugin_arg=$1
out_arg=$2

[ -d "$plugin_arg" ] || die "plugin folder '$plugin_arg' does not exist"
[ -f "$plugin_arg/app.py" ] || die "'$plugin_arg' has no app.py (the plugin module that calls wasmgate.export)"
[ -f "$WIT_DIR/plugin.wit" ] || die "no WIT contract at $WIT_DIR/plugin.wit"
[ -f "$SDK_DIR/wasmgate/__init__.py" ] || die "the wasmgate package is missing from $SDK_DIR"
[ -f "$REQUIREMENTS" ] || die "$REQUIREMENTS is missing"
case "$out_arg" in
    */) die "OUT.wasm '$out_arg' names a folder, not a file" ;;
esac
[ -d "$out_arg" ] && die "OUT.wasm '$out_arg' is a folder, not a file"

PLUGIN_DIR=$(cd -- "$plugin_arg" && pwd -P)
out_parent=$(dirname -- "$out_arg")
mkdir -p -- "$out_parent" || die "cannot create the output folder '$out_parent'"
OUT="$(cd -- "$out_parent" && pwd -P)/$(basename -- "$out_arg")"

# --- the toolchain venv ------------------------------------------------------

setup_venv() {
    local python=${PYTHON:-python3}
    command -v "$python" >/dev/null 2>&1 ||
        die "'$python' not found: install Python 3.9+ (or set PYTHON) to create the toolchain venv"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 9))' >/dev/null 2>&1 ||
        die "'$python' is not Python 3.9 or newer, which the toolchain needs (set PYTHON)"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "build.sh: creating the toolchain venv at $VENV" >&2
        mkdir -p -- "$(dirname -- "$VENV")"
        if ! "$python" -m venv "$VENV" >&2; then
            rm -rf -- "$VENV"
            die "cannot create a venv with '$python -m venv' (on Debian/Ubuntu: apt-get install python3-venv)"
        fi
    fi
    if ! cmp -s "$REQUIREMENTS" "$STAMP" || [ ! -x "$VENV/bin/componentize-py" ]; then
        echo "build.sh: installing $(grep -v '^#' "$REQUIREMENTS" | xargs) into $VENV" >&2
        rm -f -- "$STAMP"
        "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$REQUIREMENTS" >&2 ||
            die "pip install -r $REQUIREMENTS failed (see above)"
        cp -- "$REQUIREMENTS" "$STAMP"
    fi
}

# One build at a time sets the venv up.
mkdir -p -- "$TOOLCHAINS" || die "cannot create the toolchains folder $TOOLCHAINS"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$TOOLCHAINS/.python.lock"
    flock 9
    setup_venv
    flock -u 9
else
    setup_venv
fi
COMPONENTIZE="$VENV/bin/componentize-py"
[ -x "$COMPONENTIZE" ] || die "componentize-py is missing from $VENV (delete that folder and run again)"

# --- build -------------------------------------------------------------------

# componentize-py runs the plugin's imports at build time and leaves
# __pycache__ folders next to the sources: build from a staged copy.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/wasmgate-py-build.XXXXXX")
trap 'rm -rf -- "$WORK"' EXIT
mkdir -p -- "$WORK/app" "$WORK/sdk"
tar -C "$PLUGIN_DIR" --exclude=__pycache__ --exclude='*.pyc' --exclude='*.wasm' \
    --exclude=.git --exclude=.venv --exclude=venv -cf - . | tar -C "$WORK/app" -xf - ||
    die "cannot copy $PLUGIN_DIR"
cp -R -- "$SDK_DIR/wasmgate" "$WORK/sdk/wasmgate"
rm -rf -- "$WORK/sdk/wasmgate/__pycache__"
[ -e "$WORK/app/wasmgate" ] && die "$PLUGIN_DIR/wasmgate would shadow the SDK package: rename it"

started=$(date +%s%N)
(
    cd -- "$WORK"
    # Only the staged folders and the toolchain venv are on the Python path.
    export VIRTUAL_ENV="$VENV" PYTHONDONTWRITEBYTECODE=1
    # The Python traceback says what failed; a Rust backtrace of componentize-py does not.
    export RUST_LIB_BACKTRACE=0
    unset PYTHONPATH PYTHONHOME
    "$COMPONENTIZE" -d "$WIT_DIR" -w "$WORLD" componentize \
        -p "$WORK/app" -p "$WORK/sdk" wasmgate._component -o "$WORK/out.wasm" >&2
) || die "componentize-py failed for $PLUGIN_DIR/app.py (see above)"
[ -s "$WORK/out.wasm" ] || die "componentize-py wrote no component"

# Replace OUT atomically, so a gateway watching it never reads half a file.
cp -- "$WORK/out.wasm" "$OUT.tmp.$$" || die "cannot write $OUT"
mv -f -- "$OUT.tmp.$$" "$OUT"
elapsed_ms=$(( ($(date +%s%N) - started) / 1000000 ))
echo "build.sh: built $OUT ($(wc -c <"$OUT") bytes in ${elapsed_ms} ms)" >&2
echo "$OUT"
