//! `broker stats`: a live view of a running node, read from its admin listener's `/metrics`.
//!
//! Every second it scrapes `/metrics` and prints one row: connections now, then per second
//! logins, frames in and out, messages stored, deliveries, retransmits, behinds and flushes, the
//! largest flush latency so far, and over the last second the p50 and p99 send-to-deliver
//! latency and the p99 flush latency. `--once` prints the node totals of one scrape, one
//! `name value` line each (the latency quantiles in ms over everything since the node started,
//! `-` if nothing was recorded), and exits (for scripts and tests). It reads the node totals (`parley_node_*`, no labels but a
//! histogram bucket's `le`) with a small parser of the text exposition.
//!
//! A quantile over an interval comes from the differences of two scrapes' cumulative buckets,
//! interpolated linearly inside the bucket it falls in (as Prometheus's `histogram_quantile`
//! does: [`parley_broker::histogram::quantile`]), so it is an estimate within that bucket, whose
//! bounds are at most 1.5 times apart; one in the +Inf bucket shows the largest finite bound.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Args;
use parley_broker::histogram;

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

/// The node histograms the view reads: `(metric, quantile, short name)`; each shows as its
/// quantile in ms.
const QUANTILES: &[(&str, f64, &str)] = &[
    (
        "parley_node_send_to_deliver_seconds",
        0.5,
        "send_to_deliver_p50_ms",
    ),
    (
        "parley_node_send_to_deliver_seconds",
        0.99,
        "send_to_deliver_p99_ms",
    ),
    ("parley_node_flush_seconds", 0.99, "flush_p99_ms"),
];

/// What one scrape read.
#[derive(Debug, Default)]
struct Scrape {
    /// Series without labels, by name.
    values: HashMap<String, f64>,
    /// Histograms without labels (but `le`), by name (without `_bucket`): their cumulative
    /// buckets as `(le, count)`, in the order of the exposition (ascending `le`).
    buckets: HashMap<String, Vec<(f64, f64)>>,
}

impl Scrape {
    /// A value by name, 0 if absent.
    fn get(&self, metric: &str) -> f64 {
        self.values.get(metric).copied().unwrap_or(0.0)
    }

    /// The `q`-quantile in ms of histogram `metric` over what it recorded since `before` (all
    /// it holds if `before` is `None` or has other buckets); `None` if nothing was recorded.
    fn quantile_ms(&self, metric: &str, q: f64, before: Option<&Scrape>) -> Option<f64> {
        let now = self.buckets.get(metric)?;
        let zero = Vec::new();
        let then = before
            .and_then(|b| b.buckets.get(metric))
            .filter(|b| b.len() == now.len() && b.iter().zip(now).all(|(x, y)| x.0 == y.0))
            .unwrap_or(&zero);
        // Cumulative counts of the interval, then the count of each bucket alone.
        let mut below = 0.0;
        let mut buckets = Vec::with_capacity(now.len());
        for (i, &(le, cum)) in now.iter().enumerate() {
            let window = (cum - then.get(i).map_or(0.0, |t| t.1)).max(below);
            buckets.push((le, (window - below) as u64));
            below = window;
        }
        histogram::quantile(&buckets, q).map(|s| s * 1e3)
    }
}

/// A latency in ms for the view (`-`: nothing recorded).
fn show_ms(ms: Option<f64>) -> String {
    ms.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}ms"))
}

/// Runs `broker stats`.
pub(super) fn run(args: StatsArgs) -> Result<ExitCode, CliError> {
    let token = args.token.as_deref();
    if args.once {
        let figures = scrape(args.admin, token)?;
        let mut out = std::io::stdout().lock();
        let fail = |e: std::io::Error| CliError::new(format!("stdout: {e}"));
        for (metric, name) in FIGURES {
            writeln!(out, "{name} {}", figures.get(metric)).map_err(fail)?;
        }
        // Since the node started: one scrape has no interval.
        for &(metric, q, name) in QUANTILES {
            match figures.quantile_ms(metric, q, None) {
                Some(v) => writeln!(out, "{name} {v}").map_err(fail)?,
                None => writeln!(out, "{name} -").map_err(fail)?,
            }
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
                "{:>8} {:>9} {:>10} {:>10} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9} {:>10} {:>10} {:>10}",
                "conns",
                "logins/s",
                "in/s",
                "out/s",
                "stored/s",
                "deliv/s",
                "retrans",
                "behind",
                "flush/s",
                "flush_max",
                "deliv_p50",
                "deliv_p99",
                "flush_p99"
            );
        }
        rows += 1;
        let secs = now.duration_since(last.0).as_secs_f64().max(1e-3);
        let rate = |m: &str| (figures.get(m) - last.1.get(m)).max(0.0) / secs;
        let get = |m: &str| figures.get(m);
        let window = |i: usize| {
            QUANTILES
                .get(i)
                .and_then(|&(m, q, _)| figures.quantile_ms(m, q, Some(&last.1)))
        };
        println!(
            "{:>8} {:>9.0} {:>10.0} {:>10.0} {:>9.0} {:>9.0} {:>8.0} {:>8.0} {:>8.0} {:>7}ms {:>10} {:>10} {:>10}",
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
            show_ms(window(0)),
            show_ms(window(1)),
            show_ms(window(2)),
        );
        last = (now, figures);
    }
}

/// Scrapes `/metrics` at `admin` and returns its series without labels, by name, and its
/// histograms without labels.
fn scrape(admin: SocketAddr, token: Option<&str>) -> Result<Scrape, CliError> {
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

/// The series without labels of a text exposition (`name value [timestamp]` lines), by name,
/// and the buckets of its histograms without labels (`name_bucket{le="x"} value` lines);
/// comments and other labelled series are skipped.
fn parse_exposition(text: &str) -> Scrape {
    let mut out = Scrape::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // `name{labels} value [timestamp]` or `name value [timestamp]`.
        let (head, rest) = match line.split_once('}') {
            Some(split) => split,
            None => match line.split_once(char::is_whitespace) {
                Some(split) => split,
                None => continue,
            },
        };
        let (series, labels) = match head.split_once('{') {
            Some((name, labels)) => (name, Some(labels)),
            None => (head, None),
        };
        let Some(Ok(value)) = rest.split_whitespace().next().map(str::parse::<f64>) else {
            continue;
        };
        match labels {
            None => {
                out.values.insert(series.to_owned(), value);
            }
            Some(labels) => {
                let le = labels
                    .strip_prefix("le=\"")
                    .and_then(|l| l.strip_suffix('"'))
                    .and_then(parse_le);
                if let (Some(name), Some(le)) = (series.strip_suffix("_bucket"), le) {
                    out.buckets
                        .entry(name.to_owned())
                        .or_default()
                        .push((le, value));
                }
            }
        }
    }
    out
}

/// A bucket's `le` label value (`+Inf` or a number).
fn parse_le(le: &str) -> Option<f64> {
    match le {
        "+Inf" => Some(f64::INFINITY),
        _ => le.parse().ok().filter(|v: &f64| v.is_finite()),
    }
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
        let m = parse_exposition(text).values;
        assert_eq!(m.get("parley_node_logins_total"), Some(&12.0));
        assert_eq!(m.get("parley_node_connections"), Some(&3.0));
        assert_eq!(m.len(), 2, "{m:?}");
    }

    /// A node histogram of `counts` per bucket (not cumulative) with bounds 0.001, 0.002,
    /// 0.004 s and +Inf, as the exposition writes it.
    fn exposition(counts: [u64; 4]) -> String {
        let mut text = String::from(
            "# TYPE parley_node_x_seconds histogram\n\
             parley_x_seconds_bucket{le=\"0.001\",shard=\"0\"} 999\n",
        );
        let mut cum = 0;
        for (le, n) in ["0.001", "0.002", "0.004", "+Inf"].iter().zip(counts) {
            cum += n;
            text.push_str(&format!(
                "parley_node_x_seconds_bucket{{le=\"{le}\"}} {cum}\n"
            ));
        }
        text.push_str(&format!("parley_node_x_seconds_count {cum}\n"));
        text
    }

    #[test]
    fn node_histogram_buckets_are_read_and_labelled_series_skipped() {
        let s = parse_exposition(&exposition([1, 2, 3, 4]));
        assert_eq!(
            s.buckets.get("parley_node_x_seconds"),
            Some(&vec![
                (0.001, 1.0),
                (0.002, 3.0),
                (0.004, 6.0),
                (f64::INFINITY, 10.0)
            ])
        );
        assert_eq!(s.buckets.len(), 1, "the shard's series is skipped");
        assert_eq!(s.get("parley_node_x_seconds_count"), 10.0);
    }

    #[test]
    fn interval_quantiles_come_from_the_bucket_differences_of_two_scrapes() {
        let before = parse_exposition(&exposition([10, 0, 0, 0]));
        // Since then: 4 values in (2, 4] ms and nothing else.
        let now = parse_exposition(&exposition([10, 0, 4, 0]));
        let q = |q, b| now.quantile_ms("parley_node_x_seconds", q, b);
        assert_eq!(
            q(0.5, Some(&before)),
            Some(3.0),
            "interpolated in (2, 4] ms"
        );
        assert_eq!(q(0.99, Some(&before)).map(|v| v > 3.9), Some(true));
        // Since start, the ten values of (0, 1] ms are the median.
        assert_eq!(q(0.5, None).map(|v| v <= 1.0), Some(true));
        assert_eq!(
            now.quantile_ms("parley_node_x_seconds", 0.5, Some(&now)),
            None
        );
        assert_eq!(now.quantile_ms("parley_node_y_seconds", 0.5, None), None);
        // Past the last finite bound: that bound.
        let inf = parse_exposition(&exposition([0, 0, 0, 5]));
        assert_eq!(
            inf.quantile_ms("parley_node_x_seconds", 0.99, None),
            Some(4.0)
        );
    }
}
