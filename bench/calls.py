"""Benchmark workload: a loop making N Python calls (default N = 1,000,000
iterations) to `f`, of which every 1000th iteration also calls `rare` (0.1% of
calls: N + ceil(N/1000) calls in all), then prints the elapsed wall and CPU
time of the loop:

    1001000 calls 0.083412 s 83.3 ns/call cpu 0.083390 s 83.3 ns/call

With --wait it prints "ready" and waits for a line on stdin first, so a tracer
can attach before the timed loop starts. With --depth=D the loop runs D frames
of `level` below main, entered after the wait (where real code makes its calls:
a framework's or a test runner's depth; a tracer attached at the wait sees them
enter). `cargo xtask bench` runs it."""
import sys
import time


def f(i):
    return i


def rare(i):
    return i


def level(d, n):
    return level(d - 1, n) if d else loop(n)


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(args[0]) if args else 1_000_000
    depth = next((int(a[8:]) for a in sys.argv if a.startswith("--depth=")), 0)
    if "--wait" in sys.argv:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        sys.stdin.readline()
    level(depth, n) if depth else loop(n)


def loop(n):
    t0 = time.perf_counter()
    c0 = time.process_time()
    for i in range(n):
        f(i)
        if i % 1000 == 0:
            rare(i)
    dt = time.perf_counter() - t0
    dc = time.process_time() - c0
    calls = n + (n + 999) // 1000
    print(f"{calls} calls {dt:.6f} s {dt / calls * 1e9:.1f} ns/call cpu {dc:.6f} s {dc / calls * 1e9:.1f} ns/call")


main()
