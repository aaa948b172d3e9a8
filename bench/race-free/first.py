"""The traced script of race.py: when its first line runs (CLOCK_MONOTONIC) and whether its
function__entry semaphore (address in FIRST_SEMAPHORE) was raised by then."""
import time
t = time.monotonic_ns()
import os, sys
with open('/proc/self/maps') as f:
    for line in f:
        p = line.split()
        if len(p) >= 6 and p[5] == os.path.realpath(sys.executable) and int(p[2], 16) == 0:
            base = int(p[0].split('-')[0], 16)
            break
with open('/proc/self/mem', 'rb', buffering=0) as mem:
    mem.seek(base + int(os.environ['FIRST_SEMAPHORE'], 16))
    sem = int.from_bytes(mem.read(2), 'little')
print(f'FIRST {sem} {t}', flush=True)
