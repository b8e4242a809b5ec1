//! The maps the agent fills and reads. Names and sizes come from `proxy-common`.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, SockHash, SockMap},
};
use proxy_common::{
    Counter, FlowKey, FragmentKey, GENERATIONS, GlobalConfig, IfaceAddrs, MAX_DROPPED_FRAGMENTS,
    MAX_IFACES, MAX_LISTENERS, MAX_OWN_ADDRS, MAX_PREFIX_ENTRIES, MAX_RELAYED_SOCKETS, MAX_RULES,
    MAX_TIME_WAIT_SYNS, OwnAddr, PORT_CLASS_ENTRIES, RuleAction, RuleCounters, RuleKeyV4,
    RuleKeyV6,
};

#[map]
pub static PORT_CLASS: Array<u32> = Array::with_max_entries(GENERATIONS * PORT_CLASS_ENTRIES, 0);

#[map]
pub static GENERATION: Array<u32> = Array::with_max_entries(1, 0);

#[map]
pub static RULES_V4: LpmTrie<RuleKeyV4, u32> =
    LpmTrie::with_max_entries(GENERATIONS * MAX_PREFIX_ENTRIES, 0);

#[map]
pub static RULES_V6: LpmTrie<RuleKeyV6, u32> =
    LpmTrie::with_max_entries(GENERATIONS * MAX_PREFIX_ENTRIES, 0);

#[map]
pub static ACTIONS: Array<RuleAction> = Array::with_max_entries(GENERATIONS * MAX_RULES, 0);

#[map]
pub static IFACE_ADDRS: HashMap<u32, IfaceAddrs> = HashMap::with_max_entries(MAX_IFACES, 0);

#[map]
pub static LISTENERS: SockMap = SockMap::with_max_entries(MAX_LISTENERS, 0);

#[map]
pub static TIME_WAIT_SYNS: LruHashMap<FlowKey, u32> =
    LruHashMap::with_max_entries(MAX_TIME_WAIT_SYNS, 0);

#[map]
pub static DROPPED_FRAGMENTS: LruHashMap<FragmentKey, u8> =
    LruHashMap::with_max_entries(MAX_DROPPED_FRAGMENTS, 0);

#[map]
pub static RELAY_SOCKS: SockHash<u64> = SockHash::with_max_entries(MAX_RELAYED_SOCKETS, 0);

#[map]
pub static RELAY_TARGETS: SockHash<u64> = SockHash::with_max_entries(MAX_RELAYED_SOCKETS, 0);

#[map]
pub static CONFIG: Array<GlobalConfig> = Array::with_max_entries(1, 0);

#[map]
pub static OWN_ADDRS: HashMap<OwnAddr, u8> = HashMap::with_max_entries(MAX_OWN_ADDRS, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[map]
pub static RULE_COUNTERS: PerCpuArray<RuleCounters> = PerCpuArray::with_max_entries(MAX_RULES, 0);

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // Per-CPU slot: no other writer, a plain add is enough.
        unsafe { *slot += 1 };
    }
}

/// Adds one packet of `len` bytes to the rule with counter slot `slot`, with its outcome.
#[inline(always)]
pub fn count_rule(slot: u32, len: u32, assigned: bool) {
    if let Some(stats) = RULE_COUNTERS.get_ptr_mut(slot) {
        unsafe {
            (*stats).packets += 1;
            (*stats).bytes += len as u64;
            if assigned {
                (*stats).assigned += 1;
            } else {
                (*stats).dropped += 1;
            }
        }
    }
}
