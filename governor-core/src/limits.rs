//! A service's effective limits, after tiers and per-service overrides.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What to do when a service enters a crash loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CrashLoopAction {
    /// Alert and audit only.
    #[default]
    Alert,
    /// Also stop the service through its supervisor after `stop_after`
    /// further crashes.
    Stop,
}

/// Effective limits of one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub window: Duration,
    pub max_restarts: u32,
    pub memory_ceiling: u64,
    pub stable_after: Duration,
    pub action: CrashLoopAction,
    pub stop_after: u32,
    pub critical: bool,
}
