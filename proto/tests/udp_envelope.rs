//! Properties of `parley_proto::udp`: frames survive sealing and opening, packed under the
//! maximum datagram size; nothing but the key holder can produce a datagram that opens; login
//! replies never outgrow the login; the replay window behaves like its set-based model; and no
//! input makes the decoders panic.

mod strategies;

use std::collections::BTreeSet;

use bytes::{BufMut, Bytes, BytesMut};
use parley_proto::frame;
use parley_proto::udp::{
    self, Accepted, DatagramBuilder, DatagramType, Direction, HEADER_LEN, MAGIC, REPLAY_WINDOW,
    ReplayError, ReplayWindow, SESSION_KEY_LEN, SessionKey, TAG_LEN, UdpError,
};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

fn key_strategy() -> impl Strategy<Value = [u8; SESSION_KEY_LEN]> {
    any::<[u8; SESSION_KEY_LEN]>()
}

/// Bytes of the LEB128 varint length prefix in front of a frame of `len` bytes (an independent
/// oracle: 7 bits per byte).
fn varint_len(len: usize) -> usize {
    let mut n = 1;
    let mut v = len >> 7;
    while v > 0 {
        n += 1;
        v >>= 7;
    }
    n
}

/// Tries every entry point that reads untrusted datagrams.
fn open_everything(key: &SessionKey, datagram: &[u8]) {
    let _ = udp::peek_header(datagram);
    for direction in [Direction::ClientToServer, Direction::ServerToClient] {
        if let Ok(opened) = udp::open(key, datagram, direction) {
            let n = opened.frames.len();
            assert_eq!(opened.frames.count(), n);
        }
    }
    let _ = udp::open_login(datagram);
    let _ = udp::open_login_reply(datagram, 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn frames_survive_seal_and_open_packed_under_the_max(
        frames in vec(strategies::frame(), 1..12),
        max in prop_oneof![Just(udp::DEFAULT_MAX_DATAGRAM_BYTES), 100usize..2000, Just(udp::MAX_DATAGRAM_BYTES)],
        key in key_strategy(),
        session_id in 1u64..,
        first_packet in 0u64..u64::MAX / 2,
    ) {
        let key = SessionKey::new(&key);
        let mut datagrams = Vec::new();
        let mut expected = Vec::new();
        let mut queue = frames.iter().peekable();
        let mut packet = first_packet;
        while queue.peek().is_some() {
            let mut out = BytesMut::new();
            let mut builder =
                DatagramBuilder::new(&mut out, Direction::ServerToClient, session_id, packet, max)?;
            while let Some(&f) = queue.peek() {
                match builder.push(f) {
                    Ok(()) => {
                        expected.push(f.clone());
                        queue.next();
                    }
                    Err(UdpError::DatagramFull { .. }) => break,
                    Err(UdpError::FrameTooLarge { len, .. }) => {
                        prop_assert!(
                            len + varint_len(len) > max - HEADER_LEN - TAG_LEN,
                            "fits, yet refused"
                        );
                        queue.next();
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if builder.is_empty() {
                continue; // only too-large frames were left; the builder leaves `out` empty
            }
            let len = builder.finish(&key)?;
            prop_assert!(len <= max);
            prop_assert_eq!(len, out.len());
            datagrams.push(out.freeze());
            packet += 1;
        }
        let mut received = Vec::new();
        for (i, datagram) in datagrams.iter().enumerate() {
            let opened = udp::open(&key, datagram, Direction::ServerToClient)?;
            prop_assert_eq!(opened.header.session_id, session_id);
            prop_assert_eq!(opened.header.packet_number, first_packet + i as u64);
            for raw in opened.frames {
                received.push(frame::decode(datagram.slice_ref(raw))?);
            }
        }
        prop_assert_eq!(received, expected);
    }

    #[test]
    fn any_single_bit_flip_makes_open_fail(
        frames in vec(strategies::frame(), 1..3),
        key in key_strategy(),
        at in any::<Index>(),
        bit in 0u8..8,
    ) {
        let key = SessionKey::new(&key);
        let mut out = BytesMut::new();
        let fits = udp::seal(&key, Direction::ClientToServer, 9, 1, &frames, udp::MAX_DATAGRAM_BYTES, &mut out);
        prop_assume!(fits.is_ok());
        let i = at.index(out.len());
        out[i] ^= 1 << bit;
        prop_assert!(udp::open(&key, &out, Direction::ClientToServer).is_err());
    }

    #[test]
    fn a_datagram_sealed_under_another_key_never_opens(
        frame in strategies::frame(),
        ours in key_strategy(),
        theirs in key_strategy(),
    ) {
        prop_assume!(ours != theirs);
        let mut out = BytesMut::new();
        let sealed = udp::seal(&SessionKey::new(&theirs), Direction::ClientToServer, 9, 1, [&frame], udp::MAX_DATAGRAM_BYTES, &mut out);
        prop_assume!(sealed.is_ok());
        let opened = udp::open(&SessionKey::new(&ours), &out, Direction::ClientToServer);
        prop_assert!(matches!(opened, Err(UdpError::BadTag)));
    }

    #[test]
    fn login_round_trips_through_a_padded_login_datagram(
        login in strategies::login_frame(),
        nonce in any::<u64>(),
    ) {
        let mut out = BytesMut::new();
        match udp::seal_login(0, nonce, &login, udp::MIN_LOGIN_DATAGRAM_BYTES, &mut out) {
            Err(UdpError::FrameTooLarge { .. }) => prop_assert!(out.is_empty()),
            Err(e) => return Err(e.into()),
            Ok(()) => {
                prop_assert_eq!(out.len(), udp::MIN_LOGIN_DATAGRAM_BYTES);
                let opened = udp::open_login(&out)?;
                prop_assert_eq!(opened.header.packet_number, nonce);
                prop_assert_eq!(opened.datagram_len, out.len());
                prop_assert_eq!(frame::decode(Bytes::copy_from_slice(opened.frame))?, login);
            }
        }
    }

    #[test]
    fn login_reply_is_never_larger_than_its_limit(
        reply in strategies::frame(),
        limit in 0usize..1500,
        session_id in any::<u64>(),
        nonce in any::<u64>(),
    ) {
        let mut out = BytesMut::new();
        match udp::seal_login_reply(session_id, nonce, &reply, limit, &mut out) {
            Ok(()) => {
                prop_assert!(out.len() <= limit);
                let opened = udp::open_login_reply(&out, nonce)?;
                prop_assert_eq!(opened.header.session_id, session_id);
                prop_assert_eq!(frame::decode(Bytes::copy_from_slice(opened.frame))?, reply);
            }
            Err(UdpError::ReplyTooLarge { len, .. }) => {
                prop_assert!(len > limit);
                prop_assert!(out.is_empty());
            }
            Err(e) => return Err(e.into()),
        }
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_any_decoder(
        datagram in vec(any::<u8>(), 0..1400),
        key in key_strategy(),
    ) {
        open_everything(&SessionKey::new(&key), &datagram);
    }

    #[test]
    fn arbitrary_bytes_behind_a_valid_header_never_panic_any_decoder(
        kind in 1u8..=4,
        session_id in prop_oneof![Just(0u64), any::<u64>()],
        packet_number in any::<u64>(),
        rest in vec(any::<u8>(), 0..1400),
        key in key_strategy(),
    ) {
        let mut datagram = BytesMut::new();
        datagram.put_u8(MAGIC);
        datagram.put_u8(kind);
        datagram.put_u64(session_id);
        datagram.put_u64(packet_number);
        datagram.extend_from_slice(&rest);
        open_everything(&SessionKey::new(&key), &datagram);
    }

    #[test]
    fn arbitrary_frames_area_with_a_valid_tag_never_panics_open(
        payload in vec(any::<u8>(), 0..600),
        key in key_strategy(),
    ) {
        // What a buggy (or hostile) key holder could send: authentic, but anything inside.
        let key = SessionKey::new(&key);
        let mut datagram = BytesMut::new();
        datagram.put_u8(MAGIC);
        datagram.put_u8(DatagramType::ClientData.to_byte());
        datagram.put_u64(1);
        datagram.put_u64(1);
        datagram.extend_from_slice(&payload);
        let tag = key.tag(&datagram);
        datagram.extend_from_slice(&tag);
        if let Ok(opened) = udp::open(&key, &datagram, Direction::ClientToServer) {
            let total: usize = opened.frames.clone().map(<[u8]>::len).sum();
            prop_assert!(total <= payload.len());
            prop_assert!(opened.frames.len() >= 1);
        }
    }

    #[test]
    fn replay_window_behaves_like_the_set_of_recent_numbers(
        base in prop_oneof![Just(0u64), Just(u64::MAX - 1000)],
        offsets in vec(0u64..1000, 1..300),
    ) {
        let mut window = ReplayWindow::new();
        let mut seen = BTreeSet::new();
        let mut newest: Option<u64> = None;
        for offset in offsets {
            let pn = base + offset;
            let expected = match newest {
                None => Ok(Accepted::Newest),
                Some(n) if pn > n => Ok(Accepted::Newest),
                Some(n) if n - pn >= REPLAY_WINDOW => {
                    Err(ReplayError::TooOld { packet_number: pn, newest: n })
                }
                Some(_) if seen.contains(&pn) => Err(ReplayError::Duplicate(pn)),
                Some(_) => Ok(Accepted::Late),
            };
            prop_assert_eq!(window.accept(pn), expected);
            if expected.is_ok() {
                seen.insert(pn);
                newest = newest.max(Some(pn));
            }
        }
    }
}
