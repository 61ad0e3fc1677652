//! The handshake's input: a frame decoded as an Envelope and, when it is a
//! Hello, its token verified the way the server verifies it
//! (`swiftlet_protocol::token::verify`, HS256 with a fixed secret). Also the
//! whole input as a token, so libFuzzer reaches the JWT parser directly.
//! Checks: no panic; a token verifies only with a valid signature, which
//! random bytes never have (a token the fuzzer forges would be a finding);
//! a decoded Envelope re-encodes to itself.
//!
//! What the server then does with the Hello (device id rules, the version
//! check, the session's state) lives in the `swiftlet` crate, which links
//! RocksDB; `src/session/request_props.rs` covers it with proptest instead.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use swiftlet_protocol::codec::decode_frame;
use swiftlet_protocol::token;
use swiftlet_protocol::{Body, Envelope};

const SECRET: &[u8] = b"fuzz-secret-never-used-elsewhere";

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        assert!(
            token::verify(SECRET, text).is_err(),
            "forged token accepted: {text:?}"
        );
    }
    // Bare Envelope (the WebSocket form) and framed (the TCP form).
    let bare = Envelope::decode(data).ok();
    let framed = decode_frame(data, 64 * 1024).ok().flatten().map(|(e, _)| e);
    for env in bare.into_iter().chain(framed) {
        assert_eq!(
            Envelope::decode(env.encode_to_vec().as_slice()).ok(),
            Some(env.clone())
        );
        if let Some(Body::Hello(hello)) = &env.body {
            assert!(
                token::verify(SECRET, &hello.token).is_err(),
                "forged token accepted"
            );
        }
    }
});
