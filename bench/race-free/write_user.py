"""Whether a uprobe (kprobe-type) program may call bpf_probe_write_user here: lockdown=integrity
refuses it (LOCKDOWN_BPF_WRITE_USER); bpf_probe_read_user is the control."""
import ctypes, struct, os
libc = ctypes.CDLL(None, use_errno=True)
def ins(code, dst=0, src=0, off=0, imm=0):
    return struct.pack('<BBhi', code, (src << 4) | dst, off, imm)
def load(insns, name):
    prog = b''.join(insns)
    buf = ctypes.create_string_buffer(prog)
    lic = ctypes.create_string_buffer(b'GPL')
    log = ctypes.create_string_buffer(65536)
    # union bpf_attr for PROG_LOAD: prog_type u32, insn_cnt u32, insns u64, license u64, log_level u32, log_size u32, log_buf u64, kern_version u32
    attr = struct.pack('<IIQQIIQI', 2, len(insns), ctypes.addressof(buf), ctypes.addressof(lic), 1, 65536, ctypes.addressof(log), 0)
    attr = attr + b'\0' * (144 - len(attr))
    a = ctypes.create_string_buffer(attr)
    fd = libc.syscall(321, 5, a, len(attr))
    err = ctypes.get_errno()
    print(name, 'fd', fd, os.strerror(err) if fd < 0 else '', log.value.decode()[-300:].strip())
    if fd >= 0: os.close(fd)
base = [ins(0x7a, dst=10, off=-8, imm=0), ins(0xb7, dst=1, imm=0), ins(0xbf, dst=2, src=10), ins(0x07, dst=2, imm=-8), ins(0xb7, dst=3, imm=8)]
tail = [ins(0xb7, dst=0, imm=0), ins(0x95)]
load(base + [ins(0x85, imm=36)] + tail, 'probe_write_user(36)')
load(base + [ins(0x85, imm=112)] + tail, 'probe_read_user(112)  [control]')
