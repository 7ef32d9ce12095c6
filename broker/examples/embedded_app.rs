//! An application that embeds the broker: it logs users in from its own session table, reacts to
//! stored messages (a support bot answers what users write to `support`, off the broker's
//! threads) and queues offline pushes for recipients with no device online.
//!
//! Run it with `cargo run -p parley-broker --example embedded_app`. It starts a node on a free
//! loopback port in a temporary directory, plays a short scene with a real TCP client, prints
//! what happened and exits (0 if everything went as expected). CI runs the same scene
//! (`broker/tests/example.rs`).

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use parley_broker::auth::Identity;
use parley_broker::config::Config;
use parley_broker::hooks::{
    AuthVerdict, Gates, Hooks, LoginAttempt, Observes, OfflineDelivery, Reply, StoredMessage,
};
use parley_broker::proto::pb::{self, frame::Body};
use parley_broker::proto::tcp::FrameCodec;
use parley_broker::{Broker, Handle};

/// The application's hooks: its own logins, and what it does with stored messages.
struct App {
    /// Session token → (user, device): the application's login table.
    sessions: HashMap<&'static str, (&'static str, &'static str)>,
    /// Stored messages, handed to the application's worker (never worked on in the hook: hooks
    /// run on the broker's shard threads).
    stored: Mutex<Option<mpsc::Sender<StoredMessage>>>,
    /// Offline pushes the application would send (to APNs/FCM in a real one).
    pushes: Mutex<Vec<String>>,
}

impl Hooks for App {
    fn gates(&self) -> Gates {
        Gates {
            authenticate: true,
            ..Gates::default()
        }
    }

    fn observes(&self) -> Observes {
        Observes {
            stored: true,
            offline: true,
        }
    }

    fn authenticate(&self, login: &LoginAttempt<'_>, reply: Reply<AuthVerdict>) {
        reply.send(match self.sessions.get(login.token) {
            Some(&(user, device)) => AuthVerdict::Accept(Identity {
                user: user.into(),
                device: device.into(),
                expires_at: 0,
            }),
            None => AuthVerdict::Reject("unknown session".into()),
        });
    }

    fn message_stored(&self, message: &StoredMessage) {
        if let Ok(tx) = self.stored.lock()
            && let Some(tx) = tx.as_ref()
        {
            let _ = tx.send(message.clone());
        }
    }

    fn stored_for_offline(&self, delivery: &OfflineDelivery) {
        if let Ok(mut p) = self.pushes.lock() {
            for user in &delivery.users {
                p.push(format!(
                    "push to {user}: new message from {} (seq {})",
                    delivery.sender, delivery.seq
                ));
            }
        }
    }
}

/// The support bot: answers every message a user writes to `support`.
fn support_bot(handle: Handle, stored: mpsc::Receiver<StoredMessage>) {
    for m in stored {
        let to_support = m.conversation.users.iter().any(|u| u == "support");
        if !to_support || m.sender == "support" || m.system {
            continue;
        }
        let text = String::from_utf8_lossy(&m.body);
        let answer = format!(
            "Thanks {}, we got \"{text}\" and will answer soon.",
            m.sender
        );
        let to = pb::Conversation {
            r#type: pb::ConversationType::Direct as i32,
            id: m.sender.clone(),
        };
        if let Err(e) = handle.post("support", to, answer, false) {
            eprintln!("support bot: {e}");
        }
    }
}

/// Plays the scene; `Ok` if everything happened as expected.
pub(crate) fn run() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let mut config = Config {
        data_dir: dir.path().to_path_buf(),
        shards: 2,
        ..Config::default()
    };
    config.listen.tcp = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    config.listen.ws = None;
    config.admin.listen = None;

    let (tx, rx) = mpsc::channel();
    let app = Arc::new(App {
        sessions: HashMap::from([
            ("s-alice", ("alice", "phone")),
            ("s-bob", ("bob", "laptop")),
        ]),
        stored: Mutex::new(Some(tx)),
        pushes: Mutex::new(Vec::new()),
    });
    // The login hook decides every login; the secret is only the built-in fallback.
    let handle = Broker::new(config)
        .secret(b"unused-fallback-secret-32-bytes!".to_vec())
        .hooks(app.clone())
        .start()?;
    let bot = {
        let handle = handle.clone();
        std::thread::spawn(move || support_bot(handle, rx))
    };
    let addr = handle.tcp_addr().ok_or("no TCP listener")?;

    // Alice logs in with the application's own session token and writes to support.
    let mut alice = Client::login(addr, "s-alice")?;
    alice.send_text("support", 1, "my order has not arrived")?;
    let answer = alice.next_message()?;
    println!(
        "alice got from {}: {}",
        answer.from_user,
        String::from_utf8_lossy(&answer.body)
    );
    if answer.from_user != "support" || !String::from_utf8_lossy(&answer.body).contains("order") {
        return Err("the support bot did not answer".into());
    }

    // Bob is offline: alice's message to him becomes an offline push.
    alice.send_text("bob", 2, "see you at 6?")?;
    // A stranger's token is refused.
    if Client::login(addr, "s-mallory").is_ok() {
        return Err("an unknown session logged in".into());
    }

    drop(alice);
    handle.shutdown();
    handle.join()?;
    drop(handle);
    // The node is stopped: no more stored messages; the bot's queue ends.
    if let Ok(mut tx) = app.stored.lock() {
        tx.take();
    }
    let _ = bot.join();
    let pushes = app.pushes.lock().map(|p| p.clone()).unwrap_or_default();
    for p in &pushes {
        println!("{p}");
    }
    if !pushes.iter().any(|p| p.starts_with("push to bob")) {
        return Err("no offline push for bob".into());
    }
    println!("done");
    Ok(())
}

#[allow(dead_code)] // `broker/tests/example.rs` includes this file and calls `run`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    run()
}

/// A minimal TCP client of the protocol (a real application would use a client library).
struct Client {
    stream: TcpStream,
    codec: FrameCodec,
    buf: BytesMut,
    next_request: u64,
}

impl Client {
    fn login(addr: SocketAddr, token: &str) -> Result<Client, Box<dyn std::error::Error>> {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut c = Client {
            stream,
            codec: FrameCodec::default(),
            buf: BytesMut::new(),
            next_request: 1,
        };
        c.send(Body::Login(pb::Login {
            protocol_version: parley_broker::proto::PROTOCOL_VERSION,
            token: token.into(),
            client_name: "embedded-app-example".into(),
        }))?;
        match c.recv()?.body {
            Some(Body::LoginResult(_)) => Ok(c),
            Some(Body::Error(e)) => Err(format!("login refused: {}", e.message).into()),
            other => Err(format!("unexpected answer to a login: {other:?}").into()),
        }
    }

    fn send(&mut self, body: Body) -> Result<(), Box<dyn std::error::Error>> {
        let frame = pb::Frame {
            request_id: self.next_request,
            body: Some(body),
        };
        self.next_request += 1;
        let mut out = BytesMut::new();
        self.codec.encode(&frame, &mut out)?;
        self.stream.write_all(&out)?;
        Ok(())
    }

    fn send_text(
        &mut self,
        to: &str,
        client_msg_id: u64,
        text: &str,
    ) -> Result<(), Box<dyn std::error::Error>> {
        self.send(Body::Send(pb::Send {
            to: Some(pb::Conversation {
                r#type: pb::ConversationType::Direct as i32,
                id: to.into(),
            }),
            client_msg_id,
            body: text.to_owned().into_bytes().into(),
            ..Default::default()
        }))?;
        loop {
            match self.recv()?.body {
                Some(Body::SendAck(_)) => return Ok(()),
                Some(Body::Error(e)) => return Err(format!("send refused: {}", e.message).into()),
                _ => {}
            }
        }
    }

    fn next_message(&mut self) -> Result<pb::Message, Box<dyn std::error::Error>> {
        loop {
            if let Some(Body::Deliver(d)) = self.recv()?.body
                && let Some(m) = d.messages.into_iter().next()
            {
                return Ok(m);
            }
        }
    }

    fn recv(&mut self) -> Result<pb::Frame, Box<dyn std::error::Error>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(f) = self.codec.decode_frame(&mut self.buf)? {
                return Ok(f);
            }
            if Instant::now() > deadline {
                return Err("no answer within 10 s".into());
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err("the broker closed the connection".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}
