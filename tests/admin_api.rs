//! The admin JSON API (issue 11, item 3), over real sockets against the real binary: what it
//! does reaches socket clients (a posted message is delivered, a kick closes the session), what
//! it reads matches the node (online users, presence, conversation lists, a group made through
//! it), and it refuses what it must (no token or a wrong one, an oversized body, an unknown
//! conversation, a non-member's post, an existing group).

use parley_tests::http::{self, Answer};
use parley_tests::{Broker, ErrorCode, TIMEOUT, direct};
use serde_json::Value;

/// The admin token the tests configure.
const TOKEN: &str = "admin-api-test-token-0123456789";

/// A broker with the admin token set, and `settings`.
fn broker(settings: &[&str]) -> Broker {
    let token = format!("admin.token=\"{TOKEN}\"");
    let mut all = vec![token.as_str()];
    all.extend_from_slice(settings);
    Broker::start(&all)
}

/// `GET path` with the token.
fn get(broker: &Broker, path: &str) -> Answer {
    http::get(broker.admin_addr(), path, Some(TOKEN))
}

/// `POST path` with the token and `json`.
fn post(broker: &Broker, path: &str, json: &Value) -> Answer {
    http::post(broker.admin_addr(), path, Some(TOKEN), &json.to_string())
}

/// The JSON of a 200 answer (panics on any other status).
fn ok(answer: &Answer) -> Value {
    assert_eq!(answer.status, 200, "{answer:?}");
    answer.json()
}

/// A whole number in the protocol's JSON (64-bit integers are strings there).
fn int(v: &Value) -> u64 {
    match v {
        Value::Number(n) => n.as_u64().unwrap_or_else(|| panic!("not a u64: {v}")),
        Value::String(s) => s.parse().unwrap_or_else(|_| panic!("not a u64: {v}")),
        _ => panic!("not a number: {v}"),
    }
}

/// Creates group `id` owned by `owner` with `members`, through the API.
fn create_group(broker: &Broker, owner: &str, id: &str, members: &[&str]) -> Value {
    ok(&post(
        broker,
        "/v1/groups",
        &serde_json::json!({
            "as": owner,
            "request": {"action": "CREATE", "groupId": id, "members": members, "name": "The team"},
        }),
    ))
}

#[test]
fn a_message_posted_through_the_api_is_delivered_to_a_connected_client() {
    let broker = broker(&[]);
    let mut bob = broker.connect("bob", "phone");
    let ack = ok(&post(
        &broker,
        "/v1/messages",
        &serde_json::json!({"from": "alice", "to": {"type": "DIRECT", "id": "bob"}, "body": "hello bob"}),
    ));
    let seq = int(&ack["seq"]);
    assert_eq!(seq, 1, "{ack}");
    assert!(
        int(&ack["msgId"]) > 0 && int(&ack["serverTime"]) > 0,
        "{ack}"
    );
    let m = bob.expect_delivery(&direct("alice"), seq, TIMEOUT);
    assert_eq!(
        (&m.from_user[..], &m.body[..]),
        ("alice", &b"hello bob"[..])
    );
}

#[test]
fn a_system_message_with_a_base64_body_arrives_as_system_with_those_bytes() {
    let broker = broker(&[]);
    let mut bob = broker.connect("bob", "phone");
    let ack = ok(&post(
        &broker,
        "/v1/messages",
        &serde_json::json!({
            "from": "shop", "to": {"type": "DIRECT", "id": "bob"},
            "body_base64": "AAH/", "system": true,
        }),
    ));
    let m = bob.expect_delivery(&direct("shop"), int(&ack["seq"]), TIMEOUT);
    assert_eq!(&m.body[..], &[0u8, 1, 255][..]);
    assert_eq!(m.kind, parley_proto::pb::MessageKind::System as i32);
}

#[test]
fn a_kick_ends_the_users_session_with_kicked_and_a_close() {
    let broker = broker(&[]);
    let mut bob = broker.connect("bob", "phone");
    let answer = ok(&post(
        &broker,
        "/v1/kick",
        &serde_json::json!({"user": "bob", "device": null, "reason": "banned for a day"}),
    ));
    assert_eq!(answer, serde_json::json!({"kicked": 1}));
    let e = bob.expect_fatal_error(&[ErrorCode::Kicked], TIMEOUT);
    assert!(e.message.contains("banned for a day"), "{:?}", e.message);
}

#[test]
fn online_lists_connected_users_and_their_devices_in_pages() {
    let broker = broker(&[]);
    let _carol = broker.connect("carol", "phone");
    let _alice = broker.connect("alice", "laptop");
    let _bob = broker.connect("bob", "desk");
    let all = ok(&get(&broker, "/v1/online"));
    assert_eq!(
        all,
        serde_json::json!({
            "users": [
                {"user": "alice", "devices": ["laptop"]},
                {"user": "bob", "devices": ["desk"]},
                {"user": "carol", "devices": ["phone"]},
            ],
            "next": null,
        })
    );
    let first = ok(&get(&broker, "/v1/online?limit=2"));
    assert_eq!(first["users"].as_array().map(Vec::len), Some(2));
    assert_eq!(first["next"], "bob");
    let rest = ok(&get(&broker, "/v1/online?after=bob&limit=2"));
    assert_eq!(rest["users"][0]["user"], "carol");
    assert!(rest["next"].is_null(), "{rest}");
}

#[test]
fn presence_shows_connected_users_online_and_others_offline() {
    let broker = broker(&[]);
    let _bob = broker.connect("bob", "phone");
    let answer = ok(&get(&broker, "/v1/presence?users=bob,carol"));
    let users = answer["users"].as_array().expect("a list");
    let status = |user: &str| {
        users
            .iter()
            .find(|u| u["user"] == user)
            .map(|u| u["status"].clone())
    };
    assert_eq!(status("bob"), Some(Value::from("ONLINE")), "{answer}");
    assert_eq!(status("carol"), Some(Value::from("OFFLINE")), "{answer}");
}

#[test]
fn a_group_created_through_the_api_can_be_inspected() {
    let broker = broker(&[]);
    let result = create_group(&broker, "olga", "team", &["pete", "quinn"]);
    assert_eq!(result["groupId"], "team");
    let created_at = int(&result["seq"]);
    assert!(created_at > 0, "{result}");
    let info = ok(&get(&broker, "/v1/conversation?type=group&id=team"));
    assert_eq!(int(&info["last_seq"]), created_at, "{info}");
    let group = &info["group"];
    assert_eq!(
        (&group["name"], int(&group["member_count"])),
        (&Value::from("The team"), 3)
    );
    let roles: Vec<(String, String)> = group["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| (m["user"].to_string(), m["role"].to_string()))
        .collect();
    assert_eq!(
        roles,
        [("olga", "owner"), ("pete", "member"), ("quinn", "member")]
            .map(|(u, r)| (format!("\"{u}\""), format!("\"{r}\"")))
    );
}

#[test]
fn a_direct_conversation_is_inspected_by_its_users() {
    let broker = broker(&[]);
    ok(&post(
        &broker,
        "/v1/messages",
        &serde_json::json!({"from": "alice", "to": {"type": "DIRECT", "id": "bob"}, "body": "hi"}),
    ));
    let info = ok(&get(
        &broker,
        "/v1/conversation?type=direct&users=bob,alice",
    ));
    assert_eq!(int(&info["last_seq"]), 1, "{info}");
    assert_eq!(
        info["conversation"]["users"],
        serde_json::json!(["alice", "bob"])
    );
}

#[test]
fn the_conversation_list_of_a_user_is_served() {
    let broker = broker(&[]);
    for to in ["bob", "carol"] {
        ok(&post(
            &broker,
            "/v1/messages",
            &serde_json::json!({"from": "alice", "to": {"type": "DIRECT", "id": to}, "body": "hi"}),
        ));
    }
    let list = ok(&get(&broker, "/v1/conversations?user=alice&limit=50"));
    let conversations = list["conversations"].as_array().expect("a list");
    assert_eq!(conversations.len(), 2, "{list}");
    let one = ok(&get(&broker, "/v1/conversations?user=alice&limit=1"));
    assert_eq!(one["conversations"].as_array().map(Vec::len), Some(1));
    assert_eq!(one["more"], true, "{one}");
}

#[test]
fn with_no_admin_token_configured_the_api_is_off() {
    let broker = Broker::start(&[]);
    let answer = http::get(
        broker.admin_addr(),
        "/v1/online",
        Some("anything-at-all-long"),
    );
    assert_eq!(
        (answer.status, answer.error_code().as_str()),
        (401, "UNAUTHORIZED")
    );
    assert!(answer.body.contains("admin.token"), "{answer:?}");
}

#[test]
fn a_missing_or_wrong_token_is_refused_with_401() {
    let broker = broker(&[]);
    let body = r#"{"user":"bob"}"#;
    for token in [None, Some("not-the-admin-token-at-all")] {
        let get = http::get(broker.admin_addr(), "/v1/online", token);
        assert_eq!(get.status, 401, "{token:?}: {get:?}");
        assert!(get.header("WWW-Authenticate").is_some(), "{get:?}");
        let post = http::post(broker.admin_addr(), "/v1/kick", token, body);
        assert_eq!(post.status, 401, "{token:?}: {post:?}");
    }
}

#[test]
fn a_body_over_max_body_bytes_is_refused_with_413() {
    let broker = broker(&["admin.max_body_bytes=1024"]);
    let mut bob = broker.connect("bob", "phone");
    let big = serde_json::json!({
        "from": "alice", "to": {"type": "DIRECT", "id": "bob"}, "body": "x".repeat(4096),
    });
    let answer = post(&broker, "/v1/messages", &big);
    assert_eq!(
        (answer.status, answer.error_code().as_str()),
        (413, "PAYLOAD_TOO_LARGE")
    );
    bob.assert_no_delivery(
        &direct("alice"),
        1,
        std::time::Duration::from_millis(300),
        "refused",
    );
}

#[test]
fn an_unknown_conversation_is_404() {
    let broker = broker(&[]);
    let group = get(&broker, "/v1/conversation?type=group&id=nobody-made-this");
    assert_eq!(
        (group.status, group.error_code().as_str()),
        (404, "NOT_FOUND")
    );
    let direct = get(&broker, "/v1/conversation?type=direct&users=x,y");
    assert_eq!(direct.status, 404, "{direct:?}");
}

#[test]
fn a_post_to_a_group_by_a_non_member_is_403() {
    let broker = broker(&[]);
    create_group(&broker, "olga", "team", &["pete"]);
    let answer = post(
        &broker,
        "/v1/messages",
        &serde_json::json!({"from": "mallory", "to": {"type": "GROUP", "id": "team"}, "body": "hi"}),
    );
    assert_eq!(
        (answer.status, answer.error_code().as_str()),
        (403, "FORBIDDEN")
    );
}

#[test]
fn creating_a_group_that_exists_is_409() {
    let broker = broker(&[]);
    create_group(&broker, "olga", "team", &[]);
    let answer = post(
        &broker,
        "/v1/groups",
        &serde_json::json!({"as": "victor", "request": {"action": "CREATE", "groupId": "team"}}),
    );
    assert_eq!(
        (answer.status, answer.error_code().as_str()),
        (409, "ALREADY_EXISTS")
    );
}

#[test]
fn malformed_json_is_400() {
    let broker = broker(&[]);
    let answer = http::post(broker.admin_addr(), "/v1/kick", Some(TOKEN), "{\"user\":");
    assert_eq!(
        (answer.status, answer.error_code().as_str()),
        (400, "BAD_REQUEST")
    );
}
