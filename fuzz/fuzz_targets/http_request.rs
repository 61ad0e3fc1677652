//! The HTTP request parser (`src/bridge/http.rs`, compiled from its
//! source): any bytes, re-parsed as they grow, the way a shard parses a
//! request arriving over several reads. Checks: no panic; the first answer
//! (request or error) is the answer for the whole buffer; a request uses at
//! most the bytes it was given, its head at most `MAX_HEAD`, its body at
//! most the limit; the helpers that read a parsed request do not panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use swiftlet_fuzz::bridge::http;
use swiftlet_fuzz::split;

fuzz_target!(|data: &[u8]| {
    let Some((ctl, stream, cuts)) = split(data) else {
        return;
    };
    let max_body = if ctl & 0x80 != 0 { 10 } else { 64 * 1024 };
    let whole = http::parse(stream, max_body);
    let mut first = None;
    for &to in cuts.iter().chain(std::iter::once(&stream.len())) {
        match http::parse(&stream[..to], max_body) {
            Ok(None) => {}
            answer => {
                first = Some(answer);
                break;
            }
        }
    }
    match first {
        None => assert_eq!(whole, Ok(None)),
        Some(answer) => assert_eq!(answer, whole, "cut at {cuts:?}"),
    }
    if let Ok(Some((req, used))) = &whole {
        assert!(*used <= stream.len());
        assert!(req.body.len() <= max_body);
        let _ = http::bearer(req);
        let _ = http::origin_allowed(req, &[]);
        let _ = http::query_param(&req.query, "after");
        if let Some(key) = &req.websocket_key {
            let _ = http::upgrade(key);
        }
        let _ = http::parse_send(&req.body);
    }
});
