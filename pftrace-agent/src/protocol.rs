//! The agent's control protocol with pftraced, over a Unix stream socket
//! served by pftraced (which checks the peer's credentials). Text lines, so a
//! person can read a capture:
//!
//! ```text
//! agent:     hello 1 pid=4242 python=3.12 report=syscall,uprobe
//! pftraced:  report syscall 5eed...        (how to report: one of those offered)
//! pftraced:  names 2                       (the whole set; then one name a line)
//! pftraced:  foo
//! pftraced:  app.py:test_*
//! agent:     ok 1                          (generation now in force)
//! ...        names N / ok G, again for every change
//! pftraced:  stop                          (or EOF: pftraced is gone)
//! ```
//!
//! EOF, a read error or `stop` all mean the same: stop reporting, free the
//! monitoring tool id and unregister every callback.

use std::io::{self, BufRead, Read as _, Write};

/// Protocol version in `hello`.
pub const VERSION: u32 = 1;
/// Most names in one set (pftraced's kernel map holds 4096).
pub const MAX_NAMES: usize = 4096;
/// Longest line accepted (a name, or a header).
pub const MAX_LINE: usize = 4096;

/// How matched calls are reported to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// Call the probe function pftraced has a uprobe on (270 ns a report
    /// with an empty program). Works everywhere; the fallback.
    Uprobe,
    /// Make the syscall pftrace_common::agent::SYSCALL_NR, which pftraced's
    /// raw tracepoint on sys_enter reads (103 ns a report with an empty
    /// program). Offered by an agent whose process has no seccomp filter
    /// (a filter may refuse, or kill for, an unknown syscall); an agent
    /// whose syscall does not come back -ENOSYS goes over to Uprobe. With
    /// the token to put in r9 (pftrace_common::task_layout::AGENT_TOKEN).
    Syscall(u64),
    /// Decide and keep the hooks, report nothing (benchmarks: the cost of
    /// the callbacks alone; a daemon could pause with it).
    None,
}

impl Report {
    pub fn as_str(self) -> &'static str {
        match self {
            Report::Uprobe => "uprobe",
            Report::Syscall(_) => "syscall",
            Report::None => "none",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "uprobe" => Some(Report::Uprobe),
            "none" => Some(Report::None),
            _ => None,
        }
    }
}

/// The agent's first line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub pid: u32,
    pub python: (u32, u32),
    /// The agent can report through its syscall (Report::Syscall); the
    /// probe function (Report::Uprobe) it always can.
    pub syscall: bool,
    /// The agent can take the batched road (`batch=1`): pftraced then
    /// answers first with [`SLOTS_LINE`] (the CPU slot map's fd attached,
    /// SCM_RIGHTS) or [`NO_SLOTS_LINE`].
    pub batch: bool,
}

/// pftraced's answer to `batch=1` when it offers the batched road (the
/// frozen CPU_SLOTS map's fd rides with it).
pub const SLOTS_LINE: &str = "slots\n";
/// pftraced's answer to `batch=1` when it does not.
pub const NO_SLOTS_LINE: &str = "slots none\n";

impl Hello {
    pub fn to_line(&self) -> String {
        let report = if self.syscall { "syscall,uprobe" } else { "uprobe" };
        format!(
            "hello {VERSION} pid={} python={}.{} report={report}{}\n",
            self.pid,
            self.python.0,
            self.python.1,
            if self.batch { " batch=1" } else { "" }
        )
    }

    pub fn parse(line: &str) -> Result<Self, ProtocolError> {
        let bad = || ProtocolError::Bad(line.chars().take(80).collect());
        let mut words = line.split_whitespace();
        if words.next() != Some("hello") || words.next() != Some("1") {
            return Err(bad());
        }
        let (mut pid, mut python, mut syscall, mut batch) = (None, None, false, false);
        for w in words {
            match w.split_once('=') {
                Some(("pid", v)) => pid = v.parse().ok(),
                Some(("python", v)) => {
                    python = v.split_once('.').and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
                }
                Some(("report", v)) => syscall = v.split(',').any(|r| r == "syscall"),
                Some(("batch", v)) => batch = v == "1",
                _ => {}
            }
        }
        Ok(Self { pid: pid.ok_or_else(bad)?, python: python.ok_or_else(bad)?, syscall, batch })
    }
}

/// What pftraced tells the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Report(Report),
    /// The whole set of traced names (the forms of pftrace's names module).
    Names(Vec<String>),
    Stop,
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("pftraced closed the connection")]
    Closed,
    #[error("malformed control line {0:?}")]
    Bad(String),
    #[error("control socket: {0}")]
    Io(#[from] io::Error),
}

impl Command {
    /// The lines of this command.
    pub fn to_lines(&self) -> String {
        match self {
            Command::Report(Report::Syscall(token)) => format!("report syscall {token:x}\n"),
            Command::Report(r) => format!("report {}\n", r.as_str()),
            Command::Names(names) => {
                let mut s = format!("names {}\n", names.len());
                for n in names {
                    s.push_str(n);
                    s.push('\n');
                }
                s
            }
            Command::Stop => "stop\n".into(),
        }
    }

    /// Reads one command (bounded: lines of at most MAX_LINE bytes, at most
    /// MAX_NAMES names).
    pub fn read(r: &mut impl BufRead) -> Result<Self, ProtocolError> {
        let line = read_line(r)?;
        let mut words = line.split_whitespace();
        let bad = || ProtocolError::Bad(line.chars().take(80).collect());
        match words.next() {
            Some("report") => match words.next() {
                Some("syscall") => {
                    let token = words.next().and_then(|t| u64::from_str_radix(t, 16).ok()).ok_or_else(bad)?;
                    Ok(Command::Report(Report::Syscall(token)))
                }
                m => Ok(Command::Report(m.and_then(Report::parse).ok_or_else(bad)?)),
            },
            Some("stop") => Ok(Command::Stop),
            Some("names") => {
                let n: usize = words.next().and_then(|n| n.parse().ok()).ok_or_else(bad)?;
                if n > MAX_NAMES {
                    return Err(bad());
                }
                let mut names = Vec::with_capacity(n);
                for _ in 0..n {
                    names.push(read_line(r)?);
                }
                Ok(Command::Names(names))
            }
            _ => Err(bad()),
        }
    }
}

/// One line without its newline; EOF before any byte is `Closed`.
pub fn read_line(r: &mut impl BufRead) -> Result<String, ProtocolError> {
    let mut buf = Vec::new();
    let n = r.by_ref().take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Err(ProtocolError::Closed);
    }
    if buf.last() != Some(&b'\n') {
        return Err(if n > MAX_LINE {
            ProtocolError::Bad(format!("line longer than {MAX_LINE} bytes"))
        } else {
            ProtocolError::Closed
        });
    }
    buf.pop();
    String::from_utf8(buf).map_err(|e| ProtocolError::Bad(String::from_utf8_lossy(e.as_bytes()).into()))
}

/// The agent's acknowledgement that generation `g` is in force.
pub fn ok_line(generation: u32) -> String {
    format!("ok {generation}\n")
}

/// Parses `ok G`.
pub fn parse_ok(line: &str) -> Option<u32> {
    line.strip_prefix("ok ")?.trim().parse().ok()
}

/// Writes all of `s`.
pub fn send(w: &mut impl Write, s: &str) -> io::Result<()> {
    w.write_all(s.as_bytes())?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for syscall in [false, true] {
            let h = Hello { pid: 42, python: (3, 12), syscall, batch: syscall };
            assert_eq!(Hello::parse(h.to_line().trim_end()).unwrap(), h);
        }
        let cmds = [
            Command::Report(Report::Uprobe),
            Command::Report(Report::Syscall(0x1234_5678_9abc_def0)),
            Command::Report(Report::None),
            Command::Names(vec!["foo".into(), "a.py:test_*".into()]),
            Command::Names(vec![]),
            Command::Stop,
        ];
        let text: String = cmds.iter().map(Command::to_lines).collect();
        let mut r = io::Cursor::new(text.into_bytes());
        for c in &cmds {
            assert_eq!(&Command::read(&mut r).unwrap(), c);
        }
        assert!(matches!(Command::read(&mut r), Err(ProtocolError::Closed)));
    }

    #[test]
    fn refuses_bad_input() {
        let read = |s: &str| Command::read(&mut io::Cursor::new(s.as_bytes().to_vec()));
        assert!(matches!(read("bogus\n"), Err(ProtocolError::Bad(_))));
        assert!(matches!(read("names 99999\n"), Err(ProtocolError::Bad(_))));
        assert!(matches!(read("report carrier-pigeon\n"), Err(ProtocolError::Bad(_))));
        assert!(matches!(read("report syscall\n"), Err(ProtocolError::Bad(_))));
        // A names header promising more lines than arrive: the peer closed.
        assert!(matches!(read("names 2\nfoo\n"), Err(ProtocolError::Closed)));
        assert!(matches!(read(&format!("{}\n", "x".repeat(MAX_LINE + 10))), Err(ProtocolError::Bad(_))));
        assert!(Hello::parse("hello 2 pid=1 python=3.12").is_err());
        assert!(Hello::parse("hello 1 python=3.12").is_err());
        assert_eq!(parse_ok("ok 7"), Some(7));
    }
}
