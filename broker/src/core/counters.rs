//! What a shard counts: plain integers in the core, read as a snapshot by the driver (the admin
//! and metrics endpoint reads these).

/// A shard's counters. Totals since start unless noted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Connections open now (a gauge).
    pub connections: u64,
    /// Connections accepted or adopted.
    pub connections_opened: u64,
    /// Successful logins.
    pub logins: u64,
    /// Logins refused.
    pub logins_refused: u64,
    /// Frames decoded from clients.
    pub frames_in: u64,
    /// Frames written to clients.
    pub frames_out: u64,
    /// Bytes received from clients.
    pub bytes_in: u64,
    /// Bytes queued to clients.
    pub bytes_out: u64,
    /// Messages stored (appended) by this shard as owner.
    pub messages_stored: u64,
    /// Retried sends answered from the de-dup window.
    pub retries_deduplicated: u64,
    /// Live deliveries written.
    pub deliveries: u64,
    /// Messages re-sent by retransmit deadlines.
    pub retransmits: u64,
    /// Connections told they are `Behind`.
    pub behinds: u64,
    /// Syncs started.
    pub syncs: u64,
    /// Group-commit flushes completed.
    pub flushes: u64,
    /// Sum of flush latencies, ms.
    pub flush_ms_total: u64,
    /// Largest flush latency, ms.
    pub flush_ms_max: u64,
    /// Start-up checkpoints written.
    pub checkpoints: u64,
}

impl Counters {
    /// Adds `other` into `self` (for node totals; the gauge adds too).
    pub fn add(&mut self, other: &Counters) {
        self.connections += other.connections;
        self.connections_opened += other.connections_opened;
        self.logins += other.logins;
        self.logins_refused += other.logins_refused;
        self.frames_in += other.frames_in;
        self.frames_out += other.frames_out;
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        self.messages_stored += other.messages_stored;
        self.retries_deduplicated += other.retries_deduplicated;
        self.deliveries += other.deliveries;
        self.retransmits += other.retransmits;
        self.behinds += other.behinds;
        self.syncs += other.syncs;
        self.flushes += other.flushes;
        self.flush_ms_total += other.flush_ms_total;
        self.flush_ms_max = self.flush_ms_max.max(other.flush_ms_max);
        self.checkpoints += other.checkpoints;
    }
}
