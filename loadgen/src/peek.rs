//! A cheap look at the frame loadgen receives most: a `Deliver` of a
//! `Message`. What the checks need (the event's `seq`, the message's
//! `group_id`, the 24-byte header at the front of its body) is read from
//! the frame's bytes in place, without decoding the rest of the message
//! into a `pb::Envelope` (five Strings, a body copy and their UTF-8 checks
//! per delivery, and loadgen also receives its own sends back). Anything
//! else, or anything unexpected in the encoding, returns `None` and is
//! decoded in full by prost as before, so no frame is judged by this
//! reader alone except a well-formed message delivery.
//!
//! Field numbers (protocol/proto/swiftlet.proto): `Envelope.deliver` = 22,
//! `Deliver.event` = 1, `Event.seq` = 1, `Event.message` = 2,
//! `Message.body` = 8, `Message.group_id` = 9.

use prost::encoding::{decode_varint, WireType};

use crate::body::{self, Header};

const ENVELOPE_DELIVER: u64 = 22;
const DELIVER_EVENT: u64 = 1;
const EVENT_SEQ: u64 = 1;
const EVENT_MESSAGE: u64 = 2;
const MESSAGE_BODY: u64 = 8;
const MESSAGE_GROUP_ID: u64 = 9;

/// What the checks need of a delivered message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    pub seq: u64,
    pub group_id: u64,
    /// The loadgen header of its body (`None`: not a loadgen body).
    pub header: Option<Header>,
}

/// One protobuf field: (number, value). Varints carry their value, length
/// -delimited fields their bytes; other wire types are skipped.
enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Other,
}

/// The next field of `buf`, advancing it; `None` on a malformed encoding.
fn field<'a>(buf: &mut &'a [u8]) -> Option<(u64, Value<'a>)> {
    let key = decode_varint(buf).ok()?;
    let number = key >> 3;
    let value = match WireType::try_from(key & 7).ok()? {
        WireType::Varint => Value::Varint(decode_varint(buf).ok()?),
        WireType::LengthDelimited => {
            let len = usize::try_from(decode_varint(buf).ok()?).ok()?;
            let bytes = buf.get(..len)?;
            *buf = &buf[len..];
            Value::Bytes(bytes)
        }
        WireType::SixtyFourBit => {
            *buf = buf.get(8..)?;
            Value::Other
        }
        WireType::ThirtyTwoBit => {
            *buf = buf.get(4..)?;
            Value::Other
        }
        WireType::StartGroup | WireType::EndGroup => return None,
    };
    Some((number, value))
}

/// The only length-delimited field `number` of `buf`, if every other field
/// parses; `None` if it is absent or appears twice (left to prost).
fn only_bytes(mut buf: &[u8], number: u64) -> Option<&[u8]> {
    let mut found = None;
    while !buf.is_empty() {
        match field(&mut buf)? {
            (n, Value::Bytes(b)) if n == number && found.is_none() => found = Some(b),
            // A second one, or the wrong wire type.
            (n, _) if n == number => return None,
            _ => {}
        }
    }
    found
}

/// The delivered message in an encoded `Envelope`, or `None` for any other
/// frame (or an encoding this reader does not take on).
pub fn delivered_message(envelope: &[u8]) -> Option<Delivered> {
    let deliver = only_bytes(envelope, ENVELOPE_DELIVER)?;
    let mut event = only_bytes(deliver, DELIVER_EVENT)?;
    let (mut seq, mut message) = (0, None);
    while !event.is_empty() {
        match field(&mut event)? {
            (EVENT_SEQ, Value::Varint(v)) => seq = v,
            (EVENT_MESSAGE, Value::Bytes(b)) if message.is_none() => message = Some(b),
            // Another kind, a second message, an unknown field: prost decides.
            _ => return None,
        }
    }
    let mut m = message?;
    let (mut group_id, mut body) = (0, &[][..]);
    while !m.is_empty() {
        match field(&mut m)? {
            (MESSAGE_BODY, Value::Bytes(b)) => body = b,
            (MESSAGE_GROUP_ID, Value::Varint(v)) => group_id = v,
            (MESSAGE_BODY | MESSAGE_GROUP_ID, _) => return None,
            _ => {}
        }
    }
    Some(Delivered {
        seq,
        group_id,
        header: body::decode(body),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use swiftlet_protocol::{pb, Body, Envelope};

    // `..Default::default()`: the protocol grows fields loadgen leaves unset.
    #[allow(clippy::needless_update)]
    fn message_envelope(seq: u64, group_id: u64, body: Vec<u8>) -> Vec<u8> {
        prost::Message::encode_to_vec(&Envelope::new(
            0,
            Body::Deliver(pb::Deliver {
                event: Some(pb::Event {
                    seq,
                    kind: Some(pb::event::Kind::Message(pb::Message {
                        id: 77,
                        from_user: "lg-u1".into(),
                        from_device: "d1".into(),
                        to_user: "lg-u2".into(),
                        client_msg_id: "m5".into(),
                        timestamp_ms: 1_700_000_000_000,
                        content_type: body::CONTENT_TYPE.into(),
                        body: body.into(),
                        group_id,
                        ..Default::default()
                    })),
                }),
            }),
        ))
    }

    #[test]
    fn reads_what_prost_reads_from_a_message_delivery() {
        let h = Header {
            sent_unix_ns: 1_700_000_000_123_456_789,
            sender: 3,
            counter: 9,
        };
        let env = message_envelope(42, 7, body::encode(&h, 100));
        assert_eq!(
            delivered_message(&env),
            Some(Delivered {
                seq: 42,
                group_id: 7,
                header: Some(h),
            })
        );
        let foreign = message_envelope(43, 0, b"hello".to_vec());
        assert_eq!(
            delivered_message(&foreign).map(|d| (d.seq, d.header)),
            Some((43, None))
        );
    }

    #[test]
    fn leaves_everything_else_to_prost() {
        let receipt = prost::Message::encode_to_vec(&Envelope::new(
            0,
            Body::Deliver(pb::Deliver {
                event: Some(pb::Event {
                    seq: 5,
                    kind: Some(pb::event::Kind::Receipt(pb::Receipt::default())),
                }),
            }),
        ));
        assert_eq!(delivered_message(&receipt), None);
        let ack = prost::Message::encode_to_vec(&Envelope::new(3, Body::Ack(pb::Ack::default())));
        assert_eq!(delivered_message(&ack), None);
        let empty = prost::Message::encode_to_vec(&Envelope::new(
            0,
            Body::Deliver(pb::Deliver { event: None }),
        ));
        assert_eq!(delivered_message(&empty), None);
        let env = message_envelope(1, 0, vec![1, 2, 3]);
        for cut in 1..env.len() {
            // A truncated frame never reads as a message with fields missing.
            if let Some(d) = delivered_message(&env[..cut]) {
                panic!("cut at {cut} read as {d:?}");
            }
        }
    }
}
