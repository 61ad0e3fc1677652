//! Property tests of request handling: random sequences of client frames
//! (valid and refused logins, sends, acknowledgements, syncs, typing,
//! presence, group reads, pings, empty and server-only bodies, request id
//! 0) and of changes in the world (time passing, a busy pipeline, failing
//! reads, events delivered), driven through [`requests::handle`] against a
//! [`ScriptedNode`], with the wire contract (protocol/README.md, sections
//! 3, 4, 10 and 18) checked after every frame.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use swiftlet_protocol::pb::{self, conversation, TypingState};
use swiftlet_protocol::{Body, Envelope, ErrorCode, PROTOCOL_VERSION};

use super::bucket;
use super::requests::{self, Flow, ShardSessions, PRESENCE_TOKENS};
use super::scripted::{NoticeTo, ScriptedNode, TestConn};
use super::services::{Limits, NodeServices as _};
use super::state::Phase;
use crate::clock::TICK_MS;
use crate::commit::{CommitCmd, Op};
use crate::hub::registry::{ConnKind, ConnRef};

const USERS: [&str; 4] = ["alice", "bob", "carol", "dave"];
/// Homed on node 2, which is alive.
const REMOTE: &str = "eve";
/// Homed on node 3, which is down.
const REMOTE_DOWN: &str = "frank";
/// Homed nowhere yet.
const HOMELESS: &str = "gina";
const DEVICE: &str = "phone";
/// alice, bob and carol are in group 7; bob and dave in group 8.
const GROUP: u64 = 7;
const OTHER_GROUP: u64 = 8;
/// A group homed on another node (its reads and typing are refused here).
const REMOTE_GROUP: u64 = 9;

#[derive(Debug, Clone)]
enum Token {
    Valid(usize),
    Expired,
    Garbage,
    Remote,
    RemoteDown,
    Homeless,
}

#[derive(Debug, Clone)]
enum Device {
    Ok,
    Invalid,
    Http,
}

#[derive(Debug, Clone)]
enum TypingTo {
    User(usize),
    Myself,
    Group(u64),
    Nothing,
    BadUser,
}

#[derive(Debug, Clone)]
enum Req {
    Hello {
        version: u32,
        device: Device,
        token: Token,
    },
    Ping(u64),
    Send {
        valid: bool,
        to_group: bool,
    },
    DeliveryAck(u64),
    Sync {
        after: u64,
        limit: u32,
    },
    Typing {
        to: TypingTo,
        state: i32,
    },
    Subscribe {
        users: Vec<usize>,
        invalid: bool,
    },
    GetGroup(u64),
    ListGroups,
    GetReceipts {
        group: u64,
        message: u64,
    },
    MarkRead,
    CreateGroup,
    /// No body (or one this server does not know).
    Empty,
    /// A body only the server sends.
    ServerOnly,
}

#[derive(Debug, Clone)]
enum Step {
    Frame {
        rid: u64,
        req: Req,
    },
    /// Let this many milliseconds pass.
    Advance(u64),
    /// The pipeline's queue is full (or not).
    Busy(bool),
    /// Every store read fails (or not).
    FailReads(bool),
    /// The node loses (or regains) its cluster lease.
    Fenced(bool),
    /// The shard writes this many more events to the connection.
    Delivered(u64),
}

fn token() -> impl Strategy<Value = Token> {
    prop_oneof![
        6 => (0..USERS.len()).prop_map(Token::Valid),
        1 => Just(Token::Expired),
        1 => Just(Token::Garbage),
        1 => Just(Token::Remote),
        1 => Just(Token::RemoteDown),
        1 => Just(Token::Homeless),
    ]
}

fn hello() -> impl Strategy<Value = Req> {
    (
        prop_oneof![8 => Just(PROTOCOL_VERSION), 1 => Just(PROTOCOL_VERSION + 1)],
        prop_oneof![8 => Just(Device::Ok), 1 => Just(Device::Invalid), 1 => Just(Device::Http)],
        token(),
    )
        .prop_map(|(version, device, token)| Req::Hello {
            version,
            device,
            token,
        })
}

fn req() -> impl Strategy<Value = Req> {
    let typing_to = prop_oneof![
        (0..USERS.len()).prop_map(TypingTo::User),
        Just(TypingTo::Myself),
        prop_oneof![Just(GROUP), Just(OTHER_GROUP), Just(REMOTE_GROUP), Just(99)]
            .prop_map(TypingTo::Group),
        Just(TypingTo::Nothing),
        Just(TypingTo::BadUser),
    ];
    prop_oneof![
        2 => hello(),
        2 => any::<u64>().prop_map(Req::Ping),
        3 => (any::<bool>(), any::<bool>()).prop_map(|(v, g)| Req::Send { valid: v || g, to_group: g }),
        3 => (0..30u64).prop_map(Req::DeliveryAck),
        2 => (0..25u64, 0..30u32).prop_map(|(after, limit)| Req::Sync { after, limit }),
        6 => (typing_to, 0..3i32).prop_map(|(to, state)| Req::Typing { to, state }),
        2 => (prop::collection::vec(0..USERS.len(), 0..4), prop::bool::weighted(0.1))
            .prop_map(|(users, invalid)| Req::Subscribe { users, invalid }),
        1 => prop_oneof![Just(GROUP), Just(OTHER_GROUP), Just(REMOTE_GROUP), Just(99)]
            .prop_map(Req::GetGroup),
        1 => Just(Req::ListGroups),
        1 => (prop_oneof![Just(GROUP), Just(OTHER_GROUP)], prop_oneof![Just(100u64), Just(101), Just(999)])
            .prop_map(|(group, message)| Req::GetReceipts { group, message }),
        1 => Just(Req::MarkRead),
        1 => Just(Req::CreateGroup),
        1 => Just(Req::Empty),
        1 => Just(Req::ServerOnly),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let rid = prop_oneof![1 => Just(0u64), 20 => 1..1_000u64];
    prop_oneof![
        12 => (rid, req()).prop_map(|(rid, req)| Step::Frame { rid, req }),
        3 => prop_oneof![0..150u64, 0..3_000u64].prop_map(Step::Advance),
        1 => prop::bool::weighted(0.3).prop_map(Step::Busy),
        1 => prop::bool::weighted(0.3).prop_map(Step::FailReads),
        1 => prop::bool::weighted(0.2).prop_map(Step::Fenced),
        2 => (1..6u64).prop_map(Step::Delivered),
    ]
}

/// What the scripted world starts with.
#[derive(Debug, Clone)]
struct World {
    max_conns: usize,
    /// alice's connections elsewhere (devices on other shards).
    alice_elsewhere: usize,
    inbox: u64,
    cursor: u64,
}

fn world() -> impl Strategy<Value = World> {
    (1..4usize, 0..3usize, 0..20u64, 0..20u64).prop_map(|(max_conns, alice_elsewhere, inbox, c)| {
        World {
            max_conns,
            alice_elsewhere,
            inbox,
            cursor: c.min(inbox),
        }
    })
}

/// Limits for a scripted node (no frame limit), `max_conns` per user.
pub(super) fn limits(max_conns: usize) -> Limits {
    Limits {
        max_frame: 65_536,
        push_buffer_bytes: 262_144,
        idle_timeout_ms: 60_000,
        handshake_timeout_ms: 10_000,
        frame_timeout_ms: 15_000,
        max_conns_per_user: max_conns,
        frames: crate::session::bucket::FrameRate::OFF,
        typing_ttl_ms: 6_000,
        allowed_origins: Vec::new(),
    }
}

fn node(w: &World) -> ScriptedNode {
    let mut n = ScriptedNode::new(limits(w.max_conns));
    for u in USERS {
        n.fill_inbox(u, w.inbox);
        n.cursors.insert((u.into(), DEVICE.into()), w.cursor);
    }
    n.remote.insert(REMOTE.into(), 2);
    n.remote.insert(REMOTE_DOWN.into(), 3);
    n.alive.insert(2);
    n.homeless.insert(HOMELESS.into());
    n.add_group(GROUP, &["alice", "bob", "carol"]);
    n.add_group(OTHER_GROUP, &["bob", "dave"]);
    n.add_group(REMOTE_GROUP, &["alice", "bob"]);
    n.remote_groups.insert(REMOTE_GROUP);
    for (id, from) in [(100, "alice"), (101, "bob")] {
        n.messages.insert(
            id,
            pb::Message {
                id,
                from_user: from.into(),
                group_id: GROUP,
                ..Default::default()
            },
        );
    }
    for i in 0..w.alice_elsewhere {
        n.register(
            "alice",
            ConnRef {
                shard: 1,
                slot: i as u32,
                gen: 1,
                kind: ConnKind::Session,
            },
        );
    }
    n
}

fn envelope(rid: u64, req: &Req, me: Option<&str>) -> Envelope {
    let conv = |kind| Some(pb::Conversation { kind: Some(kind) });
    let body = match req.clone() {
        Req::Hello {
            version,
            device,
            token,
        } => Body::Hello(pb::Hello {
            protocol_version: version,
            token: match token {
                Token::Valid(u) => format!("tok:{}", USERS[u]),
                Token::Expired => "old:alice".into(),
                Token::Garbage => "not a token".into(),
                Token::Remote => format!("tok:{REMOTE}"),
                Token::RemoteDown => format!("tok:{REMOTE_DOWN}"),
                Token::Homeless => format!("tok:{HOMELESS}"),
            },
            device_id: match device {
                Device::Ok => DEVICE.into(),
                Device::Invalid => "no spaces allowed".into(),
                Device::Http => requests::HTTP_DEVICE.into(),
            },
            skip_own_sends: false,
        }),
        Req::Ping(nonce) => Body::Ping(pb::Ping { nonce }),
        Req::Send { valid, to_group } => Body::Send(pb::Send {
            client_msg_id: if valid { "c1".into() } else { String::new() },
            to_user: if to_group {
                String::new()
            } else {
                "bob".into()
            },
            group_id: if to_group { GROUP } else { 0 },
            content_type: "text/plain".into(),
            body: bytes::Bytes::from_static(b"hi"),
        }),
        Req::DeliveryAck(up_to) => Body::DeliveryAck(pb::DeliveryAck { up_to }),
        Req::Sync { after, limit } => Body::Sync(pb::Sync { after, limit }),
        Req::Typing { to, state } => Body::Typing(pb::Typing {
            conversation: match to {
                TypingTo::User(u) => conv(conversation::Kind::User(USERS[u].into())),
                TypingTo::Myself => conv(conversation::Kind::User(me.unwrap_or("alice").into())),
                TypingTo::Group(id) => conv(conversation::Kind::GroupId(id)),
                TypingTo::Nothing => None,
                TypingTo::BadUser => conv(conversation::Kind::User("not valid!".into())),
            },
            state,
        }),
        Req::Subscribe { users, invalid } => Body::SubscribePresence(pb::SubscribePresence {
            users: users
                .iter()
                .map(|u| USERS[*u].to_owned())
                .chain(invalid.then(|| "bad id!".to_owned()))
                .collect(),
        }),
        Req::GetGroup(group_id) => Body::GetGroup(pb::GetGroup {
            group_id,
            ..Default::default()
        }),
        Req::ListGroups => Body::ListGroups(pb::ListGroups::default()),
        Req::GetReceipts { group, message } => Body::GetReceipts(pb::GetReceipts {
            group_id: group,
            message_id: message,
            ..Default::default()
        }),
        Req::MarkRead => Body::MarkRead(pb::MarkRead::default()),
        Req::CreateGroup => Body::CreateGroup(pb::CreateGroup::default()),
        Req::Empty => {
            return Envelope {
                request_id: rid,
                body: None,
            }
        }
        Req::ServerOnly => Body::Pong(pb::Pong { nonce: 1 }),
    };
    Envelope::new(rid, body)
}

fn error_of(env: &Envelope) -> Option<(ErrorCode, bool)> {
    match &env.body {
        Some(Body::Error(e)) => Some((
            ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified),
            e.fatal,
        )),
        _ => None,
    }
}

/// Fatal codes are the 2xxx and 3xxx classes (wire spec, section 10).
fn is_fatal(code: ErrorCode) -> bool {
    matches!(code as i32 / 1000, 2 | 3)
}

/// How a Hello is refused, in the order the spec checks (section 4).
fn refusal(
    w: &World,
    n: &ScriptedNode,
    version: u32,
    device: &Device,
    token: &Token,
) -> Option<ErrorCode> {
    if version != PROTOCOL_VERSION {
        return Some(ErrorCode::UnsupportedVersion);
    }
    if !matches!(device, Device::Ok) {
        return Some(ErrorCode::InvalidDevice);
    }
    let user = match token {
        Token::Garbage => return Some(ErrorCode::AuthFailed),
        Token::Expired => return Some(ErrorCode::TokenExpired),
        Token::Remote => return Some(ErrorCode::NotHome),
        Token::RemoteDown | Token::Homeless => return Some(ErrorCode::HomeUnavailable),
        Token::Valid(_) if n.fenced.get() => return Some(ErrorCode::HomeUnavailable),
        Token::Valid(u) => USERS[*u],
    };
    if n.registered(user).len() + 1 > w.max_conns {
        return Some(ErrorCode::TooManyConnections);
    }
    if n.fail_reads.get() {
        return Some(ErrorCode::Internal);
    }
    None
}

/// The test's own record of the connection.
#[derive(Default)]
struct Model {
    logged_in: bool,
    /// Submissions accepted so far (each is in flight: nothing answers).
    submitted: usize,
    /// Bucket tokens taken, and the tick the bucket was last consulted.
    tokens_taken: u32,
    last_bucket: Option<u32>,
}

fn run(w: World, steps: Vec<Step>) -> Result<(), TestCaseError> {
    let n = node(&w);
    let start = n.clock().now();
    let tick = |n: &ScriptedNode, start: Instant| {
        (n.clock().now().duration_since(start).as_millis() as u64 / TICK_MS) as u32
    };
    let mut conn = TestConn::new(3, 9, 0);
    let me = conn.me(n.shard);
    let mut local = ShardSessions::default();
    let mut m = Model::default();
    for s in steps {
        let now = tick(&n, start);
        let (rid, req) = match s {
            Step::Advance(ms) => {
                n.manual.advance(Duration::from_millis(ms));
                continue;
            }
            Step::Busy(b) => {
                n.busy.set(b);
                continue;
            }
            Step::Fenced(f) => {
                n.fenced.set(f);
                continue;
            }
            Step::FailReads(f) => {
                n.fail_reads.set(f);
                continue;
            }
            Step::Delivered(k) => {
                if let Some(d) = conn.carries.delivery() {
                    for _ in 0..k {
                        match d.catch_up_after() {
                            Some(after) => {
                                d.on_page_event(after + 1);
                                d.on_page_end(after + 1 < w.inbox);
                            }
                            None => {
                                let next = d.next_seq();
                                d.on_push(next, true, false);
                            }
                        }
                    }
                }
                continue;
            }
            Step::Frame { rid, req } => (rid, req),
        };
        let phase = conn.phase;
        let user = conn.user.as_deref().map(str::to_owned);
        let delivery = conn.carries.delivery().copied();
        let expected_refusal = match &req {
            Req::Hello {
                version,
                device,
                token,
            } => refusal(&w, &n, *version, device, token),
            _ => None,
        };
        let refusals0 = n.refusals.get();
        let (out0, sub0, not0, cur0) = (
            conn.out.len(),
            n.submitted.borrow().len(),
            n.notices.borrow().len(),
            local.cursors.len(),
        );
        let env = envelope(rid, &req, user.as_deref());
        let slot = conn.slot;
        conn.refill(now);
        let flow = requests::handle(&mut conn.session(), slot, env, &n, &mut local, now);
        let answers: Vec<Envelope> = conn.out[out0..].to_vec();
        let submits = n.submitted.borrow().len() - sub0;
        let notices: Vec<_> = n.notices.borrow()[not0..].to_vec();
        let cursors = local.cursors.len() - cur0;

        // At most one answer per frame; it carries the frame's request id,
        // and an Error answering a request is never fatal (class 1xxx).
        prop_assert!(answers.len() <= 1, "{req:?}: {answers:?}");
        for a in &answers {
            prop_assert_eq!(a.request_id, rid, "{:?}", req);
            if let Some((code, fatal)) = error_of(a) {
                prop_assert!(!fatal && code as i32 / 1000 == 1, "{req:?}: {a:?}");
            }
        }
        // Notices are pushes.
        for x in &notices {
            prop_assert_eq!(x.env.request_id, 0);
        }

        if phase == Phase::Closing {
            prop_assert_eq!(&flow, &Flow::Continue);
            prop_assert!(answers.is_empty() && submits == 0 && notices.is_empty() && cursors == 0);
            continue;
        }

        // Close happens exactly on the documented fatal cases.
        let is_hello = matches!(req, Req::Hello { .. });
        // Request id 0, a frame before Hello, a second Hello.
        let violation = rid == 0 || (phase == Phase::Handshake) != is_hello;
        let expected_close: Option<(u64, ErrorCode)> = if violation {
            Some((0, ErrorCode::ProtocolViolation))
        } else {
            expected_refusal.map(|code| (rid, code))
        };
        // The fatal Error the shard will send: made from the code, or given
        // whole (a cluster redirect).
        let closed = match &flow {
            Flow::Continue => None,
            Flow::Close(r, code, _) => Some((*r, *code)),
            Flow::Refuse(r, err) => {
                prop_assert!(err.fatal, "{:?}", err);
                match err.code() {
                    ErrorCode::NotHome => {
                        let to = err.redirect.as_ref().map(|r| r.node_id);
                        prop_assert_eq!(to, Some(2), "{:?}", err);
                    }
                    ErrorCode::HomeUnavailable => prop_assert!(err.retry_after_ms > 0),
                    _ => {}
                }
                Some((*r, err.code()))
            }
        };
        // Each refusal for a home elsewhere is counted once, by its kind.
        let (r0, u0) = refusals0;
        let counted = match closed {
            Some((_, ErrorCode::NotHome)) => (r0 + 1, u0),
            Some((_, ErrorCode::HomeUnavailable)) => (r0, u0 + 1),
            _ => (r0, u0),
        };
        prop_assert_eq!(n.refusals.get(), counted);
        match (closed, expected_close) {
            (Some((r, code)), Some((er, ecode))) => {
                prop_assert_eq!((r, code), (er, ecode), "{:?}", req);
                prop_assert!(is_fatal(code), "{req:?}: {code:?}");
                // The shard writes the Error; nothing else goes out, and a
                // refused login leaves no registration behind.
                prop_assert!(answers.is_empty() && submits == 0 && notices.is_empty());
                let everyone = USERS.iter().chain(&[REMOTE, REMOTE_DOWN, HOMELESS]);
                for u in everyone {
                    if !m.logged_in {
                        prop_assert!(!n.registered(u).contains(&me), "{u} kept {me:?}");
                    }
                }
                // The shard's close_with.
                conn.phase = Phase::Closing;
                continue;
            }
            (Some(_), None) => {
                prop_assert!(false, "{req:?} closed: {flow:?}");
            }
            (None, Some(e)) => {
                prop_assert!(false, "{req:?} should close with {e:?}");
            }
            (None, None) => {}
        }

        if phase == Phase::Handshake {
            // A successful Hello: one Welcome, registered, logged in.
            let Req::Hello {
                token: Token::Valid(u),
                ..
            } = req
            else {
                return Err(TestCaseError::fail(format!(
                    "{req:?} was accepted before login"
                )));
            };
            let user = USERS[u];
            prop_assert_eq!(conn.phase, Phase::Live);
            prop_assert_eq!(answers.len(), 1);
            let Some(Body::Welcome(welcome)) = &answers[0].body else {
                return Err(TestCaseError::fail(format!("{:?}", answers)));
            };
            prop_assert_eq!(&welcome.user_id, user);
            prop_assert_eq!(welcome.cursor, w.cursor);
            prop_assert_eq!(welcome.head_seq, w.inbox);
            prop_assert!(n.registered(user).contains(&me));
            // The watchers hear of a user's first device only.
            let first = u != 0 || w.alice_elsewhere == 0;
            prop_assert_eq!(notices.len(), usize::from(first), "{:?}", notices);
            if first {
                prop_assert_eq!(&notices[0].to, &NoticeTo::Watchers(user.to_owned()));
            }
            m.logged_in = true;
            continue;
        }

        // Logged in: every request is answered once, or handed to the
        // pipeline (which answers it), except that DeliveryAck and Typing
        // are answered only when refused (section 3's table).
        let me_user = user.clone().unwrap_or_default();
        let one = |answers: &[Envelope], submits: usize| answers.len() + submits == 1;
        match &req {
            Req::Hello { .. } => unreachable!("closed above"),
            Req::Ping(nonce) => {
                let pong = matches!(
                    &answers[..],
                    [Envelope { body: Some(Body::Pong(p)), .. }] if p.nonce == *nonce
                );
                prop_assert!(pong, "{:?}", answers);
            }
            Req::Send { .. } | Req::MarkRead | Req::CreateGroup => {
                prop_assert!(one(&answers, submits), "{req:?}: {answers:?}");
                let valid = !matches!(req, Req::Send { valid: false, .. });
                if !valid {
                    prop_assert_eq!(
                        error_of(&answers[0]).map(|e| e.0),
                        Some(ErrorCode::InvalidRequest)
                    );
                } else if n.busy.get() {
                    prop_assert_eq!(
                        error_of(&answers[0]).map(|e| e.0),
                        Some(ErrorCode::RateLimited)
                    );
                } else {
                    prop_assert_eq!(submits, 1);
                    let subs = n.submitted.borrow();
                    let Some(CommitCmd::Request(origin, op)) = subs.last() else {
                        return Err(TestCaseError::fail("not a request".to_string()));
                    };
                    prop_assert_eq!(origin.request_id, rid);
                    prop_assert_eq!(origin.reply, me);
                    prop_assert_eq!(&*origin.user, me_user.as_str());
                    prop_assert_eq!(&*origin.device, DEVICE);
                    let op_matches = matches!(
                        (&req, op),
                        (Req::Send { .. }, Op::Send(_))
                            | (Req::MarkRead, Op::MarkRead(_))
                            | (Req::CreateGroup, Op::CreateGroup(_))
                    );
                    prop_assert!(op_matches);
                    m.submitted += 1;
                }
            }
            Req::DeliveryAck(up_to) => {
                prop_assert_eq!(submits, 0);
                let d = delivery.expect("a logged-in TCP connection delivers");
                if *up_to >= d.next_seq() {
                    prop_assert_eq!(
                        error_of(&answers[0]).map(|e| e.0),
                        Some(ErrorCode::InvalidRequest)
                    );
                } else {
                    prop_assert!(answers.is_empty());
                    prop_assert_eq!(cursors, usize::from(*up_to > d.acked()));
                    if let Some(a) = local.cursors.last().filter(|_| cursors == 1) {
                        prop_assert_eq!((a.after, a.up_to), (d.acked(), *up_to));
                        prop_assert_eq!((&*a.user, &*a.device), (me_user.as_str(), DEVICE));
                    }
                }
            }
            Req::Typing { to, state } => {
                prop_assert_eq!(submits, 0);
                // The bucket is consulted first; one refilled token after
                // REFILL_TICKS whatever came before.
                let refilled = match m.last_bucket {
                    None => true,
                    Some(t) => now >= t + bucket::REFILL_TICKS,
                };
                m.last_bucket = Some(now);
                let limited = answers
                    .first()
                    .and_then(error_of)
                    .is_some_and(|e| e.0 == ErrorCode::RateLimited);
                prop_assert!(
                    !(limited && refilled),
                    "refused with a token due at tick {now}"
                );
                if limited {
                    prop_assert!(notices.is_empty());
                    continue;
                }
                m.tokens_taken += 1;
                let started = *state == TypingState::Started as i32;
                let stopped = *state == TypingState::Stopped as i32;
                let target_ok = match to {
                    TypingTo::User(_) | TypingTo::Myself => true,
                    TypingTo::Group(g) => {
                        !n.remote_groups.contains(g)
                            && !n.fail_reads.get()
                            && n.groups.get(g).is_some_and(|g| g.is_member(&me_user))
                    }
                    TypingTo::Nothing | TypingTo::BadUser => false,
                };
                prop_assert_eq!(
                    answers.is_empty(),
                    target_ok && (started || stopped),
                    "{:?}",
                    answers
                );
                if !answers.is_empty() {
                    prop_assert!(notices.is_empty());
                }
                // Never to the typist's own devices; from the typist.
                for x in &notices {
                    let Some(Body::TypingNotice(t)) = &x.env.body else {
                        return Err(TestCaseError::fail(format!("{:?}", x)));
                    };
                    prop_assert_eq!(&t.user, &me_user);
                    let NoticeTo::Users(to) = &x.to else {
                        return Err(TestCaseError::fail(format!("{:?}", x)));
                    };
                    prop_assert!(!to.contains(&me_user), "{:?}", x);
                }
            }
            Req::Subscribe { users, invalid } => {
                prop_assert!(one(&answers, submits));
                if !invalid {
                    let limited =
                        error_of(&answers[0]).is_some_and(|e| e.0 == ErrorCode::RateLimited);
                    m.last_bucket = Some(now);
                    if !limited {
                        m.tokens_taken += u32::from(PRESENCE_TOKENS);
                    }
                    if !limited && !n.fail_reads.get() {
                        let Some(Body::PresenceList(list)) = &answers[0].body else {
                            return Err(TestCaseError::fail(format!("{:?}", answers)));
                        };
                        let mut want: Vec<&str> = users.iter().map(|u| USERS[*u]).collect();
                        want.dedup();
                        for u in &want {
                            prop_assert!(n
                                .watchers
                                .borrow()
                                .get(*u)
                                .is_some_and(|c| c.contains(&me)));
                        }
                        prop_assert!(list.users.len() <= users.len());
                    }
                }
            }
            Req::Sync { after, limit } => {
                prop_assert!(one(&answers, submits));
                if n.fail_reads.get() {
                    prop_assert_eq!(
                        error_of(&answers[0]).map(|e| e.0),
                        Some(ErrorCode::StoreUnavailable)
                    );
                } else {
                    let Some(Body::SyncBatch(b)) = &answers[0].body else {
                        return Err(TestCaseError::fail(format!("{:?}", answers)));
                    };
                    let cap = if *limit == 0 {
                        100
                    } else {
                        (*limit).min(requests::MAX_SYNC_LIMIT)
                    };
                    prop_assert!(b.events.len() <= cap as usize);
                    prop_assert!(b.events.iter().all(|e| e.seq > *after && e.seq <= w.inbox));
                    prop_assert_eq!(b.head_seq, w.inbox);
                }
            }
            // A group homed on another node is read there: the request
            // goes to the pipeline, which forwards it (or is refused busy).
            Req::GetGroup(g) if n.remote_groups.contains(g) => {
                prop_assert!(one(&answers, submits), "{req:?}: {answers:?}");
                if n.busy.get() {
                    prop_assert_eq!(
                        error_of(&answers[0]).map(|e| e.0),
                        Some(ErrorCode::RateLimited)
                    );
                } else {
                    prop_assert_eq!(submits, 1);
                    let subs = n.submitted.borrow();
                    let forwarded = matches!(
                        subs.last(),
                        Some(CommitCmd::Request(origin, Op::GetGroup(r)))
                            if origin.request_id == rid && r.group_id == *g
                    );
                    prop_assert!(forwarded);
                    m.submitted += 1;
                }
            }
            Req::GetGroup(_) | Req::ListGroups | Req::GetReceipts { .. } => {
                prop_assert!(one(&answers, submits), "{req:?}: {answers:?}");
            }
            Req::Empty | Req::ServerOnly => {
                prop_assert_eq!(
                    error_of(&answers[0]).map(|e| e.0),
                    Some(ErrorCode::InvalidRequest)
                );
            }
        }

        // Typing and presence never take more than the bucket holds: a
        // burst, then one token per REFILL_TICKS since the connection was
        // made (tick 0).
        let allowed = u32::from(bucket::BURST) + now / bucket::REFILL_TICKS;
        prop_assert!(
            m.tokens_taken <= allowed,
            "{} tokens by tick {now}",
            m.tokens_taken
        );
        // Every accepted submission is in flight (nothing answered here).
        prop_assert_eq!(usize::from(conn.in_flight), m.submitted);
    }
    // Nothing is submitted, routed or acknowledged without a login.
    if !m.logged_in {
        prop_assert!(n.submitted.borrow().is_empty());
        prop_assert!(n.notices.borrow().is_empty());
        prop_assert!(local.cursors.is_empty());
        prop_assert!(n.registry.borrow().values().flatten().all(|c| *c != me));
    }
    prop_assert_eq!(n.submitted.borrow().len(), m.submitted);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Request handling keeps the wire contract on any frame sequence.
    #[test]
    fn request_handling_keeps_the_wire_contract(
        w in world(),
        first in prop::option::weighted(0.7, hello()),
        steps in prop::collection::vec(step(), 0..60),
    ) {
        let mut all: Vec<Step> = first.map(|req| Step::Frame { rid: 1, req }).into_iter().collect();
        all.extend(steps);
        run(w, all)?;
    }
}

/// A flood of typing from one connection: a burst of BURST, then one per
/// REFILL_TICKS of the manual clock, and each refusal routes nothing.
#[test]
fn typing_floods_are_cut_to_the_bucket_under_a_manual_clock() {
    let w = World {
        max_conns: 4,
        alice_elsewhere: 0,
        inbox: 0,
        cursor: 0,
    };
    let n = node(&w);
    let start = n.clock().now();
    let mut conn = TestConn::new(0, 1, 0);
    let mut local = ShardSessions::default();
    let hello = Req::Hello {
        version: PROTOCOL_VERSION,
        device: Device::Ok,
        token: Token::Valid(0),
    };
    let flow = requests::handle(
        &mut conn.session(),
        0,
        envelope(1, &hello, None),
        &n,
        &mut local,
        0,
    );
    assert_eq!(flow, Flow::Continue);
    n.notices.borrow_mut().clear();
    let typing = Req::Typing {
        to: TypingTo::User(1),
        state: TypingState::Started as i32,
    };
    let mut routed = Vec::new();
    // 10 per tick for 3 seconds (30 ticks).
    for i in 0..300u64 {
        let now = (n.clock().now().duration_since(start).as_millis() as u64 / TICK_MS) as u32;
        let before = n.notices.borrow().len();
        let env = envelope(i + 2, &typing, Some("alice"));
        conn.refill(now);
        requests::handle(&mut conn.session(), 0, env, &n, &mut local, now);
        routed.push((now, n.notices.borrow().len() - before));
        n.manual.advance(Duration::from_millis(10));
    }
    let total: usize = routed.iter().map(|r| r.1).sum();
    let last = routed.last().map_or(0, |r| r.0);
    assert_eq!(
        total,
        usize::from(bucket::BURST) + (last / bucket::REFILL_TICKS) as usize
    );
    let refused = conn
        .out
        .iter()
        .filter(|e| error_of(e).is_some_and(|e| e.0 == ErrorCode::RateLimited))
        .count();
    assert_eq!(refused + total, 300, "each typing is routed or refused");
}
