//! `<state_dir>/protect.json`: the declared SHA-256 of every protected file
//! and the open approval windows, so that a restart can tell what changed
//! while the daemon was down and close a window the daemon's death
//! interrupted.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

pub const STATE_FILE: &str = "protect.json";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    #[serde(default)]
    pub version: u32,
    /// Configured path → its declared state.
    #[serde(default)]
    pub files: BTreeMap<String, Declared>,
    /// Windows open when this was written.
    #[serde(default)]
    pub windows: Vec<WindowRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Declared {
    pub sha256: String,
    pub tier: String,
    /// Kernel encoding (`major << 20 | minor`).
    pub dev: u32,
    pub ino: u64,
    pub declared_at: String,
    /// Watched files: content already reported as drift (so a restart
    /// doesn't report it again as new).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift_sha256: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowRecord {
    pub path: String,
    pub opened_at: String,
    /// Wall-clock end, ms since the epoch.
    pub until_unix_ms: u64,
    pub reason: String,
    pub by_uid: u32,
    pub via: String,
}

impl State {
    /// Loads the state; a missing file is an empty state, an unreadable or
    /// corrupt one an error (the caller reports it and starts afresh).
    pub fn load(path: &Path) -> Result<State> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is corrupt", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(anyhow::Error::new(e).context(format!("reading {}", path.display()))),
        }
    }

    /// Writes atomically: temp file, fsync, rename, fsync of the directory.
    /// The file's bytes (version stamped).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut s = self.clone();
        s.version = 1;
        Ok(serde_json::to_vec_pretty(&s)?)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        crate::statefile::write_atomic(path, &self.to_bytes()?)
    }
}
