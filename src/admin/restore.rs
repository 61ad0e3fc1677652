//! `swiftlet admin restore`: put a backup (see [`super::backup_into`]) in
//! place as a stopped node's data, keeping what was there.
//!
//! The steps, each refused before anything changes when it cannot work:
//! the backup must hold a database (`db/CURRENT`); a database already at
//! the target is only replaced with `--force`, and never while a server
//! has it open (its RocksDB lock is tried first); it is then renamed to
//! `db.before-restore-<unix seconds>`, not deleted. The backup is copied
//! (not moved: it stays a backup), opened once to check it, and its
//! `jwt.secret` copied when the target has none.
//!
//! A backup taken from a node with `--wal-dir` holds its WAL inside `db/`:
//! start the restored node without `--wal-dir`.

use std::path::{Path, PathBuf};

use crate::store::{Store, StoreOptions};

/// Why a restore was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(
        "{0} holds no backup (no db/CURRENT): give the directory `swiftlet admin backup` wrote"
    )]
    NotABackup(PathBuf),
    #[error("{0} already holds a database: stop its server, then restore with --force (it is kept as db.before-restore-<time>)")]
    TargetExists(PathBuf),
    #[error("the database in {0} is open (is its server running?): stop it first: {1}")]
    InUse(PathBuf, String),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("the restored database does not open: {0}")]
    Open(String),
}

/// What a restore did.
#[derive(Debug)]
pub struct Restored {
    /// Where the database that was there before went.
    pub kept: Option<PathBuf>,
    pub secret_copied: bool,
}

fn io(what: &str, p: &Path) -> impl FnOnce(std::io::Error) -> RestoreError {
    let what = format!("{what} {}", p.display());
    move |e| RestoreError::Io(what, e)
}

/// Restore the backup in `from` into data directory `data_dir`.
pub fn restore(from: &Path, data_dir: &Path, force: bool) -> Result<Restored, RestoreError> {
    let src = from.join("db");
    if !src.join("CURRENT").is_file() {
        return Err(RestoreError::NotABackup(from.to_owned()));
    }
    let target = data_dir.join("db");
    let mut kept = None;
    if target.exists() {
        if !force {
            return Err(RestoreError::TargetExists(data_dir.to_owned()));
        }
        // Opening takes RocksDB's lock: it fails while a server holds it.
        match rocksdb::DB::list_cf(&rocksdb::Options::default(), &target) {
            Ok(cfs) => {
                let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), &target, cfs)
                    .map_err(|e| RestoreError::InUse(target.clone(), e.to_string()))?;
                drop(db);
            }
            Err(e) if target.join("CURRENT").exists() => {
                return Err(RestoreError::InUse(target.clone(), e.to_string()))
            }
            Err(_) => {}
        }
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let aside = data_dir.join(format!("db.before-restore-{secs}"));
        std::fs::rename(&target, &aside).map_err(io("moving aside", &target))?;
        kept = Some(aside);
    }
    std::fs::create_dir_all(&target).map_err(io("creating", &target))?;
    for entry in std::fs::read_dir(&src).map_err(io("reading", &src))? {
        let entry = entry.map_err(io("reading", &src))?;
        let path = entry.path();
        if path.is_file() {
            let to = target.join(entry.file_name());
            std::fs::copy(&path, &to).map_err(io("copying", &path))?;
        }
    }
    let synced = std::fs::File::open(&target).and_then(|d| d.sync_all());
    synced.map_err(io("syncing", &target))?;
    // Open once: a copy that does not open is reported now, not at start.
    let store = Store::open(&target, &StoreOptions::default())
        .map_err(|e| RestoreError::Open(e.to_string()))?;
    store
        .mark_clean_shutdown()
        .map_err(|e| RestoreError::Open(e.to_string()))?;
    drop(store);
    let secret = from.join("jwt.secret");
    let mine = data_dir.join("jwt.secret");
    let secret_copied = secret.is_file() && !mine.exists();
    if secret_copied {
        super::copy_private(&secret, &mine).map_err(io("copying", &secret))?;
    }
    Ok(Restored {
        kept,
        secret_copied,
    })
}
