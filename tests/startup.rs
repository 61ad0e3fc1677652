//! Starts that must be refused, each with a typed error naming the problem:
//! dev-auth on an address others can reach, a secret file others can read.

mod common;

use common::*;
use swiftlet::config::ConfigError;
use swiftlet::{Config, ServerError};

/// A config of its own (data dir, free ports) for a second server.
fn other_config(dir: &tempfile::TempDir) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().expect("addr"),
        http: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.path().to_owned(),
        shards: 2,
        jwt_secret: Some(SECRET.into()),
        ..Config::default()
    }
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
