//! Malformed and oversized input in a loop, on every transport: each case
//! is one fresh connection that writes its bytes and reads to the close;
//! the answer must be the one protocol/README.md gives for it (§2.1 TCP
//! framing, §2.2 WebSocket and its close codes, §4 the handshake, §20
//! HTTP), or the refusal at the connection cap. Oversized cases send only
//! the header that claims the size: the server must refuse from the
//! header, without waiting for (or buffering) the body.

use std::sync::Arc;
use std::time::Duration;

use swiftlet_client::{pb, Body, Envelope};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::tally::Report;
use crate::wire::{self, frame, ws_frame, ws_header, ws_upgrade, Target};
use crate::Args;

#[derive(Clone, Copy, PartialEq)]
enum Port {
    Tcp,
    Ws,
    Http,
}

struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    /// The answer the spec gives, as [`wire::tcp_answer`] or
    /// [`wire::web_answer`] names it.
    expect: &'static str,
}

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

fn tcp_cases(t: &Target, lp: usize) -> Vec<Case> {
    let hello = frame(&t.hello("hostile-mal", &format!("mal-{lp}")));
    let logged_in = |tail: &[u8]| [hello.as_slice(), tail].concat();
    let mut oversized = varint(t.max_frame as u64 + 1);
    oversized.extend_from_slice(&[0u8; 16]);
    let mut hello0 = t.hello("hostile-mal", "mal");
    hello0.request_id = 0;
    let mut v2 = t.hello("hostile-mal", "mal");
    if let Some(Body::Hello(h)) = v2.body.as_mut() {
        h.protocol_version = 2;
    }
    vec![
        Case {
            name: "length over the maximum",
            bytes: oversized.clone(),
            expect: "FRAME_TOO_LARGE",
        },
        Case {
            name: "length 2^32-1",
            bytes: vec![0xff, 0xff, 0xff, 0xff, 0x0f],
            expect: "FRAME_TOO_LARGE",
        },
        Case {
            name: "6-byte length varint",
            bytes: vec![0x80, 0x80, 0x80, 0x80, 0x80, 0x01],
            expect: "MALFORMED_FRAME",
        },
        Case {
            name: "body not an Envelope",
            bytes: vec![8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            expect: "MALFORMED_FRAME",
        },
        Case {
            name: "request before Hello",
            bytes: frame(&Envelope::new(5, Body::Ping(pb::Ping { nonce: 1 }))),
            expect: "PROTOCOL_VIOLATION",
        },
        Case {
            name: "Hello with request_id 0",
            bytes: frame(&hello0),
            expect: "PROTOCOL_VIOLATION",
        },
        Case {
            name: "Hello of version 2",
            bytes: frame(&v2),
            expect: "UNSUPPORTED_VERSION",
        },
        Case {
            name: "logged in, then length over the maximum",
            bytes: logged_in(&oversized),
            expect: "FRAME_TOO_LARGE",
        },
        Case {
            name: "logged in, then a body not an Envelope",
            bytes: logged_in(&[8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            expect: "MALFORMED_FRAME",
        },
        Case {
            name: "logged in, then a second Hello",
            bytes: logged_in(&hello),
            expect: "PROTOCOL_VIOLATION",
        },
    ]
}

fn ws_cases(t: &Target) -> Vec<Case> {
    let up = ws_upgrade(t.http);
    let after_upgrade = |tail: &[u8]| [up.as_slice(), tail].concat();
    let ping = wire::envelope_bytes(&Envelope::new(5, Body::Ping(pb::Ping { nonce: 1 })));
    let no_key = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        t.http
    );
    let foreign = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nOrigin: https://evil.example\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        t.http
    );
    let mut fragmented = ws_frame(0x2, &ping, true);
    fragmented[0] &= 0x7f;
    let mut reserved = ws_frame(0x2, &ping, true);
    reserved[0] |= 0x40;
    vec![
        Case {
            name: "upgrade without Sec-WebSocket-Key",
            bytes: no_key.into_bytes(),
            expect: "http 400",
        },
        Case {
            name: "upgrade from a foreign Origin",
            bytes: foreign.into_bytes(),
            expect: "http 403",
        },
        Case {
            name: "binary message over the maximum",
            bytes: after_upgrade(&ws_header(0x82, t.max_frame as u64 + 1, true)),
            expect: "FRAME_TOO_LARGE/1009",
        },
        Case {
            name: "64-bit length 2^62",
            bytes: after_upgrade(&ws_header(0x82, 1 << 62, true)),
            expect: "FRAME_TOO_LARGE/1009",
        },
        Case {
            name: "unmasked frame",
            bytes: after_upgrade(&ws_frame(0x2, &ping, false)),
            expect: "MALFORMED_FRAME/1002",
        },
        Case {
            name: "fragmented message",
            bytes: after_upgrade(&fragmented),
            expect: "MALFORMED_FRAME/1002",
        },
        Case {
            name: "reserved bits",
            bytes: after_upgrade(&reserved),
            expect: "MALFORMED_FRAME/1002",
        },
        Case {
            name: "ping frame over 125 bytes",
            bytes: after_upgrade(&ws_frame(0x9, &[0u8; 200], true)),
            expect: "MALFORMED_FRAME/1002",
        },
        Case {
            name: "text message",
            bytes: after_upgrade(&ws_frame(0x1, b"hello", true)),
            expect: "MALFORMED_FRAME/1003",
        },
        Case {
            name: "binary message not an Envelope",
            bytes: after_upgrade(&ws_frame(0x2, &[0xff; 8], true)),
            expect: "MALFORMED_FRAME/1007",
        },
        Case {
            name: "request before Hello",
            bytes: after_upgrade(&ws_frame(0x2, &ping, true)),
            expect: "PROTOCOL_VIOLATION/1008",
        },
    ]
}

fn http_cases(t: &Target) -> Vec<Case> {
    let host = t.http;
    let auth = format!("Authorization: Bearer {}\r\n", t.token("hostile-mal"));
    let long_head = format!(
        "GET /v1/sync HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nX-Filler: {}\r\n\r\n",
        "a".repeat(9 * 1024)
    );
    let many_headers: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let send_json =
        r#"{"clientMsgId":"m1","toUser":"bob","contentType":"text/plain","body":"aGk="}"#;
    vec![
        Case { name: "head over 8 KiB", bytes: long_head.into_bytes(), expect: "http 413" },
        Case {
            name: "Content-Length not a number",
            bytes: format!("POST /v1/messages HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{auth}Content-Length: abc\r\n\r\n{send_json}")
                .into_bytes(),
            expect: "http 400",
        },
        Case {
            name: "chunked body",
            bytes: format!(
                "POST /v1/messages HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{auth}Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
            )
            .into_bytes(),
            expect: "http 400",
        },
        Case {
            name: "body over the limit",
            bytes: format!("POST /v1/messages HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{auth}Content-Length: 10000000\r\n\r\n{{")
                .into_bytes(),
            expect: "http 413",
        },
        Case {
            name: "body not JSON",
            bytes: format!("POST /v1/messages HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{auth}Content-Length: 9\r\n\r\nnot json!")
                .into_bytes(),
            expect: "http 400",
        },
        Case { name: "garbage request line", bytes: b"\x16\x03\x01\x00\xa5garbage\r\n\r\n".to_vec(), expect: "http 400" },
        Case {
            name: "too many headers",
            bytes: format!("GET /v1/sync HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{many_headers}\r\n").into_bytes(),
            expect: "http 400",
        },
        Case {
            name: "no Authorization",
            bytes: format!("GET /v1/sync HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes(),
            expect: "http 401",
        },
        Case {
            name: "unknown path",
            bytes: format!("GET /etc/passwd HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").into_bytes(),
            expect: "http 404",
        },
    ]
}

pub async fn run(
    target: Arc<Target>,
    args: Args,
    report: Arc<Report>,
    stop: watch::Receiver<bool>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for lp in 0..args.malformed {
        for port in [Port::Tcp, Port::Ws, Port::Http] {
            let (target, report, stop) = (target.clone(), report.clone(), stop.clone());
            tasks.spawn(async move { run_loop(port, lp, &target, &report, stop).await });
        }
    }
    while tasks.join_next().await.is_some() {}
}

async fn run_loop(
    port: Port,
    lp: usize,
    target: &Target,
    report: &Report,
    mut stop: watch::Receiver<bool>,
) {
    let (kind, cases) = match port {
        Port::Tcp => ("malformed_tcp", tcp_cases(target, lp)),
        Port::Ws => ("malformed_ws", ws_cases(target)),
        Port::Http => ("malformed_http", http_cases(target)),
    };
    let mut i = lp; // the loops of one transport start at different cases
    while !*stop.borrow() {
        let case = &cases[i % cases.len()];
        i += 1;
        let mut s = match target.connect(port != Port::Tcp).await {
            Ok(s) => s,
            Err(e) => {
                report.count(kind, &format!("connect error: {}", e.kind()), 1);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        report.count(kind, "connections", 1);
        // A connection refused at the cap is answered at once: don't write
        // into it (the server reads nothing from it, and unread input
        // makes its close a reset).
        let refused = tokio::time::timeout(Duration::from_millis(2), s.readable())
            .await
            .is_ok();
        if !refused && s.write_all(&case.bytes).await.is_err() {
            report.count(kind, "write errors", 1);
        }
        let (got, end) = tokio::select! {
            r = wire::read_to_end(&mut s, wire::ANSWER_WAIT) => r,
            _ = stop.changed() => break,
        };
        let answer = if port == Port::Tcp {
            wire::tcp_answer(&got, end)
        } else {
            wire::web_answer(&got, end)
        };
        let at_cap = answer == "TOO_MANY_CONNECTIONS" || answer == "http 503";
        let allowed = answer == case.expect || at_cap;
        if at_cap {
            report.answer(kind, &format!("refused at the cap: {answer}"), true);
        } else {
            report.answer(kind, &format!("{}: {answer}", case.name), allowed);
        }
    }
}
