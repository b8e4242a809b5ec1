//! The `--iface` interfaces: what the classifier is told about each (its laddr candidates,
//! T4; its link header, T10), and what an address or link event changes while the agent
//! runs.

use log::{error, info, warn};
use proxy_common::IfaceAddrs;

use super::AgentError;
use crate::{
    ebpf::{Classifier, TcAttach},
    error_chain,
    ifaddrs::{self, InterfaceEvent},
    link_header::{self, LinkHeader},
    tproxy::destination::Destinations,
};

/// The `--iface` interfaces by name, with their current index: 0 while one is deleted.
pub struct Interfaces {
    handle: rtnetlink::Handle,
    list: Vec<(String, u32)>,
}

impl Interfaces {
    /// Resolves each name to its index in this network namespace.
    pub fn resolve(names: &[String]) -> Result<Vec<(String, u32)>, AgentError> {
        names
            .iter()
            .map(|name| {
                let index = ifaddrs::ifindex(name)
                    .ok_or_else(|| AgentError::NoSuchInterface(name.clone()))?;
                Ok((name.clone(), index))
            })
            .collect()
    }

    /// Works through `handle`, a netlink connection in the agent's network namespace.
    pub fn new(handle: rtnetlink::Handle, list: Vec<(String, u32)>) -> Self {
        Interfaces { handle, list }
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.list.iter().map(|(name, _)| name.as_str())
    }

    /// The current index of `name`, if it is one of them.
    pub fn index_of(&self, name: &str) -> Option<u32> {
        self.list.iter().find(|(n, _)| n == name).map(|(_, i)| *i)
    }

    /// Gives the classifier each interface's laddr candidates and returns their link
    /// headers, in order, for the attach. Changes nothing outside the agent.
    pub async fn prepare(
        &self,
        classifier: &mut Classifier,
    ) -> Result<Vec<LinkHeader>, AgentError> {
        let mut headers = Vec::new();
        for (name, index) in &self.list {
            refresh_laddr(&self.handle, classifier, name, *index, false).await?;
            headers.push(link_header::of_interface(&self.handle, name, *index).await?);
        }
        Ok(headers)
    }

    /// Follows one address or link event: the proxy's own addresses (refused as
    /// destinations, and with `--local` left alone by the cgroup programs), an interface's laddr, an interface deleted or made again. Errors are
    /// logged: the agent goes on with the other interfaces.
    pub async fn on_event(
        &mut self,
        event: InterfaceEvent,
        classifier: &mut Classifier,
        destinations: &Destinations,
        how: TcAttach,
    ) {
        match event {
            InterfaceEvent::Addresses(index) => {
                match destinations.refresh(&self.handle).await {
                    Ok(()) => {
                        if let Err(e) = classifier.set_own_addresses(&destinations.own()) {
                            error!("--local: {}", error_chain(&e));
                        }
                    }
                    Err(e) => error!("{}", error_chain(&e)),
                }
                if let Some((name, _)) = self.list.iter().find(|(_, i)| *i == index)
                    && let Err(e) = refresh_laddr(&self.handle, classifier, name, index, true).await
                {
                    error!("{name}: {}", error_chain(&e));
                }
            }
            InterfaceEvent::Gone(index) => {
                if let Some((name, index)) = self.list.iter_mut().find(|(_, i)| *i == index) {
                    error!(
                        "{name} was deleted, and its classifier with it: nothing arriving \
                         on a new {name} is intercepted until it exists again, when the \
                         classifier is attached again"
                    );
                    *index = 0;
                }
            }
            InterfaceEvent::Link { index, name } => {
                if let Some(entry) = self
                    .list
                    .iter_mut()
                    .find(|(n, i)| *n == name && *i != index)
                {
                    entry.1 = index;
                    match reattach(&self.handle, classifier, &name, index, how).await {
                        Ok(()) => {
                            warn!("{name} exists again (index {index}): classifier attached again")
                        }
                        Err(e) => error!(
                            "{name} exists again but the classifier could not be attached: \
                             its traffic is not intercepted: {}",
                            error_chain(&e)
                        ),
                    }
                }
            }
        }
    }
}

/// An `--iface` deleted and made again (a VPN interface torn down and set up): its laddr,
/// its link type (it may be another kind now) and the classifier, attached again.
async fn reattach(
    handle: &rtnetlink::Handle,
    classifier: &mut Classifier,
    name: &str,
    index: u32,
    how: TcAttach,
) -> Result<(), AgentError> {
    refresh_laddr(handle, classifier, name, index, false).await?;
    let header = link_header::of_interface(handle, name, index).await?;
    classifier.attach(name, header, how)?;
    Ok(())
}

/// Reads an interface's laddr candidates over netlink and hands them to the classifier.
async fn refresh_laddr(
    handle: &rtnetlink::Handle,
    classifier: &mut Classifier,
    name: &str,
    index: u32,
    changed: bool,
) -> Result<(), AgentError> {
    let addrs = ifaddrs::laddr_candidates(handle, index).await?;
    let why = if changed { "addresses changed, " } else { "" };
    info!("{name}: {why}laddr candidates {}", describe_addrs(&addrs));
    classifier.set_iface_addrs(index, addrs)?;
    Ok(())
}

fn describe_addrs(addrs: &IfaceAddrs) -> String {
    let mut parts = Vec::new();
    if addrs.flags & proxy_common::IFACE_HAS_IP4 != 0 {
        parts.push(std::net::Ipv4Addr::from(addrs.ip4_be.to_ne_bytes()).to_string());
    }
    if addrs.flags & proxy_common::IFACE_HAS_IP6 != 0 {
        parts.push(std::net::Ipv6Addr::from(addrs.ip6).to_string());
    }
    if parts.is_empty() {
        "none (the packet's destination is used)".to_owned()
    } else {
        parts.join(", ")
    }
}
