//! The encoding of the core's mail ([`ShardMsg`]) between the nodes of a cluster: a batch of
//! mail in bytes, and back.
//!
//! * **Format.** [postcard](https://docs.rs/postcard) over the serde derives of [`ShardMsg`] and
//!   every type it carries: compact, not self-describing (field names and types are not in the
//!   bytes, only varints, lengths and variant indexes). A batch is a postcard sequence of
//!   `ShardMsg`; trailing bytes after it are an error.
//! * **Protocol messages** (`parley_proto::pb`, prost types) are carried as their protobuf
//!   encoding in a byte string ([`prost_msg`] and its siblings): their own serde impls are the
//!   proto3 JSON mapping (pbjson), which needs a self-describing format. Protocol enums stored as
//!   `i32` are plain integers; one held as its enum type is carried by its number ([`pb_enum`]).
//! * **Conversations** (`Arc<Conv>`) are carried by their canonical key ([`conv`]) and rebuilt
//!   with [`Conv::from_key`] on arrival; a key that names no conversation fails the batch
//!   ([`WireError::BadConversation`]). Rooms are named by their room id (a string) already.
//! * **Shared strings.** A decoding thread keeps the conversations ([`conv`]) and the user and
//!   device ids ([`shared_str`]) it read last in a bounded cache, so that the mail of a busy
//!   conversation does not rebuild them for every message (a cache that fills is emptied).
//! * **Monotonic times** (measured on the sender's clock, meaningless on another node) are not
//!   sent at all ([`mono`], [`mono_opt`]): the receiver reads them as its own arrival time,
//!   `now_us` of [`decode_batch`].
//! * **A malformed token's text** (`AuthError::Malformed`, a `&'static str` of a public type) is
//!   read back as this release's own text, or a fixed one for a custom verifier's ([`token_text`]).
//!
//! Nothing in this format is meant to be read by another release: every node of a cluster must
//! run the same one. The link handshake carries [`WIRE_VERSION`], which must be bumped whenever
//! any mail type changes shape (a field or variant added, removed, reordered or retyped), so that
//! nodes of different releases refuse each other instead of misreading each other's mail.
//!
//! Decoding never panics, whatever the bytes: it returns a [`WireError`].

use std::cell::RefCell;
use std::sync::Arc;

use serde::de::{self, Deserializer, Visitor};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};

use super::conv::Conv;
use super::mail::ShardMsg;

/// The version of this encoding, carried by the cluster link's handshake. Bump it whenever any
/// type carried by [`ShardMsg`] changes shape: nodes of different wire versions must not link.
pub(crate) const WIRE_VERSION: u32 = 1;

/// Why a batch of mail from another node could not be read (or, rarely, written).
#[derive(Debug, thiserror::Error)]
pub(crate) enum WireError {
    /// The bytes are not a batch of mail of this wire version.
    #[error("malformed mail batch: {0}")]
    Malformed(String),
    /// A conversation key in the mail names no conversation.
    #[error("mail names no conversation with key {0:?}")]
    BadConversation(String),
    /// A protocol message in the mail is not valid protobuf.
    #[error("malformed protocol message in mail: {0}")]
    BadProtocolMessage(String),
    /// Bytes follow the batch.
    #[error("{0} bytes after the end of the mail batch")]
    TrailingBytes(usize),
    /// The batch could not be encoded.
    #[error("mail batch could not be encoded: {0}")]
    Encode(String),
}

/// Appends the encoding of `batch` to `out`.
pub(crate) fn encode_batch(batch: &[ShardMsg], out: &mut Vec<u8>) -> Result<(), WireError> {
    let start = out.len();
    match postcard::to_io(batch, &mut *out) {
        Ok(_) => Ok(()),
        Err(e) => {
            out.truncate(start);
            Err(WireError::Encode(e.to_string()))
        }
    }
}

/// Decodes a batch written by [`encode_batch`]. Monotonic times in the mail
/// ([`Append::arrived_us`](super::mail::Append::arrived_us),
/// [`Delivery::sent_us`](super::mail::Delivery::sent_us) when `Some`, and any other field measured
/// on the sender's monotonic clock) are meaningless on another node: they are replaced by `now_us`
/// (the arrival time here).
#[cfg(any(test, feature = "fuzz"))]
pub(crate) fn decode_batch(bytes: &[u8], now_us: u64) -> Result<Vec<ShardMsg>, WireError> {
    decode_shared(&bytes::Bytes::copy_from_slice(bytes), now_us)
}

/// A batch of mail in the form the links carry it to a shard of another node. The simulation
/// carries mail between its nodes this way, so what it checks went through the wire format.
pub fn mail_to_bytes(batch: &[ShardMsg]) -> Result<bytes::Bytes, String> {
    let mut out = Vec::new();
    encode_batch(batch, &mut out).map_err(|e| e.to_string())?;
    Ok(out.into())
}

/// The mail of [`mail_to_bytes`]'s bytes, decoded as the receiving node's shard decodes it
/// (at `now`, which stands in for the times the wire leaves out).
pub fn mail_from_bytes(bytes: &bytes::Bytes, now: super::Now) -> Result<Vec<ShardMsg>, String> {
    decode_shared(bytes, now.us).map_err(|e| e.to_string())
}

/// [`decode_batch`] of a shared buffer: the message bodies in the mail ([`shared_bytes`], and
/// the byte fields of protocol messages) are slices of `bytes`, not copies.
pub(crate) fn decode_shared(bytes: &bytes::Bytes, now_us: u64) -> Result<Vec<ShardMsg>, WireError> {
    DECODING.with_borrow_mut(|d| {
        *d = Decoding {
            now_us,
            detail: None,
            input: bytes.clone(),
        }
    });
    let decoded = postcard::take_from_bytes::<Vec<ShardMsg>>(bytes);
    let detail = DECODING.with_borrow_mut(|d| {
        d.input = bytes::Bytes::new();
        d.detail.take()
    });
    match decoded {
        Ok((batch, [])) => Ok(batch),
        Ok((_, rest)) => Err(WireError::TrailingBytes(rest.len())),
        Err(e) => Err(detail.unwrap_or_else(|| WireError::Malformed(e.to_string()))),
    }
}

/// Decodes `bytes` as a batch at a fixed arrival time and, if it decodes, checks it encodes and
/// decodes again to the same mail (panics if not): for the fuzz target and the proptests.
#[cfg(any(test, feature = "fuzz"))]
pub(crate) fn check_round_trip(bytes: &[u8]) {
    const NOW_US: u64 = 1_000_000;
    let Ok(batch) = decode_batch(bytes, NOW_US) else {
        return;
    };
    let mut again = Vec::new();
    if let Err(e) = encode_batch(&batch, &mut again) {
        panic!("decoded mail does not encode: {e}: {batch:?}");
    }
    match decode_batch(&again, NOW_US) {
        Ok(second) => assert_eq!(
            format!("{batch:?}"),
            format!("{second:?}"),
            "decoded mail changes through a round trip"
        ),
        Err(e) => panic!("re-encoded mail does not decode: {e}: {batch:?}"),
    }
}

/// What the helpers below need while a batch is decoded on this thread: postcard's own errors
/// drop the message of a custom error, so a helper leaves the detail here.
#[derive(Debug, Default)]
struct Decoding {
    /// The arrival time of the batch being decoded ([`mono`] fields read it).
    now_us: u64,
    /// Why a helper refused its input.
    detail: Option<WireError>,
    /// The batch being decoded (byte strings inside it are sliced from it: [`slice_of_input`]).
    input: bytes::Bytes,
}

/// `v`, a byte string borrowed from the batch being decoded, as a slice of the batch's buffer
/// (no copy); a copy if it is not one.
fn slice_of_input(v: &[u8]) -> bytes::Bytes {
    DECODING.with_borrow(|d| {
        let (start, end) = (
            d.input.as_ptr() as usize,
            d.input.as_ptr() as usize + d.input.len(),
        );
        let (p, q) = (v.as_ptr() as usize, v.as_ptr() as usize + v.len());
        if !v.is_empty() && start <= p && q <= end {
            d.input.slice(p - start..q - start)
        } else {
            bytes::Bytes::copy_from_slice(v)
        }
    })
}

thread_local! {
    /// The decode under way on this thread.
    static DECODING: RefCell<Decoding> = RefCell::new(Decoding::default());
}

/// Fails the decode with `error` (kept for [`decode_batch`]'s answer).
fn refuse<E: de::Error>(error: WireError) -> E {
    let e = E::custom(&error);
    DECODING.with_borrow_mut(|d| d.detail = Some(error));
    e
}

// ----- protocol messages -------------------------------------------------------------------------

/// A protocol message, serialized as its protobuf encoding.
struct AsProst<'a, M>(&'a M);

impl<M: prost::Message> Serialize for AsProst<'_, M> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Encoded in the thread's kept buffer (no allocation per message once it has grown).
        PROST_SCRATCH.with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut buf) => {
                buf.clear();
                self.0.encode_raw(&mut *buf);
                s.serialize_bytes(&buf)
            }
            Err(_) => s.serialize_bytes(&self.0.encode_to_vec()),
        })
    }
}

thread_local! {
    /// The buffer protocol messages are encoded in before they are written ([`AsProst`]).
    static PROST_SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A protocol message, deserialized from its protobuf encoding.
struct FromProst<M>(M);

impl<'de, M: prost::Message + Default> Deserialize<'de> for FromProst<M> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// Decodes the byte string as it comes.
        struct ProstVisitor<M>(std::marker::PhantomData<M>);

        impl<M: prost::Message + Default> Visitor<'_> for ProstVisitor<M> {
            type Value = M;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a protobuf-encoded protocol message")
            }

            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<M, E> {
                // From a slice of the batch, so that its `bytes` fields are slices too.
                M::decode(slice_of_input(v))
                    .map_err(|e| refuse(WireError::BadProtocolMessage(e.to_string())))
            }
        }

        d.deserialize_bytes(ProstVisitor(std::marker::PhantomData))
            .map(FromProst)
    }
}

/// `#[serde(with)]` for a protocol message: its protobuf encoding.
pub(crate) mod prost_msg {
    use super::*;

    /// Writes `m`'s protobuf encoding.
    pub(crate) fn serialize<M: prost::Message, S: Serializer>(
        m: &M,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        AsProst(m).serialize(s)
    }

    /// Reads a protobuf encoding.
    pub(crate) fn deserialize<'de, M: prost::Message + Default, D: Deserializer<'de>>(
        d: D,
    ) -> Result<M, D::Error> {
        FromProst::deserialize(d).map(|m| m.0)
    }
}

/// `#[serde(with)]` for a boxed protocol message: its protobuf encoding.
pub(crate) mod prost_box {
    use super::*;

    /// Writes `m`'s protobuf encoding.
    pub(crate) fn serialize<M: prost::Message, S: Serializer>(
        m: &M,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        AsProst(m).serialize(s)
    }

    /// Reads a protobuf encoding.
    pub(crate) fn deserialize<'de, M: prost::Message + Default, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Box<M>, D::Error> {
        FromProst::deserialize(d).map(|m| Box::new(m.0))
    }
}

/// `#[serde(with)]` for a list of protocol messages: a sequence of their protobuf encodings.
pub(crate) mod prost_vec {
    use super::*;

    /// Writes each message's protobuf encoding.
    pub(crate) fn serialize<M: prost::Message, S: Serializer>(
        v: &[M],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(AsProst))
    }

    /// Reads a sequence of protobuf encodings.
    pub(crate) fn deserialize<'de, M: prost::Message + Default, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<M>, D::Error> {
        let v: Vec<FromProst<M>> = Vec::deserialize(d)?;
        Ok(v.into_iter().map(|m| m.0).collect())
    }
}

/// `#[serde(with)]` for a list of shared protocol messages each with a value beside it
/// (`Vec<(Arc<M>, T)>`): the messages as their protobuf encodings (one copy each on arrival).
pub(crate) mod prost_arc_pairs {
    use super::*;

    /// Writes each pair, the message as its protobuf encoding.
    pub(crate) fn serialize<M: prost::Message, T: Serialize, S: Serializer>(
        v: &[(Arc<M>, T)],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|(m, t)| (AsProst(&**m), t)))
    }

    /// Reads a sequence of pairs.
    pub(crate) fn deserialize<
        'de,
        M: prost::Message + Default,
        T: Deserialize<'de>,
        D: Deserializer<'de>,
    >(
        d: D,
    ) -> Result<Vec<(Arc<M>, T)>, D::Error> {
        let v: Vec<(FromProst<M>, T)> = Vec::deserialize(d)?;
        Ok(v.into_iter().map(|(m, t)| (Arc::new(m.0), t)).collect())
    }
}

/// `#[serde(with)]` for a protocol enum held as its Rust enum: its number; a number the enum
/// does not know fails the decode.
pub(crate) mod pb_enum {
    use super::*;

    /// Writes the enum's number.
    pub(crate) fn serialize<E: Copy + Into<i32>, S: Serializer>(
        e: &E,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_i32((*e).into())
    }

    /// Reads a number the enum knows.
    pub(crate) fn deserialize<'de, E: TryFrom<i32>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<E, D::Error> {
        let n = i32::deserialize(d)?;
        E::try_from(n).map_err(|_| refuse(WireError::Malformed(format!("unknown enum value {n}"))))
    }
}

// ----- conversations -----------------------------------------------------------------------------

/// `#[serde(with)]` for a conversation: its canonical key, rebuilt with [`Conv::from_key`].
pub(crate) mod conv {
    use super::*;

    /// Writes the canonical key.
    pub(crate) fn serialize<S: Serializer>(c: &Arc<Conv>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&c.key)
    }

    /// Reads a canonical key; one that names no conversation fails the decode.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<Conv>, D::Error> {
        /// Rebuilds the conversation from the key as it comes.
        struct KeyVisitor;

        impl Visitor<'_> for KeyVisitor {
            type Value = Arc<Conv>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a conversation's canonical key")
            }

            fn visit_str<E: de::Error>(self, key: &str) -> Result<Arc<Conv>, E> {
                if let Some(c) = CONVS.with_borrow(|m| m.get(key).cloned()) {
                    return Ok(c);
                }
                match Conv::from_key(key) {
                    Some(c) => {
                        let c = Arc::new(c);
                        CONVS.with_borrow_mut(|m| {
                            if m.len() >= CACHE_ENTRIES {
                                m.clear();
                            }
                            m.insert(Box::from(key), Arc::clone(&c));
                        });
                        Ok(c)
                    }
                    None => Err(refuse(WireError::BadConversation(key.to_owned()))),
                }
            }
        }

        d.deserialize_str(KeyVisitor)
    }
}

/// Entries a decoding thread's caches hold at most (each is emptied when it fills).
const CACHE_ENTRIES: usize = 16_384;

thread_local! {
    /// Conversations decoded on this thread, by key.
    static CONVS: RefCell<super::FastMap<Box<str>, Arc<Conv>>> =
        RefCell::new(super::FastMap::default());
    /// User and device ids decoded on this thread.
    static STRS: RefCell<std::collections::HashSet<Arc<str>, foldhash::fast::FixedState>> =
        RefCell::new(std::collections::HashSet::default());
}

/// The shared string `s`: the one this thread decoded before, or a new one (kept for next
/// time).
fn shared(s: &str) -> Arc<str> {
    if let Some(a) = STRS.with_borrow(|m| m.get(s).cloned()) {
        return a;
    }
    let a: Arc<str> = Arc::from(s);
    STRS.with_borrow_mut(|m| {
        if m.len() >= CACHE_ENTRIES {
            m.clear();
        }
        m.insert(Arc::clone(&a));
    });
    a
}

/// `#[serde(with)]` for a user or device id: a string, shared on arrival (see [`shared`]).
pub(crate) mod shared_str {
    use super::*;

    /// Writes the string.
    pub(crate) fn serialize<S: Serializer>(v: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v)
    }

    /// Reads a string, shared.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<str>, D::Error> {
        /// Shares the string as it comes.
        struct StrVisitor;

        impl Visitor<'_> for StrVisitor {
            type Value = Arc<str>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Arc<str>, E> {
                Ok(shared(v))
            }
        }

        d.deserialize_str(StrVisitor)
    }
}

/// `#[serde(with)]` for bytes that are passed on at once (a relayed session's frames): a byte
/// string, sliced from the batch on arrival (see [`decode_shared`]). Not for bytes a shard keeps
/// (a stored message): a slice holds the whole buffer it came in.
pub(crate) mod shared_bytes {
    use super::*;

    /// Writes the bytes.
    pub(crate) fn serialize<S: Serializer>(v: &bytes::Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    /// Reads a byte string, sliced from the batch.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<bytes::Bytes, D::Error> {
        /// Slices the byte string as it comes.
        struct BytesVisitor;

        impl Visitor<'_> for BytesVisitor {
            type Value = bytes::Bytes;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }

            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<bytes::Bytes, E> {
                Ok(slice_of_input(v))
            }
        }

        d.deserialize_bytes(BytesVisitor)
    }
}

/// `#[serde(with)]` for an optional user or device id (see [`shared_str`]).
pub(crate) mod shared_str_opt {
    use super::*;

    /// Writes the string, if any.
    pub(crate) fn serialize<S: Serializer>(v: &Option<Arc<str>>, s: S) -> Result<S::Ok, S::Error> {
        v.as_deref().serialize(s)
    }

    /// Reads an optional string, shared.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Arc<str>>, D::Error> {
        Ok(<Option<&str>>::deserialize(d)?.map(shared))
    }
}

// ----- monotonic times ---------------------------------------------------------------------------

/// `#[serde(with)]` for a time on the sender's monotonic clock (µs): nothing is sent, and the
/// receiver reads its own arrival time ([`decode_batch`]'s `now_us`).
pub(crate) mod mono {
    use super::*;

    /// Writes nothing.
    pub(crate) fn serialize<S: Serializer>(_: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_unit()
    }

    /// Reads the arrival time of the batch.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        <()>::deserialize(d)?;
        Ok(DECODING.with_borrow(|x| x.now_us))
    }
}

/// `#[serde(with)]` for an optional time on the sender's monotonic clock (µs): only whether
/// there is one is sent, and the receiver reads its own arrival time for it.
pub(crate) mod mono_opt {
    use super::*;

    /// Writes whether there is a time.
    pub(crate) fn serialize<S: Serializer>(t: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bool(t.is_some())
    }

    /// Reads the arrival time of the batch if the sender had a time.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        let some = bool::deserialize(d)?;
        Ok(some.then(|| DECODING.with_borrow(|x| x.now_us)))
    }
}

// ----- token errors ------------------------------------------------------------------------------

/// `#[serde(with)]` for the text of [`crate::auth::AuthError::Malformed`] (a `&'static str` in a
/// public type): sent as text, read back as the same text if it is one of this release's own
/// ([`KNOWN`](token_text::KNOWN)), else as [`OTHER`](token_text::OTHER) (a custom
/// [`crate::auth::TokenVerifier`]'s text cannot be rebuilt as a `&'static str` without leaking
/// it). Only the human-readable text of the refusal is lost, never its code. (A refresh Login's
/// refusal is answered on the connection's own shard today: it is never mailed.)
pub(crate) mod token_text {
    use super::*;

    /// Every text the built-in verifier ([`crate::auth::Hs256`]) gives a malformed token.
    pub(crate) const KNOWN: &[&str] = &[
        "expected three dot-separated parts",
        "header is not base64url",
        "header is not a JSON object with alg",
        "signature is not base64url",
        "payload is not base64url",
        "claims need string sub, string dev, integer exp",
        "sub must be 1..=128 bytes",
        "dev must be 1..=64 bytes",
    ];

    /// The text of any other malformed token, read from another node.
    pub(crate) const OTHER: &str = "(the token verifier's text is not carried between nodes)";

    /// Writes the text.
    pub(crate) fn serialize<S: Serializer>(t: &&'static str, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(t)
    }

    /// Reads a text: this release's own, or [`OTHER`].
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<&'static str, D::Error> {
        /// Finds the text as it comes.
        struct TextVisitor;

        impl Visitor<'_> for TextVisitor {
            type Value = &'static str;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a malformed token's text")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<&'static str, E> {
                Ok(KNOWN.iter().find(|k| **k == text).copied().unwrap_or(OTHER))
            }
        }

        d.deserialize_str(TextVisitor)
    }
}

/// A `&'static str`, under a name serde's derive does not take for a string to borrow from the
/// input (which would need the input to live forever): [`token_text`] makes it instead.
type StaticText = &'static str;

/// `#[serde(remote)]` mirror of [`crate::auth::AuthError`] (a public type, left without serde
/// impls of its own), for `Refusal::RefreshToken`.
#[derive(Serialize, Deserialize)]
#[serde(remote = "crate::auth::AuthError")]
pub(crate) enum AuthErrorDef {
    /// See [`crate::auth::AuthError::Missing`].
    Missing,
    /// See [`crate::auth::AuthError::TooLong`].
    TooLong,
    /// See [`crate::auth::AuthError::Malformed`].
    Malformed(#[serde(with = "token_text")] StaticText),
    /// See [`crate::auth::AuthError::UnsupportedAlgorithm`].
    UnsupportedAlgorithm,
    /// See [`crate::auth::AuthError::BadSignature`].
    BadSignature,
    /// See [`crate::auth::AuthError::Expired`].
    Expired,
    /// See [`crate::auth::AuthError::NotYetValid`].
    NotYetValid,
}

#[cfg(test)]
mod tests;
