//! What the session tells the application, and why a connection ended.

use std::fmt;
use std::ops::RangeInclusive;

use parley_proto::pb;

/// Something that happened, in the order it happened.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Logged in on a new connection (the outbox is being resent and a sync started).
    Connected(pb::LoginResult),
    /// The connection ended; the driver reconnects unless [`DisconnectReason::is_permanent`].
    Disconnected {
        /// Why.
        reason: DisconnectReason,
    },
    /// A message, exactly once per (conversation, seq), in seq order per conversation (room
    /// messages, which are at-most-once, pass through as they come).
    Message(pb::Message),
    /// A send is stored.
    Acked {
        /// The send's client message id (as returned by `send`).
        client_msg_id: u64,
        /// Its seq in the conversation.
        seq: u64,
        /// The conversation, from this client's point of view.
        conversation: pb::Conversation,
        /// The server's message id.
        msg_id: u64,
    },
    /// A send was refused for good (not stored); it left the outbox.
    Refused {
        /// The send's client message id.
        client_msg_id: u64,
        /// The server's error.
        error: pb::Error,
    },
    /// These seqs of a conversation will never be shown: the server has nothing readable for
    /// this client there (removed by retention, or before a group member joined).
    Skipped {
        /// The conversation.
        conversation: pb::Conversation,
        /// The seqs.
        seqs: RangeInclusive<u64>,
    },
    /// A sync finished: every conversation is caught up and live push is on.
    Synced,
    /// The answer to a history request.
    HistoryPage {
        /// The request id `history` returned.
        request_id: u64,
        /// The page.
        page: pb::HistoryPage,
    },
    /// A request (history, or one made with `request`) failed.
    RequestFailed {
        /// Its request id.
        request_id: u64,
        /// The server's error.
        error: pb::Error,
    },
    /// The answer to a request made with `request` (a GroupResult, PresenceUpdate, ...).
    Response(pb::Frame),
    /// A frame the server sent on its own that the session does not interpret (presence
    /// pushes, receipts, typing, room lag, a non-fatal error ...).
    Other(pb::Frame),
    /// The driver will try to connect again after `delay` (it follows every
    /// [`Event::Disconnected`] that is not permanent).
    Reconnecting {
        /// The back-off wait.
        delay: std::time::Duration,
    },
    /// The driver stopped for good (a permanent disconnect reason, or `close`); nothing more
    /// follows.
    Stopped {
        /// Why.
        reason: DisconnectReason,
    },
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq)]
pub enum DisconnectReason {
    /// The server closed the connection without saying why (or crashed).
    Closed,
    /// The server sent a fatal error, then closed.
    Server(pb::Error),
    /// Nothing came from the server for too long (or no answer to the login).
    Timeout,
    /// The server's bytes made no sense (not length-delimited frames).
    Protocol(String),
    /// Connecting, reading or writing failed.
    Io(String),
    /// The application closed the client.
    Local,
}

impl DisconnectReason {
    /// The server's error code, if it sent one.
    pub fn code(&self) -> Option<pb::ErrorCode> {
        match self {
            DisconnectReason::Server(e) => pb::ErrorCode::try_from(e.code).ok(),
            _ => None,
        }
    }

    /// Whether reconnecting cannot help: the server speaks no common protocol version, another
    /// connection of this device replaced this one, or the application closed the client.
    ///
    /// ```
    /// use parley_client::DisconnectReason;
    /// assert!(!DisconnectReason::Closed.is_permanent());
    /// assert!(DisconnectReason::Local.is_permanent());
    /// ```
    pub fn is_permanent(&self) -> bool {
        matches!(self, DisconnectReason::Local)
            || matches!(
                self.code(),
                Some(pb::ErrorCode::UnsupportedVersion | pb::ErrorCode::Replaced)
            )
    }

    /// How long the server asked to wait before reconnecting (`retry_after_ms`), if it did.
    pub fn retry_after_ms(&self) -> Option<u32> {
        match self {
            DisconnectReason::Server(e) if e.retry_after_ms > 0 => Some(e.retry_after_ms),
            _ => None,
        }
    }
}

impl fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DisconnectReason::Closed => f.write_str("the server closed the connection"),
            DisconnectReason::Server(e) => {
                write!(f, "the server ended the session: {}", describe_error(e))
            }
            DisconnectReason::Timeout => f.write_str("the server stopped answering"),
            DisconnectReason::Protocol(e) => write!(f, "the server sent an unreadable stream: {e}"),
            DisconnectReason::Io(e) => write!(f, "connection failed: {e}"),
            DisconnectReason::Local => f.write_str("closed by the application"),
        }
    }
}

/// An error as one line: `CODE: message`, with the retry delay and fatality if given.
///
/// ```
/// use parley_client::{describe_error, pb};
/// let e = pb::Error { code: pb::ErrorCode::RateLimited as i32, message: "slow down".into(),
///                     retry_after_ms: 250, ..pb::Error::default() };
/// assert_eq!(describe_error(&e), "RATE_LIMITED: slow down (retry after 250 ms)");
/// ```
pub fn describe_error(e: &pb::Error) -> String {
    let code = pb::ErrorCode::try_from(e.code).map_or_else(
        |_| format!("error code {}", e.code),
        |c| c.as_str_name().to_owned(),
    );
    let mut s = format!("{code}: {}", e.message.escape_default());
    if e.retry_after_ms > 0 {
        s.push_str(&format!(" (retry after {} ms)", e.retry_after_ms));
    }
    if e.fatal {
        s.push_str(" (fatal)");
    }
    s
}
