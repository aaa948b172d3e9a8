//! Converts the kernel's CLOCK_MONOTONIC timestamps (bpf_ktime_get_ns) to
//! wall-clock time, with one offset measured once, so every process's events
//! share one time base.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::time::ClockId;

/// A measured offset between CLOCK_REALTIME and CLOCK_MONOTONIC.
#[derive(Debug, Clone, Copy)]
pub struct WallClock {
    /// realtime_ns - monotonic_ns.
    offset_ns: i128,
}

fn now_ns(clock: ClockId) -> i128 {
    let ts = rustix::time::clock_gettime(clock);
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

impl WallClock {
    /// Measures the offset: realtime read between two monotonic reads, keeping
    /// the sample with the narrowest window of several.
    pub fn measure() -> Self {
        let mut best: Option<(i128, i128)> = None; // (window, offset)
        for _ in 0..16 {
            let m0 = now_ns(ClockId::Monotonic);
            let r = now_ns(ClockId::Realtime);
            let m1 = now_ns(ClockId::Monotonic);
            let window = m1 - m0;
            let offset = r - (m0 + window / 2);
            if best.is_none_or(|(w, _)| window < w) {
                best = Some((window, offset));
            }
        }
        Self { offset_ns: best.map_or(0, |(_, o)| o) }
    }

    /// Wall-clock nanoseconds since the Unix epoch for a monotonic timestamp.
    pub fn wall_ns(&self, monotonic_ns: u64) -> i128 {
        monotonic_ns as i128 + self.offset_ns
    }

    /// Wall-clock microseconds since the Unix epoch (Chrome trace `ts`).
    pub fn wall_us(&self, monotonic_ns: u64) -> f64 {
        self.wall_ns(monotonic_ns) as f64 / 1000.0
    }

    /// The current monotonic time in ns, on the clock the kernel stamps events with.
    pub fn monotonic_now_ns() -> u64 {
        now_ns(ClockId::Monotonic) as u64
    }

    /// The wall time for a monotonic timestamp as a SystemTime.
    pub fn system_time(&self, monotonic_ns: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.wall_ns(monotonic_ns).max(0) as u64)
    }
}
