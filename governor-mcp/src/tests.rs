//! The server driven end to end over an in-memory pipe, by rmcp's own client
//! and by raw JSON-RPC lines, against a backend that records what reaches it.

use std::sync::{Arc, Mutex};

use rmcp::{
    model::{CallToolRequestParams, CallToolResult, Tool},
    service::{RoleClient, RunningService, ServiceError},
    ServiceExt,
};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::{serve, Backend};

type Reply = fn(&Value) -> Result<Value, String>;

/// Records every call object and answers with `reply`.
struct Recorder {
    calls: Mutex<Vec<Value>>,
    reply: Reply,
}

impl Backend for Recorder {
    fn call(&self, call: Value) -> Result<Value, String> {
        let answer = (self.reply)(&call);
        self.calls.lock().unwrap().push(call);
        answer
    }
}

impl Recorder {
    fn new(reply: Reply) -> Arc<Self> {
        Arc::new(Self {
            calls: Mutex::new(Vec::new()),
            reply,
        })
    }
    fn calls(&self) -> Vec<Value> {
        self.calls.lock().unwrap().clone()
    }
}

fn echo(call: &Value) -> Result<Value, String> {
    Ok(json!({ "echo": call }))
}

type Client = RunningService<RoleClient, ()>;

/// A server on one end of a pipe, rmcp's client on the other.
async fn connect(backend: Arc<Recorder>) -> (Client, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let (server_end, client_end) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(async move {
        let (read, write) = tokio::io::split(server_end);
        serve(backend, read, write).await
    });
    let client = ().serve(client_end).await.expect("client initializes");
    (client, server)
}

async fn call(client: &Client, tool: &str, args: Value) -> Result<CallToolResult, ServiceError> {
    let Value::Object(args) = args else {
        panic!("arguments must be an object")
    };
    client
        .call_tool(CallToolRequestParams::new(tool.to_string()).with_arguments(args))
        .await
}

fn text(result: &CallToolResult) -> String {
    assert_eq!(result.content.len(), 1, "one content block: {result:?}");
    result.content[0]
        .as_text()
        .expect("text content")
        .text
        .clone()
}

fn schema(tools: &[Tool], name: &str) -> Value {
    let tool = tools.iter().find(|t| t.name == name).expect(name);
    Value::Object((*tool.input_schema).clone())
}

const TOOLS: [&str; 7] = [
    "audit_tail",
    "kill_switch_engage",
    "may_start_job",
    "memory_headroom",
    "protect_check",
    "request_approval",
    "status",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_exactly_the_seven_tools_with_their_schemas() {
    let backend = Recorder::new(echo);
    let (client, server) = connect(backend.clone()).await;

    let info = client.peer_info().expect("server info");
    let server_info = info.server_info.as_ref().expect("server identifies itself");
    assert_eq!(server_info.name, "governor");
    assert_eq!(server_info.version, env!("CARGO_PKG_VERSION"));
    assert!(info
        .instructions
        .as_deref()
        .is_some_and(|i| i.contains("protect_check")));

    let tools = client.list_all_tools().await.unwrap();
    let mut names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    names.sort();
    assert_eq!(names, TOOLS);
    for tool in &tools {
        let description = tool.description.as_deref().unwrap_or("");
        assert!(description.len() > 80, "{} needs a description", tool.name);
        assert_eq!(tool.input_schema.get("type"), Some(&json!("object")));
    }
    assert!(!tools.iter().any(|t| t.name.contains("release")));

    let fields = |name: &str| -> (Value, Value) {
        let s = schema(&tools, name);
        (
            s["properties"].clone(),
            s.get("required").cloned().unwrap_or(json!([])),
        )
    };
    let described = |props: &Value, field: &str| {
        assert!(
            props[field]["description"]
                .as_str()
                .is_some_and(|d| !d.is_empty()),
            "{field} has no description: {props}"
        );
    };

    let (props, required) = fields("status");
    assert_eq!(required, json!([]));
    described(&props, "service");

    let (props, required) = fields("protect_check");
    assert_eq!(required, json!(["path"]));
    assert_eq!(props["path"]["type"], "string");
    described(&props, "path");

    let (props, mut required) = fields("request_approval");
    required
        .as_array_mut()
        .unwrap()
        .sort_by_key(|v| v.to_string());
    assert_eq!(required, json!(["duration", "path", "reason"]));
    for f in ["path", "reason", "duration"] {
        assert_eq!(props[f]["type"], "string");
        described(&props, f);
    }

    let (props, required) = fields("memory_headroom");
    assert_eq!(props, json!({}));
    assert_eq!(required, json!([]));

    let (props, required) = fields("may_start_job");
    assert_eq!(required, json!(["expected_bytes"]));
    assert_eq!(props["expected_bytes"]["type"], "integer");
    assert_eq!(props["expected_bytes"]["minimum"], 0);
    described(&props, "expected_bytes");

    let (props, required) = fields("audit_tail");
    assert_eq!(required, json!([]));
    described(&props, "n");

    let (props, mut required) = fields("kill_switch_engage");
    required
        .as_array_mut()
        .unwrap()
        .sort_by_key(|v| v.to_string());
    assert_eq!(required, json!(["reason", "scope"]));
    assert_eq!(props["scope"]["type"], "array");
    assert_eq!(props["scope"]["items"]["type"], "string");
    described(&props, "scope");
    described(&props, "reason");

    assert!(backend.calls().is_empty());
    client.cancel().await.unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_the_exact_call_object() {
    let backend = Recorder::new(echo);
    let (client, server) = connect(backend.clone()).await;

    let cases = [
        ("status", json!({}), json!({"tool": "status"})),
        (
            "status",
            json!({"service": "api"}),
            json!({"tool": "status", "service": "api"}),
        ),
        (
            "protect_check",
            json!({"path": "/etc/app.toml"}),
            json!({"tool": "protect_check", "path": "/etc/app.toml"}),
        ),
        (
            "request_approval",
            json!({"path": "/etc/app.toml", "reason": "rotate key", "duration": "10m"}),
            json!({"tool": "request_approval", "path": "/etc/app.toml",
                   "reason": "rotate key", "duration": "10m"}),
        ),
        (
            "memory_headroom",
            json!({}),
            json!({"tool": "memory_headroom"}),
        ),
        (
            "may_start_job",
            json!({"expected_bytes": 3_000_000_000u64}),
            json!({"tool": "may_start_job", "expected_bytes": 3_000_000_000u64}),
        ),
        ("audit_tail", json!({}), json!({"tool": "audit_tail"})),
        (
            "audit_tail",
            json!({"n": 1000}),
            json!({"tool": "audit_tail", "n": 1000}),
        ),
        (
            "kill_switch_engage",
            json!({"scope": ["api", "worker"], "reason": "runaway"}),
            json!({"tool": "kill_switch_engage", "scope": ["api", "worker"],
                   "reason": "runaway"}),
        ),
    ];
    for (tool, args, expected) in &cases {
        let result = call(&client, tool, args.clone()).await.unwrap();
        assert_eq!(result.is_error, Some(false), "{tool}: {result:?}");
        let data = json!({ "echo": expected });
        // The data as pretty JSON text, and as structured content.
        assert_eq!(serde_json::from_str::<Value>(&text(&result)).unwrap(), data);
        assert!(text(&result).contains('\n'), "pretty-printed");
        assert_eq!(result.structured_content.as_ref(), Some(&data));
    }
    let expected: Vec<Value> = cases.iter().map(|(_, _, e)| e.clone()).collect();
    assert_eq!(backend.calls(), expected);

    client.cancel().await.unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_object_data_is_text_only() {
    let backend = Recorder::new(|_| Ok(json!([{"seq": 1}, {"seq": 2}])));
    let (client, server) = connect(backend).await;
    let result = call(&client, "audit_tail", json!({"n": 2})).await.unwrap();
    assert_eq!(result.is_error, Some(false));
    assert_eq!(result.structured_content, None);
    assert_eq!(
        serde_json::from_str::<Value>(&text(&result)).unwrap(),
        json!([{"seq": 1}, {"seq": 2}])
    );
    client.cancel().await.unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_error_is_a_tool_error_with_its_message() {
    let backend = Recorder::new(|_| {
        Err("cannot connect to the governor daemon at /run/governor/mcp.sock".into())
    });
    let (client, server) = connect(backend.clone()).await;
    let result = call(&client, "memory_headroom", json!({})).await.unwrap();
    assert_eq!(result.is_error, Some(true));
    assert_eq!(
        text(&result),
        "cannot connect to the governor daemon at /run/governor/mcp.sock"
    );
    assert_eq!(result.structured_content, None);
    assert_eq!(backend.calls(), [json!({"tool": "memory_headroom"})]);
    client.cancel().await.unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_tool_error_that_never_reaches_the_backend() {
    let backend = Recorder::new(echo);
    let (client, server) = connect(backend.clone()).await;

    let cases = [
        ("protect_check", json!({"path": ""}), "path is empty"),
        ("protect_check", json!({"path": "etc/x"}), "is relative"),
        (
            "request_approval",
            json!({"path": "x", "reason": "r", "duration": "10m"}),
            "is relative",
        ),
        (
            "request_approval",
            json!({"path": "/x", "reason": "  ", "duration": "10m"}),
            "reason is empty",
        ),
        (
            "request_approval",
            json!({"path": "/x", "reason": "r", "duration": ""}),
            "duration is empty",
        ),
        ("audit_tail", json!({"n": 1001}), "at most 1000"),
        (
            "kill_switch_engage",
            json!({"scope": [], "reason": "r"}),
            "scope is empty",
        ),
        (
            "kill_switch_engage",
            json!({"scope": ["all"], "reason": ""}),
            "reason is empty",
        ),
        ("status", json!({"service": ""}), "service is empty"),
    ];
    for (tool, args, why) in cases {
        let result = call(&client, tool, args.clone()).await.unwrap();
        assert_eq!(result.is_error, Some(true), "{tool} {args}");
        let message = text(&result);
        assert!(message.starts_with(tool), "{message}");
        assert!(message.contains(why), "{tool} {args}: {message}");
    }

    // Arguments that do not fit the schema at all (a wrong type, an unknown
    // field, a missing one) are refused by rmcp's decoding, also as a tool
    // error the agent reads: not forwarded either.
    for (tool, args, why) in [
        (
            "may_start_job",
            json!({"expected_bytes": -1}),
            "expected u64",
        ),
        (
            "may_start_job",
            json!({"expected_bytes": "1G"}),
            "expected u64",
        ),
        (
            "status",
            json!({"services": "api"}),
            "unknown field `services`",
        ),
        ("protect_check", json!({}), "missing field `path`"),
    ] {
        let result = call(&client, tool, args.clone()).await.unwrap();
        assert_eq!(result.is_error, Some(true), "{tool} {args}");
        let message = text(&result);
        assert!(message.contains(why), "{tool} {args}: {message}");
    }

    assert!(backend.calls().is_empty(), "{:?}", backend.calls());
    client.cancel().await.unwrap();
    server.await.unwrap().unwrap();
}

/// The wire itself, as a client on an older protocol version writes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_json_rpc_lines() {
    let backend = Recorder::new(|call| {
        if call["reason"] == "fail" {
            Err("refused: not now".into())
        } else {
            Ok(json!({"engaged": true}))
        }
    });
    let (server_end, client_end) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn({
        let backend = backend.clone();
        async move {
            let (read, write) = tokio::io::split(server_end);
            serve(backend, read, write).await
        }
    });
    let (read, mut write) = tokio::io::split(client_end);
    let mut lines = BufReader::new(read).lines();

    let requests = [
        json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"}}}),
        json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
        json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {
            "name": "kill_switch_engage", "arguments": {"scope": ["all"], "reason": "fail"}}}),
        json!({"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {
            "name": "kill_switch_engage", "arguments": {"scope": ["all"], "reason": "ok"}}}),
    ];
    let mut responses = Vec::new();
    for request in requests {
        write
            .write_all(format!("{request}\n").as_bytes())
            .await
            .unwrap();
        if request.get("id").is_some() {
            let line = lines.next_line().await.unwrap().expect("a response");
            responses.push(serde_json::from_str::<Value>(&line).unwrap());
        }
    }

    assert_eq!(responses[0]["id"], 1);
    assert_eq!(responses[0]["result"]["protocolVersion"], "2025-06-18");
    assert_eq!(responses[0]["result"]["serverInfo"]["name"], "governor");
    assert!(responses[0]["result"]["capabilities"]["tools"].is_object());
    assert_eq!(responses[1]["result"]["tools"].as_array().unwrap().len(), 7);
    assert_eq!(responses[2]["id"], 3);
    assert_eq!(responses[2]["result"]["isError"], true);
    assert_eq!(
        responses[2]["result"]["content"],
        json!([{"type": "text", "text": "refused: not now"}])
    );
    assert_eq!(responses[3]["result"]["isError"], false);
    assert_eq!(
        responses[3]["result"]["structuredContent"],
        json!({"engaged": true})
    );

    // The client closing its end ends the session cleanly.
    drop(write);
    drop(lines);
    server.await.unwrap().unwrap();
    assert_eq!(backend.calls().len(), 2);
}
