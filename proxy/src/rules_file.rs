//! `--config FILE`: many rules in TOML, each with its own protocols, prefixes, ports,
//! on-ip, on-port and mark. Rules apply in file order, first match wins, like a chain.
//!
//! ```toml
//! [defaults]                      # optional, for every rule that does not say otherwise
//! protocol = "tcp"
//! tproxy_mark = "0x1/0x1"
//! fail_open = false
//!
//! [[rule]]
//! dst = ["10.0.0.0/8", "2001:db8::/32"]   # optional: every destination
//! dport = "80,443,8000-8100"
//! on_port = 50080
//! on_ip = "127.0.0.1"                     # optional
//! protocol = "tcp,udp"                    # optional
//! local = true                            # optional: with `proxy run --local`, whether
//!                                         # the rule applies to local processes (default)
//! cgroup = ["app.slice"]                  # optional: only local processes in these
//!                                         # cgroups (v2, like `-m cgroup --path`)
//! ```

use std::{net::IpAddr, path::Path};

use serde::Deserialize;

use crate::rules::{self, Mark, PortSet, Protocols, Rule, RuleError};

/// A rules file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RulesFileError {
    /// The file could not be read.
    #[error("reading {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown keys.
    #[error("{path}: {message}")]
    Syntax { path: String, message: String },
    /// A rule has a bad value.
    #[error("{path}: rule {index}: {field}")]
    Rule {
        path: String,
        /// 1-based, in file order.
        index: usize,
        field: &'static str,
        #[source]
        source: RuleError,
    },
    /// No `[[rule]]` at all.
    #[error("{0}: no [[rule]] entries")]
    Empty(String),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Defaults {
    protocol: Option<String>,
    tproxy_mark: Option<String>,
    fail_open: Option<bool>,
    on_ip: Option<IpAddr>,
    on_port: Option<u16>,
    local: Option<bool>,
    cgroup: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(default)]
    dst: Vec<String>,
    dport: String,
    protocol: Option<String>,
    on_port: Option<u16>,
    on_ip: Option<IpAddr>,
    tproxy_mark: Option<String>,
    fail_open: Option<bool>,
    local: Option<bool>,
    cgroup: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    defaults: Defaults,
    #[serde(default)]
    rule: Vec<RawRule>,
}

/// Reads and validates a rules file. Listener slots are not assigned here. `local`: the
/// agent runs with `--local`, and rules apply to local processes unless they say not to.
pub fn load(path: &Path, local: bool) -> Result<Vec<Rule>, RulesFileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| RulesFileError::Read {
        path: shown.clone(),
        source,
    })?;
    parse_with(&text, &shown, local)
}

/// Parses the text of a rules file for an agent without `--local`; `path` is only used in
/// messages.
#[cfg(test)]
pub fn parse(text: &str, path: &str) -> Result<Vec<Rule>, RulesFileError> {
    parse_with(text, path, false)
}

/// Parses the text of a rules file; `path` is only used in messages, `local` as in
/// [`load`].
pub fn parse_with(text: &str, path: &str, local: bool) -> Result<Vec<Rule>, RulesFileError> {
    let raw: RawFile = toml::from_str(text).map_err(|e| RulesFileError::Syntax {
        path: path.to_owned(),
        message: e.message().to_owned(),
    })?;
    if raw.rule.is_empty() {
        return Err(RulesFileError::Empty(path.to_owned()));
    }
    let d = raw.defaults;
    raw.rule
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let err = |field: &'static str| {
                move |source: RuleError| RulesFileError::Rule {
                    path: path.to_owned(),
                    index: i + 1,
                    field,
                    source,
                }
            };
            let protocols: Protocols = r
                .protocol
                .as_deref()
                .or(d.protocol.as_deref())
                .unwrap_or("tcp")
                .parse()
                .map_err(err("protocol"))?;
            let mark: Mark = match r.tproxy_mark.as_deref().or(d.tproxy_mark.as_deref()) {
                Some(m) => m.parse().map_err(err("tproxy_mark"))?,
                None => Mark::default(),
            };
            let dst = r
                .dst
                .iter()
                .map(|p| rules::parse_prefix(p))
                .collect::<Result<Vec<_>, _>>()
                .map_err(err("dst"))?;
            let dport: PortSet = r.dport.parse().map_err(err("dport"))?;
            let on_port = r
                .on_port
                .or(d.on_port)
                .ok_or(RuleError::MissingOnPort)
                .map_err(err("on_port"))?;
            let cgroups = r.cgroup.as_ref().or(d.cgroup.as_ref());
            let is_local = r.local.or(d.local).unwrap_or(local || cgroups.is_some());
            let scope = match (is_local, cgroups) {
                (false, Some(_)) => return Err(err("cgroup")(RuleError::CgroupNotLocal)),
                (false, None) => None,
                (true, _) if !local => return Err(err("local")(RuleError::LocalWithoutFlag)),
                (true, None) => Some(Vec::new()),
                (true, Some(paths)) => {
                    if paths.len() > proxy_common::MAX_RULE_CGROUPS {
                        return Err(err("cgroup")(RuleError::TooManyCgroups(paths.len())));
                    }
                    let resolved = paths
                        .iter()
                        .map(|p| {
                            crate::cgroup::Cgroup::resolve(p)
                                .map_err(|e| RuleError::Cgroup(crate::error_chain(&e)))
                        })
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(err("cgroup"))?;
                    Some(resolved)
                }
            };
            Ok(Rule {
                protocols,
                dst,
                dport,
                on_ip: r.on_ip.or(d.on_ip),
                on_port,
                mark,
                fail_open: r.fail_open.or(d.fail_open).unwrap_or(false),
                listener_slot: None,
                local: scope,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_take_defaults_and_keep_file_order() {
        let rules = parse(
            r#"
            [defaults]
            tproxy_mark = "0x2/0x2"
            on_port = 50080

            [[rule]]
            dst = ["10.0.0.0/8"]
            dport = "80,443"

            [[rule]]
            dport = "53"
            protocol = "udp"
            on_port = 5353
            on_ip = "127.0.0.1"
            fail_open = true
            "#,
            "test.toml",
        )
        .expect("valid");
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].mark, Mark { value: 2, mask: 2 });
        assert_eq!(rules[0].on_port, 50080);
        assert_eq!(rules[0].dst[0].to_string(), "10.0.0.0/8");
        assert!(rules[1].protocols.udp && !rules[1].protocols.tcp);
        assert_eq!(rules[1].on_port, 5353);
        assert!(rules[1].fail_open);
        assert!(rules[1].dst.is_empty());
    }

    #[test]
    fn rules_are_local_with_the_flag_unless_they_say_not() {
        let text = "[[rule]]\ndport = \"80\"\non_port = 1\n\
                    [[rule]]\ndport = \"81\"\non_port = 1\nlocal = false\n";
        let rules = parse_with(text, "f.toml", true).expect("valid");
        assert_eq!(rules[0].local, Some(Vec::new()));
        assert_eq!(rules[1].local, None);
        let rules = parse_with(text, "f.toml", false).expect("valid");
        assert!(rules.iter().all(|r| r.local.is_none()));
        let e = parse_with(
            "[[rule]]\ndport = \"80\"\non_port = 1\nlocal = false\ncgroup = [\"a\"]\n",
            "f.toml",
            true,
        )
        .expect_err("cgroup without local");
        assert!(e.to_string().contains("rule 1: cgroup"), "{e}");
    }

    #[test]
    fn bad_files_name_the_rule_and_the_field() {
        let e = parse(
            "[[rule]]\ndport = \"80\"\non_port = 1\n[[rule]]\ndport = \"8o\"\non_port = 1\n",
            "f.toml",
        )
        .expect_err("bad port");
        assert_eq!(
            crate::error_chain(&e),
            "f.toml: rule 2: dport: '8o' is not a port (0-65535)"
        );
        let e = parse("[[rule]]\ndport = \"80\"\n", "f.toml").expect_err("no on_port");
        assert!(e.to_string().contains("rule 1: on_port"), "{e}");
        let e = parse(
            "[[rule]]\ndport = \"80\"\non_port = 1\ncolour = 1\n",
            "f.toml",
        )
        .expect_err("unknown key");
        assert!(e.to_string().contains("colour"), "{e}");
        assert!(matches!(parse("", "f.toml"), Err(RulesFileError::Empty(_))));
        let e = parse(
            "[[rule]]\ndport = \"80\"\non_port = 1\nlocal = true\n",
            "f.toml",
        )
        .expect_err("local without --local");
        assert!(e.to_string().contains("rule 1: local"), "{e}");
        assert!(matches!(
            parse("[[rule]", "f.toml"),
            Err(RulesFileError::Syntax { .. })
        ));
    }
}
