//! The Prometheus rules and the Grafana dashboard in deploy/ only query what the agent
//! exports, and promtool accepts the rules and both exposition formats. Needs no
//! privileges: the list of metrics and labels comes from rendering a snapshot with the
//! agent library. promtool (Debian package `prometheus`, installed by `cargo xtask
//! setup`) must be on PATH: without it these tests fail rather than check nothing.
//! (tests/tests/netns_prometheus.rs runs every expression against a live Prometheus.)

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    process::Command,
};

use datafence::metrics::{AgentCounts, Format, Snapshot, VerdictLabels, render};
use datafence_common::CounterValue;
use datafence_test_support::{grafana::dashboard_queries, promtool};
use serde::Deserialize;

const RULES: &str = "deploy/prometheus/datafence-rules.yaml";
const DASHBOARD: &str = "deploy/grafana/datafence.json";

/// Labels Prometheus attaches to every scraped series.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("agent/ has a parent")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    let path = workspace_root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Exported series names and the labels each carries, from a rendered scrape with every
/// family populated.
struct Exported {
    series: BTreeMap<String, BTreeSet<String>>,
}

/// A snapshot with every family populated.
fn full_snapshot() -> Snapshot {
    Snapshot {
        verdicts: vec![(
            VerdictLabels {
                interface: "eth0".into(),
                hook: "tc_egress".into(),
                class: "user-data".into(),
                region: "us-east".into(),
                verdict: "deny".into(),
                reason: "region_denied".into(),
            },
            CounterValue {
                packets: 3,
                bytes: 300,
            },
        )],
        kernel_stats: datafence::datapath::Stats { all: [1, 2, 4, 0] },
        policy_sha256: "ab".repeat(32),
        policy_version: 1,
        prefixes_v4: 10,
        prefixes_v6: 5,
        last_reload_unix: 1_700_000_000.0,
        map_memory: vec![("V4_RANGES".into(), 1 << 20)],
        maps: vec![("V4_RANGES".into(), 10, 100)],
        attachments: vec![datafence::metrics::HookState {
            interface: "eth0".into(),
            hook: "tc_egress".into(),
            attached: true,
            programs_ahead: Vec::new(),
        }],
        kernel: datafence::kernel::KernelFeatures {
            release: "6.1.0".into(),
            features: vec![datafence::kernel::Feature {
                name: "tcx".into(),
                available: false,
                required: false,
                since: "6.6".into(),
                purpose: "TC egress through a pinned BPF link".into(),
                probe_error: None,
            }],
        },
        socket_ring: datafence::control::SocketRingStatus {
            state: "attached".into(),
            cgroup: Some("/sys/fs/cgroup".into()),
            error: None,
        },
        agent: AgentCounts {
            violations: vec![(("user-data".into(), "us-east".into(), "deny".into()), 1)],
            ..Default::default()
        },
    }
}

impl Exported {
    fn from_agent() -> Self {
        let text = render(&full_snapshot(), Format::OpenMetrics).expect("render metrics");

        // `# TYPE <family> <type>`: the family name, which the samples extend with a
        // suffix for counters and info metrics.
        let mut expected = BTreeSet::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("# TYPE ") else {
                continue;
            };
            let (family, kind) = rest.split_once(' ').expect("TYPE line has a type");
            let name = match kind {
                "counter" => format!("{family}_total"),
                "info" => format!("{family}_info"),
                "gauge" => family.to_owned(),
                other => panic!("unexpected metric type {other} for {family}"),
            };
            expected.insert(name);
        }

        let mut series: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let end = line.find(['{', ' ']).expect("sample has a value");
            let name = &line[..end];
            let labels = series.entry(name.to_owned()).or_default();
            if line[end..].starts_with('{') {
                let close = line.find('}').expect("closed label set");
                for pair in line[end + 1..close].split("\",") {
                    let (label, _) = pair.split_once('=').expect("label=value");
                    labels.insert(label.to_owned());
                }
            }
        }
        let sampled: BTreeSet<String> = series.keys().cloned().collect();
        assert_eq!(
            sampled, expected,
            "every # TYPE family should have samples named after its type\n{text}"
        );
        assert!(
            expected.iter().all(|n| n.starts_with("datafence_")),
            "{expected:?}"
        );
        Self { series }
    }

    fn labels(&self, metric: &str) -> Option<&BTreeSet<String>> {
        self.series.get(metric)
    }
}

#[derive(Debug, PartialEq)]
enum Token {
    Ident(String),
    Str,
    Punct(char),
}

/// A PromQL tokenizer just good enough to find metric names, label matchers and
/// `by (...)` clauses. Grafana's `$var` / `${var}` become a `$` and an identifier.
fn tokenize(expr: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_whitespace() {
            continue;
        }
        if c == '"' || c == '\'' || c == '`' {
            let quote = c;
            while let Some(c) = chars.next() {
                if c == '\\' && quote != '`' {
                    chars.next();
                } else if c == quote {
                    break;
                }
            }
            tokens.push(Token::Str);
        } else if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            let mut ident = String::from(c);
            while let Some(&n) = chars.peek() {
                if n.is_ascii_alphanumeric() || n == '_' || n == ':' || n == '.' {
                    ident.push(n);
                    chars.next();
                } else {
                    break;
                }
            }
            tokens.push(Token::Ident(ident));
        } else {
            tokens.push(Token::Punct(c));
        }
    }
    tokens
}

/// Problems with one expression: unknown `datafence_*` metrics, matchers on labels the
/// metric does not have, and `by`/`without` labels that no metric in it carries.
fn check_expr(expr: &str, exported: &Exported) -> Vec<String> {
    let tokens = tokenize(expr);
    let mut errors = Vec::new();
    let mut available: BTreeSet<String> = TARGET_LABELS.iter().map(|s| (*s).to_owned()).collect();
    let mut grouping = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            Token::Ident(name) if name.starts_with("datafence_") => {
                let known = exported.labels(name);
                match known {
                    Some(labels) => available.extend(labels.iter().cloned()),
                    None => errors.push(format!("unknown metric {name}")),
                }
                if tokens.get(i + 1) == Some(&Token::Punct('{')) {
                    i += 2;
                    while i < tokens.len() && tokens[i] != Token::Punct('}') {
                        if let Token::Ident(label) = &tokens[i]
                            && matches!(tokens.get(i + 1), Some(Token::Punct('=' | '!')))
                            && let Some(labels) = known
                            && !labels.contains(label)
                            && !TARGET_LABELS.contains(&label.as_str())
                        {
                            errors.push(format!("{name} has no label {label}"));
                        }
                        i += 1;
                    }
                }
            }
            Token::Ident(kw)
                if (kw == "by" || kw == "without")
                    && tokens.get(i + 1) == Some(&Token::Punct('(')) =>
            {
                i += 2;
                while i < tokens.len() && tokens[i] != Token::Punct(')') {
                    if let Token::Ident(label) = &tokens[i] {
                        grouping.push(label.clone());
                    }
                    i += 1;
                }
            }
            _ => {}
        }
        i += 1;
    }
    let mentions_datafence = tokens
        .iter()
        .any(|t| matches!(t, Token::Ident(n) if n.starts_with("datafence_")));
    if mentions_datafence {
        for label in grouping {
            if !available.contains(&label) {
                errors.push(format!("grouping by {label}, which no metric here has"));
            }
        }
    }
    errors
}

#[test]
fn expression_checker_catches_mistakes() {
    let exported = Exported::from_agent();
    assert!(
        check_expr(
            r#"sum by (class, region) (rate(datafence_packets_total{verdict="deny", instance=~"$instance"}[$__rate_interval]))"#,
            &exported
        )
        .is_empty()
    );
    assert_eq!(
        check_expr("rate(datafence_packets[5m])", &exported),
        ["unknown metric datafence_packets"]
    );
    assert_eq!(
        check_expr(r#"datafence_map_entries{mapp="COUNTERS"}"#, &exported),
        ["datafence_map_entries has no label mapp"]
    );
    assert_eq!(
        check_expr("sum by (verdict) (datafence_events_lost_total)", &exported),
        ["grouping by verdict, which no metric here has"]
    );
}

#[derive(Debug, Deserialize)]
struct RulesFile {
    groups: Vec<RuleGroup>,
}

#[derive(Debug, Deserialize)]
struct RuleGroup {
    name: String,
    rules: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
struct Rule {
    alert: Option<String>,
    record: Option<String>,
    expr: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[test]
fn promtool_accepts_the_rules() {
    let promtool = promtool::program("promtool");
    let out = Command::new(promtool)
        .args(["check", "rules", RULES])
        .current_dir(workspace_root())
        .output()
        .expect("running promtool");
    assert!(
        out.status.success(),
        "promtool check rules failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `promtool check metrics` (the text format's parser and linter) accepts the body served
/// to scrapers that do not ask for OpenMetrics; the OpenMetrics body goes through
/// promtool's OpenMetrics parser.
#[test]
fn promtool_accepts_both_exposition_formats() {
    let snapshot = full_snapshot();
    let text = render(&snapshot, Format::Text).expect("render text");
    promtool::check_text_format(&text);
    let openmetrics = render(&snapshot, Format::OpenMetrics).expect("render OpenMetrics");
    promtool::check_openmetrics(&openmetrics);
    // Each check refuses the other format's body (`info`, `# EOF`): they can fail.
    assert!(promtool::text_format_problems(&openmetrics).is_err());
    assert!(promtool::openmetrics_problems(&text).is_err());
}

#[test]
fn rules_query_exported_metrics_and_cover_the_required_alerts() {
    let exported = Exported::from_agent();
    let file: RulesFile = serde_saphyr::from_str(&read(RULES)).expect("rules YAML parses");
    let mut alerts: HashMap<String, &Rule> = HashMap::new();
    let mut errors = Vec::new();
    for group in &file.groups {
        assert!(!group.rules.is_empty(), "group {} is empty", group.name);
        for rule in &group.rules {
            let name = rule
                .alert
                .as_deref()
                .or(rule.record.as_deref())
                .expect("every rule is an alert or a recording rule");
            for e in check_expr(&rule.expr, &exported) {
                errors.push(format!("{}: {name}: {e}", group.name));
            }
            if let Some(alert) = &rule.alert {
                assert!(
                    alerts.insert(alert.clone(), rule).is_none(),
                    "alert {alert} defined twice"
                );
            }
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));

    for required in [
        "DatafenceEnforceDeny",
        "DatafenceAuditHits",
        "DatafenceAuditHitsRising",
        "DatafenceMapPressure",
        "DatafencePolicyReloadFailed",
        "DatafenceEventsLost",
        "DatafenceProgramDetached",
        "DatafenceProgramsReattached",
        "DatafenceAgentDown",
        "DatafenceMetricsAbsent",
        "DatafenceCounterMapFull",
    ] {
        let rule = alerts
            .get(required)
            .unwrap_or_else(|| panic!("alert {required} missing"));
        let severity = rule.labels.get("severity").map(String::as_str);
        assert!(
            matches!(severity, Some("critical" | "warning" | "info")),
            "{required}: severity label is {severity:?}"
        );
        for key in ["summary", "description", "runbook"] {
            assert!(
                rule.annotations
                    .get(key)
                    .is_some_and(|s| !s.trim().is_empty()),
                "{required}: no {key} annotation"
            );
        }
    }
    // The metrics each alert is about.
    let uses = |alert: &str, needle: &str| {
        assert!(
            alerts[alert].expr.contains(needle),
            "{alert} should query {needle}: {}",
            alerts[alert].expr
        );
    };
    uses(
        "DatafenceEnforceDeny",
        r#"datafence_packets_total{verdict="deny"}"#,
    );
    uses(
        "DatafenceAuditHits",
        r#"datafence_packets_total{verdict="audit"}"#,
    );
    uses("DatafenceMapPressure", "datafence_map_capacity");
    uses(
        "DatafencePolicyReloadFailed",
        r#"datafence_policy_reload_total{result="failure"}"#,
    );
    uses("DatafenceEventsLost", "datafence_events_lost_total");
    uses(
        "DatafenceProgramDetached",
        "datafence_programs_attached == 0",
    );
    uses("DatafenceProgramAhead", "datafence_programs_ahead > 0");
    uses("DatafenceAgentDown", "datafence");
    uses("DatafenceMetricsAbsent", "absent(datafence_build_info)");
    uses(
        "DatafenceCounterMapFull",
        "datafence_packets_uncounted_total",
    );
    uses(
        "DatafencePacketsUnjudged",
        "datafence_packets_unjudged_total",
    );
    assert_eq!(
        alerts["DatafenceEnforceDeny"].labels["severity"], "critical",
        "an enforce-mode deny pages"
    );
    let runbook = &alerts["DatafenceEnforceDeny"].annotations["runbook"];
    assert!(
        runbook.contains("datafence explain") && runbook.contains("datafence status"),
        "{runbook}"
    );
}

#[test]
fn dashboard_is_importable_and_queries_exported_metrics() {
    let exported = Exported::from_agent();
    let dash: serde_json::Value =
        serde_json::from_str(&read(DASHBOARD)).expect("dashboard is JSON");

    // A datasource input for import, and a datasource variable every query goes through.
    let inputs = dash["__inputs"].as_array().expect("__inputs");
    assert!(
        inputs
            .iter()
            .any(|i| i["name"] == "DS_PROMETHEUS" && i["pluginId"] == "prometheus"),
        "no DS_PROMETHEUS input"
    );
    let vars = dash["templating"]["list"].as_array().expect("templating");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    let ds = var("datasource");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    assert_eq!(ds["current"]["value"], "${DS_PROMETHEUS}");
    for name in ["instance", "interface", "class"] {
        assert_eq!(var(name)["type"], "query", "${name}");
        assert_eq!(var(name)["datasource"]["uid"], "${datasource}", "${name}");
    }
    assert!(dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    assert!(dash["uid"].as_str().is_some_and(|u| !u.is_empty()));

    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut rects = Vec::new();
    for p in panels {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} used twice");
        let title = p["title"].as_str().expect("panel title");
        let grid = &p["gridPos"];
        let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| {
            grid[k]
                .as_u64()
                .unwrap_or_else(|| panic!("{title}: gridPos.{k}"))
        });
        assert!(w > 0 && h > 0 && x + w <= 24, "{title}: gridPos {grid}");
        for (other, (ox, oy, ow, oh)) in &rects {
            let overlap = x < ox + ow && *ox < x + w && y < oy + oh && *oy < y + h;
            assert!(!overlap, "{title} overlaps {other}");
        }
        rects.push((title.to_owned(), (x, y, w, h)));
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no queries");
        for t in targets.iter().chain([p]) {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
        }
        for t in targets {
            assert!(
                t["expr"].as_str().is_some_and(|e| !e.is_empty()),
                "{title}: target without expr"
            );
        }
    }

    let queries = dashboard_queries(&dash);
    let mut errors = Vec::new();
    for q in &queries {
        for e in check_expr(q, &exported) {
            errors.push(format!("{e} in {q}"));
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));

    // The dashboard shows everything the agent exports except the prefix counts (which
    // `datafence status` and `datafence check` print) and the kernel's features (fixed
    // until a reboot; `datafence status` prints them, and alerts can use the gauge).
    let all = queries.join("\n");
    for metric in exported.series.keys() {
        if ["datafence_policy_prefixes", "datafence_kernel_feature"].contains(&metric.as_str()) {
            continue;
        }
        assert!(
            all.contains(metric.as_str()),
            "dashboard never shows {metric}"
        );
    }
    for verdict in [r#"verdict="deny""#, r#"verdict="audit""#] {
        assert!(all.contains(verdict), "no panel for {verdict}");
    }
    assert!(all.contains("topk("), "no top denied regions panel");
}
