//! A minimal HTTP/1.1 client for the broker's admin listener: one `GET`, `Connection: close`,
//! bounded by [`crate::TIMEOUT`]. Written here so the tests share no code with the broker's.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};

use crate::TIMEOUT;

/// An HTTP answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The header lines, as sent (`Name: value`).
    pub headers: Vec<String>,
    /// The body, as text.
    pub body: String,
}

impl Answer {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find_map(|h| {
            let (n, v) = h.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// `GET path` from `addr`, with `Authorization: Bearer <token>` if given. Panics on an I/O
/// error or an answer that is not HTTP.
pub fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> Answer {
    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)
        .unwrap_or_else(|e| panic!("cannot connect to the admin listener {addr}: {e}"));
    stream
        .set_read_timeout(Some(TIMEOUT))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(TIMEOUT))
        .expect("write timeout");
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut raw = String::new();
    stream
        .read_to_string(&mut raw)
        .unwrap_or_else(|e| panic!("GET {path}: cannot read the answer: {e}"));
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("GET {path}: not an HTTP answer: {raw:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("GET {path}: bad status line {status_line:?}"));
    Answer {
        status,
        headers: lines.map(str::to_owned).collect(),
        body: body.to_owned(),
    }
}
