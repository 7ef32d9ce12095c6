//! HTTP/1.1 as the admin listener speaks it: reading one request, bounded, and writing one
//! answer; and the query strings of its endpoints.
//!
//! A request is read in two steps. [`read_request`] reads the head (request line and headers,
//! parsed by `httparse`): at most `admin.max_request_bytes` of it (431 past it). The body is read
//! only when an endpoint asks for it ([`Request::body`]), after the token was checked and the
//! path and method matched, so an unauthorized client never makes the node read its body: it
//! must declare its length (`Content-Length`; 411 without; chunked bodies are not read), which
//! may be at most `admin.max_body_bytes` (413 past it, answered without reading it). The whole
//! request, head and body, must arrive within `admin.request_timeout_ms` of the connection's
//! start (408 past it).
//!
//! A body left unread (refused, or sent to an endpoint that reads none) is drained for a moment
//! after the answer ([`linger`]), so the client reads the answer instead of a connection reset.

use std::io::{self, Read as _, Write as _};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Most headers a request may have (431 past it).
pub(super) const MAX_HEADERS: usize = 32;

/// Longest a connection is drained after its answer when its body was not read.
const LINGER: Duration = Duration::from_secs(2);

/// Most bytes drained after an answer when the body was not read.
const LINGER_MAX_BYTES: usize = 1 << 20;

/// Why a request cannot be served, at the HTTP level: the caller renders it (as text, or as the
/// JSON API's error object).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct HttpError {
    /// The status code.
    pub(super) status: u16,
    /// What to tell the client.
    pub(super) message: String,
}

impl HttpError {
    /// An error with `status` saying `message`.
    pub(super) fn new(status: u16, message: impl Into<String>) -> HttpError {
        HttpError {
            status,
            message: message.into(),
        }
    }
}

/// A request's head, copied out of the read buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Head {
    /// The method (`GET`, `POST`, ...).
    pub(super) method: String,
    /// The path, before any `?`.
    pub(super) path: String,
    /// The query string, after the first `?` (`""` if none), not yet decoded.
    pub(super) query: String,
    /// The headers, in order, names as sent.
    pub(super) headers: Vec<(String, Vec<u8>)>,
}

impl Head {
    /// The values of the headers named `name` (case-insensitive), in order.
    pub(super) fn values<'h>(&'h self, name: &'h str) -> impl Iterator<Item = &'h [u8]> + 'h {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// The first header named `name` (case-insensitive), as text (`None`: absent or not UTF-8).
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }
}

/// Parses the head at the start of `buf`: `Ok(None)` while it is incomplete, else the head and
/// its length in bytes (what follows is the start of the body).
pub(super) fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let len = match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::new(
                431,
                format!("at most {MAX_HEADERS} headers"),
            ));
        }
        Err(e) => return Err(HttpError::new(400, format!("bad request: {e}"))),
    };
    let target = request.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let head = Head {
        method: request.method.unwrap_or("").to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        headers: request
            .headers
            .iter()
            .map(|h| (h.name.to_owned(), h.value.to_vec()))
            .collect(),
    };
    Ok(Some((head, len)))
}

/// The length of the body `head` declares, if acceptable: `Content-Length` is required (411
/// without it), it must be one decimal number (400 otherwise; several equal ones count as one),
/// at most `max` (413), and `Transfer-Encoding` is refused (411 alone, 400 beside a
/// `Content-Length`: the two disagreeing is how requests are smuggled).
pub(super) fn body_length(head: &Head, max: usize) -> Result<usize, HttpError> {
    let chunked = head.values("transfer-encoding").next().is_some();
    let mut lengths = head.values("content-length");
    let Some(first) = lengths.next() else {
        return Err(HttpError::new(
            411,
            if chunked {
                "chunked bodies are not read: send the body with a Content-Length"
            } else {
                "a body needs a Content-Length"
            },
        ));
    };
    if chunked {
        return Err(HttpError::new(
            400,
            "both Content-Length and Transfer-Encoding: send only a Content-Length",
        ));
    }
    let parse = |v: &[u8]| -> Option<u64> {
        let s = std::str::from_utf8(v).ok()?.trim();
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let bad = || HttpError::new(400, "Content-Length is not one decimal number");
    let length = parse(first).ok_or_else(bad)?;
    for other in lengths {
        if parse(other) != Some(length) {
            return Err(bad());
        }
    }
    match usize::try_from(length) {
        Ok(n) if n <= max => Ok(n),
        _ => Err(HttpError::new(
            413,
            format!("the body ({length} bytes) exceeds admin.max_body_bytes ({max})"),
        )),
    }
}

/// The bounds of reading one request.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// `admin.max_request_bytes`: the largest head.
    pub(super) max_head_bytes: usize,
    /// `admin.request_timeout_ms`: the time the whole request may take.
    pub(super) timeout: Duration,
}

/// A request being served: its head, and its body once an endpoint asks for it.
#[derive(Debug)]
pub(super) struct Request<'s> {
    /// The head.
    pub(super) head: Head,
    /// Bytes read after the head (the start of the body).
    early: Vec<u8>,
    /// Where the rest of the body comes from (`None`: `early` is all there is, as in tests).
    stream: Option<&'s TcpStream>,
    /// When the whole request must have arrived.
    deadline: Instant,
    /// The declared body was read whole (or none was declared).
    body_read: bool,
}

impl<'s> Request<'s> {
    /// A request whose head and body are all in `raw` (for tests, and nothing else).
    #[cfg(test)]
    pub(super) fn from_bytes(raw: &[u8]) -> Result<Request<'static>, HttpError> {
        let (head, len) =
            parse_head(raw)?.ok_or_else(|| HttpError::new(400, "an incomplete request head"))?;
        Ok(Request::new(
            head,
            raw[len..].to_vec(),
            None,
            Instant::now(),
        ))
    }

    /// A request with `head`, whose body starts with `early` and goes on in `stream`.
    fn new(
        head: Head,
        early: Vec<u8>,
        stream: Option<&'s TcpStream>,
        deadline: Instant,
    ) -> Request<'s> {
        let declared = head.values("content-length").next().is_some()
            || head.values("transfer-encoding").next().is_some();
        // Nothing declared, or an empty body (`Content-Length: 0`): nothing left to drain.
        let body_read = early.is_empty() && (!declared || body_length(&head, 0) == Ok(0));
        Request {
            head,
            early,
            stream,
            deadline,
            body_read,
        }
    }

    /// Reads the body: its framing must be acceptable ([`body_length`]), and it must arrive
    /// before the request's deadline (408).
    pub(super) fn body(&mut self, max: usize) -> Result<Vec<u8>, HttpError> {
        let length = body_length(&self.head, max)?;
        let mut body = std::mem::take(&mut self.early);
        if body.len() > length {
            // More bytes than declared: a second request, which is not served (one request
            // per connection).
            body.truncate(length);
        }
        if body.len() < length {
            let Some(mut stream) = self.stream else {
                return Err(HttpError::new(
                    400,
                    "the body is shorter than its Content-Length",
                ));
            };
            let expects_continue = self
                .head
                .header("expect")
                .is_some_and(|e| e.trim().eq_ignore_ascii_case("100-continue"));
            if expects_continue && body.is_empty() {
                // curl waits a second for this before sending a body over 1 KiB.
                stream
                    .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                    .map_err(|e| HttpError::new(400, format!("cannot answer 100-continue: {e}")))?;
            }
            body.reserve_exact(length - body.len());
            let mut chunk = [0u8; 8192];
            while body.len() < length {
                let now = Instant::now();
                if now >= self.deadline {
                    return Err(timed_out());
                }
                let _ = stream.set_read_timeout(Some(self.deadline - now));
                let room = (length - body.len()).min(chunk.len());
                match stream.read(&mut chunk[..room]) {
                    Ok(0) => return Err(HttpError::new(400, "connection closed mid-body")),
                    Ok(n) => body.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Err(timed_out()),
                }
            }
        }
        self.body_read = true;
        Ok(body)
    }

    /// The client may still be sending a body nobody read.
    pub(super) fn body_unread(&self) -> bool {
        !self.body_read
    }
}

/// The 408 answer.
fn timed_out() -> HttpError {
    HttpError::new(408, "request not received within admin.request_timeout_ms")
}

/// Reads a request head from `stream` within `limits` (the body is left for [`Request::body`]).
pub(super) fn read_request(
    mut stream: &TcpStream,
    limits: Limits,
) -> Result<Request<'_>, HttpError> {
    let deadline = Instant::now() + limits.timeout;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some((head, len)) = parse_head(&buf)? {
            let early = buf.split_off(len);
            return Ok(Request::new(head, early, Some(stream), deadline));
        }
        if buf.len() >= limits.max_head_bytes {
            return Err(HttpError::new(
                431,
                format!(
                    "the request head exceeds admin.max_request_bytes ({})",
                    limits.max_head_bytes
                ),
            ));
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(timed_out());
        }
        let _ = stream.set_read_timeout(Some(deadline - now));
        let room = (limits.max_head_bytes - buf.len()).min(chunk.len());
        match stream.read(&mut chunk[..room]) {
            Ok(0) => return Err(HttpError::new(400, "connection closed mid-request")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(timed_out()),
        }
    }
}

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Response {
    /// The status code.
    pub(super) status: u16,
    /// `Content-Type`.
    pub(super) content_type: &'static str,
    /// Extra headers (name, value).
    pub(super) headers: Vec<(&'static str, String)>,
    /// The body.
    pub(super) body: String,
}

/// The media type of the JSON API's answers.
pub(super) const JSON: &str = "application/json";

impl Response {
    /// A plain-text answer.
    pub(super) fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// A JSON answer.
    pub(super) fn json(status: u16, body: String) -> Response {
        Response {
            status,
            content_type: JSON,
            headers: Vec::new(),
            body,
        }
    }

    /// This answer with the header `name: value` too.
    pub(super) fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    /// The value of the extra header `name` (case-insensitive), if set.
    #[cfg(test)]
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The reason phrase of the status codes used here.
pub(super) fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        301 => "Moved Permanently",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Writes `response` and closes the writing side.
pub(super) fn write_response(mut stream: &TcpStream, response: &Response) -> io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\n\
         Connection: close\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len(),
    );
    for (name, value) in &response.headers {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(response.body.as_bytes())?;
    stream.flush()?;
    stream.shutdown(std::net::Shutdown::Write)
}

/// Discards what the client still sends, until it closes, for at most [`LINGER`] (or `timeout`
/// if shorter) and [`LINGER_MAX_BYTES`]: closing a socket with unread bytes resets the
/// connection, and the client may then lose the answer.
pub(super) fn linger(mut stream: &TcpStream, timeout: Duration) {
    let deadline = Instant::now() + LINGER.min(timeout);
    let mut drained = 0usize;
    let mut chunk = [0u8; 8192];
    while drained < LINGER_MAX_BYTES {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        let _ = stream.set_read_timeout(Some(deadline - now));
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => drained += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// A query string, split into its `key=value` pairs (keys decoded, values kept as sent until
/// asked for, so that a list can be split on its raw commas: `%2C` is a comma inside an item).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Query {
    /// (decoded key, raw value), in order.
    pairs: Vec<(String, String)>,
}

impl Query {
    /// Splits `raw` (what follows the `?`). Every key must be one of `known` and appear once
    /// (400 otherwise: a misspelt parameter is an error, not silently ignored). A pair without
    /// `=` has the value `""`; empty pairs (`a=1&&b=2`) are skipped.
    pub(super) fn parse(raw: &str, known: &[&str]) -> Result<Query, HttpError> {
        let mut pairs: Vec<(String, String)> = Vec::new();
        for pair in raw.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = percent_decode(key)?;
            if !known.contains(&key.as_str()) {
                return Err(HttpError::new(
                    400,
                    format!(
                        "unknown query parameter {key:?}; this endpoint takes: {}",
                        known.join(", ")
                    ),
                ));
            }
            if pairs.iter().any(|(k, _)| *k == key) {
                return Err(HttpError::new(
                    400,
                    format!("the query parameter {key:?} is given twice"),
                ));
            }
            pairs.push((key, value.to_owned()));
        }
        Ok(Query { pairs })
    }

    /// The raw value of `key`.
    fn raw(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The decoded value of `key`, if given.
    pub(super) fn get(&self, key: &str) -> Result<Option<String>, HttpError> {
        self.raw(key).map(percent_decode).transpose()
    }

    /// The decoded value of `key`, which must be given and not empty.
    pub(super) fn required(&self, key: &str) -> Result<String, HttpError> {
        match self.get(key)? {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(HttpError::new(
                400,
                format!("the query parameter {key:?} is required"),
            )),
        }
    }

    /// The value of `key` as a comma-separated list, each item decoded (a comma inside an item
    /// is sent as `%2C`); empty items are an error.
    pub(super) fn list(&self, key: &str) -> Result<Option<Vec<String>>, HttpError> {
        let Some(raw) = self.raw(key) else {
            return Ok(None);
        };
        raw.split(',')
            .map(|item| {
                let item = percent_decode(item)?;
                if item.is_empty() {
                    return Err(HttpError::new(
                        400,
                        format!("the list {key:?} has an empty item"),
                    ));
                }
                Ok(item)
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// The value of `key` as a number in `1..=max`, or `default` if not given; a larger value
    /// is lowered to `max`.
    pub(super) fn limit(&self, key: &str, default: usize, max: usize) -> Result<usize, HttpError> {
        let Some(v) = self.get(key)? else {
            return Ok(default);
        };
        match v.parse::<u64>() {
            Ok(0) | Err(_) => Err(HttpError::new(
                400,
                format!("{key} must be a positive whole number, not {v:?}"),
            )),
            Ok(n) => Ok(usize::try_from(n).unwrap_or(usize::MAX).min(max)),
        }
    }
}

/// Decodes `%XX` escapes and `+` (a space, as forms send it); the result must be UTF-8.
pub(super) fn percent_decode(s: &str) -> Result<String, HttpError> {
    let bad = || HttpError::new(400, format!("bad percent-encoding in {s:?}"));
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).ok_or_else(bad)?;
                let hi = hex_value(hex[0]).ok_or_else(bad)?;
                let lo = hex_value(hex[1]).ok_or_else(bad)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out)
        .map_err(|_| HttpError::new(400, format!("{s:?} is not UTF-8 once decoded")))
}

/// The value of one hexadecimal digit.
fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Head {
        match parse_head(raw.as_bytes()) {
            Ok(Some((h, _))) => h,
            other => panic!("{raw:?}: {other:?}"),
        }
    }

    #[test]
    fn a_head_is_split_into_method_path_query_and_headers() {
        let h = head("GET /v1/online?after=bob&limit=5 HTTP/1.1\r\nX-A: 1\r\nx-a: 2\r\n\r\n");
        assert_eq!(
            (&h.method[..], &h.path[..], &h.query[..]),
            ("GET", "/v1/online", "after=bob&limit=5")
        );
        assert_eq!(h.values("X-A").collect::<Vec<_>>(), vec![b"1", b"2"]);
        assert_eq!(h.header("x-a"), Some("1"));
        assert!(matches!(
            parse_head(b"GET / HTTP/1.1\r\nX: 1\r\n"),
            Ok(None)
        ));
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nno colon\r\n\r\n").map(|_| ()),
            Err(HttpError::new(400, "bad request: invalid header name"))
        );
    }

    #[test]
    fn a_body_needs_one_content_length_within_the_limit_and_no_transfer_encoding() {
        let len = |raw: &str| body_length(&head(raw), 100).map_err(|e| e.status);
        assert_eq!(
            len("POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\n"),
            Ok(100)
        );
        assert_eq!(len("POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n"), Ok(0));
        assert_eq!(len("POST / HTTP/1.1\r\n\r\n"), Err(411));
        assert_eq!(
            len("POST / HTTP/1.1\r\nContent-Length: 101\r\n\r\n"),
            Err(413)
        );
        assert_eq!(
            len("POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
            Err(400),
            "too large for a u64 is not a number we read"
        );
        assert_eq!(
            len("POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"),
            Err(400)
        );
        assert_eq!(
            len("POST / HTTP/1.1\r\nContent-Length: 1e2\r\n\r\n"),
            Err(400)
        );
        assert_eq!(
            len("POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n"),
            Err(400)
        );
        assert_eq!(
            len("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"),
            Ok(5)
        );
        assert_eq!(
            len("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"),
            Err(400)
        );
        assert_eq!(
            len("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(411)
        );
        assert_eq!(
            len("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"),
            Err(400)
        );
    }

    #[test]
    fn a_body_shorter_than_declared_is_refused_and_extra_bytes_are_not_read_as_body() {
        let mut r = Request::from_bytes(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nabc")
            .expect("parses");
        assert!(r.body_unread());
        assert_eq!(r.body(100).map_err(|e| e.status), Err(400));
        let mut r = Request::from_bytes(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcdef")
            .expect("parses");
        assert_eq!(r.body(100), Ok(b"abc".to_vec()));
        assert!(!r.body_unread());
        let r = Request::from_bytes(b"GET / HTTP/1.1\r\n\r\n").expect("parses");
        assert!(!r.body_unread(), "no body declared, none to drain");
        let r =
            Request::from_bytes(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n").expect("parses");
        assert!(!r.body_unread(), "an empty body, none to drain");
        let r =
            Request::from_bytes(b"GET / HTTP/1.1\r\nContent-Length: 9\r\n\r\n").expect("parses");
        assert!(r.body_unread(), "a body no endpoint reads is drained");
    }

    #[test]
    fn percent_decoding_handles_escapes_plus_and_refuses_bad_input() {
        assert_eq!(percent_decode("a%20b+c%2Cd"), Ok("a b c,d".into()));
        assert_eq!(percent_decode("%C3%BC"), Ok("ü".into()));
        assert_eq!(percent_decode("%c3%bc"), Ok("ü".into()));
        assert_eq!(percent_decode("ü"), Ok("ü".into()), "raw UTF-8 passes");
        for bad in ["%", "%2", "%zz", "a%g1", "%FF", "%C3"] {
            assert_eq!(percent_decode(bad).map_err(|e| e.status), Err(400), "{bad}");
        }
    }

    #[test]
    fn a_query_knows_its_parameters_once_each_and_splits_lists_on_raw_commas() {
        let q = Query::parse(
            "users=a,b%2Cc,%C3%BC&limit=5&&after=",
            &["users", "limit", "after"],
        )
        .expect("parses");
        assert_eq!(
            q.list("users"),
            Ok(Some(vec!["a".into(), "b,c".into(), "ü".into()]))
        );
        assert_eq!(q.get("after"), Ok(Some(String::new())));
        assert_eq!(q.get("missing"), Ok(None));
        assert_eq!(q.limit("limit", 100, 1000), Ok(5));
        assert_eq!(q.required("after").map_err(|e| e.status), Err(400));
        let status = |raw: &str| Query::parse(raw, &["a"]).map(|_| ()).map_err(|e| e.status);
        assert_eq!(status("b=1"), Err(400), "unknown parameter");
        assert_eq!(status("a=1&a=2"), Err(400), "given twice");
        assert_eq!(status("a%=1"), Err(400), "bad key");
        assert_eq!(status(""), Ok(()));
        let q = Query::parse("users=a,,b", &["users"]).expect("parses");
        assert_eq!(q.list("users").map_err(|e| e.status), Err(400));
    }

    #[test]
    fn a_limit_defaults_is_capped_and_must_be_positive() {
        let limit = |raw: &str| {
            Query::parse(raw, &["limit"])
                .and_then(|q| q.limit("limit", 100, 1000))
                .map_err(|e| e.status)
        };
        assert_eq!(limit(""), Ok(100));
        assert_eq!(limit("limit=7"), Ok(7));
        assert_eq!(limit("limit=5000"), Ok(1000));
        assert_eq!(limit("limit=99999999999999999999999"), Err(400));
        assert_eq!(limit("limit=0"), Err(400));
        assert_eq!(limit("limit=-1"), Err(400));
        assert_eq!(limit("limit=ten"), Err(400));
    }
}
