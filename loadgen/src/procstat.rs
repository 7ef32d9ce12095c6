//! CPU time and resident memory of another process (the broker), from `/proc/<pid>/stat` and
//! `/proc/<pid>/status`.

use serde::{Deserialize, Serialize};

/// One reading of a process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// User plus system CPU time so far, seconds.
    pub cpu_s: f64,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// The anonymous part of it (heap and stacks, not mapped files such as a log), bytes; 0 if
    /// the kernel does not report it.
    #[serde(default)]
    pub anon_bytes: u64,
}

/// Clock ticks per second of `/proc/<pid>/stat` times: the kernel reports them in USER_HZ,
/// which is 100 on every Linux ABI (independent of the kernel's internal tick rate).
const USER_HZ: f64 = 100.0;

/// Reads process `pid` now.
///
/// # Errors
///
/// The process is gone or its `/proc` files do not parse.
pub fn sample(pid: u32) -> Result<Sample, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("cannot read /proc/{pid}/stat: {e}"))?;
    // The command name (field 2) is in parentheses and may hold spaces: split after the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| format!("/proc/{pid}/stat does not parse"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15 (1-based).
    let field = |n: usize| -> Result<u64, String> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("/proc/{pid}/stat field {n} does not parse"))
    };
    let ticks = field(14)? + field(15)?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read /proc/{pid}/status: {e}"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| format!("/proc/{pid}/status has no VmRSS"))?;
    let anon_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    Ok(Sample {
        cpu_s: ticks as f64 / USER_HZ,
        rss_bytes: rss_kib * 1024,
        anon_bytes: anon_kib * 1024,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_memory_and_cpu_time() {
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let s = sample(std::process::id()).expect("readable");
        assert!(s.rss_bytes > 0);
        assert!(s.cpu_s >= 0.0);
    }

    #[test]
    fn a_missing_process_is_an_error() {
        assert!(sample(u32::MAX).is_err());
    }
}
