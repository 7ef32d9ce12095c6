//! The client side of loadgen's own relay ([`crate::relay`], whose docs define the wire).
//!
//! A relay channel is a `u32`: the client number itself. The run's [`super::Names::prefix`]
//! does not apply (the relay has no names), so two runs sharing one relay share its channels.
//!
//! - `start`: SUBSCRIBE to [`Endpoint::listen`] and [`Event::Ready`] on its SUBACK; a
//!   publish-only connection (`listen: None`) sends a PING and is ready on the PONG.
//! - `send`: PUBLISH to channel `to`; the relay does not acknowledge sends.
//! - An incoming PUBLISH is [`Event::Delivered`]; its body is a zero-copy slice of the input.
//! - `heartbeat`: PING; PONGs after the first are ignored.

use bytes::{Buf, BytesMut};

use super::{Driver, DriverError, Endpoint, Event};
use crate::relay::{
    CHANNEL_FRAME_BYTES, EMPTY_FRAME_BYTES, KIND_PONG, KIND_PUBLISH, KIND_SUBACK, LEN_BYTES,
    PUBLISH_HEAD_BYTES, frame_channel, frame_len, put_ping, put_publish, put_subscribe,
};

/// One connection to the relay.
#[derive(Debug)]
pub struct RelayDriver {
    endpoint: Endpoint,
    ready: bool,
}

impl RelayDriver {
    /// A driver for `endpoint`; nothing is written until [`Driver::start`].
    pub fn new(endpoint: Endpoint) -> RelayDriver {
        RelayDriver {
            endpoint,
            ready: false,
        }
    }
}

impl Driver for RelayDriver {
    fn start(&mut self, out: &mut BytesMut) {
        match self.endpoint.listen {
            Some(channel) => put_subscribe(out, channel),
            None => put_ping(out),
        }
    }

    fn receive(
        &mut self,
        input: &mut BytesMut,
        _out: &mut BytesMut,
        events: &mut Vec<Event>,
    ) -> Result<(), DriverError> {
        let listen = self.endpoint.listen;
        while let Some(total) = frame_len(input).map_err(|e| DriverError(e.to_string()))? {
            match input[LEN_BYTES] {
                KIND_PUBLISH => {
                    if total < PUBLISH_HEAD_BYTES {
                        return Err(DriverError(format!(
                            "relay PUBLISH of {total} bytes is shorter than its {PUBLISH_HEAD_BYTES}-byte head"
                        )));
                    }
                    let channel = frame_channel(input);
                    if let Some(listen) = listen
                        && channel != listen
                    {
                        return Err(DriverError(format!(
                            "relay delivered a PUBLISH on channel {channel}, subscribed to {listen}"
                        )));
                    }
                    let body = input.split_to(total).freeze().slice(PUBLISH_HEAD_BYTES..);
                    events.push(Event::Delivered { body, seq: None });
                }
                KIND_SUBACK => {
                    if total != CHANNEL_FRAME_BYTES {
                        return Err(DriverError(format!(
                            "relay SUBACK of {total} bytes, expected {CHANNEL_FRAME_BYTES}"
                        )));
                    }
                    let channel = frame_channel(input);
                    if listen != Some(channel) {
                        return Err(DriverError(format!(
                            "relay SUBACK for channel {channel}, subscribed to {listen:?}"
                        )));
                    }
                    input.advance(total);
                    if !self.ready {
                        self.ready = true;
                        events.push(Event::Ready);
                    }
                }
                KIND_PONG => {
                    if total != EMPTY_FRAME_BYTES {
                        return Err(DriverError(format!(
                            "relay PONG of {total} bytes, expected {EMPTY_FRAME_BYTES}"
                        )));
                    }
                    input.advance(total);
                    if !self.ready && listen.is_none() {
                        self.ready = true;
                        events.push(Event::Ready);
                    }
                }
                kind => {
                    return Err(DriverError(format!(
                        "relay sent a frame of unknown kind {kind}"
                    )));
                }
            }
        }
        Ok(())
    }

    fn send(&mut self, to: u32, _tag: u64, body: &[u8], out: &mut BytesMut) {
        put_publish(out, to, body);
    }

    fn heartbeat(&mut self, out: &mut BytesMut) {
        put_ping(out);
    }

    fn acks_sends(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use proptest::prelude::*;

    use super::*;
    use crate::driver::{Names, Role};
    use crate::relay::{MAX_FRAME_BYTES, put_pong, put_suback};

    fn endpoint(listen: Option<u32>) -> Endpoint {
        Endpoint {
            names: Names {
                prefix: "lgtest-".into(),
                homes: None,
            },
            client: 3,
            listen,
            role: if listen.is_some() {
                Role::Both
            } else {
                Role::Publish
            },
        }
    }

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(1 + payload.len()).expect("small frame");
        let mut f = len.to_be_bytes().to_vec();
        f.push(kind);
        f.extend_from_slice(payload);
        f
    }

    fn publish(channel: u32, body: &[u8]) -> Vec<u8> {
        let mut p = channel.to_be_bytes().to_vec();
        p.extend_from_slice(body);
        frame(KIND_PUBLISH, &p)
    }

    fn delivered(body: &[u8]) -> Event {
        Event::Delivered {
            body: Bytes::copy_from_slice(body),
            seq: None,
        }
    }

    /// Feeds `chunks` one after another into one input buffer, as a socket would.
    fn feed(d: &mut RelayDriver, chunks: &[&[u8]]) -> Result<Vec<Event>, DriverError> {
        let mut input = BytesMut::new();
        let mut out = BytesMut::new();
        let mut events = Vec::new();
        for chunk in chunks {
            input.extend_from_slice(chunk);
            d.receive(&mut input, &mut out, &mut events)?;
        }
        assert!(out.is_empty(), "the relay protocol never answers");
        assert!(input.is_empty(), "everything consumed: {input:?}");
        Ok(events)
    }

    #[test]
    fn start_subscribes_to_listen_channel() {
        let mut d = RelayDriver::new(endpoint(Some(0x0102_0304)));
        let mut out = BytesMut::new();
        d.start(&mut out);
        assert_eq!(&out[..], &[0, 0, 0, 5, 1, 1, 2, 3, 4]);
        assert!(!d.acks_sends());
    }

    #[test]
    fn start_publish_only_pings() {
        let mut d = RelayDriver::new(endpoint(None));
        let mut out = BytesMut::new();
        d.start(&mut out);
        assert_eq!(&out[..], &[0, 0, 0, 1, 3]);
        let events = feed(&mut d, &[&frame(KIND_PONG, &[])]).expect("pong");
        assert_eq!(events, vec![Event::Ready]);
        // Later PONGs (heartbeats) are ignored.
        let events = feed(&mut d, &[&frame(KIND_PONG, &[])]).expect("pong");
        assert!(events.is_empty());
    }

    #[test]
    fn send_and_heartbeat_bytes() {
        let mut d = RelayDriver::new(endpoint(Some(1)));
        let mut out = BytesMut::new();
        d.send(0x0a0b_0c0d, 7, b"hi", &mut out);
        assert_eq!(
            &out[..],
            &[0, 0, 0, 7, 2, 0x0a, 0x0b, 0x0c, 0x0d, b'h', b'i']
        );
        out.clear();
        d.send(9, 8, b"", &mut out);
        assert_eq!(&out[..], &[0, 0, 0, 5, 2, 0, 0, 0, 9]);
        out.clear();
        d.heartbeat(&mut out);
        assert_eq!(&out[..], &[0, 0, 0, 1, 3]);
    }

    #[test]
    fn suback_then_deliveries() {
        let mut d = RelayDriver::new(endpoint(Some(5)));
        let mut wire = BytesMut::new();
        put_suback(&mut wire, 5);
        put_publish(&mut wire, 5, b"one");
        put_pong(&mut wire);
        put_publish(&mut wire, 5, b"");
        put_publish(&mut wire, 5, b"three");
        let events = feed(&mut d, &[&wire]).expect("valid");
        assert_eq!(
            events,
            vec![
                Event::Ready,
                delivered(b"one"),
                delivered(b""),
                delivered(b"three")
            ]
        );
    }

    #[test]
    fn every_split_point_gives_the_same_events() {
        let mut wire = BytesMut::new();
        put_suback(&mut wire, 5);
        put_publish(&mut wire, 5, b"alpha");
        put_pong(&mut wire);
        put_publish(&mut wire, 5, &[0xff; 300]);
        put_publish(&mut wire, 5, b"");
        let whole = feed(&mut RelayDriver::new(endpoint(Some(5))), &[&wire]).expect("valid");
        assert_eq!(whole.len(), 4);
        for i in 0..=wire.len() {
            for j in i..=wire.len() {
                let mut d = RelayDriver::new(endpoint(Some(5)));
                let events = feed(&mut d, &[&wire[..i], &wire[i..j], &wire[j..]])
                    .unwrap_or_else(|e| panic!("split {i}/{j}: {e}"));
                assert_eq!(events, whole, "split {i}/{j}");
            }
        }
        // And one byte at a time.
        let bytes: Vec<&[u8]> = wire.chunks(1).collect();
        let events = feed(&mut RelayDriver::new(endpoint(Some(5))), &bytes).expect("bytewise");
        assert_eq!(events, whole);
    }

    #[test]
    fn partial_frame_is_left_in_place() {
        let mut d = RelayDriver::new(endpoint(Some(5)));
        let full = publish(5, b"body");
        let mut input = BytesMut::from(&full[..full.len() - 1]);
        let mut events = Vec::new();
        d.receive(&mut input, &mut BytesMut::new(), &mut events)
            .expect("partial is fine");
        assert!(events.is_empty());
        assert_eq!(&input[..], &full[..full.len() - 1]);
    }

    #[test]
    fn body_is_zero_copy() {
        let mut d = RelayDriver::new(endpoint(Some(5)));
        let mut input = BytesMut::with_capacity(64);
        put_publish(&mut input, 5, b"abc");
        put_publish(&mut input, 5, b"defg");
        let base = input.as_ptr() as usize;
        let mut events = Vec::new();
        d.receive(&mut input, &mut BytesMut::new(), &mut events)
            .expect("valid");
        let ptrs: Vec<usize> = events
            .iter()
            .map(|e| match e {
                Event::Delivered { body, .. } => body.as_ptr() as usize,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(ptrs, vec![base + 9, base + 12 + 9]);
    }

    #[test]
    fn garbage_is_an_error() {
        let cases: Vec<(&str, Option<u32>, Vec<u8>)> = vec![
            ("unknown kind", Some(5), frame(9, &[])),
            ("subscribe from the relay", Some(5), frame(1, &[0, 0, 0, 5])),
            ("ping from the relay", Some(5), frame(3, &[])),
            ("zero length", Some(5), vec![0, 0, 0, 0]),
            (
                "oversized length",
                Some(5),
                u32::try_from(MAX_FRAME_BYTES + 1)
                    .expect("fits")
                    .to_be_bytes()
                    .to_vec(),
            ),
            ("huge length", Some(5), vec![0xff, 0xff, 0xff, 0xff, 2]),
            ("short publish", Some(5), frame(KIND_PUBLISH, &[0, 0, 5])),
            ("long suback", Some(5), frame(KIND_SUBACK, &[0, 0, 0, 5, 0])),
            ("short suback", Some(5), frame(KIND_SUBACK, &[0, 5])),
            (
                "suback for another channel",
                Some(5),
                frame(KIND_SUBACK, &[0, 0, 0, 6]),
            ),
            (
                "suback when publish-only",
                None,
                frame(KIND_SUBACK, &[0, 0, 0, 6]),
            ),
            ("long pong", Some(5), frame(KIND_PONG, &[0])),
            ("publish on another channel", Some(5), publish(6, b"x")),
        ];
        for (name, listen, bytes) in cases {
            let mut d = RelayDriver::new(endpoint(listen));
            let mut input = BytesMut::from(&bytes[..]);
            let r = d.receive(&mut input, &mut BytesMut::new(), &mut Vec::new());
            assert!(r.is_err(), "{name}: {bytes:?} accepted");
        }
    }

    #[test]
    fn oversized_length_fails_before_the_payload_arrives() {
        let mut d = RelayDriver::new(endpoint(Some(5)));
        let len = u32::try_from(MAX_FRAME_BYTES + 1).expect("fits");
        let mut input = BytesMut::from(&len.to_be_bytes()[..]);
        let err = d
            .receive(&mut input, &mut BytesMut::new(), &mut Vec::new())
            .expect_err("too long");
        assert!(err.0.contains("exceeds"), "{err}");
        // The largest allowed length just waits for its bytes.
        let max = u32::try_from(MAX_FRAME_BYTES).expect("fits");
        let mut input = BytesMut::from(&max.to_be_bytes()[..]);
        d.receive(&mut input, &mut BytesMut::new(), &mut Vec::new())
            .expect("max length is fine");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(
            listen in proptest::option::of(0u32..4),
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..8),
        ) {
            let mut d = RelayDriver::new(endpoint(listen));
            let mut input = BytesMut::new();
            let mut out = BytesMut::new();
            let mut events = Vec::new();
            for chunk in chunks {
                input.extend_from_slice(&chunk);
                if d.receive(&mut input, &mut out, &mut events).is_err() {
                    break;
                }
            }
        }

        #[test]
        fn valid_streams_round_trip(
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16),
            split in any::<prop::sample::Index>(),
        ) {
            let mut wire = BytesMut::new();
            put_suback(&mut wire, 2);
            for b in &bodies {
                put_publish(&mut wire, 2, b);
            }
            let at = split.index(wire.len() + 1);
            let mut d = RelayDriver::new(endpoint(Some(2)));
            let events = feed(&mut d, &[&wire[..at], &wire[at..]]).expect("valid");
            let mut want = vec![Event::Ready];
            want.extend(bodies.iter().map(|b| delivered(b)));
            prop_assert_eq!(events, want);
        }
    }
}
