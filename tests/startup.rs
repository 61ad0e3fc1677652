//! Starts that must be refused, each with a typed error naming the problem:
//! a port someone already serves (which `SO_REUSEPORT` would otherwise
//! share silently), dev-auth on an address others can reach, a secret file
//! others can read.

mod common;

use common::*;
use swiftlet::config::ConfigError;
use swiftlet::{Config, ServerError};

/// A config of its own (data dir, free ports) for a second server.
fn other_config(dir: &tempfile::TempDir) -> Config {
    test_config(dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_ports_of_the_first_is_refused() {
    let first = TestServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let refused = |config: Config| match swiftlet::start(config) {
        Err(ServerError::AddrInUse { addr }) => addr,
        Err(e) => panic!("expected AddrInUse, got {e:?}"),
        Ok(_) => panic!("a second server started on a port the first serves"),
    };
    let both = Config {
        listen: first.addr(),
        http: first.http_addr(),
        ..other_config(&dir)
    };
    assert_eq!(refused(both), first.addr());
    let http_only = Config {
        http: first.http_addr(),
        ..other_config(&dir)
    };
    assert_eq!(refused(http_only), first.http_addr());

    // Not only another swiftlet: any listener.
    let plain = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = plain.local_addr().expect("addr");
    assert_eq!(
        refused(Config {
            listen: taken,
            ..other_config(&dir)
        }),
        taken
    );

    // The first server still has its port to itself and serves.
    let (alice, _rx) = first.connect("alice", "phone").await;
    alice.ping().await.expect("the first server still answers");
    // And its ports are free again once it stops (its connections' TIME_WAIT
    // does not count).
    let (addr, http) = (first.addr(), first.http_addr());
    alice.close().await;
    drop(first);
    let again = swiftlet::start(Config {
        listen: addr,
        http,
        ..other_config(&dir)
    })
    .expect("the ports are free once the first server stopped");
    tokio::task::block_in_place(|| again.shutdown());
}

#[test]
fn dev_auth_on_a_public_address_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let public = Config {
        listen: "0.0.0.0:0".parse().expect("addr"),
        dev_auth: true,
        ..other_config(&dir)
    };
    match swiftlet::start(public.clone()) {
        Err(ServerError::Config(ConfigError::DevAuthPublic { addr })) => {
            assert_eq!(addr, public.listen)
        }
        Err(e) => panic!("expected DevAuthPublic, got {e:?}"),
        Ok(_) => panic!("dev-auth served on 0.0.0.0"),
    }
    let allowed = swiftlet::start(Config {
        dev_auth_public: true,
        ..public
    })
    .expect("allowed explicitly");
    allowed.shutdown();
}

#[test]
fn a_secret_file_others_can_read_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("jwt.secret");
    std::fs::write(&path, "0123456789abcdef0123456789abcdef").expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let config = Config {
        jwt_secret: None,
        ..other_config(&dir)
    };
    match swiftlet::start(config.clone()) {
        Err(ServerError::Config(ConfigError::SecretFileExposed { path: p, mode })) => {
            assert_eq!((p, mode), (path.clone(), 0o644));
        }
        Err(e) => panic!("expected SecretFileExposed, got {e:?}"),
        Ok(_) => panic!("started with a world-readable secret"),
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    swiftlet::start(config)
        .expect("owner-only is fine")
        .shutdown();
}

/// Section 4, "The secret": without a configured secret the server creates
/// `<data-dir>/jwt.secret` holding 64 hex characters, and the key is that
/// text as it is (not the bytes it encodes), whitespace around it aside: a
/// backend minting with the file's text logs its users in, also after the
/// file gained surrounding whitespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_generated_secret_file_is_the_key_as_text() {
    let mut srv = TestServer::start_with(|c| c.jwt_secret = None);
    let path = srv.dir.path().join("jwt.secret");
    let text = std::fs::read_to_string(&path).expect("the secret file");
    let key = text.trim();
    assert!(
        key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()),
        "{text:?}"
    );
    let minted = swiftlet_protocol::token::mint(key.as_bytes(), "mia", 3600);
    let login = |addr: std::net::SocketAddr, token: String| async move {
        let mut raw = Raw::connect(addr).await;
        raw.hello(1, &token).await;
        raw.recv().await.and_then(|e| e.body)
    };
    assert!(matches!(
        login(srv.addr(), minted.clone()).await,
        Some(swiftlet_protocol::Body::Welcome(_))
    ));
    // Not the 32 bytes the text encodes.
    let bytes: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&key[2 * i..2 * i + 2], 16).expect("hex"))
        .collect();
    let wrong = swiftlet_protocol::token::mint(&bytes, "mia", 3600);
    assert!(matches!(
        login(srv.addr(), wrong).await,
        Some(swiftlet_protocol::Body::Error(e)) if e.code == swiftlet_protocol::ErrorCode::AuthFailed as i32
    ));
    let (addr, http) = (srv.addr(), srv.http_addr());
    srv.stop();
    std::fs::write(&path, format!("  {key}\n\n")).expect("rewrite");
    srv.config.listen = addr;
    srv.config.http = http;
    srv.server = Some(swiftlet::start(srv.config.clone()).expect("restart"));
    assert!(matches!(
        login(srv.addr(), minted).await,
        Some(swiftlet_protocol::Body::Welcome(_))
    ));
}
