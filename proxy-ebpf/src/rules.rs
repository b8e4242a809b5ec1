//! Rule matching (T1): (protocol, destination port) -> port class, then (class,
//! destination address) -> the first rule in order that covers the packet. The agent
//! precomputes both tables (see `proxy::rules::compile`), so the cost per packet is two
//! lookups however many rules there are.
//!
//! Every lookup is in the generation [`GENERATION`] names, read once per packet: a reload
//! writes the other generation, then switches that one word (`proxy::ebpf`'s
//! `install_rules`), so a packet never meets half of one rule set and half of another.

use aya_ebpf::maps::lpm_trie::Key;
use proxy_common::{
    CLASS_PREFIX_BITS, RuleAction, RuleKeyV4, RuleKeyV6, class_key, port_class_slot,
};

use crate::{
    maps::{ACTIONS, GENERATION, PORT_CLASS, RULES_V4, RULES_V6},
    parse::{Family, Packet},
};

/// The generation of the rule tables in force.
#[inline(always)]
fn generation() -> u32 {
    GENERATION.get(0).copied().unwrap_or(0) & 1
}

/// The action of the first rule that covers the packet (its `counter_slot` names the
/// rule's counters).
#[inline(always)]
pub fn match_rule(packet: &Packet) -> Option<RuleAction> {
    match_destination(
        packet.family,
        packet.protocol,
        packet.dport(),
        &packet.daddr,
    )
}

/// The action of the first rule that covers (protocol, destination address, destination
/// port): what [`match_rule`] asks of a packet, and the cgroup programs of a socket's
/// destination (`local_connect`).
#[inline(always)]
pub fn match_destination(
    family: Family,
    protocol: u8,
    dport: u16,
    daddr: &[u8; 16],
) -> Option<RuleAction> {
    let generation = generation();
    let slot = port_class_slot(generation, protocol, dport)?;
    let class = *PORT_CLASS.get(slot)?;
    if class == 0 {
        return None;
    }
    let index = lookup_prefix(family, class_key(generation, class), daddr)?;
    ACTIONS.get(index).copied()
}

/// Does `daddr` fall under any rule's prefix, whatever the port and protocol? The agent
/// stores every prefix of every rule under class 0 for this: a packet whose ports cannot be
/// read is dropped when it could have been a candidate (T9, T11).
#[inline(always)]
pub fn destination_has_rule(family: Family, daddr: &[u8; 16]) -> bool {
    lookup_prefix(family, class_key(generation(), 0), daddr).is_some()
}

/// The action index the longest prefix under `class_be` holding `daddr` maps to.
#[inline(always)]
fn lookup_prefix(family: Family, class_be: [u8; 4], daddr: &[u8; 16]) -> Option<u32> {
    match family {
        Family::V4 => {
            let key = Key::new(
                CLASS_PREFIX_BITS + 32,
                RuleKeyV4 {
                    class_be,
                    addr: [daddr[0], daddr[1], daddr[2], daddr[3]],
                },
            );
            RULES_V4.get(&key).copied()
        }
        Family::V6 => {
            let key = Key::new(
                CLASS_PREFIX_BITS + 128,
                RuleKeyV6 {
                    class_be,
                    addr: *daddr,
                },
            );
            RULES_V6.get(&key).copied()
        }
    }
}
