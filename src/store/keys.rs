//! Encoding and decoding of keys and of the small fixed-layout values.
//! Everything read from disk is checked: a short or unknown value is a
//! [`StoreError::Corrupt`], never a panic.

use super::StoreError;

/// `user ‖ 0x00`: the prefix of all of one user's keys in a column family.
pub fn user_prefix(user: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(user.len() + 9);
    k.extend_from_slice(user.as_bytes());
    k.push(0);
    k
}

/// `user ‖ 0x00 ‖ seq`.
pub fn inbox_key(user: &str, seq: u64) -> Vec<u8> {
    let mut k = user_prefix(user);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// `user ‖ 0x00 ‖ name`, for dedup (name = client_msg_id) and cursors (name = device).
pub fn user_named_key(user: &str, name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(user.len() + 1 + name.len());
    k.extend_from_slice(user.as_bytes());
    k.push(0);
    k.extend_from_slice(name.as_bytes());
    k
}

/// The seq at the end of an inbox key that starts with `prefix`.
pub fn seq_of_inbox_key(prefix: &[u8], key: &[u8]) -> Result<u64, StoreError> {
    key.strip_prefix(prefix)
        .and_then(|rest| <[u8; 8]>::try_from(rest).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::Corrupt(format!("inbox key of {} bytes", key.len())))
}

/// A big-endian u64 value (cursors).
pub fn decode_u64(v: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(v)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt(format!("u64 value of {} bytes", v.len())))
}

/// In [`super::cf::META`]: `inbox_epoch` → `epoch: u64 BE`, the inbox epoch
/// (see [`super::Store::inbox_epoch`]).
pub const META_INBOX_EPOCH: &[u8] = b"inbox_epoch";
/// In [`super::cf::META`]: `run` → one byte, [`RunState`]: how the last run
/// of the server on this database ended, or that it is still running.
pub const META_RUN: &[u8] = b"run";

/// The value of [`META_RUN`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Written (and synced) by a graceful shutdown after its last commit:
    /// everything the run wrote is on disk.
    Clean = 0,
    /// Written at open by a run whose commits return before the WAL is
    /// synced (`--wal-sync off` or `interval`): still there at the next
    /// open, the run ended without a clean shutdown, and its last commits
    /// may have been lost with the OS page cache.
    Running = 1,
    /// Written at open by a run that syncs the WAL before every commit
    /// returns (`--wal-sync always`): even after a crash, whatever the run
    /// acknowledged or pushed is on disk.
    RunningSynced = 2,
}

impl RunState {
    pub fn decode(v: &[u8]) -> Result<Self, StoreError> {
        match v {
            [0] => Ok(RunState::Clean),
            [1] => Ok(RunState::Running),
            [2] => Ok(RunState::RunningSynced),
            _ => Err(StoreError::Corrupt(format!("run state {v:?}"))),
        }
    }

    pub fn encode(self) -> [u8; 1] {
        [self as u8]
    }
}

/// What one inbox slot holds. The first byte is the kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboxEntry {
    /// A reference to a message in the `messages` column family: a message
    /// is stored once however many inboxes hold it.
    Message(u64),
    /// A small event stored in the slot itself (group change, receipt): an
    /// encoded `pb::Event` whose seq is filled in when read.
    Inline(Vec<u8>),
}

const KIND_MESSAGE: u8 = 1;
const KIND_INLINE: u8 = 2;

impl InboxEntry {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            InboxEntry::Message(id) => {
                let mut v = Vec::with_capacity(9);
                v.push(KIND_MESSAGE);
                v.extend_from_slice(&id.to_be_bytes());
                v
            }
            InboxEntry::Inline(event) => {
                let mut v = Vec::with_capacity(1 + event.len());
                v.push(KIND_INLINE);
                v.extend_from_slice(event);
                v
            }
        }
    }

    pub fn decode(v: &[u8]) -> Result<Self, StoreError> {
        match v.split_first() {
            Some((&KIND_MESSAGE, rest)) => Ok(InboxEntry::Message(decode_u64(rest)?)),
            Some((&KIND_INLINE, rest)) => Ok(InboxEntry::Inline(rest.to_vec())),
            _ => Err(StoreError::Corrupt("unknown inbox entry".into())),
        }
    }
}

/// The key of a conversation in the `status` column family.
pub fn direct_conversation(a: &str, b: &str) -> Vec<u8> {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut k = Vec::with_capacity(2 + lo.len() + hi.len());
    k.push(b'u');
    k.extend_from_slice(lo.as_bytes());
    k.push(b'|');
    k.extend_from_slice(hi.as_bytes());
    k
}

/// The key of a group conversation in the `status` column family.
pub fn group_conversation(group: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(b'g');
    k.extend_from_slice(&group.to_be_bytes());
    k
}

/// The key of the conversation a message belongs to: group `group_id`'s,
/// or when that is 0, the 1:1 chat of `a` and `b` (in either order).
pub fn conversation_of(group_id: u64, a: &str, b: &str) -> Vec<u8> {
    if group_id != 0 {
        group_conversation(group_id)
    } else {
        direct_conversation(a, b)
    }
}

/// `conversation ‖ 0x00 ‖ user`.
pub fn status_key(conversation: &[u8], user: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(conversation.len() + 1 + user.len());
    k.extend_from_slice(conversation);
    k.push(0);
    k.extend_from_slice(user.as_bytes());
    k
}

/// `a: u64 BE ‖ b: u64 BE`.
pub fn u64_pair(a: u64, b: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&a.to_be_bytes());
    k[8..].copy_from_slice(&b.to_be_bytes());
    k
}

/// Inverse of [`u64_pair`].
pub fn decode_u64_pair(v: &[u8]) -> Result<(u64, u64), StoreError> {
    if v.len() != 16 {
        return Err(StoreError::Corrupt(format!(
            "pair value of {} bytes",
            v.len()
        )));
    }
    Ok((decode_u64(&v[..8])?, decode_u64(&v[8..])?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbox_keys_sort_by_user_then_seq() {
        let mut keys = vec![
            inbox_key("alice1", 1),
            inbox_key("alice", 256),
            inbox_key("alice", 2),
            inbox_key("alic", 9),
        ];
        keys.sort();
        assert_eq!(
            keys,
            vec![
                inbox_key("alic", 9),
                inbox_key("alice", 2),
                inbox_key("alice", 256),
                inbox_key("alice1", 1)
            ]
        );
        let p = user_prefix("alice");
        assert_eq!(
            seq_of_inbox_key(&p, &inbox_key("alice", 256)).ok(),
            Some(256)
        );
        assert!(seq_of_inbox_key(&p, b"alice\0\x01").is_err());
    }

    #[test]
    fn entries_round_trip_and_garbage_is_an_error() {
        let e = InboxEntry::Message(42);
        assert_eq!(InboxEntry::decode(&e.encode()).ok(), Some(e));
        let e = InboxEntry::Inline(vec![1, 2, 3]);
        assert_eq!(InboxEntry::decode(&e.encode()).ok(), Some(e));
        assert!(InboxEntry::decode(&[]).is_err());
        assert!(InboxEntry::decode(&[1, 2]).is_err());
        assert!(InboxEntry::decode(&[9; 9]).is_err());
    }
}

#[cfg(test)]
mod conversation_tests {
    use super::*;

    #[test]
    fn a_direct_conversation_has_one_key_whoever_names_it() {
        assert_eq!(
            direct_conversation("bob", "alice"),
            direct_conversation("alice", "bob")
        );
        assert_ne!(
            direct_conversation("a", "bc"),
            direct_conversation("ab", "c")
        );
        assert_eq!(
            conversation_of(0, "bob", "alice"),
            direct_conversation("alice", "bob")
        );
        assert_eq!(conversation_of(7, "bob", "alice"), group_conversation(7));
        assert_eq!(decode_u64_pair(&u64_pair(3, 9)).ok(), Some((3, 9)));
        assert!(decode_u64_pair(&[0; 15]).is_err());
    }
}
