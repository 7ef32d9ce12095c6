//! `broker chat` keeps chatting across a broker `kill -9` and restart: two chat processes, lines
//! typed into both before, during and after the outage; each side shows every line of the other
//! exactly once, in order.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use parley_tests::broker::{Broker, broker_bin};

/// How long a chat may take to show what it is waiting for.
const WAIT: Duration = Duration::from_secs(30);

/// One `broker chat` process with piped standard streams.
struct Chat {
    name: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Chat {
    fn start(broker: &Broker, user: &'static str, to: &str) -> Chat {
        Self::start_with(
            broker,
            user,
            to,
            &["--addr", &broker.tcp_addr().to_string()],
        )
    }

    /// A chat with these transport arguments (`--addr`, `--udp`, `--ca`).
    fn start_with(broker: &Broker, user: &'static str, to: &str, transport: &[&str]) -> Chat {
        let mut child = Command::new(broker_bin())
            .arg("chat")
            .args(transport)
            .args(["--token", &broker.token(user, "cli")])
            .args(["--to", to])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start broker chat");
        let collect = |pipe: Box<dyn std::io::Read + Send>| {
            let lines = Arc::new(Mutex::new(Vec::new()));
            let sink = Arc::clone(&lines);
            thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    sink.lock().expect("lock").push(line);
                }
            });
            lines
        };
        let stdout = collect(Box::new(child.stdout.take().expect("piped")));
        let stderr = collect(Box::new(child.stderr.take().expect("piped")));
        let stdin = child.stdin.take();
        let chat = Chat {
            name: user,
            child,
            stdin,
            stdout,
            stderr,
        };
        chat.wait_for(|c| c.stderr_has("type a message"), "its prompt");
        chat
    }

    fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("type a line");
        stdin.flush().expect("flush");
    }

    fn stderr_has(&self, text: &str) -> bool {
        self.stderr
            .lock()
            .expect("lock")
            .iter()
            .any(|l| l.contains(text))
    }

    fn out(&self) -> Vec<String> {
        self.stdout.lock().expect("lock").clone()
    }

    /// The texts of the lines `from` sent that this chat printed, in order, with their seqs.
    fn received(&self, from: &str) -> Vec<(u64, String)> {
        let prefix = format!("] {from}: ");
        self.out()
            .iter()
            .filter_map(|l| {
                let rest = l.strip_prefix("[seq ")?;
                let (seq, text) = rest.split_once(&prefix)?;
                Some((seq.parse().ok()?, text.to_owned()))
            })
            .collect()
    }

    fn wait_for(&self, done: impl Fn(&Chat) -> bool, what: &str) {
        let deadline = Instant::now() + WAIT;
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "{} never showed {what}\nstdout: {:#?}\nstderr: {:#?}",
                self.name,
                self.out(),
                self.stderr.lock().expect("lock")
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Closes stdin and waits for a clean exit.
    fn finish(mut self) -> Vec<String> {
        drop(self.stdin.take());
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(
                    status.success(),
                    "{} exited with {status}\nstderr: {:#?}",
                    self.name,
                    self.stderr.lock().expect("lock")
                );
                return self.out();
            }
            assert!(Instant::now() < deadline, "{} did not exit", self.name);
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Chat {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn texts(received: &[(u64, String)]) -> Vec<String> {
    received.iter().map(|(_, t)| t.clone()).collect()
}

#[test]
fn two_chats_survive_a_kill_9_and_restart_with_nothing_lost_or_doubled() {
    let mut broker = Broker::start(&[]);
    let mut alice = Chat::start(&broker, "alice", "bob");
    let mut bob = Chat::start(&broker, "bob", "alice");

    alice.say("a1");
    bob.say("b1");
    alice.say("a2");
    bob.wait_for(|c| c.received("alice").len() == 2, "a1 and a2");
    alice.wait_for(|c| c.received("bob").len() == 1, "b1");

    broker.kill9();
    alice.wait_for(|c| c.stderr_has("connection lost"), "the lost connection");
    // Typed while the broker is down.
    alice.say("a3");
    bob.say("b2");
    thread::sleep(Duration::from_millis(300));
    broker.restart_on_same_ports();
    alice.say("a4");
    bob.say("b3");

    let want_a: Vec<String> = ["a1", "a2", "a3", "a4"].map(str::to_owned).to_vec();
    let want_b: Vec<String> = ["b1", "b2", "b3"].map(str::to_owned).to_vec();
    bob.wait_for(
        |c| c.received("alice").len() >= want_a.len(),
        "every line of alice",
    );
    alice.wait_for(
        |c| c.received("bob").len() >= want_b.len(),
        "every line of bob",
    );
    // Let any duplicate show up before judging.
    thread::sleep(Duration::from_millis(500));
    for (chat, from, want) in [(&bob, "alice", &want_a), (&alice, "bob", &want_b)] {
        let got = chat.received(from);
        assert_eq!(
            &texts(&got),
            want,
            "{}'s view of {from}: {got:?}",
            chat.name
        );
        assert!(
            got.windows(2).all(|w| w[0].0 < w[1].0),
            "{}: seqs not increasing: {got:?}",
            chat.name
        );
    }
    let alice_out = alice.finish();
    let bob_out = bob.finish();
    // Each typed line was acknowledged exactly once.
    assert_eq!(
        alice_out
            .iter()
            .filter(|l| l.starts_with("(sent #"))
            .count(),
        4
    );
    assert_eq!(
        bob_out.iter().filter(|l| l.starts_with("(sent #")).count(),
        3
    );
}

#[test]
fn a_chat_over_udp_and_a_chat_over_tls_talk_both_ways_once_each_in_order() {
    let certs = tempfile::tempdir().expect("a temp dir");
    let made = Command::new(broker_bin())
        .args(["devcert", "--out"])
        .arg(certs.path())
        .output()
        .expect("run broker devcert");
    assert!(made.status.success(), "{made:?}");
    let cert = certs.path().join("cert.pem");
    let key = certs.path().join("key.pem");
    let broker = Broker::start(&[
        "listen.udp=\"127.0.0.1:0\"",
        "listen.tls=\"127.0.0.1:0\"",
        &format!("tls.cert_path=\"{}\"", cert.display()),
        &format!("tls.key_path=\"{}\"", key.display()),
    ]);
    let udp = broker.udp_addr().to_string();
    let tls = broker.tls_addr().to_string();
    let ca = cert.display().to_string();
    let mut alice = Chat::start_with(&broker, "alice", "bob", &["--udp", "--addr", &udp]);
    let mut bob = Chat::start_with(&broker, "bob", "alice", &["--ca", &ca, "--addr", &tls]);
    for i in 1..=5 {
        alice.say(&format!("a{i}"));
        bob.say(&format!("b{i}"));
    }
    bob.wait_for(|c| c.received("alice").len() >= 5, "alice's lines");
    alice.wait_for(|c| c.received("bob").len() >= 5, "bob's lines");
    thread::sleep(Duration::from_millis(300));
    for (chat, from, prefix) in [(&bob, "alice", "a"), (&alice, "bob", "b")] {
        let want: Vec<(u64, String)> = (1..=5).map(|i| (0, format!("{prefix}{i}"))).collect();
        let got = chat.received(from);
        assert_eq!(texts(&got), texts(&want), "{}'s view of {from}", chat.name);
        assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "{got:?}");
    }
    for chat in [alice, bob] {
        let out = chat.finish();
        assert_eq!(out.iter().filter(|l| l.starts_with("(sent #")).count(), 5);
    }
}
