//! The two exposition formats `/metrics` serves, and a registry that spells counters
//! and info metrics the way each format wants them.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, text},
    metrics::{
        MetricType, TypedMetric, counter::Counter, family::Family, gauge::Gauge, info::Info,
    },
    registry::Registry,
};

/// The exposition formats `/metrics` serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0, for scrapers that ask for it (Prometheus does, first).
    OpenMetrics,
    /// The Prometheus text format 0.0.4, for everyone else (curl, older scrapers).
    Text,
}

impl Format {
    /// The format for an `Accept` header: OpenMetrics when the client ranks
    /// `application/openmetrics-text` at least as high as anything the text format
    /// satisfies (`text/plain`, `text/*`, `*/*`), the text format otherwise.
    pub fn negotiate(accept: Option<&str>) -> Self {
        let (mut openmetrics, mut text) = (0.0f32, 0.0f32);
        for range in accept.unwrap_or("").split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .map_or(1.0, |(_, v)| v.trim().parse().unwrap_or(0.0));
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            Self::OpenMetrics
        } else {
            Self::Text
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::Text => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// A counter as the Prometheus text format 0.0.4 spells it: the family is registered
/// as `<name>_total` and its samples carry no further suffix. prometheus-client encodes
/// only OpenMetrics, where the family is `<name>` and the samples `<name>_total`; the
/// text format's parsers then see samples of a family that has no `# HELP` or `# TYPE`
/// (promtool: "no help text"). The library still encodes every line.
#[derive(Debug, Default)]
struct TextCounter(AtomicU64);

impl TypedMetric for TextCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for TextCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.0.load(Ordering::Relaxed))
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// A registry that registers counters and info metrics the way its format spells them;
/// everything else is the same in both.
pub(super) struct Exposition {
    pub(super) registry: Registry,
    format: Format,
}

pub(super) trait Labels:
    EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static
{
}
impl<T: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static>
    Labels for T
{
}

impl Exposition {
    pub(super) fn new(format: Format) -> Self {
        Self {
            registry: Registry::with_prefix("datafence"),
            format,
        }
    }

    pub(super) fn counters<L: Labels>(
        &mut self,
        name: &str,
        help: &str,
        rows: impl IntoIterator<Item = (L, u64)>,
    ) {
        match self.format {
            Format::OpenMetrics => {
                let family = Family::<L, Counter>::default();
                for (labels, value) in rows {
                    family.get_or_create(&labels).inc_by(value);
                }
                self.registry.register(name, help, family);
            }
            Format::Text => {
                let family = Family::<L, TextCounter>::default();
                for (labels, value) in rows {
                    family
                        .get_or_create(&labels)
                        .0
                        .fetch_add(value, Ordering::Relaxed);
                }
                self.registry
                    .register(format!("{name}_total"), help, family);
            }
        }
    }

    pub(super) fn counter(&mut self, name: &str, help: &str, value: u64) {
        match self.format {
            Format::OpenMetrics => {
                let c = Counter::<u64>::default();
                c.inc_by(value);
                self.registry.register(name, help, c);
            }
            Format::Text => {
                self.registry.register(
                    format!("{name}_total"),
                    help,
                    TextCounter(AtomicU64::new(value)),
                );
            }
        }
    }

    /// An info metric; the text format has no such type, so there it is the gauge
    /// `<name>_info{...} 1`, as Prometheus's own clients write it.
    pub(super) fn info<L: Labels>(&mut self, name: &str, help: &str, labels: L) {
        match self.format {
            Format::OpenMetrics => self.registry.register(name, help, Info::new(labels)),
            Format::Text => {
                let family = Family::<L, Gauge>::default();
                family.get_or_create(&labels).set(1);
                self.registry.register(format!("{name}_info"), help, family);
            }
        }
    }

    pub(super) fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        match self.format {
            Format::OpenMetrics => text::encode(&mut out, &self.registry)?,
            // The text format has no `# EOF`.
            Format::Text => text::encode_registry(&mut out, &self.registry)?,
        }
        Ok(out)
    }
}
