//! What the agent says about its rules and counters: the rules in force (at start and
//! after a reload), the `proxy stats` report, and the counters logged on exit.

use log::{error, info};
use proxy_common::{Counter, RuleCounters};

use super::rules_status::RulesStatus;
use crate::{ebpf::Classifier, error_chain, rules::Rule, stats, tproxy::destination::Destinations};

/// Logs the rules in force, the first few of them.
pub fn log_rules(rules: &[Rule]) {
    const SHOWN: usize = 20;
    for (i, rule) in rules.iter().take(SHOWN).enumerate() {
        info!("rule {}: {}", i + 1, stats::describe_rule(rule));
    }
    if rules.len() > SHOWN {
        info!(
            "... and {} more rules (proxy stats lists them all)",
            rules.len() - SHOWN
        );
    }
}

/// Says whether the classifier looks up the return path for packets no rule matches, and
/// why (`ReturnPath::needed`).
pub fn log_return_path(needed: Option<&str>) {
    match needed {
        Some(why) => info!("return path: looked up for packets no rule matches ({why})"),
        None => info!(
            "return path: not looked up for packets no rule matches (no socket of this agent \
             can need it; return_path_skipped counts them)"
        ),
    }
}

/// The answer to `proxy stats`.
pub fn report(
    classifier: &Classifier,
    rules: &[Rule],
    destinations: &Destinations,
    status: &RulesStatus,
) -> String {
    match classifier.counters() {
        Ok(counters) => stats::format_report(
            &counters,
            &[(stats::REFUSED_DESTINATION, destinations.refused())],
            &rule_counters(classifier, rules),
            &status.report(),
        ),
        Err(e) => format!("error: {}\n", error_chain(&e)),
    }
}

/// The classifier's counters for a `--metrics` scrape (none where a map cannot be read).
pub fn snapshot(
    classifier: &Classifier,
    rules: &[Rule],
    destinations: &Destinations,
    status: &RulesStatus,
) -> crate::metrics::ClassifierSnapshot {
    crate::metrics::ClassifierSnapshot {
        counters: classifier.counters().unwrap_or_default(),
        rules: rule_counters(classifier, rules)
            .into_iter()
            .map(|(rule, c)| (stats::describe_rule(&rule), c))
            .collect(),
        refused_destinations: destinations.refused(),
        rules_in_force: status.snapshot(),
    }
}

/// Logs the global and per-rule counters, once the classifier is detached (on exit).
pub fn log_counters(classifier: &Classifier, rules: &[Rule], destinations: &Destinations) {
    match classifier.counters() {
        Ok(counters) => info!(
            "counters: {} {}={}",
            counters
                .iter()
                .map(|(c, v)| format!("{}={v}", Counter::name(*c)))
                .collect::<Vec<_>>()
                .join(" "),
            stats::REFUSED_DESTINATION,
            destinations.refused()
        ),
        Err(e) => error!("reading counters: {}", error_chain(&e)),
    }
    for (i, (_, c)) in rule_counters(classifier, rules).iter().enumerate() {
        info!(
            "rule {}: packets={} bytes={} assigned={} dropped={}",
            i + 1,
            c.packets,
            c.bytes,
            c.assigned,
            c.dropped
        );
    }
}

fn rule_counters(classifier: &Classifier, rules: &[Rule]) -> Vec<(Rule, RuleCounters)> {
    rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let c = classifier.rule_counters(i as u32).unwrap_or_default();
            (r.clone(), c)
        })
        .collect()
}
