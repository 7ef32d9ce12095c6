//! The UDP datagram envelope, sans-IO: an authenticated header around one or more frames.
//!
//! # Layout
//!
//! All integers are big-endian (network order). Frames are length-delimited exactly as on TCP
//! ([`crate::tcp`]): a varint prefix of at most 5 bytes, then the frame's protobuf encoding.
//!
//! ```text
//!  offset      size  field
//!  0           1     magic and envelope version: MAGIC = 0xA1 (0xA_: parley, _1: version 1)
//!  1           1     type: 1 LOGIN, 2 LOGIN_REPLY, 3 CLIENT_DATA, 4 SERVER_DATA, 5 RETRY
//!  2           8     session id (u64 BE): never 0 in CLIENT_DATA / SERVER_DATA;
//!                    in LOGIN and RETRY the retry cookie (0 in a first LOGIN)
//!  10          8     packet number (u64 BE): see below
//!  18          n     frames: (varint length, protobuf Frame)+
//!  18+n        16    tag, CLIENT_DATA and SERVER_DATA only:
//!                    the first 16 bytes of HMAC-SHA256(session key, bytes 0 .. 18+n)
//! ```
//!
//! * **CLIENT_DATA / SERVER_DATA** carry one or more frames and a tag over everything before it.
//!   The packet number is strictly increasing per sender and session (start anywhere, e.g. 0,
//!   add 1 per datagram; gaps are fine); the receiver's [`ReplayWindow`] drops duplicates and
//!   numbers too old to judge. The type byte is authenticated, so it also binds the direction:
//!   a server's datagram reflected back to the server is [`UdpError::UnexpectedType`], and both
//!   sides may number from 0 under the one key.
//! * **LOGIN** (client to server) is the only unauthenticated datagram the broker accepts. It
//!   carries exactly one frame (the `Login`), then zero bytes of padding up to at least
//!   [`MIN_LOGIN_DATAGRAM_BYTES`] (1200, like a QUIC Initial). No tag; the packet number is a
//!   nonce the client draws at random, echoed in the reply; the session id field carries the
//!   retry cookie (0 in a client's first LOGIN).
//! * **RETRY** (server to client, unauthenticated, exactly [`HEADER_LEN`] bytes) answers a LOGIN
//!   whose cookie is missing, stale or wrong: it carries a fresh cookie (never 0) in the session id
//!   field and the LOGIN's nonce. The client sends the same LOGIN again with that cookie. The
//!   cookie is a MAC the broker computes over the client's address and nonce and a coarse time
//!   (its secret is the broker's own), so checking it needs no state: a LOGIN with a valid cookie
//!   proves the sender receives datagrams at its source address (the QUIC Retry idea), and only
//!   then does the broker keep anything or answer with more than a RETRY.
//! * **LOGIN_REPLY** (server to client) answers a LOGIN: the session id of the new session (0 if
//!   login failed), the LOGIN's nonce, exactly one frame (`LoginResult` or `Error`), no tag, at
//!   most as many bytes as the LOGIN it answers. It is the only unauthenticated datagram a client
//!   accepts, and only with its own nonce, so an off-path attacker cannot inject one blindly.
//!
//! # The session key
//!
//! On a successful UDP login the broker draws 32 random bytes (from a CSPRNG) as the session key
//! and a session id (never 0), keeps them with the session and returns them in
//! `LoginResult.udp_session_key` and `udp_session_id`. Every later datagram of the session, in
//! both directions, is CLIENT_DATA or SERVER_DATA tagged with that key ([`SessionKey`]). Tags are
//! compared in constant time.
//!
//! # Rules the broker follows (anti-spoofing and anti-amplification)
//!
//! 1. Knowing a session id is not enough: a datagram acts on a session only once [`open`] has
//!    verified its tag under that session's key, and [`ReplayWindow::accept`] has taken its
//!    packet number. A captured datagram replayed (from any address) is a duplicate.
//! 2. The session's peer address moves to a datagram's source address only when the datagram
//!    authenticates and its packet number is the newest seen ([`Accepted::Newest`]): a late or
//!    replayed datagram from elsewhere cannot redirect the session's traffic.
//! 3. A datagram that fails [`peek_header`], [`open`], [`open_login`] or the replay window is
//!    dropped without an answer: its source address may be forged. The [`WireError`] codes of
//!    [`UdpError`] are for logs and metrics.
//! 4. The broker never answers an unauthenticated datagram with more bytes than it received:
//!    a LOGIN is answered by one LOGIN_REPLY whose size [`seal_login_reply`] bounds by the
//!    LOGIN's [`OpenedLogin::datagram_len`], and LOGINs shorter than
//!    [`MIN_LOGIN_DATAGRAM_BYTES`] are refused by [`open_login`] (so every reply has room).
//!
//! What this does not do: the key travels in the clear inside `LoginResult`, so it stops
//! off-path attackers (who can forge source addresses but not see traffic), not an on-path
//! observer of the login. Payloads are not encrypted (the design leaves that to clients).
//!
//! # Receiving, step by step (broker)
//!
//! 1. [`peek_header`] to learn the type and session id; drop on error.
//! 2. LOGIN: [`open_login`]; if the cookie in its session id field is not one the broker made
//!    for this source address and nonce lately, answer [`seal_retry`] with a fresh one and keep
//!    nothing. Otherwise [`frame::decode`] the frame, verify the token, answer with
//!    [`seal_login_reply`] bounded by the LOGIN's size.
//! 3. CLIENT_DATA: find the session by id (drop if unknown), [`open`] with its key and
//!    [`Direction::ClientToServer`], then [`ReplayWindow::accept`] the packet number, then decode
//!    each frame. For zero-copy decoding keep the datagram in a `Bytes` and decode
//!    `datagram.slice_ref(frame)`.
//! 4. Anything else: drop.
//!
//! Sending: [`seal`], or a [`DatagramBuilder`] to pack as many queued frames as fit under the
//! maximum datagram size ([`DEFAULT_MAX_DATAGRAM_BYTES`], 1200 bytes, safe on any path MTU).

use std::fmt;

use bytes::{BufMut, BytesMut};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::frame::{self, WireError};
use crate::pb;
use crate::tcp::{Prefix, prefix_len, put_prefix, read_prefix};

/// The first byte of every datagram: high nibble `0xA` for parley, low nibble the envelope
/// version (1).
pub const MAGIC: u8 = 0xA1;
/// Bytes of the header: magic, type, session id, packet number.
pub const HEADER_LEN: usize = 18;
/// Bytes of the tag that ends an authenticated datagram (HMAC-SHA256 truncated to 128 bits).
pub const TAG_LEN: usize = 16;
/// Bytes of a session key.
pub const SESSION_KEY_LEN: usize = 32;
/// Bytes of a RETRY datagram: its header and nothing else.
pub const RETRY_LEN: usize = HEADER_LEN;
/// Default largest datagram, in bytes of UDP payload: fits any path MTU of 1280 (IPv6 minimum).
pub const DEFAULT_MAX_DATAGRAM_BYTES: usize = 1200;
/// Smallest LOGIN datagram the broker accepts: the client pads its login to at least this, so
/// the broker's reply (never larger than the login) has room and no amplification is possible.
pub const MIN_LOGIN_DATAGRAM_BYTES: usize = 1200;
/// Largest datagram this module builds: the largest UDP payload over IPv4.
pub const MAX_DATAGRAM_BYTES: usize = 65_507;
/// Smallest useful maximum datagram size: header, tag and a one-byte frame prefix.
pub const MIN_DATAGRAM_BYTES: usize = HEADER_LEN + TAG_LEN + 1;

/// The kind of a datagram, from its type byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DatagramType {
    /// Client to server, unauthenticated: one `Login` frame, padded.
    Login,
    /// Server to client, unauthenticated: the one frame answering a LOGIN.
    LoginReply,
    /// Client to server, authenticated: frames of a session.
    ClientData,
    /// Server to client, authenticated: frames of a session.
    ServerData,
    /// Server to client, unauthenticated: a retry cookie for a LOGIN, nothing else.
    Retry,
}

impl DatagramType {
    /// The type byte on the wire.
    pub const fn to_byte(self) -> u8 {
        match self {
            DatagramType::Login => 1,
            DatagramType::LoginReply => 2,
            DatagramType::ClientData => 3,
            DatagramType::ServerData => 4,
            DatagramType::Retry => 5,
        }
    }

    /// The type a byte names, if any.
    pub const fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(DatagramType::Login),
            2 => Some(DatagramType::LoginReply),
            3 => Some(DatagramType::ClientData),
            4 => Some(DatagramType::ServerData),
            5 => Some(DatagramType::Retry),
            _ => None,
        }
    }

    /// Whether datagrams of this type end with a tag.
    pub const fn is_authenticated(self) -> bool {
        matches!(self, DatagramType::ClientData | DatagramType::ServerData)
    }

    /// Which way datagrams of this type travel.
    pub const fn direction(self) -> Direction {
        match self {
            DatagramType::Login | DatagramType::ClientData => Direction::ClientToServer,
            DatagramType::LoginReply | DatagramType::ServerData | DatagramType::Retry => {
                Direction::ServerToClient
            }
        }
    }
}

/// Which way a datagram travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From a client to the broker.
    ClientToServer,
    /// From the broker to a client.
    ServerToClient,
}

impl Direction {
    /// The authenticated data type travelling this way.
    pub const fn data_type(self) -> DatagramType {
        match self {
            Direction::ClientToServer => DatagramType::ClientData,
            Direction::ServerToClient => DatagramType::ServerData,
        }
    }
}

/// The fixed header at the start of every datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    /// The datagram's type.
    pub kind: DatagramType,
    /// The session (0 in the LOGIN_REPLY of a failed login); in LOGIN and RETRY, the retry
    /// cookie (0 in a first LOGIN).
    pub session_id: u64,
    /// The sender's packet number (data), or the client's login nonce (LOGIN, LOGIN_REPLY).
    pub packet_number: u64,
}

impl Header {
    fn write(&self, out: &mut impl BufMut) {
        out.put_u8(MAGIC);
        out.put_u8(self.kind.to_byte());
        out.put_u64(self.session_id);
        out.put_u64(self.packet_number);
    }
}

/// Why a datagram cannot be opened, or a datagram cannot be sealed.
#[derive(Debug, thiserror::Error)]
pub enum UdpError {
    /// The datagram is shorter than its header (and, for an authenticated type, its tag).
    #[error("datagram of {len} bytes is shorter than the minimum of {min}")]
    Truncated {
        /// The datagram's length.
        len: usize,
        /// The least its type needs.
        min: usize,
    },
    /// The first byte is not [`MAGIC`]: not a parley datagram, or another envelope version.
    #[error("bad magic byte {0:#04x}")]
    BadMagic(u8),
    /// The type byte names no datagram type.
    #[error("unknown datagram type {0}")]
    UnknownType(u8),
    /// The session id breaks its type's rule: data datagrams and RETRY never carry 0.
    #[error("session id {session_id} is not allowed in a {kind:?} datagram")]
    BadSessionId {
        /// The datagram's type.
        kind: DatagramType,
        /// The session id it carries (or was asked to carry).
        session_id: u64,
    },
    /// The datagram's type is not the one this call opens (e.g. SERVER_DATA arriving at the
    /// server, as a reflected datagram would).
    #[error("expected a {expected:?} datagram, got {found:?}")]
    UnexpectedType {
        /// The type the call opens.
        expected: DatagramType,
        /// The type the datagram has.
        found: DatagramType,
    },
    /// The tag does not verify: the datagram was altered, forged, or sealed under another key.
    #[error("datagram authentication failed")]
    BadTag,
    /// A frame's length prefix is not a varint of at most 5 bytes fitting in 32 bits, or is cut
    /// off by the end of the frames.
    #[error("bad frame length prefix")]
    BadLengthPrefix,
    /// A frame's length runs past the end of the frames.
    #[error("frame of {len} bytes overruns the {available} bytes left in the datagram")]
    FrameOverrun {
        /// The length the prefix says.
        len: usize,
        /// The bytes actually left.
        available: usize,
    },
    /// An authenticated datagram carries no frame, or a builder was finished empty.
    #[error("datagram carries no frame")]
    NoFrames,
    /// A LOGIN or LOGIN_REPLY carries something other than exactly one frame followed by zero
    /// bytes of padding.
    #[error("login datagram must carry exactly one frame followed by zero padding")]
    BadLoginPayload,
    /// A LOGIN is (or would be) shorter than [`MIN_LOGIN_DATAGRAM_BYTES`]: unpadded, so answering
    /// it could amplify traffic towards a forged address.
    #[error("login datagram of {len} bytes is shorter than the minimum of {min}")]
    LoginTooShort {
        /// The login datagram's length.
        len: usize,
        /// [`MIN_LOGIN_DATAGRAM_BYTES`].
        min: usize,
    },
    /// A LOGIN_REPLY or RETRY does not echo the nonce of the client's LOGIN: stale or forged.
    #[error("login reply does not answer this login")]
    NonceMismatch,
    /// A RETRY is not exactly [`RETRY_LEN`] bytes.
    #[error("retry datagram of {0} bytes, expected {expected}", expected = RETRY_LEN)]
    BadRetry(usize),
    /// The frame does not fit in the space left in this datagram; it fits in an empty one, so
    /// send it in the next. The datagram being built is unchanged.
    #[error("frame needs {needed} bytes, {available} left in the datagram")]
    DatagramFull {
        /// Bytes the frame needs, prefix included.
        needed: usize,
        /// Bytes left before the tag.
        available: usize,
    },
    /// The frame does not fit even in an empty datagram of the given size.
    #[error("frame of {len} bytes cannot fit in a datagram of {max} bytes")]
    FrameTooLarge {
        /// The frame's encoded length.
        len: usize,
        /// The datagram size it had to fit in.
        max: usize,
    },
    /// A maximum datagram size outside [`MIN_DATAGRAM_BYTES`]`..=`[`MAX_DATAGRAM_BYTES`], or a
    /// login padding size above [`MAX_DATAGRAM_BYTES`].
    #[error("datagram size {size} is outside {min}..={max}", min = MIN_DATAGRAM_BYTES, max = MAX_DATAGRAM_BYTES)]
    BadDatagramSize {
        /// The size asked for.
        size: usize,
    },
    /// A LOGIN_REPLY would be larger than the LOGIN it answers (the anti-amplification rule).
    #[error("login reply of {len} bytes exceeds the login's {limit} bytes")]
    ReplyTooLarge {
        /// The reply's length.
        len: usize,
        /// The length of the LOGIN it answers.
        limit: usize,
    },
    /// A session key is not [`SESSION_KEY_LEN`] bytes (e.g. a bad `LoginResult.udp_session_key`).
    #[error("session key of {0} bytes, expected {expected}", expected = SESSION_KEY_LEN)]
    BadKeyLength(usize),
    /// The packet number was already received or is too old: a duplicate or a replay.
    #[error(transparent)]
    Replay(#[from] ReplayError),
}

impl WireError for UdpError {
    fn code(&self) -> pb::ErrorCode {
        match self {
            UdpError::BadMagic(byte) if byte & 0xf0 == MAGIC & 0xf0 => {
                pb::ErrorCode::UnsupportedVersion
            }
            UdpError::Truncated { .. }
            | UdpError::BadMagic(_)
            | UdpError::UnknownType(_)
            | UdpError::BadSessionId { .. }
            | UdpError::BadTag
            | UdpError::BadLengthPrefix
            | UdpError::FrameOverrun { .. }
            | UdpError::NoFrames
            | UdpError::BadLoginPayload
            | UdpError::LoginTooShort { .. }
            | UdpError::NonceMismatch
            | UdpError::BadRetry(_) => pb::ErrorCode::BadFrame,
            UdpError::UnexpectedType { .. } => pb::ErrorCode::UnexpectedFrame,
            UdpError::DatagramFull { .. }
            | UdpError::FrameTooLarge { .. }
            | UdpError::ReplyTooLarge { .. } => pb::ErrorCode::FrameTooLarge,
            UdpError::BadDatagramSize { .. } => pb::ErrorCode::Internal,
            UdpError::BadKeyLength(_) => pb::ErrorCode::InvalidArgument,
            UdpError::Replay(e) => e.code(),
        }
    }
}

/// A session's key, ready to tag and verify datagrams (the HMAC key schedule is done once, here).
/// Its `Debug` output does not show the key.
#[derive(Clone)]
pub struct SessionKey {
    mac: Hmac<Sha256>,
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKey(<redacted>)")
    }
}

impl SessionKey {
    /// The key for the 32 bytes `key`.
    pub fn new(key: &[u8; SESSION_KEY_LEN]) -> Self {
        // HMAC zero-pads a key shorter than the hash's block to the block (RFC 2104), so keying
        // with the padded block is HMAC with `key` itself, through the infallible constructor.
        let mut block = hmac::digest::Key::<Hmac<Sha256>>::default();
        block[..SESSION_KEY_LEN].copy_from_slice(key);
        Self {
            mac: <Hmac<Sha256> as KeyInit>::new(&block),
        }
    }

    /// The key for `key`, which must be 32 bytes (as in `LoginResult.udp_session_key`).
    ///
    /// # Errors
    ///
    /// [`UdpError::BadKeyLength`] for any other length.
    pub fn from_slice(key: &[u8]) -> Result<Self, UdpError> {
        <&[u8; SESSION_KEY_LEN]>::try_from(key)
            .map(Self::new)
            .map_err(|_| UdpError::BadKeyLength(key.len()))
    }

    /// The tag of `signed` (a datagram's header and frames): the first 16 bytes of
    /// HMAC-SHA256. [`seal`] and [`DatagramBuilder::finish`] append it; exposed for tests and
    /// fuzzing of what lies past authentication.
    pub fn tag(&self, signed: &[u8]) -> [u8; TAG_LEN] {
        let full = self
            .mac
            .clone()
            .chain_update(signed)
            .finalize()
            .into_bytes();
        let mut tag = [0; TAG_LEN];
        tag.copy_from_slice(&full[..TAG_LEN]);
        tag
    }

    /// Whether `tag` is the tag of `signed`, compared in constant time.
    fn verify(&self, signed: &[u8], tag: &[u8]) -> Result<(), UdpError> {
        debug_assert_eq!(tag.len(), TAG_LEN);
        self.mac
            .clone()
            .chain_update(signed)
            .verify_truncated_left(tag)
            .map_err(|_| UdpError::BadTag)
    }
}

/// Reads and checks the header of any datagram, without authenticating it: to find the session
/// (and so the key) before [`open`], or to route a LOGIN to [`open_login`].
///
/// # Errors
///
/// [`UdpError::Truncated`] (shorter than the header, or than header and tag for an authenticated
/// type), [`UdpError::BadMagic`], [`UdpError::UnknownType`], [`UdpError::BadSessionId`].
pub fn peek_header(datagram: &[u8]) -> Result<Header, UdpError> {
    let truncated = UdpError::Truncated {
        len: datagram.len(),
        min: HEADER_LEN,
    };
    let Some((&[magic, kind], rest)) = datagram.split_first_chunk::<2>() else {
        return Err(truncated);
    };
    let Some((session_id, rest)) = rest.split_first_chunk::<8>() else {
        return Err(truncated);
    };
    let Some((packet_number, _)) = rest.split_first_chunk::<8>() else {
        return Err(truncated);
    };
    if magic != MAGIC {
        return Err(UdpError::BadMagic(magic));
    }
    let kind = DatagramType::from_byte(kind).ok_or(UdpError::UnknownType(kind))?;
    let header = Header {
        kind,
        session_id: u64::from_be_bytes(*session_id),
        packet_number: u64::from_be_bytes(*packet_number),
    };
    let session_id_ok = match kind {
        DatagramType::Login | DatagramType::LoginReply => true,
        DatagramType::Retry => header.session_id != 0,
        DatagramType::ClientData | DatagramType::ServerData => header.session_id != 0,
    };
    if !session_id_ok {
        return Err(UdpError::BadSessionId {
            kind,
            session_id: header.session_id,
        });
    }
    if kind.is_authenticated() && datagram.len() < HEADER_LEN + TAG_LEN {
        return Err(UdpError::Truncated {
            len: datagram.len(),
            min: HEADER_LEN + TAG_LEN,
        });
    }
    Ok(header)
}

/// An authenticated datagram, opened: its header and its frames (validated, not decoded).
#[derive(Debug, Clone)]
pub struct Opened<'a> {
    /// The datagram's header.
    pub header: Header,
    /// The datagram's size in bytes.
    pub datagram_len: usize,
    /// The raw protobuf bytes of each frame, in order (decode each with [`frame::decode`]).
    pub frames: Frames<'a>,
}

/// Opens an authenticated datagram travelling `direction`: checks the header, verifies the tag
/// under `key` (before looking at anything after the header), then checks every frame's length.
/// Replay protection is the caller's next step ([`ReplayWindow::accept`]).
///
/// # Errors
///
/// As [`peek_header`]; [`UdpError::UnexpectedType`] if the datagram is not
/// `direction.data_type()`; [`UdpError::BadTag`] if it does not authenticate under `key`;
/// [`UdpError::BadLengthPrefix`], [`UdpError::FrameOverrun`], [`UdpError::NoFrames`] if its
/// frames are not well delimited.
pub fn open<'a>(
    key: &SessionKey,
    datagram: &'a [u8],
    direction: Direction,
) -> Result<Opened<'a>, UdpError> {
    let header = peek_header(datagram)?;
    let expected = direction.data_type();
    if header.kind != expected {
        return Err(UdpError::UnexpectedType {
            expected,
            found: header.kind,
        });
    }
    let truncated = UdpError::Truncated {
        len: datagram.len(),
        min: HEADER_LEN + TAG_LEN,
    };
    let (signed, tag) = datagram
        .len()
        .checked_sub(TAG_LEN)
        .and_then(|at| datagram.split_at_checked(at))
        .ok_or(truncated)?;
    key.verify(signed, tag)?;
    let payload = signed.get(HEADER_LEN..).unwrap_or_default();
    let count = count_frames(payload)?;
    if count == 0 {
        return Err(UdpError::NoFrames);
    }
    Ok(Opened {
        header,
        datagram_len: datagram.len(),
        frames: Frames {
            rest: payload,
            remaining: count,
        },
    })
}

/// A LOGIN or LOGIN_REPLY, opened: its header, its size and its one frame.
#[derive(Debug, Clone, Copy)]
pub struct OpenedLogin<'a> {
    /// The datagram's header (`packet_number` is the client's nonce).
    pub header: Header,
    /// The datagram's size in bytes: the most the reply to a LOGIN may take.
    pub datagram_len: usize,
    /// The raw protobuf bytes of the frame.
    pub frame: &'a [u8],
}

/// Opens a LOGIN datagram (unauthenticated) at the broker.
///
/// # Errors
///
/// As [`peek_header`]; [`UdpError::UnexpectedType`] if it is not a LOGIN;
/// [`UdpError::LoginTooShort`] if it is shorter than [`MIN_LOGIN_DATAGRAM_BYTES`] (drop it:
/// answering could amplify); [`UdpError::BadLengthPrefix`], [`UdpError::FrameOverrun`],
/// [`UdpError::BadLoginPayload`] if it is not one frame followed by zero padding.
pub fn open_login(datagram: &[u8]) -> Result<OpenedLogin<'_>, UdpError> {
    let header = expect_type(datagram, DatagramType::Login)?;
    if datagram.len() < MIN_LOGIN_DATAGRAM_BYTES {
        return Err(UdpError::LoginTooShort {
            len: datagram.len(),
            min: MIN_LOGIN_DATAGRAM_BYTES,
        });
    }
    Ok(OpenedLogin {
        header,
        datagram_len: datagram.len(),
        frame: single_frame(datagram.get(HEADER_LEN..).unwrap_or_default())?,
    })
}

/// Opens a LOGIN_REPLY (unauthenticated) at the client, which sent its LOGIN with `nonce`.
///
/// # Errors
///
/// As [`peek_header`]; [`UdpError::UnexpectedType`] if it is not a LOGIN_REPLY;
/// [`UdpError::NonceMismatch`] if it answers another login; [`UdpError::BadLengthPrefix`],
/// [`UdpError::FrameOverrun`], [`UdpError::BadLoginPayload`] if it is not exactly one frame
/// (zero padding allowed).
pub fn open_login_reply(datagram: &[u8], nonce: u64) -> Result<OpenedLogin<'_>, UdpError> {
    let header = expect_type(datagram, DatagramType::LoginReply)?;
    if header.packet_number != nonce {
        return Err(UdpError::NonceMismatch);
    }
    Ok(OpenedLogin {
        header,
        datagram_len: datagram.len(),
        frame: single_frame(datagram.get(HEADER_LEN..).unwrap_or_default())?,
    })
}

/// Seals `frames` into one authenticated datagram appended to `out`: the header, each frame
/// with its length prefix, the tag. See [`DatagramBuilder`] to pack a queue of frames instead.
///
/// # Errors
///
/// [`UdpError::BadSessionId`] for session id 0; [`UdpError::BadDatagramSize`] for a bad
/// `max_datagram_bytes`; [`UdpError::FrameTooLarge`] / [`UdpError::DatagramFull`] if the frames
/// do not fit in `max_datagram_bytes`; [`UdpError::NoFrames`] if there are none. On error
/// nothing is appended.
pub fn seal<'f>(
    key: &SessionKey,
    direction: Direction,
    session_id: u64,
    packet_number: u64,
    frames: impl IntoIterator<Item = &'f pb::Frame>,
    max_datagram_bytes: usize,
    out: &mut BytesMut,
) -> Result<(), UdpError> {
    let mut builder = DatagramBuilder::new(
        out,
        direction,
        session_id,
        packet_number,
        max_datagram_bytes,
    )?;
    for frame in frames {
        builder.push(frame)?;
    }
    builder.finish(key).map(|_| ())
}

/// Appends a LOGIN datagram of exactly `pad_to` bytes carrying `login` (the client's `Login`
/// frame), the client's random `nonce` and the retry `cookie` (0 until a RETRY gave one),
/// zero-padded.
///
/// # Errors
///
/// [`UdpError::LoginTooShort`] if `pad_to` is below [`MIN_LOGIN_DATAGRAM_BYTES`];
/// [`UdpError::BadDatagramSize`] if above [`MAX_DATAGRAM_BYTES`]; [`UdpError::FrameTooLarge`] if
/// the frame does not fit in `pad_to` bytes. On error nothing is appended.
pub fn seal_login(
    cookie: u64,
    nonce: u64,
    login: &pb::Frame,
    pad_to: usize,
    out: &mut BytesMut,
) -> Result<(), UdpError> {
    if pad_to < MIN_LOGIN_DATAGRAM_BYTES {
        return Err(UdpError::LoginTooShort {
            len: pad_to,
            min: MIN_LOGIN_DATAGRAM_BYTES,
        });
    }
    if pad_to > MAX_DATAGRAM_BYTES {
        return Err(UdpError::BadDatagramSize { size: pad_to });
    }
    let header = Header {
        kind: DatagramType::Login,
        session_id: cookie,
        packet_number: nonce,
    };
    let len = write_single(&header, login, pad_to, out).map_err(|_| UdpError::FrameTooLarge {
        len: frame::encoded_len(login),
        max: pad_to,
    })?;
    out.put_bytes(0, pad_to - len);
    Ok(())
}

/// Appends the LOGIN_REPLY answering a LOGIN: `session_id` of the new session (0 if `reply` is an
/// `Error`), the LOGIN's `nonce`, and `reply`. `limit` is the LOGIN's
/// [`OpenedLogin::datagram_len`]: the reply is never larger (the anti-amplification rule).
///
/// # Errors
///
/// [`UdpError::ReplyTooLarge`] if the reply would exceed `limit`; nothing is appended then.
pub fn seal_login_reply(
    session_id: u64,
    nonce: u64,
    reply: &pb::Frame,
    limit: usize,
    out: &mut BytesMut,
) -> Result<(), UdpError> {
    let header = Header {
        kind: DatagramType::LoginReply,
        session_id,
        packet_number: nonce,
    };
    write_single(&header, reply, limit, out)
        .map_err(|len| UdpError::ReplyTooLarge { len, limit })?;
    Ok(())
}

/// Appends the RETRY answering a LOGIN without a valid cookie: `cookie` (never 0) and the
/// LOGIN's `nonce`, [`RETRY_LEN`] bytes in all (smaller than any LOGIN the broker answers).
///
/// # Errors
///
/// [`UdpError::BadSessionId`] if `cookie` is 0; nothing is appended then.
pub fn seal_retry(cookie: u64, nonce: u64, out: &mut BytesMut) -> Result<(), UdpError> {
    if cookie == 0 {
        return Err(UdpError::BadSessionId {
            kind: DatagramType::Retry,
            session_id: cookie,
        });
    }
    Header {
        kind: DatagramType::Retry,
        session_id: cookie,
        packet_number: nonce,
    }
    .write(out);
    Ok(())
}

/// Opens a RETRY at the client, which sent its LOGIN with `nonce`: the cookie to send the LOGIN
/// again with.
///
/// # Errors
///
/// As [`peek_header`]; [`UdpError::UnexpectedType`] if it is not a RETRY;
/// [`UdpError::NonceMismatch`] if it answers another login; [`UdpError::BadRetry`] if it is
/// not exactly [`RETRY_LEN`] bytes.
pub fn open_retry(datagram: &[u8], nonce: u64) -> Result<u64, UdpError> {
    let header = expect_type(datagram, DatagramType::Retry)?;
    if header.packet_number != nonce {
        return Err(UdpError::NonceMismatch);
    }
    if datagram.len() != RETRY_LEN {
        return Err(UdpError::BadRetry(datagram.len()));
    }
    Ok(header.session_id)
}

/// Packs frames into one authenticated datagram in a caller's buffer, up to a maximum size:
/// the header is written by [`new`](Self::new), each [`push`](Self::push) appends a frame if it
/// fits, [`finish`](Self::finish) appends the tag.
///
/// ```
/// # use bytes::BytesMut;
/// # use parley_proto::{pb, udp::*};
/// # fn main() -> Result<(), UdpError> {
/// let key = SessionKey::new(&[7; SESSION_KEY_LEN]);
/// let queue = vec![pb::Frame { request_id: 1, body: Some(pb::frame::Body::Ping(pb::Ping { nonce: 1 })) }; 3];
/// let mut out = BytesMut::new();
/// let mut builder = DatagramBuilder::new(&mut out, Direction::ServerToClient, 42, 0, DEFAULT_MAX_DATAGRAM_BYTES)?;
/// let mut sent = 0;
/// for frame in &queue {
///     match builder.push(frame) {
///         Ok(()) => sent += 1,
///         Err(UdpError::DatagramFull { .. }) => break, // the rest goes in the next datagram
///         Err(e) => return Err(e),                      // can never be sent this way
///     }
/// }
/// let len = builder.finish(&key)?;
/// assert_eq!((sent, len), (3, out.len()));
/// # Ok(()) }
/// ```
///
/// ### Invariants
///
/// * `out` gains one complete, tagged datagram (on [`finish`](Self::finish)) or nothing: a
///   builder dropped unfinished truncates `out` back to where it started.
/// * The datagram, tag included, never exceeds the maximum size.
pub struct DatagramBuilder<'a> {
    out: &'a mut BytesMut,
    /// Where this datagram starts in `out`.
    start: usize,
    /// The maximum datagram size.
    max: usize,
    /// Bytes still free for frames (prefixes included) before the tag.
    remaining: usize,
    /// Frames pushed so far.
    frames: usize,
    /// Set by `finish`, so `Drop` keeps the datagram.
    finished: bool,
}

impl fmt::Debug for DatagramBuilder<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatagramBuilder")
            .field("max", &self.max)
            .field("remaining", &self.remaining)
            .field("frames", &self.frames)
            .finish_non_exhaustive()
    }
}

impl<'a> DatagramBuilder<'a> {
    /// Starts an authenticated datagram travelling `direction` at the end of `out` and writes its
    /// header.
    ///
    /// # Errors
    ///
    /// [`UdpError::BadSessionId`] for session id 0; [`UdpError::BadDatagramSize`] if
    /// `max_datagram_bytes` is outside [`MIN_DATAGRAM_BYTES`]`..=`[`MAX_DATAGRAM_BYTES`].
    pub fn new(
        out: &'a mut BytesMut,
        direction: Direction,
        session_id: u64,
        packet_number: u64,
        max_datagram_bytes: usize,
    ) -> Result<Self, UdpError> {
        let kind = direction.data_type();
        if session_id == 0 {
            return Err(UdpError::BadSessionId { kind, session_id });
        }
        if !(MIN_DATAGRAM_BYTES..=MAX_DATAGRAM_BYTES).contains(&max_datagram_bytes) {
            return Err(UdpError::BadDatagramSize {
                size: max_datagram_bytes,
            });
        }
        let start = out.len();
        out.reserve(max_datagram_bytes);
        Header {
            kind,
            session_id,
            packet_number,
        }
        .write(out);
        Ok(Self {
            out,
            start,
            max: max_datagram_bytes,
            remaining: max_datagram_bytes - HEADER_LEN - TAG_LEN,
            frames: 0,
            finished: false,
        })
    }

    /// Appends `frame` with its length prefix, encoding it in place.
    ///
    /// # Errors
    ///
    /// [`UdpError::DatagramFull`] if it does not fit in the space left (send it in the next
    /// datagram); [`UdpError::FrameTooLarge`] if it would not fit even in an empty one. Either
    /// way the datagram is unchanged.
    pub fn push(&mut self, frame: &pb::Frame) -> Result<(), UdpError> {
        let len = frame::encoded_len(frame);
        let prefix = self.make_room(len)?;
        put_prefix(prefix, self.out);
        frame::encode(frame, self.out);
        self.debug_check();
        Ok(())
    }

    /// Appends `encoded`, the protobuf encoding of a frame made beforehand, with its length
    /// prefix.
    ///
    /// # Errors
    ///
    /// As [`push`](Self::push).
    pub fn push_encoded(&mut self, encoded: &[u8]) -> Result<(), UdpError> {
        let prefix = self.make_room(encoded.len())?;
        put_prefix(prefix, self.out);
        self.out.put_slice(encoded);
        self.debug_check();
        Ok(())
    }

    /// Bytes still free for frames, length prefixes included.
    pub fn remaining(&self) -> usize {
        self.remaining
    }

    /// How many frames were pushed.
    pub fn frame_count(&self) -> usize {
        self.frames
    }

    /// Whether no frame was pushed yet.
    pub fn is_empty(&self) -> bool {
        self.frames == 0
    }

    /// Appends the tag under `key` and returns the datagram's length; the datagram is the last
    /// that many bytes of `out`.
    ///
    /// # Errors
    ///
    /// [`UdpError::NoFrames`] if no frame was pushed; `out` is then truncated back.
    pub fn finish(mut self, key: &SessionKey) -> Result<usize, UdpError> {
        if self.frames == 0 {
            return Err(UdpError::NoFrames);
        }
        let signed = self.out.get(self.start..).unwrap_or_default();
        let tag = key.tag(signed);
        self.out.put_slice(&tag);
        self.finished = true;
        let len = self.out.len() - self.start;
        debug_assert!(len <= self.max);
        Ok(len)
    }

    /// Reserves room for a frame of `len` bytes and its prefix; returns the prefix value.
    fn make_room(&mut self, len: usize) -> Result<u32, UdpError> {
        let capacity = self.max - HEADER_LEN - TAG_LEN;
        let too_large = UdpError::FrameTooLarge { len, max: self.max };
        let prefix = u32::try_from(len).map_err(|_| too_large)?;
        let needed = prefix_len(prefix)
            .checked_add(len)
            .ok_or(UdpError::FrameTooLarge { len, max: self.max })?;
        if needed > capacity {
            return Err(UdpError::FrameTooLarge { len, max: self.max });
        }
        if needed > self.remaining {
            return Err(UdpError::DatagramFull {
                needed,
                available: self.remaining,
            });
        }
        self.remaining -= needed;
        self.frames += 1;
        Ok(prefix)
    }

    fn debug_check(&self) {
        debug_assert_eq!(
            self.out.len() - self.start,
            self.max - TAG_LEN - self.remaining,
            "bytes written match the space accounted for"
        );
    }
}

impl Drop for DatagramBuilder<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.out.truncate(self.start);
        }
    }
}

/// The frames of an opened datagram, in order: each item is one frame's raw protobuf bytes.
/// Their delimitation was fully checked by [`open`], so iterating cannot fail.
#[derive(Debug, Clone)]
pub struct Frames<'a> {
    /// Frames not yet yielded, each with its prefix.
    rest: &'a [u8],
    /// How many frames `rest` holds.
    remaining: usize,
}

impl<'a> Iterator for Frames<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.remaining == 0 {
            return None;
        }
        let next = split_frame(self.rest);
        debug_assert!(next.is_ok(), "open validated every frame");
        let Ok((frame, rest)) = next else {
            self.remaining = 0;
            return None;
        };
        self.rest = rest;
        self.remaining -= 1;
        Some(frame)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for Frames<'_> {}

/// Whether the packet number was the newest yet or a late arrival within the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Higher than every packet number accepted before: the datagram may move the session's peer
    /// address.
    Newest,
    /// Lower than the newest but within the window and not seen before: process its frames, but
    /// do not move the session's peer address.
    Late,
}

/// Why [`ReplayWindow`] refuses a packet number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// This packet number was already accepted: a duplicate or a replay.
    #[error("packet {0} was already received")]
    Duplicate(u64),
    /// The packet number is [`REPLAY_WINDOW`] or more below the newest accepted: too old to tell
    /// whether it is a replay.
    #[error("packet {packet_number} is too old (newest is {newest})")]
    TooOld {
        /// The refused packet number.
        packet_number: u64,
        /// The newest packet number accepted.
        newest: u64,
    },
}

impl WireError for ReplayError {
    fn code(&self) -> pb::ErrorCode {
        pb::ErrorCode::BadFrame
    }
}

/// How far below the newest packet number a late datagram is still accepted.
pub const REPLAY_WINDOW: u64 = 128;

/// Replay protection for the packet numbers received on one session in one direction: a sliding
/// 128-bit bitmap below the newest number accepted (the RFC 4303 / RFC 6479 anti-replay window).
/// Feed it only packet numbers of datagrams that [`open`] authenticated.
///
/// ### Invariants
///
/// * Bit `i` of `seen` is set iff `newest - i` was accepted; bit 0 is set once anything was.
/// * `newest` only grows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    newest: Option<u64>,
    seen: u128,
}

impl ReplayWindow {
    /// A window that has accepted nothing: any first packet number is accepted.
    pub fn new() -> Self {
        Self::default()
    }

    /// The newest packet number accepted, if any.
    pub fn newest(&self) -> Option<u64> {
        self.newest
    }

    /// Whether `packet_number` would be accepted, without recording it.
    ///
    /// # Errors
    ///
    /// [`ReplayError::Duplicate`] if it was accepted before; [`ReplayError::TooOld`] if it is
    /// [`REPLAY_WINDOW`] or more below the newest.
    pub fn check(&self, packet_number: u64) -> Result<Accepted, ReplayError> {
        let Some(newest) = self.newest else {
            return Ok(Accepted::Newest);
        };
        if packet_number > newest {
            return Ok(Accepted::Newest);
        }
        let age = newest - packet_number;
        if age >= REPLAY_WINDOW {
            return Err(ReplayError::TooOld {
                packet_number,
                newest,
            });
        }
        if self.seen & (1u128 << age) != 0 {
            return Err(ReplayError::Duplicate(packet_number));
        }
        Ok(Accepted::Late)
    }

    /// Accepts `packet_number` if it is new, and records it.
    ///
    /// # Errors
    ///
    /// As [`check`](Self::check); nothing is recorded then.
    pub fn accept(&mut self, packet_number: u64) -> Result<Accepted, ReplayError> {
        let accepted = self.check(packet_number)?;
        match (accepted, self.newest) {
            (Accepted::Newest, None) => self.seen = 1,
            (Accepted::Newest, Some(newest)) => {
                let shift = packet_number - newest;
                self.seen = if shift >= REPLAY_WINDOW {
                    1
                } else {
                    (self.seen << shift) | 1
                };
            }
            (Accepted::Late, Some(newest)) => self.seen |= 1u128 << (newest - packet_number),
            (Accepted::Late, None) => debug_assert!(false, "late needs a newest"),
        }
        if accepted == Accepted::Newest {
            self.newest = Some(packet_number);
        }
        debug_assert!(self.seen & 1 == 1, "the newest is always marked seen");
        Ok(accepted)
    }
}

/// Checks the header of `datagram` and that it is of type `kind`.
fn expect_type(datagram: &[u8], kind: DatagramType) -> Result<Header, UdpError> {
    let header = peek_header(datagram)?;
    if header.kind != kind {
        return Err(UdpError::UnexpectedType {
            expected: kind,
            found: header.kind,
        });
    }
    Ok(header)
}

/// Splits the first length-prefixed frame off `payload`: `(frame, rest)`.
fn split_frame(payload: &[u8]) -> Result<(&[u8], &[u8]), UdpError> {
    let Ok(Prefix::Complete {
        len,
        prefix_len: skip,
    }) = read_prefix(payload)
    else {
        return Err(UdpError::BadLengthPrefix);
    };
    let after = payload.get(skip..).unwrap_or_default();
    let overrun = UdpError::FrameOverrun {
        len: usize::try_from(len).unwrap_or(usize::MAX),
        available: after.len(),
    };
    let len = usize::try_from(len).map_err(|_| UdpError::BadLengthPrefix)?;
    after.split_at_checked(len).ok_or(overrun)
}

/// Counts the frames of `payload`, checking that they tile it exactly.
fn count_frames(mut payload: &[u8]) -> Result<usize, UdpError> {
    let mut count = 0;
    while !payload.is_empty() {
        let (_, rest) = split_frame(payload)?;
        payload = rest;
        count += 1;
    }
    Ok(count)
}

/// The one frame of a login payload, which may be followed only by zero bytes.
fn single_frame(payload: &[u8]) -> Result<&[u8], UdpError> {
    let (frame, padding) = split_frame(payload)?;
    if padding.iter().any(|&b| b != 0) {
        return Err(UdpError::BadLoginPayload);
    }
    Ok(frame)
}

/// Appends `header` and `frame` (prefixed) if the result is at most `limit` bytes, and returns
/// its length; otherwise appends nothing and returns the length it would have had.
fn write_single(
    header: &Header,
    frame: &pb::Frame,
    limit: usize,
    out: &mut BytesMut,
) -> Result<usize, usize> {
    let len = frame::encoded_len(frame);
    let prefix = u32::try_from(len).map_err(|_| len)?;
    let total = HEADER_LEN
        .checked_add(prefix_len(prefix))
        .and_then(|n| n.checked_add(len))
        .ok_or(len)?;
    if total > limit {
        return Err(total);
    }
    out.reserve(limit.min(MAX_DATAGRAM_BYTES).max(total));
    header.write(out);
    put_prefix(prefix, out);
    frame::encode(frame, out);
    Ok(total)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::pb::frame::Body;

    const KEY: [u8; SESSION_KEY_LEN] = [0x42; SESSION_KEY_LEN];

    fn key() -> SessionKey {
        SessionKey::new(&KEY)
    }

    fn ping(nonce: u64) -> pb::Frame {
        pb::Frame {
            request_id: nonce,
            body: Some(Body::Ping(pb::Ping { nonce })),
        }
    }

    fn login() -> pb::Frame {
        pb::Frame {
            request_id: 1,
            body: Some(Body::Login(pb::Login {
                protocol_version: 1,
                token: "header.claims.signature".into(),
                client_name: "test/1".into(),
            })),
        }
    }

    fn sealed(frames: &[pb::Frame]) -> BytesMut {
        let mut out = BytesMut::new();
        seal(
            &key(),
            Direction::ClientToServer,
            77,
            5,
            frames,
            DEFAULT_MAX_DATAGRAM_BYTES,
            &mut out,
        )
        .expect("fits");
        out
    }

    fn decoded(opened: &Opened<'_>) -> Vec<pb::Frame> {
        opened
            .frames
            .clone()
            .map(|f| frame::decode(Bytes::copy_from_slice(f)).expect("frame"))
            .collect()
    }

    #[test]
    fn session_key_tag_is_truncated_hmac_sha256_of_the_key() {
        let data = b"header and frames";
        let full = Hmac::<Sha256>::new_from_slice(&KEY)
            .expect("any length")
            .chain_update(data)
            .finalize()
            .into_bytes();
        assert_eq!(key().tag(data)[..], full[..TAG_LEN]);
    }

    #[test]
    fn session_key_debug_does_not_show_the_key() {
        assert_eq!(format!("{:?}", key()), "SessionKey(<redacted>)");
    }

    #[test]
    fn session_key_of_wrong_length_is_refused() {
        assert!(matches!(
            SessionKey::from_slice(&[0; 16]),
            Err(UdpError::BadKeyLength(16))
        ));
        assert!(SessionKey::from_slice(&KEY).is_ok());
    }

    #[test]
    fn header_layout_is_magic_type_then_big_endian_ids() {
        let dgram = sealed(&[ping(1)]);
        assert_eq!(dgram[0], MAGIC);
        assert_eq!(dgram[1], DatagramType::ClientData.to_byte());
        assert_eq!(dgram[2..10], 77u64.to_be_bytes());
        assert_eq!(dgram[10..18], 5u64.to_be_bytes());
        let tag = key().tag(&dgram[..dgram.len() - TAG_LEN]);
        assert_eq!(dgram[dgram.len() - TAG_LEN..], tag);
    }

    #[test]
    fn sealed_datagram_opens_to_the_same_frames() {
        let frames = vec![ping(1), login(), ping(3)];
        let dgram = sealed(&frames);
        let opened = open(&key(), &dgram, Direction::ClientToServer).expect("opens");
        assert_eq!(
            opened.header,
            Header {
                kind: DatagramType::ClientData,
                session_id: 77,
                packet_number: 5
            }
        );
        assert_eq!(opened.datagram_len, dgram.len());
        assert_eq!(opened.frames.len(), 3);
        assert_eq!(decoded(&opened), frames);
    }

    #[test]
    fn peek_header_reads_the_header_without_the_key() {
        let dgram = sealed(&[ping(1)]);
        let header = peek_header(&dgram).expect("header");
        assert_eq!((header.session_id, header.packet_number), (77, 5));
    }

    #[test]
    fn any_altered_byte_fails_authentication() {
        let dgram = sealed(&[ping(1), ping(2)]);
        for i in 0..dgram.len() {
            let mut bad = dgram.clone();
            bad[i] ^= 0x01;
            let result = open(&key(), &bad, Direction::ClientToServer);
            assert!(result.is_err(), "flipping byte {i} went unnoticed");
            if i >= 2 + 8 {
                // Past magic, type and session id, only the tag can notice.
                assert!(matches!(result, Err(UdpError::BadTag)), "byte {i}");
            }
        }
    }

    #[test]
    fn wrong_session_key_is_rejected() {
        let dgram = sealed(&[ping(1)]);
        let other = SessionKey::new(&[0x43; SESSION_KEY_LEN]);
        assert!(matches!(
            open(&other, &dgram, Direction::ClientToServer),
            Err(UdpError::BadTag)
        ));
    }

    #[test]
    fn session_id_alone_is_not_enough_to_forge_a_datagram() {
        // An attacker knows the session id and packet number but not the key.
        let mut forged = BytesMut::new();
        let guess = SessionKey::new(&[0; SESSION_KEY_LEN]);
        seal(
            &guess,
            Direction::ClientToServer,
            77,
            6,
            &[ping(1)],
            DEFAULT_MAX_DATAGRAM_BYTES,
            &mut forged,
        )
        .expect("fits");
        assert!(matches!(
            open(&key(), &forged, Direction::ClientToServer),
            Err(UdpError::BadTag)
        ));
    }

    #[test]
    fn server_datagram_reflected_to_the_server_is_rejected() {
        let mut dgram = BytesMut::new();
        seal(
            &key(),
            Direction::ServerToClient,
            77,
            5,
            &[ping(1)],
            DEFAULT_MAX_DATAGRAM_BYTES,
            &mut dgram,
        )
        .expect("fits");
        assert!(matches!(
            open(&key(), &dgram, Direction::ClientToServer),
            Err(UdpError::UnexpectedType { .. })
        ));
        assert!(open(&key(), &dgram, Direction::ServerToClient).is_ok());
    }

    #[test]
    fn retyping_a_datagram_breaks_its_tag() {
        let mut dgram = sealed(&[ping(1)]);
        dgram[1] = DatagramType::ServerData.to_byte();
        assert!(matches!(
            open(&key(), &dgram, Direction::ServerToClient),
            Err(UdpError::BadTag)
        ));
    }

    #[test]
    fn truncated_datagram_is_rejected_at_every_length() {
        let dgram = sealed(&[ping(1)]);
        for len in 0..dgram.len() {
            assert!(
                open(&key(), &dgram[..len], Direction::ClientToServer).is_err(),
                "length {len}"
            );
        }
        assert!(matches!(
            peek_header(&dgram[..HEADER_LEN - 1]),
            Err(UdpError::Truncated { .. })
        ));
        assert!(matches!(
            peek_header(&dgram[..HEADER_LEN + TAG_LEN - 1]),
            Err(UdpError::Truncated { .. })
        ));
    }

    #[test]
    fn bad_magic_is_rejected_and_another_version_is_unsupported() {
        let mut dgram = sealed(&[ping(1)]);
        dgram[0] = 0xA2;
        let err = peek_header(&dgram).expect_err("version 2");
        assert!(matches!(err, UdpError::BadMagic(0xA2)));
        assert_eq!(err.code(), pb::ErrorCode::UnsupportedVersion);
        dgram[0] = 0x17;
        assert_eq!(
            peek_header(&dgram).expect_err("not parley").code(),
            pb::ErrorCode::BadFrame
        );
    }

    #[test]
    fn unknown_type_is_rejected() {
        let mut dgram = sealed(&[ping(1)]);
        dgram[1] = 9;
        assert!(matches!(peek_header(&dgram), Err(UdpError::UnknownType(9))));
    }

    #[test]
    fn data_datagram_with_session_id_zero_is_rejected() {
        let mut dgram = sealed(&[ping(1)]);
        dgram[2..10].fill(0);
        assert!(matches!(
            peek_header(&dgram),
            Err(UdpError::BadSessionId { .. })
        ));
    }

    #[test]
    fn frames_overrunning_the_tag_are_rejected_after_authentication() {
        // A validly tagged datagram (the key holder is buggy) whose frame length lies.
        let mut signed = BytesMut::new();
        Header {
            kind: DatagramType::ClientData,
            session_id: 77,
            packet_number: 1,
        }
        .write(&mut signed);
        signed.extend_from_slice(&[0x05, 0x08, 0x01]);
        let tag = key().tag(&signed);
        signed.extend_from_slice(&tag);
        assert!(matches!(
            open(&key(), &signed, Direction::ClientToServer),
            Err(UdpError::FrameOverrun {
                len: 5,
                available: 2
            })
        ));
    }

    #[test]
    fn authenticated_datagram_without_frames_is_rejected() {
        let mut signed = BytesMut::new();
        Header {
            kind: DatagramType::ClientData,
            session_id: 77,
            packet_number: 1,
        }
        .write(&mut signed);
        let tag = key().tag(&signed);
        signed.extend_from_slice(&tag);
        assert!(matches!(
            open(&key(), &signed, Direction::ClientToServer),
            Err(UdpError::NoFrames)
        ));
    }

    #[test]
    fn seal_refuses_a_datagram_over_the_max_and_appends_nothing() {
        let mut out = BytesMut::from(&b"keep"[..]);
        let frames = vec![ping(u64::MAX); 100];
        let err = seal(
            &key(),
            Direction::ClientToServer,
            1,
            1,
            &frames,
            DEFAULT_MAX_DATAGRAM_BYTES,
            &mut out,
        )
        .expect_err("too big");
        assert!(matches!(err, UdpError::DatagramFull { .. }));
        assert_eq!(&out[..], b"keep");
    }

    #[test]
    fn seal_with_no_frames_is_refused() {
        let mut out = BytesMut::new();
        let none: [pb::Frame; 0] = [];
        assert!(matches!(
            seal(
                &key(),
                Direction::ClientToServer,
                1,
                1,
                &none,
                DEFAULT_MAX_DATAGRAM_BYTES,
                &mut out
            ),
            Err(UdpError::NoFrames)
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn seal_refuses_session_id_zero_and_bad_sizes() {
        let mut out = BytesMut::new();
        let seal_with = |session_id, max, out: &mut BytesMut| {
            seal(
                &key(),
                Direction::ClientToServer,
                session_id,
                1,
                &[ping(1)],
                max,
                out,
            )
        };
        assert!(matches!(
            seal_with(0, 1200, &mut out),
            Err(UdpError::BadSessionId { .. })
        ));
        assert!(matches!(
            seal_with(1, MIN_DATAGRAM_BYTES - 1, &mut out),
            Err(UdpError::BadDatagramSize { .. })
        ));
        assert!(matches!(
            seal_with(1, usize::MAX, &mut out),
            Err(UdpError::BadDatagramSize { .. })
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn builder_packs_frames_until_the_next_does_not_fit() {
        let frame = ping(u64::MAX);
        let mut out = BytesMut::new();
        let mut builder =
            DatagramBuilder::new(&mut out, Direction::ServerToClient, 9, 0, 200).expect("valid");
        let mut pushed = 0;
        while builder.push(&frame).is_ok() {
            pushed += 1;
        }
        let per_frame = 1 + frame::encoded_len(&frame);
        assert_eq!(pushed, (200 - HEADER_LEN - TAG_LEN) / per_frame);
        assert!(matches!(
            builder.push(&frame),
            Err(UdpError::DatagramFull { .. })
        ));
        let len = builder.finish(&key()).expect("has frames");
        assert!(len <= 200);
        let opened = open(&key(), &out, Direction::ServerToClient).expect("opens");
        assert_eq!(opened.frames.len(), pushed);
    }

    #[test]
    fn builder_reports_a_frame_that_can_never_fit() {
        let big = pb::Frame {
            request_id: 0,
            body: Some(Body::Send(pb::Send {
                body: Bytes::from(vec![0; 2000]),
                ..pb::Send::default()
            })),
        };
        let mut out = BytesMut::new();
        let mut builder =
            DatagramBuilder::new(&mut out, Direction::ServerToClient, 9, 0, 1200).expect("valid");
        assert!(matches!(
            builder.push(&big),
            Err(UdpError::FrameTooLarge { max: 1200, .. })
        ));
        assert!(builder.is_empty());
    }

    #[test]
    fn dropped_builder_leaves_the_buffer_as_it_was() {
        let mut out = BytesMut::from(&b"earlier datagram"[..]);
        {
            let mut builder = DatagramBuilder::new(&mut out, Direction::ServerToClient, 9, 0, 1200)
                .expect("valid");
            builder.push(&ping(1)).expect("fits");
        }
        assert_eq!(&out[..], b"earlier datagram");
    }

    #[test]
    fn builder_appends_after_existing_datagrams() {
        let mut out = BytesMut::from(&b"earlier"[..]);
        let mut builder =
            DatagramBuilder::new(&mut out, Direction::ServerToClient, 9, 0, 1200).expect("valid");
        builder.push_encoded(&[0x08, 0x01]).expect("fits");
        let len = builder.finish(&key()).expect("has frames");
        let dgram = &out[out.len() - len..];
        let opened = open(&key(), dgram, Direction::ServerToClient).expect("opens");
        assert_eq!(opened.frames.collect::<Vec<_>>(), vec![&[0x08, 0x01][..]]);
    }

    #[test]
    fn login_datagram_is_padded_and_opens_to_its_frame() {
        let mut out = BytesMut::new();
        seal_login(0, 0xfeed, &login(), MIN_LOGIN_DATAGRAM_BYTES, &mut out).expect("fits");
        assert_eq!(out.len(), MIN_LOGIN_DATAGRAM_BYTES);
        let opened = open_login(&out).expect("opens");
        assert_eq!(opened.header.packet_number, 0xfeed);
        assert_eq!(opened.header.session_id, 0);
        assert_eq!(opened.datagram_len, MIN_LOGIN_DATAGRAM_BYTES);
        assert_eq!(
            frame::decode(Bytes::copy_from_slice(opened.frame)).expect("frame"),
            login()
        );
    }

    #[test]
    fn login_shorter_than_the_minimum_is_refused_both_ways() {
        let mut out = BytesMut::new();
        assert!(matches!(
            seal_login(0, 1, &login(), 100, &mut out),
            Err(UdpError::LoginTooShort { .. })
        ));
        seal_login(0, 1, &login(), MIN_LOGIN_DATAGRAM_BYTES, &mut out).expect("fits");
        assert!(matches!(
            open_login(&out[..MIN_LOGIN_DATAGRAM_BYTES - 1]),
            Err(UdpError::LoginTooShort { .. })
        ));
    }

    #[test]
    fn login_with_garbage_after_the_frame_is_refused() {
        let mut out = BytesMut::new();
        seal_login(0, 1, &login(), MIN_LOGIN_DATAGRAM_BYTES, &mut out).expect("fits");
        let last = out.len() - 1;
        out[last] = 1;
        assert!(matches!(open_login(&out), Err(UdpError::BadLoginPayload)));
    }

    #[test]
    fn login_carries_its_retry_cookie_in_the_session_id_field() {
        let mut out = BytesMut::new();
        seal_login(0xc00c1e, 7, &login(), MIN_LOGIN_DATAGRAM_BYTES, &mut out).expect("fits");
        let opened = open_login(&out).expect("opens");
        assert_eq!(opened.header.session_id, 0xc00c1e);
        assert_eq!(opened.header.packet_number, 7);
    }

    #[test]
    fn retry_is_a_bare_header_that_echoes_the_nonce() {
        let mut out = BytesMut::new();
        seal_retry(0xc00c1e, 7, &mut out).expect("seals");
        assert_eq!(out.len(), RETRY_LEN);
        const { assert!(RETRY_LEN < MIN_LOGIN_DATAGRAM_BYTES) };
        assert_eq!(open_retry(&out, 7).expect("opens"), 0xc00c1e);
        assert!(matches!(open_retry(&out, 8), Err(UdpError::NonceMismatch)));
        let mut longer = out.clone();
        longer.put_u8(0);
        assert!(matches!(
            open_retry(&longer, 7),
            Err(UdpError::BadRetry(19))
        ));
    }

    #[test]
    fn retry_without_a_cookie_is_refused_both_ways() {
        let mut out = BytesMut::new();
        assert!(matches!(
            seal_retry(0, 7, &mut out),
            Err(UdpError::BadSessionId { .. })
        ));
        assert!(out.is_empty());
        out.put_u8(MAGIC);
        out.put_u8(DatagramType::Retry.to_byte());
        out.put_u64(0);
        out.put_u64(7);
        assert!(matches!(
            open_retry(&out, 7),
            Err(UdpError::BadSessionId { .. })
        ));
    }

    #[test]
    fn retry_is_not_a_login_reply() {
        let mut out = BytesMut::new();
        seal_retry(1, 7, &mut out).expect("seals");
        assert!(matches!(
            open_login_reply(&out, 7),
            Err(UdpError::UnexpectedType { .. })
        ));
        assert!(matches!(
            open_login(&out),
            Err(UdpError::UnexpectedType { .. })
        ));
    }

    #[test]
    fn data_datagram_is_not_a_login() {
        let dgram = sealed(&[ping(1)]);
        assert!(matches!(
            open_login(&dgram),
            Err(UdpError::UnexpectedType { .. })
        ));
    }

    #[test]
    fn login_reply_never_exceeds_the_login_it_answers() {
        let big_reply = pb::Frame {
            request_id: 1,
            body: Some(Body::LoginResult(pb::LoginResult {
                node: "n".repeat(2000),
                ..pb::LoginResult::default()
            })),
        };
        let mut out = BytesMut::new();
        let err = seal_login_reply(5, 1, &big_reply, 1200, &mut out).expect_err("too big");
        assert!(matches!(err, UdpError::ReplyTooLarge { limit: 1200, .. }));
        assert!(out.is_empty());
    }

    #[test]
    fn login_reply_opens_only_with_the_logins_nonce() {
        let reply = pb::Frame {
            request_id: 1,
            body: Some(Body::LoginResult(pb::LoginResult {
                udp_session_id: 5,
                udp_session_key: KEY.to_vec(),
                ..pb::LoginResult::default()
            })),
        };
        let mut out = BytesMut::new();
        seal_login_reply(5, 0xabc, &reply, 1200, &mut out).expect("fits");
        assert!(out.len() <= 1200);
        assert!(matches!(
            open_login_reply(&out, 0xabd),
            Err(UdpError::NonceMismatch)
        ));
        let opened = open_login_reply(&out, 0xabc).expect("opens");
        assert_eq!(opened.header.session_id, 5);
        assert_eq!(
            frame::decode(Bytes::copy_from_slice(opened.frame)).expect("frame"),
            reply
        );
    }

    #[test]
    fn replay_window_accepts_increasing_numbers_as_newest() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.accept(0), Ok(Accepted::Newest));
        assert_eq!(w.accept(1), Ok(Accepted::Newest));
        assert_eq!(w.accept(1000), Ok(Accepted::Newest));
        assert_eq!(w.newest(), Some(1000));
    }

    #[test]
    fn replay_window_rejects_a_duplicate() {
        let mut w = ReplayWindow::new();
        w.accept(10).expect("new");
        assert_eq!(w.accept(10), Err(ReplayError::Duplicate(10)));
    }

    #[test]
    fn replay_window_accepts_a_late_number_once() {
        let mut w = ReplayWindow::new();
        w.accept(10).expect("new");
        assert_eq!(w.accept(7), Ok(Accepted::Late));
        assert_eq!(w.accept(7), Err(ReplayError::Duplicate(7)));
        assert_eq!(w.accept(8), Ok(Accepted::Late));
    }

    #[test]
    fn replay_window_rejects_numbers_older_than_the_window() {
        let mut w = ReplayWindow::new();
        w.accept(1000).expect("new");
        assert_eq!(w.accept(1000 - 127), Ok(Accepted::Late));
        assert_eq!(
            w.accept(1000 - 128),
            Err(ReplayError::TooOld {
                packet_number: 872,
                newest: 1000
            })
        );
    }

    #[test]
    fn replay_window_remembers_numbers_across_a_slide() {
        let mut w = ReplayWindow::new();
        w.accept(5).expect("new");
        w.accept(3).expect("late");
        w.accept(100).expect("new");
        assert_eq!(w.accept(5), Err(ReplayError::Duplicate(5)));
        assert_eq!(w.accept(3), Err(ReplayError::Duplicate(3)));
        assert_eq!(w.accept(4), Ok(Accepted::Late));
    }

    #[test]
    fn replay_window_jump_beyond_its_width_forgets_everything_older() {
        let mut w = ReplayWindow::new();
        w.accept(1).expect("new");
        w.accept(1 + 500).expect("new");
        assert!(matches!(w.accept(1), Err(ReplayError::TooOld { .. })));
        assert_eq!(w.accept(500), Ok(Accepted::Late));
    }

    #[test]
    fn replay_window_check_does_not_record() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.check(3), Ok(Accepted::Newest));
        assert_eq!(w.accept(3), Ok(Accepted::Newest));
    }

    #[test]
    fn replay_window_handles_the_extremes_of_u64() {
        let mut w = ReplayWindow::new();
        w.accept(u64::MAX).expect("new");
        assert_eq!(w.accept(u64::MAX), Err(ReplayError::Duplicate(u64::MAX)));
        assert!(matches!(w.accept(0), Err(ReplayError::TooOld { .. })));
    }

    #[test]
    fn replayed_datagram_is_caught_by_the_window_after_open() {
        let dgram = sealed(&[ping(1)]);
        let mut w = ReplayWindow::new();
        for attempt in 0..2 {
            let opened = open(&key(), &dgram, Direction::ClientToServer).expect("authentic");
            let result = w.accept(opened.header.packet_number);
            assert_eq!(result.is_ok(), attempt == 0);
        }
    }
}
