//! Types shared by the eBPF classifier (`proxy-ebpf`) and the agent (`proxy`).
//!
//! Everything here is `#[repr(C)]` plain data with explicit padding and no `bool`, because
//! the same bytes are written by userspace into BPF maps and read by the classifier.
//! Fields that hold network-order values end in `_be`.
//!
//! # How rules are found per packet (constant time, whatever the number of rules)
//!
//! An iptables chain is walked rule by rule. Here a packet is classified with two map
//! lookups, and the agent precomputes the tables so that the result is the same as a
//! first-match walk over the rules in order:
//!
//! 1. [`MAP_PORT_CLASS`] (an array indexed by [`port_class_index`]) maps (protocol,
//!    destination port) to a *port class*: the ports that share exactly the same set of
//!    rules share a class. Class 0 means "no rule covers this port".
//! 2. [`MAP_RULES_V4`] / [`MAP_RULES_V6`] (LPM tries) are keyed by (class, destination
//!    address) and give the index of the first rule, in rule order, that covers the packet.
//! 3. [`MAP_ACTIONS`] (an array indexed by that rule index) holds what the rule does:
//!    on-ip, on-port, the mark and whether to fail open.
#![no_std]

#[cfg(feature = "std")]
extern crate std;

/// The routing table of an agent started without `--table` (and the one `proxy stats` asks
/// without it). Agents in one network namespace differ by table.
pub const DEFAULT_TABLE: u32 = 100;

/// The name of the abstract Unix socket (`@proxy-stats-<table>`) on which the agent using
/// routing table `table` answers `proxy stats`. Abstract sockets belong to a network
/// namespace, so each namespace has its own. The agent binds it during setup but answers only
/// from its serve loop: an answer on it also says the agent is ready.
#[cfg(feature = "std")]
pub fn stats_socket_name(table: u32) -> std::string::String {
    std::format!("proxy-stats-{table}")
}

/// The name of the abstract Unix socket (`@proxy-handover-<table>`, SOCK_SEQPACKET) on
/// which the agent using routing table `table` hands its listeners and live connections to
/// the next agent (an upgrade, a restart with overlap).
#[cfg(feature = "std")]
pub fn handover_socket_name(table: u32) -> std::string::String {
    std::format!("proxy-handover-{table}")
}

/// Formats an error with its sources on one line: `a: b: c`.
#[cfg(feature = "std")]
pub fn error_chain(error: &dyn core::error::Error) -> std::string::String {
    let mut out = std::string::ToString::to_string(error);
    let mut source = error.source();
    while let Some(e) = source {
        let text = std::string::ToString::to_string(e);
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = e.source();
    }
    out
}

/// Name of the TC ingress classifier program in the object, for interfaces whose packets
/// start with an Ethernet header at TC ingress (Ethernet, veth, bridge, loopback).
pub const PROG_TC_INGRESS: &str = "tproxy_ingress";
/// The same classifier for interfaces without a link-layer header (tun, WireGuard, ipip):
/// the IP header is at offset 0 and `skb->protocol` gives the family (T10).
pub const PROG_TC_INGRESS_L3: &str = "tproxy_ingress_l3";
/// Name of the `sk_lookup` program that finishes the TIME_WAIT + SYN case (T3).
pub const PROG_SK_LOOKUP: &str = "tproxy_sk_lookup";

/// `--local`: the `cgroup/connect4` and `cgroup/connect6` programs that mark a local
/// process's socket whose destination a rule covers, so the fwmark rule routes it to `lo`,
/// where the classifier hands it to the proxy.
pub const PROG_LOCAL_CONNECT4: &str = "local_connect4";
pub const PROG_LOCAL_CONNECT6: &str = "local_connect6";
/// `--local`: the `cgroup/sendmsg4` and `cgroup/sendmsg6` programs that apply a rule's
/// no-socket behaviour to an unconnected datagram, which cannot be marked (see the README).
pub const PROG_LOCAL_SENDMSG4: &str = "local_sendmsg4";
pub const PROG_LOCAL_SENDMSG6: &str = "local_sendmsg6";
/// The four programs of `--local`, in the order the agent attaches them.
pub const LOCAL_PROGRAMS: [&str; 4] = [
    PROG_LOCAL_CONNECT4,
    PROG_LOCAL_CONNECT6,
    PROG_LOCAL_SENDMSG4,
    PROG_LOCAL_SENDMSG6,
];
/// The loopback device's index, the same in every network namespace (`LOOPBACK_IFINDEX`).
pub const LOOPBACK_IFINDEX: u32 = 1;

/// `--relay sockmap`: the sk_skb verdict program that moves a relayed connection's bytes
/// to its peer inside the kernel.
pub const PROG_RELAY_VERDICT: &str = "relay_verdict";
/// SOCKHASH the verdict program is attached to: a socket in it has its received data
/// handed to the program. Keyed by socket cookie.
pub const MAP_RELAY_SOCKS: &str = "RELAY_SOCKS";
/// SOCKHASH without programs: under a socket's cookie, its peer, the socket its bytes go
/// to.
pub const MAP_RELAY_TARGETS: &str = "RELAY_TARGETS";
/// Sockets relayed in the kernel at once (two per connection).
pub const MAX_RELAYED_SOCKETS: u32 = 131_072;
/// Array<u32>, [`GENERATIONS`] x [`PORT_CLASS_ENTRIES`] entries, indexed by
/// [`port_class_slot`]: (generation, protocol, port) -> port class (0 = none).
pub const MAP_PORT_CLASS: &str = "PORT_CLASS";
/// Array<u32>, one entry: the generation of the rule tables in force (0 or 1). A reload
/// writes the other generation's tables, then switches this one word: a packet sees the old
/// rule set or the new one, never a mix.
pub const MAP_GENERATION: &str = "GENERATION";
/// Rule-table generations kept side by side: the one in force and the one being written.
pub const GENERATIONS: u32 = 2;
/// LpmTrie<[`RuleKeyV4`], u32>: (class, IPv4 destination) -> rule index.
pub const MAP_RULES_V4: &str = "RULES_V4";
/// LpmTrie<[`RuleKeyV6`], u32>: (class, IPv6 destination) -> rule index.
pub const MAP_RULES_V6: &str = "RULES_V6";
/// Array<[`RuleAction`]>, [`GENERATIONS`] x [`MAX_RULES`] entries, indexed by
/// [`action_index`].
pub const MAP_ACTIONS: &str = "ACTIONS";
/// HashMap<u32 ifindex, [`IfaceAddrs`]>: the address `nf_tproxy_laddr4/6` would pick.
pub const MAP_IFACE_ADDRS: &str = "IFACE_ADDRS";
/// SockMap of the agent's own listeners, indexed by [`RuleAction::listener_slot`].
pub const MAP_LISTENERS: &str = "LISTENERS";
/// Array<[`GlobalConfig`]>, one entry.
pub const MAP_CONFIG: &str = "CONFIG";
/// HashMap<[`OwnAddr`], u8>: `--local`, this network namespace's own addresses (and
/// directed broadcasts), the destinations the proxy refuses as local: a local connection
/// to one never leaves the host, so the cgroup programs leave it alone.
pub const MAP_OWN_ADDRS: &str = "OWN_ADDRS";
/// Entries of [`MAP_OWN_ADDRS`]; the agent says so in its log when a namespace has more.
pub const MAX_OWN_ADDRS: u32 = 4096;
/// LruHashMap<[`FlowKey`], u32>: the SYNs the classifier handed to a TIME_WAIT socket
/// (T3), the only lookups the sk_lookup program may answer, with the listener slot to answer
/// with.
pub const MAP_TIME_WAIT_SYNS: &str = "TIME_WAIT_SYNS";
/// Entries of [`MAP_TIME_WAIT_SYNS`]: reconnects in flight at once.
pub const MAX_TIME_WAIT_SYNS: u32 = 4096;
/// LruHashMap<[`FragmentKey`], u8>: datagrams whose first fragment the classifier dropped,
/// so that their later fragments are dropped too (T11).
pub const MAP_DROPPED_FRAGMENTS: &str = "DROPPED_FRAGMENTS";
/// Entries of [`MAP_DROPPED_FRAGMENTS`]: fragmented datagrams being dropped at once.
pub const MAX_DROPPED_FRAGMENTS: u32 = 8192;
/// PerCpuArray<u64>, one slot per [`Counter`].
pub const MAP_COUNTERS: &str = "COUNTERS";
/// PerCpuArray<[`RuleCounters`]>, [`MAX_RULES`] entries, indexed by
/// [`RuleAction::counter_slot`]: a rule that stays across reloads keeps its slot, and its
/// counts, whatever its index.
pub const MAP_RULE_COUNTERS: &str = "RULE_COUNTERS";

/// Upper bound on the number of rules (size of the action and per-rule counter arrays).
pub const MAX_RULES: u32 = 16_384;
/// Upper bound on LPM entries per address family.
pub const MAX_PREFIX_ENTRIES: u32 = 65_536;
/// Upper bound on interfaces the classifier keeps addresses for.
pub const MAX_IFACES: u32 = 256;
/// Upper bound on the agent's own listeners (sockmap size).
pub const MAX_LISTENERS: u32 = 64;
/// Number of transport protocols the port-class table covers (TCP, UDP).
pub const PORT_CLASS_PROTOCOLS: u32 = 2;
/// Entries of [`MAP_PORT_CLASS`].
pub const PORT_CLASS_ENTRIES: u32 = PORT_CLASS_PROTOCOLS * 65_536;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// Index of (protocol, destination port) in [`MAP_PORT_CLASS`]; `None` for a protocol the
/// classifier does not handle.
#[inline(always)]
pub const fn port_class_index(protocol: u8, port: u16) -> Option<u32> {
    let slot = match protocol {
        IPPROTO_TCP => 0,
        IPPROTO_UDP => 1,
        _ => return None,
    };
    Some(slot * 65_536 + port as u32)
}

/// Index of (generation, protocol, destination port) in [`MAP_PORT_CLASS`].
#[inline(always)]
pub const fn port_class_slot(generation: u32, protocol: u8, port: u16) -> Option<u32> {
    match port_class_index(protocol, port) {
        Some(index) => Some(generation * PORT_CLASS_ENTRIES + index),
        None => None,
    }
}

/// The class bits of an LPM key: the generation in the top bit, the port class below, so
/// that both generations' prefixes live in one trie without meeting.
#[inline(always)]
pub const fn class_key(generation: u32, class: u32) -> [u8; 4] {
    ((generation << 31) | class).to_be_bytes()
}

/// Index of a generation's rule in [`MAP_ACTIONS`]: what the LPM tries store.
#[inline(always)]
pub const fn action_index(generation: u32, rule_index: u32) -> u32 {
    generation * MAX_RULES + rule_index
}

/// LPM key for IPv4 rules. The prefix length covers the 32 class bits, then the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleKeyV4 {
    /// Port class, big-endian so the trie compares it most significant bit first.
    pub class_be: [u8; 4],
    pub addr: [u8; 4],
}

/// LPM key for IPv6 rules. The prefix length covers the 32 class bits, then the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RuleKeyV6 {
    pub class_be: [u8; 4],
    pub addr: [u8; 16],
}

/// A connection's tuple as the classifier and the sk_lookup program both see it; IPv4
/// addresses use the first 4 bytes, the rest is zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowKey {
    pub remote: [u8; 16],
    pub local: [u8; 16],
    pub remote_port_be: u16,
    pub local_port_be: u16,
}

/// One of the namespace's own addresses, in [`MAP_OWN_ADDRS`]: [`OWN_ADDR_V4`] with the
/// address in the first 4 bytes of `addr` (the rest zero), or [`OWN_ADDR_V6`]. IPv4-mapped
/// IPv6 addresses are keyed as IPv4.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OwnAddr {
    pub family: u32,
    pub addr: [u8; 16],
}

/// [`OwnAddr::family`] of an IPv4 address.
pub const OWN_ADDR_V4: u32 = 4;
/// [`OwnAddr::family`] of an IPv6 address.
pub const OWN_ADDR_V6: u32 = 6;

#[cfg(feature = "std")]
impl From<core::net::IpAddr> for OwnAddr {
    fn from(ip: core::net::IpAddr) -> Self {
        let mut addr = [0u8; 16];
        match ip.to_canonical() {
            core::net::IpAddr::V4(v4) => {
                addr[..4].copy_from_slice(&v4.octets());
                OwnAddr {
                    family: OWN_ADDR_V4,
                    addr,
                }
            }
            core::net::IpAddr::V6(v6) => OwnAddr {
                family: OWN_ADDR_V6,
                addr: v6.octets(),
            },
        }
    }
}

/// A fragmented datagram, as the receiver's reassembly tells its fragments apart
/// (`ip4_frag_match`, `ip6_frag_match`): addresses, identification and, for IPv4, the
/// protocol (0 for IPv6, whose fragment queue ignores it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragmentKey {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// The IPv4 identification (16 bits) or the IPv6 fragment header's (32 bits).
    pub id: u32,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// Bits of the class prefix that precede the address in [`RuleKeyV4`] and [`RuleKeyV6`].
pub const CLASS_PREFIX_BITS: u32 = 32;

/// [`RuleAction::flags`]: `on_ip4` is set (`--on-ip` with an IPv4 address).
pub const ACTION_HAS_ON_IP4: u32 = 1 << 0;
/// [`RuleAction::flags`]: `on_ip6` is set (`--on-ip` with an IPv6 address).
pub const ACTION_HAS_ON_IP6: u32 = 1 << 1;
/// [`RuleAction::flags`]: with no usable socket, pass the packet on instead of dropping it.
pub const ACTION_FAIL_OPEN: u32 = 1 << 2;
/// [`RuleAction::flags`]: `listener_slot` names a socket in [`MAP_LISTENERS`].
pub const ACTION_HAS_LISTENER_SLOT: u32 = 1 << 3;
/// [`RuleAction::flags`]: the rule applies to the connections of local processes too
/// (`--local`), within [`RuleAction::local_cgroup_ids`].
pub const ACTION_LOCAL: u32 = 1 << 4;
/// Cgroups a rule's local scope may name ([`RuleAction::local_cgroup_ids`]).
pub const MAX_RULE_CGROUPS: usize = 4;

/// The mark of an assigned packet: `(mark & ~mask) ^ value`, exactly `tproxy_tg4` in
/// `net/netfilter/xt_TPROXY.c` (XOR, not OR). The one place the formula is written, for the
/// classifier (rules and the return path) and the agent alike.
#[inline(always)]
pub const fn tproxy_mark(mark: u32, value: u32, mask: u32) -> u32 {
    (mark & !mask) ^ value
}

/// What a matching rule does, the arguments of `-j TPROXY`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleAction {
    /// `--on-ip` (IPv4), network order, valid with [`ACTION_HAS_ON_IP4`].
    pub on_ip4_be: u32,
    /// `--on-ip` (IPv6), valid with [`ACTION_HAS_ON_IP6`].
    pub on_ip6: [u8; 16],
    /// `--tproxy-mark VALUE/MASK`: the mark becomes `(mark & !mask) ^ value`.
    pub mark_value: u32,
    pub mark_mask: u32,
    /// `--on-port`, host order; 0 means the packet's own destination port.
    pub on_port: u16,
    pub _pad: u16,
    /// `ACTION_*` bits.
    pub flags: u32,
    /// Slot of the agent's listener in [`MAP_LISTENERS`] (for the TIME_WAIT + SYN case).
    pub listener_slot: u32,
    /// The rule's slot in [`MAP_RULE_COUNTERS`].
    pub counter_slot: u32,
    pub _pad2: u32,
    /// With [`ACTION_LOCAL`]: the cgroups (v2 ids, the cgroup directory's inode) whose
    /// processes, and their descendants', the rule applies to; all zero: every process the
    /// programs run for. A process is in scope when
    /// `bpf_get_current_ancestor_cgroup_id(local_cgroup_levels[i]) == local_cgroup_ids[i]`
    /// for some `i`; the first zero id ends the list.
    pub local_cgroup_ids: [u64; MAX_RULE_CGROUPS],
    /// The depth of each of those cgroups below the root (the root is level 0).
    pub local_cgroup_levels: [u32; MAX_RULE_CGROUPS],
}

impl RuleAction {
    /// The port of the listener the rule sends to (`--on-port`, else the packet's own
    /// destination port), network order.
    #[inline(always)]
    pub const fn listener_port_be(&self, dport_be: u16) -> u16 {
        if self.on_port == 0 {
            dport_be
        } else {
            self.on_port.to_be()
        }
    }

    /// The mark a packet leaves with once assigned (see [`tproxy_mark`]).
    #[inline(always)]
    pub const fn apply_mark(&self, mark: u32) -> u32 {
        tproxy_mark(mark, self.mark_value, self.mark_mask)
    }
}

/// The interface address `nf_tproxy_laddr4` / `nf_tproxy_laddr6` would use as laddr when
/// the rule has no on-ip: the first primary IPv4 address, and the first IPv6 address that
/// is neither tentative nor deprecated.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceAddrs {
    pub ip4_be: u32,
    pub ip6: [u8; 16],
    /// `IFACE_HAS_*` bits.
    pub flags: u32,
}

pub const IFACE_HAS_IP4: u32 = 1 << 0;
pub const IFACE_HAS_IP6: u32 = 1 << 1;

/// Per-rule counters, summed over CPUs by the agent (like `iptables -vL`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleCounters {
    /// Packets that matched the rule.
    pub packets: u64,
    /// Bytes of those packets (`skb->len`).
    pub bytes: u64,
    /// Matched packets that were assigned to a socket.
    pub assigned: u64,
    /// Matched packets with no usable socket: dropped, or passed on with fail-open (the
    /// global `passed_fail_open` counter tells the two apart).
    pub dropped: u64,
}

/// Settings that apply to every packet, not to one rule.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalConfig {
    /// The mark for diverted packets (packets that match no rule but belong to a
    /// transparent socket: the recipe's `-m socket --transparent -j DIVERT`), applied as
    /// `(mark & !mask) ^ value`.
    pub divert_mark_value: u32,
    pub divert_mark_mask: u32,
    /// The agent's outbound mark: packets with all these bits set are never touched
    /// (0: none).
    pub bypass_mark: u32,
    /// Non-zero: no socket can need the return path (T8) for packets that match no rule,
    /// so the classifier skips its socket lookup and counts
    /// [`Counter::ReturnPathSkipped`]. The agent sets it only while that holds (the
    /// built-in listener without `--spoof-source`, and no connection or session live from
    /// before a reload: `proxy::tproxy::return_path`). Zero, the safe reading, looks up.
    pub skip_return_path: u32,
    /// `--local`: the agent's network namespace (`SO_NETNS_COOKIE`); the cgroup programs
    /// run for every process of their cgroups whatever its namespace, and leave the
    /// sockets of other namespaces alone. 0: local interception is off.
    pub netns_cookie: u64,
    /// `--local` without `--cgroup` (the programs attached at the cgroup root): the agent's
    /// own cgroup, whose processes are never intercepted. 0: none.
    pub agent_cgroup_id: u64,
}

/// Global counters, one slot each in [`MAP_COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Every packet the classifier saw.
    Seen = 0,
    /// Packets that matched a rule.
    Matched = 1,
    /// Matched packets assigned to an established (or request / TIME_WAIT) socket.
    AssignedEstablished = 2,
    /// Matched packets assigned to the listener at (laddr, lport).
    AssignedListener = 3,
    /// Pure SYNs that hit a TIME_WAIT socket while a listener exists (T3).
    TimeWaitSyn = 4,
    /// Matched packets dropped: no usable socket (T7).
    DroppedNoSocket = 5,
    /// Matched packets passed on untouched because of fail-open.
    PassedFailOpen = 6,
    /// Packets that matched no rule and were left alone (T1).
    NotMatched = 7,
    /// Packets the classifier could not parse and left alone: IP headers the stack drops
    /// itself, or transport headers cut short to destinations no rule covers.
    Malformed = 8,
    /// Matched packets dropped because the socket found was not transparent (T5).
    DroppedNotTransparent = 9,
    /// First fragments that matched a rule (never assigned, see T9): dropped, or passed with
    /// fail-open.
    Fragment = 10,
    /// `bpf_sk_assign` refused a socket.
    AssignFailed = 11,
    /// Packets that matched no rule but belong to a transparent socket with their own
    /// tuple, assigned and marked: the return path, like `-m socket --transparent -j DIVERT`
    /// (T8).
    Diverted = 12,
    /// Packets that carry the agent's own outbound mark, left alone.
    Bypassed = 13,
    /// Packets whose transport header could not be read (a first fragment cut short, an
    /// IPv6 chain without its upper header, a truncated segment), dropped because their
    /// destination falls under a rule (T9, T11): they might belong to a matched flow.
    DroppedUnclassifiable = 14,
    /// Later fragments of a datagram whose first fragment was dropped, dropped too (T11).
    DroppedLaterFragment = 15,
    /// `bpf_sk_assign` refused a socket on the return path (T8); the packet went on
    /// unassigned.
    DivertAssignFailed = 16,
    /// On an interface without a link-layer header, the IP version at offset 0 disagrees
    /// with `skb->protocol`: the packets are not laid out as the agent decided, nothing on
    /// that interface can be classified, so they are dropped rather than passed (T10).
    DroppedBadLinkHeader = 17,
    /// `--local`: connections of local processes whose socket the connect program marked
    /// for a rule (TCP connects and UDP connects).
    LocalMarked = 18,
    /// `--local`: local connections a fail-open rule covers left unmarked, because no
    /// listener was there to take them (the agent is gone): they reach the original
    /// destination, as forwarded traffic under that rule does (T7, T12).
    LocalNoListener = 19,
    /// `--local`: unconnected UDP datagrams to a destination a rule covers, refused to the
    /// sender (EPERM): a datagram cannot be routed to the proxy (see the README).
    LocalUnconnectedRefused = 20,
    /// `--local`: the same under a fail-open rule, sent on to the destination untouched.
    LocalUnconnectedPassed = 21,
    /// `--local`: local connections whose first matching rule does not apply to the
    /// process (the rule is not local, or its cgroups do not hold the process): untouched.
    LocalOutOfScope = 22,
    /// `--local`: setting the mark on a local socket failed; the connection goes direct.
    LocalMarkFailed = 23,
    /// Packets arriving on `lo` without the mark of the rule they match (the host's own
    /// loopback traffic, replies to local clients): left alone before any socket lookup.
    LoopbackUnmarked = 24,
    /// `--local`: local connections (and unconnected datagrams) to one of the host's own
    /// addresses ([`MAP_OWN_ADDRS`]), left alone: they never leave the host, and the proxy
    /// would refuse them as local destinations.
    LocalOwnAddress = 25,
    /// Packets that matched no rule, left alone without the return path's socket lookup
    /// (T8), because the agent had said no socket could need it
    /// ([`GlobalConfig::skip_return_path`]). Also counted as [`Counter::NotMatched`].
    ReturnPathSkipped = 26,
}

impl Counter {
    pub const COUNT: u32 = 27;

    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::Seen,
        Counter::Matched,
        Counter::AssignedEstablished,
        Counter::AssignedListener,
        Counter::TimeWaitSyn,
        Counter::DroppedNoSocket,
        Counter::PassedFailOpen,
        Counter::NotMatched,
        Counter::Malformed,
        Counter::DroppedNotTransparent,
        Counter::Fragment,
        Counter::AssignFailed,
        Counter::Diverted,
        Counter::Bypassed,
        Counter::DroppedUnclassifiable,
        Counter::DroppedLaterFragment,
        Counter::DivertAssignFailed,
        Counter::DroppedBadLinkHeader,
        Counter::LocalMarked,
        Counter::LocalNoListener,
        Counter::LocalUnconnectedRefused,
        Counter::LocalUnconnectedPassed,
        Counter::LocalOutOfScope,
        Counter::LocalMarkFailed,
        Counter::LoopbackUnmarked,
        Counter::LocalOwnAddress,
        Counter::ReturnPathSkipped,
    ];

    /// A short snake_case name for logs and `proxy stats`.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Seen => "seen",
            Counter::Matched => "matched",
            Counter::AssignedEstablished => "assigned_established",
            Counter::AssignedListener => "assigned_listener",
            Counter::TimeWaitSyn => "time_wait_syn",
            Counter::DroppedNoSocket => "dropped_no_socket",
            Counter::PassedFailOpen => "passed_fail_open",
            Counter::NotMatched => "not_matched",
            Counter::Malformed => "malformed",
            Counter::DroppedNotTransparent => "dropped_not_transparent",
            Counter::Fragment => "fragment",
            Counter::AssignFailed => "assign_failed",
            Counter::Diverted => "diverted",
            Counter::Bypassed => "bypassed",
            Counter::DroppedUnclassifiable => "dropped_unclassifiable",
            Counter::DroppedLaterFragment => "dropped_later_fragment",
            Counter::DivertAssignFailed => "divert_assign_failed",
            Counter::DroppedBadLinkHeader => "dropped_bad_link_header",
            Counter::LocalMarked => "local_marked",
            Counter::LocalNoListener => "local_no_listener",
            Counter::LocalUnconnectedRefused => "local_unconnected_refused",
            Counter::LocalUnconnectedPassed => "local_unconnected_passed",
            Counter::LocalOutOfScope => "local_out_of_scope",
            Counter::LocalMarkFailed => "local_mark_failed",
            Counter::LoopbackUnmarked => "loopback_unmarked",
            Counter::LocalOwnAddress => "local_own_address",
            Counter::ReturnPathSkipped => "return_path_skipped",
        }
    }
}

/// Offsets into kernel socket structures, read by the loader from
/// `/sys/kernel/btf/vmlinux`, so that the classifier can check the transparent flag (T5)
/// without CO-RE support. An offset of `u32::MAX` means "unknown": the check is skipped,
/// which the agent allows only when told to (`--allow-unchecked-transparency`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockOffsets {
    /// Byte offset of the word that holds the transparent bit in a full socket
    /// (`struct inet_sock`, `inet_flags`), and the bit.
    pub full_off: u32,
    pub full_bit: u32,
    /// Same for `struct inet_timewait_sock` (`tw_transparent`).
    pub tw_off: u32,
    pub tw_bit: u32,
    /// Same for `struct inet_request_sock` (`no_srccheck`, set from the listener's flag).
    pub req_off: u32,
    pub req_bit: u32,
}

impl SockOffsets {
    pub const UNKNOWN: SockOffsets = SockOffsets {
        full_off: u32::MAX,
        full_bit: 0,
        tw_off: u32::MAX,
        tw_bit: 0,
        req_off: u32::MAX,
        req_bit: 0,
    };
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)] plain data with explicit padding.
    unsafe impl aya::Pod for super::RuleKeyV4 {}
    unsafe impl aya::Pod for super::RuleKeyV6 {}
    unsafe impl aya::Pod for super::RuleAction {}
    unsafe impl aya::Pod for super::IfaceAddrs {}
    unsafe impl aya::Pod for super::RuleCounters {}
    unsafe impl aya::Pod for super::SockOffsets {}
    unsafe impl aya::Pod for super::GlobalConfig {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FragmentKey {}
    unsafe impl aya::Pod for super::OwnAddr {}
}
