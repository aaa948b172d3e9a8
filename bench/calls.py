"""Benchmark workload: a loop making N Python calls (default 1,001,000) to
`f`, of which every 1000th also calls `rare` (0.1% of calls), then prints the
elapsed time per call. Waits for a line on stdin first when --wait is given,
so a tracer can attach before the timed loop starts."""
import sys
import time


def f(i):
    return i


def rare(i):
    return i


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    if "--wait" in sys.argv:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        sys.stdin.readline()
    t0 = time.perf_counter()
    for i in range(n):
        f(i)
        if i % 1000 == 0:
            rare(i)
    dt = time.perf_counter() - t0
    calls = n + (n + 999) // 1000
    print(f"{calls} calls {dt:.6f} s {dt / calls * 1e9:.1f} ns/call")


main()
