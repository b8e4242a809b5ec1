//! Which rules are in force and how the last reload went: what `proxy stats` and the metrics
//! say, so that a fleet can see in one query which node runs which rules and which refused
//! an update (issue 25).
//!
//! The hash is of the rules as the agent understood them (each rule's `proxy stats` line and
//! its `--local` scope), not of the file's bytes: a comment or a reordering of keys leaves
//! it as it is, and two nodes with the same rules show the same hash whatever their files
//! look like.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::{metrics::RulesSnapshot, rules::Rule, stats::describe_rule};

/// The rules in force, and the reloads so far.
pub struct RulesStatus {
    hash: String,
    applied_at: SystemTime,
    applied: u64,
    refused: u64,
    /// The last attempt: when, and the error if it was refused.
    last: Option<(SystemTime, Option<String>)>,
}

impl RulesStatus {
    /// The rules the agent started with.
    pub fn new(rules: &[Rule]) -> Self {
        RulesStatus {
            hash: rules_hash(rules),
            applied_at: SystemTime::now(),
            applied: 0,
            refused: 0,
            last: None,
        }
    }

    /// A reload put `rules` in force.
    pub fn applied(&mut self, rules: &[Rule]) {
        let now = SystemTime::now();
        self.hash = rules_hash(rules);
        self.applied_at = now;
        self.applied += 1;
        self.last = Some((now, None));
    }

    /// A reload was refused; the rules in force stay.
    pub fn refused(&mut self, why: String) {
        self.refused += 1;
        self.last = Some((SystemTime::now(), Some(why)));
    }

    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The lines `proxy stats` prints.
    pub fn report(&self) -> String {
        let last = match &self.last {
            None => "none".to_owned(),
            Some((at, None)) => format!("applied at {}", unix(*at)),
            Some((at, Some(why))) => format!("refused at {}: {why}", unix(*at)),
        };
        format!(
            "rules: hash {}, applied at {}; reloads: {} applied, {} refused; last reload: {last}\n",
            self.hash,
            unix(self.applied_at),
            self.applied,
            self.refused
        )
    }

    /// What a `--metrics` scrape shows.
    pub fn snapshot(&self) -> RulesSnapshot {
        RulesSnapshot {
            hash: self.hash.clone(),
            applied_unix: unix(self.applied_at),
            reloads_applied: self.applied,
            reloads_refused: self.refused,
            last_reload_ok: self.last.as_ref().map(|(_, why)| why.is_none()),
        }
    }
}

/// Seconds since the epoch.
fn unix(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// 16 hex digits: FNV-1a (64 bits) over each rule's description, one per line. Not a
/// defence against anyone, only a short name that changes when the rules do.
pub fn rules_hash(rules: &[Rule]) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = OFFSET;
    for rule in rules {
        let scope = rule
            .local
            .as_ref()
            .map(|cgroups| cgroups.iter().map(|c| c.name.as_str()).collect::<Vec<_>>());
        for byte in format!("{} local {scope:?}\n", describe_rule(rule)).bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(PRIME);
        }
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> Vec<Rule> {
        crate::rules_file::parse(text, "rules.toml").expect("rules")
    }

    #[test]
    fn the_hash_follows_the_rules_not_the_file() {
        let a = rules("[[rule]]\ndport = \"80\"\non_port = 50080\n");
        let same = rules("# a comment\n[[rule]]\non_port = 50080\ndport = \"80\"\n");
        let other = rules("[[rule]]\ndport = \"80,443\"\non_port = 50080\n");
        assert_eq!(rules_hash(&a), rules_hash(&same));
        assert_ne!(rules_hash(&a), rules_hash(&other));
        assert_eq!(rules_hash(&a).len(), 16);
    }

    #[test]
    fn the_report_says_what_the_last_reload_did() {
        let mut status = RulesStatus::new(&rules("[[rule]]\ndport = \"80\"\non_port = 1\n"));
        assert!(status.report().contains("last reload: none"));
        status.refused("line 2: bad".into());
        assert!(
            status
                .report()
                .contains("0 applied, 1 refused; last reload: refused at")
        );
        assert_eq!(status.snapshot().last_reload_ok, Some(false));
        let before = status.hash().to_owned();
        status.applied(&rules("[[rule]]\ndport = \"81\"\non_port = 1\n"));
        assert_ne!(status.hash(), before);
        assert_eq!(status.snapshot().last_reload_ok, Some(true));
        assert_eq!(status.snapshot().reloads_applied, 1);
    }
}
