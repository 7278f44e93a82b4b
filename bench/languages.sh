#!/usr/bin/env bash
# The cost of each guest language, measured in one run against the native
# baseline: the echo example written in Rust (builtin:echo), C, JavaScript
# and Python, each served one instance per connection and shared.
#
#   bench/languages.sh          every figure (about 10 minutes)
#
# Needs the examples built: ./dev examples. Prints a Markdown table (paste it
# into docs/performance.md); raw lines in target/bench/languages.jsonl.
#
# Per language: component size; compile time when first loaded (no cache);
# connection setup rate (open, upgrade with instantiation, one echo, close);
# RSS and PSS per idle connection with one instance each (200 connections:
# JavaScript and Python instances cost megabytes) and on a shared route
# with hibernate_after (10,000 connections); the echo round trip (100
# connections x 32 B, one in flight) in both modes, with server CPU time
# per message.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p wasmgate -p wasmgate-bench >&2
BIN=target/release
OUT=target/bench
EX=$PWD/target/examples
mkdir -p "$OUT"
: > "$OUT/languages.jsonl"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
if [ "$(nproc)" -ge 2 ]; then SERVER_CPU="taskset -c 0"; LOAD_CPU="taskset -c 1"; else SERVER_CPU=""; LOAD_CPU=""; fi
SECONDS_PER_RUN=${SECONDS_PER_RUN:-5}

for f in echo-c echo-js echo-py; do
    [ -f "$EX/$f.wasm" ] || { echo "bench: $EX/$f.wasm missing: run ./dev examples" >&2; exit 1; }
done

plugin_of() { # lang -> plugin value
    case $1 in rust) echo builtin:echo ;; c) echo "$EX/echo-c.wasm" ;; js) echo "$EX/echo-js.wasm" ;; python) echo "$EX/echo-py.wasm" ;; esac
}

# A gateway serving one language's echo at /conn (an instance per
# connection) and /shared (one instance, idle connections parked).
start_gateway() { # lang extra-args...
    local lang=$1; shift
    local dir="$OUT/lang-$lang"
    mkdir -p "$dir"
    cat > "$dir/gateway.toml" <<EOF
[server]
listen = "127.0.0.1:9103"
max_connections = 20000
ping_interval = "off"

[sandbox]
max_call_time = "1s"

[[route]]
path = "/conn"
plugin = "$(plugin_of "$lang")"

[[route]]
path = "/shared"
plugin = "$(plugin_of "$lang")"
isolation = "shared"
hibernate_after = "1s"
EOF
    RUST_LOG=info $SERVER_CPU "$BIN/wasmgate" serve --config "$dir/gateway.toml" "$@" >"$dir/log" 2>&1 &
    PID=$!
    for _ in $(seq 1 1200); do grep -q "listening on" "$dir/log" && return 0; sleep 0.1; done
    echo "bench: the $lang gateway did not start" >&2; cat "$dir/log" >&2; exit 1
}

stop() { kill "$1"; wait "$1" 2>/dev/null || true; sleep 0.5; }

load() { # label path args...
    local label=$1 path=$2; shift 2
    $LOAD_CPU "$BIN/loadgen" --addr "$ADDR" --path "$path" --label "$label" --server-pid "$PID" "$@" \
        | tee -a "$OUT/languages.jsonl" >&2
}

# The native baseline, for the ratios.
$SERVER_CPU "$BIN/baseline" --listen 127.0.0.1:9100 >"$OUT/baseline.log" 2>&1 &
PID=$!; ADDR=127.0.0.1:9100
sleep 0.5
load "baseline/idle" /echo idle --conns 10000 --pid "$PID"
stop "$PID"
$SERVER_CPU "$BIN/baseline" --listen 127.0.0.1:9100 >"$OUT/baseline.log" 2>&1 &
PID=$!; sleep 0.5
load "baseline/echo" /echo echo --conns 100 --size 32 --inflight 1 --seconds "$SECONDS_PER_RUN"
load "baseline/setup" /echo setup --concurrency 16 --seconds "$SECONDS_PER_RUN"
stop "$PID"

ADDR=127.0.0.1:9103
for lang in rust c js python; do
    plugin=$(plugin_of "$lang")
    size=0
    [ -f "$plugin" ] && size=$(stat -c %s "$plugin")
    # Compile time: a first load with no cache.
    start_gateway "$lang" --no-cache
    compile_ms=$(grep -o "compiled in [0-9]* ms" "$OUT/lang-$lang/log" | head -1 | grep -o "[0-9]*")
    echo "{\"label\":\"$lang/component\",\"bytes\":$size,\"compile_ms\":${compile_ms:-0}}" | tee -a "$OUT/languages.jsonl" >&2
    load "$lang/echo-conn" /conn echo --conns 100 --size 32 --inflight 1 --seconds "$SECONDS_PER_RUN"
    load "$lang/echo-shared" /shared echo --conns 100 --size 32 --inflight 1 --seconds "$SECONDS_PER_RUN"
    load "$lang/setup-conn" /conn setup --concurrency 16 --seconds "$SECONDS_PER_RUN"
    load "$lang/setup-shared" /shared setup --concurrency 16 --seconds "$SECONDS_PER_RUN"
    stop "$PID"
    start_gateway "$lang"
    load "$lang/idle-conn" /conn idle --conns 200 --pid "$PID"
    stop "$PID"
    start_gateway "$lang"
    load "$lang/idle-shared" /shared idle --conns 10000 --pid "$PID" --settle 5
    stop "$PID"
done

python3 - "$OUT/languages.jsonl" <<'PY'
import json, sys
rows = {r["label"]: r for r in (json.loads(l) for l in open(sys.argv[1]) if l.strip())}
b = lambda k, m: rows[f"baseline/{k}"][m]
print("| | baseline | Rust | C | JavaScript | Python |")
print("|---|---|---|---|---|---|")
langs = ["rust", "c", "js", "python"]
def line(name, f, base=""):
    print(f"| {name} | {base} | " + " | ".join(f(l) for l in langs) + " |")
line("component size", lambda l: f"{rows[l+'/component']['bytes']/1e6:.2f} MB" if rows[l+'/component']['bytes'] else "built in")
line("compile at first load (no cache)", lambda l: f"{rows[l+'/component']['compile_ms']/1000:.1f} s" if rows[l+'/component']['compile_ms'] else "built in")
for mode, label in [("conn", "one instance per connection"), ("shared", "shared instance")]:
    line(f"setup, {label}: conns/s", lambda l: f"{rows[f'{l}/setup-{mode}']['conns_per_s']:.0f} ({rows[f'{l}/setup-{mode}']['conns_per_s']/b('setup','conns_per_s'):.2f}x)", f"{b('setup','conns_per_s'):.0f}")
    line(f"echo 100 x 32 B, {label}: msgs/s", lambda l: f"{rows[f'{l}/echo-{mode}']['msgs_per_s']:.0f} ({rows[f'{l}/echo-{mode}']['msgs_per_s']/b('echo','msgs_per_s'):.2f}x)", f"{b('echo','msgs_per_s'):.0f}")
    line(f"echo, {label}: server CPU us/msg", lambda l: f"{rows[f'{l}/echo-{mode}']['server_cpu_us_per_msg']}", f"{b('echo','server_cpu_us_per_msg')}")
    line(f"echo, {label}: p50 us", lambda l: f"{rows[f'{l}/echo-{mode}']['p50_us']:.0f}", f"{b('echo','p50_us'):.0f}")
for mode, label in [("conn", "one instance per connection"), ("shared", "shared instance")]:
    line(f"setup, {label}: server CPU us/conn", lambda l: f"{rows[f'{l}/setup-{mode}']['server_cpu_us_per_conn']}", f"{b('setup','server_cpu_us_per_conn')}")
line("instance cost per connection (CPU us: the difference of the two)", lambda l: f"{rows[f'{l}/setup-conn']['server_cpu_us_per_conn'] - rows[f'{l}/setup-shared']['server_cpu_us_per_conn']:.0f}")
line("idle, one instance per connection (200): RSS / PSS KiB per conn", lambda l: f"{rows[l+'/idle-conn']['kib_per_conn']} / {rows[l+'/idle-conn']['pss_kib_per_conn']}", f"{b('idle','kib_per_conn')}")
line("idle, shared + hibernate_after (10,000): RSS KiB per conn", lambda l: f"{rows[l+'/idle-shared']['kib_per_conn']} ({rows[l+'/idle-shared']['kib_per_conn']-b('idle','kib_per_conn'):+.2f})", f"{b('idle','kib_per_conn')}")
line("idle, shared (10,000): gateway RSS MiB", lambda l: f"{rows[l+'/idle-shared']['rss_after_kib']/1024:.0f}")
PY
