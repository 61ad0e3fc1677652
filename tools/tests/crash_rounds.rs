//! The short form of the crash rounds (the full form is
//! `tools/scripts/crash-rounds.sh`, 20 rounds, a documented benchmark):
//! `swiftlet-exercise crash-rounds --rounds 3` against the real server
//! binary, which it starts, `kill -9`s at seeded random moments under mixed
//! 1:1 and group traffic from 8 users with 3 devices each, and restarts on
//! the same data. After every restart it verifies that each acknowledged
//! message is in every inbox it was for exactly once and that every
//! device's stream is gap-free and in order (see the tool's `verify` and
//! `stream` modules); it exits non-zero if not. A few seconds per round.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

/// The server binary, built beside this package's binaries by
/// `cargo nextest run --workspace` (the root package's tests need it).
fn server_bin() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_swiftlet-exercise")).with_file_name("swiftlet");
    assert!(
        bin.is_file(),
        "{} is missing: build the workspace (cargo build --release --workspace), \
         which the README's test command does",
        bin.display()
    );
    bin
}

#[test]
fn three_kill_9_rounds_lose_and_duplicate_nothing() {
    let out = Command::new(env!("CARGO_BIN_EXE_swiftlet-exercise"))
        .args([
            "crash-rounds",
            "--rounds",
            "3",
            "--users",
            "8",
            "--groups",
            "2",
        ])
        .args([
            "--kill-min-ms",
            "300",
            "--kill-max-ms",
            "1500",
            "--after-restart-ms",
            "1000",
        ])
        .arg("--server-bin")
        .arg(server_bin())
        .output()
        .expect("run swiftlet-exercise");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "swiftlet-exercise failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let summary: Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON summary on the last line:\n{stdout}"));
    assert_eq!(summary["rounds"], 3, "{summary}");
    assert_eq!(summary["passed"], true, "{summary}");
    assert_eq!(summary["violations"], 0, "{summary}");
    assert_eq!(summary["unresolved"], 0, "{summary}");
    // The rounds did something: messages were acknowledged, delivered to
    // every device, and acknowledged sends re-sent after a restart got
    // their first Ack again.
    assert!(summary["acked"].as_u64().unwrap_or(0) > 100, "{summary}");
    assert!(
        summary["delivered"].as_u64().unwrap_or(0) > summary["acked"].as_u64().unwrap_or(0),
        "{summary}"
    );
    assert!(
        summary["resent_same_ack"].as_u64().unwrap_or(0) > 0,
        "{summary}"
    );
}
