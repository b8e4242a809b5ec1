//! The exposition: a registry built afresh for each scrape from the loaded values, and
//! encoded by `prometheus-client` (OpenMetrics text, which Prometheus reads).
//!
//! Families (all prefixed `proxy_`; counters end in `_total` in the text):
//! * `classifier_packets{counter}`: every classifier counter `proxy stats` lists, by its
//!   name (`seen`, `matched`, `assigned_listener`, ...). They overlap (`seen` counts every
//!   packet, the others some of them): not to be summed.
//! * `rule_packets`, `rule_bytes`, `rule_assigned`, `rule_dropped{rule, description}`: per
//!   rule in force, numbered from 1 in file order, described as in `proxy stats`.
//! * `refused_destinations`: original destinations the proxy would not relay to.
//! * `rules_info{hash}` (always 1), `rules_applied_timestamp_seconds`,
//!   `reloads{outcome}` (`applied`, `refused`) and `last_reload_ok`: which rules are in
//!   force, and how reloading them went.
//! * `classifier_snapshot_ok`: 1 when the classifier families above are in this scrape,
//!   0 when the serve loop did not answer in time (a reload in progress).
//! * `connections_accepted`, `connections_active`, `connections_ended{reason}`,
//!   `upstream_connect_failures{reason}`, `relayed_bytes{direction}` (added as each
//!   connection ends), `upstream_connect_seconds` (histogram of successful connects).
//! * `udp_sessions_created`, `udp_sessions_active`, `udp_datagrams{direction}`,
//!   `udp_bytes{direction}` (added as each session ends).
//! * `build_info{version}` and `kernel_info{release}`: always 1.

use prometheus_client::{
    encoding::{EncodeMetric, MetricEncoder, NoLabelSet},
    metrics::{MetricType, TypedMetric, counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

use super::{ClassifierSnapshot, ConnectFailure, DATA_PATH, EndReason};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The content type of [`encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(&'static str, String)>;

/// A histogram's values, loaded once, encoded as they are.
#[derive(Debug)]
struct HistogramSnapshot {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

impl TypedMetric for HistogramSnapshot {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for HistogramSnapshot {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// A family of counters with the given values.
fn counters(values: impl IntoIterator<Item = (Labels, u64)>) -> Family<Labels, Counter> {
    let family = Family::<Labels, Counter>::default();
    for (labels, value) in values {
        family.get_or_create(&labels).inc_by(value);
    }
    family
}

/// A family of gauges with the given values.
fn gauges(values: impl IntoIterator<Item = (Labels, i64)>) -> Family<Labels, Gauge> {
    let family = Family::<Labels, Gauge>::default();
    for (labels, value) in values {
        family.get_or_create(&labels).set(value);
    }
    family
}

fn counter(value: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(value);
    c
}

fn gauge(value: i64) -> Gauge {
    let g = Gauge::default();
    g.set(value);
    g
}

fn label(key: &'static str, value: impl Into<String>) -> Labels {
    vec![(key, value.into())]
}

/// One counter per reason, labelled `reason`: `all` and `counts` in the same order.
fn by_reason<R: Copy>(
    all: &[R],
    name: fn(R) -> &'static str,
    counts: &[AtomicU64],
) -> Family<Labels, Counter> {
    counters(
        all.iter()
            .zip(counts)
            .map(|(r, n)| (label("reason", name(*r)), n.load(Relaxed))),
    )
}

/// The reasons' names, for a family's help text.
fn reason_names<R: Copy>(all: &[R], name: fn(R) -> &'static str) -> String {
    all.iter().map(|r| name(*r)).collect::<Vec<_>>().join(", ")
}

/// A pair of counters labelled `direction`: `up` (client to upstream) and `down`.
fn up_down(up: &AtomicU64, down: &AtomicU64) -> Family<Labels, Counter> {
    counters([
        (label("direction", "up"), up.load(Relaxed)),
        (label("direction", "down"), down.load(Relaxed)),
    ])
}

/// The text of one scrape: the classifier's snapshot (none when the serve loop did not
/// answer), the data path's counters as loaded now, and `kernel_release`.
pub fn encode(classifier: Option<&ClassifierSnapshot>, kernel_release: &str) -> String {
    let mut registry = Registry::with_prefix("proxy");

    registry.register(
        "classifier_snapshot_ok",
        "1 if the classifier's counters are in this scrape, 0 if the agent's serve loop did not answer in time",
        gauge(i64::from(classifier.is_some())),
    );
    if let Some(snapshot) = classifier {
        registry.register(
            "classifier_packets",
            "Packets the TC classifier counted, by counter (as in proxy stats; they overlap)",
            counters(
                snapshot
                    .counters
                    .iter()
                    .map(|(c, v)| (label("counter", c.name()), *v)),
            ),
        );
        type RuleValue = fn(&proxy_common::RuleCounters) -> u64;
        let per_rule = |value: RuleValue| {
            counters(
                snapshot
                    .rules
                    .iter()
                    .enumerate()
                    .map(|(i, (description, c))| {
                        (
                            vec![
                                ("rule", (i + 1).to_string()),
                                ("description", description.clone()),
                            ],
                            value(c),
                        )
                    }),
            )
        };
        let rule_families: [(&str, &str, RuleValue); 4] = [
            ("rule_packets", "Packets that matched the rule", |c| {
                c.packets
            }),
            (
                "rule_bytes",
                "Bytes of the packets that matched the rule",
                |c| c.bytes,
            ),
            (
                "rule_assigned",
                "Packets of the rule handed to a socket",
                |c| c.assigned,
            ),
            (
                "rule_dropped",
                "Packets of the rule dropped (no usable socket)",
                |c| c.dropped,
            ),
        ];
        for (name, help, value) in rule_families {
            registry.register(name, help, per_rule(value));
        }
        registry.register(
            "refused_destinations",
            "Connections and datagrams to original destinations the proxy does not relay to",
            counter(snapshot.refused_destinations),
        );
        let rules = &snapshot.rules_in_force;
        registry.register(
            "rules_info",
            "The rules in force, by a hash of them (equal on nodes with the same rules): always 1",
            gauges([(label("hash", rules.hash.clone()), 1)]),
        );
        registry.register_with_unit(
            "rules_applied_timestamp",
            "When the rules in force were put in force (seconds since the epoch)",
            Unit::Seconds,
            gauge(i64::try_from(rules.applied_unix).unwrap_or(i64::MAX)),
        );
        registry.register(
            "reloads",
            "Reloads of the rules (SIGHUP, or the rules file changed), by outcome",
            counters([
                (label("outcome", "applied"), rules.reloads_applied),
                (label("outcome", "refused"), rules.reloads_refused),
            ]),
        );
        if let Some(ok) = rules.last_reload_ok {
            registry.register(
                "last_reload_ok",
                "1 if the last reload was applied, 0 if it was refused (the rules in force stay)",
                gauge(i64::from(ok)),
            );
        }
    }

    let data = &DATA_PATH;
    registry.register(
        "connections_accepted",
        "TCP connections accepted by the built-in listeners",
        counter(data.accepted.load(Relaxed)),
    );
    registry.register(
        "connections_active",
        "TCP connections accepted and not ended yet",
        gauge(data.active.load(Relaxed)),
    );
    registry.register(
        "connections_ended",
        format!(
            "TCP connections ended, by reason ({})",
            reason_names(&EndReason::ALL, EndReason::name)
        ),
        by_reason(&EndReason::ALL, EndReason::name, &data.ended),
    );
    registry.register(
        "upstream_connect_failures",
        "Upstream connects that failed, by reason",
        by_reason(
            &ConnectFailure::ALL,
            ConnectFailure::name,
            &data.connect_failures,
        ),
    );
    registry.register(
        "relayed_bytes",
        "TCP bytes relayed, up (client to upstream) and down, added as each connection ends",
        up_down(&data.bytes_up, &data.bytes_down),
    );
    let (sum, count, buckets) = data.connect_time.snapshot();
    registry.register_with_unit(
        "upstream_connect",
        "Time to connect upstream (successful connects)",
        Unit::Seconds,
        HistogramSnapshot {
            sum,
            count,
            buckets,
        },
    );
    registry.register(
        "udp_sessions_created",
        "UDP sessions (client, original destination) created",
        counter(data.udp_created.load(Relaxed)),
    );
    registry.register(
        "udp_sessions_active",
        "UDP sessions open now",
        gauge(data.udp_active.load(Relaxed)),
    );
    registry.register(
        "udp_datagrams",
        "UDP datagrams relayed, up and down, added as each session ends",
        up_down(&data.udp_datagrams_up, &data.udp_datagrams_down),
    );
    registry.register(
        "udp_bytes",
        "UDP payload bytes relayed, up and down, added as each session ends",
        up_down(&data.udp_bytes_up, &data.udp_bytes_down),
    );

    let info = |key: &'static str, value: &str| {
        let family = Family::<Labels, Gauge>::default();
        family.get_or_create(&label(key, value)).set(1);
        family
    };
    registry.register(
        "build_info",
        "The agent's version",
        info("version", env!("CARGO_PKG_VERSION")),
    );
    registry.register(
        "kernel_info",
        "The kernel release (uname -r)",
        info("release", kernel_release),
    );

    let mut text = String::new();
    // Writing to a String cannot fail; the encoder returns fmt::Error only from the writer.
    let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
    text
}

/// The running kernel's release, as `uname -r` prints it.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use proxy_common::{Counter, RuleCounters};

    use super::*;

    #[test]
    fn every_family_is_typed_and_rules_are_labelled() {
        let snapshot = ClassifierSnapshot {
            counters: vec![(Counter::Seen, 12), (Counter::AssignedListener, 2)],
            rules: vec![(
                "tcp dst any dport 80 -> on-port 50080 mark 0x1/0x1".to_owned(),
                RuleCounters {
                    packets: 10,
                    bytes: 678,
                    assigned: 10,
                    dropped: 0,
                },
            )],
            refused_destinations: 0,
            rules_in_force: crate::metrics::RulesSnapshot {
                hash: "00112233445566aa".into(),
                applied_unix: 1_700_000_000,
                reloads_applied: 2,
                reloads_refused: 1,
                last_reload_ok: Some(false),
            },
        };
        let text = encode(Some(&snapshot), "6.18.0");
        assert!(
            text.contains("proxy_rules_info{hash=\"00112233445566aa\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("proxy_reloads_total{outcome=\"refused\"} 1"),
            "{text}"
        );
        assert!(text.contains("proxy_last_reload_ok 0"), "{text}");
        assert!(
            text.contains("proxy_rules_applied_timestamp_seconds 1700000000"),
            "{text}"
        );
        assert!(
            text.contains("proxy_classifier_packets_total{counter=\"seen\"} 12"),
            "{text}"
        );
        assert!(
            text.contains(
                "proxy_rule_assigned_total{rule=\"1\",description=\"tcp dst any dport 80 -> on-port 50080 mark 0x1/0x1\"} 10"
            ),
            "{text}"
        );
        assert!(text.contains("# TYPE proxy_upstream_connect_seconds histogram"));
        assert!(text.contains("proxy_upstream_connect_seconds_bucket{le=\"+Inf\"}"));
        assert!(text.contains("proxy_kernel_info{release=\"6.18.0\"} 1"));
        assert!(text.contains("proxy_classifier_snapshot_ok 1"));
        assert!(text.ends_with("# EOF\n"), "{text}");

        let without = encode(None, "6.18.0");
        assert!(without.contains("proxy_classifier_snapshot_ok 0"));
        assert!(!without.contains("proxy_rule_packets"));
    }
}
