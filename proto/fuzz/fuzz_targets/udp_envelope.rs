//! Arbitrary datagrams to the UDP envelope decoders with a fixed session key: they must never
//! panic, and whatever opens must be well delimited and within the datagram.
//!
//! Input layout: byte 0 picks the mode; the rest is the datagram (mode 0), or the frames area
//! of a CLIENT_DATA datagram that the target tags with the right key, so the fuzzer reaches
//! what lies past authentication (mode 1), or the payload of a LOGIN datagram (mode 2).
#![no_main]

use bytes::{BufMut, Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use parley_proto::frame;
use parley_proto::udp::{
    self, DatagramType, Direction, HEADER_LEN, MAGIC, SESSION_KEY_LEN, SessionKey, TAG_LEN,
    UdpError,
};

const KEY: [u8; SESSION_KEY_LEN] = *b"parley fuzz key, thirty-two byte";

fn header(kind: DatagramType, session_id: u64) -> BytesMut {
    let mut out = BytesMut::new();
    out.put_u8(MAGIC);
    out.put_u8(kind.to_byte());
    out.put_u64(session_id);
    out.put_u64(1);
    out
}

/// Opens `datagram` every way and checks what opens.
fn open_everything(key: &SessionKey, datagram: &[u8]) {
    // Frames are decoded zero-copy, as the broker does: slices of the datagram's `Bytes`.
    let whole = Bytes::copy_from_slice(datagram);
    let datagram = &whole[..];
    let peeked = udp::peek_header(datagram);
    for direction in [Direction::ClientToServer, Direction::ServerToClient] {
        let Ok(opened) = udp::open(key, datagram, direction) else {
            continue;
        };
        assert_eq!(peeked.as_ref().ok(), Some(&opened.header));
        assert_eq!(opened.datagram_len, datagram.len());
        let n = opened.frames.len();
        assert!(n >= 1);
        let mut total = 0;
        for raw in opened.frames.clone() {
            total += raw.len();
            let _ = frame::decode(whole.slice_ref(raw));
        }
        assert_eq!(opened.frames.count(), n);
        assert!(total + n <= datagram.len() - HEADER_LEN - TAG_LEN);
    }
    if let Ok(login) = udp::open_login(datagram) {
        assert!(login.datagram_len >= udp::MIN_LOGIN_DATAGRAM_BYTES);
        let _ = frame::decode(Bytes::copy_from_slice(login.frame));
    }
    if let Ok(cookie) = udp::open_retry(datagram, 1) {
        assert_ne!(cookie, 0);
        assert_eq!(datagram.len(), udp::RETRY_LEN);
    }
    if let Ok(reply) = udp::open_login_reply(datagram, 1) {
        assert_eq!(reply.header.packet_number, 1);
        assert!(reply.frame.len() < datagram.len());
    }
}

fuzz_target!(|data: &[u8]| {
    let key = SessionKey::new(&KEY);
    let [mode, rest @ ..] = data else {
        return;
    };
    match mode % 3 {
        0 => open_everything(&key, rest),
        1 => {
            let mut datagram = header(DatagramType::ClientData, 1);
            datagram.extend_from_slice(rest);
            let tag = key.tag(&datagram);
            datagram.extend_from_slice(&tag);
            match udp::open(&key, &datagram, Direction::ClientToServer) {
                Err(UdpError::BadTag) => {
                    panic!("a correctly tagged datagram failed authentication")
                }
                _ => open_everything(&key, &datagram),
            }
        }
        _ => {
            let mut datagram = header(DatagramType::Login, 0);
            datagram.extend_from_slice(rest);
            if datagram.len() < udp::MIN_LOGIN_DATAGRAM_BYTES {
                datagram.resize(udp::MIN_LOGIN_DATAGRAM_BYTES, 0);
            }
            open_everything(&key, &datagram);
        }
    }
});
