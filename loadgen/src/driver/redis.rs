//! Redis pub/sub client driver (RESP2, redis-server), sans-IO.
//!
//! A subscribed Redis connection cannot publish, so each Redis client is two connections: a
//! *publisher* ([`Role::Publish`], or any role without a `listen` channel) and a *subscriber*
//! ([`Role::Subscribe`] or [`Role::Both`] with a `listen` channel).
//!
//! # What goes on the wire
//!
//! Commands are RESP arrays of bulk strings; replies are RESP2 values (`+simple`, `-error`,
//! `:integer`, `$len` bulk or `$-1` null, `*count` array or `*-1`), each line ending in `\r\n`.
//!
//! ```text
//! publisher   start      *1 $4 PING                          -> +PONG            => Ready
//!             send       *3 $7 PUBLISH $<channel> $<body>    -> :<receivers>     => Acked
//!             heartbeat  *1 $4 PING                          -> +PONG            (ignored)
//!             any        ...                                 -> -ERR text        => Error
//! subscriber  start      *2 $9 SUBSCRIBE $<channel>          -> *3 $9 subscribe $<channel> :1
//!                                                                                => Ready
//!             (push)                                          *3 $7 message $<channel> $<body>
//!                                                                                => Delivered
//!             heartbeat  *1 $4 PING                          -> *2 $4 pong $0 "" (ignored)
//! ```
//!
//! Redis answers a connection's commands in order, so the publisher keeps a FIFO of what each
//! outstanding reply answers (a PING or the tag of a PUBLISH).
//!
//! # Names
//!
//! A message to client `j` is published on channel `names.of(j)`; a subscriber listening on
//! `ch` subscribes to channel `names.of(ch)`.
//!
//! # Limits
//!
//! A bulk string longer than [`MAX_BULK`], an array of more than [`MAX_ARRAY`] elements, arrays
//! nested deeper than [`MAX_DEPTH`] and a simple line longer than [`MAX_LINE`] are refused with a
//! [`DriverError`] before they are buffered.

use std::collections::VecDeque;

use bytes::{Buf, BufMut, BytesMut};

use super::{Driver, DriverError, Endpoint, Event, Role};

/// The longest bulk string accepted: 64 MiB.
pub const MAX_BULK: usize = 64 << 20;

/// The most elements an array may claim.
pub const MAX_ARRAY: usize = 1 << 20;

/// The deepest nesting of arrays accepted (a top-level array is depth 1).
pub const MAX_DEPTH: usize = 8;

/// The longest simple string, error or number line accepted, `\r\n` excluded.
pub const MAX_LINE: usize = 64 << 10;

/// In the publisher's reply FIFO: the reply answers a PING (tags are never 0).
const PING: u64 = 0;

/// The client side of one Redis pub/sub connection.
///
/// Built with [`RedisDriver::new`]; see the module documentation for the bytes it writes.
#[derive(Debug)]
pub struct RedisDriver {
    /// Who this connection is.
    endpoint: Endpoint,
    /// The channel this connection subscribes to; `None` for a publisher.
    channel: Option<Vec<u8>>,
    /// Publisher: what each outstanding reply answers, oldest first: [`PING`] or a send's tag.
    replies: VecDeque<u64>,
    /// `Event::Ready` has been emitted.
    ready: bool,
    /// The client number `to_channel` was built for.
    to_cached: Option<u32>,
    /// The channel of the last `send`'s recipient.
    to_channel: Vec<u8>,
    /// `send` was called on a subscriber (an engine bug); reported by the next `receive`.
    misused: bool,
}

impl RedisDriver {
    /// A driver for `endpoint`. It subscribes if `endpoint.listen` is set and the role is not
    /// [`Role::Publish`]; otherwise it is a publisher. [`Driver::send`] on a subscriber is a
    /// programming error (Redis refuses PUBLISH on a subscribed connection): it fails a
    /// `debug_assert!`, and in release builds writes nothing and makes the next `receive` report
    /// an [`Event::Error`].
    pub fn new(endpoint: Endpoint) -> RedisDriver {
        let channel = match (endpoint.role, endpoint.listen) {
            (Role::Both | Role::Subscribe, Some(ch)) => {
                let mut channel = Vec::new();
                put_name(&mut channel, &endpoint.names.prefix, ch);
                Some(channel)
            }
            _ => None,
        };
        RedisDriver {
            endpoint,
            channel,
            replies: VecDeque::new(),
            ready: false,
            to_cached: None,
            to_channel: Vec::new(),
            misused: false,
        }
    }

    /// The endpoint this driver serves.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Whether this is a subscriber connection (it receives and cannot send).
    pub fn is_subscriber(&self) -> bool {
        self.channel.is_some()
    }

    /// Publisher: how many sends await their reply.
    pub fn in_flight(&self) -> usize {
        self.replies.iter().filter(|&&tag| tag != PING).count()
    }

    /// Handles one complete reply on a publisher connection.
    fn on_publisher_reply(
        &mut self,
        reply: &Reply,
        buf: &[u8],
        events: &mut Vec<Event>,
    ) -> Result<(), DriverError> {
        let Some(answers) = self.replies.pop_front() else {
            if let Reply::Error(text) = reply {
                // Unsolicited: the server is closing the connection (e.g. max clients).
                events.push(Event::Error {
                    fatal: true,
                    text: text_of(buf, text.clone()),
                });
                return Ok(());
            }
            return Err(DriverError(format!(
                "redis: reply {} with no command outstanding",
                reply.describe(buf)
            )));
        };
        match (reply, answers) {
            (Reply::Simple(text), PING) if buf.get(text.clone()) == Some(b"PONG") => {
                if !self.ready {
                    self.ready = true;
                    events.push(Event::Ready);
                }
            }
            (Reply::Integer(_), tag) if tag != PING => {
                events.push(Event::Acked { tag, seq: None });
            }
            (Reply::Error(text), answers) => events.push(Event::Error {
                // An error answering the opening PING (e.g. NOAUTH) means never ready.
                fatal: answers == PING && !self.ready,
                text: text_of(buf, text.clone()),
            }),
            (reply, answers) => {
                return Err(DriverError(format!(
                    "redis: reply {} to {}",
                    reply.describe(buf),
                    if answers == PING { "PING" } else { "PUBLISH" }
                )));
            }
        }
        Ok(())
    }
}

impl Driver for RedisDriver {
    /// A subscriber writes `SUBSCRIBE <channel>`; a publisher writes `PING`. Either way
    /// [`Event::Ready`] follows the server's answer.
    fn start(&mut self, out: &mut BytesMut) {
        match &self.channel {
            Some(channel) => {
                out.reserve(4 + 15 + bulk_len(channel.len()));
                out.put_slice(b"*2\r\n$9\r\nSUBSCRIBE\r\n");
                put_bulk(out, channel);
            }
            None => {
                out.put_slice(b"*1\r\n$4\r\nPING\r\n");
                self.replies.push_back(PING);
            }
        }
    }

    fn receive(
        &mut self,
        input: &mut BytesMut,
        _out: &mut BytesMut,
        events: &mut Vec<Event>,
    ) -> Result<(), DriverError> {
        if self.misused {
            self.misused = false;
            events.push(Event::Error {
                fatal: false,
                text: "redis: send on a subscribed connection (engine bug); nothing sent".into(),
            });
        }
        loop {
            let Some((reply, end)) = parse_reply(input)? else {
                return Ok(());
            };
            match &self.channel {
                None => {
                    self.on_publisher_reply(&reply, input, events)?;
                    input.advance(end);
                }
                Some(channel) => match reply {
                    Reply::Message {
                        channel: ch,
                        payload,
                    } => {
                        if input.get(ch) != Some(channel.as_slice()) {
                            return Err(DriverError(
                                "redis: message on a channel not subscribed to".into(),
                            ));
                        }
                        let frame = input.split_to(end).freeze();
                        events.push(Event::Delivered {
                            body: frame.slice(payload),
                            seq: None,
                        });
                    }
                    Reply::Subscribed { channel: ch } => {
                        if input.get(ch) != Some(channel.as_slice()) || self.ready {
                            return Err(DriverError(
                                "redis: unexpected subscribe confirmation".into(),
                            ));
                        }
                        self.ready = true;
                        events.push(Event::Ready);
                        input.advance(end);
                    }
                    Reply::Pong => input.advance(end),
                    Reply::Simple(text) if input.get(text.clone()) == Some(b"PONG") => {
                        input.advance(end);
                    }
                    Reply::Error(text) => {
                        events.push(Event::Error {
                            // A refused SUBSCRIBE leaves the connection useless.
                            fatal: !self.ready,
                            text: text_of(input, text),
                        });
                        input.advance(end);
                    }
                    other => {
                        return Err(DriverError(format!(
                            "redis: unexpected {} on a subscribed connection",
                            other.describe(input)
                        )));
                    }
                },
            }
        }
    }

    /// Writes `PUBLISH <names.of(to)> <body>` and queues `tag` for the reply. Must not be called
    /// on a subscriber (see [`RedisDriver::new`]).
    fn send(&mut self, to: u32, tag: u64, body: &[u8], out: &mut BytesMut) {
        debug_assert!(
            self.channel.is_none(),
            "send on a subscribed Redis connection"
        );
        debug_assert_ne!(tag, PING, "tags are non-zero");
        if self.channel.is_some() {
            self.misused = true;
            return;
        }
        if self.to_cached != Some(to) {
            put_name(&mut self.to_channel, &self.endpoint.names.prefix, to);
            self.to_cached = Some(to);
        }
        out.reserve(17 + bulk_len(self.to_channel.len()) + bulk_len(body.len()));
        out.put_slice(b"*3\r\n$7\r\nPUBLISH\r\n");
        put_bulk(out, &self.to_channel);
        put_bulk(out, body);
        self.replies.push_back(tag);
    }

    /// Writes `PING` (answered by `+PONG`, or `*2 $4 pong $0` when subscribed; both ignored).
    fn heartbeat(&mut self, out: &mut BytesMut) {
        out.put_slice(b"*1\r\n$4\r\nPING\r\n");
        if self.channel.is_none() {
            self.replies.push_back(PING);
        }
    }

    /// True for a publisher (each PUBLISH is answered), false for a subscriber.
    fn acks_sends(&self) -> bool {
        self.channel.is_none()
    }
}

/// A byte range in the input buffer.
type Span = std::ops::Range<usize>;

/// One complete top-level reply, its strings as spans of the input.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    /// `+text`.
    Simple(Span),
    /// `-text`.
    Error(Span),
    /// `:n`.
    Integer(i64),
    /// `*3 $7 message $channel $payload`.
    Message {
        /// The channel.
        channel: Span,
        /// The message.
        payload: Span,
    },
    /// `*3 $9 subscribe $channel :n`.
    Subscribed {
        /// The channel.
        channel: Span,
    },
    /// `*2 $4 pong $…`: the answer to PING on a subscribed connection.
    Pong,
    /// Any other well-formed value (bulk string, null, other arrays).
    Other,
}

impl Reply {
    /// A short description for error texts.
    fn describe(&self, buf: &[u8]) -> String {
        match self {
            Reply::Simple(s) => format!(
                "+{}",
                String::from_utf8_lossy(buf.get(s.clone()).unwrap_or_default())
            ),
            Reply::Error(s) => format!(
                "-{}",
                String::from_utf8_lossy(buf.get(s.clone()).unwrap_or_default())
            ),
            Reply::Integer(n) => format!(":{n}"),
            Reply::Message { .. } => "message push".into(),
            Reply::Subscribed { .. } => "subscribe confirmation".into(),
            Reply::Pong => "pong push".into(),
            Reply::Other => "unexpected value".into(),
        }
    }
}

/// The text of `span` in `buf`, lossily decoded.
fn text_of(buf: &[u8], span: Span) -> String {
    String::from_utf8_lossy(buf.get(span).unwrap_or_default()).into_owned()
}

/// One RESP2 value found by [`scan`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    /// `+text`.
    Simple(Span),
    /// `-text`.
    Error(Span),
    /// `:n`.
    Integer(i64),
    /// `$len` and its bytes.
    Bulk(Span),
    /// `$-1` or `*-1`.
    Null,
    /// `*count` and that many values (skipped).
    Array(usize),
}

/// Parses one complete reply at the start of `buf`: the reply and its length, `None` if `buf`
/// holds only part of it, an error if it is malformed or over a limit.
fn parse_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, DriverError> {
    let Some(&b'*') = buf.first() else {
        let Some((value, end)) = scan(buf, 0, 0)? else {
            return Ok(None);
        };
        let reply = match value {
            Value::Simple(s) => Reply::Simple(s),
            Value::Error(s) => Reply::Error(s),
            Value::Integer(n) => Reply::Integer(n),
            Value::Bulk(_) | Value::Null | Value::Array(_) => Reply::Other,
        };
        return Ok(Some((reply, end)));
    };
    // An array: keep its first three elements.
    let Some((count, mut at)) = array_header(buf, 0)? else {
        return Ok(None);
    };
    let mut kids: [Option<Value>; 3] = [None, None, None];
    for i in 0..count {
        let Some((value, end)) = scan(buf, at, 1)? else {
            return Ok(None);
        };
        if let Some(slot) = kids.get_mut(i) {
            *slot = Some(value);
        }
        at = end;
    }
    let bulk = |v: &Option<Value>| match v {
        Some(Value::Bulk(s)) => buf.get(s.clone()),
        _ => None,
    };
    let reply = match (count, bulk(&kids[0])) {
        (3, Some(b"message")) => match (&kids[1], &kids[2]) {
            (Some(Value::Bulk(channel)), Some(Value::Bulk(payload))) => Reply::Message {
                channel: channel.clone(),
                payload: payload.clone(),
            },
            _ => Reply::Other,
        },
        (3, Some(b"subscribe")) => match (&kids[1], &kids[2]) {
            (Some(Value::Bulk(channel)), Some(Value::Integer(_))) => Reply::Subscribed {
                channel: channel.clone(),
            },
            _ => Reply::Other,
        },
        (2, Some(b"pong")) => Reply::Pong,
        _ => Reply::Other,
    };
    Ok(Some((reply, at)))
}

/// Reads an array header `*count\r\n` at `at`: `(count, where the elements start)`; a null
/// array (`*-1`) has no elements.
fn array_header(buf: &[u8], at: usize) -> Result<Option<(usize, usize)>, DriverError> {
    let Some((n, end)) = number_line(buf, at + 1)? else {
        return Ok(None);
    };
    match usize::try_from(n) {
        Ok(count) if count <= MAX_ARRAY => Ok(Some((count, end))),
        Ok(_) => Err(DriverError(format!(
            "redis: array of {n} elements exceeds {MAX_ARRAY}"
        ))),
        Err(_) if n == -1 => Ok(Some((0, end))),
        Err(_) => Err(DriverError(format!("redis: array length {n}"))),
    }
}

/// Scans one value starting at `at`, `depth` arrays deep: the value and where it ends.
fn scan(buf: &[u8], at: usize, depth: usize) -> Result<Option<(Value, usize)>, DriverError> {
    let Some(&kind) = buf.get(at) else {
        return Ok(None);
    };
    match kind {
        b'+' | b'-' => {
            let Some(cr) = line_end(buf, at + 1, MAX_LINE)? else {
                return Ok(None);
            };
            let span = at + 1..cr;
            let value = if kind == b'+' {
                Value::Simple(span)
            } else {
                Value::Error(span)
            };
            Ok(Some((value, cr + 2)))
        }
        b':' => Ok(number_line(buf, at + 1)?.map(|(n, end)| (Value::Integer(n), end))),
        b'$' => {
            let Some((n, start)) = number_line(buf, at + 1)? else {
                return Ok(None);
            };
            if n == -1 {
                return Ok(Some((Value::Null, start)));
            }
            let len = match usize::try_from(n) {
                Ok(len) if len <= MAX_BULK => len,
                _ => {
                    return Err(DriverError(format!(
                        "redis: bulk length {n} (limit {MAX_BULK})"
                    )));
                }
            };
            let end = start + len;
            match buf.get(end..end + 2) {
                None => Ok(None),
                Some(b"\r\n") => Ok(Some((Value::Bulk(start..end), end + 2))),
                Some(_) => Err(DriverError("redis: bulk string not ended by CRLF".into())),
            }
        }
        b'*' => {
            if depth >= MAX_DEPTH {
                return Err(DriverError(format!(
                    "redis: arrays nested deeper than {MAX_DEPTH}"
                )));
            }
            let Some((count, mut end)) = array_header(buf, at)? else {
                return Ok(None);
            };
            for _ in 0..count {
                let Some((_, next)) = scan(buf, end, depth + 1)? else {
                    return Ok(None);
                };
                end = next;
            }
            Ok(Some((Value::Array(count), end)))
        }
        other => Err(DriverError(format!(
            "redis: unknown RESP2 type byte {other:#04x}"
        ))),
    }
}

/// Finds the `\r` of the `\r\n` ending the line that starts at `at`; `None` if it has not
/// arrived. Fails on a line longer than `max` or a bare `\r`.
fn line_end(buf: &[u8], at: usize, max: usize) -> Result<Option<usize>, DriverError> {
    let rest = buf.get(at..).unwrap_or_default();
    let window = rest.get(..max.saturating_add(1)).unwrap_or(rest);
    match window.iter().position(|&b| b == b'\r') {
        Some(i) => match rest.get(i + 1) {
            None => Ok(None),
            Some(b'\n') => Ok(Some(at + i)),
            Some(_) => Err(DriverError("redis: CR not followed by LF".into())),
        },
        None if rest.len() > max => {
            Err(DriverError(format!("redis: line longer than {max} bytes")))
        }
        None => Ok(None),
    }
}

/// Reads a decimal `i64` line starting at `at` (after the type byte): the number and where the
/// next value starts.
fn number_line(buf: &[u8], at: usize) -> Result<Option<(i64, usize)>, DriverError> {
    let Some(cr) = line_end(buf, at, 20)? else {
        return Ok(None);
    };
    let digits = buf.get(at..cr).unwrap_or_default();
    let (negative, digits) = match digits {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() {
        return Err(DriverError("redis: empty number".into()));
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return Err(DriverError(format!(
                "redis: bad digit {:?} in a number",
                char::from(d)
            )));
        }
        let d = i64::from(d - b'0');
        n = n
            .checked_mul(10)
            .and_then(|n| {
                if negative {
                    n.checked_sub(d)
                } else {
                    n.checked_add(d)
                }
            })
            .ok_or_else(|| DriverError("redis: number out of range".into()))?;
    }
    Ok(Some((n, cr + 2)))
}

/// The encoded size of a bulk string of `len` bytes, at most (length digits counted as 20).
fn bulk_len(len: usize) -> usize {
    1 + 20 + 2 + len + 2
}

/// Writes a bulk string: `$<len>\r\n<bytes>\r\n`.
fn put_bulk(out: &mut BytesMut, bytes: &[u8]) {
    out.put_u8(b'$');
    put_decimal(out, bytes.len() as u64);
    out.put_slice(b"\r\n");
    out.put_slice(bytes);
    out.put_slice(b"\r\n");
}

/// Writes `n` in decimal.
fn put_decimal(out: &mut BytesMut, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.put_slice(&digits[at..]);
}

/// Replaces `buf` with `names.of(client)` (`<prefix>c<client>`) without allocating once `buf`
/// has grown.
fn put_name(buf: &mut Vec<u8>, prefix: &str, client: u32) {
    buf.clear();
    buf.extend_from_slice(prefix.as_bytes());
    buf.push(b'c');
    let mut digits = [0u8; 10];
    let mut at = digits.len();
    let mut n = client;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[at..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::Names;
    use bytes::Bytes;
    use proptest::prelude::*;

    const SUBSCRIBED: &[u8] = b"*3\r\n$9\r\nsubscribe\r\n$6\r\nlgt-c1\r\n:1\r\n";

    fn endpoint(client: u32, listen: Option<u32>, role: Role) -> Endpoint {
        Endpoint {
            names: Names {
                prefix: "lgt-".into(),
                homes: None,
            },
            client,
            listen,
            role,
        }
    }

    /// A subscriber to channel `lgt-c1`.
    fn subscriber() -> RedisDriver {
        RedisDriver::new(endpoint(1, Some(1), Role::Subscribe))
    }

    /// A publisher (client 0).
    fn publisher() -> RedisDriver {
        RedisDriver::new(endpoint(0, None, Role::Publish))
    }

    /// Feeds `chunks` one by one, as if read from the socket in those pieces; returns the events
    /// and checks nothing is left unconsumed.
    fn feed(driver: &mut RedisDriver, chunks: &[&[u8]]) -> Result<Vec<Event>, DriverError> {
        let mut input = BytesMut::new();
        let mut out = BytesMut::new();
        let mut events = Vec::new();
        for chunk in chunks {
            input.extend_from_slice(chunk);
            driver.receive(&mut input, &mut out, &mut events)?;
        }
        assert!(input.is_empty(), "left over: {input:?}");
        assert!(out.is_empty(), "Redis replies need no answer");
        Ok(events)
    }

    /// Runs `start`, checks what it wrote, feeds `handshake` and checks the driver became ready.
    fn started(mut driver: RedisDriver, wrote: &[u8], handshake: &[u8]) -> RedisDriver {
        let mut out = BytesMut::new();
        driver.start(&mut out);
        assert_eq!(&out[..], wrote);
        assert_eq!(
            feed(&mut driver, &[handshake]).expect("handshake"),
            vec![Event::Ready]
        );
        driver
    }

    fn ready_subscriber() -> RedisDriver {
        started(
            subscriber(),
            b"*2\r\n$9\r\nSUBSCRIBE\r\n$6\r\nlgt-c1\r\n",
            SUBSCRIBED,
        )
    }

    fn ready_publisher() -> RedisDriver {
        started(publisher(), b"*1\r\n$4\r\nPING\r\n", b"+PONG\r\n")
    }

    /// A `message` push as redis-server sends it.
    fn message(channel: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        out.put_slice(b"*3\r\n$7\r\nmessage\r\n");
        put_bulk(&mut out, channel);
        put_bulk(&mut out, payload);
        out.to_vec()
    }

    #[test]
    fn subscriber_start_writes_subscribe_and_ready_on_confirmation() {
        let driver = ready_subscriber();
        assert!(driver.is_subscriber());
        assert!(!driver.acks_sends());
    }

    #[test]
    fn publisher_start_writes_ping_and_ready_on_pong() {
        let driver = ready_publisher();
        assert!(!driver.is_subscriber());
        assert!(driver.acks_sends());
    }

    #[test]
    fn roles_choose_publisher_or_subscriber() {
        assert!(RedisDriver::new(endpoint(1, Some(1), Role::Both)).is_subscriber());
        assert!(!RedisDriver::new(endpoint(1, None, Role::Both)).is_subscriber());
        assert!(!RedisDriver::new(endpoint(1, Some(1), Role::Publish)).is_subscriber());
    }

    #[test]
    fn publish_round_trips_to_subscriber() {
        let mut sender = ready_publisher();
        let mut receiver = ready_subscriber();
        let mut wire = BytesMut::new();
        sender.send(1, 42, b"hel\r\nlo\0", &mut wire);
        assert_eq!(
            &wire[..],
            b"*3\r\n$7\r\nPUBLISH\r\n$6\r\nlgt-c1\r\n$8\r\nhel\r\nlo\0\r\n"
        );
        // Parse the command back as a RESP array, then forward its body as the server would.
        let Some((Reply::Other, end)) = parse_reply(&wire).expect("valid RESP") else {
            panic!("not an array");
        };
        assert_eq!(end, wire.len());
        let events = feed(&mut receiver, &[&message(b"lgt-c1", b"hel\r\nlo\0")]).expect("message");
        assert_eq!(
            events,
            vec![Event::Delivered {
                body: Bytes::from_static(b"hel\r\nlo\0"),
                seq: None
            }]
        );
        assert_eq!(
            feed(&mut sender, &[b":1\r\n"]).expect("reply"),
            vec![Event::Acked { tag: 42, seq: None }]
        );
    }

    #[test]
    fn integer_replies_ack_tags_in_order_around_pings() {
        let mut sender = ready_publisher();
        let mut out = BytesMut::new();
        sender.send(3, 10, b"a", &mut out);
        sender.heartbeat(&mut out);
        sender.send(3, 11, b"b", &mut out);
        sender.send(4, 12, b"c", &mut out);
        assert_eq!(sender.in_flight(), 3);
        let events = feed(&mut sender, &[b":0\r\n+PONG\r\n:1\r\n-ERR boom\r\n"]).expect("replies");
        assert_eq!(
            events,
            vec![
                Event::Acked { tag: 10, seq: None },
                Event::Acked { tag: 11, seq: None },
                Event::Error {
                    fatal: false,
                    text: "ERR boom".into()
                },
            ]
        );
        assert_eq!(sender.in_flight(), 0);
        assert!(
            feed(&mut sender, &[b":1\r\n"]).is_err(),
            "reply with nothing outstanding"
        );
    }

    #[test]
    fn error_answering_opening_ping_is_fatal() {
        let mut driver = publisher();
        driver.start(&mut BytesMut::new());
        let events = feed(&mut driver, &[b"-NOAUTH Authentication required.\r\n"]).expect("error");
        assert!(matches!(&events[..], [Event::Error { fatal: true, .. }]));
    }

    #[test]
    fn unsolicited_error_is_fatal() {
        let mut driver = ready_publisher();
        let events =
            feed(&mut driver, &[b"-ERR max number of clients reached\r\n"]).expect("error");
        assert!(matches!(&events[..], [Event::Error { fatal: true, .. }]));
    }

    #[test]
    fn refused_subscribe_is_fatal_error() {
        let mut driver = subscriber();
        driver.start(&mut BytesMut::new());
        let events = feed(&mut driver, &[b"-NOPERM no\r\n"]).expect("error");
        assert!(matches!(&events[..], [Event::Error { fatal: true, .. }]));
    }

    #[test]
    fn reply_of_wrong_kind_is_error() {
        let mut driver = ready_publisher();
        let mut out = BytesMut::new();
        driver.send(1, 5, b"x", &mut out);
        assert!(
            feed(&mut driver, &[b"+PONG\r\n"]).is_err(),
            "PONG answering PUBLISH"
        );
        let mut driver = ready_publisher();
        driver.heartbeat(&mut out);
        assert!(
            feed(&mut driver, &[b":1\r\n"]).is_err(),
            "integer answering PING"
        );
    }

    #[test]
    #[cfg_attr(
        debug_assertions,
        should_panic = "send on a subscribed Redis connection"
    )]
    fn send_on_subscriber_is_a_programming_error() {
        let mut driver = ready_subscriber();
        let mut out = BytesMut::new();
        driver.send(2, 1, b"x", &mut out);
        // Release builds: nothing written, and the next receive reports it.
        assert!(out.is_empty());
        let events = feed(&mut driver, &[b""]).expect("receive");
        assert!(matches!(&events[..], [Event::Error { fatal: false, .. }]));
    }

    #[test]
    fn subscribed_ping_answers_are_ignored() {
        let mut driver = ready_subscriber();
        let mut out = BytesMut::new();
        driver.heartbeat(&mut out);
        assert_eq!(&out[..], b"*1\r\n$4\r\nPING\r\n");
        let events = feed(
            &mut driver,
            &[b"*2\r\n$4\r\npong\r\n$0\r\n\r\n", b"+PONG\r\n"],
        )
        .expect("pong");
        assert!(events.is_empty());
    }

    #[test]
    fn message_on_other_channel_is_error() {
        let mut driver = ready_subscriber();
        assert!(feed(&mut driver, &[&message(b"lgt-c2", b"x")]).is_err());
    }

    #[test]
    fn second_subscribe_confirmation_is_error() {
        let mut driver = ready_subscriber();
        assert!(feed(&mut driver, &[SUBSCRIBED]).is_err());
    }

    #[test]
    fn delivered_body_is_a_slice_of_input() {
        let mut driver = ready_subscriber();
        let push = message(b"lgt-c1", b"zero-copy body");
        let mut input = BytesMut::from(&push[..]);
        let start = input.as_ptr() as usize;
        let mut events = Vec::new();
        driver
            .receive(&mut input, &mut BytesMut::new(), &mut events)
            .expect("message");
        let [Event::Delivered { body, .. }] = &events[..] else {
            panic!("{events:?}");
        };
        assert_eq!(body.as_ptr() as usize, start + push.len() - 2 - body.len());
    }

    #[test]
    fn subscriber_stream_split_at_every_byte_boundary_gives_same_events() {
        let mut stream = Vec::new();
        stream.extend_from_slice(SUBSCRIBED);
        stream.extend_from_slice(&message(b"lgt-c1", b"first"));
        stream.extend_from_slice(b"*2\r\n$4\r\npong\r\n$0\r\n\r\n");
        stream.extend_from_slice(&message(b"lgt-c1", b""));
        stream.extend_from_slice(&message(b"lgt-c1", &[b'\r'; 150]));
        let run = |chunks: &[&[u8]]| {
            let mut driver = subscriber();
            driver.start(&mut BytesMut::new());
            feed(&mut driver, chunks).expect("stream")
        };
        let whole = run(&[&stream]);
        assert_eq!(whole.len(), 4);
        for cut in 0..=stream.len() {
            let (a, b) = stream.split_at(cut);
            assert_eq!(run(&[a, b]), whole, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(run(&bytes), whole, "one byte at a time");
    }

    #[test]
    fn publisher_stream_split_at_every_byte_boundary_gives_same_events() {
        let stream = b"+PONG\r\n:1\r\n:0\r\n-ERR wrong\r\n+PONG\r\n:12345\r\n";
        let run = |chunks: &[&[u8]]| {
            let mut driver = publisher();
            let mut out = BytesMut::new();
            driver.start(&mut out);
            driver.send(1, 1, b"a", &mut out);
            driver.send(1, 2, b"b", &mut out);
            driver.send(1, 3, b"c", &mut out);
            driver.heartbeat(&mut out);
            driver.send(1, 4, b"d", &mut out);
            feed(&mut driver, chunks).expect("stream")
        };
        let whole = run(&[stream]);
        assert_eq!(whole.len(), 5);
        for cut in 0..=stream.len() {
            let (a, b) = stream.split_at(cut);
            assert_eq!(run(&[a, b]), whole, "cut at {cut}");
        }
    }

    #[test]
    fn parser_handles_every_resp2_type() {
        let cases: [(&[u8], Reply); 8] = [
            (b"+OK\r\n", Reply::Simple(1..3)),
            (b"-ERR x\r\n", Reply::Error(1..6)),
            (b":-42\r\n", Reply::Integer(-42)),
            (b"$3\r\nabc\r\n", Reply::Other),
            (b"$-1\r\n", Reply::Other),
            (b"*-1\r\n", Reply::Other),
            (b"*0\r\n", Reply::Other),
            (b"*2\r\n*2\r\n:1\r\n$-1\r\n*1\r\n+x\r\n", Reply::Other),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                parse_reply(bytes).expect("valid"),
                Some((want, bytes.len())),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
            for cut in 0..bytes.len() {
                assert_eq!(parse_reply(&bytes[..cut]).expect("valid prefix"), None);
            }
        }
        assert_eq!(
            parse_reply(b":9223372036854775807\r\n").expect("max"),
            Some((Reply::Integer(i64::MAX), 22))
        );
        assert_eq!(
            parse_reply(b":-9223372036854775808\r\n").expect("min"),
            Some((Reply::Integer(i64::MIN), 23))
        );
    }

    #[test]
    fn garbage_gives_driver_error() {
        let deep = "*1\r\n".repeat(MAX_DEPTH + 1) + ":1\r\n";
        let long_line = format!("+{}", "x".repeat(MAX_LINE + 1));
        let cases: [&[u8]; 14] = [
            b"HTTP/1.1 400 Bad Request\r\n",
            b"?\r\n",
            b":\r\n",
            b":12a\r\n",
            b":99999999999999999999\r\n",
            b":1\rx",
            b"$-2\r\n",
            b"$3\r\nabcd\r\n",
            b"$67108865\r\n",
            b"*-2\r\n",
            b"*1048577\r\n",
            b":123456789012345678901",
            deep.as_bytes(),
            long_line.as_bytes(),
        ];
        for garbage in cases {
            let shown = String::from_utf8_lossy(&garbage[..garbage.len().min(40)]).into_owned();
            assert!(parse_reply(garbage).is_err(), "{shown}");
            let mut driver = ready_subscriber();
            assert!(feed(&mut driver, &[garbage]).is_err(), "{shown}");
        }
        // Well-formed but unexpected values.
        for unexpected in [
            &b"$1\r\nx\r\n"[..],
            b":1\r\n",
            b"*3\r\n$7\r\nmessage\r\n$6\r\nlgt-c1\r\n:1\r\n",
        ] {
            let mut driver = ready_subscriber();
            assert!(feed(&mut driver, &[unexpected]).is_err());
        }
    }

    #[test]
    fn bulk_at_limit_waits_for_more_input() {
        let header = format!("$\r\n{MAX_BULK}\r\n");
        assert!(parse_reply(header.as_bytes()).is_err(), "empty length");
        let header = format!("${MAX_BULK}\r\n");
        assert_eq!(parse_reply(header.as_bytes()).expect("at limit"), None);
    }

    #[test]
    fn send_reuses_cached_channel_and_switches_recipient() {
        let mut driver = ready_publisher();
        let mut out = BytesMut::new();
        driver.send(12, 1, b"a", &mut out);
        driver.send(12, 2, b"b", &mut out);
        driver.send(3, 3, b"c", &mut out);
        assert_eq!(
            &out[..],
            &b"*3\r\n$7\r\nPUBLISH\r\n$7\r\nlgt-c12\r\n$1\r\na\r\n\
               *3\r\n$7\r\nPUBLISH\r\n$7\r\nlgt-c12\r\n$1\r\nb\r\n\
               *3\r\n$7\r\nPUBLISH\r\n$6\r\nlgt-c3\r\n$1\r\nc\r\n"[..]
        );
    }

    #[test]
    fn names_match_names_of() {
        let names = Names {
            prefix: "run-x-".into(),
            homes: None,
        };
        let mut buf = Vec::new();
        for client in [0, 1, 9, 10, 99, 12345, u32::MAX] {
            put_name(&mut buf, &names.prefix, client);
            assert_eq!(buf, names.of(client).into_bytes());
        }
        let mut out = BytesMut::new();
        for n in [0, 7, 10, 65535, u64::MAX] {
            out.clear();
            put_decimal(&mut out, n);
            assert_eq!(&out[..], n.to_string().as_bytes());
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_receive(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            cut in 0usize..512,
            subscribing in any::<bool>(),
        ) {
            let mut driver = if subscribing { subscriber() } else { publisher() };
            let mut out = BytesMut::new();
            driver.start(&mut out);
            if !subscribing {
                driver.send(1, 1, b"x", &mut out);
            }
            let mut input = BytesMut::new();
            let mut events = Vec::new();
            let cut = cut.min(bytes.len());
            input.extend_from_slice(&bytes[..cut]);
            if driver.receive(&mut input, &mut out, &mut events).is_ok() {
                input.extend_from_slice(&bytes[cut..]);
                let _ = driver.receive(&mut input, &mut out, &mut events);
            }
        }

        #[test]
        fn arbitrary_resp_shaped_bytes_never_panic_parser(
            parts in proptest::collection::vec(
                prop_oneof![
                    Just(&b"*"[..]), Just(&b"$"[..]), Just(&b":"[..]), Just(&b"+"[..]),
                    Just(&b"-"[..]), Just(&b"\r\n"[..]), Just(&b"1"[..]), Just(&b"3"[..]),
                    Just(&b"-1"[..]), Just(&b"message"[..]), Just(&b"lgt-c1"[..]),
                ],
                0..40,
            ),
        ) {
            let bytes = parts.concat();
            let _ = parse_reply(&bytes);
            let mut driver = ready_subscriber();
            let mut input = BytesMut::from(&bytes[..]);
            let _ = driver.receive(&mut input, &mut BytesMut::new(), &mut Vec::new());
        }

        #[test]
        fn arbitrary_messages_round_trip(
            body in proptest::collection::vec(any::<u8>(), 0..300),
            cut in 0usize..400,
        ) {
            let push = message(b"lgt-c1", &body);
            let cut = cut.min(push.len());
            let mut driver = ready_subscriber();
            let events = feed(&mut driver, &[&push[..cut], &push[cut..]]).expect("message");
            prop_assert_eq!(events, vec![Event::Delivered { body: body.into(), seq: None }]);
        }
    }

    /// Against a real server: `LOADGEN_REDIS_ADDR=127.0.0.1:16380 cargo test -p parley-loadgen
    /// --lib driver::redis -- --ignored`.
    #[test]
    #[ignore = "needs a running redis-server at LOADGEN_REDIS_ADDR"]
    fn real_server_round_trips_messages_and_acks() {
        use std::io::{ErrorKind, Read, Write};
        use std::net::TcpStream;
        use std::time::{Duration, Instant};

        let addr = std::env::var("LOADGEN_REDIS_ADDR").expect("set LOADGEN_REDIS_ADDR");

        struct Conn {
            stream: TcpStream,
            driver: RedisDriver,
            input: BytesMut,
            events: Vec<Event>,
        }
        impl Conn {
            fn open(addr: &str, driver: RedisDriver) -> Conn {
                let stream = TcpStream::connect(addr).expect("connect");
                stream
                    .set_read_timeout(Some(Duration::from_millis(20)))
                    .expect("timeout");
                stream.set_nodelay(true).expect("nodelay");
                let mut conn = Conn {
                    stream,
                    driver,
                    input: BytesMut::new(),
                    events: Vec::new(),
                };
                let mut out = BytesMut::new();
                conn.driver.start(&mut out);
                conn.write(&out);
                conn
            }
            fn write(&mut self, out: &[u8]) {
                self.stream.write_all(out).expect("write");
            }
            fn pump(&mut self) {
                let mut buf = [0u8; 65536];
                match self.stream.read(&mut buf) {
                    Ok(0) => panic!("server closed the connection"),
                    Ok(n) => self.input.extend_from_slice(&buf[..n]),
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        return;
                    }
                    Err(e) => panic!("read: {e}"),
                }
                let mut out = BytesMut::new();
                self.driver
                    .receive(&mut self.input, &mut out, &mut self.events)
                    .expect("receive");
                self.write(&out);
            }
        }
        fn wait(conns: &mut [&mut Conn], done: impl Fn(&[&mut Conn]) -> bool) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !done(conns) {
                assert!(Instant::now() < deadline, "timed out");
                for conn in conns.iter_mut() {
                    conn.pump();
                }
            }
        }

        let names = Names {
            prefix: format!("lgtest-{}-", std::process::id()),
            homes: None,
        };
        let ep = |client, listen, role| Endpoint {
            names: names.clone(),
            client,
            listen,
            role,
        };
        let mut sub = Conn::open(&addr, RedisDriver::new(ep(1, Some(1), Role::Subscribe)));
        let mut publ = Conn::open(&addr, RedisDriver::new(ep(1, None, Role::Publish)));
        wait(&mut [&mut sub, &mut publ], |c| {
            c.iter().all(|c| c.events == [Event::Ready])
        });
        sub.events.clear();
        publ.events.clear();
        // Heartbeats on both, interleaved with the sends.
        let mut out = BytesMut::new();
        sub.driver.heartbeat(&mut out);
        sub.write(&out);
        let mut bodies: Vec<Vec<u8>> = (0..100u32)
            .map(|i| format!("message {i}\r\n").into_bytes())
            .collect();
        bodies.push(vec![0xff; 100_000]);
        bodies.push(Vec::new());
        let mut out = BytesMut::new();
        for (i, body) in bodies.iter().enumerate() {
            publ.driver.send(1, i as u64 + 1, body, &mut out);
            if i == 50 {
                publ.driver.heartbeat(&mut out);
            }
        }
        // A publish to a channel nobody listens on is answered `:0`, still an ack.
        publ.driver.send(2, 1000, b"nobody", &mut out);
        publ.write(&out);
        wait(&mut [&mut sub, &mut publ], |c| {
            c[0].events.len() >= bodies.len() && c[1].events.len() > bodies.len()
        });
        let delivered: Vec<Vec<u8>> = sub
            .events
            .iter()
            .map(|e| match e {
                Event::Delivered { body, seq: None } => body.to_vec(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(delivered, bodies);
        let mut acked: Vec<Event> = (1..=bodies.len() as u64)
            .map(|tag| Event::Acked { tag, seq: None })
            .collect();
        acked.push(Event::Acked {
            tag: 1000,
            seq: None,
        });
        assert_eq!(publ.events, acked);
        assert_eq!(publ.driver.in_flight(), 0);
    }
}
