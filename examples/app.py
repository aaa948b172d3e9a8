#!/usr/bin/env python3
"""pftrace demo program.

A small workload with two functions worth tracing, `compute` and
`load_records`, and a few helpers that are not traced. It calls them from the
main thread and from two worker threads and takes about a second.

    cargo xtask demo        # traces compute and load_records with pftraced

Runs on Python 3.6 and later, standard library only.
"""

import json
import sys
import threading
import time

ROUNDS = 5  # rounds of work per thread


def compute(n):
    """CPU work: the sum of the squares of 0..n-1."""
    total = 0
    for i in range(n):
        total += i * i
    return total


def make_record(i):
    """One record as a dict (not traced)."""
    return {"id": i, "name": "item-%d" % i, "score": (i * 37) % 101}


def load_records(n):
    """Builds n records, serialises them to JSON and parses them back."""
    text = json.dumps([make_record(i) for i in range(n)])
    return json.loads(text)


def summarize(records):
    """The mean score of some records (not traced)."""
    return sum(r["score"] for r in records) / max(len(records), 1)


def pause(seconds):
    """Waits a little, as a program waiting on I/O would (not traced)."""
    time.sleep(seconds)


def work(label, rounds, results):
    """One thread's share: compute, load, summarize, pause."""
    for r in range(rounds):
        squares = compute(400000 + 100000 * r)
        records = load_records(2000)
        results.append((label, r, squares % 1000, summarize(records)))
        pause(0.08)


def main():
    started = time.time()
    results = []
    workers = [
        threading.Thread(target=work, args=("worker-%d" % k, ROUNDS, results), name="worker-%d" % k)
        for k in (1, 2)
    ]
    for t in workers:
        t.start()
    work("main", ROUNDS, results)
    for t in workers:
        t.join()
    elapsed = time.time() - started
    print(
        "app.py: %d rounds in 3 threads, %.2f s (Python %s)"
        % (len(results), elapsed, sys.version.split()[0])
    )


if __name__ == "__main__":
    main()
