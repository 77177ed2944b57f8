//! A stand-in for `governor mcp` with no daemon behind it, to exercise the
//! MCP layer from real clients (tests/mcp/client.py): it answers every call
//! with the call object itself, and refuses a `kill_switch_engage` whose
//! reason is "fail" the way the daemon refuses, with a message.

use std::sync::Arc;

use governor_mcp::Backend;
use serde_json::{json, Value};

struct Echo;

impl Backend for Echo {
    fn call(&self, call: Value) -> Result<Value, String> {
        if call["tool"] == "kill_switch_engage" && call["reason"] == "fail" {
            return Err("refused: the fake daemon was told to fail".into());
        }
        Ok(json!({ "call": call }))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    governor_mcp::serve_stdio(Arc::new(Echo)).await
}
