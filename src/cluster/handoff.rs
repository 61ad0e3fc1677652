//! What one node hands another: the encoding of an outbox entry and of a
//! stream entry that carries several of them.
//!
//! An outbox entry is one [`RelayEntry`]: what one group commit produced
//! for the destination. Mostly inbox events for users whose home is there,
//! each an encoded `pb::Event` with `seq` 0 (the destination gives it the
//! user's next seq); also requests about groups homed there ([`Forwarded`]),
//! the answers to requests it forwarded here ([`Answer`]), and the rows of
//! a partition moving there ([`Import`]). A group has one writer, its
//! home, and the Ack of a group post means it is stored there.
//! A message event carries the whole message, so the destination stores it
//! as its own copy. A stream entry holds consecutive outbox entries of one
//! source, each length-delimited, from `first` on.

use bytes::{Buf, Bytes};
use prost::Message;

use crate::store::partition::Record;

/// The events of one outbox entry.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RelayEntry {
    #[prost(message, repeated, tag = "1")]
    pub events: Vec<RelayEvent>,
}

/// One thing for the destination: an inbox event for one of its users, a
/// request for a group it is home to, or the answer to a request this
/// node forwarded there. Exactly one of `event`, `request`, `answer` is set.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RelayEvent {
    /// Whose inbox the event is for, or who made the request.
    #[prost(string, tag = "1")]
    pub user: String,
    /// An encoded `pb::Event` (seq 0).
    #[prost(bytes = "bytes", tag = "2")]
    pub event: Bytes,
    #[prost(message, optional, tag = "3")]
    pub request: Option<Forwarded>,
    #[prost(message, optional, tag = "4")]
    pub answer: Option<Answer>,
    #[prost(message, optional, tag = "5")]
    pub import: Option<Import>,
}

/// Rows of a partition moving to the destination (see
/// [`super::mover`]), shipped in the outbox like everything else, so they
/// arrive in order with the events that follow them.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Import {
    #[prost(uint32, tag = "1")]
    pub partition: u32,
    #[prost(message, repeated, tag = "2")]
    pub rows: Vec<Row>,
    /// Non-zero on the last entry of a move (its tail): the destination
    /// is home to the partition from here on, at this epoch.
    #[prost(uint64, tag = "3")]
    pub home_epoch: u64,
}

/// One row of a partition (see [`crate::store::partition::Record`]).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Row {
    #[prost(uint32, tag = "1")]
    pub cf: u32,
    #[prost(bytes = "vec", tag = "2")]
    pub key: Vec<u8>,
    /// Absent: the key was deleted.
    #[prost(bytes = "vec", optional, tag = "3")]
    pub value: Option<Vec<u8>>,
}

impl From<Record> for Row {
    fn from(r: Record) -> Row {
        Row {
            cf: u32::from(r.cf),
            key: r.key,
            value: r.value,
        }
    }
}

impl Row {
    /// The record, or None for a column family no node has.
    pub fn into_record(self) -> Option<Record> {
        Some(Record {
            cf: u8::try_from(self.cf).ok()?,
            key: self.key,
            value: self.value,
        })
    }
}

/// Which connection of the source node a request came from.
#[derive(Clone, Copy, PartialEq, prost::Message)]
pub struct Caller {
    #[prost(uint32, tag = "1")]
    pub shard: u32,
    #[prost(uint32, tag = "2")]
    pub slot: u32,
    #[prost(uint32, tag = "3")]
    pub gen: u32,
    #[prost(bool, tag = "4")]
    pub presence: bool,
}

/// A client request about a group, forwarded to the group's home (the one
/// writer of its membership, posts and receipts).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Forwarded {
    #[prost(message, optional, tag = "1")]
    pub caller: Option<Caller>,
    #[prost(string, tag = "2")]
    pub device: String,
    /// The request as the client sent it: an encoded `Envelope`.
    #[prost(bytes = "bytes", tag = "3")]
    pub envelope: Bytes,
}

/// The answer to a forwarded request, for the caller's connection.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Answer {
    #[prost(message, optional, tag = "1")]
    pub caller: Option<Caller>,
    /// An encoded `Envelope` (the Ack, the GroupInfo, the Error...).
    #[prost(bytes = "bytes", tag = "2")]
    pub envelope: Bytes,
}

/// Concatenate outbox entries, each length-delimited, for one stream entry.
pub fn pack<'a>(entries: impl IntoIterator<Item = &'a Bytes>) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        prost::encoding::encode_varint(e.len() as u64, &mut out);
        out.extend_from_slice(e);
    }
    out
}

/// Split what [`pack`] made back into entries.
pub fn unpack(mut data: Bytes) -> Result<Vec<Bytes>, prost::DecodeError> {
    let mut out = Vec::new();
    while data.has_remaining() {
        let len = prost::encoding::decode_varint(&mut data)?;
        let len = usize::try_from(len)
            .ok()
            .filter(|l| *l <= data.len())
            .ok_or_else(|| prost::DecodeError::new("entry longer than its stream entry"))?;
        out.push(data.split_to(len));
    }
    Ok(out)
}

/// Decode one outbox entry.
pub fn decode(entry: &[u8]) -> Result<RelayEntry, prost::DecodeError> {
    RelayEntry::decode(entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn pack_then_unpack_is_identity(entries in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20)) {
            let entries: Vec<Bytes> = entries.into_iter().map(Bytes::from).collect();
            let packed = Bytes::from(pack(&entries));
            prop_assert_eq!(unpack(packed).expect("unpack"), entries);
        }

        #[test]
        fn unpack_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = unpack(Bytes::from(data));
        }
    }
}
