//! MQTT 3.1.1 client driver (mosquitto and any other 3.1.1 broker), QoS 0 and QoS 1, sans-IO.
//!
//! # What goes on the wire
//!
//! Every packet is a fixed header byte, a remaining length (a base-128 varint of 1..=4 bytes,
//! least significant group first, bit 7 = "more"), then the variable header and payload. Integers
//! are big-endian `u16`; strings are a `u16` length then UTF-8 bytes.
//!
//! ```text
//! CONNECT    10 rl | 00 04 'M' 'Q' 'T' 'T' | 04 (level) | 02 (clean session) | keep-alive u16
//!                  | client-id string
//! SUBSCRIBE  82 rl | packet-id u16 | topic string | requested QoS u8
//! PUBLISH    3q rl | topic string | [packet-id u16 if QoS 1] | payload      (q = QoS << 1)
//! PUBACK     40 02 | packet-id u16
//! PINGREQ    c0 00
//! from the broker:
//! CONNACK    20 02 | flags u8 | return code u8 (0 = accepted)
//! SUBACK     90 rl | packet-id u16 | granted QoS u8 (0x80 = failure)
//! PUBACK     40 02 | packet-id u16
//! PINGRESP   d0 00
//! ```
//!
//! # Names
//!
//! The client id is `names.of(client)`, plus `-p` for a [`Role::Publish`] connection and `-s`
//! for a [`Role::Subscribe`] one, so that the two connections of one client do not take each
//! other's session over. A message to client `j` is published on topic `names.of(j)`; a
//! connection listening on `ch` subscribes to topic `names.of(ch)`. The prefix must not hold the
//! MQTT wildcards `+` and `#`.
//!
//! # Limits
//!
//! - An incoming packet larger than [`MAX_INCOMING`] is refused (a [`DriverError`]) before it is
//!   buffered.
//! - At most 65 535 QoS 1 publishes (minus the SUBSCRIBE while its SUBACK is pending) can be
//!   unacknowledged at once; a `send` beyond that writes nothing and the next `receive` fails.
//! - A body that does not fit MQTT's largest packet (256 MiB) is likewise refused.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use bytes::{Buf, BufMut, BytesMut};

use super::{Driver, DriverError, Endpoint, Event, Role};

/// The largest incoming packet (fixed header excluded) the driver buffers: 64 MiB.
pub const MAX_INCOMING: usize = 64 << 20;

/// The largest remaining length a 4-byte varint can carry (MQTT's packet size limit).
const MAX_REMAINING: usize = 268_435_455;

/// The packet id of the (single) SUBSCRIBE. Publish packet ids skip it while its SUBACK is
/// pending.
const SUBSCRIBE_PID: u16 = 1;

/// The longest run prefix accepted: keeps every name far below MQTT's 65 535-byte strings.
const MAX_PREFIX: usize = 1024;

/// A hasher for `u16` packet ids: a Fibonacci multiply, which spreads ids over all 64 bits (the
/// hash table uses both the low and the top bits).
#[derive(Debug, Default)]
struct PidHasher(u64);

impl Hasher for PidHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u16(&mut self, n: u16) {
        self.0 = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Packet id -> the tag of the QoS 1 publish it carries, until its PUBACK.
type Inflight = HashMap<u16, u64, BuildHasherDefault<PidHasher>>;

/// The client side of one MQTT 3.1.1 connection.
///
/// Built with [`MqttDriver::new`]; see the module documentation for the bytes it writes.
#[derive(Debug)]
pub struct MqttDriver {
    /// Who this connection is.
    endpoint: Endpoint,
    /// The QoS of every publish and of the subscription: 0 or 1.
    qos: u8,
    /// The keep-alive announced in CONNECT, in seconds.
    keep_alive_secs: u16,
    /// The client id sent in CONNECT.
    client_id: Vec<u8>,
    /// The subscribed topic, when the connection listens.
    sub_topic: Option<Vec<u8>>,
    /// A CONNACK with return code 0 has arrived.
    connacked: bool,
    /// The SUBSCRIBE was written and its SUBACK has not arrived.
    suback_pending: bool,
    /// The next packet id to try for a QoS 1 publish.
    next_pid: u16,
    /// Unacknowledged QoS 1 publishes.
    inflight: Inflight,
    /// The client number `to_topic` was built for.
    to_cached: Option<u32>,
    /// The topic of the last `send`'s recipient.
    to_topic: Vec<u8>,
    /// A failure found while sending, reported by the next `receive`.
    failed: Option<String>,
}

impl MqttDriver {
    /// A driver for `endpoint` publishing and subscribing at `qos` (0 or 1), announcing a
    /// keep-alive of `keep_alive_secs` (0 turns the broker's keep-alive check off; the engine
    /// should call [`Driver::heartbeat`] well within it).
    ///
    /// # Panics
    ///
    /// If `qos` is above 1 or the run prefix is longer than 1024 bytes (configuration errors).
    pub fn new(endpoint: Endpoint, qos: u8, keep_alive_secs: u16) -> MqttDriver {
        assert!(qos <= 1, "MQTT driver supports QoS 0 and 1, not {qos}");
        assert!(
            endpoint.names.prefix.len() <= MAX_PREFIX,
            "run prefix longer than {MAX_PREFIX} bytes"
        );
        let mut client_id = Vec::new();
        put_name(&mut client_id, &endpoint.names.prefix, endpoint.client);
        match endpoint.role {
            Role::Both => {}
            Role::Publish => client_id.extend_from_slice(b"-p"),
            Role::Subscribe => client_id.extend_from_slice(b"-s"),
        }
        let sub_topic = endpoint.listen.map(|ch| {
            let mut topic = Vec::new();
            put_name(&mut topic, &endpoint.names.prefix, ch);
            topic
        });
        MqttDriver {
            endpoint,
            qos,
            keep_alive_secs,
            client_id,
            sub_topic,
            connacked: false,
            suback_pending: false,
            next_pid: SUBSCRIBE_PID.wrapping_add(1),
            inflight: Inflight::default(),
            to_cached: None,
            to_topic: Vec::new(),
            failed: None,
        }
    }

    /// The endpoint this driver serves.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// How many QoS 1 publishes await their PUBACK.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// A free packet id for a QoS 1 publish, or `None` if all 65 535 are taken.
    fn alloc_pid(&mut self) -> Option<u16> {
        let reserved = self.inflight.len() + usize::from(self.suback_pending);
        if reserved >= usize::from(u16::MAX) {
            return None;
        }
        // A free id exists, so this loop ends within 65 535 turns (in practice, at once).
        loop {
            let pid = self.next_pid;
            self.next_pid = if pid == u16::MAX { 1 } else { pid + 1 };
            let taken =
                (self.suback_pending && pid == SUBSCRIBE_PID) || self.inflight.contains_key(&pid);
            if !taken {
                return Some(pid);
            }
        }
    }

    /// Handles the complete PUBLISH `input[..total]` whose fixed header is `header_len` bytes.
    fn on_publish(
        &mut self,
        first: u8,
        header_len: usize,
        total: usize,
        input: &mut BytesMut,
        out: &mut BytesMut,
        events: &mut Vec<Event>,
    ) -> Result<(), DriverError> {
        let qos = (first >> 1) & 3;
        let packet = input
            .get(header_len..total)
            .ok_or_else(|| DriverError("mqtt: PUBLISH shorter than its header".into()))?;
        let (topic_len, rest) =
            split_u16(packet).ok_or_else(|| DriverError("mqtt: PUBLISH without a topic".into()))?;
        let topic = rest
            .get(..usize::from(topic_len))
            .ok_or_else(|| DriverError("mqtt: PUBLISH topic runs past the packet".into()))?;
        match &self.sub_topic {
            Some(sub) if sub.as_slice() == topic => {}
            _ => {
                return Err(DriverError(format!(
                    "mqtt: PUBLISH on topic {:?}, which this connection did not subscribe to",
                    String::from_utf8_lossy(topic)
                )));
            }
        }
        let mut payload_at = header_len + 2 + usize::from(topic_len);
        let pid = match qos {
            0 => None,
            1 => {
                let (pid, _) = rest
                    .get(usize::from(topic_len)..)
                    .and_then(split_u16)
                    .ok_or_else(|| DriverError("mqtt: QoS 1 PUBLISH without packet id".into()))?;
                if pid == 0 {
                    return Err(DriverError("mqtt: QoS 1 PUBLISH with packet id 0".into()));
                }
                payload_at += 2;
                Some(pid)
            }
            _ => {
                return Err(DriverError(format!(
                    "mqtt: PUBLISH at QoS {qos}, above the subscription's"
                )));
            }
        };
        let frame = input.split_to(total).freeze();
        events.push(Event::Delivered {
            body: frame.slice(payload_at..),
            seq: None,
        });
        if let Some(pid) = pid {
            let [hi, lo] = pid.to_be_bytes();
            out.put_slice(&[0x40, 0x02, hi, lo]);
        }
        Ok(())
    }

    /// Handles a complete packet other than PUBLISH: `first` is its fixed header byte and `body`
    /// what follows the remaining length.
    fn on_control(
        &mut self,
        first: u8,
        body: &[u8],
        events: &mut Vec<Event>,
    ) -> Result<(), DriverError> {
        match first {
            0x20 => {
                let [_flags, code] = *body else {
                    return Err(DriverError(format!(
                        "mqtt: CONNACK of {} bytes, not 2",
                        body.len()
                    )));
                };
                if self.connacked {
                    return Err(DriverError("mqtt: second CONNACK".into()));
                }
                if code != 0 {
                    events.push(Event::Error {
                        fatal: true,
                        text: format!("mqtt: connection refused: {}", connack_reason(code)),
                    });
                    return Ok(());
                }
                self.connacked = true;
                if !self.suback_pending {
                    events.push(Event::Ready);
                }
            }
            0x40 => {
                let [hi, lo] = *body else {
                    return Err(DriverError(format!(
                        "mqtt: PUBACK of {} bytes, not 2",
                        body.len()
                    )));
                };
                let pid = u16::from_be_bytes([hi, lo]);
                let tag = self.inflight.remove(&pid).ok_or_else(|| {
                    DriverError(format!("mqtt: PUBACK for packet id {pid}, not in flight"))
                })?;
                events.push(Event::Acked { tag, seq: None });
            }
            0x90 => {
                let [hi, lo, granted] = *body else {
                    return Err(DriverError(format!(
                        "mqtt: SUBACK of {} bytes, not 3 (one topic)",
                        body.len()
                    )));
                };
                let pid = u16::from_be_bytes([hi, lo]);
                if !self.suback_pending || pid != SUBSCRIBE_PID {
                    return Err(DriverError(format!(
                        "mqtt: unexpected SUBACK for packet id {pid}"
                    )));
                }
                self.suback_pending = false;
                if granted == 0x80 || granted > self.qos {
                    events.push(Event::Error {
                        fatal: true,
                        text: format!("mqtt: subscription refused (granted QoS {granted:#04x})"),
                    });
                    return Ok(());
                }
                events.push(Event::Ready);
            }
            0xd0 => {
                if !body.is_empty() {
                    return Err(DriverError("mqtt: PINGRESP with a body".into()));
                }
            }
            _ => {
                return Err(DriverError(format!(
                    "mqtt: unexpected packet with header byte {first:#04x}"
                )));
            }
        }
        Ok(())
    }
}

impl Driver for MqttDriver {
    fn start(&mut self, out: &mut BytesMut) {
        let id = &self.client_id;
        let remaining = 10 + 2 + id.len();
        out.reserve(1 + 4 + remaining);
        out.put_u8(0x10);
        put_varint(out, remaining);
        out.put_slice(&[0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02]);
        out.put_u16(self.keep_alive_secs);
        put_str(out, id);
        if let Some(topic) = &self.sub_topic {
            let remaining = 2 + 2 + topic.len() + 1;
            out.reserve(1 + 4 + remaining);
            out.put_u8(0x82);
            put_varint(out, remaining);
            out.put_u16(SUBSCRIBE_PID);
            put_str(out, topic);
            out.put_u8(self.qos);
            self.suback_pending = true;
        }
    }

    fn receive(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
        events: &mut Vec<Event>,
    ) -> Result<(), DriverError> {
        if let Some(failure) = self.failed.take() {
            return Err(DriverError(failure));
        }
        loop {
            let Some((first, header_len, remaining)) = decode_header(input)? else {
                return Ok(());
            };
            let total = header_len + remaining;
            if input.len() < total {
                input.reserve(total - input.len());
                return Ok(());
            }
            if !self.connacked && first != 0x20 {
                return Err(DriverError(format!(
                    "mqtt: packet {first:#04x} before CONNACK"
                )));
            }
            if first >> 4 == 3 {
                self.on_publish(first, header_len, total, input, out, events)?;
            } else {
                let body = input.get(header_len..total).unwrap_or_default();
                self.on_control(first, body, events)?;
                input.advance(total);
            }
        }
    }

    /// Publishes `body` on topic `names.of(to)` at the driver's QoS.
    fn send(&mut self, to: u32, tag: u64, body: &[u8], out: &mut BytesMut) {
        let pid = if self.qos == 1 {
            match self.alloc_pid() {
                Some(pid) => Some(pid),
                None => {
                    self.failed = Some("mqtt: 65535 QoS 1 publishes in flight".into());
                    return;
                }
            }
        } else {
            None
        };
        if self.to_cached != Some(to) {
            put_name(&mut self.to_topic, &self.endpoint.names.prefix, to);
            self.to_cached = Some(to);
        }
        let topic = &self.to_topic;
        let remaining = 2 + topic.len() + if pid.is_some() { 2 } else { 0 } + body.len();
        if remaining > MAX_REMAINING {
            self.failed = Some(format!("mqtt: body of {} bytes too large", body.len()));
            return;
        }
        out.reserve(1 + 4 + remaining);
        out.put_u8(0x30 | self.qos << 1);
        put_varint(out, remaining);
        put_str(out, topic);
        if let Some(pid) = pid {
            out.put_u16(pid);
            self.inflight.insert(pid, tag);
        }
        out.put_slice(body);
    }

    /// Writes PINGREQ; the broker's PINGRESP is ignored.
    fn heartbeat(&mut self, out: &mut BytesMut) {
        out.put_slice(&[0xc0, 0x00]);
    }

    /// True for QoS 1 (PUBACK), false for QoS 0.
    fn acks_sends(&self) -> bool {
        self.qos == 1
    }
}

/// Reads a fixed header at the start of `input`: `(header byte, header length, remaining
/// length)`, `None` if incomplete. Fails on a packet type a broker never sends (or with the wrong
/// flags), on a varint longer than 4 bytes and on a packet larger than [`MAX_INCOMING`].
fn decode_header(input: &[u8]) -> Result<Option<(u8, usize, usize)>, DriverError> {
    let Some(&first) = input.first() else {
        return Ok(None);
    };
    let known = match first >> 4 {
        // CONNACK, PUBACK, SUBACK, PINGRESP: flags must be 0.
        2 | 4 | 9 | 13 => first & 0x0f == 0,
        // PUBLISH: any DUP/RETAIN, QoS 3 is malformed.
        3 => (first >> 1) & 3 != 3,
        _ => false,
    };
    if !known {
        return Err(DriverError(format!(
            "mqtt: unexpected packet with header byte {first:#04x}"
        )));
    }
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&byte) = input.get(1 + i) else {
            return Ok(None);
        };
        remaining |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            if remaining > MAX_INCOMING {
                return Err(DriverError(format!(
                    "mqtt: packet of {remaining} bytes exceeds the {MAX_INCOMING}-byte limit"
                )));
            }
            return Ok(Some((first, 2 + i, remaining)));
        }
    }
    Err(DriverError(
        "mqtt: remaining length longer than 4 bytes".into(),
    ))
}

/// Writes `n` (at most [`MAX_REMAINING`]) as an MQTT remaining-length varint.
fn put_varint(out: &mut BytesMut, mut n: usize) {
    debug_assert!(n <= MAX_REMAINING);
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.put_u8(byte);
            return;
        }
        out.put_u8(byte | 0x80);
    }
}

/// Writes an MQTT string: a `u16` length then the bytes (at most 65 535; names are kept far
/// shorter by [`MAX_PREFIX`]).
fn put_str(out: &mut BytesMut, s: &[u8]) {
    debug_assert!(s.len() <= usize::from(u16::MAX));
    out.put_u16(s.len() as u16);
    out.put_slice(s);
}

/// Splits a big-endian `u16` off the front of `b`.
fn split_u16(b: &[u8]) -> Option<(u16, &[u8])> {
    match b {
        [hi, lo, rest @ ..] => Some((u16::from_be_bytes([*hi, *lo]), rest)),
        _ => None,
    }
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

/// The words for a CONNACK return code.
fn connack_reason(code: u8) -> String {
    let why = match code {
        1 => "unacceptable protocol version",
        2 => "identifier rejected",
        3 => "server unavailable",
        4 => "bad user name or password",
        5 => "not authorized",
        _ => "unknown return code",
    };
    format!("{why} ({code})")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::Names;
    use bytes::Bytes;
    use proptest::prelude::*;

    const CONNACK_OK: &[u8] = &[0x20, 0x02, 0x00, 0x00];
    const SUBACK_QOS1: &[u8] = &[0x90, 0x03, 0x00, 0x01, 0x01];
    const SUBACK_QOS0: &[u8] = &[0x90, 0x03, 0x00, 0x01, 0x00];

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

    /// A subscriber on its own topic (`lgt-c1`), at `qos`.
    fn subscriber(qos: u8) -> MqttDriver {
        MqttDriver::new(endpoint(1, Some(1), Role::Subscribe), qos, 30)
    }

    /// A publisher (client 0, no subscription), at `qos`.
    fn publisher(qos: u8) -> MqttDriver {
        MqttDriver::new(endpoint(0, None, Role::Publish), qos, 30)
    }

    /// Runs `start` and feeds `handshake`, checking the driver became ready.
    fn started(mut driver: MqttDriver, handshake: &[&[u8]]) -> MqttDriver {
        let mut out = BytesMut::new();
        driver.start(&mut out);
        let (events, _) = feed(&mut driver, handshake).expect("handshake");
        assert_eq!(events, vec![Event::Ready]);
        driver
    }

    /// Feeds `chunks` one by one, as if read from the socket in those pieces; returns the events
    /// and what the driver wrote, and checks nothing is left unconsumed.
    fn feed(
        driver: &mut MqttDriver,
        chunks: &[&[u8]],
    ) -> Result<(Vec<Event>, BytesMut), DriverError> {
        let mut input = BytesMut::new();
        let mut out = BytesMut::new();
        let mut events = Vec::new();
        for chunk in chunks {
            input.extend_from_slice(chunk);
            driver.receive(&mut input, &mut out, &mut events)?;
        }
        assert!(input.is_empty(), "left over: {input:?}");
        Ok((events, out))
    }

    /// A PUBLISH as the broker forwards it.
    fn publish_packet(topic: &[u8], pid: Option<u16>, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        let remaining = 2 + topic.len() + pid.map_or(0, |_| 2) + payload.len();
        out.put_u8(if pid.is_some() { 0x32 } else { 0x30 });
        put_varint(&mut out, remaining);
        put_str(&mut out, topic);
        if let Some(pid) = pid {
            out.put_u16(pid);
        }
        out.put_slice(payload);
        out.to_vec()
    }

    #[test]
    fn start_writes_connect_then_subscribe_bytes() {
        let mut driver = subscriber(1);
        let mut out = BytesMut::new();
        driver.start(&mut out);
        let mut want = vec![0x10, 20, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30, 0, 8];
        want.extend_from_slice(b"lgt-c1-s");
        want.extend_from_slice(&[0x82, 11, 0, 1, 0, 6]);
        want.extend_from_slice(b"lgt-c1");
        want.push(1);
        assert_eq!(&out[..], &want[..]);
    }

    #[test]
    fn client_ids_carry_role_suffix() {
        for (role, id) in [
            (Role::Both, &b"lgt-c7"[..]),
            (Role::Publish, b"lgt-c7-p"),
            (Role::Subscribe, b"lgt-c7-s"),
        ] {
            let driver = MqttDriver::new(endpoint(7, None, role), 0, 0);
            assert_eq!(driver.client_id, id);
        }
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
    }

    #[test]
    fn ready_only_after_connack_and_suback() {
        let mut driver = subscriber(1);
        driver.start(&mut BytesMut::new());
        let (events, _) = feed(&mut driver, &[CONNACK_OK]).expect("connack");
        assert!(events.is_empty());
        let (events, _) = feed(&mut driver, &[SUBACK_QOS1]).expect("suback");
        assert_eq!(events, vec![Event::Ready]);
    }

    #[test]
    fn ready_on_connack_without_subscription() {
        let mut driver = publisher(1);
        let mut out = BytesMut::new();
        driver.start(&mut out);
        assert_eq!(out[0], 0x10);
        assert_eq!(out.len(), 2 + 20, "CONNECT only, no SUBSCRIBE");
        let (events, _) = feed(&mut driver, &[CONNACK_OK]).expect("connack");
        assert_eq!(events, vec![Event::Ready]);
    }

    #[test]
    fn connack_refusal_is_fatal_error() {
        let mut driver = subscriber(0);
        driver.start(&mut BytesMut::new());
        let (events, _) = feed(&mut driver, &[&[0x20, 0x02, 0x00, 0x05]]).expect("connack");
        assert!(
            matches!(&events[..], [Event::Error { fatal: true, text }] if text.contains("not authorized"))
        );
    }

    #[test]
    fn suback_failure_is_fatal_error() {
        let mut driver = subscriber(1);
        driver.start(&mut BytesMut::new());
        let (events, _) =
            feed(&mut driver, &[CONNACK_OK, &[0x90, 0x03, 0x00, 0x01, 0x80]]).expect("suback");
        assert!(matches!(&events[..], [Event::Error { fatal: true, .. }]));
    }

    #[test]
    fn suback_granting_lower_qos_is_accepted() {
        started(subscriber(1), &[CONNACK_OK, SUBACK_QOS0]);
    }

    #[test]
    fn suback_for_other_packet_id_is_error() {
        let mut driver = subscriber(1);
        driver.start(&mut BytesMut::new());
        assert!(feed(&mut driver, &[CONNACK_OK, &[0x90, 0x03, 0x00, 0x02, 0x01]]).is_err());
    }

    #[test]
    fn packet_before_connack_is_error() {
        let mut driver = subscriber(1);
        driver.start(&mut BytesMut::new());
        assert!(feed(&mut driver, &[SUBACK_QOS1]).is_err());
    }

    #[test]
    fn second_connack_is_error() {
        let mut driver = started(publisher(0), &[CONNACK_OK]);
        assert!(feed(&mut driver, &[CONNACK_OK]).is_err());
    }

    #[test]
    fn qos0_publish_round_trips() {
        let mut sender = started(publisher(0), &[CONNACK_OK]);
        let mut receiver = started(subscriber(0), &[CONNACK_OK, SUBACK_QOS0]);
        let mut wire = BytesMut::new();
        sender.send(1, 42, b"hello", &mut wire);
        assert_eq!(&wire[..], &publish_packet(b"lgt-c1", None, b"hello")[..]);
        assert!(!sender.acks_sends());
        let (events, out) = feed(&mut receiver, &[&wire]).expect("publish");
        assert_eq!(
            events,
            vec![Event::Delivered {
                body: Bytes::from_static(b"hello"),
                seq: None
            }]
        );
        assert!(out.is_empty(), "no PUBACK at QoS 0");
    }

    #[test]
    fn qos1_publish_round_trips_and_receiver_writes_puback() {
        let mut sender = started(publisher(1), &[CONNACK_OK]);
        let mut receiver = started(subscriber(1), &[CONNACK_OK, SUBACK_QOS1]);
        let mut wire = BytesMut::new();
        sender.send(1, 42, b"payload", &mut wire);
        // QoS 1, packet id 2 (1 is the SUBSCRIBE's).
        assert_eq!(
            &wire[..],
            &publish_packet(b"lgt-c1", Some(2), b"payload")[..]
        );
        let (events, out) = feed(&mut receiver, &[&wire]).expect("publish");
        assert_eq!(
            events,
            vec![Event::Delivered {
                body: Bytes::from_static(b"payload"),
                seq: None
            }]
        );
        assert_eq!(&out[..], &[0x40, 0x02, 0x00, 0x02]);
        // The receiver's PUBACK, read back by the sender as if the broker sent it.
        let (events, _) = feed(&mut sender, &[&out]).expect("puback");
        assert_eq!(events, vec![Event::Acked { tag: 42, seq: None }]);
        assert_eq!(sender.in_flight(), 0);
    }

    #[test]
    fn empty_body_round_trips() {
        let mut sender = started(publisher(1), &[CONNACK_OK]);
        let mut receiver = started(subscriber(1), &[CONNACK_OK, SUBACK_QOS1]);
        let mut wire = BytesMut::new();
        sender.send(1, 1, b"", &mut wire);
        let (events, _) = feed(&mut receiver, &[&wire]).expect("publish");
        assert_eq!(
            events,
            vec![Event::Delivered {
                body: Bytes::new(),
                seq: None
            }]
        );
    }

    #[test]
    fn qos1_pubacks_map_to_tags_in_any_order() {
        let mut sender = started(publisher(1), &[CONNACK_OK]);
        let mut wire = BytesMut::new();
        for tag in [100, 200, 300] {
            sender.send(5, tag, b"x", &mut wire);
        }
        assert!(sender.acks_sends());
        assert_eq!(sender.in_flight(), 3);
        // No subscription: ids start at 2 all the same (1 stays the SUBSCRIBE's).
        let (events, _) = feed(
            &mut sender,
            &[&[0x40, 2, 0, 3, 0x40, 2, 0, 2], &[0x40, 2, 0, 4]],
        )
        .expect("pubacks");
        assert_eq!(
            events,
            vec![
                Event::Acked {
                    tag: 200,
                    seq: None
                },
                Event::Acked {
                    tag: 100,
                    seq: None
                },
                Event::Acked {
                    tag: 300,
                    seq: None
                },
            ]
        );
        assert!(
            feed(&mut sender, &[&[0x40, 2, 0, 3]]).is_err(),
            "duplicate PUBACK"
        );
    }

    #[test]
    fn packet_ids_wrap_and_skip_ids_in_flight() {
        let mut driver = subscriber(1);
        driver.start(&mut BytesMut::new());
        // CONNACK only: the SUBSCRIBE (id 1) is still pending.
        feed(&mut driver, &[CONNACK_OK]).expect("connack");
        let mut out = BytesMut::new();
        driver.next_pid = 3;
        driver.send(9, 10, b"a", &mut out); // id 3
        driver.next_pid = u16::MAX - 1;
        driver.send(9, 11, b"a", &mut out); // 65534
        driver.send(9, 12, b"a", &mut out); // 65535
        driver.send(9, 13, b"a", &mut out); // wraps past 0 and pending 1 to 2
        driver.send(9, 14, b"a", &mut out); // skips 3 (in flight) to 4
        let mut ids: Vec<(u16, u64)> = driver.inflight.iter().map(|(&p, &t)| (p, t)).collect();
        ids.sort_unstable();
        assert_eq!(
            ids,
            vec![(2, 13), (3, 10), (4, 14), (65534, 11), (65535, 12)]
        );
    }

    #[test]
    fn exhausted_packet_ids_fail_next_receive() {
        let mut driver = started(publisher(1), &[CONNACK_OK]);
        for pid in 1..=u16::MAX {
            driver.inflight.insert(pid, u64::from(pid));
        }
        let mut out = BytesMut::new();
        driver.send(1, 7, b"x", &mut out);
        assert!(out.is_empty());
        assert!(feed(&mut driver, &[b""]).is_err());
    }

    #[test]
    fn delivered_body_is_a_slice_of_input() {
        let mut driver = started(subscriber(0), &[CONNACK_OK, SUBACK_QOS0]);
        let packet = publish_packet(b"lgt-c1", None, b"zero-copy body");
        let mut input = BytesMut::from(&packet[..]);
        let start = input.as_ptr() as usize;
        let mut events = Vec::new();
        driver
            .receive(&mut input, &mut BytesMut::new(), &mut events)
            .expect("publish");
        let [Event::Delivered { body, .. }] = &events[..] else {
            panic!("{events:?}");
        };
        assert_eq!(body.as_ptr() as usize, start + packet.len() - body.len());
    }

    #[test]
    fn stream_split_at_every_byte_boundary_gives_same_events() {
        let mut stream = Vec::new();
        stream.extend_from_slice(CONNACK_OK);
        stream.extend_from_slice(SUBACK_QOS1);
        stream.extend_from_slice(&publish_packet(b"lgt-c1", Some(9), b"first"));
        stream.extend_from_slice(&[0xd0, 0x00]);
        stream.extend_from_slice(&publish_packet(b"lgt-c1", None, &[0xab; 200]));
        stream.extend_from_slice(&[0x40, 0x02, 0x00, 0x02]);
        let run = |chunks: &[&[u8]]| {
            let mut driver = subscriber(1);
            driver.start(&mut BytesMut::new());
            driver.send(1, 77, b"mine", &mut BytesMut::new()); // packet id 2
            feed(&mut driver, chunks).expect("stream")
        };
        let whole = run(&[&stream]);
        assert_eq!(whole.0.len(), 4);
        assert_eq!(&whole.1[..], &[0x40, 0x02, 0x00, 0x09]);
        for cut in 0..=stream.len() {
            let (a, b) = stream.split_at(cut);
            assert_eq!(run(&[a, b]), whole, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(run(&bytes), whole, "one byte at a time");
    }

    #[test]
    fn remaining_length_varint_round_trips_at_boundaries() {
        for (n, len) in [
            (0, 1),
            (127, 1),
            (128, 2),
            (16_383, 2),
            (16_384, 3),
            (2_097_151, 3),
            (2_097_152, 4),
            (MAX_REMAINING, 4),
        ] {
            let mut out = BytesMut::new();
            out.put_u8(0x30);
            put_varint(&mut out, n);
            assert_eq!(out.len(), 1 + len, "{n}");
            let decoded = decode_header(&out);
            if n <= MAX_INCOMING {
                assert_eq!(
                    decoded.expect("valid").expect("complete"),
                    (0x30, 1 + len, n)
                );
                for cut in 1..out.len() {
                    assert_eq!(decode_header(&out[..cut]).expect("valid prefix"), None);
                }
            } else {
                assert!(decoded.is_err(), "{n} is above the buffering limit");
            }
        }
    }

    #[test]
    fn five_byte_remaining_length_is_error() {
        assert!(decode_header(&[0x30, 0x80, 0x80, 0x80, 0x80, 0x01]).is_err());
        assert!(decode_header(&[0x30, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn oversized_packet_refused_before_its_body_arrives() {
        let mut driver = started(subscriber(0), &[CONNACK_OK, SUBACK_QOS0]);
        let mut header = BytesMut::new();
        header.put_u8(0x30);
        put_varint(&mut header, MAX_INCOMING + 1);
        assert!(feed(&mut driver, &[&header]).is_err());
    }

    #[test]
    fn garbage_gives_driver_error() {
        for garbage in [
            &b"HTTP/1.1 400 Bad Request\r\n"[..],
            &[0x00, 0x00],
            &[0x10, 0x00],                   // CONNECT from the broker
            &[0x21, 0x02, 0x00, 0x00],       // CONNACK with flags
            &[0x20, 0x03, 0x00, 0x00, 0x00], // CONNACK too long
            &[0x36, 0x02, 0x00, 0x00],       // PUBLISH QoS 3
        ] {
            let mut driver = subscriber(1);
            driver.start(&mut BytesMut::new());
            assert!(feed(&mut driver, &[garbage]).is_err(), "{garbage:?}");
        }
        let malformed_publishes: [&[u8]; 5] = [
            &[0x30, 0x01, 0x00],                                     // topic length cut short
            &[0x30, 0x02, 0x00, 0x09],                               // topic runs past the packet
            &[0x32, 0x08, 0, 6, b'l', b'g', b't', b'-', b'c', b'1'], // no packet id
            &[0x32, 0x0a, 0, 6, b'l', b'g', b't', b'-', b'c', b'1', 0, 0], // packet id 0
            &[0x34, 0x0a, 0, 6, b'l', b'g', b't', b'-', b'c', b'1', 0, 1], // QoS 2
        ];
        for garbage in malformed_publishes {
            let mut driver = started(subscriber(1), &[CONNACK_OK, SUBACK_QOS1]);
            assert!(feed(&mut driver, &[garbage]).is_err(), "{garbage:?}");
        }
    }

    #[test]
    fn publish_on_unsubscribed_topic_is_error() {
        let mut driver = started(subscriber(0), &[CONNACK_OK, SUBACK_QOS0]);
        assert!(feed(&mut driver, &[&publish_packet(b"lgt-c2", None, b"x")]).is_err());
        let mut driver = started(publisher(0), &[CONNACK_OK]);
        assert!(feed(&mut driver, &[&publish_packet(b"lgt-c1", None, b"x")]).is_err());
    }

    #[test]
    fn heartbeat_writes_pingreq_and_pingresp_is_ignored() {
        let mut driver = started(publisher(0), &[CONNACK_OK]);
        let mut out = BytesMut::new();
        driver.heartbeat(&mut out);
        assert_eq!(&out[..], &[0xc0, 0x00]);
        let (events, out) = feed(&mut driver, &[&[0xd0, 0x00]]).expect("pingresp");
        assert!(events.is_empty() && out.is_empty());
        assert!(feed(&mut driver, &[&[0xd0, 0x01, 0x00]]).is_err());
    }

    #[test]
    fn send_reuses_cached_topic_and_switches_recipient() {
        let mut driver = started(publisher(0), &[CONNACK_OK]);
        let mut out = BytesMut::new();
        driver.send(12, 1, b"a", &mut out);
        driver.send(12, 2, b"b", &mut out);
        driver.send(3, 3, b"c", &mut out);
        let mut want = publish_packet(b"lgt-c12", None, b"a");
        want.extend(publish_packet(b"lgt-c12", None, b"b"));
        want.extend(publish_packet(b"lgt-c3", None, b"c"));
        assert_eq!(&out[..], &want[..]);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_receive(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            cut in 0usize..512,
            connacked in any::<bool>(),
        ) {
            let mut driver = subscriber(1);
            driver.start(&mut BytesMut::new());
            let mut input = BytesMut::new();
            let mut out = BytesMut::new();
            let mut events = Vec::new();
            if connacked {
                input.extend_from_slice(CONNACK_OK);
                input.extend_from_slice(SUBACK_QOS1);
            }
            let cut = cut.min(bytes.len());
            input.extend_from_slice(&bytes[..cut]);
            if driver.receive(&mut input, &mut out, &mut events).is_ok() {
                input.extend_from_slice(&bytes[cut..]);
                let _ = driver.receive(&mut input, &mut out, &mut events);
            }
        }

        #[test]
        fn arbitrary_publishes_round_trip(
            body in proptest::collection::vec(any::<u8>(), 0..300),
            qos in 0u8..=1,
            cut in 0usize..400,
        ) {
            let mut sender = started(publisher(qos), &[CONNACK_OK]);
            let suback = if qos == 1 { SUBACK_QOS1 } else { SUBACK_QOS0 };
            let mut receiver = started(subscriber(qos), &[CONNACK_OK, suback]);
            let mut wire = BytesMut::new();
            sender.send(1, 5, &body, &mut wire);
            let cut = cut.min(wire.len());
            let (events, _) = feed(&mut receiver, &[&wire[..cut], &wire[cut..]]).expect("publish");
            prop_assert_eq!(events, vec![Event::Delivered { body: body.into(), seq: None }]);
        }
    }

    /// Against a real broker: `LOADGEN_MQTT_ADDR=127.0.0.1:18830 cargo test -p parley-loadgen
    /// --lib driver::mqtt -- --ignored`.
    #[test]
    #[ignore = "needs a running MQTT broker at LOADGEN_MQTT_ADDR"]
    fn real_broker_round_trips_qos0_and_qos1() {
        use std::io::{ErrorKind, Read, Write};
        use std::net::TcpStream;
        use std::time::{Duration, Instant};

        let addr = std::env::var("LOADGEN_MQTT_ADDR").expect("set LOADGEN_MQTT_ADDR");

        struct Conn {
            stream: TcpStream,
            driver: MqttDriver,
            input: BytesMut,
            events: Vec<Event>,
        }
        impl Conn {
            fn open(addr: &str, driver: MqttDriver) -> Conn {
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
                conn.stream.write_all(&out).expect("write");
                conn
            }
            fn pump(&mut self) {
                let mut buf = [0u8; 65536];
                match self.stream.read(&mut buf) {
                    Ok(0) => panic!("broker closed the connection"),
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
                self.stream.write_all(&out).expect("write");
            }
            fn send(&mut self, to: u32, tag: u64, body: &[u8]) {
                let mut out = BytesMut::new();
                self.driver.send(to, tag, body, &mut out);
                self.stream.write_all(&out).expect("write");
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

        for qos in [0u8, 1] {
            let names = Names {
                prefix: format!("lgtest-{}-{qos}-", std::process::id()),
                homes: None,
            };
            let ep = |client, listen, role| Endpoint {
                names: names.clone(),
                client,
                listen,
                role,
            };
            let mut sub = Conn::open(
                &addr,
                MqttDriver::new(ep(1, Some(1), Role::Subscribe), qos, 30),
            );
            let mut publ = Conn::open(&addr, MqttDriver::new(ep(1, None, Role::Publish), qos, 30));
            wait(&mut [&mut sub, &mut publ], |c| {
                c.iter().all(|c| c.events.contains(&Event::Ready))
            });
            sub.events.clear();
            publ.events.clear();
            let bodies: Vec<Vec<u8>> = (0..100u32)
                .map(|i| format!("message {i} at qos {qos}").into_bytes())
                .collect();
            for (i, body) in bodies.iter().enumerate() {
                publ.send(1, i as u64 + 1, body);
            }
            let mut ping = BytesMut::new();
            publ.driver.heartbeat(&mut ping);
            publ.stream.write_all(&ping).expect("ping");
            let acks = if qos == 1 { bodies.len() } else { 0 };
            wait(&mut [&mut sub, &mut publ], |c| {
                c[0].events.len() >= bodies.len() && c[1].events.len() >= acks
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
            let acked: Vec<Event> = (1..=acks as u64)
                .map(|tag| Event::Acked { tag, seq: None })
                .collect();
            assert_eq!(publ.events, acked);
            assert_eq!(publ.driver.in_flight(), 0);
        }
    }
}
