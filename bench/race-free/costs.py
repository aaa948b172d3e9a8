"""Per-call cost of CPython calls (loop.py) under the race-free design's conditions; `costs.py MODE`:
untraced; neighbour (host-wide uprobes without ref_ctr, this process's semaphore 0); raised (semaphores
raised, no uprobe: a SIGKILLed daemon's leftover); hostwideK (one host-wide consumer, K processes
tracked in its map, semaphores raised); perpidK (K pid-scoped uprobes per site, as today). Prints ns per call."""
import os, subprocess, sys, time
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import probes as sem, bpfraw
PY = sem.EXE
def spawn(script):
    p = subprocess.Popen([PY, script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == 'ready'
    return p
def go(p):
    p.stdin.write('\n'); p.stdin.flush(); r = float(p.stdout.readline()); p.wait(); return r
def release(ps):
    for q in ps: q.stdin.write('\n'); q.stdin.flush(); q.wait()
mode = sys.argv[1]
mfd = bpfraw.map_create(); prog = bpfraw.prog_load(mfd)
if mode == 'untraced':
    print(mode, go(spawn(os.path.join(HERE, 'loop.py'))))
elif mode == 'raised':
    p = spawn(os.path.join(HERE, 'loop.py')); sem.adjust(p.pid, 1); print(mode, go(p))
elif mode == 'neighbour':
    t = time.perf_counter(); fds = [bpfraw.attach(prog, o) for o in bpfraw.SITES]; at = (time.perf_counter() - t) * 1e3
    p = spawn(os.path.join(HERE, 'loop.py')); assert sem.adjust(p.pid, 0) == [0, 0]
    print(mode, go(p), f'(attach of 2 host-wide uprobes {at:.3f} ms)')
elif mode.startswith('hostwide') or mode.startswith('perpid'):
    k = int(mode.lstrip('hostwidepr'))
    idle = [spawn(os.path.join(HERE, 'idle.py')) for _ in range(k - 1)]
    p = spawn(os.path.join(HERE, 'loop.py')); ps = idle + [p]
    for q in ps: sem.adjust(q.pid, 1); bpfraw.map_update(mfd, q.pid, 1)
    if mode.startswith('hostwide'):
        fds = [bpfraw.attach(prog, o) for o in bpfraw.SITES]
    else:
        fds = [bpfraw.attach(prog, o, pid=q.pid) for q in ps for o in bpfraw.SITES]
    print(mode, go(p)); release(idle)
