//! Who may connect: the node-wide connection limits, applied by every shard at accept.
//!
//! * **Connections**: at most [`Admission::max_connections`] at once: `limits.max_connections`,
//!   or fewer if the process's open-file limit is lower (minus [`RESERVED_FDS`] for the node's
//!   own files: logs, indexes, pollers, wakers, listeners). [`effective_max_connections`] first
//!   raises the soft open-file limit to the hard one. Past the limit a connection is still
//!   accepted (that takes one descriptor of the reserve, briefly), told TOO_MANY_CONNECTIONS and
//!   closed at once, so a client never hangs in the backlog and the node never spins on
//!   `EMFILE`.
//! * **Unauthenticated connections**: at most `limits.max_unauthenticated` node-wide and
//!   `limits.max_unauthenticated_per_source` per source address, so a flood of anonymous
//!   sockets cannot take every slot: the next ones are refused the same way. A connection holds
//!   its anonymous slot ([`AnonSlot`]) from accept until it logs in or closes.
//!
//! A connection counts from accept until its descriptor is closed, lingering close included,
//! so the limit bounds descriptors, not just sessions. The counters are shared by the shards;
//! the per-source table is behind one mutex, taken twice per connection (accept, then login or
//! close), never per frame.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::Limits;
use crate::core::ConnLimit;

/// Descriptors kept for the node's own files, per shard (its log's segments and index files,
/// its poller and waker, its listeners, its flusher).
pub(crate) const RESERVED_FDS_PER_SHARD: u64 = 16;
/// Descriptors kept for the node's own files besides the shards' (stdio, the secret, the
/// data dir, a refused connection's brief descriptor).
pub(crate) const RESERVED_FDS: u64 = 64;

/// The connection limit the node can keep: `limits.max_connections`, lowered to the open-file
/// limit minus the reserve. Returns it, and the open-file limit if that lowered it.
pub(crate) fn effective_max_connections(setting: usize, shards: usize) -> (usize, Option<u64>) {
    let Some(files) = raise_open_file_limit() else {
        return (setting, None);
    };
    let reserve = RESERVED_FDS + RESERVED_FDS_PER_SHARD * shards as u64;
    let room = usize::try_from(files.saturating_sub(reserve))
        .unwrap_or(usize::MAX)
        .max(1);
    if room < setting {
        (room, Some(files))
    } else {
        (setting, None)
    }
}

/// Raises the soft open-file limit to the hard one (as far as the kernel lets it); returns the
/// soft limit in force, or `None` if it is unlimited or unknown.
fn raise_open_file_limit() -> Option<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            limit = getrlimit(Resource::Nofile);
        }
    }
    limit.current
}

/// A connection's hold on an anonymous slot (its source address), until it logs in or closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AnonSlot(pub(crate) IpAddr);

/// What [`Admission::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Serve it; it holds this anonymous slot until it logs in or closes.
    Admit(AnonSlot),
    /// Refuse it (TOO_MANY_CONNECTIONS), naming the limit it hit.
    Refuse(ConnLimit),
}

#[derive(Debug, Default)]
struct AnonTable {
    total: usize,
    per_source: HashMap<IpAddr, u32>,
}

/// The node-wide connection limits (see the module documentation).
#[derive(Debug)]
pub(crate) struct Admission {
    max_connections: usize,
    max_anon: usize,
    max_anon_per_source: usize,
    connections: AtomicUsize,
    anon: Mutex<AnonTable>,
}

impl Admission {
    /// Limits from the settings, with the connection limit already made effective.
    pub(crate) fn new(limits: &Limits, max_connections: usize) -> Self {
        Admission {
            max_connections,
            max_anon: limits.max_unauthenticated.min(max_connections).max(1),
            max_anon_per_source: limits.max_unauthenticated_per_source.max(1),
            connections: AtomicUsize::new(0),
            anon: Mutex::new(AnonTable::default()),
        }
    }

    /// The connection limit in force.
    pub(crate) fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// A connection from `source` was accepted: counts it, and decides whether it is served.
    /// Every accepted connection must be [`Admission::closed`] once, whatever the verdict.
    pub(crate) fn admit(&self, source: IpAddr) -> Verdict {
        if self.connections.fetch_add(1, Ordering::Relaxed) >= self.max_connections {
            return Verdict::Refuse(ConnLimit::Connections);
        }
        let Ok(mut anon) = self.anon.lock() else {
            return Verdict::Refuse(ConnLimit::Unauthenticated);
        };
        if anon.total >= self.max_anon {
            return Verdict::Refuse(ConnLimit::Unauthenticated);
        }
        let from_source = anon.per_source.entry(source).or_insert(0);
        if *from_source as usize >= self.max_anon_per_source {
            return Verdict::Refuse(ConnLimit::PerSource);
        }
        *from_source += 1;
        anon.total += 1;
        Verdict::Admit(AnonSlot(source))
    }

    /// The connection holding `slot` logged in or closed: its anonymous slot is free.
    pub(crate) fn release(&self, slot: AnonSlot) {
        let Ok(mut anon) = self.anon.lock() else {
            return;
        };
        anon.total = anon.total.saturating_sub(1);
        if let Some(n) = anon.per_source.get_mut(&slot.0) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                anon.per_source.remove(&slot.0);
            }
        }
    }

    /// An accepted connection's socket is gone.
    pub(crate) fn closed(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(anon: usize, per_source: usize) -> Limits {
        Limits {
            max_unauthenticated: anon,
            max_unauthenticated_per_source: per_source,
            ..Limits::default()
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn past_the_connection_limit_connections_are_refused() {
        let a = Admission::new(&limits(100, 100), 2);
        for source in [1, 2] {
            let Verdict::Admit(slot) = a.admit(ip(source)) else {
                panic!("admitted")
            };
            // It logs in.
            a.release(slot);
        }
        assert_eq!(a.admit(ip(3)), Verdict::Refuse(ConnLimit::Connections));
        // The refused one and one of the others close.
        a.closed();
        a.closed();
        assert!(matches!(a.admit(ip(3)), Verdict::Admit(_)), "room again");
    }

    #[test]
    fn one_source_cannot_take_more_than_its_anonymous_share() {
        let a = Admission::new(&limits(100, 2), 1000);
        let first = a.admit(ip(1));
        assert!(matches!(a.admit(ip(1)), Verdict::Admit(_)));
        assert_eq!(a.admit(ip(1)), Verdict::Refuse(ConnLimit::PerSource));
        assert!(
            matches!(a.admit(ip(2)), Verdict::Admit(_)),
            "another source is served"
        );
        let Verdict::Admit(slot) = first else {
            panic!("admitted")
        };
        a.release(slot);
        assert!(
            matches!(a.admit(ip(1)), Verdict::Admit(_)),
            "a login frees the slot"
        );
    }

    #[test]
    fn anonymous_connections_are_bounded_node_wide() {
        let a = Admission::new(&limits(2, 100), 1000);
        assert!(matches!(a.admit(ip(1)), Verdict::Admit(_)));
        assert!(matches!(a.admit(ip(2)), Verdict::Admit(_)));
        assert_eq!(a.admit(ip(3)), Verdict::Refuse(ConnLimit::Unauthenticated));
    }

    #[test]
    fn the_effective_limit_never_exceeds_the_setting() {
        let (max, _) = effective_max_connections(10, 2);
        assert!(max <= 10);
    }
}
