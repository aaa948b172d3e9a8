"""Benchmark workload for attach latency and the soak: calls `f` in an endless
loop and `tick` every 100th iteration, printing nothing but "ready" once at
the start (after which the loop runs until the process is killed).
`cargo xtask bench` traces `tick` (attach latency: the first `tick` call
recorded shows the probes are live) or both (the soak: every call recorded)."""
import sys


def f(i):
    return i


def tick(i):
    return i


def main():
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    i = 0
    while True:
        f(i)
        if i % 100 == 0:
            tick(i)
        i += 1


main()
