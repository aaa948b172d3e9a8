#!/bin/bash
# What pftraced's sched_switch program (per-thread CPU slots) costs every
# context switch of the host (README, "Per-call figures"). Run as root,
# under the measurement locks. Usage: measure.sh PFTRACED [ROUNDS]
#  - pipe ping-pong between two untraced processes pinned to one CPU
#    (two switches a round trip; fastest of 5 x 20,000), without and with
#    PFTRACED running, interleaved;
#  - bpf_stats (kernel.bpf_stats_enabled=1) of the program: ns per run over
#    the untraced ping-pong (misses: the thread has no slot) and over a
#    ping-pong between two threads of a traced CPython (hits: a slot write).
set -eu
PFTRACED=$1
ROUNDS=${2:-3}
PY=${PFTRACE_PYTHON:-/var/cache/pftrace/cpython-3.9-dtrace/bin/python3.9}
HERE=$(cd "$(dirname "$0")" && pwd)
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
gcc -O2 -Wall -o "$T/pingpong" "$HERE/pingpong.c"
pp() { taskset -c 1 "$T/pingpong" 20000 5; }
prog_stats() { # run_cnt run_time_ns of the pftraced's tracing (tp_btf) program
    for f in /proc/"$1"/fdinfo/*; do
        if grep -q '^prog_type:[[:space:]]*26' "$f" 2>/dev/null; then
            awk '/^run_cnt:/{c=$2} /^run_time_ns:/{t=$2} END{print c, t}' "$f"
            return
        fi
    done
    echo "0 0"
}
old=$(sysctl -n kernel.bpf_stats_enabled)
sysctl -qw kernel.bpf_stats_enabled=1
for r in $(seq "$ROUNDS"); do
    echo "round $r: load $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "  ping-pong without pftraced: $(pp) ns"
    # A traced CPython waiting for a file, then a ping-pong between its threads.
    cat > "$T/wait.py" <<PYEOF
import os, runpy, sys, time
while not os.path.exists("$T/go"):
    time.sleep(0.01)
sys.argv = ["pingpong.py", "20000"]
runpy.run_path("$HERE/pingpong.py", run_name="__main__")
sys.stdin.read()
PYEOF
    rm -f "$T/go"
    mkfifo "$T/in" 2>/dev/null || true
    taskset -c 1 "$PY" "$T/wait.py" < "$T/in" > "$T/py.out" &
    py=$!
    exec 9> "$T/in"
    "$PFTRACED" -t mark --pid "$py" -o "$T/trace.json" 2> "$T/pftraced.err" &
    tracer=$!
    for _ in $(seq 200); do grep -q "attached to pid $py" "$T/pftraced.err" && break; sleep 0.05; done
    read -r c0 t0 < <(prog_stats "$tracer")
    echo "  ping-pong with pftraced:    $(pp) ns"
    read -r c1 t1 < <(prog_stats "$tracer")
    touch "$T/go"
    for _ in $(seq 400); do grep -q "traced ping-pong" "$T/py.out" && break; sleep 0.05; done
    read -r c2 t2 < <(prog_stats "$tracer")
    echo "  $(cat "$T/py.out")"
    awk -v c="$((c1 - c0))" -v t="$((t1 - t0))" 'BEGIN{printf "  bpf_stats, untraced ping-pong: %d runs, %.1f ns a run\n", c, t / c}'
    awk -v c="$((c2 - c1))" -v t="$((t2 - t1))" 'BEGIN{printf "  bpf_stats, traced ping-pong:   %d runs, %.1f ns a run\n", c, t / c}'
    exec 9>&-
    kill "$py" 2>/dev/null || true
    wait "$py" 2>/dev/null || true
    kill -INT "$tracer" 2>/dev/null || true
    wait "$tracer" 2>/dev/null || true
    echo "  ping-pong without pftraced: $(pp) ns"
done
sysctl -qw kernel.bpf_stats_enabled="$old"
