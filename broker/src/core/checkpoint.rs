//! The owner's start-up checkpoint: what a restart needs to serve again (conversations, de-dup
//! windows, the largest message id) without reading the whole log.
//!
//! The owner writes one through the log ([`parley_storage::Log::write_checkpoint`]) every
//! `storage.checkpoint_every_bytes` of appended log and at a clean stop, saying it covers
//! everything below the durable LSN. It may also hold state of records above that LSN (appended,
//! not yet durable); loading is safe anyway: de-dup entries at or beyond the recovered end of the
//! log are dropped (a crash lost those records), `last_seq` comes from the log's own index, and the
//! records from the checkpoint's LSN on are replayed over it (inserting an entry twice is a no-op).
//! So start-up reads a bounded tail of the log, after a clean stop and after a crash alike.
//!
//! Layout (little endian): `"PCK1"`, max message id `u64`, conversation count `u32`, then per
//! conversation: id `u64`, key (`u16` length + UTF-8), device count `u32`, then per device: user
//! and device (`u16` length + UTF-8 each), entry count `u32`, entries oldest first as (client
//! message id, message id, seq, server time, LSN), `u64` each. Anything that does not parse is
//! ignored as a whole (start-up then reads the whole log).

use parley_storage::Lsn;

use super::owner::Remembered;

const MAGIC: &[u8; 4] = b"PCK1";

/// One device's remembered sends in one conversation, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeviceWindow {
    pub(crate) user: String,
    pub(crate) device: String,
    pub(crate) entries: Vec<(u64, Remembered)>,
}

/// One conversation in a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConvEntry {
    pub(crate) id: u64,
    pub(crate) key: String,
    pub(crate) devices: Vec<DeviceWindow>,
}

/// A decoded checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Checkpoint {
    pub(crate) max_msg_id: u64,
    pub(crate) convs: Vec<ConvEntry>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = s.len().min(u16::MAX as usize);
    out.extend_from_slice(&(len as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..len]);
}

impl Checkpoint {
    /// The bytes of this checkpoint.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.max_msg_id.to_le_bytes());
        out.extend_from_slice(&(self.convs.len() as u32).to_le_bytes());
        for c in &self.convs {
            out.extend_from_slice(&c.id.to_le_bytes());
            put_str(&mut out, &c.key);
            out.extend_from_slice(&(c.devices.len() as u32).to_le_bytes());
            for d in &c.devices {
                put_str(&mut out, &d.user);
                put_str(&mut out, &d.device);
                out.extend_from_slice(&(d.entries.len() as u32).to_le_bytes());
                for (cmid, r) in &d.entries {
                    for v in [*cmid, r.msg_id, r.seq, r.server_time as u64, r.lsn.0] {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                }
            }
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
        let mut convs = Vec::new();
        for _ in 0..n {
            let id = r.u64()?;
            let key = r.string()?;
            let nd = r.u32()?;
            let mut devices = Vec::new();
            for _ in 0..nd {
                let user = r.string()?;
                let device = r.string()?;
                let ne = r.u32()?;
                // Each entry takes 40 bytes: a count larger than what is left is a lie.
                if (ne as usize).checked_mul(40)? > r.0.len() {
                    return None;
                }
                let mut entries = Vec::with_capacity(ne as usize);
                for _ in 0..ne {
                    let cmid = r.u64()?;
                    let msg_id = r.u64()?;
                    let seq = r.u64()?;
                    let server_time = r.u64()? as i64;
                    let lsn = Lsn(r.u64()?);
                    entries.push((
                        cmid,
                        Remembered {
                            msg_id,
                            seq,
                            server_time,
                            lsn,
                        },
                    ));
                }
                devices.push(DeviceWindow {
                    user,
                    device,
                    entries,
                });
            }
            convs.push(ConvEntry { id, key, devices });
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

    fn string(&mut self) -> Option<String> {
        let len = u16::from_le_bytes(self.take(2)?.try_into().ok()?);
        String::from_utf8(self.take(len as usize)?.to_vec()).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            max_msg_id: 77,
            convs: vec![ConvEntry {
                id: 9,
                key: "d5:alicebob".into(),
                devices: vec![DeviceWindow {
                    user: "alice".into(),
                    device: "phone".into(),
                    entries: vec![(
                        3,
                        Remembered {
                            msg_id: 70,
                            seq: 1,
                            server_time: -1,
                            lsn: Lsn(64),
                        },
                    )],
                }],
            }],
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
    fn a_huge_entry_count_is_refused_without_allocating_it() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&0u64.to_le_bytes());
        bytes.extend_from_slice(&1u32.to_le_bytes());
        bytes.extend_from_slice(&1u64.to_le_bytes());
        put_str(&mut bytes, "k");
        bytes.extend_from_slice(&1u32.to_le_bytes());
        put_str(&mut bytes, "u");
        put_str(&mut bytes, "d");
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(Checkpoint::decode(&bytes), None);
    }
}
