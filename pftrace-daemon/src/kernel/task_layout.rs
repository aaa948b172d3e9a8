//! The kernel offsets pftrace's eBPF programs need, worked out from BTF.
//!
//! The programs are written in Rust and have no CO-RE relocations, so they
//! read kernel memory (`bpf_probe_read_kernel` from `bpf_get_current_task()`)
//! at byte offsets that user space works out here and passes in as
//! load-time constants (`pftrace_common::task_layout`).

use super::btf::{Btf, BtfError, KIND_ARRAY, KIND_INT, KIND_PTR, KIND_STRUCT, Result};

/// Where the per-mm RSS counters live: counter `i` (a signed 64-bit page
/// count, possibly slightly negative or stale) is at `mm + base + i * stride + count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RssLayout {
    pub base: u32,
    pub stride: u32,
    pub count: u32,
    /// Number of counters (NR_MM_COUNTERS, the array length).
    pub counters: u32,
}

impl RssLayout {
    /// Handles both `struct percpu_counter rss_stat[NR_MM_COUNTERS]` (6.2+)
    /// and the older `struct mm_rss_stat { atomic_long_t count[NR_MM_COUNTERS]; }`.
    pub fn from_btf(btf: &Btf) -> Result<Self> {
        let rss = btf.locate("mm_struct", &["rss_stat"])?;
        let (_, t) = btf.resolve(rss.type_id)?;
        let (base, array_ty) = match t.kind {
            KIND_ARRAY => (rss.offset, t),
            KIND_STRUCT => {
                let m = btf.find_member(&t, "count", 0)?.ok_or_else(|| BtfError::NoSuchMember {
                    ty: "mm_struct.rss_stat".into(),
                    member: "count".into(),
                })?;
                let (_, inner) = btf.resolve(m.type_id)?;
                (rss.offset + m.bit_offset / 8, inner)
            }
            kind => {
                return Err(BtfError::Layout(format!("mm_struct.rss_stat has kind {kind}")));
            }
        };
        if array_ty.kind != KIND_ARRAY {
            return Err(BtfError::Layout("mm_struct.rss_stat counters are not an array".into()));
        }
        let (elem, counters) = btf.array(&array_ty);
        let (count, size) = counter_in(btf, elem)?;
        if size != 8 {
            return Err(BtfError::Layout(format!("RSS counter is {size} bytes, expected 8")));
        }
        Ok(RssLayout { base, stride: btf.size_of(elem)?, count, counters })
    }
}

/// Byte offsets the eBPF programs use to read a thread's CPU time and its
/// process's RSS starting from `bpf_get_current_task()`.
///
/// CPU time (ns, u64): `*(task + se_sum_exec_runtime)`.
/// RSS (pages): with `mm = *(task + mm)` (NULL for kernel threads), the sum over
/// `i` in {mm_filepages, mm_anonpages, mm_shmempages} of the s64 at
/// `mm + rss_stat + i * rss_stride + rss_count`, each clamped at 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskOffsets {
    pub se_sum_exec_runtime: u32,
    pub mm: u32,
    /// `task_struct.pid` and `task_struct.tgid` (pid_t, 4 bytes each).
    pub pid: u32,
    pub tgid: u32,
    pub rss_stat: u32,
    pub rss_stride: u32,
    pub rss_count: u32,
    pub mm_filepages: u32,
    pub mm_anonpages: u32,
    pub mm_shmempages: u32,
    /// `task_struct.signal` (a pointer) and the counter of
    /// `signal_struct.live` (threads of the group not yet exiting, int):
    /// the exit program tells a process's last thread by it.
    pub signal: u32,
    pub signal_live: u32,
}

impl TaskOffsets {
    /// The eBPF programs' read-only globals these offsets set
    /// (`pftrace_common::task_layout`), as (name, value).
    pub fn globals(&self) -> [(&'static str, u32); 11] {
        use pftrace_common::task_layout;
        [
            (task_layout::SUM_EXEC, self.se_sum_exec_runtime),
            (task_layout::MM, self.mm),
            (task_layout::TASK_PID, self.pid),
            (task_layout::TASK_TGID, self.tgid),
            (task_layout::RSS_BASE, self.rss_stat + self.rss_count),
            (task_layout::RSS_STRIDE, self.rss_stride),
            (task_layout::RSS_FILE, self.mm_filepages),
            (task_layout::RSS_ANON, self.mm_anonpages),
            (task_layout::RSS_SHMEM, self.mm_shmempages),
            (task_layout::TASK_SIGNAL, self.signal),
            (task_layout::SIGNAL_LIVE, self.signal_live),
        ]
    }

    /// Reads the running kernel's BTF and works the offsets out.
    pub fn discover() -> Result<Self> {
        Self::from_btf(&Btf::from_sys()?)
    }

    pub fn from_btf(btf: &Btf) -> Result<Self> {
        let field = |path: &[&str], size: u32| -> Result<u32> {
            let actual = btf.member_size("task_struct", path)?;
            if actual != size {
                let name = path.join(".");
                return Err(BtfError::Layout(format!(
                    "task_struct.{name} is {actual} bytes, expected {size}"
                )));
            }
            btf.member_offset("task_struct", path)
        };
        let mm = btf.locate("task_struct", &["mm"])?;
        if btf.resolve(mm.type_id)?.1.kind != KIND_PTR {
            return Err(BtfError::Layout("task_struct.mm is not a pointer".into()));
        }
        let signal = btf.locate("task_struct", &["signal"])?;
        if btf.resolve(signal.type_id)?.1.kind != KIND_PTR {
            return Err(BtfError::Layout("task_struct.signal is not a pointer".into()));
        }
        let live = btf.member_size("signal_struct", &["live", "counter"])?;
        if live != 4 {
            return Err(BtfError::Layout(format!("signal_struct.live.counter is {live} bytes, expected 4")));
        }
        let rss = RssLayout::from_btf(btf)?;
        let index = |name: &str| -> Result<u32> {
            match btf.enum_value(name)? {
                v if (0..i64::from(rss.counters)).contains(&v) => Ok(v as u32),
                v => Err(BtfError::Layout(format!("{name} = {v} is outside rss_stat[{}]", rss.counters))),
            }
        };
        Ok(TaskOffsets {
            se_sum_exec_runtime: field(&["se", "sum_exec_runtime"], 8)?,
            mm: mm.offset,
            pid: field(&["pid"], 4)?,
            tgid: field(&["tgid"], 4)?,
            rss_stat: rss.base,
            rss_stride: rss.stride,
            rss_count: rss.count,
            mm_filepages: index("MM_FILEPAGES")?,
            mm_anonpages: index("MM_ANONPAGES")?,
            mm_shmempages: index("MM_SHMEMPAGES")?,
            signal: signal.offset,
            signal_live: btf.member_offset("signal_struct", &["live", "counter"])?,
        })
    }
}

/// Offset and size of the counter value inside one RSS counter element:
/// `percpu_counter.count` (s64), `atomic_long_t.counter` (long) or a bare integer.
fn counter_in(btf: &Btf, elem: u32) -> Result<(u32, u32)> {
    let (_, t) = btf.resolve(elem)?;
    match t.kind {
        KIND_INT => Ok((0, t.size_or_type)),
        KIND_STRUCT => {
            for name in ["count", "counter"] {
                if let Some(m) = btf.find_member(&t, name, 0)? {
                    if m.bitfield_size != 0 || m.bit_offset % 8 != 0 {
                        break;
                    }
                    return Ok((m.bit_offset / 8, btf.size_of(m.type_id)?));
                }
            }
            Err(BtfError::NoSuchMember { ty: "mm_struct.rss_stat element".into(), member: "count".into() })
        }
        kind => Err(BtfError::Layout(format!("mm_struct.rss_stat element has kind {kind}"))),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::kernel::btf::{VMLINUX_BTF, testing::fixture};

    #[test]
    fn offsets_in_a_hand_built_blob() {
        let btf = Btf::parse(&fixture(true, false)).unwrap();
        let offsets = TaskOffsets::from_btf(&btf).unwrap();
        assert_eq!(
            offsets,
            TaskOffsets {
                se_sum_exec_runtime: 24,
                mm: 32,
                pid: 40,
                tgid: 44,
                rss_stat: 16,
                rss_stride: 40,
                rss_count: 8,
                mm_filepages: 0,
                mm_anonpages: 1,
                mm_shmempages: 3,
                signal: 48,
                signal_live: 12,
            }
        );
    }

    #[test]
    fn old_rss_layout_and_big_endian() {
        let btf = Btf::parse(&fixture(false, true)).unwrap();
        let rss = RssLayout::from_btf(&btf).unwrap();
        assert_eq!(rss, RssLayout { base: 16, stride: 8, count: 0, counters: 4 });
        let offsets = TaskOffsets::from_btf(&btf).unwrap();
        assert_eq!((offsets.se_sum_exec_runtime, offsets.mm, offsets.rss_stride), (24, 32, 8));
    }

    /// Checks plausibility only: exact offsets differ between kernel builds.
    #[test]
    fn running_kernel() {
        assert!(
            Path::new(VMLINUX_BTF).exists(),
            "{VMLINUX_BTF} is missing: pftrace needs a kernel built with CONFIG_DEBUG_INFO_BTF=y"
        );
        let btf = Btf::from_sys().unwrap();
        assert!(btf.type_count() > 10_000);
        let o = TaskOffsets::discover().unwrap();
        eprintln!("{o:?}");
        let task_size = btf.type_size("task_struct").unwrap();
        let se = btf.member_offset("task_struct", &["se"]).unwrap();
        let sum = btf.member_offset("sched_entity", &["sum_exec_runtime"]).unwrap();
        assert_eq!(o.se_sum_exec_runtime, se + sum);
        for off in [o.se_sum_exec_runtime, o.mm, o.signal] {
            assert!(off % 8 == 0 && off + 8 <= task_size, "{o:?}");
        }
        assert_eq!(o.tgid, o.pid + 4, "pid and tgid are adjacent in every kernel so far");
        assert!(o.signal_live.is_multiple_of(4) && o.signal_live < btf.type_size("signal_struct").unwrap());
        assert!(o.rss_stat.is_multiple_of(8) && o.rss_stat < btf.type_size("mm_struct").unwrap());
        assert!(o.rss_stride >= 8 && o.rss_count + 8 <= o.rss_stride, "{o:?}");
        if let Ok(size) = btf.type_size("percpu_counter")
            && btf.type_size("mm_rss_stat").is_err()
        {
            assert_eq!(o.rss_stride, size, "6.2+ layout: rss_stat[] of percpu_counter");
        }
        let mut indices = [o.mm_filepages, o.mm_anonpages, o.mm_shmempages];
        indices.sort();
        assert!(indices.windows(2).all(|w| w[0] < w[1]) && indices[2] < 8, "{o:?}");
    }
}
