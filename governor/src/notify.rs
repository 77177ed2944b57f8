//! systemd's side of the daemon (`Type=notify`, `WatchdogSec=`): READY=1
//! once the programs are loaded, the flags applied and the control socket
//! answers; WATCHDOG=1 from the event loop itself at half the interval
//! systemd asks for, so a wedged loop stops the pings and systemd restarts
//! the daemon; STOPPING=1 on the way out. Without `NOTIFY_SOCKET` (not
//! under systemd) every call is a no-op.

use std::{path::Path, time::Duration};

use sd_notify::NotifyState;

/// READY=1, with a status line saying where the socket is.
pub fn ready(socket: &Path) {
    let status = format!("serving {}", socket.display());
    if let Err(e) = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(&status)]) {
        log::warn!("sd_notify READY=1: {e}");
    }
}

pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
}

/// The watchdog pinger: a timer the event loop selects on, so the pings
/// come from the loop (not a thread that would keep pinging while the
/// loop is stuck).
pub struct Watchdog {
    every: Option<tokio::time::Interval>,
}

impl Watchdog {
    /// From `WATCHDOG_USEC` / `WATCHDOG_PID` (set by systemd for this pid).
    pub fn from_env() -> Self {
        let every = sd_notify::watchdog_enabled().map(|d| {
            let half = (d / 2).max(Duration::from_millis(50));
            log::info!(
                "systemd watchdog: {} ms, pinging every {} ms",
                d.as_millis(),
                half.as_millis()
            );
            let mut i = tokio::time::interval(half);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        Watchdog { every }
    }

    /// Resolves when a ping is due; never when there is no watchdog.
    pub async fn tick(&mut self) {
        match &mut self.every {
            Some(i) => {
                i.tick().await;
            }
            None => std::future::pending().await,
        }
    }

    pub fn ping(&self) {
        if let Err(e) = sd_notify::notify(&[NotifyState::Watchdog]) {
            log::warn!("sd_notify WATCHDOG=1: {e}");
        }
    }
}
