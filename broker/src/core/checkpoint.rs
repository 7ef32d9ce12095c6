//! The owner's start-up checkpoint: what a restart needs beyond the log's own index to serve
//! again — the conversations this shard owns (so every member's home learns of them), the newest
//! [`ENTRIES_PER_DEVICE`] remembered sends of each device in each (so a client's retry of an
//! unacknowledged send after a restart is still answered from the de-dup window, however old the
//! send) and the largest message id — without reading the whole log.
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
//! A group's members and settings ([`GroupEntry`]) are in it too, with the seq of the newest
//! event they reflect: the replay applies only later events. If that seq is above the log's
//! last seq of the group (the checkpoint reflected an event a crash then lost), start-up
//! rebuilds that one group from its events in the log instead. So are the cursors of the users
//! whose home is this shard ([`CursorEntry`]: read, delivered, peer-read); the replay of cursor
//! records moves them on (cursors only move forward, so replaying is idempotent).
//!
//! Layout (little endian): `"PCK4"`, max message id `u64`, conversation count `u32`, then per
//! conversation: id `u64`, key (`u16` length + UTF-8), last message time `i64`, device count
//! `u32`, then per device: user and device (`u16` length + UTF-8 each), entry count `u32`,
//! entries oldest first as (client message id, message id, seq, server time, LSN), `u64` each;
//! then a group flag `u8`, and for a group: name, open `u8`, applied seq `u64`, dissolved seq
//! `u64` (0: live), member count `u32`, members as (user, role `u8`, joined seq `u64`), former
//! member count `u32`, former members as (user, joined seq `u64`, left seq `u64`). After the
//! conversations: cursor count `u32`, then per user and conversation: user, conversation key,
//! read, delivered and peer-read seqs (`u64` each). `"PCK3"` (before groups) has no last time,
//! group flag or cursors, and is still read. Entries at or beyond the log's recovered end are
//! dropped at load (a crash lost those records). Anything that does not parse is ignored as a
//! whole (start-up then reads the whole log).

use parley_storage::Lsn;

use super::owner::Remembered;

const MAGIC: &[u8; 4] = b"PCK4";
/// The layout before groups (no group flag), still read.
const MAGIC_V3: &[u8; 4] = b"PCK3";

/// Sends remembered per device and conversation in a checkpoint: the newest, enough for a
/// client's outbox of unacknowledged sends (each entry takes 40 bytes).
pub(crate) const ENTRIES_PER_DEVICE: usize = 64;

/// One device's newest remembered sends in one conversation, oldest first.
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
    /// When its newest message was stored (ms since the Unix epoch).
    pub(crate) last_time: i64,
    pub(crate) devices: Vec<DeviceWindow>,
    pub(crate) group: Option<GroupEntry>,
}

/// A group's state in a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct GroupEntry {
    pub(crate) name: String,
    pub(crate) open: bool,
    /// The seq of the newest event reflected.
    pub(crate) applied: u64,
    /// The seq of the event that dissolved it (0: live).
    pub(crate) dissolved: u64,
    /// Members: user, role (as [`super::group::Role::to_byte`]), joined seq.
    pub(crate) members: Vec<(String, u8, u64)>,
    /// Former members: user, joined seq, left seq.
    pub(crate) former: Vec<(String, u64, u64)>,
}

/// A user's cursors in one conversation (see [`super::home::Cursors`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct CursorEntry {
    pub(crate) user: String,
    /// The conversation's key.
    pub(crate) key: String,
    pub(crate) read: u64,
    pub(crate) delivered: u64,
    pub(crate) peer_read: u64,
}

impl CursorEntry {
    /// Appends this entry's bytes (also the payload of a cursor record in the log).
    pub(crate) fn put(&self, out: &mut Vec<u8>) {
        put_str(out, &self.user);
        put_str(out, &self.key);
        for v in [self.read, self.delivered, self.peer_read] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// An entry from `bytes` as [`CursorEntry::put`] wrote them, nothing left over.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<CursorEntry> {
        let mut r = Reader(bytes);
        let e = read_cursor(&mut r)?;
        r.0.is_empty().then_some(e)
    }
}

fn read_cursor(r: &mut Reader<'_>) -> Option<CursorEntry> {
    Some(CursorEntry {
        user: r.string()?,
        key: r.string()?,
        read: r.u64()?,
        delivered: r.u64()?,
        peer_read: r.u64()?,
    })
}

/// A decoded checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Checkpoint {
    pub(crate) max_msg_id: u64,
    pub(crate) convs: Vec<ConvEntry>,
    /// The cursors of the users whose home is this shard.
    pub(crate) cursors: Vec<CursorEntry>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let len = s.len().min(u16::MAX as usize);
    out.extend_from_slice(&(len as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..len]);
}

impl Checkpoint {
    /// The bytes of this checkpoint.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.convs.len() * 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.max_msg_id.to_le_bytes());
        out.extend_from_slice(&(self.convs.len() as u32).to_le_bytes());
        for c in &self.convs {
            out.extend_from_slice(&c.id.to_le_bytes());
            put_str(&mut out, &c.key);
            out.extend_from_slice(&c.last_time.to_le_bytes());
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
            match &c.group {
                None => out.push(0),
                Some(g) => {
                    out.push(1);
                    put_str(&mut out, &g.name);
                    out.push(u8::from(g.open));
                    out.extend_from_slice(&g.applied.to_le_bytes());
                    out.extend_from_slice(&g.dissolved.to_le_bytes());
                    out.extend_from_slice(&(g.members.len() as u32).to_le_bytes());
                    for (user, role, joined) in &g.members {
                        put_str(&mut out, user);
                        out.push(*role);
                        out.extend_from_slice(&joined.to_le_bytes());
                    }
                    out.extend_from_slice(&(g.former.len() as u32).to_le_bytes());
                    for (user, joined, left) in &g.former {
                        put_str(&mut out, user);
                        out.extend_from_slice(&joined.to_le_bytes());
                        out.extend_from_slice(&left.to_le_bytes());
                    }
                }
            }
        }
        out.extend_from_slice(&(self.cursors.len() as u32).to_le_bytes());
        for c in &self.cursors {
            c.put(&mut out);
        }
        out
    }

    /// Reads a checkpoint; `None` if the bytes are not one (never panics on bad input).
    pub(crate) fn decode(bytes: &[u8]) -> Option<Checkpoint> {
        let mut r = Reader(bytes);
        let has_groups = match r.take(4)? {
            m if m == MAGIC => true,
            m if m == MAGIC_V3 => false,
            _ => return None,
        };
        let max_msg_id = r.u64()?;
        let n = r.u32()?;
        // Each entry takes at least 14 bytes: a count larger than what is left is a lie.
        if (n as usize).checked_mul(14)? > r.0.len() {
            return None;
        }
        let mut convs = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let id = r.u64()?;
            let key = r.string()?;
            let last_time = if has_groups { r.u64()? as i64 } else { 0 };
            let nd = r.u32()?;
            if (nd as usize).checked_mul(8)? > r.0.len() {
                return None;
            }
            let mut devices = Vec::with_capacity(nd as usize);
            for _ in 0..nd {
                let user = r.string()?;
                let device = r.string()?;
                let ne = r.u32()?;
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
            let group = if has_groups && r.u8()? == 1 {
                Some(read_group(&mut r)?)
            } else {
                None
            };
            convs.push(ConvEntry {
                id,
                key,
                last_time,
                devices,
                group,
            });
        }
        let mut cursors = Vec::new();
        if has_groups {
            let n = r.u32()?;
            // An entry takes at least 28 bytes.
            if (n as usize).checked_mul(28)? > r.0.len() {
                return None;
            }
            cursors.reserve(n as usize);
            for _ in 0..n {
                cursors.push(read_cursor(&mut r)?);
            }
        }
        r.0.is_empty().then_some(Checkpoint {
            max_msg_id,
            convs,
            cursors,
        })
    }
}

/// A group's state, after its flag.
fn read_group(r: &mut Reader<'_>) -> Option<GroupEntry> {
    let name = r.string()?;
    let open = r.u8()? != 0;
    let applied = r.u64()?;
    let dissolved = r.u64()?;
    let n = r.u32()?;
    // A member takes at least 11 bytes, a former member 18: a larger count is a lie.
    if (n as usize).checked_mul(11)? > r.0.len() {
        return None;
    }
    let mut members = Vec::with_capacity(n as usize);
    for _ in 0..n {
        members.push((r.string()?, r.u8()?, r.u64()?));
    }
    let n = r.u32()?;
    if (n as usize).checked_mul(18)? > r.0.len() {
        return None;
    }
    let mut former = Vec::with_capacity(n as usize);
    for _ in 0..n {
        former.push((r.string()?, r.u64()?, r.u64()?));
    }
    Some(GroupEntry {
        name,
        open,
        applied,
        dissolved,
        members,
        former,
    })
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

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
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
            convs: vec![
                ConvEntry {
                    id: 9,
                    key: "d5:alicebob".into(),
                    last_time: 1_700_000_000_000,
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
                    group: None,
                },
                ConvEntry {
                    id: 10,
                    key: "d1:ab".into(),
                    last_time: 0,
                    devices: Vec::new(),
                    group: None,
                },
                ConvEntry {
                    id: 11,
                    key: "g:team".into(),
                    last_time: -5,
                    devices: Vec::new(),
                    group: Some(GroupEntry {
                        name: "the team".into(),
                        open: true,
                        applied: 7,
                        dissolved: 0,
                        members: vec![("alice".into(), 2, 1), ("bob".into(), 0, 4)],
                        former: vec![("carol".into(), 1, 6)],
                    }),
                },
            ],
            cursors: vec![CursorEntry {
                user: "bob".into(),
                key: "g:team".into(),
                read: 5,
                delivered: 6,
                peer_read: 0,
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
    fn a_checkpoint_from_before_groups_still_reads() {
        let mut old = Vec::new();
        old.extend_from_slice(MAGIC_V3);
        old.extend_from_slice(&5u64.to_le_bytes());
        old.extend_from_slice(&1u32.to_le_bytes());
        old.extend_from_slice(&10u64.to_le_bytes());
        put_str(&mut old, "d1:ab");
        old.extend_from_slice(&0u32.to_le_bytes());
        let expected = Checkpoint {
            max_msg_id: 5,
            convs: vec![ConvEntry {
                id: 10,
                key: "d1:ab".into(),
                last_time: 0,
                devices: Vec::new(),
                group: None,
            }],
            cursors: Vec::new(),
        };
        assert_eq!(Checkpoint::decode(&old), Some(expected));
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
