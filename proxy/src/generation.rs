//! Where a reload switches generations. The classifier keeps two copies of its rule tables
//! (port classes, prefixes, actions), told apart by a generation bit, and reads the one the
//! `GENERATION` map names, once per packet. A reload writes the generation not in force,
//! switches that one word, and only then clears the old copy: a packet sees the old rule
//! set or the new one, never a mix, and a reload that fails before the switch changes
//! nothing a packet can see.
//!
//! This module holds the pure part: placing compiled tables in a generation, and giving
//! each rule its counter slot so that a rule that stays keeps its counts whatever its new
//! position. `ebpf::Classifier::install_rules` writes the maps.

use std::collections::{HashMap, VecDeque};

use proxy_common::{MAX_RULES, PORT_CLASS_ENTRIES, action_index, class_key};

use crate::rules::{Compiled, Rule};

/// `compiled`'s tables as generation `generation` stores them: port classes at the
/// generation's offset, the generation bit in every prefix key, action indices at the
/// generation's offset, and each action with its counter slot.
pub fn place(compiled: &Compiled, generation: u32, counter_slots: &[u32]) -> Compiled {
    Compiled {
        port_classes: compiled
            .port_classes
            .iter()
            .map(|(index, class)| (generation * PORT_CLASS_ENTRIES + index, *class))
            .collect(),
        v4: place_prefixes(&compiled.v4, generation, |k| &mut k.class_be),
        v6: place_prefixes(&compiled.v6, generation, |k| &mut k.class_be),
        actions: compiled
            .actions
            .iter()
            .zip(counter_slots)
            .map(|(action, slot)| {
                let mut action = *action;
                action.counter_slot = *slot;
                action
            })
            .collect(),
    }
}

/// LPM entries (prefix length, key, rule index) with the generation bit in each key's
/// class and the index at the generation's offset.
fn place_prefixes<K: Copy>(
    entries: &[(u32, K, u32)],
    generation: u32,
    class_be: impl Fn(&mut K) -> &mut [u8; 4],
) -> Vec<(u32, K, u32)> {
    entries
        .iter()
        .map(|(len, key, index)| {
            let mut key = *key;
            let class = class_be(&mut key);
            *class = class_key(generation, u32::from_be_bytes(*class));
            (*len, key, action_index(generation, *index))
        })
        .collect()
}

/// Returns once every classifier run that may have read the old generation number has
/// ended, so that the old generation's tables can be cleared. Programs at TC ingress run
/// inside RCU read-side sections, and `membarrier(MEMBARRIER_CMD_GLOBAL)` waits for an RCU
/// grace period (`synchronize_rcu()` in `kernel/sched/membarrier.c`). Blocking: run it on
/// a blocking thread. Where the call is refused (a `nohz_full` kernel answers EINVAL, a
/// seccomp filter may answer EPERM) it waits [`FALLBACK_WAIT`] instead, and says so.
pub fn wait_for_readers() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes two integers and touches no memory of ours.
    let done = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0) };
    if done != 0 {
        let e = std::io::Error::last_os_error();
        log::warn!(
            "membarrier(MEMBARRIER_CMD_GLOBAL) refused ({e}): waiting {} ms instead of a grace \
             period before clearing the old rule tables",
            FALLBACK_WAIT.as_millis()
        );
        std::thread::sleep(FALLBACK_WAIT);
    }
}

/// How long [`wait_for_readers`] waits when it cannot wait for a grace period: far longer
/// than a classifier run (microseconds), short enough for a reload.
pub const FALLBACK_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// A rule as far as its counters are concerned: everything but the listener slot, which
/// the agent may renumber.
fn identity(rule: &Rule) -> String {
    format!(
        "{:?}",
        Rule {
            listener_slot: None,
            ..rule.clone()
        }
    )
}

/// Counter slots for `next`: a rule equal to one in force takes that rule's slot (its
/// counts go on); any other rule takes the lowest slot no rule in force uses, to be zeroed
/// before the switch. `None` when the rules in force and the new ones together need more
/// than [`MAX_RULES`] slots: both generations count at once around the switch. Linear in
/// the number of rules.
pub fn assign_counter_slots(in_force: &[(Rule, u32)], next: &[Rule]) -> Option<Vec<u32>> {
    // Each identity's slots in force, in rule order; a duplicate rule takes the next one.
    let mut by_identity: HashMap<String, VecDeque<u32>> = HashMap::new();
    for (rule, slot) in in_force {
        by_identity
            .entry(identity(rule))
            .or_default()
            .push_back(*slot);
    }
    let mut slots: Vec<Option<u32>> = next
        .iter()
        .map(|rule| by_identity.get_mut(&identity(rule))?.pop_front())
        .collect();
    let mut used: Vec<bool> = vec![false; MAX_RULES as usize];
    for (_, slot) in in_force {
        used[*slot as usize] = true;
    }
    let mut free = (0..MAX_RULES).filter(|s| !used[*s as usize]);
    for slot in slots.iter_mut().filter(|s| s.is_none()) {
        *slot = Some(free.next()?);
    }
    slots.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use proxy_common::{CLASS_PREFIX_BITS, RuleKeyV4};

    use super::*;
    use crate::rules::{Mark, PortRange, PortSet, Protocols};

    fn rule(port: u16) -> Rule {
        Rule {
            protocols: Protocols {
                tcp: true,
                udp: false,
            },
            dst: Vec::new(),
            dport: PortSet(vec![PortRange {
                start: port,
                end: port,
            }]),
            on_ip: None,
            on_port: 50_080,
            mark: Mark { value: 1, mask: 1 },
            fail_open: false,
            listener_slot: Some(0),
            local: None,
        }
    }

    #[test]
    fn a_rule_that_stays_keeps_its_slot_whatever_its_position() {
        let in_force = vec![(rule(80), 0), (rule(81), 1), (rule(82), 2)];
        let mut moved = rule(80);
        moved.listener_slot = Some(5);
        let slots = assign_counter_slots(&in_force, &[rule(82), rule(90), moved]).expect("fits");
        // 82 keeps 2, 80 keeps 0 (its listener slot changed), 90 takes the first free: 3.
        assert_eq!(slots, vec![2, 3, 0]);
    }

    #[test]
    fn duplicates_take_one_slot_each() {
        let in_force = vec![(rule(80), 7)];
        let slots = assign_counter_slots(&in_force, &[rule(80), rule(80)]).expect("fits");
        assert_eq!(slots, vec![7, 0]);
    }

    #[test]
    fn sixteen_thousand_changed_rules_take_little_time() {
        let in_force: Vec<(Rule, u32)> = (0..MAX_RULES / 2).map(|i| (rule(i as u16), i)).collect();
        let next: Vec<Rule> = (MAX_RULES / 2..MAX_RULES).map(|i| rule(i as u16)).collect();
        let started = std::time::Instant::now();
        let slots = assign_counter_slots(&in_force, &next).expect("fits");
        assert_eq!(slots.len(), next.len());
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn both_generations_must_fit_the_counters() {
        let in_force: Vec<(Rule, u32)> = (0..MAX_RULES).map(|i| (rule(1), i)).collect();
        assert_eq!(assign_counter_slots(&in_force, &[rule(2)]), None);
        assert!(assign_counter_slots(&in_force, &[rule(1)]).is_some());
    }

    #[test]
    fn generations_never_share_a_key_or_an_index() {
        let compiled = Compiled {
            port_classes: vec![(80, 1)],
            v4: vec![(
                CLASS_PREFIX_BITS,
                RuleKeyV4 {
                    class_be: 1u32.to_be_bytes(),
                    addr: [0; 4],
                },
                0,
            )],
            v6: Vec::new(),
            actions: vec![rule(80).action()],
        };
        let zero = place(&compiled, 0, &[4]);
        let one = place(&compiled, 1, &[4]);
        assert_eq!(zero.port_classes, vec![(80, 1)]);
        assert_eq!(one.port_classes, vec![(PORT_CLASS_ENTRIES + 80, 1)]);
        assert_ne!(zero.v4[0].1, one.v4[0].1);
        assert_eq!(zero.v4[0].2, 0);
        assert_eq!(one.v4[0].2, MAX_RULES);
        assert_eq!(one.actions[0].counter_slot, 4);
    }
}
