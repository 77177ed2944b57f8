//! `governor.toml` as `governor run` / `check-config` / SIGHUP read it:
//! any text parses to a config or to a located error, never a panic.
//!
//! Non-UTF-8 input is skipped: the daemon reads the file with
//! `read_to_string`, which refuses it before the parser sees a byte.
#![no_main]

use std::path::Path;

use governor::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(Path::new("fuzz.toml"), src) {
        Ok(cfg) => {
            // What the daemon derives from a config right after loading it.
            let _ = cfg.limits_for(None);
            let _ = cfg.mem_limits_for(None);
            for svc in &cfg.services {
                let _ = cfg.limits_for(Some(svc));
                let _ = cfg.mem_limits_for(Some(svc));
                let _ = cfg.owner_of(svc);
            }
            let _ = governor::proctable::matcher(&cfg);
            let _ = governor::config::config_hash(src);
        }
        Err(e) => {
            // The error is shown as file:line:col: key `k`: reason.
            let _ = e.to_string();
        }
    }
});
