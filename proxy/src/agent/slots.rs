//! Which built-in listeners the rules need, and each TCP listener's slot in the
//! classifier's LISTENERS sockmap (where the sk_lookup program and the rules' actions find
//! it). A pure function of the rules and of the listeners already running, so that a start
//! or a reload is planned before a socket is opened or a map written, and so that the
//! numbering can be tested without sockets.
//!
//! Rules that share on-ip and on-port share a listener, as `-j TPROXY` rules with the same
//! `--on-ip`/`--on-port` share the socket the kernel finds there. A running listener keeps
//! its slot across reloads: connections keep arriving on it while the new rules are
//! installed. A slot stays taken until its listener is closed, after the switch, so a new
//! listener never takes the slot of one a rule of the old generation may still point to.

use std::net::IpAddr;

use proxy_common::MAX_LISTENERS;

use crate::rules::Rule;

/// A built-in listener: on-ip (none: the wildcard address) and on-port.
pub type ListenerKey = (Option<IpAddr>, u16);

/// The rules need more listeners than the sockmap has slots.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("more than {MAX_LISTENERS} distinct on-ip/on-port pairs")]
pub struct TooManyListeners;

/// A listener the rules need that is not running yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    Tcp { key: ListenerKey, slot: u32 },
    Udp(ListenerKey),
}

/// Listeners, by protocol.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Keys {
    pub tcp: Vec<ListenerKey>,
    pub udp: Vec<ListenerKey>,
}

/// What the rules need from the listeners.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SlotPlan {
    /// Each rule's slot, in rule order: none for a rule without TCP.
    pub slots: Vec<Option<u32>>,
    /// The listeners to open, in the order the rules first need them (so a port in use is
    /// reported for the first rule that needs it).
    pub open: Vec<Open>,
    /// The running listeners no rule needs any more, in the order given.
    pub obsolete: Keys,
}

impl SlotPlan {
    /// Gives each rule its slot.
    pub fn assign(&self, rules: &mut [Rule]) {
        for (rule, slot) in rules.iter_mut().zip(&self.slots) {
            rule.listener_slot = *slot;
        }
    }
}

/// Plans the listeners for `rules`, given the TCP listeners running (with their slots) and
/// the UDP ones. A new TCP listener takes the lowest slot no running listener holds.
pub fn plan(
    rules: &[Rule],
    running_tcp: &[(ListenerKey, u32)],
    running_udp: &[ListenerKey],
) -> Result<SlotPlan, TooManyListeners> {
    let mut taken: Vec<u32> = running_tcp.iter().map(|(_, slot)| *slot).collect();
    let mut wanted_tcp: Vec<(ListenerKey, u32)> = Vec::new();
    let mut wanted_udp: Vec<ListenerKey> = Vec::new();
    let mut plan = SlotPlan::default();
    for rule in rules {
        let key = (rule.on_ip, rule.on_port);
        if rule.protocols.udp && !wanted_udp.contains(&key) {
            wanted_udp.push(key);
            if !running_udp.contains(&key) {
                plan.open.push(Open::Udp(key));
            }
        }
        if !rule.protocols.tcp {
            plan.slots.push(None);
            continue;
        }
        let slot_of = |list: &[(ListenerKey, u32)]| {
            list.iter().find(|(k, _)| *k == key).map(|(_, slot)| *slot)
        };
        let slot = if let Some(slot) = slot_of(&wanted_tcp) {
            slot
        } else {
            let slot = match slot_of(running_tcp) {
                Some(slot) => slot,
                None => {
                    let slot = (0..MAX_LISTENERS)
                        .find(|s| !taken.contains(s))
                        .ok_or(TooManyListeners)?;
                    taken.push(slot);
                    plan.open.push(Open::Tcp { key, slot });
                    slot
                }
            };
            wanted_tcp.push((key, slot));
            slot
        };
        plan.slots.push(Some(slot));
    }
    plan.obsolete = Keys {
        tcp: running_tcp
            .iter()
            .map(|(key, _)| *key)
            .filter(|key| !wanted_tcp.iter().any(|(k, _)| k == key))
            .collect(),
        udp: running_udp
            .iter()
            .filter(|key| !wanted_udp.contains(key))
            .copied()
            .collect(),
    };
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::rules::{Mark, PortRange, PortSet, Protocols};

    const BOTH: Protocols = Protocols {
        tcp: true,
        udp: true,
    };
    const UDP: Protocols = Protocols {
        tcp: false,
        udp: true,
    };

    fn rule(protocols: Protocols, on_ip: Option<IpAddr>, on_port: u16) -> Rule {
        Rule {
            protocols,
            dst: Vec::new(),
            dport: PortSet(vec![PortRange { start: 80, end: 80 }]),
            on_ip,
            on_port,
            mark: Mark { value: 1, mask: 1 },
            fail_open: false,
            listener_slot: None,
            local: None,
        }
    }

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, last)))
    }

    #[test]
    fn rules_sharing_on_ip_and_on_port_share_a_slot() {
        let rules = [
            rule(Protocols::TCP, None, 50_080),
            rule(Protocols::TCP, ip(1), 50_080),
            rule(Protocols::TCP, None, 50_080),
            rule(Protocols::TCP, ip(1), 50_081),
        ];
        let plan = plan(&rules, &[], &[]).expect("fits");
        assert_eq!(plan.slots, [Some(0), Some(1), Some(0), Some(2)]);
        assert_eq!(
            plan.open,
            [
                Open::Tcp {
                    key: (None, 50_080),
                    slot: 0
                },
                Open::Tcp {
                    key: (ip(1), 50_080),
                    slot: 1
                },
                Open::Tcp {
                    key: (ip(1), 50_081),
                    slot: 2
                },
            ]
        );
        assert_eq!(plan.obsolete, Keys::default());
    }

    #[test]
    fn udp_only_rules_get_no_slot_and_one_udp_listener_per_pair() {
        let rules = [
            rule(UDP, None, 50_053),
            rule(UDP, None, 50_053),
            rule(BOTH, None, 50_080),
        ];
        let plan = plan(&rules, &[], &[]).expect("fits");
        assert_eq!(plan.slots, [None, None, Some(0)]);
        assert_eq!(
            plan.open,
            [
                Open::Udp((None, 50_053)),
                Open::Udp((None, 50_080)),
                Open::Tcp {
                    key: (None, 50_080),
                    slot: 0
                },
            ]
        );
    }

    #[test]
    fn a_reload_keeps_running_listeners_slots_and_closes_the_unneeded_ones() {
        let running_tcp = [
            ((None, 50_080), 0),
            ((None, 50_081), 1),
            ((ip(1), 50_082), 2),
        ];
        let running_udp = [(None, 50_053), (None, 50_054)];
        // 50_081 goes, 50_083 is new; 50_082 on 10.0.0.1 stays, whatever its position.
        let rules = [
            rule(Protocols::TCP, ip(1), 50_082),
            rule(Protocols::TCP, None, 50_083),
            rule(BOTH, None, 50_080),
            rule(UDP, None, 50_054),
        ];
        let plan = plan(&rules, &running_tcp, &running_udp).expect("fits");
        // The new listener does not take slot 1: the one that held it closes only after
        // the switch.
        assert_eq!(plan.slots, [Some(2), Some(3), Some(0), None]);
        assert_eq!(
            plan.open,
            [
                Open::Tcp {
                    key: (None, 50_083),
                    slot: 3
                },
                Open::Udp((None, 50_080)),
            ]
        );
        assert_eq!(
            plan.obsolete,
            Keys {
                tcp: vec![(None, 50_081)],
                udp: vec![(None, 50_053)],
            }
        );
    }

    #[test]
    fn the_lowest_free_slot_is_taken() {
        let running_tcp = [((None, 1), 0), ((None, 3), 2)];
        let rules = [
            rule(Protocols::TCP, None, 1),
            rule(Protocols::TCP, None, 2),
            rule(Protocols::TCP, None, 3),
            rule(Protocols::TCP, None, 4),
        ];
        let plan = plan(&rules, &running_tcp, &[]).expect("fits");
        assert_eq!(plan.slots, [Some(0), Some(1), Some(2), Some(3)]);
    }

    #[test]
    fn more_distinct_pairs_than_slots_is_an_error() {
        let max = MAX_LISTENERS as u16;
        let fits: Vec<Rule> = (0..max)
            .map(|i| rule(Protocols::TCP, None, 1 + i))
            .collect();
        assert_eq!(plan(&fits, &[], &[]).expect("fits").open.len(), fits.len());
        let mut over = fits.clone();
        over.push(rule(Protocols::TCP, None, 1 + max));
        assert_eq!(plan(&over, &[], &[]), Err(TooManyListeners));
        // UDP listeners take no slot.
        let mut udp = fits;
        udp.push(rule(UDP, None, 1 + max));
        assert!(plan(&udp, &[], &[]).is_ok());
    }

    #[test]
    fn slots_held_by_running_listeners_count_against_the_limit() {
        let running_tcp: Vec<(ListenerKey, u32)> = (0..MAX_LISTENERS)
            .map(|slot| ((None, 1 + slot as u16), slot))
            .collect();
        // A reload that moves every rule to new pairs would need twice the slots.
        let rules = [rule(Protocols::TCP, None, 40_000)];
        assert_eq!(plan(&rules, &running_tcp, &[]), Err(TooManyListeners));
    }

    #[test]
    fn assign_sets_each_rules_slot() {
        let mut rules = [rule(Protocols::TCP, None, 50_080), rule(UDP, None, 50_053)];
        rules[1].listener_slot = Some(7);
        plan(&rules, &[], &[]).expect("fits").assign(&mut rules);
        assert_eq!(rules[0].listener_slot, Some(0));
        assert_eq!(rules[1].listener_slot, None);
    }
}
