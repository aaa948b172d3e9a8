//! Logging set-up: to stderr, with syslog priority prefixes (`<3>`) when
//! stderr is systemd's journal stream, so journald records each line's level;
//! an error-chain printer that does not repeat causes already quoted; and the
//! systemd readiness notification.

use std::io::Write as _;

/// Initialises `log` (RUST_LOG overrides the default level, `info`).
pub fn init() {
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format(move |buf, record| {
            if journal {
                let prio = match record.level() {
                    log::Level::Error => 3,
                    log::Level::Warn => 4,
                    log::Level::Info => 6,
                    log::Level::Debug | log::Level::Trace => 7,
                };
                writeln!(buf, "<{prio}>{}", record.args())
            } else {
                writeln!(buf, "pftraced: {}: {}", record.level().as_str().to_lowercase(), record.args())
            }
        })
        .init();
}

/// `outer: inner: root`, skipping a cause whose text the previous message already contains.
pub fn chain(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Tells systemd the daemon is ready (`Type=notify`), when started by it:
/// sends `READY=1` to $NOTIFY_SOCKET. A no-op otherwise.
pub fn notify_ready() {
    use std::os::{
        linux::net::SocketAddrExt as _,
        unix::net::{SocketAddr, UnixDatagram},
    };
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let bytes = path.as_encoded_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(std::path::Path::new(&path)),
    };
    let sent = addr.and_then(|addr| UnixDatagram::unbound()?.send_to_addr(b"READY=1", &addr));
    if let Err(err) = sent {
        log::warn!("notifying systemd of readiness ({}): {err}", path.to_string_lossy());
    }
}
