import sys, time
def f(): pass
print('ready', flush=True)
sys.stdin.readline()
import os
N = int(os.environ.get("N", "1000000"))
best = None
for _ in range(3):
    t = time.perf_counter()
    for _ in range(N):
        f()
    d = (time.perf_counter() - t) / N * 1e9
    best = d if best is None else min(best, d)
print(f'{best:.1f}', flush=True)
