#!/usr/bin/env bash
# Builds a JavaScript wasmgate plugin into a WebAssembly component.
#
#   sdk/js/build.sh PLUGIN_DIR OUT.wasm
#
# PLUGIN_DIR/plugin.js is the plugin's entry module. It imports the SDK as
# "wasmgate" (mapped here to sdk/js/wasmgate.js, whatever the plugin's
# folder), may import its own relative modules and npm packages from its own
# node_modules, and must export what definePlugin returns:
#
#   export const { handler, resume } = definePlugin({ ... });
#
# Steps:
#   1. installs the SDK's pinned build tools (npm ci of sdk/js/package.json
#      into TOOLCHAINS/js/node_modules) when they are missing or
#      package-lock.json changed;
#   2. bundles plugin.js and its imports into one ES module (esbuild);
#   3. makes it a component with componentize-js against wit/ (world
#      resumable-plugin), with only the WASI features the gateway provides:
#      stdio, random and clocks; http and fetch-event are disabled;
#   4. writes OUT.wasm and prints its path.
#
# Environment:
#   WASMGATE_JS_BUNDLE=FILE   also keep the bundled module (step 2) in FILE:
#                             stack traces in the gateway's log name its lines.
#   WASMGATE_TOOLCHAINS=DIR   where the build tools are installed (TOOLCHAINS
#                             above; default: target/toolchains next to sdk/):
#                             point several checkouts or projects at one
#                             folder to install the tools once.
#
# Works from any current directory; exits non-zero with a message on stderr
# when anything is missing or fails.
set -euo pipefail

die() {
    echo "build.sh: error: $*" >&2
    exit 1
}

usage() {
    echo "usage: $0 PLUGIN_DIR OUT.wasm" >&2
    echo "  builds PLUGIN_DIR/plugin.js into the component OUT.wasm (see sdk/js/README.md)" >&2
    exit 2
}

[[ $# -eq 1 && ( $1 == -h || $1 == --help ) ]] && usage
[[ $# -eq 2 ]] || usage

SDK_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
ROOT=$(cd "$SDK_DIR/../.." && pwd -P)
WIT_DIR=$ROOT/wit
TOOLS=${WASMGATE_TOOLCHAINS:-$ROOT/target/toolchains}/js
WORLD=resumable-plugin
# WASI features componentize-js enables by default, less those the gateway
# does not provide (it links WASI 0.2 without wasi:http).
DISABLED_FEATURES='["http", "fetch-event"]'

[[ -d $1 ]] || die "plugin folder '$1' does not exist"
PLUGIN_DIR=$(cd "$1" && pwd -P)
ENTRY=$PLUGIN_DIR/plugin.js
[[ -f $ENTRY ]] || die "no plugin.js in $PLUGIN_DIR (the entry module of a plugin)"
[[ -n $2 ]] || die "empty output path"
OUT_DIR=$(dirname "$2")
[[ -d $OUT_DIR ]] || die "output folder '$OUT_DIR' does not exist"
OUT=$(cd "$OUT_DIR" && pwd -P)/$(basename "$2")
[[ -f $WIT_DIR/plugin.wit ]] || die "no WIT contract at $WIT_DIR/plugin.wit (build.sh must stay in sdk/js of a wasmgate checkout)"
[[ -f $SDK_DIR/wasmgate.js ]] || die "no SDK module at $SDK_DIR/wasmgate.js"
[[ -f $SDK_DIR/package-lock.json ]] || die "no $SDK_DIR/package-lock.json (the pinned build tools)"

command -v node >/dev/null || die "node is not installed (Node.js 20.19 or later is needed)"
command -v npm >/dev/null || die "npm is not installed (it comes with Node.js)"
node -e '
  const [maj, min] = process.versions.node.split(".").map(Number);
  if (maj < 20 || (maj === 20 && min < 19)) {
    console.error(`build.sh: error: Node.js ${process.versions.node} is too old: 20.19 or later is needed`);
    process.exit(1);
  }' || exit 1

# 1. The pinned build tools, installed from the SDK's package.json and lock
# file into TOOLS. A stamp records which lock file was installed, so a
# changed lock file reinstalls; a lock serializes concurrent builds.
install_tools() {
    local stamp=$TOOLS/node_modules/.wasmgate-installed want
    want=$(sha256sum "$SDK_DIR/package-lock.json" | cut -d' ' -f1)
    if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
        return 0
    fi
    echo "build.sh: installing the SDK's pinned build tools (npm ci in $TOOLS)" >&2
    cp -- "$SDK_DIR/package.json" "$SDK_DIR/package-lock.json" "$TOOLS/" ||
        die "cannot copy the SDK's package.json and package-lock.json to $TOOLS"
    (cd "$TOOLS" && npm ci --include=dev --no-audit --no-fund --loglevel=error >&2) ||
        die "npm ci failed in $TOOLS (is the npm registry reachable? is the disk full?)"
    echo "$want" >"$stamp"
}
mkdir -p -- "$TOOLS" || die "cannot create the build tools' folder $TOOLS"
if command -v flock >/dev/null; then
    exec 9>"$TOOLS/.install.lock"
    flock 9
    install_tools
    flock -u 9
else
    install_tools
fi

ESBUILD=$TOOLS/node_modules/esbuild/bin/esbuild
COMPONENTIZE=$TOOLS/node_modules/@bytecodealliance/componentize-js/src/componentize.js
[[ -x $ESBUILD ]] || die "esbuild missing from $TOOLS/node_modules: delete that folder and run again"
[[ -f $COMPONENTIZE ]] || die "componentize-js missing from $TOOLS/node_modules: delete that folder and run again"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/wasmgate-js-build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# 2. One ES module: the plugin, its imports and the SDK. The contract's
# imports (wasmgate:plugin/host@0.1.1) stay imports.
BUNDLE=$WORK/plugin.js
"$ESBUILD" "$ENTRY" \
    --bundle --format=esm --platform=neutral --main-fields=module,main \
    --alias:wasmgate="$SDK_DIR/wasmgate.js" \
    --external:'wasmgate:*' \
    --charset=utf8 --log-level=warning \
    --outfile="$BUNDLE" ||
    die "bundling $ENTRY failed (esbuild's message is above)"
if [[ -n ${WASMGATE_JS_BUNDLE:-} ]]; then
    cp "$BUNDLE" "$WASMGATE_JS_BUNDLE" || die "cannot write WASMGATE_JS_BUNDLE=$WASMGATE_JS_BUNDLE"
fi

# 3. The component. Run from the bundle's folder: componentize-js gives the
# engine that folder only while it runs the module's top level (wizer).
(
    cd "$WORK"
    COMPONENTIZE="$COMPONENTIZE" WIT_DIR="$WIT_DIR" WORLD="$WORLD" OUT="$OUT" \
        DISABLED_FEATURES="$DISABLED_FEATURES" node --input-type=module -e '
      import { pathToFileURL } from "node:url";
      import { writeFile } from "node:fs/promises";
      const { componentize } = await import(pathToFileURL(process.env.COMPONENTIZE).href);
      try {
        const { component } = await componentize({
          sourcePath: "plugin.js",
          witPath: process.env.WIT_DIR,
          worldName: process.env.WORLD,
          disableFeatures: JSON.parse(process.env.DISABLED_FEATURES),
        });
        await writeFile(process.env.OUT, component);
      } catch (e) {
        console.error(`build.sh: error: componentize-js failed: ${e && e.stack ? e.stack : e}`);
        process.exit(1);
      }
    '
) || die "building the component failed (the reason is above)"

# 4. Done.
[[ -s $OUT ]] || die "componentize-js wrote no component to $OUT"
echo "$OUT"
