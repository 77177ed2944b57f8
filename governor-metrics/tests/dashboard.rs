//! The Grafana dashboard (`examples/grafana-dashboard.json`) is built on the
//! metric names this crate exposes: it must be well-formed, use only those
//! names (and all of them), and every query must be valid PromQL — which
//! `promtool check rules` verifies.

use std::path::PathBuf;
use std::process::Command;

use governor_metrics::METRIC_NAMES;
use serde_json::Value;

fn dashboard() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/grafana-dashboard.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every string under a key named `key`, anywhere in the document.
fn strings_under<'a>(value: &'a Value, key: &str, found: &mut Vec<&'a str>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                if k == key {
                    if let Some(s) = v.as_str() {
                        found.push(s);
                    }
                }
                strings_under(v, key, found);
            }
        }
        Value::Array(items) => items.iter().for_each(|v| strings_under(v, key, found)),
        _ => {}
    }
}

/// The `governor_…` identifiers in a query.
fn metric_names(expr: &str) -> Vec<&str> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    expr.split(|c: char| !is_ident(c))
        .filter(|w| w.starts_with("governor_"))
        .collect()
}

fn exprs(dashboard: &Value) -> Vec<&str> {
    let mut found = Vec::new();
    strings_under(dashboard, "expr", &mut found);
    strings_under(dashboard, "definition", &mut found);
    found
}

#[test]
fn uses_only_and_all_exposed_metric_names() {
    let dashboard = dashboard();
    let exprs = exprs(&dashboard);
    assert!(exprs.len() > 20, "only {} queries", exprs.len());
    let mut used = std::collections::BTreeSet::new();
    for expr in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "query uses no governor metric: {expr}");
        for name in names {
            assert!(
                METRIC_NAMES.contains(&name),
                "query uses {name}, which /metrics does not expose: {expr}"
            );
            used.insert(name);
        }
    }
    let unused: Vec<_> = METRIC_NAMES.iter().filter(|n| !used.contains(*n)).collect();
    assert!(unused.is_empty(), "not on the dashboard: {unused:?}");
}

#[test]
fn datasource_and_service_variable() {
    let dashboard = dashboard();
    assert_eq!(dashboard["__inputs"][0]["name"], "DS_PROMETHEUS");
    let mut uids = Vec::new();
    strings_under(&dashboard, "uid", &mut uids);
    for uid in uids {
        assert!(
            ["${DS_PROMETHEUS}", "-- Grafana --", "governor-overview"].contains(&uid),
            "unexpected datasource uid {uid}"
        );
    }
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    let service = variables
        .iter()
        .find(|v| v["name"] == "service")
        .expect("a service variable");
    assert_eq!(
        service["definition"],
        "label_values(governor_service_state, service)"
    );
    assert_eq!(
        service["query"]["query"],
        "label_values(governor_service_state, service)"
    );
    let ds = variables
        .iter()
        .find(|v| v["name"] == "DS_PROMETHEUS")
        .expect("a DS_PROMETHEUS variable");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    // Panel ids are unique.
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids: Vec<_> = panels.iter().map(|p| p["id"].as_u64()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), panels.len());
}

#[test]
fn queries_are_valid_promql() {
    let dashboard = dashboard();
    let mut rules = String::from("groups:\n  - name: grafana-dashboard\n    rules:\n");
    let mut queries: Vec<&str> = Vec::new();
    strings_under(&dashboard, "expr", &mut queries);
    for (i, expr) in queries.iter().enumerate() {
        // Grafana's variables, as Grafana would interpolate them (`$service`
        // at its All value).
        let expr = expr
            .replace("$__rate_interval", "1m")
            .replace("$__range", "6h")
            .replace("$service", "(?s:.*)");
        // A JSON string is a valid YAML double-quoted scalar.
        let quoted = serde_json::to_string(&expr).expect("quote");
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: {quoted}\n"
        ));
    }
    let dir = std::env::temp_dir().join(format!("governor-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("dashboard-rules.yml");
    std::fs::write(&file, &rules).expect("write rules");
    let out = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&file)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `promtool` ({e}): it is needed to validate the dashboard's queries; \
                 install Debian's `prometheus` package (`apt-get install prometheus`)"
            )
        });
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "promtool check rules:\n{}{}\non:\n{rules}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
