"""Raw bpf/perf syscalls: a tgid-filter program (hash map lookup, as pftrace's TRACKED) attached
as uprobes at CPython 3.9's probe sites, host-wide (pid -1) or per pid, without ref_ctr."""
import ctypes, os, struct
import probes
libc = ctypes.CDLL(None, use_errno=True)
PY = probes.EXE.encode()
SITES = probes.SITES
UPROBE_TYPE = int(open('/sys/bus/event_source/devices/uprobe/type').read())
_keep = []
def err(what): raise OSError(ctypes.get_errno(), f'{what}: {os.strerror(ctypes.get_errno())}')
def bpf(cmd, attr):
    attr += b'\0' * (144 - len(attr)); a = ctypes.create_string_buffer(attr, 144)
    r = libc.syscall(321, cmd, a, 144)
    return r, a
def ins(code, dst=0, src=0, off=0, imm=0):
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)
def map_create(entries=1024):
    fd, _ = bpf(0, struct.pack('<IIII', 1, 4, 4, entries))  # BPF_MAP_TYPE_HASH, key 4, value 4
    if fd < 0: err('map_create')
    return fd
def map_update(fd, key, val):
    k = ctypes.c_uint32(key); v = ctypes.c_uint32(val); _keep.extend([k, v])
    r, _ = bpf(2, struct.pack('<IIQQQ', fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0))
    if r < 0: err('map_update')
def prog_load(map_fd):
    insns = [
        ins(0x85, imm=14),                    # call get_current_pid_tgid
        ins(0x77, dst=0, imm=32),             # r0 >>= 32
        ins(0x63, dst=10, src=0, off=-4),     # *(u32 *)(fp-4) = r0
        ins(0x18, dst=1, src=1, imm=map_fd), ins(0),  # r1 = map (ld_imm64 pseudo map fd)
        ins(0xbf, dst=2, src=10), ins(0x07, dst=2, imm=-4),  # r2 = fp-4
        ins(0x85, imm=1),                     # call map_lookup_elem
        ins(0xb7, dst=0, imm=0), ins(0x95),   # return 0
    ]
    prog = b''.join(insns); buf = ctypes.create_string_buffer(prog); lic = ctypes.create_string_buffer(b'GPL')
    log = ctypes.create_string_buffer(65536); _keep.extend([buf, lic, log])
    fd, _ = bpf(5, struct.pack('<IIQQIIQI', 2, len(insns), ctypes.addressof(buf), ctypes.addressof(lic), 1, 65536, ctypes.addressof(log), 0))
    if fd < 0: raise OSError(log.value.decode())
    return fd
_path = ctypes.create_string_buffer(PY)
def attach(prog_fd, off, pid=-1, ref_ctr=0):
    attr = struct.pack('<IIQQQQQIIQQ', UPROBE_TYPE, 128, ref_ctr << 32, 0, 0, 0, 1, 0, 0, ctypes.addressof(_path), off)
    attr += b'\0' * (128 - len(attr)); a = ctypes.create_string_buffer(attr, 128)
    fd = libc.syscall(298, a, pid, 0 if pid == -1 else -1, -1, 8)
    if fd < 0: err('perf_event_open')
    if libc.ioctl(fd, 0x40042408, prog_fd) != 0: err('SET_BPF')
    if libc.ioctl(fd, 0x2400, 0) != 0: err('ENABLE')
    return fd
