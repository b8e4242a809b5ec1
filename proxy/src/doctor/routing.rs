//! Policy rules and routes of others on our fwmark or table. The agent's own carry the
//! protocol [`RTPROT_PROXY`] (see [`crate::routing`]); a route of someone else in table N is
//! replaced by ours (the classic recipe's `local 0/0 dev lo table N` included) and then
//! removed on exit, and a rule of someone else that matches the tproxy mark competes with
//! ours for the marked packets.

use std::net::IpAddr;

use futures::TryStreamExt as _;
use rtnetlink::{
    IpVersion, RouteMessageBuilder,
    packet_route::{
        AddressFamily,
        route::{RouteAddress, RouteAttribute, RouteMessage},
        rule::{RuleAttribute, RuleMessage},
    },
};

use super::{Finding, Settings};
use crate::{routing::RTPROT_PROXY, rules::Mark};

/// A policy rule, as far as the checks need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleEntry {
    pub v6: bool,
    pub pref: u32,
    pub table: u32,
    pub fwmark: Option<Mark>,
    /// Tagged with [`RTPROT_PROXY`].
    pub ours: bool,
}

/// A route, as far as the checks need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    pub table: u32,
    pub ours: bool,
    /// As `ip route` would roughly print it.
    pub text: String,
}

/// Whether some mark matches both (each `value` lies within its `mask`).
fn overlap(a: Mark, b: Mark) -> bool {
    (a.value ^ b.value) & a.mask & b.mask == 0
}

fn describe(rule: &RuleEntry) -> String {
    let family = if rule.v6 { "IPv6" } else { "IPv4" };
    match rule.fwmark {
        Some(mark) => format!(
            "{family} rule pref {} fwmark {mark} lookup {}",
            rule.pref, rule.table
        ),
        None => format!("{family} rule pref {} lookup {}", rule.pref, rule.table),
    }
}

/// The rules and routes of others that get in the way of `marks` and `table`.
pub fn policy(
    table: u32,
    marks: &[Mark],
    rules: &[RuleEntry],
    routes: &[RouteEntry],
) -> Vec<Finding> {
    let mut findings = Vec::new();
    let foreign: Vec<&str> = routes
        .iter()
        .filter(|r| r.table == table && !r.ours)
        .map(|r| r.text.as_str())
        .collect();
    if !foreign.is_empty() {
        findings.push(Finding::problem(
            "table",
            format!(
                "table {table} already holds routes that are not ours: {}; the agent would \
                 replace its local route and remove it on exit",
                foreign.join(", ")
            ),
            format!(
                "pick a free table with --table, or remove them (ip route flush table {table}; \
                 ip -6 route flush table {table})"
            ),
        ));
    }
    if routes.iter().any(|r| r.table == table && r.ours) {
        findings.push(Finding::info(
            "table",
            format!(
                "table {table} holds a route of this proxy: an agent runs, or one did not stop \
                 cleanly (proxy run takes it over, proxy cleanup removes it)"
            ),
        ));
    }
    for rule in rules.iter().filter(|r| !r.ours) {
        let same_mark = rule
            .fwmark
            .is_some_and(|m| marks.iter().any(|ours| overlap(m, *ours)));
        if same_mark && rule.table == table {
            findings.push(Finding::warning(
                "fwmark",
                format!(
                    "{} is not ours (the classic recipe's?): it does what ours does, and stays \
                     when the agent exits",
                    describe(rule)
                ),
                "remove it (ip rule del ...) unless something else still needs it",
            ));
        } else if same_mark {
            findings.push(Finding::problem(
                "fwmark",
                format!(
                    "{} is not ours and matches the tproxy mark: marked packets may be \
                     routed by it instead of to the local table",
                    describe(rule)
                ),
                "remove it, or pick another --tproxy-mark",
            ));
        } else if rule.table == table {
            findings.push(Finding::problem(
                "table",
                format!(
                    "{} is not ours and sends other traffic to table {table}, where the \
                     agent's route makes every address local",
                    describe(rule)
                ),
                "pick a free table with --table, or remove the rule",
            ));
        }
    }
    if findings.is_empty() {
        findings.push(Finding::ok(
            "table",
            format!("no rule or route of others on table {table} or the tproxy mark"),
        ));
    }
    findings
}

pub(super) async fn check(settings: &Settings<'_>) -> Vec<Finding> {
    match read().await {
        Ok((rules, routes)) => policy(settings.args.table, &settings.marks(), &rules, &routes),
        Err(e) => vec![Finding::warning(
            "table",
            format!("policy routing not read: {e}"),
            "run as root in the namespace the agent will run in",
        )],
    }
}

async fn read() -> Result<(Vec<RuleEntry>, Vec<RouteEntry>), String> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(|e| e.to_string())?;
    let task = tokio::spawn(connection);
    let mut rules = Vec::new();
    let mut routes = Vec::new();
    for version in [IpVersion::V4, IpVersion::V6] {
        let v6 = version == IpVersion::V6;
        let listed: Result<Vec<RuleMessage>, _> =
            handle.rule().get(version).execute().try_collect().await;
        // IPv6 disabled in this namespace: nothing to list.
        let Ok(listed) = listed.or_else(|e| if v6 { Ok(Vec::new()) } else { Err(e) }) else {
            continue;
        };
        rules.extend(listed.iter().map(|r| rule_entry(r, v6)));
        let request = if v6 {
            RouteMessageBuilder::<std::net::Ipv6Addr>::new().build()
        } else {
            RouteMessageBuilder::<std::net::Ipv4Addr>::new().build()
        };
        let listed: Vec<RouteMessage> =
            match handle.route().get(request).execute().try_collect().await {
                Ok(listed) => listed,
                Err(_) if v6 => Vec::new(),
                Err(e) => {
                    task.abort();
                    return Err(e.to_string());
                }
            };
        routes.extend(listed.iter().map(route_entry));
    }
    task.abort();
    Ok((rules, routes))
}

fn rule_entry(rule: &RuleMessage, v6: bool) -> RuleEntry {
    let mut entry = RuleEntry {
        v6,
        pref: 0,
        table: u32::from(rule.header.table),
        fwmark: None,
        ours: false,
    };
    let mut value = None;
    let mut mask = u32::MAX;
    for attribute in &rule.attributes {
        match attribute {
            RuleAttribute::Priority(p) => entry.pref = *p,
            RuleAttribute::Table(t) => entry.table = *t,
            RuleAttribute::FwMark(v) => value = Some(*v),
            RuleAttribute::FwMask(m) => mask = *m,
            RuleAttribute::Protocol(p) => entry.ours = u8::from(*p) == RTPROT_PROXY,
            _ => {}
        }
    }
    entry.fwmark = value.map(|value| Mark { value, mask });
    entry
}

fn route_entry(route: &RouteMessage) -> RouteEntry {
    let mut table = u32::from(route.header.table);
    let mut dst = None;
    for attribute in &route.attributes {
        match attribute {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(a)) => dst = Some(IpAddr::V4(*a)),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => dst = Some(IpAddr::V6(*a)),
            _ => {}
        }
    }
    let len = route.header.destination_prefix_length;
    let dst = match dst {
        Some(addr) => format!("{addr}/{len}"),
        None if route.header.address_family == AddressFamily::Inet6 => format!("::/{len}"),
        None => format!("0.0.0.0/{len}"),
    };
    RouteEntry {
        table,
        ours: u8::from(route.header.protocol) == RTPROT_PROXY,
        text: format!(
            "{} {dst} proto {}",
            format!("{:?}", route.header.kind).to_lowercase(),
            u8::from(route.header.protocol)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Severity;

    const MARK: Mark = Mark { value: 1, mask: 1 };

    fn rule(table: u32, fwmark: Option<Mark>, ours: bool) -> RuleEntry {
        RuleEntry {
            v6: false,
            pref: 1000,
            table,
            fwmark,
            ours,
        }
    }

    fn route(table: u32, ours: bool) -> RouteEntry {
        RouteEntry {
            table,
            ours,
            text: "local default proto 4".into(),
        }
    }

    fn severities(findings: &[Finding]) -> Vec<(&'static str, Severity)> {
        findings.iter().map(|f| (f.check, f.severity)).collect()
    }

    #[test]
    fn foreign_routes_in_the_table_and_rules_on_the_mark_are_found() {
        let main_rules = [rule(254, None, false), rule(255, None, false)];
        let clean = policy(100, &[MARK], &main_rules, &[route(254, false)]);
        assert_eq!(severities(&clean), [("table", Severity::Ok)]);
        // Ours are fine (a leftover is said).
        let ours = policy(
            100,
            &[MARK],
            &[rule(100, Some(MARK), true)],
            &[route(100, true)],
        );
        assert_eq!(severities(&ours), [("table", Severity::Info)]);
        let foreign_route = policy(100, &[MARK], &[], &[route(100, false)]);
        assert_eq!(severities(&foreign_route), [("table", Severity::Problem)]);
        assert!(foreign_route[0].what.contains("table 100"));
        // The classic recipe's rule: same mark, same table.
        let recipe = policy(100, &[MARK], &[rule(100, Some(MARK), false)], &[]);
        assert_eq!(severities(&recipe), [("fwmark", Severity::Warning)]);
        // A mark that overlaps ours, to another table.
        let other = policy(
            100,
            &[MARK],
            &[rule(
                200,
                Some(Mark {
                    value: 0x11,
                    mask: 0xff,
                }),
                false,
            )],
            &[],
        );
        assert_eq!(severities(&other), [("fwmark", Severity::Problem)]);
        // A mark that cannot match ours, to another table: not ours to judge.
        let apart = policy(
            100,
            &[MARK],
            &[rule(
                200,
                Some(Mark {
                    value: 0x10,
                    mask: 0x11,
                }),
                false,
            )],
            &[],
        );
        assert_eq!(severities(&apart), [("table", Severity::Ok)]);
        // Any other rule into our table.
        let into = policy(100, &[MARK], &[rule(100, None, false)], &[]);
        assert_eq!(severities(&into), [("table", Severity::Problem)]);
    }

    #[test]
    fn marks_overlap_when_one_mark_matches_both() {
        assert!(overlap(
            MARK,
            Mark {
                value: 0x1,
                mask: 0xff
            }
        ));
        assert!(overlap(
            MARK,
            Mark {
                value: 0x100,
                mask: 0x100
            }
        ));
        assert!(!overlap(
            MARK,
            Mark {
                value: 0x0,
                mask: 0x1
            }
        ));
    }
}
