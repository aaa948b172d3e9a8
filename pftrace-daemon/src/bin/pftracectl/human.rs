//! Human-readable sizes and durations for pftracectl's summaries.

pub use pftrace::output::summary::human_ns;

/// `512 B`, `4.0 KiB`, `12.3 MiB`, `1.50 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `45s`, `12m 03s`, `5h 02m`, `3d 04h`.
pub fn uptime(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(4096), "4.0 KiB");
        assert_eq!(bytes(5 << 20), "5.0 MiB");
        assert_eq!(uptime(59.9), "59s");
        assert_eq!(uptime(723.0), "12m 03s");
        assert_eq!(uptime(18_120.0), "5h 02m");
        assert_eq!(uptime(273_600.0), "3d 04h");
    }
}
