//! Typed errors of the core, and the one place where they become wire error codes.
//!
//! * [`Refusal`]: one request is refused; the connection goes on (`Error{fatal: false}`).
//! * [`CloseReason`]: the connection ends (`Error{fatal: true}`, then the transport's close).
//!
//! [`Refusal::code`] and [`CloseReason::code`] are the whole mapping; nothing else in the core
//! picks a wire code.

use std::borrow::Cow;

use parley_proto::frame::WireError as _;
use parley_proto::pb;
use parley_proto::pb::frame::Body;

use super::wire;
use crate::auth::AuthError;
use crate::transport::TransportError;

/// Why one request was refused (the connection stays open).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub(crate) enum Refusal {
    /// More requests than `limits.request_rate_per_sec` allows; retry after the hint.
    #[error("requests faster than the rate limit (limits.request_rate_per_sec)")]
    RateLimited {
        /// Milliseconds until a send would be accepted.
        retry_after_ms: u32,
    },
    /// `Send.client_msg_id` is 0.
    #[error("client_msg_id must not be 0")]
    ClientMsgIdZero,
    /// `Send.body` is over `limits.max_body_bytes`.
    #[error("body larger than limits.max_body_bytes")]
    BodyTooLarge,
    /// A recall or edit without `ref_seq`.
    #[error("recall and edit need ref_seq")]
    RefSeqMissing,
    /// A kind clients may not send (SYSTEM, or unknown).
    #[error("clients may not send this kind")]
    KindNotAllowed,
    /// `Send.to` names no conversation this node serves.
    #[error("to must name a DIRECT or GROUP conversation with an id of 1..=128 bytes")]
    BadRecipient,
    /// A request without its conversation.
    #[error("conversation is required")]
    ConversationRequired,
    /// A request naming no conversation this node serves.
    #[error("unknown conversation")]
    UnknownConversation,
    /// A fresh Login on a logged-in connection names another user or device.
    #[error("a refresh Login must name the connection's own user and device")]
    RefreshOtherIdentity,
    /// A fresh Login's token was refused (the session goes on until its old expiry).
    #[error("refresh refused: {0}")]
    RefreshToken(#[serde(with = "wire::AuthErrorDef")] AuthError),
    /// A fresh Login's token is valid for longer than `auth.max_token_lifetime_secs`.
    #[error("refresh refused: token valid for longer than auth.max_token_lifetime_secs")]
    RefreshTokenLifetime,
    /// A frame without a body.
    #[error("frame without a body")]
    NoBody,
    /// A frame only the server sends.
    #[error("this frame is sent by the server, not the client")]
    ServerOnlyFrame,
    /// A `SyncRequest` while a sync runs on the connection (the running one goes on).
    #[error("a sync is already running on this connection; wait for its done page")]
    SyncRunning,
    /// A recall or edit of a seq that holds no message.
    #[error("ref_seq names no stored message")]
    RefNotFound,
    /// A recall or edit of someone else's message.
    #[error("only a message's sender may recall or edit it")]
    NotSender,
    /// Two conversation keys hash to the same id (astronomically rare); the second is refused.
    #[error("conversation id collision; this conversation cannot be stored")]
    IdCollision,
    /// The log refused the append.
    #[error("the message could not be stored: {0}")]
    Storage(String),
    /// The log failed its flush: nothing pending is known to be stored.
    #[error("the node's log failed; the message may not be stored: retry")]
    LogFailed,
    /// A group that does not exist (or was dissolved).
    #[error("no such group (or it was dissolved)")]
    GroupNotFound,
    /// A request about a group from a user who is not a member.
    #[error("not a member of this group")]
    NotMember,
    /// A group request the requester's role does not allow (the text is the core's own; a `Cow`
    /// so that mail from another node can carry it).
    #[error("{0}")]
    GroupForbidden(Cow<'static, str>),
    /// A CREATE of a group id that exists (or existed) with another owner.
    #[error("a group with this id exists (or existed)")]
    GroupExists,
    /// A change past `groups.max_members`.
    #[error("the group would have more members than groups.max_members")]
    GroupFull,
    /// A malformed group request (the text is the core's own; a `Cow` for mail between nodes).
    #[error("{0}")]
    BadGroupRequest(Cow<'static, str>),
    /// A receipt other than READ (delivery is reported with DeliverAck).
    #[error("clients send READ receipts only; delivery is reported with DeliverAck")]
    BadReceipt,
    /// A conversation list request while one is being answered on the connection.
    #[error("a conversation list is being answered on this connection; wait for it")]
    ListRunning,
    /// A room id that is empty or longer than 128 bytes.
    #[error("room_id must be 1..=128 bytes of UTF-8")]
    BadRoomId,
    /// A `RoomRequest` whose action is neither JOIN nor LEAVE_ROOM.
    #[error("a RoomRequest's action must be JOIN or LEAVE_ROOM")]
    BadRoomAction,
    /// A JOIN past `rooms.max_per_connection`.
    #[error("this connection is in as many rooms as rooms.max_per_connection allows")]
    TooManyRooms,
    /// A JOIN of a room that has `rooms.max_listeners` listeners.
    #[error("the room is full (rooms.max_listeners)")]
    RoomFull,
    /// A send to a room the connection did not join.
    #[error("join the room before sending to it")]
    NotInRoom,
    /// A RECALL or EDIT sent to a room (room messages are not stored).
    #[error("only NORMAL messages may be sent to a room")]
    RoomKindNotAllowed,
    /// A presence request naming more users than `presence.max_users_per_request`.
    #[error("more users in one request than presence.max_users_per_request")]
    PresenceTooManyUsers,
    /// A SUBSCRIBE past `presence.max_subscriptions_per_connection`.
    #[error("the connection would watch more users than presence.max_subscriptions_per_connection")]
    PresenceTooManySubscriptions,
    /// A malformed presence request (the text is the core's own; a `Cow` for mail between nodes).
    #[error("{0}")]
    BadPresenceRequest(Cow<'static, str>),
    /// A hook of the application denied the request.
    #[error("denied: {0}")]
    Denied(String),
    /// In a cluster: the node that owns what the request is about cannot be reached now (it is
    /// down, or the link to it is); retry after the hint.
    #[error("the node that owns this is unreachable now; retry")]
    Unavailable {
        /// Milliseconds after which a retry may succeed.
        retry_after_ms: u32,
    },
    /// An inbound frame could not be decoded (not fatal: the stream is in sync).
    #[error("{message}")]
    BadFrame {
        /// The transport's code.
        #[serde(with = "wire::pb_enum")]
        code: pb::ErrorCode,
        /// What was wrong.
        message: String,
    },
}

impl Refusal {
    /// The wire code.
    pub(crate) fn code(&self) -> pb::ErrorCode {
        use pb::ErrorCode as C;
        match self {
            Refusal::RateLimited { .. } => C::RateLimited,
            Refusal::ClientMsgIdZero
            | Refusal::BodyTooLarge
            | Refusal::RefSeqMissing
            | Refusal::KindNotAllowed
            | Refusal::BadRecipient
            | Refusal::ConversationRequired
            | Refusal::UnknownConversation => C::InvalidArgument,
            Refusal::RefreshOtherIdentity => C::Forbidden,
            Refusal::RefreshToken(AuthError::Expired) => C::TokenExpired,
            Refusal::RefreshToken(_) | Refusal::RefreshTokenLifetime => C::BadToken,
            Refusal::NoBody | Refusal::ServerOnlyFrame | Refusal::SyncRunning => C::UnexpectedFrame,
            Refusal::RefNotFound | Refusal::GroupNotFound => C::NotFound,
            Refusal::NotMember | Refusal::GroupForbidden(_) => C::Forbidden,
            Refusal::GroupExists => C::AlreadyExists,
            Refusal::GroupFull => C::GroupFull,
            Refusal::BadGroupRequest(_) | Refusal::BadReceipt => C::InvalidArgument,
            Refusal::ListRunning => C::UnexpectedFrame,
            Refusal::BadRoomId
            | Refusal::BadRoomAction
            | Refusal::TooManyRooms
            | Refusal::RoomKindNotAllowed => C::InvalidArgument,
            Refusal::RoomFull | Refusal::NotInRoom => C::Forbidden,
            Refusal::PresenceTooManyUsers
            | Refusal::PresenceTooManySubscriptions
            | Refusal::BadPresenceRequest(_) => C::InvalidArgument,
            Refusal::NotSender | Refusal::Denied(_) => C::Forbidden,
            Refusal::IdCollision => C::Internal,
            Refusal::Storage(_) | Refusal::LogFailed => C::StorageFailure,
            Refusal::Unavailable { .. } => C::Unavailable,
            Refusal::BadFrame { code, .. } => *code,
        }
    }

    /// Whether the client caused it (it counts against `limits.max_errors`); a failure of the
    /// node's own does not.
    pub(crate) fn is_clients_fault(&self) -> bool {
        !matches!(
            self,
            Refusal::IdCollision
                | Refusal::Storage(_)
                | Refusal::LogFailed
                | Refusal::RoomFull
                | Refusal::Denied(_)
                | Refusal::Unavailable { .. }
        )
    }

    /// The `Error` frame answering request `request_id` (of send `client_msg_id`, or 0).
    pub(crate) fn frame(&self, request_id: u64, client_msg_id: u64) -> pb::Frame {
        let retry_after_ms = match self {
            Refusal::RateLimited { retry_after_ms } | Refusal::Unavailable { retry_after_ms } => {
                *retry_after_ms
            }
            _ => 0,
        };
        error_frame(
            request_id,
            self.code(),
            self.to_string(),
            false,
            client_msg_id,
            retry_after_ms,
        )
    }
}

/// Which connection limit refused a new connection (all are TOO_MANY_CONNECTIONS on the wire;
/// the message names the setting).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConnLimit {
    /// `limits.max_connections`, or the open-file limit below it.
    #[error("the node has reached limits.max_connections (or its open-file limit)")]
    Connections,
    /// `limits.max_unauthenticated`.
    #[error("too many connections are logging in (limits.max_unauthenticated); retry shortly")]
    Unauthenticated,
    /// `limits.max_unauthenticated_per_source`.
    #[error(
        "too many connections from this address are logging in \
         (limits.max_unauthenticated_per_source); retry shortly"
    )]
    PerSource,
}

/// Why the core ends a connection.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CloseReason {
    /// The first frame was not a Login.
    #[error("the first frame must be a Login")]
    LoginRequired,
    /// No login within `timeouts.login_ms`.
    #[error("no login within the login timeout")]
    LoginTimeout,
    /// The token was refused.
    #[error("{0}")]
    Auth(AuthError),
    /// The token is valid for longer than `auth.max_token_lifetime_secs`.
    #[error("token valid for longer than auth.max_token_lifetime_secs")]
    TokenLifetime,
    /// The session's token expired (a fresh Login on the connection would have moved it).
    #[error("the session's token expired; log in again with a fresh token")]
    TokenExpired,
    /// More protocol errors than `limits.max_errors` within `limits.error_window_ms`.
    #[error("more protocol errors than limits.max_errors within limits.error_window_ms")]
    TooManyErrors,
    /// The client speaks another protocol version.
    #[error("protocol_version must be 1")]
    UnsupportedVersion,
    /// Nothing heard within `timeouts.idle_ms`.
    #[error("nothing heard within the idle timeout")]
    IdleTimeout,
    /// Queued output made no progress within `timeouts.write_stall_ms`.
    #[error("the connection read nothing within the write-stall timeout")]
    SlowConsumer,
    /// Deliveries went unacknowledged through every retransmit.
    #[error("deliveries went unacknowledged through every retransmit")]
    RetransmitExhausted,
    /// The same user and device logged in on another connection.
    #[error("the same user and device logged in on another connection")]
    Replaced,
    /// The node is shutting down.
    #[error("the node is shutting down")]
    ShuttingDown,
    /// A connection limit was reached when the connection was accepted.
    #[error("{0}")]
    TooManyConnections(ConnLimit),
    /// Before login, a frame that could not be decoded: not a client of ours.
    #[error("{0}")]
    Garbage(TransportError),
    /// The login hook refused the login.
    #[error("login refused: {0}")]
    HookRejected(String),
    /// The application ended the session (admin API or embedding).
    #[error("the session was ended by the server: {0}")]
    Kicked(String),
    /// The cluster's presence index could not register the login's route in time.
    #[error("the cluster's presence index (Redis) is unreachable; log in again later")]
    Unavailable {
        /// The hint for the client.
        retry_after_ms: u32,
    },
    /// In a cluster: a node this connection depends on cannot be reached (its session's home,
    /// or an owner whose answer it waits for, behind a link that went down).
    #[error("a node of the cluster this connection depends on is unreachable; log in again")]
    NodeUnreachable {
        /// The hint for the client.
        retry_after_ms: u32,
    },
    /// In a cluster: the node has just started and has not yet heard from the other nodes
    /// what its users' conversations hold.
    #[error("this node has just started and is still hearing from the other nodes; log in again")]
    Starting {
        /// The hint for the client.
        retry_after_ms: u32,
    },
}

impl CloseReason {
    /// The wire code.
    pub(crate) fn code(&self) -> pb::ErrorCode {
        use pb::ErrorCode as C;
        match self {
            CloseReason::LoginRequired => C::LoginRequired,
            CloseReason::LoginTimeout => C::LoginTimeout,
            CloseReason::Auth(AuthError::Expired) => C::TokenExpired,
            CloseReason::Auth(_) | CloseReason::TokenLifetime => C::BadToken,
            CloseReason::TokenExpired => C::TokenExpired,
            CloseReason::TooManyErrors => C::TooManyErrors,
            CloseReason::UnsupportedVersion => C::UnsupportedVersion,
            CloseReason::IdleTimeout => C::IdleTimeout,
            CloseReason::SlowConsumer => C::SlowConsumer,
            CloseReason::RetransmitExhausted => C::RetransmitExhausted,
            CloseReason::Replaced => C::Replaced,
            CloseReason::ShuttingDown => C::ShuttingDown,
            CloseReason::TooManyConnections(_) => C::TooManyConnections,
            CloseReason::Garbage(e) => e.code(),
            CloseReason::HookRejected(_) => C::BadToken,
            CloseReason::Kicked(_) => C::Kicked,
            CloseReason::Unavailable { .. }
            | CloseReason::NodeUnreachable { .. }
            | CloseReason::Starting { .. } => C::Unavailable,
        }
    }

    /// The fatal `Error` frame (answering `request_id`, or 0).
    pub(crate) fn frame(&self, request_id: u64) -> pb::Frame {
        let retry_after_ms = match self {
            CloseReason::Unavailable { retry_after_ms }
            | CloseReason::NodeUnreachable { retry_after_ms }
            | CloseReason::Starting { retry_after_ms } => *retry_after_ms,
            _ => 0,
        };
        error_frame(
            request_id,
            self.code(),
            self.to_string(),
            true,
            0,
            retry_after_ms,
        )
    }
}

fn error_frame(
    request_id: u64,
    code: pb::ErrorCode,
    message: String,
    fatal: bool,
    client_msg_id: u64,
    retry_after_ms: u32,
) -> pb::Frame {
    pb::Frame {
        request_id,
        body: Some(Body::Error(pb::Error {
            code: code as i32,
            message,
            fatal,
            client_msg_id,
            retry_after_ms,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_map_to_their_wire_codes() {
        assert_eq!(
            Refusal::RateLimited { retry_after_ms: 5 }.code(),
            pb::ErrorCode::RateLimited
        );
        assert_eq!(Refusal::NotSender.code(), pb::ErrorCode::Forbidden);
        assert_eq!(Refusal::RefNotFound.code(), pb::ErrorCode::NotFound);
        assert_eq!(Refusal::LogFailed.code(), pb::ErrorCode::StorageFailure);
        assert_eq!(Refusal::SyncRunning.code(), pb::ErrorCode::UnexpectedFrame);
        assert_eq!(Refusal::NotInRoom.code(), pb::ErrorCode::Forbidden);
        assert_eq!(Refusal::RoomFull.code(), pb::ErrorCode::Forbidden);
        assert_eq!(Refusal::TooManyRooms.code(), pb::ErrorCode::InvalidArgument);
        assert!(
            !Refusal::RoomFull.is_clients_fault(),
            "a full room is not the client's error"
        );
        let f = Refusal::RateLimited { retry_after_ms: 5 }.frame(3, 9);
        let Some(Body::Error(e)) = f.body else {
            panic!("an error frame")
        };
        assert_eq!((e.retry_after_ms, e.client_msg_id, e.fatal), (5, 9, false));
    }

    #[test]
    fn close_reasons_are_fatal_and_map_expired_tokens_apart() {
        assert_eq!(
            CloseReason::Auth(AuthError::Expired).code(),
            pb::ErrorCode::TokenExpired
        );
        assert_eq!(
            CloseReason::Auth(AuthError::BadSignature).code(),
            pb::ErrorCode::BadToken
        );
        let Some(Body::Error(e)) = CloseReason::Replaced.frame(0).body else {
            panic!("an error frame")
        };
        assert!(e.fatal);
    }
}
