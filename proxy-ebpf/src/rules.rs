//! Rule matching (T1): (protocol, destination port) -> port class, then (class,
//! destination address) -> the first rule in order that covers the packet. The agent
//! precomputes both tables (see `proxy::rules::compile`), so the cost per packet is two
//! lookups however many rules there are.

use aya_ebpf::maps::lpm_trie::Key;
use proxy_common::{CLASS_PREFIX_BITS, RuleAction, RuleKeyV4, RuleKeyV6, port_class_index};

use crate::{
    maps::{ACTIONS, PORT_CLASS, RULES_V4, RULES_V6},
    parse::{Family, Packet},
};

/// The rule a packet matched: its index (for per-rule counters) and its action.
pub struct Matched {
    pub index: u32,
    pub action: RuleAction,
}

#[inline(always)]
pub fn match_rule(packet: &Packet) -> Option<Matched> {
    let slot = port_class_index(packet.protocol, packet.dport())?;
    let class = *PORT_CLASS.get(slot)?;
    if class == 0 {
        return None;
    }
    let index = lookup_prefix(packet.family, class, &packet.daddr)?;
    let action = *ACTIONS.get(index)?;
    Some(Matched { index, action })
}

/// Does `daddr` fall under any rule's prefix, whatever the port and protocol? The agent
/// stores every prefix of every rule under class 0 for this: a packet whose ports cannot be
/// read is dropped when it could have been a candidate (T9, T11).
#[inline(always)]
pub fn destination_has_rule(family: Family, daddr: &[u8; 16]) -> bool {
    lookup_prefix(family, 0, daddr).is_some()
}

#[inline(always)]
fn lookup_prefix(family: Family, class: u32, daddr: &[u8; 16]) -> Option<u32> {
    let class_be = class.to_be_bytes();
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
