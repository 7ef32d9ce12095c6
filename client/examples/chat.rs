//! A minimal chat with the client library: `chat ADDR TOKEN PEER`, then type lines.
//!
//! ```text
//! TOKEN=$(broker token --user alice)
//! cargo run -p parley-client --example chat -- 127.0.0.1:7400 "$TOKEN" bob
//! ```
//!
//! It keeps chatting across broker restarts: lines typed meanwhile are sent once it is back.

use std::io::BufRead;
use std::time::Duration;

use parley_client::{Client, ClientConfig, Event, TcpConnector};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, token, peer] = args.as_slice() else {
        eprintln!("usage: chat ADDR TOKEN PEER");
        std::process::exit(2);
    };
    let token = token.clone();
    let client = Client::start(
        TcpConnector::new(addr.clone()),
        Box::new(move || Ok(token.clone())),
        ClientConfig::default(),
    );
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    loop {
        match lines.try_recv() {
            Ok(line) => {
                if let Err(e) = client.send_text(peer, &line) {
                    eprintln!("not sent: {e}");
                }
            }
            Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
            Err(std::sync::mpsc::TryRecvError::Empty) => {}
        }
        match client.next_event(Duration::from_millis(20)) {
            Some(Event::Message(m)) => {
                println!(
                    "[{}] {}: {}",
                    m.seq,
                    m.from_user,
                    String::from_utf8_lossy(&m.body)
                );
            }
            Some(Event::Acked { seq, .. }) => println!("(sent #{seq})"),
            Some(Event::Disconnected { reason }) => eprintln!("disconnected: {reason}"),
            Some(Event::Stopped { reason }) => {
                eprintln!("stopped: {reason}");
                return;
            }
            _ => {}
        }
    }
    let unacked = client.close(Duration::from_secs(5));
    if !unacked.is_empty() {
        eprintln!("{} message(s) not acknowledged", unacked.len());
    }
}
