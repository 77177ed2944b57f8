//! One control-socket request line, as the daemon's socket thread parses
//! it (`serde_json::from_slice::<Request>`): any bytes give a request or an
//! error, and a request that parsed survives a round trip unchanged (the
//! CLI serializes what the daemon parses).
#![no_main]

use governor::control::Request;
use libfuzzer_sys::fuzz_target;

fn check(bytes: &[u8]) {
    let Ok(req) = serde_json::from_slice::<Request>(bytes) else {
        return;
    };
    let json = serde_json::to_vec(&req).expect("a parsed request serializes");
    let back: Request = serde_json::from_slice(&json).unwrap_or_else(|e| {
        panic!(
            "the JSON of a parsed request does not parse again ({e}): {}",
            String::from_utf8_lossy(&json)
        )
    });
    assert_eq!(back, req, "request changed in a round trip");
    if let Request::Mcp { call } = &req {
        let _ = call.tool();
    }
}

fuzz_target!(|data: &[u8]| {
    // The bytes as they are, and the first line as the daemon cuts it.
    check(data);
    if let Some(line) = data.split(|&b| b == b'\n').next() {
        if line.len() != data.len() {
            check(line);
        }
    }
});
