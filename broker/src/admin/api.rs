//! The JSON endpoints under `/v1/`: the application's operations on the node (post, kick,
//! online, presence, conversation list, inspect, groups), over HTTP, for programs that do not
//! embed the broker.
//!
//! Every endpoint needs the admin bearer token (checked before this module is reached; with no
//! `admin.token` configured the whole API answers 401). Each calls the node's
//! [`Control`](crate::node::control::Control), whose operations block this connection's thread
//! (never a shard's) until the shards answer, within their timeouts.
//!
//! | method and path | takes | answers |
//! | --- | --- | --- |
//! | `POST /v1/messages` | `{"from", "to": Conversation, "body" or "body_base64", "system"?}` | the `SendAck` |
//! | `POST /v1/kick` | `{"user", "device"?, "reason"?}` | `{"kicked": n}` |
//! | `GET /v1/online` | `after`, `limit` (default 100, at most 1000) | `{"users": [{"user", "devices"}], "next"}` |
//! | `GET /v1/presence` | `users=a,b` (at most `presence.max_users_per_request`) | `{"users": [UserPresence]}` |
//! | `GET /v1/conversations` | `user`, `limit` (default 50) | the `ConversationList` |
//! | `GET /v1/conversation` | `type=group&id=G` or `type=direct&users=a,b` | the conversation, or 404 |
//! | `POST /v1/groups` | `{"as": user, "request": GroupRequest}` | the `GroupResult` |
//! | `GET /v1/cluster` | nothing | `{"node_id", "boot_id", "lease_ok", "redis_errors", "members": [{"node_id", "boot_id", "advertise", "started_ms", "renewed_ms", "lease_expires_ms"}], "routes", "route_writes", "redis_calls", "route_replays", "links": [{"node_id", "boot_id", "dialled", "since_ms"}], "links_opened", "link_handshake_failures"}`; 404 outside a cluster |
//! | `GET /v1/cluster/routes` | `user` | `{"user", "routes": [{"device", "node_id", "boot_id"}]}`: the user's live routes in the presence index, whichever node holds them; 404 outside a cluster, 503 when Redis does not answer |
//!
//! Protocol messages (`Conversation`, `GroupRequest`, `SendAck`, `UserPresence`,
//! `ConversationList`, `GroupResult`) are written in the protocol's JSON mapping, as WebSocket
//! JSON clients see them: field names in lowerCamelCase (snake_case is read too), enums by name,
//! 64-bit integers as strings, bytes (message bodies) as base64. The API's own objects use snake_case. Query lists are
//! comma-separated; a comma inside an item is sent as `%2C`.
//!
//! Errors are `{"error": {"code", "message"}}`: `code` is the node's wire error code
//! (`FORBIDDEN`, `NOT_FOUND`, ...) when the node refused, else the HTTP reason in capitals
//! (`BAD_REQUEST`, `PAYLOAD_TOO_LARGE`, ...). [`status_of`] is the one place wire codes become
//! statuses. 503 (shutting down, or a shard did not answer in time) and 429 carry `Retry-After`.

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use parley_proto::pb;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::Shared;
use super::http::{HttpError, Query, Request, Response, reason};
use crate::hooks::{ConversationKind, ConversationRef};
use crate::local::LocalError;
use crate::node::control::ControlError;

/// `GET /v1/online`: users per page unless `limit` says otherwise.
const ONLINE_DEFAULT_LIMIT: usize = 100;

/// `GET /v1/online`: most users per page (a larger `limit` is lowered to it).
const ONLINE_MAX_LIMIT: usize = 1000;

/// `GET /v1/conversations`: conversations per page unless `limit` says otherwise.
const CONVERSATIONS_DEFAULT_LIMIT: usize = 50;

/// `GET /v1/conversations`: the largest `limit` passed on (the node caps it further at
/// `limits.max_page`).
const CONVERSATIONS_MAX_LIMIT: usize = 1000;

/// `POST /v1/kick`: the longest `reason`, in bytes (it travels in the KICKED error frame).
pub(super) const MAX_KICK_REASON_BYTES: usize = 256;

/// What `Retry-After` says when nothing more precise is known, in seconds.
const RETRY_AFTER_SECS: u64 = 1;

/// One endpoint of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    /// `POST /v1/messages`.
    Messages,
    /// `POST /v1/kick`.
    Kick,
    /// `GET /v1/online`.
    Online,
    /// `GET /v1/presence`.
    Presence,
    /// `GET /v1/conversations`.
    Conversations,
    /// `GET /v1/conversation`.
    Conversation,
    /// `POST /v1/groups`.
    Groups,
    /// `GET /v1/cluster`.
    Cluster,
    /// `GET /v1/cluster/routes`.
    ClusterRoutes,
}

/// Every endpoint: its path, its method.
const ENDPOINTS: &[(&str, &str, Endpoint)] = &[
    ("/v1/messages", "POST", Endpoint::Messages),
    ("/v1/kick", "POST", Endpoint::Kick),
    ("/v1/online", "GET", Endpoint::Online),
    ("/v1/presence", "GET", Endpoint::Presence),
    ("/v1/conversations", "GET", Endpoint::Conversations),
    ("/v1/conversation", "GET", Endpoint::Conversation),
    ("/v1/groups", "POST", Endpoint::Groups),
    ("/v1/cluster", "GET", Endpoint::Cluster),
    ("/v1/cluster/routes", "GET", Endpoint::ClusterRoutes),
];

/// Why a request to the API failed, as the client is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ApiError {
    /// The HTTP status.
    status: u16,
    /// The wire error code's name, or the HTTP reason in capitals.
    code: String,
    /// What went wrong.
    message: String,
    /// For 429 and 503: how long to wait, in seconds.
    retry_after_secs: Option<u64>,
    /// For 405: the method the path takes.
    allow: Option<&'static str>,
}

impl ApiError {
    /// An HTTP-level failure (`code` is the status's reason).
    pub(super) fn http(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code: reason(status).to_ascii_uppercase().replace(' ', "_"),
            message: message.into(),
            retry_after_secs: None,
            allow: None,
        }
    }

    /// The node refused with wire code `code`.
    fn wire(code: pb::ErrorCode, message: impl Into<String>, retry_after_ms: u32) -> ApiError {
        ApiError {
            status: status_of(code),
            code: code.as_str_name().to_owned(),
            message: message.into(),
            retry_after_secs: (retry_after_ms > 0)
                .then(|| u64::from(retry_after_ms).div_ceil(1000)),
            allow: None,
        }
    }

    /// A shard did not answer within `after`.
    fn timeout(after: Duration) -> ApiError {
        ApiError {
            code: "TIMEOUT".to_owned(),
            ..ApiError::http(
                503,
                format!("the node did not answer within {after:?}; retry"),
            )
        }
    }

    /// The answer to send.
    pub(super) fn response(&self) -> Response {
        let body = serde_json::json!({
            "error": { "code": self.code, "message": self.message }
        });
        let mut response = Response::json(self.status, body.to_string());
        if matches!(self.status, 429 | 503) {
            let secs = self.retry_after_secs.unwrap_or(RETRY_AFTER_SECS).max(1);
            response = response.with_header("Retry-After", secs.to_string());
        }
        if let Some(allow) = self.allow {
            response = response.with_header("Allow", allow);
        }
        response
    }
}

/// The HTTP status of a refusal with the wire error code `code`: the one place where the node's
/// codes become statuses (exhaustive, so a new code must be placed here).
pub(super) fn status_of(code: pb::ErrorCode) -> u16 {
    use pb::ErrorCode as C;
    match code {
        C::InvalidArgument => 400,
        C::Forbidden => 403,
        C::NotFound => 404,
        C::AlreadyExists | C::GroupFull => 409,
        C::FrameTooLarge => 413,
        C::RateLimited => 429,
        C::ShuttingDown | C::TooManyConnections => 503,
        // Codes about a connection's own state, which the node's in-process service
        // connections should never meet, and failures of the node itself.
        C::Unspecified
        | C::BadFrame
        | C::UnsupportedVersion
        | C::LoginRequired
        | C::BadToken
        | C::TokenExpired
        | C::LoginTimeout
        | C::SlowConsumer
        | C::Replaced
        | C::IdleTimeout
        | C::StorageFailure
        | C::RetransmitExhausted
        | C::UnexpectedFrame
        | C::Internal
        | C::TooManyErrors
        | C::Kicked => 500,
        C::Unavailable => 503,
    }
}

impl From<HttpError> for ApiError {
    fn from(e: HttpError) -> ApiError {
        ApiError::http(e.status, e.message)
    }
}

impl From<LocalError> for ApiError {
    fn from(e: LocalError) -> ApiError {
        match e {
            LocalError::Refused(err) | LocalError::Closed(Some(err)) => {
                let code = err.code();
                ApiError::wire(code, err.message, err.retry_after_ms)
            }
            LocalError::Closed(None) => ApiError::wire(
                pb::ErrorCode::ShuttingDown,
                "the node did not take the request (it is stopping or overloaded)",
                0,
            ),
            LocalError::Timeout(after) => ApiError::timeout(after),
            LocalError::Invalid(message) => {
                ApiError::wire(pb::ErrorCode::InvalidArgument, message, 0)
            }
        }
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> ApiError {
        match e {
            ControlError::ShuttingDown => {
                ApiError::wire(pb::ErrorCode::ShuttingDown, e.to_string(), 0)
            }
            ControlError::Timeout(after) => ApiError::timeout(after),
            ControlError::Invalid(message) => {
                ApiError::wire(pb::ErrorCode::InvalidArgument, message, 0)
            }
        }
    }
}

/// Answers a request whose path starts with `/v1/` (its token already checked).
pub(super) fn handle(request: &mut Request<'_>, shared: &Shared) -> Response {
    match serve(request, shared) {
        Ok(response) => response,
        Err(e) => e.response(),
    }
}

/// The endpoint `method` and `path` name: 404 for no path, 405 for another method.
fn route(method: &str, path: &str) -> Result<Endpoint, ApiError> {
    let Some(&(_, allowed, endpoint)) = ENDPOINTS.iter().find(|(p, ..)| *p == path) else {
        let paths: Vec<&str> = ENDPOINTS.iter().map(|(p, ..)| *p).collect();
        return Err(ApiError::http(
            404,
            format!("no endpoint {path}; the API has {}", paths.join(", ")),
        ));
    };
    if method != allowed {
        return Err(ApiError {
            allow: Some(allowed),
            ..ApiError::http(405, format!("{path} takes {allowed} only"))
        });
    }
    Ok(endpoint)
}

/// Serves the endpoint the request names.
fn serve(request: &mut Request<'_>, shared: &Shared) -> Result<Response, ApiError> {
    let endpoint = route(&request.head.method, &request.head.path)?;
    let control = &shared.sources.control;
    let query = |known: &[&str]| Query::parse(&request.head.query, known);
    match endpoint {
        Endpoint::Messages => {
            query(&[])?;
            let post: PostMessage = read_json(request, shared.max_body_bytes)?;
            let body = post.body()?;
            ok(&control.post(&post.from, post.to, body, post.system)?)
        }
        Endpoint::Kick => {
            query(&[])?;
            let kick: Kick = read_json(request, shared.max_body_bytes)?;
            if kick.reason.len() > MAX_KICK_REASON_BYTES {
                return Err(ApiError::http(
                    400,
                    format!("a reason is at most {MAX_KICK_REASON_BYTES} bytes"),
                ));
            }
            let kicked = control.kick(&kick.user, kick.device.as_deref(), &kick.reason)?;
            ok(&Kicked { kicked })
        }
        Endpoint::Online => {
            let q = query(&["after", "limit"])?;
            let after = q.get("after")?.unwrap_or_default();
            let limit = q.limit("limit", ONLINE_DEFAULT_LIMIT, ONLINE_MAX_LIMIT)?;
            let page = control.online(&after, limit)?;
            ok(&online_page(page, limit))
        }
        Endpoint::Presence => {
            let q = query(&["users"])?;
            let users = q.list("users")?.unwrap_or_default();
            if users.is_empty() {
                return Err(ApiError::http(400, "name the users: ?users=alice,bob"));
            }
            if users.len() > shared.max_presence_users {
                return Err(ApiError::http(
                    400,
                    format!(
                        "at most {} users per request (presence.max_users_per_request)",
                        shared.max_presence_users
                    ),
                ));
            }
            let users = control.presence(&users)?;
            ok(&PresenceList { users: &users })
        }
        Endpoint::Conversations => {
            let q = query(&["user", "limit"])?;
            let user = q.required("user")?;
            let limit = q.limit(
                "limit",
                CONVERSATIONS_DEFAULT_LIMIT,
                CONVERSATIONS_MAX_LIMIT,
            )?;
            let limit = u32::try_from(limit).unwrap_or(u32::MAX);
            ok(&control.conversations(&user, limit)?)
        }
        Endpoint::Conversation => {
            let q = query(&["type", "id", "users"])?;
            let conversation = conversation_ref(&q)?;
            match control.inspect(&conversation)? {
                Some(info) => ok(&info),
                None => Err(ApiError::wire(
                    pb::ErrorCode::NotFound,
                    "no such conversation (a group not created, or a direct one with no message)",
                    0,
                )),
            }
        }
        Endpoint::Groups => {
            query(&[])?;
            let group: GroupCall = read_json(request, shared.max_body_bytes)?;
            ok(&control.group(&group.as_user, group.request)?)
        }
        Endpoint::ClusterRoutes => {
            let q = query(&["user"])?;
            let user = q.required("user")?;
            let Some(status) = &shared.sources.cluster else {
                return Err(ApiError::http(
                    404,
                    "this node is not in a cluster (cluster.redis is not set)",
                ));
            };
            let routes = status
                .lookup(&user, CLUSTER_LOOKUP_TIMEOUT)
                .map_err(|e| ApiError::http(503, e))?;
            ok(&UserRoutes {
                user: &user,
                routes: &routes,
            })
        }
        Endpoint::Cluster => {
            query(&[])?;
            match &shared.sources.cluster {
                Some(status) => ok(&status.snapshot()),
                None => Err(ApiError::http(
                    404,
                    "this node is not in a cluster (cluster.redis is not set)",
                )),
            }
        }
    }
}

/// How long `GET /v1/cluster/routes` waits for the cluster bridge.
const CLUSTER_LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// `GET /v1/cluster/routes`'s answer.
#[derive(Serialize)]
struct UserRoutes<'a> {
    user: &'a str,
    routes: &'a [crate::cluster::Found],
}

/// A 200 answer with `value` as JSON.
fn ok<T: Serialize + ?Sized>(value: &T) -> Result<Response, ApiError> {
    serde_json::to_string(value)
        .map(|body| Response::json(200, body))
        .map_err(|e| ApiError::http(500, format!("cannot write the answer as JSON: {e}")))
}

/// Reads the request's body (at most `max` bytes) as JSON of type `T`.
fn read_json<T: DeserializeOwned>(request: &mut Request<'_>, max: usize) -> Result<T, ApiError> {
    let body = request.body(max)?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::http(400, format!("the body is not the JSON expected: {e}")))
}

/// The conversation `?type=group&id=G` or `?type=direct&users=a,b` names.
fn conversation_ref(q: &Query) -> Result<ConversationRef, ApiError> {
    let kind = q.required("type")?;
    if kind.eq_ignore_ascii_case("group") {
        if q.get("users")?.is_some() {
            return Err(ApiError::http(400, "a group is named by id, not users"));
        }
        Ok(ConversationRef {
            kind: ConversationKind::Group,
            id: q.required("id")?,
            users: Vec::new(),
        })
    } else if kind.eq_ignore_ascii_case("direct") {
        if q.get("id")?.is_some() {
            return Err(ApiError::http(
                400,
                "a direct conversation is named by its users: users=alice,bob",
            ));
        }
        let mut users = q.list("users")?.unwrap_or_default();
        if !(1..=2).contains(&users.len()) {
            return Err(ApiError::http(
                400,
                "a direct conversation names one or two users: users=alice,bob",
            ));
        }
        users.sort();
        Ok(ConversationRef {
            kind: ConversationKind::Direct,
            id: users.join(":"),
            users,
        })
    } else {
        Err(ApiError::http(
            400,
            format!("type is group or direct, not {kind:?}"),
        ))
    }
}

/// The body of `POST /v1/messages`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PostMessage {
    /// The sender (a member, for a group).
    from: String,
    /// Where to, as `from` names it, in the protocol's JSON: `{"type": "DIRECT", "id": "bob"}`.
    to: pb::Conversation,
    /// The body as text (stored as its UTF-8 bytes).
    #[serde(default)]
    body: Option<String>,
    /// The body as base64 (standard alphabet, padded), for bytes that are not text.
    #[serde(default)]
    body_base64: Option<String>,
    /// A SYSTEM message (a notice from the application).
    #[serde(default)]
    system: bool,
}

impl PostMessage {
    /// The body's bytes: exactly one of `body` and `body_base64` is given.
    fn body(&self) -> Result<Bytes, ApiError> {
        match (&self.body, &self.body_base64) {
            (Some(text), None) => Ok(Bytes::copy_from_slice(text.as_bytes())),
            (None, Some(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map(Bytes::from)
                .map_err(|e| ApiError::http(400, format!("body_base64 is not base64: {e}"))),
            _ => Err(ApiError::http(
                400,
                "give exactly one of \"body\" (text) and \"body_base64\"",
            )),
        }
    }
}

/// The body of `POST /v1/kick`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Kick {
    /// The user whose connections end.
    user: String,
    /// Only this device's (`null` or absent: every device's).
    #[serde(default)]
    device: Option<String>,
    /// Told to the kicked devices in the KICKED error.
    #[serde(default)]
    reason: String,
}

/// The answer of `POST /v1/kick`.
#[derive(Debug, Serialize)]
struct Kicked {
    /// How many connections were ended.
    kicked: usize,
}

/// The body of `POST /v1/groups`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupCall {
    /// The user making the request (the group's rules apply to it).
    #[serde(rename = "as")]
    as_user: String,
    /// The request, in the protocol's JSON.
    request: pb::GroupRequest,
}

/// One user of `GET /v1/online`.
#[derive(Debug, Serialize)]
struct OnlineUser {
    /// The user.
    user: String,
    /// Its devices online, sorted.
    devices: Vec<String>,
}

/// The answer of `GET /v1/online`.
#[derive(Debug, Serialize)]
struct OnlinePage {
    /// The users, sorted by id.
    users: Vec<OnlineUser>,
    /// The last user, when the page is full (more may follow: pass it as `after`); else null.
    next: Option<String>,
}

/// The page of `GET /v1/online` for `users` asked with `limit`.
fn online_page(users: Vec<(String, Vec<String>)>, limit: usize) -> OnlinePage {
    let next = (users.len() >= limit)
        .then(|| users.last().map(|(u, _)| u.clone()))
        .flatten();
    OnlinePage {
        users: users
            .into_iter()
            .map(|(user, devices)| OnlineUser { user, devices })
            .collect(),
        next,
    }
}

/// The answer of `GET /v1/presence`.
#[derive(Debug, Serialize)]
struct PresenceList<'a> {
    /// Each user's presence, in the protocol's JSON.
    users: &'a [pb::UserPresence],
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_route_to_their_endpoint_and_other_methods_are_405_with_allow() {
        assert_eq!(route("POST", "/v1/messages"), Ok(Endpoint::Messages));
        assert_eq!(route("GET", "/v1/online"), Ok(Endpoint::Online));
        assert_eq!(route("GET", "/v1/conversation"), Ok(Endpoint::Conversation));
        assert_eq!(
            route("GET", "/v1/conversations"),
            Ok(Endpoint::Conversations)
        );
        let wrong = route("GET", "/v1/kick").expect_err("405");
        assert_eq!((wrong.status, wrong.allow), (405, Some("POST")));
        let r = wrong.response();
        assert_eq!(r.header("Allow"), Some("POST"));
        for unknown in ["/v1/", "/v1/messages/", "/v1/Online", "/v2/online"] {
            assert_eq!(
                route("GET", unknown).map_err(|e| e.status),
                Err(404),
                "{unknown}"
            );
        }
    }

    #[test]
    fn wire_codes_map_to_statuses_in_one_place() {
        use pb::ErrorCode as C;
        let cases = [
            (C::InvalidArgument, 400),
            (C::Forbidden, 403),
            (C::NotFound, 404),
            (C::AlreadyExists, 409),
            (C::GroupFull, 409),
            (C::FrameTooLarge, 413),
            (C::RateLimited, 429),
            (C::ShuttingDown, 503),
            (C::TooManyConnections, 503),
            (C::StorageFailure, 500),
            (C::Internal, 500),
            (C::Kicked, 500),
        ];
        for (code, status) in cases {
            assert_eq!(status_of(code), status, "{}", code.as_str_name());
        }
    }

    #[test]
    fn errors_are_json_with_the_wire_code_and_retry_after_when_worth_retrying() {
        let refused = ApiError::from(LocalError::Refused(pb::Error {
            code: pb::ErrorCode::Forbidden as i32,
            message: "not a member".into(),
            ..Default::default()
        }));
        let r = refused.response();
        assert_eq!((r.status, r.content_type), (403, "application/json"));
        let v: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
        assert_eq!(v["error"]["code"], "FORBIDDEN");
        assert_eq!(v["error"]["message"], "not a member");
        assert_eq!(r.header("Retry-After"), None);

        let limited = ApiError::from(LocalError::Refused(pb::Error {
            code: pb::ErrorCode::RateLimited as i32,
            retry_after_ms: 1500,
            ..Default::default()
        }))
        .response();
        assert_eq!(
            (limited.status, limited.header("Retry-After")),
            (429, Some("2"))
        );

        for e in [
            ApiError::from(ControlError::ShuttingDown),
            ApiError::from(ControlError::Timeout(Duration::from_secs(5))),
            ApiError::from(LocalError::Timeout(Duration::from_secs(5))),
            ApiError::from(LocalError::Closed(None)),
        ] {
            let r = e.response();
            assert_eq!(
                (r.status, r.header("Retry-After")),
                (503, Some("1")),
                "{e:?}"
            );
        }
        let timeout = ApiError::from(ControlError::Timeout(Duration::from_secs(5)));
        assert_eq!(timeout.code, "TIMEOUT");
        let invalid = ApiError::from(ControlError::Invalid("a user id is 1..=128 bytes".into()));
        assert_eq!(
            (invalid.status, &invalid.code[..]),
            (400, "INVALID_ARGUMENT")
        );
        let http = ApiError::http(413, "too big");
        assert_eq!(http.code, "PAYLOAD_TOO_LARGE");
    }

    #[test]
    fn a_message_body_is_text_or_base64_never_both() {
        let parse = |json: &str| {
            serde_json::from_str::<PostMessage>(json)
                .map_err(|e| e.to_string())
                .and_then(|p| p.body().map_err(|e| e.message))
        };
        let to = r#""to":{"type":"DIRECT","id":"bob"}"#;
        assert_eq!(
            parse(&format!(r#"{{"from":"a",{to},"body":"hi"}}"#)),
            Ok(Bytes::from_static(b"hi"))
        );
        assert_eq!(
            parse(&format!(r#"{{"from":"a",{to},"body_base64":"AAH/"}}"#)),
            Ok(Bytes::from_static(&[0, 1, 255]))
        );
        assert!(parse(&format!(r#"{{"from":"a",{to}}}"#)).is_err());
        assert!(
            parse(&format!(
                r#"{{"from":"a",{to},"body":"x","body_base64":"eA=="}}"#
            ))
            .is_err()
        );
        assert!(parse(&format!(r#"{{"from":"a",{to},"body_base64":"!!"}}"#)).is_err());
        assert!(
            parse(&format!(r#"{{"from":"a",{to},"body":"x","sytem":true}}"#)).is_err(),
            "a misspelt field is an error"
        );
        let post: PostMessage =
            serde_json::from_str(&format!(r#"{{"from":"a",{to},"body":"x","system":true}}"#))
                .expect("parses");
        assert!(post.system);
        assert_eq!(post.to.r#type, pb::ConversationType::Direct as i32);
    }

    #[test]
    fn a_group_call_takes_the_request_in_the_protocols_json() {
        let call: GroupCall = serde_json::from_str(
            r#"{"as":"olga","request":{"action":"CREATE","groupId":"team","members":["pete"],"name":"T"}}"#,
        )
        .expect("parses");
        assert_eq!(call.as_user, "olga");
        assert_eq!(call.request.action, pb::GroupAction::Create as i32);
        assert_eq!(call.request.group_id, "team");
        assert_eq!(call.request.members, vec!["pete".to_string()]);
    }

    #[test]
    fn a_conversation_is_named_by_group_id_or_by_its_users() {
        let named = |raw: &str| {
            Query::parse(raw, &["type", "id", "users"])
                .map_err(ApiError::from)
                .and_then(|q| conversation_ref(&q))
                .map_err(|e| e.status)
        };
        assert_eq!(
            named("type=group&id=team"),
            Ok(ConversationRef {
                kind: ConversationKind::Group,
                id: "team".into(),
                users: Vec::new()
            })
        );
        assert_eq!(
            named("type=direct&users=bob,alice").map(|c| c.users),
            Ok(vec!["alice".to_string(), "bob".to_string()])
        );
        assert_eq!(
            named("type=direct&users=alice").map(|c| c.users.len()),
            Ok(1)
        );
        for bad in [
            "",
            "type=room&id=x",
            "type=group",
            "type=group&users=a",
            "type=direct",
            "type=direct&id=a",
            "type=direct&users=a,b,c",
        ] {
            assert_eq!(named(bad).map(|_| ()), Err(400), "{bad}");
        }
    }

    #[test]
    fn an_online_page_names_its_last_user_as_next_only_when_full() {
        let users = vec![
            ("alice".to_string(), vec!["phone".to_string()]),
            ("bob".to_string(), vec!["desk".to_string()]),
        ];
        let full = serde_json::to_value(online_page(users.clone(), 2)).expect("JSON");
        assert_eq!(full["next"], "bob");
        assert_eq!(full["users"][0]["user"], "alice");
        assert_eq!(full["users"][1]["devices"][0], "desk");
        let last = serde_json::to_value(online_page(users, 3)).expect("JSON");
        assert!(last["next"].is_null());
    }
}
