#!/usr/bin/env bash
# Runs the native baseline and the gateway's echo route under identical load,
# one after the other in the same run, and prints each figure with the ratio
# gateway/baseline. Every load scenario also reports the server's CPU time
# (user + system, all threads, over the measured window) per message,
# connection or delivery: steadier than throughput on a shared machine.
# Results: target/bench/results.jsonl and a Markdown table on stdout (paste
# it into docs/performance.md).
#
#   bench/run.sh                 every scenario: 3 alternating runs of each
#                                server, 10 s each; the table shows medians
#   bench/run.sh quick           one run of 3 s each, for a smoke test
#   bench/run.sh full|quick WORD only the scenarios whose name contains WORD
#
# Scenarios named "tls ..." run both servers with TLS (rustls, ring, the
# same self-signed certificate) and the load generator with --tls. Those
# named "... deflate" offer permessage-deflate (--deflate): the gateway's
# compressing routes accept it, the baseline declines and runs plain.
#
# THREADS=N (default 0) runs both servers with the same runtime: 0 is
# tokio's multi-thread scheduler with a worker per CPU, 1 a current-thread
# runtime, N N workers (the gateway's `[server] threads`).
#
# Servers are pinned to CPU 0 and the load generator to CPU 1 when the machine
# has two or more; runs are refused while other processes use much CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN=10
REPEAT=3
if [ "${1:-}" = quick ]; then SECONDS_PER_RUN=3; REPEAT=1; fi
ONLY=${2:-}
export THREADS=${THREADS:-0}
TLS=""

cargo build --release -p wasmgate -p wasmgate-bench >&2
BIN=target/release
OUT=target/bench
mkdir -p "$OUT"
: > "$OUT/results.jsonl"
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
# One plugin instance per connection takes about 4 memory maps; the kernel's
# default vm.max_map_count (65530) holds about 15,000 instances.
MAPS=$(cat /proc/sys/vm/max_map_count)
if [ "$MAPS" -lt 262144 ]; then
    if sysctl -qw vm.max_map_count=262144 2>/dev/null; then MAPS=262144; else
        echo "bench: vm.max_map_count is $MAPS and cannot be raised: the idle scenario will hit it" >&2; fi
fi
echo "bench: vm.max_map_count=$MAPS" >&2

if [ "$(nproc)" -ge 2 ]; then SERVER_CPU="taskset -c 0"; LOAD_CPU="taskset -c 1"; else SERVER_CPU=""; LOAD_CPU=""; fi

# Refuse to measure on a busy machine: other processes' CPU use over 1 s.
busy() {
    read -r _ u1 n1 s1 i1 w1 q1 sq1 _ < /proc/stat
    sleep 1
    read -r _ u2 n2 s2 i2 w2 q2 sq2 _ < /proc/stat
    local busy=$(( (u2+n2+s2+q2+sq2) - (u1+n1+s1+q1+sq1) )) total=$(( (u2+n2+s2+i2+w2+q2+sq2) - (u1+n1+s1+i1+w1+q1+sq1) ))
    echo $(( 100 * busy / (total > 0 ? total : 1) ))
}
load=$(busy)
if [ "$load" -gt 20 ]; then
    echo "bench: refusing to run: the machine is ${load}% busy before starting" >&2
    exit 1
fi

# The TLS scenarios' certificate (self-signed, for localhost): both servers
# serve it with the same rustls settings.
CERTS="$PWD/$OUT/certs"
"$BIN/loadgen" cert --dir "$CERTS"

start_server() { # name -> sets PID, ADDR; TLS=1 serves TLS
    local log="$OUT/$1.log"
    if [ "$1" = baseline ]; then
        local tls_args=()
        [ -n "$TLS" ] && tls_args=(--tls-cert "$CERTS/server.pem" --tls-key "$CERTS/server.key")
        $SERVER_CPU "$BIN/baseline" --listen 127.0.0.1:9100 --threads "$THREADS" "${tls_args[@]}" >"$log" 2>&1 &
        ADDR=127.0.0.1:9100
    else
        local tls_line=""
        [ -n "$TLS" ] && tls_line="\ntls = { cert = \"$CERTS/server.pem\", key = \"$CERTS/server.key\" }"
        sed "s|^\[server\]$|[server]\nthreads = $THREADS$tls_line|" bench/gateway.toml > "$OUT/gateway.toml"
        RUST_LOG=warn $SERVER_CPU "$BIN/wasmgate" serve --config "$OUT/gateway.toml" >"$log" 2>&1 &
        ADDR=127.0.0.1:9101
    fi
    PID=$!
    for _ in $(seq 1 200); do grep -q "listening on" "$log" && return 0; sleep 0.05; done
    echo "bench: $1 did not start" >&2; cat "$log" >&2; exit 1
}

run() { # scenario-name loadgen-args...
    local name=$1; shift
    ROUTE=/echo
    [ "$1" = broadcast ] && ROUTE=/broadcast
    [ "$1" = fanout ] && ROUTE=/broadcast
    [ -n "$ONLY" ] && [[ "$name" != *"$ONLY"* ]] && return 0
    TLS=""
    [[ "$name" == tls* ]] && TLS=1
    for _ in $(seq 1 "$REPEAT"); do for server in baseline gateway; do
        start_server "$server"
        local args=("$@") path=$ROUTE
        [ "${args[0]}" = idle ] && args+=(--pid "$PID")
        # The gateway's route that releases idle instances (hibernate_after).
        [ "$server" = gateway ] && [[ "$name" == *hibernated* ]] && path=/echo-hibernated
        # permessage-deflate: the gateway's compressing routes; the baseline
        # declines the offer and runs uncompressed.
        local deflate=""
        if [[ "$name" == *deflate* ]]; then
            deflate=--deflate
            [ "$server" = gateway ] && path=/echo-deflate
            [ "$server" = gateway ] && [[ "$name" == *takeover* ]] && path=/echo-deflate-takeover
        fi
        $LOAD_CPU "$BIN/loadgen" --addr "$ADDR" --path "$path" --label "$name/$server" --server-pid "$PID" ${TLS:+--tls} $deflate "${args[@]}" | tee -a "$OUT/results.jsonl" >&2
        kill "$PID"; wait "$PID" 2>/dev/null || true
        sleep 0.5
    done; done
}

run "echo 100x32B x1"    echo --conns 100 --size 32 --inflight 1 --seconds "$SECONDS_PER_RUN"
run "echo 100x32B x16"   echo --conns 100 --size 32 --inflight 16 --seconds "$SECONDS_PER_RUN"
run "echo 10x16KiB x1"   echo --conns 10 --size 16384 --inflight 1 --seconds "$SECONDS_PER_RUN"
run "echo 1000x32B x1"   echo --conns 1000 --size 32 --inflight 1 --seconds "$SECONDS_PER_RUN"
run "broadcast 1 to 1000" broadcast --members 1000 --size 32 --inflight 16 --seconds "$SECONDS_PER_RUN"
# A room of 10,000: one message at a time (the time until the last member
# has it), and 16 at a time (deliveries per second).
run "broadcast 1 to 10000 x1" fanout --members 10000 --size 32 --inflight 1 --seconds "$SECONDS_PER_RUN"
run "broadcast 1 to 10000 x16" fanout --members 10000 --size 32 --inflight 16 --seconds "$SECONDS_PER_RUN"
run "setup rate"         setup --concurrency 16 --seconds "$SECONDS_PER_RUN"
run "tls echo 100x32B x1" echo --conns 100 --size 32 --inflight 1 --seconds "$SECONDS_PER_RUN"
run "tls echo 10x16KiB x1" echo --conns 10 --size 16384 --inflight 1 --seconds "$SECONDS_PER_RUN"
run "tls setup rate"     setup --concurrency 16 --seconds "$SECONDS_PER_RUN"
run "echo 100x1KiB x1"    echo --conns 100 --size 1024 --inflight 1 --seconds "$SECONDS_PER_RUN"
run "echo 100x1KiB x1 deflate" echo --conns 100 --size 1024 --inflight 1 --seconds "$SECONDS_PER_RUN"
run "idle 10000"         idle --conns 10000
run "idle 10000 after 1KiB" idle --conns 10000 --message 1024
run "idle 10000 after 1KiB deflate" idle --conns 10000 --message 1024
run "idle 10000 after 1KiB deflate takeover" idle --conns 10000 --message 1024
# hibernate_after (1 s) + mimalloc's purge delay (1 s) + margin: measured
# once the last connection's instance is released and its memory returned.
run "idle 10000 hibernated" idle --conns 10000 --settle 5

# Hot reload, on the gateway alone (the baseline has nothing to reload): echo
# load on 100 connections while the plugin file is renamed over 10 times,
# alternating echo and testkit; with the compile cache warm, then cold; and
# the same setup without a swap, for the steady-state p99.
reload() { # name swaps extra-gateway-args
    local name=$1 swaps=$2; shift 2
    [ -n "$ONLY" ] && [[ "$name" != *"$ONLY"* ]] && return 0
    local dir="$OUT/reload" plugins=target/plugins/wasm32-wasip2/release
    rm -rf "$dir" && mkdir -p "$dir"
    cp "$plugins/echo.wasm" "$dir/plugin.wasm"
    printf '[server]\nlisten = "127.0.0.1:9102"\nthreads = %s\nping_interval = "off"\n\n[[route]]\npath = "/echo"\nplugin = "plugin.wasm"\n' "$THREADS" > "$dir/gateway.toml"
    RUST_LOG=warn $SERVER_CPU "$BIN/wasmgate" serve --config "$dir/gateway.toml" "$@" >"$OUT/reload.log" 2>&1 &
    local pid=$!
    for _ in $(seq 1 200); do grep -q "listening on" "$OUT/reload.log" && break; sleep 0.05; done
    $LOAD_CPU "$BIN/loadgen" --addr 127.0.0.1:9102 --path /echo --label "$name/gateway" \
        reload --conns 100 --size 32 --seconds "$SECONDS_PER_RUN" --swaps "$swaps" \
        --file "$dir/plugin.wasm" --plugins "$plugins/echo.wasm" "$plugins/testkit.wasm" \
        | tee -a "$OUT/results.jsonl" >&2
    kill "$pid"; wait "$pid" 2>/dev/null || true
}
reload "reload steady (no swap)" 0 --cache-dir "$OUT/reload-cache"
reload "reload warm cache" 10 --cache-dir "$OUT/reload-cache"
reload "reload no cache" 10 --no-cache

# Clusters (issue 12): one sender on node A and a room of 1,000 members
# spread over three gateway nodes joined through Redis, against the same room
# on one gateway without [cluster]. Every server (the nodes and
# redis-server) is pinned to the same CPU as the single gateway, and the CPU
# time per delivery sums them all. Alternating, REPEAT runs each.
cluster() { # name
    local name=$1
    [ -n "$ONLY" ] && [[ "$name" != *"$ONLY"* ]] && return 0
    command -v redis-server >/dev/null || { echo "bench: $name: no redis-server, skipped" >&2; return 0; }
    local dir="$OUT/cluster"
    rm -rf "$dir" && mkdir -p "$dir"
    for _ in $(seq 1 "$REPEAT"); do for setup in one-node three-nodes; do
        local pids=() addrs=() n=1
        if [ "$setup" = three-nodes ]; then
            n=3
            $SERVER_CPU redis-server --port 9120 --bind 127.0.0.1 --save "" --appendonly no \
                --dir "$dir" >"$dir/redis.log" 2>&1 &
            pids+=($!)
            for _ in $(seq 1 100); do redis-cli -p 9120 ping >/dev/null 2>&1 && break; sleep 0.05; done
        fi
        for i in $(seq 1 "$n"); do
            local port=$((9110 + i)) cfg="$dir/node$i.toml"
            sed -e "s|^listen = .*|listen = \"127.0.0.1:$port\"|" -e "s|^\[server\]$|[server]\nthreads = $THREADS|" bench/gateway.toml > "$cfg"
            [ "$setup" = three-nodes ] && printf '\n[cluster]\nredis = "redis://127.0.0.1:9120"\nnode_id = "node%s"\n' "$i" >> "$cfg"
            RUST_LOG=warn $SERVER_CPU "$BIN/wasmgate" serve --config "$cfg" >"$dir/node$i.log" 2>&1 &
            pids+=($!)
            for _ in $(seq 1 200); do grep -q "listening on" "$dir/node$i.log" && break; sleep 0.05; done
            addrs+=("127.0.0.1:$port")
        done
        local list; list=$(IFS=,; echo "${addrs[*]}")
        local pidlist; pidlist=$(IFS=,; echo "${pids[*]}")
        $LOAD_CPU "$BIN/loadgen" --path /broadcast --label "$name/$setup" \
            fanout --nodes "$list" --members 1000 --size 32 --inflight 16 \
            --seconds "$SECONDS_PER_RUN" --pids "$pidlist" | tee -a "$OUT/results.jsonl" >&2
        kill "${pids[@]}"; wait "${pids[@]}" 2>/dev/null || true
        sleep 0.5
    done; done
}
cluster "cluster broadcast 1 to 1000"

# What [cluster] costs a node's local echo path: the same gateway with and
# without [cluster] (Redis running), alternating.
cluster_echo() { # name
    local name=$1
    [ -n "$ONLY" ] && [[ "$name" != *"$ONLY"* ]] && return 0
    command -v redis-server >/dev/null || { echo "bench: $name: no redis-server, skipped" >&2; return 0; }
    local dir="$OUT/cluster"
    mkdir -p "$dir"
    $SERVER_CPU redis-server --port 9120 --bind 127.0.0.1 --save "" --appendonly no \
        --dir "$dir" >"$dir/redis.log" 2>&1 &
    local redis=$!
    for _ in $(seq 1 100); do redis-cli -p 9120 ping >/dev/null 2>&1 && break; sleep 0.05; done
    for _ in $(seq 1 "$REPEAT"); do for setup in without-cluster with-cluster; do
        local cfg="$dir/echo.toml"
        sed "s|^\[server\]$|[server]\nthreads = $THREADS|" bench/gateway.toml > "$cfg"
        [ "$setup" = with-cluster ] && printf '\n[cluster]\nredis = "redis://127.0.0.1:9120"\n' >> "$cfg"
        RUST_LOG=warn $SERVER_CPU "$BIN/wasmgate" serve --config "$cfg" >"$dir/echo.log" 2>&1 &
        local pid=$!
        for _ in $(seq 1 200); do grep -q "listening on" "$dir/echo.log" && break; sleep 0.05; done
        $LOAD_CPU "$BIN/loadgen" --addr 127.0.0.1:9101 --path /echo --label "$name/$setup" --server-pid "$pid" \
            echo --conns 100 --size 32 --inflight 1 --seconds "$SECONDS_PER_RUN" | tee -a "$OUT/results.jsonl" >&2
        kill "$pid"; wait "$pid" 2>/dev/null || true
        sleep 0.5
    done; done
    kill "$redis"; wait "$redis" 2>/dev/null || true
}
cluster_echo "cluster echo 100x32B x1"

python3 - "$OUT/results.jsonl" "$load" <<'PY'
import json, os, sys, platform, datetime
import statistics
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
runs = {}
for r in rows:
    name, server = r["label"].rsplit("/", 1)
    runs.setdefault(name, {}).setdefault(server, []).append(r)
# The median of each figure over the repeated runs.
by = {name: {server: {k: (statistics.median(x[k] for x in rs) if isinstance(rs[0][k], (int, float)) else rs[0][k])
                      for k in rs[0]} for server, rs in servers.items()} for name, servers in runs.items()}
repeats = max(len(rs) for servers in runs.values() for rs in servers.values())
print(f"Run {datetime.date.today()} on {platform.node()} ({open('/proc/cpuinfo').read().count('processor')} CPUs), other load before start {sys.argv[2]}%, medians of {repeats} run(s) per server, THREADS={os.environ.get('THREADS', '0')}, vm.max_map_count {open('/proc/sys/vm/max_map_count').read().strip()}\n")
print("| scenario | metric | baseline | gateway | gateway/baseline |")
print("|---|---|---|---|---|")
metrics = {"echo": ["msgs_per_s", "server_cpu_us_per_msg", "mb_per_s", "p50_us", "p99_us", "p999_us", "errors"],
           "setup": ["conns_per_s", "server_cpu_us_per_conn", "errors"], "broadcast": ["deliveries_per_s", "server_cpu_us_per_delivery", "errors"], "fanout": ["deliveries_per_s", "messages_per_s", "p50_us", "p99_us", "server_cpu_us_per_delivery", "stalled", "errors"], "idle": ["kib_per_conn", "pss_kib_per_conn", "errors"]}
for name, pair in by.items():
    b, g = pair.get("baseline"), pair.get("gateway")
    if g and g["mode"] == "reload":
        for m in ["msgs_per_s", "p50_us", "p99_us", "errors", "swaps", "swap_to_served_ms_median", "swap_to_served_ms_max"]:
            print(f"| {name} | {m} | - | {g[m]} | - |")
        continue
    if "one-node" in pair and "three-nodes" in pair:
        o, t = pair["one-node"], pair["three-nodes"]
        for m in ["deliveries_per_s", "messages_per_s", "p50_us", "p99_us", "server_cpu_us_per_delivery", "stalled", "errors"]:
            ratio = f"{t[m] / o[m]:.2f}" if o.get(m) else "-"
            print(f"| {name} | {m} | one node: {o[m]} | three nodes: {t[m]} | {ratio} |")
        continue
    if "without-cluster" in pair and "with-cluster" in pair:
        o, t = pair["without-cluster"], pair["with-cluster"]
        for m in ["msgs_per_s", "server_cpu_us_per_msg", "p50_us", "p99_us", "errors"]:
            ratio = f"{t[m] / o[m]:.2f}" if o.get(m) else "-"
            print(f"| {name} | {m} | without: {o[m]} | with [cluster]: {t[m]} | {ratio} |")
        continue
    if not b or not g:
        continue
    for m in metrics[b["mode"]]:
        if b.get(m) is None or g.get(m) is None:
            continue
        ratio = f"{g[m] / b[m]:.2f}" if b[m] else "-"
        print(f"| {name} | {m} | {b[m]} | {g[m]} | {ratio} |")
PY
