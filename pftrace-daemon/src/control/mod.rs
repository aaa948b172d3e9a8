//! The control socket: [`server`] is pftraced's side (accepts, checks the
//! peer, frames requests and replies, hands commands to the daemon over a
//! channel), [`client`] is pftracectl's (blocking, one request per
//! connection, retried while the daemon is busy), [`stream`] carries a
//! dump's body. The wire format is in [`crate::protocol`]; the framing
//! rules both sides share live here.

pub mod client;
pub mod server;
pub mod stream;

pub use client::{ClientError, DumpDone, dump, request, request_result};
pub use server::{ControlError, ControlRequest, ControlServer, Handled, PeerCred};

use crate::protocol::{MAX_REQUEST_BYTES, PROTOCOL_VERSION, Reply, Request};

/// Reply lines longer than this are refused by the client (a status of
/// thousands of processes is a few MiB; this only stops a runaway peer).
pub const MAX_REPLY_LINE_BYTES: usize = 256 << 20;

/// Parses one request line (without its `\n`). The version is checked
/// before the command, so a newer client gets a version error rather than a
/// confusing "unknown command". The error is the message to send back.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    if line.len() >= MAX_REQUEST_BYTES {
        return Err(format!("request larger than {MAX_REQUEST_BYTES} bytes"));
    }
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("malformed request (not one line of JSON): {e}"))?;
    match value.get("version").map(serde_json::Value::as_u64) {
        None => {
            return Err("malformed request: no \"version\" field; expected \
                        {\"version\":1,\"command\":{...}}"
                .into());
        }
        Some(Some(v)) if v == u64::from(PROTOCOL_VERSION) => {}
        Some(other) => {
            let shown = other.map_or_else(|| value["version"].to_string(), |v| v.to_string());
            return Err(format!(
                "protocol version {shown} is not supported; this pftraced speaks {PROTOCOL_VERSION}; \
                 use the pftracectl shipped with it"
            ));
        }
    }
    serde_json::from_value(value).map_err(|e| format!("malformed request: {e}"))
}

/// A reply as one line of JSON ending in `\n`.
pub fn reply_line(reply: &Reply) -> Vec<u8> {
    let mut line = serde_json::to_vec(reply).unwrap_or_else(|e| {
        // A Value always serialises; keep the framing valid regardless.
        serde_json::to_vec(&Reply::err(format!("internal error serialising the reply: {e}")))
            .unwrap_or_default()
    });
    line.push(b'\n');
    line
}

/// A request as one line of JSON ending in `\n`.
pub fn request_line(request: &Request) -> Vec<u8> {
    let mut line = serde_json::to_vec(request).expect("a Request always serialises");
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Command;

    #[test]
    fn parses_a_valid_request() {
        let req = parse_request(br#"{"version":2,"command":{"cmd":"status"}}"#).unwrap();
        assert_eq!(req.command, Command::Status {});
        let line = request_line(&req);
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(parse_request(&line[..line.len() - 1]).unwrap().command, Command::Status {});
    }

    #[test]
    fn errors_name_what_was_wrong() {
        let e = parse_request(b"hello").unwrap_err();
        assert!(e.starts_with("malformed request (not one line of JSON): expected value"), "{e}");
        let e = parse_request(br#"{"version":2,"comm"#).unwrap_err();
        assert!(e.contains("EOF while parsing"), "{e}");
        let e = parse_request(br#"{"version":1,"command":{"cmd":"teleport"}}"#).unwrap_err();
        assert_eq!(
            e,
            "protocol version 1 is not supported; this pftraced speaks 2; use the pftracectl shipped with it"
        );
        let e = parse_request(br#"{"version":"one","command":{"cmd":"status"}}"#).unwrap_err();
        assert!(e.starts_with("protocol version \"one\" is not supported"), "{e}");
        let e = parse_request(br#"{"command":{"cmd":"status"}}"#).unwrap_err();
        assert!(e.contains("no \"version\" field"), "{e}");
        let e = parse_request(br#"{"version":2,"command":{"cmd":"reboot"}}"#).unwrap_err();
        assert!(e.starts_with("malformed request: unknown variant `reboot`"), "{e}");
        let e = parse_request(&vec![b' '; MAX_REQUEST_BYTES]).unwrap_err();
        assert_eq!(e, "request larger than 65536 bytes");
    }

    #[test]
    fn reply_is_one_line() {
        let line = reply_line(&Reply::ok(serde_json::json!({"a": "x\ny"})));
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(line.last(), Some(&b'\n'));
    }
}
