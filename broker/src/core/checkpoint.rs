//! The owner's start-up checkpoint: what a restart needs beyond the log's own index to serve
//! again — the conversations this shard owns (so every member's home learns of them) and the
//! largest message id — without reading the whole log.
//!
//! The owner writes one through the log ([`parley_storage::Log::write_checkpoint`]) every
//! `storage.checkpoint_every_bytes` of appended log and at a clean stop, saying it covers
//! everything below the durable LSN. Start-up loads it, then replays the log from
//! `storage.checkpoint_every_bytes` *before* that LSN: the replay rebuilds the de-dup windows of
//! recent sends (a client retries what it sent shortly before a restart; the window across a
//! restart is therefore at least that much log) and adds what came after the checkpoint. Every
//! step is idempotent, so a checkpoint that also reflects records above its LSN (appended, not
//! yet durable when it was written) is harmless: conversations are keyed by their stable id,
//! `last_seq` comes from the log's index, and ids only ever move up. So start-up reads a bounded
//! tail of the log, after a clean stop and after a crash alike, and the checkpoint grows with the
//! number of conversations, not with the log.
//!
//! Layout (little endian): `"PCK2"`, max message id `u64`, conversation count `u32`, then per
//! conversation: id `u64`, key (`u16` length + UTF-8). Anything that does not parse is ignored
//! as a whole (start-up then reads the whole log).

const MAGIC: &[u8; 4] = b"PCK2";

/// A decoded checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Checkpoint {
    pub(crate) max_msg_id: u64,
    /// Conversation ids and keys.
    pub(crate) convs: Vec<(u64, String)>,
}

impl Checkpoint {
    /// The bytes of this checkpoint.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.convs.len() * 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.max_msg_id.to_le_bytes());
        out.extend_from_slice(&(self.convs.len() as u32).to_le_bytes());
        for (id, key) in &self.convs {
            out.extend_from_slice(&id.to_le_bytes());
            let len = key.len().min(u16::MAX as usize);
            out.extend_from_slice(&(len as u16).to_le_bytes());
            out.extend_from_slice(&key.as_bytes()[..len]);
        }
        out
    }

    /// Reads a checkpoint; `None` if the bytes are not one (never panics on bad input).
    pub(crate) fn decode(bytes: &[u8]) -> Option<Checkpoint> {
        let mut r = Reader(bytes);
        if r.take(4)? != MAGIC {
            return None;
        }
        let max_msg_id = r.u64()?;
        let n = r.u32()?;
        // Each entry takes at least 10 bytes: a count larger than what is left is a lie.
        if (n as usize).checked_mul(10)? > r.0.len() {
            return None;
        }
        let mut convs = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let id = r.u64()?;
            let len = u16::from_le_bytes(r.take(2)?.try_into().ok()?);
            let key = String::from_utf8(r.take(len as usize)?.to_vec()).ok()?;
            convs.push((id, key));
        }
        r.0.is_empty().then_some(Checkpoint { max_msg_id, convs })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            max_msg_id: 77,
            convs: vec![(9, "d5:alicebob".into()), (10, "d1:ab".into())],
        }
    }

    #[test]
    fn a_checkpoint_reads_back_as_written() {
        let cp = sample();
        assert_eq!(Checkpoint::decode(&cp.encode()), Some(cp));
        assert_eq!(
            Checkpoint::decode(&Checkpoint::default().encode()),
            Some(Checkpoint::default())
        );
    }

    #[test]
    fn every_truncation_and_any_trailing_byte_is_refused() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            assert_eq!(Checkpoint::decode(&bytes[..cut]), None, "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(Checkpoint::decode(&longer), None);
    }

    #[test]
    fn a_huge_count_is_refused_without_allocating_it() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&0u64.to_le_bytes());
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Checkpoint::decode(&bytes), None);
    }
}
