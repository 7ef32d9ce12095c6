//! `broker stats`: a live view of a running node, read from its admin listener's `/metrics`.
//!
//! Every second it scrapes `/metrics` and prints one row: connections now, then per second
//! logins, frames in and out, messages stored, deliveries, retransmits, behinds and flushes, and
//! the largest flush latency so far. `--once` prints the node totals of one scrape, one
//! `name value` line each, and exits (for scripts and tests). It reads the node totals
//! (`parley_node_*`, no labels) with a small parser of the text exposition.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;

use super::CliError;

/// How long one scrape may take (connect, send, read).
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest answer read from `/metrics`.
const MAX_SCRAPE_BYTES: u64 = 8 << 20;

/// Time between two rows of the live view.
const REFRESH: Duration = Duration::from_secs(1);

/// A header is printed again after this many rows.
const ROWS_PER_HEADER: usize = 20;

/// Flags of `broker stats`.
#[derive(Debug, Args)]
pub(super) struct StatsArgs {
    /// The node's admin address (its `admin.listen`, printed as `admin=` in its listening line).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7402")]
    admin: SocketAddr,
    /// The node's admin bearer token (its `admin.token`). Prefer the environment variable: a
    /// command line is visible to other users of the machine.
    #[arg(
        long,
        value_name = "T",
        env = "PARLEY_ADMIN__TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// Print the node totals of one scrape (`name value` lines) and exit.
    #[arg(long)]
    once: bool,
}

/// The figures the view shows, as `(metric, short name)`: the node totals of `/metrics`.
const FIGURES: &[(&str, &str)] = &[
    ("parley_node_connections", "connections"),
    ("parley_node_logins_total", "logins"),
    ("parley_node_frames_in_total", "frames_in"),
    ("parley_node_frames_out_total", "frames_out"),
    ("parley_node_messages_stored_total", "messages_stored"),
    ("parley_node_deliveries_total", "deliveries"),
    ("parley_node_retransmits_total", "retransmits"),
    ("parley_node_behinds_total", "behinds"),
    ("parley_node_flushes_total", "flushes"),
    ("parley_node_flush_ms_max", "flush_ms_max"),
];

/// Runs `broker stats`.
pub(super) fn run(args: StatsArgs) -> Result<ExitCode, CliError> {
    let token = args.token.as_deref();
    if args.once {
        let figures = scrape(args.admin, token)?;
        let mut out = std::io::stdout().lock();
        for (metric, name) in FIGURES {
            let v = figures.get(*metric).copied().unwrap_or(0.0);
            writeln!(out, "{name} {v}").map_err(|e| CliError::new(format!("stdout: {e}")))?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut last = (Instant::now(), scrape(args.admin, token)?);
    let mut rows = 0;
    loop {
        std::thread::sleep(REFRESH);
        let figures = match scrape(args.admin, token) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("broker stats: {e}");
                continue;
            }
        };
        let now = Instant::now();
        if rows % ROWS_PER_HEADER == 0 {
            println!(
                "{:>8} {:>9} {:>10} {:>10} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9}",
                "conns",
                "logins/s",
                "in/s",
                "out/s",
                "stored/s",
                "deliv/s",
                "retrans",
                "behind",
                "flush/s",
                "flush_max"
            );
        }
        rows += 1;
        let secs = now.duration_since(last.0).as_secs_f64().max(1e-3);
        let rate = |m: &str| {
            let now = figures.get(m).copied().unwrap_or(0.0);
            let before = last.1.get(m).copied().unwrap_or(0.0);
            (now - before).max(0.0) / secs
        };
        let get = |m: &str| figures.get(m).copied().unwrap_or(0.0);
        println!(
            "{:>8} {:>9.0} {:>10.0} {:>10.0} {:>9.0} {:>9.0} {:>8.0} {:>8.0} {:>8.0} {:>7}ms",
            get("parley_node_connections"),
            rate("parley_node_logins_total"),
            rate("parley_node_frames_in_total"),
            rate("parley_node_frames_out_total"),
            rate("parley_node_messages_stored_total"),
            rate("parley_node_deliveries_total"),
            rate("parley_node_retransmits_total"),
            rate("parley_node_behinds_total"),
            rate("parley_node_flushes_total"),
            get("parley_node_flush_ms_max"),
        );
        last = (now, figures);
    }
}

/// Scrapes `/metrics` at `admin` and returns its series without labels, by name.
fn scrape(admin: SocketAddr, token: Option<&str>) -> Result<HashMap<String, f64>, CliError> {
    let fail = |what: &str, e: std::io::Error| CliError::new(format!("{admin}: {what}: {e}"));
    let mut stream =
        TcpStream::connect_timeout(&admin, SCRAPE_TIMEOUT).map_err(|e| fail("connect", e))?;
    stream
        .set_read_timeout(Some(SCRAPE_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(SCRAPE_TIMEOUT)))
        .map_err(|e| fail("socket", e))?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request =
        format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\n{auth}Connection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| fail("send", e))?;
    let mut answer = Vec::new();
    stream
        .take(MAX_SCRAPE_BYTES)
        .read_to_end(&mut answer)
        .map_err(|e| fail("read", e))?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let head = match response.parse(&answer) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Err(CliError::new(format!("{admin}: not an HTTP answer"))),
    };
    let body = String::from_utf8_lossy(&answer[head..]);
    match response.code {
        Some(200) => Ok(parse_exposition(&body)),
        code => Err(CliError::new(format!(
            "{admin}/metrics answered {}: {}",
            code.unwrap_or(0),
            body.trim()
        ))),
    }
}

/// The series without labels of a text exposition (`name value [timestamp]` lines), by name;
/// comments and labelled series are skipped.
fn parse_exposition(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.contains('{') {
            continue;
        }
        let mut words = line.split_whitespace();
        if let (Some(name), Some(value)) = (words.next(), words.next())
            && let Ok(v) = value.parse::<f64>()
        {
            out.insert(name.to_owned(), v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_parser_reads_unlabelled_series_and_skips_the_rest() {
        let text = "# HELP parley_node_logins Successful logins.\n\
                    # TYPE parley_node_logins counter\n\
                    parley_node_logins_total 12\n\
                    parley_logins_total{shard=\"0\"} 5\n\
                    parley_node_connections 3 1700000000\n\
                    garbage\n\
                    # EOF\n";
        let m = parse_exposition(text);
        assert_eq!(m.get("parley_node_logins_total"), Some(&12.0));
        assert_eq!(m.get("parley_node_connections"), Some(&3.0));
        assert_eq!(m.len(), 2, "{m:?}");
    }
}
