"""Run as: unshare -m sh -c 'mount -t tracefs nodev /sys/kernel/tracing && python3 race.py 20'.
Prototype of the daemon's exec -> semaphore write, vs CPython 3.9's start-up to its first line.
bpftrace reports execs of the interpreter (sched_process_exec); this consumer raises the
semaphores through /proc/PID/mem and notes when; each process's first line reads its own semaphore."""
import os, subprocess, sys, time, threading
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import probes as sem
PY = sem.EXE
prog = 'tracepoint:sched:sched_process_exec /str(args->filename) == "%s"/ { printf("%%d %%llu\\n", pid, nsecs); } BEGIN { printf("up\\n"); }' % PY
b = subprocess.Popen(['bpftrace', '-e', prog], stdout=subprocess.PIPE, text=True, bufsize=1)
line = b.stdout.readline()
while line and 'up' not in line:
    line = b.stdout.readline()
assert 'up' in line
time.sleep(0.5)
import ctypes, struct
import bpfraw
# `race.py N attach`: the first exec also attaches the host-wide uprobe_multi link (no ref_ctr)
# before raising its semaphores, as the daemon must for the first process of an interpreter file.
attach_first = len(sys.argv) > 2 and sys.argv[2] == 'attach'
prog = bpfraw.ins(0xb7, dst=0, imm=0) + bpfraw.ins(0x95)
pbuf = ctypes.create_string_buffer(prog); lic = ctypes.create_string_buffer(b'GPL')
pfd, _ = bpfraw.bpf(5, struct.pack('<IIQQIIQII16sII', 2, 2, ctypes.addressof(pbuf), ctypes.addressof(lic), 0, 0, 0, 0, 0, b'', 0, 48))
assert pfd >= 0
offs = (ctypes.c_uint64 * 2)(*bpfraw.SITES)
links = []
def attach():
    a = struct.pack('<IIIIQQQQIII', pfd, 0, 48, 0, ctypes.addressof(bpfraw._path), ctypes.addressof(offs), 0, 0, 2, 0, 0)
    lfd, _ = bpfraw.bpf(28, a)
    assert lfd >= 0, os.strerror(ctypes.get_errno())
    links.append(lfd)
writes = {}
def consume():
    for line in b.stdout:
        parts = line.split()
        if len(parts) != 2: continue
        pid, t_exec = int(parts[0]), int(parts[1])
        if attach_first and not links:
            attach()
        vals = None
        for _ in range(200):
            try:
                vals = sem.adjust(pid, 1)
            except OSError:  # an exec of another process of this interpreter, gone already
                break
            if vals is not None: break
        writes[pid] = (t_exec, time.monotonic_ns(), vals)
threading.Thread(target=consume, daemon=True).start()
n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
rows = []
for i in range(n):
    out = subprocess.run([PY, os.path.join(HERE, 'first.py')], capture_output=True, text=True, env=dict(os.environ, FIRST_SEMAPHORE=hex(sem.SEMAPHORES[0]))).stdout.split()
    seen, t_first = int(out[1]), int(out[2])
    time.sleep(0.05)
    rows.append((seen, t_first))
b.terminate()
execs = sorted(writes.values())
res = []
for (seen, t_first), (t_exec, t_write, vals) in zip(rows, execs):
    res.append((seen, (t_write - t_exec) / 1e6, (t_first - t_exec) / 1e6))
if not res: sys.exit("no exec seen: " + repr(writes))
for r in res: print('sem_at_first_line=%d  exec->write %.3f ms  exec->first_line %.3f ms' % r)
print('raised in time:', sum(1 for r in res if r[0] >= 1), 'of', len(res))
print('exec->write min/median/max ms:', min(r[1] for r in res), sorted(r[1] for r in res)[len(res)//2], max(r[1] for r in res))
print('exec->first line min/median/max ms:', min(r[2] for r in res), sorted(r[2] for r in res)[len(res)//2], max(r[2] for r in res))
