//! The configuration as an operator meets it, through the real binary:
//! `swiftlet config --print-defaults` and README.md's table agree, what it
//! prints `--config` reads back, bad keys and values are refused naming the
//! key, and `--log-format json` logs JSON lines.

use std::collections::{BTreeMap, BTreeSet};
use std::io::BufRead;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use swiftlet::Config;

const BIN: &str = env!("CARGO_BIN_EXE_swiftlet");

/// The binary with none of the test environment's `SWIFTLET_*` variables
/// (they would change what it prints) and with `info` logs.
fn swiftlet(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("SWIFTLET_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_LOG", "info").env_remove("RUST_BACKTRACE");
    cmd.args(args);
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().expect("run swiftlet")
}

fn stdout_of(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// What `--print-defaults` printed: each key with its value as README.md
/// writes it (strings without their quotes), and the keys that are unset.
struct Printed {
    values: BTreeMap<String, String>,
    unset: BTreeSet<String>,
}

fn parse_printed(text: &str) -> Printed {
    let mut values = BTreeMap::new();
    let mut unset = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            if let Some((key, _)) = rest.split_once(" is unset: ") {
                unset.insert(key.to_owned());
            }
            continue;
        }
        let table: toml::Table = toml::from_str(line).expect("one key = value per line");
        for (key, value) in table {
            let shown = match value {
                toml::Value::String(s) => s,
                other => other.to_string(),
            };
            values.insert(key, shown);
        }
    }
    Printed { values, unset }
}

/// One row of README.md's configuration table.
struct Row {
    key: String,
    flag: String,
    env: String,
    default: String,
}

/// The table under README.md's `## Configuration` heading.
fn readme_rows() -> Vec<Row> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let section = &readme[readme
        .find("\n## Configuration\n")
        .expect("a Configuration section")..];
    let table = section
        .lines()
        .skip_while(|l| !l.starts_with("| key |"))
        .take_while(|l| l.starts_with('|'))
        .skip(2);
    let code = |cell: &str| cell.trim().trim_matches('`').to_owned();
    let rows: Vec<Row> = table
        .map(|line| {
            let cells: Vec<&str> = line.trim_matches('|').split(" | ").collect();
            assert!(cells.len() >= 5, "a row of five cells: {line}");
            Row {
                key: code(cells[0]),
                flag: code(cells[1]),
                env: code(cells[2]),
                default: cells[3].trim().to_owned(),
            }
        })
        .collect();
    assert!(rows.len() > 20, "found the table ({} rows)", rows.len());
    rows
}

#[test]
fn the_readme_table_agrees_with_the_printed_defaults() {
    let text = stdout_of(&mut swiftlet(&["config", "--print-defaults"]));
    assert_eq!(
        text,
        Config::default().to_toml().expect("toml"),
        "with nothing given, the command prints the defaults"
    );
    let printed = parse_printed(&text);
    let help = stdout_of(&mut swiftlet(&["serve", "--help"]));
    let rows = readme_rows();

    let mut documented = BTreeSet::new();
    for row in &rows {
        // Every flag and variable of the table is one `serve` takes.
        assert!(
            help.contains(&format!("{} ", row.flag)) || help.contains(&format!("{}\n", row.flag)),
            "README's {} is not a flag of `swiftlet serve`",
            row.flag
        );
        assert!(
            // (`[env: X]` when clap hides its value, as for the secret)
            help.contains(&format!("[env: {}=", row.env))
                || help.contains(&format!("[env: {}]", row.env)),
            "README's {} is not a variable of `swiftlet serve`",
            row.env
        );
        if row.key.is_empty() {
            continue;
        }
        assert!(documented.insert(row.key.clone()), "{} twice", row.key);
        if let Some(value) = printed.values.get(&row.key) {
            let first_code = row.default.split('`').nth(1).unwrap_or_default();
            assert_eq!(
                first_code, value,
                "README's default of {} is {:?}; the server's is {value}",
                row.key, row.default
            );
        } else if printed.unset.contains(&row.key) {
            assert!(
                row.default.starts_with("unset"),
                "{} is unset by default; README says {:?}",
                row.key,
                row.default
            );
        } else {
            panic!(
                "README documents a key {:?} the server does not have",
                row.key
            );
        }
        if row.key != "allowed_origins" {
            assert_eq!(row.flag, format!("--{}", row.key.replace('_', "-")));
            assert_eq!(row.env, format!("SWIFTLET_{}", row.key.to_uppercase()));
        }
    }
    let keys: BTreeSet<String> = printed
        .values
        .keys()
        .chain(&printed.unset)
        .cloned()
        .collect();
    let missing: Vec<_> = keys.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "keys README does not document: {missing:?}"
    );
}

#[test]
fn what_is_printed_reads_back_with_file_env_and_flags_resolved_as_serve_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("in.toml");
    std::fs::write(
        &file,
        "shards = 3\nidle_timeout_ms = 5000\ncluster = \"redis://10.1.1.1:6379\"\n\
         jwt_secret = \"file-secret-xyz\"\n",
    )
    .expect("write");
    let file = file.to_str().expect("utf-8 path");
    let text = stdout_of(
        swiftlet(&[
            "config",
            "--print-defaults",
            "--config",
            file,
            "--idle-timeout-ms",
            "7000",
            "--wal-sync",
        ])
        .env("SWIFTLET_SHARDS", "4")
        .env("SWIFTLET_MAX_FRAME", "131072"),
    );
    let printed = parse_printed(&text).values;
    let value = |k: &str| printed.get(k).map(String::as_str);
    assert_eq!(value("shards"), Some("4"), "env over the file");
    assert_eq!(value("idle_timeout_ms"), Some("7000"), "flag over the file");
    assert_eq!(value("max_frame"), Some("131072"), "env over the default");
    assert_eq!(value("wal_sync"), Some("always"), "a bare --wal-sync");
    assert_eq!(value("cluster"), Some("redis://10.1.1.1:6379"), "the file");
    assert_eq!(value("lease_ms"), Some("15000"), "the default");
    assert!(
        !text.contains("file-secret-xyz"),
        "the secret leaked:\n{text}"
    );
    assert!(text.contains("# jwt_secret is set"), "{text}");

    let out = dir.path().join("out.toml");
    std::fs::write(&out, &text).expect("write");
    let out = out.to_str().expect("utf-8 path");
    let again = stdout_of(
        swiftlet(&["config", "--print-defaults", "--config", out])
            .env("SWIFTLET_JWT_SECRET", "file-secret-xyz"),
    );
    assert_eq!(
        again, text,
        "the printed file reads back to the same configuration"
    );
}

#[test]
fn bad_keys_and_values_are_refused_at_start_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let refused = |cmd: &mut Command, names: &[&str]| {
        let out = run(cmd);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd:?} was accepted");
        for name in names {
            assert!(err.contains(name), "{cmd:?}: {err:?} does not name {name}");
        }
    };
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path.to_str().expect("utf-8 path").to_owned()
    };
    let unknown = file("unknown.toml", "shards = 2\nshardz = 1\n");
    let mistyped = file("mistyped.toml", "max_frame = \"big\"\n");
    let out_of_range = file("range.toml", "lease_ms = 10\n");
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf-8 path");
    refused(
        &mut swiftlet(&["config", "--print-defaults", "--config", &unknown]),
        &["unknown field", "shardz"],
    );
    refused(
        &mut swiftlet(&["config", "--print-defaults", "--config", &mistyped]),
        &["max_frame"],
    );
    refused(
        &mut swiftlet(&["config", "--print-defaults", "--config", &out_of_range]),
        &["lease_ms", "--lease-ms", "SWIFTLET_LEASE_MS"],
    );
    refused(
        swiftlet(&["config", "--print-defaults"]).env("SWIFTLET_NODE_ID", "1024"),
        &["node_id"],
    );
    refused(
        swiftlet(&["config", "--print-defaults"]).env("SWIFTLET_SHARDS", "many"),
        &["--shards"],
    );
    // `serve` refuses the same before it opens anything.
    refused(
        &mut swiftlet(&["serve", "--data-dir", data, "--config", &unknown]),
        &["shardz"],
    );
    refused(
        &mut swiftlet(&["serve", "--data-dir", data, "--max-frame", "10"]),
        &["max_frame", "--max-frame"],
    );
    assert!(
        !dir.path().join("data").exists(),
        "a refused start created its data directory"
    );
}

/// Starts `serve` with `cmd`'s logging options and returns its first log
/// line on stderr, then stops it.
fn first_log_line(cmd: &mut Command) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = cmd
        .args([
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--shards",
            "1",
        ])
        .args(["--jwt-secret", "log-test-secret", "--data-dir"])
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn swiftlet serve");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(30));
    let _ = child.kill();
    let _ = child.wait();
    line.expect("a log line within 30 s").expect("utf-8 stderr")
}

#[test]
fn log_format_json_logs_one_json_object_per_line() {
    for cmd in [swiftlet(&["serve", "--log-format", "json"]), {
        let mut c = swiftlet(&["serve"]);
        c.env("SWIFTLET_LOG_FORMAT", "json");
        c
    }] {
        let mut cmd = cmd;
        let line = first_log_line(&mut cmd);
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{cmd:?}: not JSON ({e}): {line}"));
        assert_eq!(v["level"], "INFO", "{line}");
        assert_eq!(v["message"], "swiftlet serving", "{line}");
        assert!(
            v["timestamp"].is_string() && v["target"].is_string(),
            "{line}"
        );
        assert!(v["addr"].is_string(), "the event's fields: {line}");
    }
    let text = first_log_line(&mut swiftlet(&["serve"]));
    assert!(
        serde_json::from_str::<serde_json::Value>(&text).is_err() && text.contains("INFO"),
        "text is the default: {text}"
    );
    let bad = run(&mut swiftlet(&[
        "--log-format",
        "xml",
        "config",
        "--print-defaults",
    ]));
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--log-format"));
}
