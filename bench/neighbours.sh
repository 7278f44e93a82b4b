#!/usr/bin/env bash
# A well-behaved tenant's echo latency with and without a hostile neighbour
# tenant on the same gateway (docs/performance.md "Neighbours under attack").
#
# One gateway serves two tenants: `victim.test` (the built-in echo plugin)
# and `attacker.test` (the test plugin, with the quotas an operator would
# give an untrusted tenant). Each round measures the victim's echo (32 B,
# 1 in flight per connection) alone, then beside each attack in turn (2
# connections repeating one hostile command on a new connection each time,
# pausing 10 ms between attacks and 50 ms after a refusal, so that the
# attacking client's own CPU use stays small on a small machine).
#
# The victim's echo is measured twice each time:
# - paced: 20 connections sending VICTIM_RATE messages a second in all
#   (default 20,000, about a fifth of what the pinned gateway echoes at
#   most), which is where a production gateway runs and where tail latency
#   means something;
# - saturated: 10 connections in a closed loop, the gateway's one core kept
#   busy by the victim alone, so that any CPU the attacker takes (within
#   its cpu_budget) shows up in the victim's queueing delay.
# Rounds alternate; the tables show medians of 3 rounds (1 with `quick`)
# of p50 and p99, and the ratio of p99 under attack to p99 alone.
#
#   bench/neighbours.sh          3 rounds of 10 s per measurement
#   ATTACKER_CPU_BUDGET=50ms/s bench/neighbours.sh
#                                the attacker's cpu_budget (default 200ms/s)
#   VICTIM_RATE=40000 bench/neighbours.sh
#   PIN=0 bench/neighbours.sh    nothing pinned
#   bench/neighbours.sh quick    1 round of 3 s
#   GATEWAY=/tmp/wasmgate-old bench/neighbours.sh
#                                another gateway binary (an A/B comparison)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=10; ROUNDS=3
if [ "${1:-}" = quick ]; then SECS=3; ROUNDS=1; fi
cargo build --release -p wasmgate -p wasmgate-bench >&2
BIN=target/release
OUT=target/bench
mkdir -p "$OUT"
TESTKIT=$PWD/target/plugins/wasm32-wasip2/release/testkit.wasm
[ -f "$TESTKIT" ] || { echo "bench: $TESTKIT missing (built with the gateway)" >&2; exit 1; }
cat > "$OUT/neighbours.toml" <<TOML
[server]
listen = "127.0.0.1:9102"
threads = 0

[sandbox]
max_call_time = "1s"

[[tenant]]
name = "victim"
hosts = ["victim.test"]

[[tenant.route]]
path = "/echo"
plugin = "builtin:echo"

[[tenant]]
name = "attacker"
hosts = ["attacker.test"]
cpu_budget = "${ATTACKER_CPU_BUDGET:-200ms/s}"
max_connections_per_second = 100
max_memory_total = "64MiB"
max_broadcast_deliveries_per_second = 10000
max_log_lines_per_second = 100

[[tenant.route]]
path = "/t"
plugin = "$TESTKIT"
max_sends_per_second = 1000
TOML

# The gateway on CPU 0, both load generators on CPU 1 (as bench/run.sh
# pins server and load): the victim's figures then measure the gateway,
# not the attacking client competing with the victim's for a core.
# PIN=0: no pinning, every process on every core.
if [ "$(nproc)" -ge 2 ] && [ "${PIN:-1}" != 0 ]; then SERVER_CPU="taskset -c 0"; LOAD_CPU="taskset -c 1"; else SERVER_CPU=""; LOAD_CPU=""; fi
RUST_LOG=warn $SERVER_CPU "${GATEWAY:-$BIN/wasmgate}" serve --config "$OUT/neighbours.toml" >"$OUT/neighbours.log" 2>&1 &
GW=$!
trap 'kill $GW 2>/dev/null || true' EXIT
for _ in $(seq 1 200); do grep -q "listening on" "$OUT/neighbours.log" && break; sleep 0.05; done
ADDR=127.0.0.1:9102
: > "$OUT/neighbours.jsonl"

victim() { # label
    $LOAD_CPU "$BIN/loadgen" --addr "$ADDR" --host victim.test --path /echo --label "$1" --server-pid "$GW" \
        echo --conns 20 --size 32 --rate "${VICTIM_RATE:-20000}" --seconds "$SECS" | tee -a "$OUT/neighbours.jsonl" >&2
    $LOAD_CPU "$BIN/loadgen" --addr "$ADDR" --host victim.test --path /echo --label "$1" --server-pid "$GW" \
        echo --conns 10 --size 32 --inflight 1 --seconds "$SECS" | tee -a "$OUT/neighbours.jsonl" >&2
}
attack() { # command
    $LOAD_CPU "$BIN/loadgen" --addr "$ADDR" --host attacker.test --path /t --label "attack" \
        attack --command "$1" --conns 2 --seconds $((2 * SECS + 4)) >/dev/null &
    ATTACK=$!
    sleep 1
}

# ONLY=WORD runs only the attacks whose command contains WORD.
ATTACKS=()
for a in "spin" "recurse" "grow 60" "flood-self 1000000" "log-flood 1024" "timers 100000"; do
    [[ -z "${ONLY:-}" || "$a" == *"$ONLY"* ]] && ATTACKS+=("$a")
done
for _ in $(seq 1 "$ROUNDS"); do
    victim "alone"
    for a in "${ATTACKS[@]}"; do
        attack "$a"
        victim "$a"
        wait "$ATTACK" 2>/dev/null || true
    done
done

python3 - "$OUT/neighbours.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
med = lambda rs, k: statistics.median(r[k] for r in rs)
for paced, title in ((True, "paced, 20 connections"), (False, "saturated, 10 connections")):
    by = {}
    for r in rows:
        if (r.get("rate", 0) > 0) == paced:
            by.setdefault(r["label"], []).append(r)
    if "alone" not in by:
        continue
    alone = med(by["alone"], "p99_us")
    print(f"\n| victim's echo ({title}, 32 B) | msgs/s | p50 µs | p99 µs | p99 vs alone | gateway CPU µs/msg |")
    print("|---|---|---|---|---|---|")
    for label, rs in by.items():
        p99 = med(rs, "p99_us")
        print(f"| {'alone' if label == 'alone' else 'beside `' + label + '`'} | {med(rs, 'msgs_per_s'):.0f} | {med(rs, 'p50_us'):.0f} | {p99:.0f} | {p99 / alone:.2f}x | {med(rs, 'server_cpu_us_per_msg'):.1f} |")
PY
