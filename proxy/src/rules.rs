//! Rules as the user writes them (`--dport 80,443,8000-8100`, `--dst 10.0.0.0/8`,
//! `--tproxy-mark 0x1/0x1`) and their compilation into the classifier's tables.
//!
//! The classifier finds the first matching rule with two lookups (see `proxy-common`):
//! (protocol, port) -> port class, then (class, destination) -> rule index in an LPM trie.
//! [`compile`] builds both so that the answer is the one a first-match walk over the rules
//! in order would give, like an iptables chain.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::IpAddr,
    str::FromStr,
};

use ipnet::IpNet;
use proxy_common::{
    ACTION_FAIL_OPEN, ACTION_HAS_LISTENER_SLOT, ACTION_HAS_ON_IP4, ACTION_HAS_ON_IP6, ACTION_LOCAL,
    CLASS_PREFIX_BITS, IPPROTO_TCP, IPPROTO_UDP, MAX_PREFIX_ENTRIES, MAX_RULE_CGROUPS, MAX_RULES,
    RuleAction, RuleKeyV4, RuleKeyV6, port_class_index,
};

use crate::cgroup::Cgroup;

/// An error in a rule as written.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    /// A port list that is empty or has an empty item.
    #[error("empty port list or item in '{0}'")]
    EmptyPort(String),
    /// A port that is not a number in 0..=65535.
    #[error("'{0}' is not a port (0-65535)")]
    BadPort(String),
    /// A range whose start is above its end.
    #[error("port range '{0}' is reversed (start > end)")]
    ReversedRange(String),
    /// A destination that is not an address or a prefix.
    #[error("'{0}' is not an IP address or prefix (for example 10.0.0.0/8 or 2001:db8::/32)")]
    BadPrefix(String),
    /// A mark that is not VALUE or VALUE/MASK.
    #[error("'{0}' is not a mark: expected VALUE or VALUE/MASK, decimal or 0x-hex")]
    BadMark(String),
    /// A mark whose value has bits outside its mask: the fwmark rule could never match.
    #[error("mark value {value:#x} has bits outside mask {mask:#x}")]
    MarkOutsideMask { value: u32, mask: u32 },
    /// A mark value of 0 would make the fwmark rule match every unmarked packet.
    #[error("mark value 0 would send all unmarked traffic to the local route table")]
    ZeroMark,
    /// A protocol other than tcp and udp.
    #[error("'{0}' is not a protocol: expected tcp, udp or tcp,udp")]
    BadProtocol(String),
    /// More rules than the classifier's tables hold.
    #[error("{0} rules, the classifier holds at most {MAX_RULES}")]
    TooManyRules(usize),
    /// A rule without an on-port.
    #[error("on_port is required")]
    MissingOnPort,
    /// More cgroups in one rule's local scope than the classifier's action holds.
    #[error("{0} cgroups, a rule names at most {MAX_RULE_CGROUPS}")]
    TooManyCgroups(usize),
    /// A rule for local traffic, but the agent runs without `--local`.
    #[error("local interception needs `proxy run --local`")]
    LocalWithoutFlag,
    /// Cgroups named for a rule that does not apply to local traffic.
    #[error("cgroup is set but local = false")]
    CgroupNotLocal,
    /// A cgroup path that is not a cgroup.
    #[error("{0}")]
    Cgroup(String),
    /// More (class, prefix) entries than the LPM trie holds.
    #[error(
        "the rules need {0} prefix entries for one address family, at most {MAX_PREFIX_ENTRIES} fit"
    )]
    TooManyPrefixes(usize),
}

/// An inclusive range of ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

/// A comma list of ports and ranges: `80,443,8000-8100`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSet(pub Vec<PortRange>);

impl PortSet {
    pub(crate) fn contains(&self, port: u16) -> bool {
        self.0.iter().any(|r| (r.start..=r.end).contains(&port))
    }
}

impl FromStr for PortSet {
    type Err = RuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parse_port = |p: &str| -> Result<u16, RuleError> {
            let p = p.trim();
            if p.is_empty() {
                return Err(RuleError::EmptyPort(s.to_owned()));
            }
            p.parse::<u16>()
                .map_err(|_| RuleError::BadPort(p.to_owned()))
        };
        let mut ranges = Vec::new();
        for item in s.split(',') {
            // iptables writes ranges with ':', people write them with '-': take both.
            let range = match item.split_once(['-', ':']) {
                Some((a, b)) => {
                    let (start, end) = (parse_port(a)?, parse_port(b)?);
                    if start > end {
                        return Err(RuleError::ReversedRange(item.trim().to_owned()));
                    }
                    PortRange { start, end }
                }
                None => {
                    let port = parse_port(item)?;
                    PortRange {
                        start: port,
                        end: port,
                    }
                }
            };
            ranges.push(range);
        }
        Ok(PortSet(ranges))
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if r.start == r.end {
                write!(f, "{}", r.start)?;
            } else {
                write!(f, "{}-{}", r.start, r.end)?;
            }
        }
        Ok(())
    }
}

/// Parses an address or prefix; a bare address is a host prefix (/32 or /128). Host bits
/// are cleared, as iptables does (`10.1.2.3/8` is `10.0.0.0/8`).
pub(crate) fn parse_prefix(s: &str) -> Result<IpNet, RuleError> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    s.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| RuleError::BadPrefix(s.to_owned()))
}

/// `--tproxy-mark VALUE[/MASK]`; the mask defaults to 0xffffffff as in iptables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark {
    pub value: u32,
    pub mask: u32,
}

#[cfg(test)]
impl Mark {
    /// What `tproxy_tg4` does to the mark of a packet it assigns (the classifier computes
    /// it with `proxy_common::tproxy_mark`).
    fn apply(self, mark: u32) -> u32 {
        proxy_common::tproxy_mark(mark, self.value, self.mask)
    }
}

impl Default for Mark {
    fn default() -> Self {
        Mark { value: 1, mask: 1 }
    }
}

/// A 32-bit number in decimal or 0x-hex, as iptables takes marks.
pub(crate) fn parse_u32(s: &str) -> Option<u32> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

impl FromStr for Mark {
    type Err = RuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let number = |t: &str| parse_u32(t.trim()).ok_or_else(|| RuleError::BadMark(s.to_owned()));
        let (value, mask) = match s.split_once('/') {
            Some((v, m)) => (number(v)?, number(m)?),
            None => (number(s)?, u32::MAX),
        };
        if value == 0 {
            return Err(RuleError::ZeroMark);
        }
        if value & !mask != 0 {
            return Err(RuleError::MarkOutsideMask { value, mask });
        }
        Ok(Mark { value, mask })
    }
}

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}/{:#x}", self.value, self.mask)
    }
}

/// `--protocol tcp|udp|tcp,udp`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Protocols {
    pub tcp: bool,
    pub udp: bool,
}

impl Protocols {
    pub const TCP: Protocols = Protocols {
        tcp: true,
        udp: false,
    };

    pub(crate) fn numbers(self) -> impl Iterator<Item = u8> {
        [(self.tcp, IPPROTO_TCP), (self.udp, IPPROTO_UDP)]
            .into_iter()
            .filter_map(|(on, n)| on.then_some(n))
    }
}

impl FromStr for Protocols {
    type Err = RuleError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut p = Protocols {
            tcp: false,
            udp: false,
        };
        for item in s.split(',') {
            match item.trim().to_ascii_lowercase().as_str() {
                "tcp" => p.tcp = true,
                "udp" => p.udp = true,
                _ => return Err(RuleError::BadProtocol(s.to_owned())),
            }
        }
        Ok(p)
    }
}

impl fmt::Display for Protocols {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.tcp, self.udp) {
            (true, true) => f.write_str("tcp,udp"),
            (false, true) => f.write_str("udp"),
            _ => f.write_str("tcp"),
        }
    }
}

/// One `-j TPROXY` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub protocols: Protocols,
    /// Destination prefixes; empty means every destination of both families.
    pub dst: Vec<IpNet>,
    pub dport: PortSet,
    pub on_ip: Option<IpAddr>,
    /// 0: the packet's own destination port.
    pub on_port: u16,
    pub mark: Mark,
    pub fail_open: bool,
    /// Slot of the agent's listener for this rule in the LISTENERS sockmap, if any.
    pub listener_slot: Option<u32>,
    /// `--local`: the rule applies to the connections of local processes too, those in
    /// these cgroups and below them (empty: every process the cgroup programs run for).
    /// `None`: forwarded traffic only.
    pub local: Option<Vec<Cgroup>>,
}

impl Rule {
    pub(crate) fn action(&self) -> RuleAction {
        let mut flags = 0;
        let mut on_ip4_be = 0;
        let mut on_ip6 = [0; 16];
        match self.on_ip {
            Some(IpAddr::V4(ip)) => {
                flags |= ACTION_HAS_ON_IP4;
                on_ip4_be = u32::from_ne_bytes(ip.octets());
            }
            Some(IpAddr::V6(ip)) => {
                flags |= ACTION_HAS_ON_IP6;
                on_ip6 = ip.octets();
            }
            None => {}
        }
        if self.fail_open {
            flags |= ACTION_FAIL_OPEN;
        }
        if self.listener_slot.is_some() {
            flags |= ACTION_HAS_LISTENER_SLOT;
        }
        let mut local_cgroup_ids = [0; MAX_RULE_CGROUPS];
        let mut local_cgroup_levels = [0; MAX_RULE_CGROUPS];
        if let Some(cgroups) = &self.local {
            flags |= ACTION_LOCAL;
            // At most MAX_RULE_CGROUPS: the rules file refuses more.
            for (i, c) in cgroups.iter().take(MAX_RULE_CGROUPS).enumerate() {
                local_cgroup_ids[i] = c.id;
                local_cgroup_levels[i] = c.level;
            }
        }
        RuleAction {
            on_ip4_be,
            on_ip6,
            mark_value: self.mark.value,
            mark_mask: self.mark.mask,
            on_port: self.on_port,
            _pad: 0,
            flags,
            listener_slot: self.listener_slot.unwrap_or(0),
            // Given when the rule is installed (`generation::assign_counter_slots`).
            counter_slot: 0,
            _pad2: 0,
            local_cgroup_ids,
            local_cgroup_levels,
        }
    }

    /// Whether the rule covers (protocol, destination, port), whatever the interface or
    /// process: what the classifier's tables say of it, walked in userspace.
    pub(crate) fn covers(&self, protocol: u8, dst: IpAddr, port: u16) -> bool {
        self.protocols.numbers().any(|p| p == protocol)
            && self.dport.contains(port)
            && self.prefixes().iter().any(|p| p.contains(&dst))
    }

    fn prefixes(&self) -> Vec<IpNet> {
        if self.dst.is_empty() {
            // 0.0.0.0/0 and ::/0.
            vec![IpNet::V4(Default::default()), IpNet::V6(Default::default())]
        } else {
            self.dst.clone()
        }
    }
}

/// The classifier's tables for a rule set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// (index into PORT_CLASS, class) for every port some rule covers; the rest is 0.
    pub port_classes: Vec<(u32, u32)>,
    /// (prefix length including the class bits, key, rule index).
    pub v4: Vec<(u32, RuleKeyV4, u32)>,
    pub v6: Vec<(u32, RuleKeyV6, u32)>,
    /// Indexed by rule index.
    pub actions: Vec<RuleAction>,
}

/// Builds the classifier's tables so that a packet gets the first rule, in order, whose
/// protocol, port and destination prefix all cover it.
///
/// Ports that are covered by the same set of rules share a class. Within a class, each
/// prefix maps to the smallest rule index among the rules that cover the whole prefix: the
/// LPM lookup returns the longest stored prefix P that holds the address, every rule
/// covering the address either covers P too or would have stored a longer prefix, so
/// that index is the first match.
pub fn compile(rules: &[Rule]) -> Result<Compiled, RuleError> {
    if rules.len() > MAX_RULES as usize {
        return Err(RuleError::TooManyRules(rules.len()));
    }
    let mut out = Compiled {
        actions: rules.iter().map(Rule::action).collect(),
        ..Compiled::default()
    };

    // Port classes: sweep each protocol's ports in elementary intervals where the set of
    // rules is constant, and number the distinct sets.
    let mut class_of_set: HashMap<Vec<u32>, u32> = HashMap::new();
    let mut class_rules: Vec<Vec<u32>> = vec![Vec::new()]; // class 0: none
    for protocol in [IPPROTO_TCP, IPPROTO_UDP] {
        // Boundaries where some rule's range starts or ends.
        let mut events: BTreeMap<u32, ()> = BTreeMap::new();
        events.insert(0, ());
        events.insert(65_536, ());
        for rule in rules
            .iter()
            .filter(|r| r.protocols.numbers().any(|p| p == protocol))
        {
            for range in &rule.dport.0 {
                events.insert(u32::from(range.start), ());
                events.insert(u32::from(range.end) + 1, ());
            }
        }
        let bounds: Vec<u32> = events.into_keys().collect();
        for pair in bounds.windows(2) {
            let (lo, hi) = (pair[0], pair[1]); // [lo, hi)
            let Ok(lo16) = u16::try_from(lo) else {
                continue;
            };
            let set: Vec<u32> = rules
                .iter()
                .enumerate()
                .filter(|(_, r)| {
                    r.protocols.numbers().any(|p| p == protocol) && r.dport.contains(lo16)
                })
                .map(|(i, _)| i as u32)
                .collect();
            if set.is_empty() {
                continue;
            }
            let next_class = class_rules.len() as u32;
            let class = *class_of_set.entry(set.clone()).or_insert_with(|| {
                class_rules.push(set);
                next_class
            });
            for port in lo..hi {
                // `lo..hi` stays within 0..=65535 by construction.
                let port = port as u16;
                if let Some(index) = port_class_index(protocol, port) {
                    out.port_classes.push((index, class));
                }
            }
        }
    }

    // Prefix entries per class, rules in order.
    let mut v4: HashMap<(u32, IpNet), u32> = HashMap::new();
    let mut v6: HashMap<(u32, IpNet), u32> = HashMap::new();
    for (class, members) in class_rules.iter().enumerate().skip(1) {
        let class = class as u32;
        for &index in members {
            for prefix in rules[index as usize].prefixes() {
                let table = match prefix {
                    IpNet::V4(_) => &mut v4,
                    IpNet::V6(_) => &mut v6,
                };
                insert_first_match(table, class, prefix, index);
            }
        }
    }
    // Class 0: every prefix of any rule, whatever the port, for the packets whose ports
    // cannot be read (a first fragment cut short, an IPv6 chain without its transport
    // header): they are dropped when a rule covers their destination (T9, T11).
    for (index, rule) in rules.iter().enumerate() {
        for prefix in rule.prefixes() {
            let table = match prefix {
                IpNet::V4(_) => &mut v4,
                IpNet::V6(_) => &mut v6,
            };
            insert_first_match(table, 0, prefix, index as u32);
        }
    }

    for ((class, prefix), index) in v4 {
        if let IpNet::V4(net) = prefix {
            let key = RuleKeyV4 {
                class_be: class.to_be_bytes(),
                addr: net.network().octets(),
            };
            out.v4
                .push((CLASS_PREFIX_BITS + u32::from(net.prefix_len()), key, index));
        }
    }
    for ((class, prefix), index) in v6 {
        if let IpNet::V6(net) = prefix {
            let key = RuleKeyV6 {
                class_be: class.to_be_bytes(),
                addr: net.network().octets(),
            };
            out.v6
                .push((CLASS_PREFIX_BITS + u32::from(net.prefix_len()), key, index));
        }
    }
    for len in [out.v4.len(), out.v6.len()] {
        if len > MAX_PREFIX_ENTRIES as usize {
            return Err(RuleError::TooManyPrefixes(len));
        }
    }
    out.v4
        .sort_by_key(|(len, key, _)| (key.class_be, *len, key.addr));
    out.v6
        .sort_by_key(|(len, key, _)| (key.class_be, *len, key.addr));
    Ok(out)
}

/// Stores `prefix -> index` in a class unless an earlier rule stored the same prefix, with
/// the index lowered to that of any earlier rule whose prefix covers this one. Rules must
/// arrive in order.
fn insert_first_match(
    table: &mut HashMap<(u32, IpNet), u32>,
    class: u32,
    prefix: IpNet,
    index: u32,
) {
    if table.contains_key(&(class, prefix)) {
        return;
    }
    let mut best = index;
    for len in 0..prefix.prefix_len() {
        if let Ok(ancestor) = IpNet::new(prefix.addr(), len)
            && let Some(&other) = table.get(&(class, ancestor.trunc()))
        {
            best = best.min(other);
        }
    }
    table.insert((class, prefix), best);
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn rule(dst: &[&str], ports: &str) -> Rule {
        Rule {
            protocols: Protocols::TCP,
            dst: dst
                .iter()
                .map(|d| parse_prefix(d).expect("prefix"))
                .collect(),
            dport: ports.parse().expect("ports"),
            on_ip: None,
            on_port: 50080,
            mark: Mark::default(),
            fail_open: false,
            listener_slot: None,
            local: None,
        }
    }

    /// The classifier's lookup, done on the compiled tables: port class, then the longest
    /// stored prefix.
    fn classify(c: &Compiled, protocol: u8, dst: Ipv4Addr, port: u16) -> Option<u32> {
        let index = port_class_index(protocol, port)?;
        let class = c.port_classes.iter().find(|(i, _)| *i == index)?.1;
        c.v4.iter()
            .filter(|(len, key, _)| {
                key.class_be == class.to_be_bytes()
                    && IpNet::new(IpAddr::from(key.addr), (*len - CLASS_PREFIX_BITS) as u8)
                        .is_ok_and(|net| net.contains(&IpAddr::V4(dst)))
            })
            .max_by_key(|(len, _, _)| *len)
            .map(|(_, _, index)| *index)
    }

    /// First-match walk over the rules, the reference the tables must agree with.
    fn first_match(rules: &[Rule], protocol: u8, dst: Ipv4Addr, port: u16) -> Option<u32> {
        rules
            .iter()
            .position(|r| r.covers(protocol, IpAddr::V4(dst), port))
            .map(|i| i as u32)
    }

    #[test]
    fn port_lists_and_ranges_parse() {
        let set: PortSet = "80,443,8000-8100".parse().expect("valid");
        assert_eq!(
            set.0,
            vec![
                PortRange { start: 80, end: 80 },
                PortRange {
                    start: 443,
                    end: 443
                },
                PortRange {
                    start: 8000,
                    end: 8100
                },
            ]
        );
        assert!(set.contains(8050) && !set.contains(8101) && !set.contains(81));
        assert_eq!(set.to_string(), "80,443,8000-8100");
        assert_eq!("1000:2000".parse::<PortSet>().map(|s| s.0.len()), Ok(1));
        assert_eq!(
            "0-65535".parse::<PortSet>().map(|s| s.contains(65535)),
            Ok(true)
        );
    }

    #[test]
    fn bad_ports_are_refused_with_the_culprit() {
        assert_eq!(
            "".parse::<PortSet>(),
            Err(RuleError::EmptyPort(String::new()))
        );
        assert_eq!(
            "80,".parse::<PortSet>(),
            Err(RuleError::EmptyPort("80,".into()))
        );
        assert_eq!(
            "65536".parse::<PortSet>(),
            Err(RuleError::BadPort("65536".into()))
        );
        assert_eq!(
            "http".parse::<PortSet>(),
            Err(RuleError::BadPort("http".into()))
        );
        assert_eq!(
            "90-80".parse::<PortSet>(),
            Err(RuleError::ReversedRange("90-80".into()))
        );
    }

    #[test]
    fn prefixes_parse_and_lose_host_bits() {
        assert_eq!(
            parse_prefix("10.1.2.3/8").map(|p| p.to_string()),
            Ok("10.0.0.0/8".into())
        );
        assert_eq!(
            parse_prefix("192.0.2.7").map(|p| p.to_string()),
            Ok("192.0.2.7/32".into())
        );
        assert_eq!(
            parse_prefix("2001:db8::1/32").map(|p| p.to_string()),
            Ok("2001:db8::/32".into())
        );
        assert_eq!(
            parse_prefix("10.0.0.0/33"),
            Err(RuleError::BadPrefix("10.0.0.0/33".into()))
        );
        assert_eq!(
            parse_prefix("example.com"),
            Err(RuleError::BadPrefix("example.com".into()))
        );
    }

    #[test]
    fn marks_parse_like_iptables() {
        assert_eq!("0x1/0x1".parse::<Mark>(), Ok(Mark { value: 1, mask: 1 }));
        assert_eq!(
            "5".parse::<Mark>(),
            Ok(Mark {
                value: 5,
                mask: u32::MAX
            })
        );
        assert_eq!(
            "0x10/0xf0".parse::<Mark>(),
            Ok(Mark {
                value: 0x10,
                mask: 0xf0
            })
        );
        assert_eq!("0".parse::<Mark>(), Err(RuleError::ZeroMark));
        assert_eq!(
            "0x3/0x1".parse::<Mark>(),
            Err(RuleError::MarkOutsideMask { value: 3, mask: 1 })
        );
        assert_eq!("one".parse::<Mark>(), Err(RuleError::BadMark("one".into())));
    }

    #[test]
    fn mark_formula_is_xor_after_clearing_the_mask() {
        let m = Mark {
            value: 0x1,
            mask: 0x1,
        };
        assert_eq!(m.apply(0), 1);
        assert_eq!(m.apply(0xf0), 0xf1, "bits outside the mask are kept");
        assert_eq!(
            m.apply(0x1),
            0x1,
            "the masked bits are cleared before the XOR"
        );
        let m = Mark {
            value: 0x10,
            mask: 0x30,
        };
        assert_eq!(m.apply(0x3f), 0x1f);
        // XOR, not OR: a value bit outside the mask (refused by the parser, but possible in
        // the kernel) flips an existing bit.
        let raw = Mark {
            value: 0x3,
            mask: 0x1,
        };
        assert_eq!(raw.apply(0x2), 0x1);
        // The eBPF side computes it with the shared type: same answers.
        let action = rule(&[], "80").action();
        assert_eq!(action.apply_mark(0xf0), Mark::default().apply(0xf0));
    }

    #[test]
    fn protocols_parse() {
        assert_eq!("tcp".parse::<Protocols>(), Ok(Protocols::TCP));
        assert_eq!(
            "udp,tcp".parse::<Protocols>(),
            Ok(Protocols {
                tcp: true,
                udp: true
            })
        );
        assert_eq!(
            "sctp".parse::<Protocols>(),
            Err(RuleError::BadProtocol("sctp".into()))
        );
    }

    #[test]
    fn no_dst_covers_both_families() {
        let c = compile(&[rule(&[], "80")]).expect("compiles");
        // One entry under the port class, one under class 0 for T9/T11, per family.
        assert_eq!(c.v4.len(), 2);
        assert!(c.v4.iter().all(|(len, _, _)| *len == CLASS_PREFIX_BITS));
        assert_eq!(c.v6.len(), 2);
        assert_eq!(
            classify(&c, IPPROTO_TCP, Ipv4Addr::new(203, 0, 113, 9), 80),
            Some(0)
        );
        assert_eq!(
            classify(&c, IPPROTO_TCP, Ipv4Addr::new(203, 0, 113, 9), 81),
            None
        );
        assert_eq!(
            classify(&c, IPPROTO_UDP, Ipv4Addr::new(203, 0, 113, 9), 80),
            None
        );
    }

    #[test]
    fn tables_agree_with_a_first_match_walk() {
        // Overlapping prefixes and ports, where a later, more specific rule must not win
        // over an earlier, broader one.
        let rules = vec![
            rule(&["10.0.0.0/8"], "80,443"),
            rule(&["10.1.0.0/16", "192.0.2.0/24"], "80-90"),
            rule(&["10.1.2.0/24"], "443"),
            rule(&["0.0.0.0/0"], "85"),
            rule(&["10.1.2.3"], "1-65535"),
        ];
        let c = compile(&rules).expect("compiles");
        let addrs = [
            Ipv4Addr::new(10, 1, 2, 3),
            Ipv4Addr::new(10, 1, 2, 4),
            Ipv4Addr::new(10, 1, 3, 1),
            Ipv4Addr::new(10, 2, 0, 1),
            Ipv4Addr::new(192, 0, 2, 200),
            Ipv4Addr::new(198, 51, 100, 1),
        ];
        for addr in addrs {
            for port in [1, 79, 80, 81, 85, 90, 91, 443, 444, 65535] {
                assert_eq!(
                    classify(&c, IPPROTO_TCP, addr, port),
                    first_match(&rules, IPPROTO_TCP, addr, port),
                    "{addr}:{port}"
                );
            }
        }
    }

    #[test]
    fn ten_thousand_rules_compile_to_bounded_tables() {
        let rules: Vec<Rule> = (0..10_000u32)
            .map(|i| {
                let a = Ipv4Addr::from(0x0a00_0000 | (i << 8));
                rule(&[&format!("{a}/24")], "80")
            })
            .collect();
        let c = compile(&rules).expect("compiles");
        // One entry per rule under its port class, one under class 0 (T11).
        assert_eq!(c.v4.len(), 20_000);
        assert_eq!(c.actions.len(), 10_000);
        assert_eq!(
            classify(&c, IPPROTO_TCP, Ipv4Addr::new(10, 0x27, 0x0f, 9), 80),
            Some(9_999)
        );
        assert!(compile(&vec![rule(&[], "80"); MAX_RULES as usize + 1]).is_err());
    }
}
