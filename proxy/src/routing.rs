//! Policy routing for marked packets, over netlink (no `ip` subprocess):
//!
//! ```text
//! ip rule add fwmark VALUE/MASK lookup TABLE        (and ip -6 rule ...)
//! ip route add local 0.0.0.0/0 dev lo table TABLE   (and local ::/0)
//! ```
//!
//! A packet the classifier assigned to a socket carries the mark; the rule sends it to the
//! table whose only route says "every address is local", so the stack delivers it to the
//! socket instead of forwarding it (T6).
//!
//! With `--local`, a local socket the connect program marked is routed by the same rule to
//! `lo`. IPv4 needs one more rule, before the fwmark rule:
//!
//! ```text
//! ip rule add from 0.0.0.0/32 fwmark VALUE/MASK lookup main
//! ```
//!
//! `ip_route_connect` picks an unbound socket's source in a first lookup with source
//! 0.0.0.0. In table N `local 0/0` would answer with the destination itself as the source,
//! which the second lookup (source set) then refuses: the connect fails with ENETUNREACH.
//! This rule sends only that first lookup (source 0.0.0.0, `fib4_rule_match` compares the
//! whole /32) to the main table, so the source is the one the host would use without the
//! proxy; the second lookup, source set, reaches table N and goes to `lo`. IPv6 needs none
//! and must not get one: it routes once and picks the source afterwards
//! (`ip6_dst_lookup_tail`), so such a rule would keep the main table's route.
//!
//! Both the rules and the routes carry our own routing protocol number, [`RTPROT_PROXY`], so
//! the agent can tell them from the administrator's: a restart after a crash finds and
//! replaces what is left, and teardown removes only what is ours.

use std::net::{Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt as _;
use log::{debug, info, warn};
use rtnetlink::{
    Handle, IpVersion, RouteMessageBuilder,
    packet_route::{
        route::{RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType},
        rule::{RuleAction as NlRuleAction, RuleAttribute, RuleMessage},
    },
};

use crate::rules::Mark;

/// Routing protocol number that tags the rules and routes this agent installs
/// (`ip rule show` and `ip route show table N` print it as `proto 211`).
pub const RTPROT_PROXY: u8 = 211;

/// A netlink request about policy routing failed.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    /// The netlink socket could not be opened.
    #[error("opening a netlink socket")]
    Connect(#[source] std::io::Error),
    /// A request was refused.
    #[error("{what}")]
    Request {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
}

/// The fwmark rules and local routes, installed by [`PolicyRouting::install`] and removed by
/// [`PolicyRouting::remove`].
pub struct PolicyRouting {
    handle: Handle,
    table: u32,
    /// `--local`: the IPv4 source rules too (see the module's documentation).
    local: bool,
    /// Families whose rules and route we installed.
    installed: Vec<IpVersion>,
}

fn request(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> RoutingError {
    let what = what.into();
    move |source| RoutingError::Request { what, source }
}

fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -errno)
}

/// The destination of the local route, as `ip route` writes it.
fn local_prefix(v: &IpVersion) -> &'static str {
    match v {
        IpVersion::V4 => "0.0.0.0/0",
        IpVersion::V6 => "::/0",
    }
}

fn family_name(v: &IpVersion) -> &'static str {
    match v {
        IpVersion::V4 => "IPv4",
        IpVersion::V6 => "IPv6",
    }
}

impl PolicyRouting {
    /// Works through `handle`, a netlink connection in the agent's network namespace.
    pub fn new(handle: Handle, table: u32) -> Self {
        PolicyRouting {
            handle,
            table,
            local: false,
            installed: Vec::new(),
        }
    }

    /// With `local`, the IPv4 source rule `from 0.0.0.0/32 fwmark M lookup main` is
    /// installed for each mark too, before its fwmark rule.
    pub fn with_local(mut self, local: bool) -> Self {
        self.local = local;
        self
    }

    /// Makes the fwmark rules for `marks` (one per distinct mark) and the local route exist,
    /// for IPv4 and, where the namespace has IPv6, for IPv6, and removes rules of ours for
    /// this table with other marks. Leftovers of a crashed run are reused or removed.
    pub async fn install(&mut self, marks: &[Mark]) -> Result<(), RoutingError> {
        self.ensure(marks, true).await
    }

    /// [`install`](Self::install) without removing anything: a reload adds the routes of
    /// its new rules before the classifier can match them, and removes the old ones (with
    /// `install`) only after the switch.
    pub async fn add(&mut self, marks: &[Mark]) -> Result<(), RoutingError> {
        self.ensure(marks, false).await
    }

    async fn ensure(&mut self, marks: &[Mark], remove_others: bool) -> Result<(), RoutingError> {
        let mut wanted: Vec<Mark> = Vec::new();
        for m in marks {
            if !wanted.contains(m) {
                wanted.push(*m);
            }
        }
        for version in [IpVersion::V4, IpVersion::V6] {
            let existing = match self.our_rules(version.clone()).await {
                Ok(rules) => rules,
                Err(e) if version == IpVersion::V6 && ipv6_unavailable(&e) => {
                    warn!("IPv6 is disabled in this namespace: no IPv6 policy routing");
                    continue;
                }
                Err(e) => return Err(e),
            };
            if !self.installed.contains(&version) {
                self.installed.push(version.clone());
            }
            for mark in &wanted {
                if existing.iter().any(|(_, m)| m == mark) {
                    continue;
                }
                self.add_rule(version.clone(), *mark).await?;
                info!(
                    "policy routing ({}): fwmark {mark} lookup {}",
                    family_name(&version),
                    self.table
                );
            }
            for (rule, mark) in existing {
                if remove_others && !wanted.contains(&mark) {
                    self.delete_rule(version.clone(), rule).await?;
                    debug!(
                        "policy routing ({}): fwmark {mark} removed",
                        family_name(&version)
                    );
                }
            }
            if version == IpVersion::V4 {
                self.ensure_source_rules(&wanted, remove_others).await?;
            }
            self.handle
                .route()
                .add(self.local_route(version.clone()))
                .replace()
                .execute()
                .await
                .map_err(request(format!(
                    "adding the {} local route to table {}",
                    family_name(&version),
                    self.table
                )))?;
            info!(
                "policy routing ({}): local {} dev lo table {}",
                family_name(&version),
                local_prefix(&version),
                self.table
            );
        }
        Ok(())
    }

    /// `--local`: the IPv4 source rule of each mark, added after its fwmark rule. A rule
    /// added without a preference goes before every rule but the local table's
    /// (`fib_default_rule_pref`), so before the fwmark rule. Source rules of ours for marks
    /// this table no longer uses, or for any mark without `--local`, are removed (with
    /// `remove_others`), unless another table's fwmark rule of ours uses that mark.
    async fn ensure_source_rules(
        &self,
        marks: &[Mark],
        remove_others: bool,
    ) -> Result<(), RoutingError> {
        let wanted: &[Mark] = if self.local { marks } else { &[] };
        let existing = source_rules_of_ours(&self.handle).await?;
        for mark in wanted {
            if existing.iter().any(|(_, m)| m == mark) {
                continue;
            }
            let mut rule = self
                .handle
                .rule()
                .add()
                .action(NlRuleAction::ToTable)
                .table_id(u32::from(libc::RT_TABLE_MAIN))
                .fw_mark(mark.value);
            let msg = rule.message_mut();
            msg.attributes.push(RuleAttribute::FwMask(mark.mask));
            msg.attributes
                .push(RuleAttribute::Protocol(RouteProtocol::Other(RTPROT_PROXY)));
            rule.v4()
                .source_prefix(Ipv4Addr::UNSPECIFIED, 32)
                .execute()
                .await
                .map_err(request(format!(
                    "adding the IPv4 source rule fwmark {mark}"
                )))?;
            info!("policy routing (IPv4): from 0.0.0.0/32 fwmark {mark} lookup main (--local)");
        }
        if remove_others {
            self.remove_source_rules(wanted).await?;
        }
        Ok(())
    }

    /// Removes our IPv4 source rules whose mark is not in `keep` and that no other table's
    /// fwmark rule of ours uses; says what went.
    async fn remove_source_rules(&self, keep: &[Mark]) -> Result<Vec<String>, RoutingError> {
        let others: Vec<Mark> = rules_of_ours(&self.handle, IpVersion::V4)
            .await?
            .into_iter()
            .filter(|(_, table, _)| *table != self.table)
            .map(|(_, _, mark)| mark)
            .collect();
        let mut removed = Vec::new();
        for (rule, mark) in source_rules_of_ours(&self.handle).await? {
            if keep.contains(&mark) || others.contains(&mark) {
                continue;
            }
            self.delete_rule(IpVersion::V4, rule).await?;
            removed.push(format!(
                "IPv4 rule from 0.0.0.0/32 fwmark {mark} lookup main"
            ));
        }
        Ok(removed)
    }

    /// Removes what [`install`](Self::install) added. Safe to call more than once.
    pub async fn remove(&mut self) -> Result<(), RoutingError> {
        for version in std::mem::take(&mut self.installed) {
            self.remove_family(version.clone()).await?;
            info!("policy routing ({}) removed", family_name(&version));
        }
        Ok(())
    }

    /// Deletes our rules for this table and our local route of one family; says what went.
    async fn remove_family(&self, version: IpVersion) -> Result<Vec<String>, RoutingError> {
        let family = family_name(&version);
        let mut removed = Vec::new();
        if version == IpVersion::V4 {
            removed.extend(self.remove_source_rules(&[]).await?);
        }
        for (rule, mark) in self.our_rules(version.clone()).await? {
            self.delete_rule(version.clone(), rule).await?;
            removed.push(format!("{family} rule fwmark {mark} lookup {}", self.table));
        }
        if self.delete_local_route(version.clone()).await? {
            removed.push(format!(
                "{family} route local {} dev lo table {}",
                local_prefix(&version),
                self.table
            ));
        }
        Ok(removed)
    }

    async fn add_rule(&self, version: IpVersion, mark: Mark) -> Result<(), RoutingError> {
        // The action must be said: an UNSPEC rule action makes `fib4_rule_action` return
        // -EINVAL, which drops every matching packet like a blackhole rule.
        let mut rule = self
            .handle
            .rule()
            .add()
            .action(NlRuleAction::ToTable)
            .table_id(self.table)
            .fw_mark(mark.value);
        let msg = rule.message_mut();
        msg.attributes.push(RuleAttribute::FwMask(mark.mask));
        msg.attributes
            .push(RuleAttribute::Protocol(RouteProtocol::Other(RTPROT_PROXY)));
        let added = match version {
            IpVersion::V4 => rule.v4().execute().await,
            IpVersion::V6 => rule.v6().execute().await,
        };
        added.map_err(request(format!(
            "adding the {} fwmark rule {mark}",
            family_name(&version)
        )))
    }

    async fn delete_rule(&self, version: IpVersion, rule: RuleMessage) -> Result<(), RoutingError> {
        match self.handle.rule().del(rule).execute().await {
            Ok(()) => Ok(()),
            Err(e) if is_errno(&e, libc::ENOENT) => Ok(()),
            Err(e) => Err(request(format!(
                "deleting a {} rule",
                family_name(&version)
            ))(e)),
        }
    }

    /// Our fwmark rules (tagged with [`RTPROT_PROXY`]) that point at our table.
    async fn our_rules(
        &self,
        version: IpVersion,
    ) -> Result<Vec<(RuleMessage, Mark)>, RoutingError> {
        Ok(rules_of_ours(&self.handle, version)
            .await?
            .into_iter()
            .filter(|(_, table, _)| *table == self.table)
            .map(|(rule, _, mark)| (rule, mark))
            .collect())
    }

    /// Removes every rule and route of ours for this table, whoever installed them (an
    /// agent that died uncleanly: `proxy cleanup`), and says what went.
    pub async fn remove_leftovers(&mut self) -> Result<Vec<String>, RoutingError> {
        let mut removed = Vec::new();
        for version in [IpVersion::V4, IpVersion::V6] {
            match self.remove_family(version.clone()).await {
                Ok(family) => removed.extend(family),
                Err(e) if version == IpVersion::V6 && ipv6_unavailable(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(removed)
    }

    /// Deletes our local route of `version`; false when there was none. Deleting with our
    /// protocol set only deletes a route of ours (`fib_table_delete` skips routes whose
    /// protocol differs).
    async fn delete_local_route(&self, version: IpVersion) -> Result<bool, RoutingError> {
        match self
            .handle
            .route()
            .del(self.local_route(version.clone()))
            .execute()
            .await
        {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, libc::ESRCH) || is_errno(&e, libc::ENOENT) => Ok(false),
            Err(e) => Err(request(format!(
                "deleting the {} local route",
                family_name(&version)
            ))(e)),
        }
    }

    /// `local 0.0.0.0/0 dev lo table N` (or `::/0`), tagged as ours.
    fn local_route(&self, version: IpVersion) -> RouteMessage {
        // The loopback device is always ifindex 1 in a network namespace.
        const LO_IFINDEX: u32 = 1;
        let mut msg = match version {
            IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                .output_interface(LO_IFINDEX)
                .table_id(self.table)
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .protocol(RouteProtocol::Other(RTPROT_PROXY))
                .build(),
            IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
                .output_interface(LO_IFINDEX)
                .table_id(self.table)
                .kind(RouteType::Local)
                .scope(RouteScope::Host)
                .protocol(RouteProtocol::Other(RTPROT_PROXY))
                .build(),
        };
        // A /0 route has no destination attribute, as `ip route` sends it.
        msg.attributes
            .retain(|a| !matches!(a, RouteAttribute::Destination(_)));
        msg
    }
}

/// The tables that fwmark rules of ours (any agent's) point at, in this namespace.
pub async fn tables_of_ours(handle: &Handle) -> Result<Vec<u32>, RoutingError> {
    let mut tables = Vec::new();
    for version in [IpVersion::V4, IpVersion::V6] {
        let rules = match rules_of_ours(handle, version.clone()).await {
            Ok(rules) => rules,
            Err(e) if version == IpVersion::V6 && ipv6_unavailable(&e) => continue,
            Err(e) => return Err(e),
        };
        tables.extend(rules.into_iter().map(|(_, table, _)| table));
    }
    tables.sort_unstable();
    tables.dedup();
    Ok(tables)
}

/// The fwmark rules tagged with [`RTPROT_PROXY`], with their table and mark (not the
/// `--local` source rules, which have a source prefix and point at the main table).
async fn rules_of_ours(
    handle: &Handle,
    version: IpVersion,
) -> Result<Vec<(RuleMessage, u32, Mark)>, RoutingError> {
    Ok(tagged_rules(handle, version)
        .await?
        .into_iter()
        .filter(|(rule, _, _)| rule.header.src_len == 0)
        .collect())
}

/// The `--local` IPv4 source rules (`from 0.0.0.0/32 fwmark M lookup main`) tagged with
/// [`RTPROT_PROXY`], with their mark.
async fn source_rules_of_ours(handle: &Handle) -> Result<Vec<(RuleMessage, Mark)>, RoutingError> {
    Ok(tagged_rules(handle, IpVersion::V4)
        .await?
        .into_iter()
        .filter(|(rule, table, _)| {
            rule.header.src_len == 32 && *table == u32::from(libc::RT_TABLE_MAIN)
        })
        .map(|(rule, _, mark)| (rule, mark))
        .collect())
}

/// Every rule tagged with [`RTPROT_PROXY`], with its table and mark.
async fn tagged_rules(
    handle: &Handle,
    version: IpVersion,
) -> Result<Vec<(RuleMessage, u32, Mark)>, RoutingError> {
    let listed: Vec<RuleMessage> = handle
        .rule()
        .get(version.clone())
        .execute()
        .try_collect()
        .await
        .map_err(request(format!("listing {} rules", family_name(&version))))?;
    Ok(listed
        .into_iter()
        .filter_map(|rule| {
            let mut ours = false;
            let mut table = u32::from(rule.header.table);
            let mut value = 0;
            let mut mask = u32::MAX;
            for a in &rule.attributes {
                match a {
                    RuleAttribute::Protocol(RouteProtocol::Other(p)) if *p == RTPROT_PROXY => {
                        ours = true
                    }
                    RuleAttribute::Table(t) => table = *t,
                    RuleAttribute::FwMark(v) => value = *v,
                    RuleAttribute::FwMask(m) => mask = *m,
                    _ => {}
                }
            }
            ours.then_some((rule, table, Mark { value, mask }))
        })
        .collect())
}

fn ipv6_unavailable(e: &RoutingError) -> bool {
    match e {
        RoutingError::Request { source, .. } => is_errno(source, libc::EAFNOSUPPORT),
        RoutingError::Connect(_) => false,
    }
}
