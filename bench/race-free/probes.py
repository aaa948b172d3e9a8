"""CPython's function__entry/function__return sites of an interpreter file (from `readelf`),
and its USDT semaphores in a running process, read and written through /proc/PID/mem."""
import os, re, struct, subprocess

EXE = os.environ.get('PFTRACE_PYTHON', '/var/cache/pftrace/cpython-3.9-dtrace/bin/python3.9')


def _sites(exe):
    notes = subprocess.run(['readelf', '-n', exe], capture_output=True, text=True, check=True).stdout
    found = {}
    for name, pc, sem in re.findall(
        r'Name: (function__entry|function__return)\s+Location: (0x[0-9a-f]+), Base: 0x[0-9a-f]+, Semaphore: (0x[0-9a-f]+)',
        notes,
    ):
        found[name] = (int(pc, 16), int(sem, 16))
    assert len(found) == 2, f'{exe}: no function__entry/function__return probes'
    loads = subprocess.run(['readelf', '-lW', exe], capture_output=True, text=True, check=True).stdout
    segs = [tuple(int(x, 16) for x in m) for m in re.findall(r'LOAD\s+(0x[0-9a-f]+) (0x[0-9a-f]+) 0x[0-9a-f]+ 0x[0-9a-f]+ (0x[0-9a-f]+)', loads)]
    def offset(vaddr):
        return next(vaddr - va + off for off, va, memsz in segs if va <= vaddr < va + memsz)
    order = ('function__entry', 'function__return')
    return tuple(offset(found[n][0]) for n in order), tuple(found[n][1] for n in order)


# File offsets of the probe sites (uprobe offsets); virtual addresses of the semaphores.
SITES, SEMAPHORES = _sites(EXE)


def load_base(pid, exe=EXE):
    """Where `exe` is mapped in `pid` (its mapping at file offset 0), or None."""
    with open(f'/proc/{pid}/maps') as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5] == exe and int(parts[2], 16) == 0:
                return int(parts[0].split('-')[0], 16)
    return None


def adjust(pid, delta):
    """Adds `delta` to both semaphores of `pid` (0: just read); their new values, or None."""
    base = load_base(pid)
    if base is None:
        return None
    fd = os.open(f'/proc/{pid}/mem', os.O_RDWR)
    try:
        values = []
        for sem in SEMAPHORES:
            value = struct.unpack('<H', os.pread(fd, 2, base + sem))[0] + delta
            if delta:
                os.pwrite(fd, struct.pack('<H', value & 0xFFFF), base + sem)
            values.append(value)
        return values
    finally:
        os.close(fd)
