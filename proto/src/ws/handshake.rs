//! The opening handshake, server side (RFC 6455 section 4.2): the client's HTTP/1.1 upgrade
//! request in, the 101 response (or an HTTP error) out.
//!
//! [`parse_request`] is called with everything read so far and answers "incomplete"
//! (`Ok(None)`), a validated [`UpgradeRequest`], or a [`HandshakeError`] carrying its HTTP
//! status. It is stateless, so the caller simply calls it again when more bytes arrive; the
//! request is bounded ([`DEFAULT_MAX_REQUEST_BYTES`], [`MAX_HEADERS`]) so the work is too.
//!
//! # Rejections
//!
//! | Problem                                                              | Status |
//! |----------------------------------------------------------------------|--------|
//! | request (line and headers) longer than the limit, or over 64 headers | 431    |
//! | not parseable as HTTP/1.x                                            | 400    |
//! | method other than GET (with `Allow: GET`)                            | 405    |
//! | HTTP/1.0                                                             | 505    |
//! | target not in origin form (`/path?query`), bad `token` parameter     | 400    |
//! | `Host` missing or repeated                                           | 400    |
//! | a body announced (`Content-Length` not 0, or `Transfer-Encoding`)    | 400    |
//! | no `Upgrade: websocket`, no `Upgrade` in `Connection`                | 400    |
//! | `Sec-WebSocket-Version` missing or not 13 (with the version we speak)| 426    |
//! | `Sec-WebSocket-Key` missing, repeated or not base64 of 16 bytes      | 400    |
//! | repeated `Authorization` or `Sec-WebSocket-Version`, bad protocol    | 400    |
//!
//! Checks run in the order of the table (after the size and syntax checks), so a plain HTTP GET
//! without any upgrade headers gets 400, and a WebSocket request of another version gets 426.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::{BufMut, BytesMut};
use sha1::{Digest, Sha1};

/// The default limit on the request line and headers, blank line included (8 KiB).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 8 * 1024;

/// The most headers a request may carry; one more is 431.
pub const MAX_HEADERS: usize = 64;

/// The GUID of RFC 6455 section 1.3 appended to the key before hashing.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A valid WebSocket upgrade request: what the broker needs from it.
///
/// Its `Debug` output shows whether a token is present but never the token itself.
#[derive(Clone, PartialEq, Eq)]
pub struct UpgradeRequest {
    /// The request path, without the query, exactly as sent (not percent-decoded), e.g. `/ws`.
    pub path: String,
    /// The `token` query parameter, percent-decoded (`+` is a space, as in HTML forms), if any.
    /// Never log it.
    pub query_token: Option<String>,
    /// The token of an `Authorization: Bearer <token>` header (scheme case-insensitive), if any.
    /// Other schemes are ignored. Never log it.
    pub bearer_token: Option<String>,
    /// The subprotocols the client offers (`Sec-WebSocket-Protocol`, all occurrences, in order).
    pub protocols: Vec<String>,
    /// The `Origin` header, if any (browsers send it; the broker may check it).
    pub origin: Option<String>,
    /// The `Host` header.
    pub host: String,
    /// The `Sec-WebSocket-Key` as sent (24 base64 characters of a 16-byte nonce).
    pub key: String,
    /// The length of the request in the input: the bytes after it already belong to the
    /// WebSocket frame stream.
    pub consumed: usize,
}

impl std::fmt::Debug for UpgradeRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |token: &Option<String>| token.as_ref().map(|_| "<redacted>");
        f.debug_struct("UpgradeRequest")
            .field("path", &self.path)
            .field("query_token", &redacted(&self.query_token))
            .field("bearer_token", &redacted(&self.bearer_token))
            .field("protocols", &self.protocols)
            .field("origin", &self.origin)
            .field("host", &self.host)
            .field("key", &self.key)
            .field("consumed", &self.consumed)
            .finish()
    }
}

impl UpgradeRequest {
    /// The `Sec-WebSocket-Accept` value answering this request's key.
    pub fn accept_key(&self) -> String {
        accept_key(&self.key)
    }

    /// Appends the `101 Switching Protocols` response to `out`.
    ///
    /// `protocol` is the subprotocol the server selects; it is echoed only if the client offered
    /// it (RFC 6455 4.2.2: the server must choose one of the client's values), otherwise no
    /// `Sec-WebSocket-Protocol` header is written.
    pub fn write_accept(&self, protocol: Option<&str>, out: &mut BytesMut) {
        let protocol = protocol.filter(|p| self.protocols.iter().any(|offered| offered == p));
        out.put_slice(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ");
        out.put_slice(self.accept_key().as_bytes());
        if let Some(protocol) = protocol {
            out.put_slice(b"\r\nSec-WebSocket-Protocol: ");
            out.put_slice(protocol.as_bytes());
        }
        out.put_slice(b"\r\n\r\n");
    }
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`: base64(SHA-1(key + GUID)) (RFC 6455 4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(ACCEPT_GUID);
    BASE64.encode(sha.finalize())
}

/// Why an upgrade request was refused; [`HandshakeError::status`] is the HTTP status to answer
/// with, [`HandshakeError::write_response`] writes the whole response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The request line and headers exceed the size limit (431).
    #[error("request headers exceed {max} bytes")]
    RequestTooLarge {
        /// The limit that was passed.
        max: usize,
    },
    /// More than [`MAX_HEADERS`] headers (431).
    #[error("more than {MAX_HEADERS} headers")]
    TooManyHeaders,
    /// The bytes are not an HTTP/1.x request (400).
    #[error("malformed HTTP request: {0}")]
    Malformed(&'static str),
    /// The method is not GET (405, with `Allow: GET`).
    #[error("method not allowed, use GET")]
    MethodNotAllowed,
    /// HTTP/1.0: WebSocket needs HTTP/1.1 (505).
    #[error("HTTP/1.1 required")]
    HttpVersion,
    /// The request target is not in origin form (`/path?query`) (400).
    #[error("request target must start with '/'")]
    BadTarget,
    /// The `token` query parameter is repeated, badly percent-encoded or not UTF-8 (400).
    #[error("bad token query parameter")]
    BadQueryToken,
    /// `Host` is missing or repeated (400).
    #[error("exactly one Host header required")]
    BadHost,
    /// The request announces a body (`Content-Length` other than 0, or `Transfer-Encoding`):
    /// after the headers come WebSocket frames, nothing else (400).
    #[error("an upgrade request has no body")]
    UnexpectedBody,
    /// No `Upgrade: websocket` header (400).
    #[error("not a WebSocket upgrade: Upgrade: websocket missing")]
    NotWebSocketUpgrade,
    /// No `Upgrade` token in `Connection` (400).
    #[error("Connection header lacks the Upgrade token")]
    MissingConnectionUpgrade,
    /// `Sec-WebSocket-Version` is missing or not 13 (426, with `Sec-WebSocket-Version: 13`).
    #[error("unsupported WebSocket version, 13 required")]
    UnsupportedVersion,
    /// `Sec-WebSocket-Key` is missing, repeated, or not the base64 encoding of 16 bytes (400).
    #[error("Sec-WebSocket-Key missing, repeated or not base64 of 16 bytes")]
    BadKey,
    /// A header that must appear at most once appears more than once
    /// (`Authorization`, `Sec-WebSocket-Version`, `Origin`) (400).
    #[error("repeated {0} header")]
    RepeatedHeader(&'static str),
    /// A header the handshake reads is not valid UTF-8 text, or `Sec-WebSocket-Protocol` holds
    /// something other than a comma-separated list of tokens (400).
    #[error("bad {0} header")]
    BadHeader(&'static str),
}

impl HandshakeError {
    /// The HTTP status code to answer with.
    pub const fn status(&self) -> u16 {
        match self {
            HandshakeError::RequestTooLarge { .. } | HandshakeError::TooManyHeaders => 431,
            HandshakeError::MethodNotAllowed => 405,
            HandshakeError::HttpVersion => 505,
            HandshakeError::UnsupportedVersion => 426,
            HandshakeError::Malformed(_)
            | HandshakeError::BadTarget
            | HandshakeError::BadQueryToken
            | HandshakeError::BadHost
            | HandshakeError::UnexpectedBody
            | HandshakeError::NotWebSocketUpgrade
            | HandshakeError::MissingConnectionUpgrade
            | HandshakeError::BadKey
            | HandshakeError::RepeatedHeader(_)
            | HandshakeError::BadHeader(_) => 400,
        }
    }

    /// Appends the HTTP error response to `out`: the status line, the headers the status
    /// requires (`Allow: GET` for 405; `Upgrade: websocket` and `Sec-WebSocket-Version: 13` for
    /// 426), `Connection: close`, and this error's message as a short text body. The caller
    /// then flushes and closes the connection.
    pub fn write_response(&self, out: &mut BytesMut) {
        let extra: &[u8] = match self {
            HandshakeError::MethodNotAllowed => b"Allow: GET\r\n",
            HandshakeError::UnsupportedVersion => {
                b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
            }
            _ => b"",
        };
        write_response(out, self.status(), extra, &self.to_string());
    }
}

/// Appends a complete non-101 HTTP/1.1 response to `out`: status line, `Content-Type:
/// text/plain; charset=utf-8`, `Content-Length`, `Connection: close` and `body`. For the
/// broker's own refusals before the upgrade (e.g. 401 for a bad token, 403 for a bad origin,
/// 503 when full). Unknown status codes get the reason phrase "Error".
pub fn write_status_response(out: &mut BytesMut, status: u16, body: &str) {
    write_response(out, status, b"", body);
}

fn write_response(out: &mut BytesMut, status: u16, extra_headers: &[u8], body: &str) {
    use std::fmt::Write as _;
    // Writing into a BytesMut cannot fail.
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n",
        reason_phrase(status),
        body.len() + 1
    );
    out.put_slice(extra_headers);
    out.put_slice(b"Connection: close\r\n\r\n");
    out.put_slice(body.as_bytes());
    out.put_u8(b'\n');
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Error",
    }
}

/// Parses and validates a WebSocket upgrade request from the start of `buf` (everything read
/// from the connection so far).
///
/// Returns `Ok(None)` while the request is incomplete (no blank line yet), `Ok(Some(request))`
/// once it is complete and valid (bytes from `request.consumed` on are WebSocket frames), or the
/// reason to refuse it. A request whose line and headers exceed `max_request_bytes` is refused
/// (431) as soon as that many bytes have arrived without the blank line.
pub fn parse_request(
    buf: &[u8],
    max_request_bytes: usize,
) -> Result<Option<UpgradeRequest>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let consumed = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() >= max_request_bytes {
                return Err(HandshakeError::RequestTooLarge {
                    max: max_request_bytes,
                });
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::TooManyHeaders),
        Err(e) => {
            // A syntax error found past the limit is reported as the size problem it also is.
            if buf.len() > max_request_bytes {
                return Err(HandshakeError::RequestTooLarge {
                    max: max_request_bytes,
                });
            }
            return Err(HandshakeError::Malformed(httparse_reason(&e)));
        }
    };
    if consumed > max_request_bytes {
        return Err(HandshakeError::RequestTooLarge {
            max: max_request_bytes,
        });
    }
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(HandshakeError::Malformed("incomplete request line"));
    };
    if method != "GET" {
        return Err(HandshakeError::MethodNotAllowed);
    }
    if version != 1 {
        return Err(HandshakeError::HttpVersion);
    }
    let (path, query) = match target.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (target, None),
    };
    if !path.starts_with('/') {
        return Err(HandshakeError::BadTarget);
    }
    let query_token = match query {
        Some(query) => query_param(query, "token")?,
        None => None,
    };

    let headers = Headers(req.headers);
    let host = headers
        .single("Host")
        .map_err(|_| HandshakeError::BadHost)?;
    let Some(host) = host else {
        return Err(HandshakeError::BadHost);
    };
    if headers.all("Transfer-Encoding").next().is_some()
        || headers
            .all("Content-Length")
            .any(|v| v.trim_ascii() != b"0")
    {
        return Err(HandshakeError::UnexpectedBody);
    }
    if !headers.list_contains("Upgrade", "websocket") {
        return Err(HandshakeError::NotWebSocketUpgrade);
    }
    if !headers.list_contains("Connection", "upgrade") {
        return Err(HandshakeError::MissingConnectionUpgrade);
    }
    match headers.single("Sec-WebSocket-Version")? {
        Some(v) if v.trim_ascii() == b"13" => {}
        _ => return Err(HandshakeError::UnsupportedVersion),
    }
    let key = headers
        .single("Sec-WebSocket-Key")
        .map_err(|_| HandshakeError::BadKey)?
        .ok_or(HandshakeError::BadKey)?
        .trim_ascii();
    if !is_valid_key(key) {
        return Err(HandshakeError::BadKey);
    }
    let bearer_token = match headers.single("Authorization")? {
        Some(value) => bearer(value)?,
        None => None,
    };
    let origin = headers
        .single("Origin")?
        .map(|v| text(v.trim_ascii(), "Origin"))
        .transpose()?;
    let mut protocols = Vec::new();
    for value in headers.all("Sec-WebSocket-Protocol") {
        for item in text(value, "Sec-WebSocket-Protocol")?.split(',') {
            let item = item.trim_matches([' ', '\t']);
            if item.is_empty() {
                continue;
            }
            if !is_token(item) {
                return Err(HandshakeError::BadHeader("Sec-WebSocket-Protocol"));
            }
            protocols.push(item.to_owned());
        }
    }

    Ok(Some(UpgradeRequest {
        path: path.to_owned(),
        query_token,
        bearer_token,
        protocols,
        origin: origin.map(str::to_owned),
        host: text(host.trim_ascii(), "Host")?.to_owned(),
        key: text(key, "Sec-WebSocket-Key")?.to_owned(),
        consumed,
    }))
}

fn httparse_reason(e: &httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid header name",
        httparse::Error::HeaderValue => "invalid header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid token",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "invalid HTTP version",
    }
}

/// The headers of a parsed request, looked up by case-insensitive name.
struct Headers<'h, 'b>(&'h [httparse::Header<'b>]);

impl<'b> Headers<'_, 'b> {
    /// The values of every header named `name`.
    fn all(&self, name: &'static str) -> impl Iterator<Item = &'b [u8]> + '_ {
        self.0
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }

    /// The value of the header `name`, which may appear at most once.
    fn single(&self, name: &'static str) -> Result<Option<&'b [u8]>, HandshakeError> {
        let mut values = self.all(name);
        let first = values.next();
        if values.next().is_some() {
            return Err(HandshakeError::RepeatedHeader(name));
        }
        Ok(first)
    }

    /// Whether any occurrence of the comma-separated list header `name` contains `token`
    /// (case-insensitive).
    fn list_contains(&self, name: &'static str, token: &str) -> bool {
        self.all(name).any(|value| {
            value
                .split(|&b| b == b',')
                .any(|item| item.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
        })
    }
}

/// A header value as text (headers the handshake reads must be UTF-8).
fn text<'a>(value: &'a [u8], name: &'static str) -> Result<&'a str, HandshakeError> {
    std::str::from_utf8(value).map_err(|_| HandshakeError::BadHeader(name))
}

/// Whether `key` is the base64 (standard alphabet, padded, canonical) encoding of 16 bytes.
fn is_valid_key(key: &[u8]) -> bool {
    let mut decoded = [0u8; 18];
    key.len() == 24 && matches!(BASE64.decode_slice(key, &mut decoded), Ok(16))
}

/// The token of an `Authorization` value with the `Bearer` scheme, or `None` for other schemes.
fn bearer(value: &[u8]) -> Result<Option<String>, HandshakeError> {
    let value = text(value.trim_ascii(), "Authorization")?;
    let Some((scheme, token)) = value.split_once([' ', '\t']) else {
        return Ok(None);
    };
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Ok(None);
    }
    let token = token.trim_matches([' ', '\t']);
    Ok((!token.is_empty()).then(|| token.to_owned()))
}

/// The percent-decoded value of the query parameter `name` (at most one occurrence).
fn query_param(query: &str, name: &str) -> Result<Option<String>, HandshakeError> {
    let mut found = None;
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key != name {
            continue;
        }
        if found.is_some() {
            return Err(HandshakeError::BadQueryToken);
        }
        found = Some(percent_decode(value).ok_or(HandshakeError::BadQueryToken)?);
    }
    Ok(found)
}

/// Decodes `application/x-www-form-urlencoded` text: `%XX` escapes and `+` for a space. `None`
/// for a malformed escape or a result that is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hi = hex_digit(bytes.next()?)?;
                let lo = hex_digit(bytes.next()?)?;
                out.push(hi << 4 | lo);
            }
            b'+' => out.push(b' '),
            other => out.push(other),
        }
    }
    String::from_utf8(out).ok()
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Whether `s` is an HTTP token (RFC 9110 5.6.2): one or more `tchar`.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const RFC_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

    fn request_with(lines: &[&str]) -> String {
        let mut s = String::new();
        for line in lines {
            s.push_str(line);
            s.push_str("\r\n");
        }
        s.push_str("\r\n");
        s
    }

    /// A valid request (the RFC 6455 1.3 example), with `extra` headers added.
    fn valid_request(extra: &[&str]) -> String {
        let mut lines = vec![
            "GET /chat HTTP/1.1",
            "Host: server.example.com",
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
        ];
        lines.extend_from_slice(extra);
        request_with(&lines)
    }

    /// The valid request with every header whose name starts with `without` removed and `extra`
    /// added.
    fn request_without(without: &str, extra: &[&str]) -> String {
        let valid = valid_request(&[]);
        let mut lines: Vec<&str> = valid
            .split("\r\n")
            .filter(|l| !l.is_empty() && !l.starts_with(without))
            .collect();
        lines.extend_from_slice(extra);
        request_with(&lines)
    }

    fn parse(s: &str) -> Result<Option<UpgradeRequest>, HandshakeError> {
        parse_request(s.as_bytes(), DEFAULT_MAX_REQUEST_BYTES)
    }

    fn rejected(s: &str) -> HandshakeError {
        parse(s).unwrap_err()
    }

    #[test]
    fn rfc_example_key_gets_rfc_example_accept() {
        assert_eq!(accept_key(RFC_KEY), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn valid_request_is_accepted_with_its_fields() {
        let s = valid_request(&["Origin: http://example.com"]);
        let req = parse(&s).unwrap().unwrap();
        assert_eq!(req.path, "/chat");
        assert_eq!(req.host, "server.example.com");
        assert_eq!(req.key, RFC_KEY);
        assert_eq!(req.origin.as_deref(), Some("http://example.com"));
        assert_eq!(req.query_token, None);
        assert_eq!(req.bearer_token, None);
        assert!(req.protocols.is_empty());
        assert_eq!(req.consumed, s.len());
    }

    #[test]
    fn request_is_partial_until_the_blank_line_at_every_byte() {
        let s = valid_request(&[]);
        for cut in 0..s.len() {
            assert_eq!(parse(&s[..cut]), Ok(None), "cut at {cut}");
        }
        assert!(parse(&s).unwrap().is_some());
    }

    #[test]
    fn bytes_after_the_request_are_not_consumed() {
        let s = valid_request(&[]);
        let mut bytes = s.clone().into_bytes();
        bytes.extend_from_slice(&[0x81, 0x85, 1, 2, 3]);
        let req = parse_request(&bytes, DEFAULT_MAX_REQUEST_BYTES)
            .unwrap()
            .unwrap();
        assert_eq!(req.consumed, s.len());
    }

    #[test]
    fn accept_response_carries_the_accept_key() {
        let req = parse(&valid_request(&[])).unwrap().unwrap();
        let mut out = BytesMut::new();
        req.write_accept(None, &mut out);
        assert_eq!(
            &out[..],
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        );
    }

    #[test]
    fn offered_subprotocol_is_echoed() {
        let req = parse(&valid_request(&[
            "Sec-WebSocket-Protocol: chat, superchat",
            "Sec-WebSocket-Protocol: parley.v1",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(req.protocols, ["chat", "superchat", "parley.v1"]);
        let mut out = BytesMut::new();
        req.write_accept(Some("parley.v1"), &mut out);
        let text = std::str::from_utf8(&out).unwrap();
        assert!(
            text.contains("\r\nSec-WebSocket-Protocol: parley.v1\r\n"),
            "{text}"
        );
    }

    #[test]
    fn subprotocol_not_offered_is_not_echoed() {
        let req = parse(&valid_request(&["Sec-WebSocket-Protocol: chat"]))
            .unwrap()
            .unwrap();
        let mut out = BytesMut::new();
        req.write_accept(Some("other"), &mut out);
        assert!(
            !std::str::from_utf8(&out)
                .unwrap()
                .contains("Sec-WebSocket-Protocol")
        );
    }

    #[test]
    fn subprotocol_that_is_not_a_token_is_400() {
        let e = rejected(&valid_request(&["Sec-WebSocket-Protocol: a b"]));
        assert_eq!(e, HandshakeError::BadHeader("Sec-WebSocket-Protocol"));
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn token_query_parameter_is_percent_decoded() {
        let s = valid_request(&[]).replace("/chat", "/ws?room=1&token=a%2Eb%2fc+d%C3%A9");
        let req = parse(&s).unwrap().unwrap();
        assert_eq!(req.path, "/ws");
        assert_eq!(req.query_token.as_deref(), Some("a.b/c dé"));
    }

    #[test]
    fn bad_percent_escape_in_token_is_400() {
        for target in ["/ws?token=%4", "/ws?token=%zz", "/ws?token=%FF"] {
            let s = valid_request(&[]).replace("/chat", target);
            assert_eq!(rejected(&s), HandshakeError::BadQueryToken, "{target}");
        }
    }

    #[test]
    fn repeated_token_parameter_is_400() {
        let s = valid_request(&[]).replace("/chat", "/ws?token=a&token=b");
        assert_eq!(rejected(&s), HandshakeError::BadQueryToken);
    }

    #[test]
    fn bearer_token_is_extracted() {
        let req = parse(&valid_request(&["Authorization: bearer  eyJ.x.y "]))
            .unwrap()
            .unwrap();
        assert_eq!(req.bearer_token.as_deref(), Some("eyJ.x.y"));
    }

    #[test]
    fn debug_output_never_shows_tokens() {
        let s = valid_request(&["Authorization: Bearer s3cr3t-b"])
            .replace("/chat", "/c?token=s3cr3t-q");
        let shown = format!("{:?}", parse(&s).unwrap().unwrap());
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn authorization_with_other_scheme_gives_no_bearer_token() {
        let req = parse(&valid_request(&["Authorization: Basic dTpw"]))
            .unwrap()
            .unwrap();
        assert_eq!(req.bearer_token, None);
    }

    #[test]
    fn repeated_authorization_is_400() {
        let e = rejected(&valid_request(&[
            "Authorization: Bearer a",
            "Authorization: Bearer b",
        ]));
        assert_eq!(e, HandshakeError::RepeatedHeader("Authorization"));
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn method_other_than_get_is_405_with_allow() {
        let e = rejected(&valid_request(&[]).replace("GET", "POST"));
        assert_eq!(e, HandshakeError::MethodNotAllowed);
        assert_eq!(e.status(), 405);
        let mut out = BytesMut::new();
        e.write_response(&mut out);
        let text = std::str::from_utf8(&out).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nAllow: GET\r\n"));
    }

    #[test]
    fn http_1_0_is_505() {
        let e = rejected(&valid_request(&[]).replace("HTTP/1.1", "HTTP/1.0"));
        assert_eq!(e, HandshakeError::HttpVersion);
        assert_eq!(e.status(), 505);
    }

    #[test]
    fn garbage_is_400() {
        let tls_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 TLS hello\r\n\r\n";
        let e = parse_request(tls_hello, DEFAULT_MAX_REQUEST_BYTES).unwrap_err();
        assert!(matches!(e, HandshakeError::Malformed(_)), "{e:?}");
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn absolute_form_target_is_400() {
        let s = valid_request(&[]).replace("/chat", "http://server.example.com/chat");
        assert_eq!(rejected(&s), HandshakeError::BadTarget);
    }

    #[test]
    fn missing_host_is_400() {
        assert_eq!(
            rejected(&request_without("Host", &[])),
            HandshakeError::BadHost
        );
    }

    #[test]
    fn repeated_host_is_400() {
        assert_eq!(
            rejected(&valid_request(&["Host: evil"])),
            HandshakeError::BadHost
        );
    }

    #[test]
    fn request_with_a_body_is_400() {
        for header in ["Content-Length: 5", "Transfer-Encoding: chunked"] {
            assert_eq!(
                rejected(&valid_request(&[header])),
                HandshakeError::UnexpectedBody
            );
        }
        assert!(
            parse(&valid_request(&["Content-Length: 0"]))
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn handshake_without_upgrade_websocket_gets_400() {
        let e = rejected(&request_without("Upgrade", &[]));
        assert_eq!(e, HandshakeError::NotWebSocketUpgrade);
        assert_eq!(e.status(), 400);
        let e = rejected(&request_without("Upgrade", &["Upgrade: h2c"]));
        assert_eq!(e, HandshakeError::NotWebSocketUpgrade);
    }

    #[test]
    fn upgrade_token_is_case_insensitive() {
        assert!(
            parse(&request_without("Upgrade", &["Upgrade: WebSocket"]))
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn connection_header_is_a_case_insensitive_list() {
        let s = request_without("Connection", &["Connection: keep-alive, UPGRADE"]);
        assert!(parse(&s).unwrap().is_some());
        let s = request_without(
            "Connection",
            &["Connection: keep-alive", "Connection: upgrade"],
        );
        assert!(parse(&s).unwrap().is_some());
    }

    #[test]
    fn handshake_without_connection_upgrade_gets_400() {
        let e = rejected(&request_without("Connection", &["Connection: keep-alive"]));
        assert_eq!(e, HandshakeError::MissingConnectionUpgrade);
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn handshake_without_version_13_gets_426() {
        for version in [None, Some("8"), Some("14"), Some("13, 8")] {
            let extra: Vec<String> = version
                .map(|v| format!("Sec-WebSocket-Version: {v}"))
                .into_iter()
                .collect();
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            let e = rejected(&request_without("Sec-WebSocket-Version", &extra));
            assert_eq!(e, HandshakeError::UnsupportedVersion, "{version:?}");
            assert_eq!(e.status(), 426);
        }
    }

    #[test]
    fn version_426_response_names_version_13() {
        let mut out = BytesMut::new();
        HandshakeError::UnsupportedVersion.write_response(&mut out);
        let text = std::str::from_utf8(&out).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 426 Upgrade Required\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nSec-WebSocket-Version: 13\r\n"));
        assert!(text.contains("\r\nConnection: close\r\n"));
    }

    #[test]
    fn handshake_without_key_gets_400() {
        let e = rejected(&request_without("Sec-WebSocket-Key", &[]));
        assert_eq!(e, HandshakeError::BadKey);
        assert_eq!(e.status(), 400);
    }

    #[test]
    fn key_that_is_not_base64_of_16_bytes_gets_400() {
        for key in [
            "dGhlIHNhbXBsZSBub25jZQ",   // unpadded
            "dGhlIHNhbXBsZSBub25jZSE=", // 17 bytes
            "dGhlIHNhbXBsZSBub25j",     // 15 bytes
            "dGhlIHNhbXBsZSBub25jZR==", // non-canonical trailing bits
            "dGhlIHNhbXBsZSBub25jZ*==", // not base64
        ] {
            let header = format!("Sec-WebSocket-Key: {key}");
            let e = rejected(&request_without("Sec-WebSocket-Key", &[&header]));
            assert_eq!(e, HandshakeError::BadKey, "{key}");
        }
    }

    #[test]
    fn repeated_key_gets_400() {
        let e = rejected(&valid_request(&[
            "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==",
        ]));
        assert_eq!(e, HandshakeError::BadKey);
    }

    #[test]
    fn request_over_the_size_limit_gets_431_before_it_ends() {
        let mut s = String::from("GET /chat HTTP/1.1\r\nX-Filler: ");
        s.push_str(&"a".repeat(DEFAULT_MAX_REQUEST_BYTES));
        let e = rejected(&s);
        assert_eq!(
            e,
            HandshakeError::RequestTooLarge {
                max: DEFAULT_MAX_REQUEST_BYTES
            }
        );
        assert_eq!(e.status(), 431);
    }

    #[test]
    fn complete_request_over_the_size_limit_gets_431() {
        let filler = format!("X-Filler: {}", "a".repeat(200));
        let s = valid_request(&[&filler]);
        assert_eq!(
            parse_request(s.as_bytes(), 200),
            Err(HandshakeError::RequestTooLarge { max: 200 })
        );
    }

    #[test]
    fn more_than_64_headers_gets_431() {
        let fillers: Vec<String> = (0..MAX_HEADERS).map(|i| format!("X-{i}: v")).collect();
        let fillers: Vec<&str> = fillers.iter().map(String::as_str).collect();
        let e = rejected(&valid_request(&fillers));
        assert_eq!(e, HandshakeError::TooManyHeaders);
        assert_eq!(e.status(), 431);
    }

    #[test]
    fn every_rejection_response_closes_the_connection_with_a_body() {
        let e = HandshakeError::BadKey;
        let mut out = BytesMut::new();
        e.write_response(&mut out);
        let text = std::str::from_utf8(&out).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(head.contains("\r\nConnection: close"));
        assert!(head.contains(&format!("\r\nContent-Length: {}", body.len())));
        assert!(!body.is_empty());
    }

    #[test]
    fn status_response_for_the_broker_has_status_and_body() {
        let mut out = BytesMut::new();
        write_status_response(&mut out, 401, "bad token");
        assert_eq!(
            &out[..],
            b"HTTP/1.1 401 Unauthorized\r\nContent-Type: text/plain; charset=utf-8\r\n\
              Content-Length: 10\r\nConnection: close\r\n\r\nbad token\n"
        );
    }
}
