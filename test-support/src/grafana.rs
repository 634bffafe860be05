//! Grafana's dashboard as the tests read it.

/// Every query in a dashboard: panel and annotation `expr`s, and query variables'
/// `definition`s (Grafana's `label_values(...)`), in document order.
pub fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    collect(dashboard, &mut out);
    out
}

fn collect(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map {
                if let (Some(s), true) = (v.as_str(), key == "expr" || key == "definition") {
                    out.push(s.to_owned());
                }
                collect(v, out);
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect(v, out)),
        _ => {}
    }
}
