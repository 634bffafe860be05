//! A real monitoring stack: Debian's Prometheus server scrapes the real agent every second
//! on loopback inside the test's namespace, while the agent sees real traffic. The deny
//! counter Prometheus stored must equal the packets sent, and every expression in
//! deploy/prometheus and deploy/grafana must evaluate without error against it.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use datafence_test_support::grafana::dashboard_queries;
use integration_tests::{
    Scratch,
    agent::RunningAgent,
    http,
    netns::{Sandbox, addr, udp_delivered_marked},
    prometheus::{self, Prometheus},
    require_root,
};
use serde::Deserialize;

const METRICS: &str = "127.0.0.1:9477";
const RULES: &str = "deploy/prometheus/datafence-rules.yaml";
const DASHBOARD: &str = "deploy/grafana/datafence.json";
const MARK: u32 = 0x42;

const POLICY: &str = integration_tests::MARKED_CLASS_POLICY;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

#[derive(Deserialize)]
struct RulesFile {
    groups: Vec<RuleGroup>,
}

#[derive(Deserialize)]
struct RuleGroup {
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
struct Rule {
    alert: Option<String>,
    record: Option<String>,
    expr: String,
}

/// Replaces Grafana's variables with what Grafana would send: "All" for the multi-value
/// variables, and intervals for the built-in ones. Any other variable fails the test.
fn substitute(expr: &str) -> String {
    let mut out = expr.to_owned();
    for (var, value) in [
        ("__rate_interval", "1m"),
        ("__interval", "15s"),
        ("__range", "5m"),
        ("instance", ".*"),
        ("interface", ".*"),
        ("class", ".*"),
    ] {
        out = out
            .replace(&format!("${{{var}}}"), value)
            .replace(&format!("${var}"), value);
    }
    assert!(!out.contains('$'), "unknown Grafana variable in {expr}");
    out
}

/// `datafence_*` metric names an expression mentions.
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("datafence_"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_real_prometheus_scrapes_the_agent_and_every_rule_and_panel_evaluates() {
    require_root();
    let root = workspace_root();
    let sandbox = Sandbox::new("pm");
    let scratch = Scratch::new("prometheus");
    let policy = scratch.write("policy.yaml", POLICY);
    let agent = RunningAgent::start(&sandbox.host, &policy, &["--metrics-addr", METRICS]);
    let prom = Prometheus::start(
        &sandbox.host,
        &scratch.dir.join("prometheus"),
        "datafence",
        METRICS,
        &[root.join(RULES)],
    );
    let scraped = |what: &str| format!("{what}\nprometheus log:\n{}", prom.log_text());

    // The target is up: Prometheus could parse what the agent served.
    let up = prom.wait_for_value(r#"up{job="datafence"}"#, 1.0, Duration::from_secs(20));
    assert_eq!(
        up,
        Some(1.0),
        "{}",
        scraped(&format!("{:?}", prom.api("/api/v1/targets")))
    );

    // Real traffic, in two batches so that the deny rule sees the counter grow.
    let deny = r#"sum(datafence_packets_total{job="datafence",verdict="deny"})"#;
    let (first, second) = (20u32, 17u32);
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7000, first, MARK),
        0
    );
    assert_eq!(
        prom.wait_for_value(deny, f64::from(first), Duration::from_secs(20)),
        Some(f64::from(first)),
        "{}",
        scraped("first batch")
    );
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7000, second, MARK),
        0
    );
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::EU_V4, 7000, 9, MARK),
        9
    );
    let sent = f64::from(first + second);
    assert_eq!(
        prom.wait_for_value(deny, sent, Duration::from_secs(20)),
        Some(sent),
        "the deny counter in Prometheus equals the packets sent; {}",
        scraped("second batch")
    );
    assert_eq!(
        prom.wait_for_value(
            r#"sum(datafence_packets_total{verdict="allow",region="eu-west"})"#,
            9.0,
            Duration::from_secs(10)
        ),
        Some(9.0)
    );
    for q in [r#"up{job="datafence"}"#, deny] {
        eprintln!("query {q}: {:?}", prom.query(q));
    }
    // Scraped as OpenMetrics (Prometheus asks for it first): the info type survived.
    let meta = prom
        .api("/api/v1/metadata?metric=datafence_build")
        .expect("metadata");
    assert_eq!(meta["datafence_build"][0]["type"], "info", "{meta}");

    // The deny alert fires on that growth.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let firing = prom
            .query(r#"ALERTS{alertname="DatafenceEnforceDeny",alertstate="firing"}"#)
            .expect("ALERTS");
        if firing
            .iter()
            .any(|a| a["metric"]["class"] == "user-data" && a["metric"]["region"] == "us-east")
        {
            eprintln!("firing: {firing:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "DatafenceEnforceDeny never fired: {firing:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // Every rule loaded and evaluated without error.
    let file: RulesFile =
        serde_saphyr::from_str(&std::fs::read_to_string(root.join(RULES)).expect("read rules"))
            .expect("rules YAML");
    let in_file: Vec<&Rule> = file.groups.iter().flat_map(|g| &g.rules).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let groups = prom.api("/api/v1/rules").expect("rules");
        let loaded: Vec<&serde_json::Value> = groups["groups"]
            .as_array()
            .expect("groups")
            .iter()
            .flat_map(|g| g["rules"].as_array().expect("rules"))
            .collect();
        assert_eq!(loaded.len(), in_file.len(), "rules loaded: {groups}");
        let unhealthy: Vec<String> = loaded
            .iter()
            .filter(|r| r["health"] != "ok")
            .map(|r| format!("{} {}: {}", r["name"], r["health"], r["lastError"]))
            .collect();
        if unhealthy.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rules not healthy:\n{}",
            unhealthy.join("\n")
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // Every expression, the rules' and the dashboard's, evaluates without error, and
    // every datafence metric they name has series in Prometheus.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join(DASHBOARD)).expect("read dashboard"),
    )
    .expect("dashboard JSON");
    let panel_queries = dashboard_queries(&dashboard);
    assert!(panel_queries.len() > 10, "{panel_queries:?}");
    let mut errors = Vec::new();
    let mut names = BTreeSet::new();
    let mut checked = 0;
    for rule in &in_file {
        let name = rule
            .alert
            .as_deref()
            .or(rule.record.as_deref())
            .unwrap_or("?");
        names.extend(metric_names(&rule.expr));
        checked += 1;
        if let Err(e) = prom.query(&rule.expr) {
            errors.push(format!("rule {name}: {e}"));
        }
    }
    for q in &panel_queries {
        let q = substitute(q);
        names.extend(metric_names(&q));
        checked += 1;
        let result = match q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
        {
            // label_values(<selector>, <label>): Grafana asks the label values API.
            Some(args) => {
                let (selector, label) = args.rsplit_once(',').expect("label_values args");
                prom.api(&format!(
                    "/api/v1/label/{}/values?match[]={}",
                    label.trim(),
                    http::encode(selector.trim())
                ))
                .and_then(|v| {
                    if v.as_array().is_some_and(|a| !a.is_empty()) {
                        Ok(())
                    } else {
                        Err(format!("no values: {v}"))
                    }
                })
            }
            None => prom.query(&q).map(drop),
        };
        if let Err(e) = result {
            errors.push(format!("dashboard {q}: {e}"));
        }
    }
    for name in &names {
        match prom.query(&format!("count({name})")) {
            Ok(v) if !v.is_empty() => {}
            other => errors.push(format!("no series {name} in Prometheus: {other:?}")),
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    eprintln!("{checked} expressions evaluated against the live Prometheus; metrics: {names:?}");

    // Both bodies, as served: OpenMetrics to whoever asks for it, the text format to
    // everyone else; each passes promtool's parser for its format.
    let addr: SocketAddr = METRICS.parse().expect("addr");
    let om = http::get(
        &sandbox.host.name,
        addr,
        "/metrics",
        &[(
            "Accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )],
    );
    assert_eq!(om.status, 200);
    assert_eq!(
        om.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert!(om.body.ends_with("# EOF\n"));
    prometheus::check_openmetrics(&om.body);
    let text = http::get(&sandbox.host.name, addr, "/metrics", &[]);
    assert_eq!(text.status, 200);
    assert_eq!(
        text.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    prometheus::check_text_format(&text.body);
    // Each format's parser refuses the other's body: the checks can fail.
    assert!(prometheus::text_format_problems(&om.body).is_err());
    assert!(prometheus::openmetrics_problems(&text.body).is_err());
    let denied = format!(
        "datafence_packets_total{{interface=\"up0\",hook=\"tc_egress\",class=\"user-data\",region=\"us-east\",verdict=\"deny\",reason=\"region_denied\"}} {}\n",
        first + second
    );
    assert!(om.body.contains(&denied), "{}", om.body);
    assert!(text.body.contains(&denied), "{}", text.body);
    for (what, body) in [("OpenMetrics", &om.body), ("text", &text.body)] {
        let excerpt: Vec<&str> = body
            .lines()
            .filter(|l| l.contains("datafence_packets") || l.contains("datafence_build"))
            .collect();
        eprintln!("{what} scrape excerpt:\n{}", excerpt.join("\n"));
    }
    agent.stop();
}
