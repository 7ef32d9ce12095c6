//! A minimal chat with the client library: `chat [--udp | --tls CA_PEM] ADDR TOKEN PEER`, then
//! type lines.
//!
//! ```text
//! TOKEN=$(broker token --user alice)
//! cargo run -p parley-client --example chat -- 127.0.0.1:7400 "$TOKEN" bob
//! # over UDP (broker serve --set listen.udp=127.0.0.1:7405):
//! cargo run -p parley-client --example chat -- --udp 127.0.0.1:7405 "$TOKEN" bob
//! # over TLS (broker devcert --out certs; broker serve --set listen.tls=127.0.0.1:7443 ...):
//! cargo run -p parley-client --example chat -- --tls certs/cert.pem 127.0.0.1:7443 "$TOKEN" bob
//! ```
//!
//! It keeps chatting across broker restarts: lines typed meanwhile are sent once it is back.

use std::io::BufRead;
use std::time::Duration;

use parley_client::{Client, ClientConfig, Event, TcpConnector, TokenProvider, UdpConnector};

const USAGE: &str = "usage: chat [--udp | --tls CA_PEM [--server-name NAME]] ADDR TOKEN PEER";

/// Starts the client over the transport the flags name.
fn start(flags: &[String], addr: &str, tokens: TokenProvider) -> Result<Client, String> {
    let config = ClientConfig::default();
    match flags {
        [] => Ok(Client::start(TcpConnector::new(addr), tokens, config)),
        [udp] if udp == "--udp" => Ok(Client::start(UdpConnector::new(addr), tokens, config)),
        #[cfg(feature = "tls")]
        [tls, ca, rest @ ..] if tls == "--tls" => {
            let name = match rest {
                [] => "localhost",
                [flag, name] if flag == "--server-name" => name.as_str(),
                _ => return Err(USAGE.into()),
            };
            let connector = parley_client::TlsConnector::with_ca_file(addr, name, ca)
                .map_err(|e| format!("{ca}: {e}"))?;
            Ok(Client::start(connector, tokens, config))
        }
        _ => Err(USAGE.into()),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((flags, [addr, token, peer])) = args.split_last_chunk::<3>() else {
        eprintln!("{USAGE}");
        std::process::exit(2);
    };
    let token = token.clone();
    let client = match start(flags, addr, Box::new(move || Ok(token.clone()))) {
        Ok(client) => client,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
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
