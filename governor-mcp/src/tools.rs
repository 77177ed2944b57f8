//! The seven tools: their argument types (whose doc comments become the JSON
//! schemas an agent reads), their descriptions, the checks made here before
//! anything reaches the daemon, and the forwarding itself.
//!
//! Why check here at all when the daemon checks too: an agent that sends a
//! relative path or an empty reason should learn so from a tool error it can
//! act on, without a socket round trip, and a malformed call should never be
//! something the daemon has to be right about alone.

use std::sync::Arc;

use rmcp::{
    handler::server::{router::tool::ToolRouter, wrapper::Parameters},
    model::{CallToolResult, ContentBlock},
    tool, tool_router, ErrorData,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Backend;

/// The most audit entries one `audit_tail` call may ask for.
pub(crate) const MAX_AUDIT_TAIL: u32 = 1000;

/// Arguments of `status`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct StatusArgs {
    /// One service's name (as in governor's config). Omit it for every
    /// service, or, when you run as a supervised service, for your own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
}

/// Arguments of `protect_check`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ProtectCheckArgs {
    /// Absolute path of the file you intend to create, modify, rename or delete.
    #[schemars(length(min = 1))]
    pub path: String,
}

/// Arguments of `request_approval`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RequestApprovalArgs {
    /// Absolute path of the protected file you need to write.
    #[schemars(length(min = 1))]
    pub path: String,
    /// Why you need to write it, in a sentence a person can judge on a phone.
    #[schemars(length(min = 1))]
    pub reason: String,
    /// How long the write window should stay open, like "10m", "30s" or "1h".
    #[schemars(length(min = 1))]
    pub duration: String,
}

/// `memory_headroom` takes no arguments.
#[derive(Debug, Serialize)]
pub(crate) struct MemoryHeadroomArgs {}

/// Arguments of `may_start_job`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct MayStartJobArgs {
    /// Your best estimate of the job's peak memory use, in bytes.
    pub expected_bytes: u64,
}

/// Arguments of `audit_tail`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditTailArgs {
    /// How many of the newest entries to return (default 20, at most 1000;
    /// the daemon may return fewer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1000))]
    pub n: Option<u32>,
}

/// Arguments of `kill_switch_engage`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct KillSwitchEngageArgs {
    /// What to stop: ["all"], ["non-critical"], or one or more service names.
    #[schemars(length(min = 1))]
    pub scope: Vec<String>,
    /// Why, in a sentence: it goes to the audit log and to the humans alerted.
    #[schemars(length(min = 1))]
    pub reason: String,
}

/// A tool's arguments: what the daemon is sent, once they pass `check`.
pub(crate) trait ToolArgs: Serialize {
    /// Why these arguments must not reach the daemon, if they must not.
    fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("path is empty: give the file's absolute path".into());
    }
    if path.contains('\0') {
        return Err("path contains a NUL byte".into());
    }
    if !path.starts_with('/') {
        return Err(format!(
            "path {path:?} is relative: give the file's absolute path (starting with /)"
        ));
    }
    Ok(())
}

fn check_nonempty(field: &str, value: &str, hint: &str) -> Result<(), String> {
    if value.trim().is_empty() {
        return Err(format!("{field} is empty: {hint}"));
    }
    Ok(())
}

impl ToolArgs for StatusArgs {
    fn check(&self) -> Result<(), String> {
        match &self.service {
            Some(s) if s.trim().is_empty() => {
                Err("service is empty: omit it for every service, or name one".into())
            }
            _ => Ok(()),
        }
    }
}

impl ToolArgs for ProtectCheckArgs {
    fn check(&self) -> Result<(), String> {
        check_path(&self.path)
    }
}

impl ToolArgs for RequestApprovalArgs {
    fn check(&self) -> Result<(), String> {
        check_path(&self.path)?;
        check_nonempty("reason", &self.reason, "say why the write is needed")?;
        check_nonempty("duration", &self.duration, "give a window like \"10m\"")
    }
}

impl ToolArgs for MemoryHeadroomArgs {}

impl ToolArgs for MayStartJobArgs {}

impl ToolArgs for AuditTailArgs {
    fn check(&self) -> Result<(), String> {
        match self.n {
            Some(n) if n > MAX_AUDIT_TAIL => Err(format!(
                "n = {n} is too many: ask for at most {MAX_AUDIT_TAIL} entries"
            )),
            _ => Ok(()),
        }
    }
}

impl ToolArgs for KillSwitchEngageArgs {
    fn check(&self) -> Result<(), String> {
        if self.scope.is_empty() {
            return Err(
                "scope is empty: give [\"all\"], [\"non-critical\"] or service names".into(),
            );
        }
        if self.scope.iter().any(|s| s.trim().is_empty()) {
            return Err("scope has an empty entry".into());
        }
        check_nonempty("reason", &self.reason, "say why the kill switch is needed")
    }
}

/// The MCP server: the tools, each forwarded to the daemon through `backend`.
#[derive(Clone)]
pub(crate) struct Governor {
    backend: Arc<dyn Backend>,
    pub(crate) tool_router: ToolRouter<Self>,
}

impl Governor {
    pub(crate) fn new(backend: Arc<dyn Backend>) -> Self {
        Self {
            backend,
            tool_router: Self::tool_router(),
        }
    }

    /// Checks `args`, sends `{"tool": tool, ...args}` to the backend off the
    /// async threads, and turns the answer into a tool result. Every failure
    /// the agent can act on is a tool error (`is_error`), never a protocol
    /// error, so that its message reaches the agent.
    async fn forward(&self, tool: &'static str, args: &impl ToolArgs) -> CallToolResult {
        if let Err(why) = args.check() {
            log::debug!("mcp {tool}: refused here: {why}");
            return tool_error(format!("{tool}: {why}"));
        }
        let mut call = match serde_json::to_value(args) {
            Ok(Value::Object(map)) => map,
            Ok(other) => {
                return tool_error(format!("{tool}: arguments are not an object: {other}"))
            }
            Err(e) => return tool_error(format!("{tool}: cannot encode the arguments: {e}")),
        };
        call.insert("tool".into(), Value::String(tool.into()));
        let backend = Arc::clone(&self.backend);
        let answer =
            match tokio::task::spawn_blocking(move || backend.call(Value::Object(call))).await {
                Ok(answer) => answer,
                Err(e) => Err(format!("governor mcp: the daemon call did not finish: {e}")),
            };
        match answer {
            Ok(data) => success(data),
            Err(message) => {
                log::debug!("mcp {tool}: {message}");
                tool_error(message)
            }
        }
    }
}

/// A successful result: the daemon's data as pretty JSON text (what every
/// client shows the model), and as structured content when it is an object
/// (MCP's structured content must be one).
fn success(data: Value) -> CallToolResult {
    let text = serde_json::to_string_pretty(&data).unwrap_or_else(|_| data.to_string());
    let mut result = CallToolResult::success(vec![ContentBlock::text(text)]);
    if data.is_object() {
        result.structured_content = Some(data);
    }
    result
}

fn tool_error(message: String) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(message)])
}

const STATUS: &str = "Governor's view of the supervised services: for each (or for the one \
named in `service`) its state, restarts in the current window (a crash loop shows here even \
while pm2 says online), memory use against its ceiling, and open drift (config, uptime, \
restart, memory). Called without `service` from a supervised process, it answers for your own \
service. Call it to check a service's health before and after you deploy or restart it, or \
when something behaves oddly.";

const PROTECT_CHECK: &str = "Call this BEFORE you create, modify, rename or delete a file. \
Answers the file's protection tier (untouchable, protected, watched or none), whether a write \
would be refused right now and why, and any approval window open on it. If the write would be \
refused, do not try to work around it: use request_approval for a protected file, or leave it \
alone if it is untouchable.";

const REQUEST_APPROVAL: &str = "Ask a human (by Telegram) to open a time-limited write window \
on a protected file. It only sends the request: it never opens a window by itself, and the \
answer may be no or may never come. Call protect_check afterwards to see whether a window is \
open before you write. Untouchable files cannot be approved this way.";

const MEMORY_HEADROOM: &str = "How much memory is left: the host's MemAvailable against \
governor's floor, and your own service's memory use against its ceiling. Call it before \
anything memory-heavy (builds, model loads, large sorts), or when you are told you are near \
your limit.";

const MAY_START_JOB: &str = "The dispatch gate: ask it before you start a memory-heavy job, \
with your estimate of the job's peak memory. Answers yes only if MemAvailable would stay above \
the floor by the configured margin after the job, and fewer than the allowed number of your \
jobs are running; otherwise no, with the reason. On no, wait and ask again, or run less at \
once; do not start the job anyway.";

const AUDIT_TAIL: &str = "The newest entries of governor's hash-chained audit log (refused \
writes, approvals, deploys, kill-switch actions, alerts), newest last. `n` is how many (default \
20, at most 1000; the daemon may cap it lower). Call it to learn why something was refused or \
what governance actions happened recently.";

const KILL_SWITCH_ENGAGE: &str = "Emergency stop: engage governor's kill switch, which stops \
the services in scope and keeps them stopped. scope is [\"all\"], [\"non-critical\"], or a \
list of service names; reason is recorded in the audit log and sent to the humans on call. Use \
it only when continuing would cause damage (runaway resource use, a destructive loop, a \
compromise). Only a human at a terminal can release it; there is no tool for that.";

#[tool_router]
impl Governor {
    #[tool(description = STATUS, annotations(read_only_hint = true, open_world_hint = false))]
    async fn status(
        &self,
        Parameters(args): Parameters<StatusArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        Ok(self.forward("status", &args).await)
    }

    #[tool(
        description = PROTECT_CHECK,
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn protect_check(
        &self,
        Parameters(args): Parameters<ProtectCheckArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        Ok(self.forward("protect_check", &args).await)
    }

    #[tool(
        description = REQUEST_APPROVAL,
        annotations(read_only_hint = false, destructive_hint = false, open_world_hint = true)
    )]
    async fn request_approval(
        &self,
        Parameters(args): Parameters<RequestApprovalArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        Ok(self.forward("request_approval", &args).await)
    }

    #[tool(
        description = MEMORY_HEADROOM,
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn memory_headroom(&self) -> Result<CallToolResult, ErrorData> {
        Ok(self
            .forward("memory_headroom", &MemoryHeadroomArgs {})
            .await)
    }

    #[tool(
        description = MAY_START_JOB,
        annotations(read_only_hint = true, open_world_hint = false)
    )]
    async fn may_start_job(
        &self,
        Parameters(args): Parameters<MayStartJobArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        Ok(self.forward("may_start_job", &args).await)
    }

    #[tool(description = AUDIT_TAIL, annotations(read_only_hint = true, open_world_hint = false))]
    async fn audit_tail(
        &self,
        Parameters(args): Parameters<AuditTailArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        Ok(self.forward("audit_tail", &args).await)
    }

    #[tool(
        description = KILL_SWITCH_ENGAGE,
        annotations(
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn kill_switch_engage(
        &self,
        Parameters(args): Parameters<KillSwitchEngageArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        Ok(self.forward("kill_switch_engage", &args).await)
    }
}
