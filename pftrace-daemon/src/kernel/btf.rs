//! A reader of raw kernel BTF: struct member offsets and sizes, type sizes
//! and enum values, by name. Nothing here knows pftrace's needs: that is
//! `task_layout.rs`. (aya-obj keeps its BTF accessors crate-private, and
//! btf-rs is LGPL.) Only the raw BTF format is handled (kernel `Documentation/bpf/btf.rst`). Lookups descend
//! into anonymous struct/union members and see through
//! typedef/const/volatile/restrict/type_tag chains.

use std::path::Path;

/// Where the running kernel exposes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

pub(super) const KIND_INT: u32 = 1;
pub(super) const KIND_PTR: u32 = 2;
pub(super) const KIND_ARRAY: u32 = 3;
pub(super) const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FWD: u32 = 7;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_FLOAT: u32 = 16;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// Bound on typedef chains and anonymous-member nesting (guards against cycles).
const MAX_DEPTH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error(
        "cannot read kernel BTF from {path}: {source} (pftrace needs a kernel built with CONFIG_DEBUG_INFO_BTF=y)"
    )]
    Read { path: String, source: std::io::Error },
    #[error("malformed BTF: {0}")]
    Malformed(String),
    #[error("kernel BTF has no type `{0}` (pftrace needs a kernel built with CONFIG_DEBUG_INFO_BTF=y)")]
    NoSuchType(String),
    #[error(
        "kernel BTF: `{ty}` has no member `{member}` (pftrace needs CONFIG_DEBUG_INFO_BTF=y and a kernel layout it knows)"
    )]
    NoSuchMember { ty: String, member: String },
    #[error("kernel BTF has no enumerator `{0}` (pftrace needs a kernel built with CONFIG_DEBUG_INFO_BTF=y)")]
    NoSuchEnumerator(String),
    #[error("unexpected kernel layout in BTF: {0}")]
    Layout(String),
}

pub(super) type Result<T> = std::result::Result<T, BtfError>;

fn malformed(msg: impl Into<String>) -> BtfError {
    BtfError::Malformed(msg.into())
}

/// Parsed BTF: the raw bytes plus the position of every type record.
pub struct Btf {
    data: Vec<u8>,
    big_endian: bool,
    /// `types[id]` is the byte position of type `id`'s record; `types[0]` (void) is unused.
    types: Vec<usize>,
    strings: std::ops::Range<usize>,
    ptr_size: u32,
}

impl std::fmt::Debug for Btf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Btf")
            .field("types", &self.type_count())
            .field("big_endian", &self.big_endian)
            .finish()
    }
}

/// One decoded `struct btf_type` header; `data` is where its kind-specific part starts.
#[derive(Clone, Copy)]
pub(super) struct Ty {
    name_off: u32,
    pub(super) kind: u32,
    kind_flag: bool,
    vlen: usize,
    pub(super) size_or_type: u32,
    data: usize,
}

#[derive(Clone, Copy)]
pub(super) struct Member {
    name_off: u32,
    pub(super) type_id: u32,
    pub(super) bit_offset: u32,
    pub(super) bitfield_size: u32,
}

/// A member found by [`Btf::member_offset`]-style lookups.
pub(super) struct Located {
    pub(super) offset: u32,
    pub(super) type_id: u32,
}

impl Btf {
    /// Reads the running kernel's BTF from [`VMLINUX_BTF`].
    pub fn from_sys() -> Result<Self> {
        Self::from_file(VMLINUX_BTF)
    }

    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let data = std::fs::read(path)
            .map_err(|source| BtfError::Read { path: path.display().to_string(), source })?;
        Self::from_vec(data)
    }

    pub fn parse(data: &[u8]) -> Result<Self> {
        Self::from_vec(data.to_vec())
    }

    fn from_vec(data: Vec<u8>) -> Result<Self> {
        let big_endian = match data.get(..2) {
            Some([0x9f, 0xeb]) => false,
            Some([0xeb, 0x9f]) => true,
            _ => return Err(malformed("bad magic (not a BTF file)")),
        };
        let mut btf = Btf { data, big_endian, types: vec![0], strings: 0..0, ptr_size: 8 };
        if btf.data.len() < 24 {
            return Err(malformed("truncated header"));
        }
        if btf.data[2] != 1 {
            return Err(malformed(format!("unsupported version {}", btf.data[2])));
        }
        let hdr_len = btf.u32(4) as usize;
        let section = |off: u32, len: u32| {
            let start = hdr_len.checked_add(off as usize);
            let end = start.and_then(|s| s.checked_add(len as usize));
            match (start, end) {
                (Some(start), Some(end)) if end <= btf.data.len() => Ok(start..end),
                _ => Err(malformed("section extends past the end of the data")),
            }
        };
        let type_sec = section(btf.u32(8), btf.u32(12))?;
        btf.strings = section(btf.u32(16), btf.u32(20))?;

        let mut pos = type_sec.start;
        while pos < type_sec.end {
            if pos + 12 > type_sec.end {
                return Err(malformed("truncated type record"));
            }
            let info = btf.u32(pos + 4);
            let vlen = (info & 0xffff) as usize;
            let extra = match (info >> 24) & 0x1f {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                kind => {
                    return Err(malformed(format!("type {} has unknown kind {kind}", btf.types.len())));
                }
            };
            btf.types.push(pos);
            pos += 12 + extra;
        }
        if pos != type_sec.end {
            return Err(malformed("last type record runs past the type section"));
        }
        // BTF does not record pointer size; like libbpf, take it from `long`.
        if let Some(id) = btf.find(|t, name| t.kind == KIND_INT && name == "long int") {
            btf.ptr_size = btf.ty(id)?.size_or_type;
        }
        Ok(btf)
    }

    /// Number of types, not counting void (id 0).
    pub fn type_count(&self) -> usize {
        self.types.len() - 1
    }

    /// Byte offset of `struct_name.path[0].path[1]...`, where each step may
    /// sit inside anonymous structs/unions. Bitfields are refused.
    pub fn member_offset(&self, struct_name: &str, path: &[&str]) -> Result<u32> {
        Ok(self.locate(struct_name, path)?.offset)
    }

    /// Size in bytes of the member at `path` (see [`Btf::member_offset`]).
    pub fn member_size(&self, struct_name: &str, path: &[&str]) -> Result<u32> {
        self.size_of(self.locate(struct_name, path)?.type_id)
    }

    /// Size in bytes of the named struct, union, enum, int, float or typedef.
    pub fn type_size(&self, name: &str) -> Result<u32> {
        let sized = [KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64, KIND_FLOAT, KIND_TYPEDEF];
        let id = self
            .find(|t, n| sized.contains(&t.kind) && n == name)
            .ok_or_else(|| BtfError::NoSuchType(name.to_string()))?;
        self.size_of(id)
    }

    /// Value of the enumerator `name`, searched in every enum (named or anonymous).
    pub fn enum_value(&self, name: &str) -> Result<i64> {
        for id in 1..self.types.len() as u32 {
            let t = self.ty(id)?;
            for i in 0..t.vlen {
                let value = match t.kind {
                    KIND_ENUM if self.name(self.u32(t.data + 8 * i)) == name => {
                        let raw = self.u32(t.data + 8 * i + 4);
                        if t.kind_flag { raw as i32 as i64 } else { raw as i64 }
                    }
                    KIND_ENUM64 if self.name(self.u32(t.data + 12 * i)) == name => {
                        let p = t.data + 12 * i;
                        ((self.u32(p + 8) as u64) << 32 | self.u32(p + 4) as u64) as i64
                    }
                    _ => continue,
                };
                return Ok(value);
            }
        }
        Err(BtfError::NoSuchEnumerator(name.to_string()))
    }

    fn u32(&self, pos: usize) -> u32 {
        let bytes: [u8; 4] = self.data[pos..pos + 4].try_into().expect("4 bytes");
        if self.big_endian { u32::from_be_bytes(bytes) } else { u32::from_le_bytes(bytes) }
    }

    /// The NUL-terminated string at `off` in the string section ("" if invalid).
    fn name(&self, off: u32) -> &str {
        let bytes = self.data[self.strings.clone()].get(off as usize..).unwrap_or_default();
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        std::str::from_utf8(&bytes[..end]).unwrap_or_default()
    }

    fn ty(&self, id: u32) -> Result<Ty> {
        let pos = match self.types.get(id as usize) {
            Some(&pos) if id != 0 => pos,
            _ => return Err(malformed(format!("reference to missing type id {id}"))),
        };
        let info = self.u32(pos + 4);
        Ok(Ty {
            name_off: self.u32(pos),
            kind: (info >> 24) & 0x1f,
            kind_flag: info >> 31 != 0,
            vlen: (info & 0xffff) as usize,
            size_or_type: self.u32(pos + 8),
            data: pos + 12,
        })
    }

    /// First type id for which `pred(type, name)` holds.
    fn find(&self, pred: impl Fn(&Ty, &str) -> bool) -> Option<u32> {
        (1..self.types.len() as u32).find(|&id| self.ty(id).is_ok_and(|t| pred(&t, self.name(t.name_off))))
    }

    /// Follows typedef/const/volatile/restrict/type_tag to the underlying type.
    pub(super) fn resolve(&self, mut id: u32) -> Result<(u32, Ty)> {
        for _ in 0..MAX_DEPTH {
            let t = self.ty(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type
                }
                _ => return Ok((id, t)),
            }
        }
        Err(malformed(format!("type chain from id {id} too long")))
    }

    pub(super) fn size_of(&self, id: u32) -> Result<u32> {
        let (_, t) = self.resolve(id)?;
        match t.kind {
            KIND_INT | KIND_STRUCT | KIND_UNION | KIND_ENUM | KIND_ENUM64 | KIND_FLOAT | KIND_DATASEC => {
                Ok(t.size_or_type)
            }
            KIND_PTR => Ok(self.ptr_size),
            KIND_ARRAY => {
                let (elem, n) = self.array(&t);
                self.size_of(elem)?.checked_mul(n).ok_or_else(|| malformed("array size overflows"))
            }
            kind => Err(BtfError::Layout(format!("type id {id} (kind {kind}) has no size"))),
        }
    }

    /// Element type and element count of an ARRAY.
    pub(super) fn array(&self, t: &Ty) -> (u32, u32) {
        (self.u32(t.data), self.u32(t.data + 8))
    }

    fn members(&self, t: &Ty) -> impl Iterator<Item = Member> + '_ {
        let (data, kind_flag) = (t.data, t.kind_flag);
        (0..t.vlen).map(move |i| {
            let p = data + 12 * i;
            let off = self.u32(p + 8);
            Member {
                name_off: self.u32(p),
                type_id: self.u32(p + 4),
                // With kind_flag set, the offset holds bitfield size << 24 | bit offset.
                bit_offset: if kind_flag { off & 0xff_ffff } else { off },
                bitfield_size: if kind_flag { off >> 24 } else { 0 },
            }
        })
    }

    /// Member `name` of struct/union `t`, looking inside anonymous members;
    /// the returned bit offset is relative to `t`.
    pub(super) fn find_member(&self, t: &Ty, name: &str, depth: usize) -> Result<Option<Member>> {
        if depth > MAX_DEPTH {
            return Err(malformed("anonymous members nested too deeply"));
        }
        for m in self.members(t) {
            let member_name = self.name(m.name_off);
            if member_name == name {
                return Ok(Some(m));
            }
            if member_name.is_empty() {
                let (_, inner) = self.resolve(m.type_id)?;
                if matches!(inner.kind, KIND_STRUCT | KIND_UNION)
                    && let Some(found) = self.find_member(&inner, name, depth + 1)?
                {
                    return Ok(Some(Member { bit_offset: m.bit_offset + found.bit_offset, ..found }));
                }
            }
        }
        Ok(None)
    }

    pub(super) fn locate(&self, struct_name: &str, path: &[&str]) -> Result<Located> {
        let mut id = self
            .find(|t, n| matches!(t.kind, KIND_STRUCT | KIND_UNION) && n == struct_name)
            .ok_or_else(|| BtfError::NoSuchType(format!("struct {struct_name}")))?;
        let mut bits = 0u64;
        let mut here = struct_name.to_string();
        for field in path {
            let (_, t) = self.resolve(id)?;
            if !matches!(t.kind, KIND_STRUCT | KIND_UNION) {
                return Err(BtfError::Layout(format!("`{here}` is not a struct or union")));
            }
            let m = self
                .find_member(&t, field, 0)?
                .ok_or_else(|| BtfError::NoSuchMember { ty: here.clone(), member: field.to_string() })?;
            here = format!("{here}.{field}");
            if m.bitfield_size != 0 || self.is_int_bitfield(m.type_id)? {
                return Err(BtfError::Layout(format!("`{here}` is a bitfield")));
            }
            bits += u64::from(m.bit_offset);
            id = m.type_id;
        }
        if !bits.is_multiple_of(8) {
            return Err(BtfError::Layout(format!("`{here}` is not byte-aligned")));
        }
        let offset = u32::try_from(bits / 8).map_err(|_| malformed("member offset overflows"))?;
        Ok(Located { offset, type_id: id })
    }

    /// Old-style bitfield: an INT whose encoding uses fewer bits than its size.
    fn is_int_bitfield(&self, id: u32) -> Result<bool> {
        let (_, t) = self.resolve(id)?;
        if t.kind != KIND_INT {
            return Ok(false);
        }
        let encoding = self.u32(t.data);
        Ok((encoding >> 16) & 0xff != 0 || encoding & 0xff != t.size_or_type * 8)
    }
}

/// Byte offsets the eBPF programs use to number a task in pftraced's own PID
/// namespace when that is not the host's (a container): the kernel's pid
/// and tgid are the host's.
///
/// `pid = *(task + thread_pid)` (the task's `struct pid`), its depth
/// `*(u32 *)(pid + pid_level)`; for each level `l` up to it, the `struct
/// upid` at `pid + pid_numbers + l * upid_size` holds the number
/// `*(i32 *)(upid + upid_nr)` in namespace `ns = *(upid + upid_ns)`, whose
/// nsfs inode (what `stat /proc/self/ns/pid` shows) is `*(u32 *)(ns +
/// ns_inum)`. The process (thread group) is numbered by its leader,
/// `*(task + group_leader)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PidNsOffsets {
    pub thread_pid: u32,
    pub group_leader: u32,
    pub pid_level: u32,
    pub pid_numbers: u32,
    pub upid_size: u32,
    pub upid_nr: u32,
    pub upid_ns: u32,
    pub ns_inum: u32,
}

impl PidNsOffsets {
    /// The eBPF programs' read-only globals for numbering tasks in the PID
    /// namespace whose nsfs inode is `ns_inode` (`pftrace_common::task_layout`).
    pub fn globals(&self, ns_inode: u32) -> [(&'static str, u32); 9] {
        use pftrace_common::task_layout;
        [
            (task_layout::PIDNS_INO, ns_inode),
            (task_layout::TASK_THREAD_PID, self.thread_pid),
            (task_layout::TASK_GROUP_LEADER, self.group_leader),
            (task_layout::PID_LEVEL, self.pid_level),
            (task_layout::PID_NUMBERS, self.pid_numbers),
            (task_layout::UPID_SIZE, self.upid_size),
            (task_layout::UPID_NR, self.upid_nr),
            (task_layout::UPID_NS, self.upid_ns),
            (task_layout::NS_INUM, self.ns_inum),
        ]
    }

    /// Reads the running kernel's BTF and works the offsets out.
    pub fn discover() -> Result<Self> {
        Self::from_btf(&Btf::from_sys()?)
    }

    pub fn from_btf(btf: &Btf) -> Result<Self> {
        let pointer = |ty: &str, path: &[&str]| -> Result<u32> {
            let found = btf.locate(ty, path)?;
            if btf.resolve(found.type_id)?.1.kind != KIND_PTR {
                return Err(BtfError::Layout(format!("{ty}.{} is not a pointer", path.join("."))));
            }
            Ok(found.offset)
        };
        let sized = |ty: &str, path: &[&str], size: u32| -> Result<u32> {
            let actual = btf.member_size(ty, path)?;
            if actual != size {
                let name = path.join(".");
                return Err(BtfError::Layout(format!("{ty}.{name} is {actual} bytes, expected {size}")));
            }
            btf.member_offset(ty, path)
        };
        let numbers = btf.locate("pid", &["numbers"])?;
        if btf.resolve(numbers.type_id)?.1.kind != KIND_ARRAY {
            return Err(BtfError::Layout("pid.numbers is not an array".into()));
        }
        Ok(PidNsOffsets {
            thread_pid: pointer("task_struct", &["thread_pid"])?,
            group_leader: pointer("task_struct", &["group_leader"])?,
            pid_level: sized("pid", &["level"], 4)?,
            pid_numbers: numbers.offset,
            upid_size: btf.type_size("upid")?,
            upid_nr: sized("upid", &["nr"], 4)?,
            upid_ns: pointer("upid", &["ns"])?,
            ns_inum: sized("pid_namespace", &["ns", "inum"], 4)?,
        })
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Raw BTF blobs built by hand, for the reader's tests and the layout's.
    use super::*;

    /// Builds raw BTF blobs by hand; type ids are handed out in order from 1.
    pub(crate) struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
        big_endian: bool,
    }

    impl Builder {
        pub(crate) fn new(big_endian: bool) -> Self {
            Builder { types: Vec::new(), strings: vec![0], next_id: 1, big_endian }
        }
        fn put(&mut self, v: u32) {
            let bytes = if self.big_endian { v.to_be_bytes() } else { v.to_le_bytes() };
            self.types.extend(bytes);
        }
        fn string(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend(s.bytes().chain([0]));
            off
        }
        fn head(&mut self, name: &str, kind: u32, kind_flag: bool, vlen: u32, size_or_type: u32) -> u32 {
            let name_off = self.string(name);
            self.put(name_off);
            self.put(u32::from(kind_flag) << 31 | kind << 24 | vlen);
            self.put(size_or_type);
            self.next_id += 1;
            self.next_id - 1
        }
        pub(crate) fn int(&mut self, name: &str, size: u32) -> u32 {
            let id = self.head(name, KIND_INT, false, 0, size);
            self.put(size * 8);
            id
        }
        pub(crate) fn refer(&mut self, kind: u32, name: &str, target: u32) -> u32 {
            self.head(name, kind, false, 0, target)
        }
        pub(crate) fn array(&mut self, elem: u32, index: u32, n: u32) -> u32 {
            let id = self.head("", KIND_ARRAY, false, 0, 0);
            [elem, index, n].into_iter().for_each(|v| self.put(v));
            id
        }
        /// `members`: (name, type, raw offset field).
        pub(crate) fn composite(
            &mut self,
            kind: u32,
            name: &str,
            size: u32,
            kind_flag: bool,
            members: &[(&str, u32, u32)],
        ) -> u32 {
            let id = self.head(name, kind, kind_flag, members.len() as u32, size);
            for &(name, ty, off) in members {
                let name_off = self.string(name);
                [name_off, ty, off].into_iter().for_each(|v| self.put(v));
            }
            id
        }
        fn enumeration(&mut self, name: &str, values: &[(&str, i32)]) -> u32 {
            let id = self.head(name, KIND_ENUM, true, values.len() as u32, 4);
            for &(name, v) in values {
                let name_off = self.string(name);
                self.put(name_off);
                self.put(v as u32);
            }
            id
        }
        /// Records of kinds we only need to skip correctly.
        fn fillers(&mut self, int: u32) {
            let proto = self.head("", KIND_FUNC_PROTO, false, 2, int);
            (0..4).for_each(|_| self.put(0));
            self.refer(KIND_FUNC, "some_func", proto);
            self.head("some_var", KIND_VAR, false, 0, int);
            self.put(1);
            let var = self.next_id - 1;
            self.head(".data", KIND_DATASEC, false, 1, 8);
            [var, 0, 4].into_iter().for_each(|v| self.put(v));
            self.head("tag", KIND_DECL_TAG, false, 0, proto);
            self.put(u32::MAX);
            self.refer(KIND_TYPE_TAG, "user", int);
            self.head("double", KIND_FLOAT, false, 0, 8);
            self.refer(KIND_FWD, "opaque", 0);
            self.head("big", KIND_ENUM64, false, 1, 8);
            let name_off = self.string("BIG_VALUE");
            [name_off, 2, 1].into_iter().for_each(|v| self.put(v));
            self.refer(KIND_RESTRICT, "", int);
        }
        pub(crate) fn build(self) -> Vec<u8> {
            let mut out = if self.big_endian { vec![0xeb, 0x9f, 1, 0] } else { vec![0x9f, 0xeb, 1, 0] };
            let type_len = self.types.len() as u32;
            for v in [24, 0, type_len, type_len, self.strings.len() as u32] {
                out.extend(if self.big_endian { v.to_be_bytes() } else { v.to_le_bytes() });
            }
            out.extend(self.types);
            out.extend(self.strings);
            out
        }
    }

    /// A miniature kernel: task_struct with bitfields and a typedef/const/volatile
    /// chain, mm_struct wrapped in an anonymous struct holding an anonymous union.
    pub(crate) fn fixture(new_rss_layout: bool, big_endian: bool) -> Vec<u8> {
        let mut b = Builder::new(big_endian);
        let int = b.int("int", 4);
        let uint = b.int("unsigned int", 4);
        let long = b.int("long int", 8);
        let llong = b.int("long long int", 8);
        b.fillers(int);
        let s64 = b.refer(KIND_TYPEDEF, "s64", llong);
        let u64_ = b.refer(KIND_TYPEDEF, "u64", llong);
        let kpid = b.refer(KIND_TYPEDEF, "__kernel_pid_t", int);
        let pid_t = b.refer(KIND_TYPEDEF, "pid_t", kpid);
        let se = b.composite(
            KIND_STRUCT,
            "sched_entity",
            24,
            false,
            &[("load", long, 0), ("on_rq", uint, 64), ("sum_exec_runtime", u64_, 128)],
        );
        let se_const = b.refer(KIND_CONST, "", se);
        let se_volatile = b.refer(KIND_VOLATILE, "", se_const);
        let se_t = b.refer(KIND_TYPEDEF, "se_t", se_volatile);
        b.enumeration(
            "",
            &[
                ("MM_FILEPAGES", 0),
                ("MM_ANONPAGES", 1),
                ("MM_SWAPENTS", 2),
                ("MM_SHMEMPAGES", 3),
                ("NR_MM_COUNTERS", 4),
            ],
        );
        b.enumeration("signed_enum", &[("NEGATIVE", -5)]);
        let rss_stat = if new_rss_layout {
            let pcc = b.composite(
                KIND_STRUCT,
                "percpu_counter",
                40,
                false,
                &[("lock", int, 0), ("count", s64, 64), ("list", long, 128), ("counters", long, 256)],
            );
            b.array(pcc, int, 4)
        } else {
            let atomic64 = b.composite(KIND_STRUCT, "", 8, false, &[("counter", s64, 0)]);
            let atomic64_t = b.refer(KIND_TYPEDEF, "atomic64_t", atomic64);
            let atomic_long_t = b.refer(KIND_TYPEDEF, "atomic_long_t", atomic64_t);
            let counts = b.array(atomic_long_t, int, 4);
            b.composite(KIND_STRUCT, "mm_rss_stat", 32, false, &[("count", counts, 0)])
        };
        let union = b.composite(KIND_UNION, "", 8, false, &[("x", int, 0), ("y", long, 0)]);
        let anon = b.composite(
            KIND_STRUCT,
            "",
            176,
            false,
            &[("mm_count", int, 0), ("", union, 64), ("rss_stat", rss_stat, 128)],
        );
        let mm = b.composite(
            KIND_STRUCT,
            "mm_struct",
            184,
            false,
            &[("", anon, 0), ("cpu_bitmap", long, 176 * 8)],
        );
        let mm_ptr = b.refer(KIND_PTR, "", mm);
        let atomic = b.composite(KIND_STRUCT, "", 4, false, &[("counter", int, 0)]);
        let atomic_t = b.refer(KIND_TYPEDEF, "atomic_t", atomic);
        let signal = b.composite(
            KIND_STRUCT,
            "signal_struct",
            24,
            false,
            &[("sigcnt", long, 0), ("nr_threads", int, 64), ("live", atomic_t, 96)],
        );
        let signal_ptr = b.refer(KIND_PTR, "", signal);
        b.composite(
            KIND_STRUCT,
            "task_struct",
            56,
            true,
            &[
                ("flags", uint, 0),
                ("in_execve", uint, 1 << 24 | 32),
                ("in_iowait", uint, 1 << 24 | 33),
                ("se", se_t, 64),
                ("mm", mm_ptr, 256),
                ("pid", pid_t, 320),
                ("tgid", pid_t, 352),
                ("signal", signal_ptr, 384),
            ],
        );
        b.build()
    }
}

#[cfg(test)]
mod tests {
    use super::{
        testing::{Builder, fixture},
        *,
    };

    #[test]
    fn lookups_in_a_hand_built_blob() {
        let btf = Btf::parse(&fixture(true, false)).unwrap();
        assert_eq!(btf.type_count(), 35);
        assert_eq!(btf.member_offset("task_struct", &["se", "sum_exec_runtime"]).unwrap(), 24);
        assert_eq!(btf.member_offset("task_struct", &["se"]).unwrap(), 8);
        assert_eq!(btf.member_offset("mm_struct", &["y"]).unwrap(), 8);
        assert_eq!(btf.member_offset("mm_struct", &["rss_stat"]).unwrap(), 16);
        assert_eq!(btf.member_offset("mm_struct", &["cpu_bitmap"]).unwrap(), 176);
        assert_eq!(btf.member_size("task_struct", &["pid"]).unwrap(), 4);
        assert_eq!(btf.member_size("task_struct", &["mm"]).unwrap(), 8);
        assert_eq!(btf.member_offset("signal_struct", &["live", "counter"]).unwrap(), 12);
        assert_eq!(btf.member_size("mm_struct", &["rss_stat"]).unwrap(), 160);
        assert_eq!(btf.type_size("pid_t").unwrap(), 4);
        assert_eq!(btf.type_size("sched_entity").unwrap(), 24);
        assert_eq!(btf.enum_value("MM_SHMEMPAGES").unwrap(), 3);
        assert_eq!(btf.enum_value("NEGATIVE").unwrap(), -5);
        assert_eq!(btf.enum_value("BIG_VALUE").unwrap(), 1 << 32 | 2);
    }

    #[test]
    fn errors_name_what_is_missing() {
        let btf = Btf::parse(&fixture(true, false)).unwrap();
        let err = btf.member_offset("task_struct", &["se", "nope"]).unwrap_err().to_string();
        assert!(
            err.contains("task_struct.se") && err.contains("`nope`") && err.contains("CONFIG_DEBUG_INFO_BTF"),
            "{err}"
        );
        let err = btf.member_offset("no_such_struct", &["x"]).unwrap_err().to_string();
        assert!(err.contains("no_such_struct") && err.contains("CONFIG_DEBUG_INFO_BTF"), "{err}");
        let err = btf.member_offset("task_struct", &["in_iowait"]).unwrap_err().to_string();
        assert!(err.contains("bitfield"), "{err}");
        assert!(
            btf.member_offset("task_struct", &["mm", "rss_stat"]).is_err(),
            "no walking through pointers"
        );
        assert!(btf.enum_value("MM_NOPE").unwrap_err().to_string().contains("MM_NOPE"));
        let err = Btf::from_file("/nonexistent/vmlinux").err().unwrap().to_string();
        assert!(err.contains("/nonexistent/vmlinux") && err.contains("CONFIG_DEBUG_INFO_BTF"), "{err}");
    }

    #[test]
    fn rejects_malformed_blobs() {
        let good = fixture(true, false);
        assert!(Btf::parse(&good[..10]).is_err());
        assert!(Btf::parse(b"\x7fELF and so on, not BTF at all").is_err());
        let mut truncated = good.clone();
        truncated[12..16].copy_from_slice(&((good.len() as u32).to_le_bytes())); // type_len too big
        assert!(Btf::parse(&truncated).is_err());
        let mut unknown_kind = good.clone();
        unknown_kind[24 + 7] = 30; // first type's kind byte
        assert!(Btf::parse(&unknown_kind).unwrap_err().to_string().contains("unknown kind"));
    }

    /// A miniature of the PID namespace structures, with `upid` behind a
    /// typedef and `inum` inside an anonymous member of `ns_common`.
    #[test]
    fn pid_namespace_offsets_in_a_hand_built_blob() {
        let mut b = Builder::new(false);
        let int = b.int("int", 4);
        let uint = b.int("unsigned int", 4);
        b.int("long int", 8);
        let pidns_fwd = b.refer(KIND_FWD, "pid_namespace", 0);
        let pidns_ptr = b.refer(KIND_PTR, "", pidns_fwd);
        let upid = b.composite(KIND_STRUCT, "upid", 16, false, &[("nr", int, 0), ("ns", pidns_ptr, 64)]);
        let numbers = b.array(upid, int, 0);
        let pid = b.composite(
            KIND_STRUCT,
            "pid",
            96,
            false,
            &[("count", int, 0), ("level", uint, 32), ("stashed", int, 64), ("numbers", numbers, 640)],
        );
        let pid_ptr = b.refer(KIND_PTR, "", pid);
        let inner = b.composite(KIND_STRUCT, "", 8, false, &[("ops", int, 0), ("inum", uint, 32)]);
        let ns_common =
            b.composite(KIND_STRUCT, "ns_common", 24, false, &[("stashed", int, 0), ("", inner, 64)]);
        b.composite(KIND_STRUCT, "pid_namespace", 64, false, &[("idr", int, 0), ("ns", ns_common, 256)]);
        let task_fwd = b.refer(KIND_FWD, "task_struct", 0);
        let task_ptr = b.refer(KIND_PTR, "", task_fwd);
        b.composite(
            KIND_STRUCT,
            "task_struct",
            64,
            false,
            &[("flags", uint, 0), ("group_leader", task_ptr, 128), ("thread_pid", pid_ptr, 256)],
        );
        let btf = Btf::parse(&b.build()).unwrap();
        let o = PidNsOffsets::from_btf(&btf).unwrap();
        assert_eq!(
            o,
            PidNsOffsets {
                thread_pid: 32,
                group_leader: 16,
                pid_level: 4,
                pid_numbers: 80,
                upid_size: 16,
                upid_nr: 0,
                upid_ns: 8,
                ns_inum: 44,
            }
        );
        assert_eq!(o.globals(7)[0], (pftrace_common::task_layout::PIDNS_INO, 7));
        // The hand-built task layout fixture has no struct pid: named in the error.
        let err = PidNsOffsets::from_btf(&Btf::parse(&fixture(true, false)).unwrap()).unwrap_err();
        assert!(err.to_string().contains("pid"), "{err}");
    }

    /// Plausibility only: exact offsets differ between kernel builds.
    #[test]
    fn pid_namespace_offsets_of_the_running_kernel() {
        let btf = Btf::from_sys().unwrap();
        let task_size = btf.type_size("task_struct").unwrap();
        let p = PidNsOffsets::discover().unwrap();
        eprintln!("{p:?}");
        assert!(p.upid_size >= 12 && p.upid_ns + 8 <= p.upid_size && p.upid_nr + 4 <= p.upid_size, "{p:?}");
        assert!(p.pid_numbers >= p.pid_level + 4, "numbers is struct pid's last member: {p:?}");
        for off in [p.thread_pid, p.group_leader] {
            assert!(off % 8 == 0 && off + 8 <= task_size, "{p:?}");
        }
    }
}
