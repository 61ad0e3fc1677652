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
    let mut k = user_prefix(user);
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

/// What one inbox slot holds. The first byte is the kind, so later kinds
/// (group membership changes, receipts) fit beside messages without a
/// migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboxEntry {
    /// A reference to a message in the `messages` column family.
    Message(u64),
}

const KIND_MESSAGE: u8 = 1;

impl InboxEntry {
    pub fn encode(&self) -> [u8; 9] {
        match *self {
            InboxEntry::Message(id) => {
                let mut v = [0u8; 9];
                v[0] = KIND_MESSAGE;
                v[1..].copy_from_slice(&id.to_be_bytes());
                v
            }
        }
    }

    pub fn decode(v: &[u8]) -> Result<Self, StoreError> {
        match v.split_first() {
            Some((&KIND_MESSAGE, rest)) => Ok(InboxEntry::Message(decode_u64(rest)?)),
            _ => Err(StoreError::Corrupt("unknown inbox entry".into())),
        }
    }
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
        assert!(InboxEntry::decode(&[]).is_err());
        assert!(InboxEntry::decode(&[1, 2]).is_err());
        assert!(InboxEntry::decode(&[9; 9]).is_err());
    }
}
