//! governor's MCP server: what `governor mcp` runs for an agent's MCP client.
//!
//! The agent's client spawns `governor mcp` and speaks MCP (JSON-RPC over
//! stdin/stdout); each tool call becomes one `{"tool": NAME, ...args}` object
//! that a [`Backend`] forwards to the governor daemon, which answers it for
//! the calling agent. This process decides nothing: it describes the tools,
//! checks their arguments, and relays.
//!
//! Why a crate of its own, with no dependency on the daemon: the MCP SDK
//! (`rmcp`) moves fast and brings a lot with it. Kept here behind a two-item
//! API ([`Backend`] and [`serve_stdio`]), its churn never reaches the
//! daemon's code, and this crate builds and tests without the eBPF toolchain.
//!
//! stdout is the protocol: nothing here prints, and logs (the `log` crate)
//! must go to stderr, which is the binary's logger's job.

mod tools;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use anyhow::Context as _;
use rmcp::{
    model::{Implementation, ServerCapabilities, ServerConfig},
    tool_handler, ServerHandler, ServiceExt,
};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::tools::Governor;

/// Forwards one tool call to the daemon. Blocking (a Unix-socket round trip); called from spawn_blocking.
pub trait Backend: Send + Sync + 'static {
    /// `call` is the JSON object {"tool": NAME, ...args}; returns the daemon's `data` on success,
    /// or the daemon's error message (a refusal, "cannot connect…") on failure.
    fn call(&self, call: serde_json::Value) -> Result<serde_json::Value, String>;
}

/// What the server tells an agent at initialization, before any tool call.
const INSTRUCTIONS: &str = "governor guards this host: it supervises its services, keeps \
protected files unwritable, watches memory, and audits every governance action. Ask it before \
you act: call protect_check before you create, modify or delete a file (and request_approval, \
then wait for a human, if it is protected); call may_start_job before a memory-heavy job and \
memory_headroom when memory may be short; call status to see a service's health before and \
after you change it. A refusal is a decision, not an error to work around. kill_switch_engage \
is for emergencies only.";

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Governor {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("governor", env!("CARGO_PKG_VERSION")))
            .with_instructions(INSTRUCTIONS)
    }
}

/// Serves MCP on stdin/stdout until the client closes it. Logs go to stderr only (stdout is the protocol).
pub async fn serve_stdio(backend: Arc<dyn Backend>) -> anyhow::Result<()> {
    let (stdin, stdout) = rmcp::transport::stdio();
    serve(backend, stdin, stdout).await
}

/// Serves MCP on any byte stream pair (newline-delimited JSON-RPC) until the
/// client closes it: [`serve_stdio`] on stdin/stdout, tests on a pipe.
pub async fn serve<R, W>(backend: Arc<dyn Backend>, read: R, write: W) -> anyhow::Result<()>
where
    R: AsyncRead + Send + Unpin + 'static,
    W: AsyncWrite + Send + Unpin + 'static,
{
    let running = Governor::new(backend)
        .serve((read, write))
        .await
        .context("MCP session setup with the client failed")?;
    let reason = running
        .waiting()
        .await
        .context("the MCP session task failed")?;
    log::debug!("MCP session ended: {reason:?}");
    Ok(())
}
