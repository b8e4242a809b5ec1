//! Loading the embedded eBPF object, filling its maps, attaching the TC-ingress classifier
//! (TCX links where the kernel has them, clsact + cls_bpf over netlink otherwise) and the
//! `sk_lookup` program, and forwarding the programs' aya-log records to `log`.
//!
//! What is attached outlives the agent unless the agent detaches it (T12): the TCX and
//! sk_lookup links are pinned ([`crate::pins`]), the cls_bpf filters stay with their qdisc.
//! A restart takes over what a crashed run left without a gap: the pinned TCX link gets
//! the new program (`bpf_link_update`), the filter is replaced in place (same priority and
//! handle), the new sk_lookup link is attached before the old one goes.

use std::{
    collections::HashSet,
    fs::File,
    io,
    mem::ManuallyDrop,
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader, Pod,
    maps::{
        Array, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuValues, SockHash, SockMap,
        lpm_trie::Key,
    },
    programs::{
        CgroupAttachMode, CgroupSockAddr, Link as _, LinkOrder, SchedClassifier, SkLookup, SkSkb,
        TcAttachType, TestRun as _, TestRunOptions,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
    util::KernelVersion,
};
use log::{debug, info, warn};
use proxy_common::{
    Counter, GlobalConfig, IfaceAddrs, LOCAL_PROGRAMS, MAP_ACTIONS, MAP_CONFIG, MAP_COUNTERS,
    MAP_GENERATION, MAP_IFACE_ADDRS, MAP_LISTENERS, MAP_OWN_ADDRS, MAP_PORT_CLASS, MAP_RELAY_SOCKS,
    MAP_RELAY_TARGETS, MAP_RULE_COUNTERS, MAP_RULES_V4, MAP_RULES_V6, MAX_OWN_ADDRS, MAX_RULES,
    OwnAddr, PROG_LOCAL_CONNECT4, PROG_RELAY_VERDICT, PROG_SK_LOOKUP, PROG_TC_INGRESS,
    PROG_TC_INGRESS_L3, RuleAction, RuleCounters, SockOffsets, action_index,
};

use crate::{
    btf::Btf,
    cgroup::Cgroup,
    generation,
    link_header::LinkHeader,
    pins::{PinDir, PinError, PinLifetime},
    relay::sockmap::KernelRelay,
    rules::{Compiled, Rule},
    tc_filter,
};

/// The TC programs of the object: a cls_bpf filter at ingress whose program has one of
/// these names, and whose handle is an agent's table, is that agent's.
pub(crate) const TC_PROGRAMS: &[&str] = &[PROG_TC_INGRESS, PROG_TC_INGRESS_L3];

/// The classifier program for an interface's link header (T10).
pub(crate) fn classifier_for(header: LinkHeader) -> &'static str {
    match header {
        LinkHeader::Ethernet => PROG_TC_INGRESS,
        LinkHeader::None => PROG_TC_INGRESS_L3,
    }
}

/// How the classifier is attached at TC ingress (`--tc-attach`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TcAttach {
    /// TCX links on kernels that have them (6.6+), clsact + cls_bpf otherwise.
    Auto,
    /// A TCX link.
    Tcx,
    /// cls_bpf under a clsact qdisc, over netlink (the pre-6.6 way).
    Netlink,
}

impl TcAttach {
    /// Whether the classifier is attached as a TCX link here (else clsact + cls_bpf): the
    /// attach's decision, for the doctor too.
    pub fn uses_tcx(self) -> bool {
        self.choose(KernelVersion::current().ok(), crate::pins::pin_lifetime())
            .tcx
    }

    /// What `--tc-attach` comes to on a kernel of `version`, with pins that live as `pins`
    /// says. A TCX link lives as long as its pin, a cls_bpf filter as long as its qdisc: where
    /// bpffs dies with the agent, `auto` picks cls_bpf, so that a crash still leaves the
    /// classifier (T12) and no rule is passed by.
    pub fn choose(self, version: Option<KernelVersion>, pins: PinLifetime) -> AttachChoice {
        let kernel_tcx = crate::kernel_features::Feature::Tcx.on(version);
        let tcx = match self {
            TcAttach::Auto => kernel_tcx && pins == PinLifetime::Outlives,
            TcAttach::Tcx => true,
            TcAttach::Netlink => false,
        };
        AttachChoice {
            how: self,
            tcx,
            pins,
        }
    }
}

/// The attach [`TcAttach::choose`] made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttachChoice {
    /// As given (`--tc-attach`).
    pub how: TcAttach,
    /// A TCX link (else cls_bpf under clsact).
    pub tcx: bool,
    /// How long the pins live.
    pub pins: PinLifetime,
}

impl AttachChoice {
    /// What the agent says of its attach, once, when the pins may die with it (else
    /// nothing): what a `kill -9` then leaves. `local`: `--local`'s cgroup links are pinned
    /// too. A warning where it leaves a hole: a TCX link (`--tc-attach tcx`), or the cgroup
    /// links, whose loss lets local connections go direct.
    pub fn note(&self, local: bool) -> Option<(log::Level, String)> {
        let why = self.pins.why_not()?;
        let sk_lookup = "a kill -9 takes the sk_lookup link pinned there with it (it serves \
                         only the handoff of ports in TIME_WAIT)";
        let cgroup = if local {
            ", and --local's cgroup links: local connections then go direct, past the proxy, \
             until the next agent starts"
        } else {
            ""
        };
        let hole = local || self.tcx;
        let text = if self.tcx {
            format!(
                "--tc-attach tcx, but {why}: the TCX links pinned in it go with it, and after \
                 a kill -9 no classifier is left: traffic of every rule goes past the proxy \
                 until the next agent starts; {sk_lookup}{cgroup}. --tc-attach auto attaches \
                 with cls_bpf here, which outlives the agent; or run the agent where bpffs \
                 outlives it (nsenter --net, not ip netns exec)"
            )
        } else if self.how == TcAttach::Auto {
            format!("{why}: attaching with cls_bpf, which outlives it; {sk_lookup}{cgroup}")
        } else {
            format!("{why}: the cls_bpf classifier outlives it; {sk_lookup}{cgroup}")
        };
        let level = if hole {
            log::Level::Warn
        } else {
            log::Level::Info
        };
        Some((level, text))
    }
}

/// The classifier object, built by `build.rs` from `proxy-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// An error while loading or attaching the eBPF programs.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// The object could not be loaded (verifier, BTF, permissions).
    #[error("loading the eBPF object")]
    Load(#[source] aya::EbpfError),
    /// The kernel refused a program (the verifier, or a missing feature). The message names
    /// the verifier's last line; [`EbpfError::verifier_tail`] has a few more, the debug log
    /// the whole log.
    #[error(
        "the kernel refused to load program {program}: {} (RUST_LOG=debug shows the whole verifier log)",
        verifier_tail.last().map_or("the verifier said nothing", String::as_str)
    )]
    Refused {
        program: &'static str,
        #[source]
        source: std::io::Error,
        /// The verifier log's last lines, where it says why.
        verifier_tail: Vec<String>,
    },
    /// A program is missing from the object or is of another type.
    #[error("program {0} in the eBPF object")]
    Program(&'static str, #[source] aya::programs::ProgramError),
    /// A map is missing from the object or is of another type.
    #[error("map {0} in the eBPF object")]
    Map(&'static str, #[source] aya::maps::MapError),
    /// Writing to a map failed.
    #[error("writing map {0}")]
    MapWrite(&'static str, #[source] aya::maps::MapError),
    /// The kernel refused to attach the classifier to an interface.
    #[error("attaching the classifier to {iface} ingress")]
    Attach {
        iface: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    /// The clsact qdisc needed by the netlink fallback could not be added.
    #[error("adding the clsact qdisc to {iface}")]
    Clsact {
        iface: String,
        #[source]
        source: tc::TcError,
    },
    /// The rules in force and the new ones need more counter slots than there are.
    #[error(
        "{0} rules in force and new: both count at once around a reload, and the classifier \
         has {MAX_RULES} counter slots; reload in two steps"
    )]
    CounterSlots(usize),
    /// The number of possible CPUs could not be read.
    #[error("reading the number of possible CPUs")]
    Cpus(#[source] std::io::Error),
    /// This kernel's BTF does not say where sockets keep their transparent flag.
    #[error(
        "cannot check that sockets are transparent (needs /sys/kernel/btf/vmlinux with \
         struct inet_sock, CONFIG_DEBUG_INFO_BTF); --allow-unchecked-transparency starts anyway"
    )]
    NoTransparencyCheck(#[source] crate::btf::BtfError),
    /// The network namespace could not be opened for the sk_lookup program.
    #[error("opening /proc/self/ns/net")]
    Netns(#[source] std::io::Error),
    /// The pin directory could not be set up.
    #[error("pinning the classifier so that it outlives the agent")]
    Pins(#[from] PinError),
    /// A link could not be pinned.
    #[error("pinning {0}")]
    Pin(PathBuf, #[source] io::Error),
    /// A cgroup could not be opened, or the kernel refused to attach a cgroup program.
    #[error("attaching {program} to cgroup {cgroup}")]
    CgroupAttach {
        program: &'static str,
        cgroup: String,
        #[source]
        source: io::Error,
    },
    /// The filters at an interface could not be listed.
    #[error("listing the tc filters at {iface} ingress")]
    Filters {
        iface: String,
        #[source]
        source: io::Error,
    },
}

impl EbpfError {
    /// The program the kernel refused and the verifier log's last lines, for the doctor.
    pub fn verifier_tail(&self) -> Option<(&'static str, &[String])> {
        match self {
            EbpfError::Refused {
                program,
                verifier_tail,
                ..
            } => Some((program, verifier_tail)),
            _ => None,
        }
    }
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> EbpfError {
    move |e| EbpfError::Map(name, e)
}

fn write_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> EbpfError {
    move |e| EbpfError::MapWrite(name, e)
}

/// One installed rule generation (see [`crate::generation`]).
struct Generation {
    /// 0 or 1: which half of the tables.
    generation: u32,
    /// The tables as written in that half; each action holds its rule's counter slot.
    tables: Compiled,
    /// The rules, in the order of `tables.actions`, for the next reload's counter slots.
    rules: Vec<Rule>,
}

/// A link pinned in bpffs: the pin holds it, not a descriptor of the agent's, so it stays
/// attached whatever becomes of the agent, until the pin is removed.
struct Pinned {
    path: PathBuf,
}

impl Pinned {
    /// Pins `link` at `path` in place of whatever is pinned there: pinned under a temporary
    /// name first, then renamed over the old pin, so the path always holds a link. The old
    /// link, if any, goes when the last descriptor of it closes.
    fn replace(link: FdLink, path: &Path) -> Result<Self, EbpfError> {
        let fresh = crate::pins::fresh(path);
        // A leftover of a run that died between the two steps.
        let _ = std::fs::remove_file(&fresh);
        link.pin(&fresh)
            .map_err(|e| EbpfError::Pin(fresh.clone(), io::Error::other(e)))?;
        std::fs::rename(&fresh, path).map_err(|e| EbpfError::Pin(path.to_owned(), e))?;
        Ok(Pinned {
            path: path.to_owned(),
        })
    }

    /// Removes the pin: the link (and its program, if nothing else holds it) goes.
    fn unpin(self) -> io::Result<()> {
        std::fs::remove_file(&self.path)
    }
}

/// The classifier at one interface.
enum TcLink {
    /// A TCX link, pinned.
    Tcx { iface: String, link: Pinned },
    /// A cls_bpf filter. Kept from aya's drop, which would delete the filter: a filter must
    /// stay when the agent dies uncleanly, and only [`Classifier::detach_all`] removes it.
    Filter {
        iface: String,
        link: ManuallyDrop<SchedClassifierLink>,
    },
}

/// How an attach went: a new link or filter, or one a previous run left, taken over.
#[derive(Clone, Copy)]
enum Attached {
    New(&'static str),
    TookOver(&'static str),
}

impl Attached {
    fn describe(self) -> &'static str {
        match self {
            Attached::New(how) | Attached::TookOver(how) => how,
        }
    }
}

impl TcLink {
    fn iface(&self) -> &str {
        match self {
            TcLink::Tcx { iface, .. } | TcLink::Filter { iface, .. } => iface,
        }
    }
}

/// The loaded programs and the links that keep them attached. Dropping it leaves them
/// attached, as a crash does (T12); [`Classifier::detach_all`] removes them.
pub struct Classifier {
    ebpf: Ebpf,
    pins: PinDir,
    table: u32,
    tc_links: Vec<TcLink>,
    sk_lookup: Option<Pinned>,
    /// `--local`: the cgroup programs' links, pinned, one per program and cgroup.
    cgroup_links: Vec<Pinned>,
    /// `--local`: the cgroup programs are loaded.
    local: bool,
    /// `--local`: what [`MAP_OWN_ADDRS`] holds.
    own_addrs: HashSet<OwnAddr>,
    /// Interfaces where we added the clsact qdisc ourselves (netlink fallback only), or
    /// took over one a crashed run added (see [`add_clsact`](Self::add_clsact)).
    clsact_added: Vec<String>,
    /// Whether the pin directory was there before this run: then its marks are the record
    /// of what the previous run added, and a mark missing means it did not add it.
    record_survived: bool,
    /// Whether the attach said what its choice leaves after a crash
    /// ([`AttachChoice::note`]), which it says once.
    attach_noted: bool,
    /// Whether this run took over a classifier a previous run left (see
    /// [`took_over`](Self::took_over)).
    took_over: bool,
    /// The rule generation in force.
    in_force: Option<Generation>,
    /// The tables of the generation before it, until they are cleared.
    previous: Option<Compiled>,
}

impl Classifier {
    /// Loads the object and starts forwarding its log records. `relayed_sockets` sizes the
    /// maps of the in-kernel relay (`--relay sockmap`); 0 when it is off, and they take
    /// one entry. `table` names the agent's pin directory and filter handles.
    ///
    /// Without the offsets of the transparent flag in this kernel's BTF the classifier
    /// cannot refuse a plain socket (T5), so loading fails unless `allow_unchecked` says to
    /// accept that risk.
    pub fn load(
        relayed_sockets: u32,
        allow_unchecked: bool,
        table: u32,
    ) -> Result<Self, EbpfError> {
        // Created when the first link is pinned, so that a start that fails before leaves
        // no directory behind.
        let pins = PinDir::of(table)?;
        let record_survived = pins.path().is_dir();
        let offsets = match Btf::from_sys_fs().and_then(|btf| btf.sock_offsets()) {
            Ok(offsets) => {
                debug!("transparent flag offsets: {offsets:?}");
                offsets
            }
            Err(e) if allow_unchecked => {
                warn!(
                    "--allow-unchecked-transparency: sockets are not checked for \
                     IP_TRANSPARENT (T5), a plain socket on a rule's on-ip/on-port would \
                     receive intercepted traffic: {}",
                    crate::error_chain(&e)
                );
                SockOffsets::UNKNOWN
            }
            Err(e) => return Err(EbpfError::NoTransparencyCheck(e)),
        };
        let relay_entries = relayed_sockets.max(1);
        let mut ebpf = EbpfLoader::new()
            .override_global("SOCK_OFFSETS", &offsets, true)
            .map_max_entries(MAP_RELAY_SOCKS, relay_entries)
            .map_max_entries(MAP_RELAY_TARGETS, relay_entries)
            .load(OBJECT)
            .map_err(EbpfError::Load)?;
        match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => spawn_log_forwarder(logger),
            // The object has no log statements compiled in (or no ring buffer support).
            Err(e) => debug!("eBPF logs not forwarded: {e}"),
        }
        for name in TC_PROGRAMS {
            let prog: &mut SchedClassifier = program(&mut ebpf, name)?;
            prog.load().map_err(load_err(name))?;
        }
        let prog: &mut SkLookup = program(&mut ebpf, PROG_SK_LOOKUP)?;
        prog.load().map_err(load_err(PROG_SK_LOOKUP))?;
        Ok(Classifier {
            ebpf,
            pins,
            table,
            tc_links: Vec::new(),
            sk_lookup: None,
            cgroup_links: Vec::new(),
            local: false,
            own_addrs: HashSet::new(),
            clsact_added: Vec::new(),
            record_survived,
            attach_noted: false,
            took_over: false,
            in_force: None,
            previous: None,
        })
    }

    /// Installs `rules` (compiled as `compiled`) as a new generation and switches the
    /// classifier over to it in one map write (see [`crate::generation`]). Before the
    /// switch nothing a packet can see has changed, so an error leaves the rules in force
    /// as they were. The previous generation stays written until
    /// [`retire_previous`](Self::retire_previous), which the caller runs once packets
    /// that read the old generation number have passed.
    pub fn install_rules(&mut self, rules: &[Rule], compiled: &Compiled) -> Result<(), EbpfError> {
        // A generation that could not be cleared last time is cleared first: its entries
        // must not come back to life under the next switch.
        self.retire_previous()?;
        let next = self.in_force.as_ref().map_or(0, |g| 1 - g.generation);
        let in_force: Vec<(Rule, u32)> = self
            .in_force
            .as_ref()
            .map(|g| {
                g.rules
                    .iter()
                    .cloned()
                    .zip(g.tables.actions.iter().map(|a| a.counter_slot))
                    .collect()
            })
            .unwrap_or_default();
        let counter_slots = generation::assign_counter_slots(&in_force, rules)
            .ok_or(EbpfError::CounterSlots(in_force.len() + rules.len()))?;
        let tables = generation::place(compiled, next, &counter_slots);
        let written = self
            .zero_fresh_counters(&in_force, &counter_slots)
            .and_then(|()| self.write_tables(next, &tables))
            .and_then(|()| {
                let mut map: Array<&mut MapData, u32> = map_mut(&mut self.ebpf, MAP_GENERATION)?;
                map.set(0, next, 0).map_err(write_err(MAP_GENERATION))
            });
        if let Err(e) = written {
            // Not in force: take back what was written, or leave it for the next try.
            if self.clear_tables(&tables).is_err() {
                self.previous = Some(tables);
            }
            return Err(e);
        }
        let installed = Generation {
            generation: next,
            tables,
            rules: rules.to_vec(),
        };
        self.previous = self.in_force.replace(installed).map(|old| old.tables);
        Ok(())
    }

    /// Where this agent pins what must outlive it.
    pub(crate) fn pins(&self) -> &PinDir {
        &self.pins
    }

    /// Whether this run took over a link or filter a previous run (a crashed agent) left.
    /// If it then fails to start, detaching would leave the interfaces with no classifier
    /// where the crash had left one: the agent leaves things as the crash did instead.
    pub(crate) fn took_over(&self) -> bool {
        self.took_over
    }

    /// Clears the tables of the generation no longer in force. Idempotent; on error the
    /// leftovers are kept and cleared by the next call (or the next install).
    pub(crate) fn retire_previous(&mut self) -> Result<(), EbpfError> {
        let Some(tables) = self.previous.take() else {
            return Ok(());
        };
        if let Err(e) = self.clear_tables(&tables) {
            self.previous = Some(tables);
            return Err(e);
        }
        Ok(())
    }

    /// Writes generation `generation`'s tables: actions first, then prefixes, then the port
    /// classes that lead to them. None of it is read until the generation is switched on.
    fn write_tables(&mut self, generation: u32, tables: &Compiled) -> Result<(), EbpfError> {
        {
            let mut actions: Array<&mut MapData, RuleAction> =
                map_mut(&mut self.ebpf, MAP_ACTIONS)?;
            for (i, action) in tables.actions.iter().enumerate() {
                actions
                    .set(action_index(generation, i as u32), action, 0)
                    .map_err(write_err(MAP_ACTIONS))?;
            }
        }
        self.insert_prefixes(MAP_RULES_V4, &tables.v4)?;
        self.insert_prefixes(MAP_RULES_V6, &tables.v6)?;
        let mut classes: Array<&mut MapData, u32> = map_mut(&mut self.ebpf, MAP_PORT_CLASS)?;
        for (index, class) in &tables.port_classes {
            classes
                .set(*index, class, 0)
                .map_err(write_err(MAP_PORT_CLASS))?;
        }
        Ok(())
    }

    /// Removes a generation's port classes and prefixes (its actions are unreachable
    /// without them and are overwritten by the next use). Entries already gone are fine.
    fn clear_tables(&mut self, tables: &Compiled) -> Result<(), EbpfError> {
        {
            let mut classes: Array<&mut MapData, u32> = map_mut(&mut self.ebpf, MAP_PORT_CLASS)?;
            for (index, _) in &tables.port_classes {
                classes
                    .set(*index, 0, 0)
                    .map_err(write_err(MAP_PORT_CLASS))?;
            }
        }
        self.remove_prefixes(MAP_RULES_V4, &tables.v4)?;
        self.remove_prefixes(MAP_RULES_V6, &tables.v6)
    }

    /// Zeroes the counters of the slots `counter_slots` takes that no rule in force uses:
    /// a slot freed by a removed rule still holds its counts.
    fn zero_fresh_counters(
        &mut self,
        in_force: &[(Rule, u32)],
        counter_slots: &[u32],
    ) -> Result<(), EbpfError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| EbpfError::Cpus(e))?;
        let mut map: PerCpuArray<&mut MapData, RuleCounters> =
            map_mut(&mut self.ebpf, MAP_RULE_COUNTERS)?;
        for slot in counter_slots
            .iter()
            .filter(|s| !in_force.iter().any(|(_, used)| used == *s))
        {
            let zeroes = PerCpuValues::try_from(vec![RuleCounters::default(); cpus])
                .map_err(|e| EbpfError::Cpus(std::io::Error::other(e)))?;
            map.set(*slot, zeroes, 0)
                .map_err(write_err(MAP_RULE_COUNTERS))?;
        }
        Ok(())
    }

    /// Inserts (prefix length, key) -> action index entries into an LPM trie.
    fn insert_prefixes<K: Pod>(
        &mut self,
        name: &'static str,
        entries: &[(u32, K, u32)],
    ) -> Result<(), EbpfError> {
        let mut trie: LpmTrie<&mut MapData, K, u32> = map_mut(&mut self.ebpf, name)?;
        for (len, key, index) in entries {
            trie.insert(&Key::new(*len, *key), index, 0)
                .map_err(write_err(name))?;
        }
        Ok(())
    }

    /// Removes entries from an LPM trie; one already absent is not an error.
    fn remove_prefixes<K: Pod>(
        &mut self,
        name: &'static str,
        entries: &[(u32, K, u32)],
    ) -> Result<(), EbpfError> {
        let mut trie: LpmTrie<&mut MapData, K, u32> = map_mut(&mut self.ebpf, name)?;
        for (len, key, _) in entries {
            match trie.remove(&Key::new(*len, *key)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(EbpfError::MapWrite(name, e)),
            }
        }
        Ok(())
    }

    /// Writes the settings that apply to every packet.
    pub(crate) fn set_config(&mut self, config: GlobalConfig) -> Result<(), EbpfError> {
        let mut map: Array<&mut MapData, GlobalConfig> = map_mut(&mut self.ebpf, MAP_CONFIG)?;
        map.set(0, config, 0).map_err(write_err(MAP_CONFIG))
    }

    /// Records the address `nf_tproxy_laddr4/6` would use for an interface (an empty entry:
    /// the packet's own destination).
    /// Whether packets that match no rule get the return path's socket lookup
    /// ([`GlobalConfig::skip_return_path`]); the rest of the configuration stays.
    pub fn set_return_path_lookup(&mut self, lookup: bool) -> Result<(), EbpfError> {
        let mut map: Array<&mut MapData, GlobalConfig> = map_mut(&mut self.ebpf, MAP_CONFIG)?;
        let mut config = map.get(&0, 0).map_err(write_err(MAP_CONFIG))?;
        config.skip_return_path = u32::from(!lookup);
        map.set(0, config, 0).map_err(write_err(MAP_CONFIG))
    }

    pub(crate) fn set_iface_addrs(
        &mut self,
        ifindex: u32,
        addrs: IfaceAddrs,
    ) -> Result<(), EbpfError> {
        let mut map: HashMap<&mut MapData, u32, IfaceAddrs> =
            map_mut(&mut self.ebpf, MAP_IFACE_ADDRS)?;
        map.insert(ifindex, addrs, 0)
            .map_err(write_err(MAP_IFACE_ADDRS))
    }

    /// Puts one of the agent's listeners in the sockmap the sk_lookup program picks from.
    pub(crate) fn set_listener(
        &mut self,
        slot: u32,
        socket: &impl AsRawFd,
    ) -> Result<(), EbpfError> {
        let mut map: SockMap<&mut MapData> = map_mut(&mut self.ebpf, MAP_LISTENERS)?;
        map.set(slot, socket, 0).map_err(write_err(MAP_LISTENERS))
    }

    /// Loads the relay's verdict program, attaches it to its sockmap and hands the relay's
    /// maps over (`--relay sockmap`).
    pub(crate) fn kernel_relay(&mut self) -> Result<KernelRelay, EbpfError> {
        let socks: SockHash<MapData, u64> = take_map(&mut self.ebpf, MAP_RELAY_SOCKS)?;
        let targets: SockHash<MapData, u64> = take_map(&mut self.ebpf, MAP_RELAY_TARGETS)?;
        let prog: &mut SkSkb = program(&mut self.ebpf, PROG_RELAY_VERDICT)?;
        prog.load().map_err(load_err(PROG_RELAY_VERDICT))?;
        prog.attach(socks.fd())
            .map_err(|e| EbpfError::Program(PROG_RELAY_VERDICT, e))?;
        Ok(KernelRelay::new(socks, targets))
    }

    /// Attaches the sk_lookup program to the agent's own network namespace, and pins the
    /// link in place of the one a crashed run left, which goes only once the new one is in.
    pub(crate) fn attach_sk_lookup(&mut self) -> Result<(), EbpfError> {
        let netns = File::open("/proc/self/ns/net").map_err(EbpfError::Netns)?;
        self.pins.create()?;
        let path = self.pins.sk_lookup_link();
        let left = PinnedLink::from_pin(&path).ok();
        let prog: &mut SkLookup = program(&mut self.ebpf, PROG_SK_LOOKUP)?;
        let link = prog
            .attach(netns)
            .and_then(|id| prog.take_link(id))
            .map_err(|e| EbpfError::Program(PROG_SK_LOOKUP, e))?;
        self.sk_lookup = Some(Pinned::replace(link.into(), &path)?);
        if left.is_some() {
            self.took_over = true;
            info!("sk_lookup: the link a previous run left is replaced");
        }
        Ok(())
    }

    /// `--local`: loads the cgroup programs (only then, so that an agent without it needs
    /// nothing of the kernel they need).
    pub fn load_local(&mut self) -> Result<(), EbpfError> {
        for name in LOCAL_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            prog.load().map_err(load_err(name))?;
        }
        self.local = true;
        Ok(())
    }

    /// `--local`: makes `own` (the namespace's own addresses and directed broadcasts) what
    /// [`MAP_OWN_ADDRS`] holds, for the cgroup programs to leave connections to them alone.
    /// Must run before [`attach_local`](Self::attach_local), and again on every address
    /// change. Beyond [`MAX_OWN_ADDRS`] the rest are left out, and said so: local
    /// connections to them are intercepted, and the proxy refuses them. Without `--local`,
    /// nothing.
    pub(crate) fn set_own_addresses(&mut self, own: &[IpAddr]) -> Result<(), EbpfError> {
        if !self.local {
            return Ok(());
        }
        let mut wanted: Vec<OwnAddr> = own.iter().map(|&ip| OwnAddr::from(ip)).collect();
        wanted.sort_unstable_by_key(|a| (a.family, a.addr));
        wanted.dedup();
        if wanted.len() > MAX_OWN_ADDRS as usize {
            warn!(
                "--local: this namespace has {} addresses, the cgroup programs know the first \
                 {MAX_OWN_ADDRS}: local connections a rule covers to the others are \
                 intercepted, and the proxy refuses them (a reset) instead of letting them \
                 go direct",
                wanted.len()
            );
            wanted.truncate(MAX_OWN_ADDRS as usize);
        }
        let wanted: HashSet<OwnAddr> = wanted.into_iter().collect();
        let mut map: HashMap<&mut MapData, OwnAddr, u8> = map_mut(&mut self.ebpf, MAP_OWN_ADDRS)?;
        // Removals first: the map never needs more than its size.
        for gone in self.own_addrs.difference(&wanted) {
            map.remove(gone).map_err(write_err(MAP_OWN_ADDRS))?;
        }
        for new in wanted.difference(&self.own_addrs) {
            map.insert(new, 1, 0).map_err(write_err(MAP_OWN_ADDRS))?;
        }
        debug!("--local: {} own address(es) left alone", wanted.len());
        self.own_addrs = wanted;
        Ok(())
    }

    /// `--local`: attaches the cgroup programs to each of `cgroups` (the outermost of the
    /// `--cgroup` paths, or the root), and pins each link in place of the one a crashed
    /// run left, which goes only once the new one is in (both mark alike meanwhile).
    /// The fwmark rules and the IPv4 source rule must exist first: a connection marked
    /// before its route exists would fail (ENETUNREACH) or leave unproxied.
    pub fn attach_local(&mut self, cgroups: &[Cgroup]) -> Result<(), EbpfError> {
        self.pins.create()?;
        // A BPF link (5.7+, which aya uses where it can) is always one among many at its
        // cgroup, and the kernel refuses any flag with it (`cgroup_bpf_link_attach`):
        // "Single" passes none. On older kernels aya falls back to BPF_PROG_ATTACH, where
        // this would refuse other programs.
        let mode = if KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(5, 7, 0)) {
            CgroupAttachMode::Single
        } else {
            CgroupAttachMode::AllowMultiple
        };
        for cgroup in cgroups {
            let dir = File::open(&cgroup.dir).map_err(|source| EbpfError::CgroupAttach {
                program: PROG_LOCAL_CONNECT4,
                cgroup: cgroup.dir.display().to_string(),
                source,
            })?;
            let mut replaced = 0;
            for name in LOCAL_PROGRAMS {
                let path = self.pins.cgroup_link(name, cgroup.id);
                let took_over = path.exists();
                let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
                let link = prog
                    .attach(&dir, mode)
                    .and_then(|id| prog.take_link(id))
                    .map_err(|e| EbpfError::CgroupAttach {
                        program: name,
                        cgroup: cgroup.dir.display().to_string(),
                        source: io::Error::other(crate::error_chain(&e)),
                    })?;
                let link = FdLink::try_from(link)
                    .map_err(|e| EbpfError::Pin(path.clone(), io::Error::other(e)))?;
                self.cgroup_links.push(Pinned::replace(link, &path)?);
                if took_over {
                    self.took_over = true;
                    replaced += 1;
                }
            }
            info!(
                "local connections: {} attached to cgroup {}{}",
                LOCAL_PROGRAMS.join(", "),
                cgroup.dir.display(),
                if replaced > 0 {
                    format!(" ({replaced} link(s) a previous run left replaced)")
                } else {
                    String::new()
                }
            );
        }
        Ok(())
    }

    /// Attaches the classifier at ingress of `iface`, the variant for its link header: a
    /// TCX link or cls_bpf under a clsact qdisc over netlink, as [`TcAttach::choose`]
    /// decides. What a crashed run left there is taken over, never doubled.
    pub(crate) fn attach(
        &mut self,
        iface: &str,
        header: LinkHeader,
        how: TcAttach,
    ) -> Result<(), EbpfError> {
        // The pin directory first: bpffs is mounted by then, and how long its pins live
        // known.
        self.pins.create()?;
        let choice = how.choose(KernelVersion::current().ok(), crate::pins::pin_lifetime());
        if !std::mem::replace(&mut self.attach_noted, true)
            && let Some((level, text)) = choice.note(self.local)
        {
            log::log!(level, "{text}");
        }
        let tcx = choice.tcx;
        if !tcx {
            self.add_clsact(iface)?;
        }
        let name = classifier_for(header);
        let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        let (link, how) = if tcx {
            let (link, how) = attach_tcx(prog, iface, &self.pins.tcx_link(iface))?;
            let iface = iface.to_owned();
            (TcLink::Tcx { iface, link }, how)
        } else {
            let (link, how) = attach_filter(prog, iface, self.table)?;
            let iface = iface.to_owned();
            let link = ManuallyDrop::new(link);
            (TcLink::Filter { iface, link }, how)
        };
        if let Attached::TookOver(_) = how {
            self.took_over = true;
        }
        info!(
            "classifier {name} attached to {iface} ingress ({})",
            how.describe()
        );
        // An interface attached again (deleted and made anew) replaces its old entry, whose
        // link or filter went with the old interface.
        self.tc_links.retain(|l| l.iface() != iface);
        self.tc_links.push(link);
        Ok(())
    }

    /// Adds the clsact qdisc the netlink attach needs, noting (in the pin directory too)
    /// whether the agent added it.
    ///
    /// One already there is ours to remove on a stop for good if a crashed run added it:
    /// its mark says so where the pin directory outlived that run. Where it did not (bpffs
    /// died with that run, or was never there), nothing says who added the qdisc, and one
    /// that holds nothing but the filter of this table a previous run left is taken as
    /// ours: a qdisc someone else added empty would go too, once nothing else is under it
    /// (the teardown never removes one with other filters). A qdisc taken over is marked
    /// again, for the next crash.
    fn add_clsact(&mut self, iface: &str) -> Result<(), EbpfError> {
        let mark = self.pins.clsact_mark(iface);
        let ours = match tc::qdisc_add_clsact(iface) {
            Ok(()) => true,
            // Already there: ours if a crashed run added it, else someone else's, used as
            // it is.
            Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {
                if mark.is_dir() {
                    true
                } else if !self.record_survived && self.holds_only_our_filter(iface) {
                    info!(
                        "{iface}: the clsact qdisc holds only the filter a previous run left, \
                         whose record of adding it went with its bpffs: taken as ours, \
                         removed on a stop for good"
                    );
                    true
                } else {
                    false
                }
            }
            Err(source) => {
                return Err(EbpfError::Clsact {
                    iface: iface.to_owned(),
                    source,
                });
            }
        };
        if ours {
            if let Err(e) = self.pins.set_mark(&mark) {
                warn!("{}", crate::error_chain(&e));
            }
            if !self.clsact_added.iter().any(|i| i == iface) {
                self.clsact_added.push(iface.to_owned());
            }
        }
        Ok(())
    }

    /// Whether the filters under `iface`'s clsact qdisc are this table's and nothing else.
    fn holds_only_our_filter(&self, iface: &str) -> bool {
        let table = self.table;
        crate::ifaddrs::ifindex(iface).is_some_and(|ifindex| {
            tc_filter::clsact_holds_only(ifindex, |f| is_ours(f, table)).unwrap_or(false)
        })
    }

    /// After attaching: removes the classifiers of this agent's table that a crashed run
    /// left and this run did not take over (interfaces no longer listed, the other attach
    /// mode). Errors are logged: what stays is what `proxy cleanup` removes.
    pub(crate) fn remove_leftovers(&mut self) {
        let ours: Vec<&Path> = self
            .tc_links
            .iter()
            .filter_map(|l| match l {
                TcLink::Tcx { link, .. } => Some(link.path.as_path()),
                TcLink::Filter { .. } => None,
            })
            .chain(self.cgroup_links.iter().map(|l| l.path.as_path()))
            .collect();
        if let Ok(entries) = std::fs::read_dir(self.pins.path()) {
            for entry in entries.filter_map(Result::ok) {
                let path = entry.path();
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let what = if let Some(iface) = name.strip_prefix("tcx-") {
                    format!("the TCX link at {} ingress", crate::pins::iface_of(iface))
                } else if name.starts_with("new-") {
                    format!("the half-pinned link {name}")
                } else if name.starts_with("cgroup-") {
                    format!("the cgroup link {name}")
                } else {
                    continue;
                };
                if ours.contains(&path.as_path()) {
                    continue;
                }
                match std::fs::remove_file(&path) {
                    Ok(()) => info!("removed {what} a previous run left"),
                    Err(e) => warn!("{}: {e}", path.display()),
                }
            }
        }
        let filters: Vec<(String, u16)> = self
            .tc_links
            .iter()
            .filter_map(|l| match l {
                TcLink::Filter { iface, link } => Some((iface.clone(), link.priority().ok()?)),
                TcLink::Tcx { .. } => None,
            })
            .collect();
        for (iface, filter) in filters_of_table(self.table) {
            if filters.contains(&(iface.clone(), filter.priority)) {
                continue;
            }
            match detach_filter(&iface, &filter) {
                Ok(()) => {
                    info!("removed the cls_bpf filter a previous run left at {iface} ingress")
                }
                Err(e) => warn!("removing the cls_bpf filter at {iface} ingress: {e}"),
            }
        }
    }

    /// The interfaces where the agent added the clsact qdisc itself (or took over the one a
    /// crashed run added), for the agent to remove it again after
    /// [`detach_all`](Self::detach_all), and clear its mark then.
    pub(crate) fn take_clsact_added(&mut self) -> Vec<String> {
        std::mem::take(&mut self.clsact_added)
    }

    /// Detaches from every interface and the namespace (the pins of the links go; the
    /// directory stays for [`remove_pin_dir`](Self::remove_pin_dir)). Errors are logged,
    /// not returned: teardown goes on.
    pub(crate) fn detach_all(&mut self) {
        // The cgroup programs first: no connection is marked once the classifier that
        // would take it on `lo` is gone.
        let cgroup_links = self.cgroup_links.len();
        for link in self.cgroup_links.drain(..) {
            if let Err(e) = link.unpin() {
                warn!("detaching a cgroup program: {e}");
            }
        }
        if cgroup_links > 0 {
            info!("local connections: {cgroup_links} cgroup link(s) detached");
        }
        for link in self.tc_links.drain(..) {
            let (iface, detached) = match link {
                TcLink::Tcx { iface, link } => (iface, link.unpin()),
                TcLink::Filter { iface, link } => (
                    iface,
                    ManuallyDrop::into_inner(link)
                        .detach()
                        .map_err(io::Error::other),
                ),
            };
            match detached {
                Ok(()) => info!("classifier detached from {iface}"),
                // The interface may be gone already, and its links with it.
                Err(e) => warn!("detaching from {iface}: {e}"),
            }
        }
        if let Some(link) = self.sk_lookup.take()
            && let Err(e) = link.unpin()
        {
            warn!("detaching the sk_lookup program: {e}");
        }
    }

    /// Removes the pin directory, the last step of a teardown: after the links (see
    /// [`detach_all`](Self::detach_all)) and the sysctl records
    /// ([`crate::src_valid_mark`]) that live in it are gone.
    pub fn remove_pin_dir(&self) {
        if let Err(e) = self.pins.remove() {
            warn!(
                "{} stays (proxy cleanup removes what is in it): {e}",
                self.pins.path().display()
            );
        }
    }

    /// Runs a classifier program once on `frame` with `BPF_PROG_TEST_RUN`, without
    /// attaching it anywhere, and returns its verdict (`TC_ACT_*`). The socket lookups run
    /// in the caller's network namespace; counters count as for real packets. For the
    /// classifier tests, and for diagnosing what a given frame would meet.
    pub fn run_on_frame(&self, name: &'static str, frame: &[u8]) -> Result<i32, EbpfError> {
        let prog: &SchedClassifier = program_ref(&self.ebpf, name)?;
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                ..TestRunOptions::new()
            })
            .map_err(|e| EbpfError::Program(name, e))?;
        Ok(result.return_value as i32)
    }

    /// Sums the global counters over CPUs.
    /// One harmless `bpf()` call on a map the agent holds (a counter lookup), for
    /// [`crate::privileges::bpf_calls_need_cap_bpf`].
    pub fn probe_bpf_call(&self) -> std::io::Result<()> {
        let map: PerCpuArray<&MapData, u64> =
            map_ref(&self.ebpf, MAP_COUNTERS).map_err(std::io::Error::other)?;
        match map.get(&0, 0) {
            Ok(_) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e)) => Err(e.io_error),
            Err(e) => Err(std::io::Error::other(e)),
        }
    }

    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, EbpfError> {
        let map: PerCpuArray<&MapData, u64> = map_ref(&self.ebpf, MAP_COUNTERS)?;
        Counter::ALL
            .iter()
            .map(|&c| {
                let values = map.get(&(c as u32), 0).map_err(map_err(MAP_COUNTERS))?;
                Ok((c, values.iter().sum()))
            })
            .collect()
    }

    /// Sums the counters of the rule at `index` in the rules in force over CPUs (zero for
    /// an index past them).
    pub(crate) fn rule_counters(&self, index: u32) -> Result<RuleCounters, EbpfError> {
        let Some(slot) = self
            .in_force
            .as_ref()
            .and_then(|g| g.tables.actions.get(index as usize))
            .map(|action| action.counter_slot)
        else {
            return Ok(RuleCounters::default());
        };
        let map: PerCpuArray<&MapData, RuleCounters> = map_ref(&self.ebpf, MAP_RULE_COUNTERS)?;
        let values = map.get(&slot, 0).map_err(map_err(MAP_RULE_COUNTERS))?;
        Ok(values.iter().fold(RuleCounters::default(), |mut sum, c| {
            sum.packets += c.packets;
            sum.bytes += c.bytes;
            sum.assigned += c.assigned;
            sum.dropped += c.dropped;
            sum
        }))
    }
}

/// The TCX link at `iface` ingress, pinned at `path`: the pinned one a crashed run left,
/// switched to `prog` in one step (`bpf_link_update`), or else a new one, pinned in place of
/// the old. Returns the link and how it came.
fn attach_tcx(
    prog: &mut SchedClassifier,
    iface: &str,
    path: &Path,
) -> Result<(Pinned, Attached), EbpfError> {
    let attach_err = |source| EbpfError::Attach {
        iface: iface.to_owned(),
        source,
    };
    if let Ok(left) = PinnedLink::from_pin(path) {
        let update = || -> Result<FdLink, String> {
            let link =
                SchedClassifierLink::try_from(FdLink::from(left)).map_err(|e| e.to_string())?;
            let id = prog
                .attach_to_link(link)
                .map_err(|e| crate::error_chain(&e))?;
            let link = prog.take_link(id).map_err(|e| e.to_string())?;
            FdLink::try_from(link).map_err(|e| e.to_string())
        };
        match update() {
            // The pin holds the link: the descriptor can go.
            Ok(_) => {
                let link = Pinned {
                    path: path.to_owned(),
                };
                return Ok((
                    link,
                    Attached::TookOver("tcx link a previous run left, program replaced"),
                ));
            }
            // A link whose interface went away (ENOLINK), or not a TCX link: a new one
            // replaces it.
            Err(e) => {
                warn!("{iface}: the pinned link cannot be taken over ({e}): attaching a new one")
            }
        }
    }
    let link = prog
        .attach_with_options(
            iface,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .and_then(|id| prog.take_link(id))
        .map_err(attach_err)?;
    let link =
        FdLink::try_from(link).map_err(|e| EbpfError::Pin(path.to_owned(), io::Error::other(e)))?;
    Ok((Pinned::replace(link, path)?, Attached::New("tcx link")))
}

/// The cls_bpf filter of `table` at `iface` ingress, its handle the table: the one a
/// crashed run left, replaced in place (same priority and handle, so the kernel swaps the
/// program in one step and no second filter appears), or else a new one.
fn attach_filter(
    prog: &mut SchedClassifier,
    iface: &str,
    table: u32,
) -> Result<(SchedClassifierLink, Attached), EbpfError> {
    let attach_err = |source| EbpfError::Attach {
        iface: iface.to_owned(),
        source,
    };
    let ifindex = crate::ifaddrs::ifindex(iface).unwrap_or(0);
    let left = tc_filter::ingress_bpf_filters(ifindex)
        .map_err(|source| EbpfError::Filters {
            iface: iface.to_owned(),
            source,
        })?
        .into_iter()
        .find(|f| is_ours(f, table));
    let handle = TcHandle::from(table);
    let (id, how) = match left {
        Some(filter) => {
            let link = SchedClassifierLink::attached(
                iface,
                TcAttachType::Ingress,
                filter.priority,
                handle,
                None,
            )
            .map_err(|e| attach_err(tc::TcError::IoError(e).into()))?;
            let id = prog.attach_to_link(link).map_err(attach_err)?;
            (
                id,
                Attached::TookOver(
                    "clsact + cls_bpf over netlink, the filter a previous run left replaced",
                ),
            )
        }
        None => {
            let options = NlOptions {
                handle,
                ..NlOptions::default()
            };
            let id = prog
                .attach_with_options(
                    iface,
                    TcAttachType::Ingress,
                    TcAttachOptions::Netlink(options),
                )
                .map_err(attach_err)?;
            (id, Attached::New("clsact + cls_bpf over netlink"))
        }
    };
    Ok((prog.take_link(id).map_err(attach_err)?, how))
}

/// Whether a filter is the one an agent with `table` attaches.
pub(crate) fn is_ours(filter: &tc_filter::BpfFilter, table: u32) -> bool {
    filter.handle == table && TC_PROGRAMS.contains(&filter.name.as_str())
}

/// The filters of any agent (a program of ours, whatever the handle) at the ingress of
/// every interface of the namespace.
pub(crate) fn our_filters() -> Vec<(String, tc_filter::BpfFilter)> {
    let Ok(interfaces) = nix::net::if_::if_nameindex() else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for interface in &interfaces {
        let name = interface.name().to_string_lossy().into_owned();
        for filter in tc_filter::ingress_bpf_filters(interface.index()).unwrap_or_default() {
            if is_ours(&filter, filter.handle) {
                found.push((name.clone(), filter));
            }
        }
    }
    found
}

/// The filters of `table`'s agent at the ingress of every interface of the namespace.
pub(crate) fn filters_of_table(table: u32) -> Vec<(String, tc_filter::BpfFilter)> {
    our_filters()
        .into_iter()
        .filter(|(_, f)| f.handle == table)
        .collect()
}

/// Deletes a cls_bpf filter at `iface` ingress.
pub(crate) fn detach_filter(iface: &str, filter: &tc_filter::BpfFilter) -> io::Result<()> {
    SchedClassifierLink::attached(
        iface,
        TcAttachType::Ingress,
        filter.priority,
        TcHandle::from(filter.handle),
        None,
    )?
    .detach()
    .map_err(io::Error::other)
}

/// The verifier log's last lines kept in a refusal: where it says what it refused, and the
/// instructions just before.
const VERIFIER_TAIL: usize = 6;

/// A verifier refusal becomes one line and a few of the log's last lines; the whole log
/// goes to the debug log.
fn load_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> EbpfError {
    move |e| match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            debug!("verifier log for {name}:\n{verifier_log}");
            let log = verifier_log.to_string();
            let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
            EbpfError::Refused {
                program: name,
                source: io_error,
                verifier_tail: lines[lines.len().saturating_sub(VERIFIER_TAIL)..]
                    .iter()
                    .map(|l| l.trim().to_owned())
                    .collect(),
            }
        }
        other => EbpfError::Program(name, other),
    }
}

/// Map `name` of the object, as the type its declaration gives it.
fn map_mut<'a, M>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<M, EbpfError>
where
    M: TryFrom<&'a mut aya::maps::Map, Error = aya::maps::MapError>,
{
    M::try_from(ebpf.map_mut(name).ok_or_else(|| missing(name))?).map_err(map_err(name))
}

/// [`map_mut`], to read.
fn map_ref<'a, M>(ebpf: &'a Ebpf, name: &'static str) -> Result<M, EbpfError>
where
    M: TryFrom<&'a aya::maps::Map, Error = aya::maps::MapError>,
{
    M::try_from(ebpf.map(name).ok_or_else(|| missing(name))?).map_err(map_err(name))
}

/// [`map_mut`], taking the map out of the object (to hand it over).
fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, EbpfError>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    M::try_from(ebpf.take_map(name).ok_or_else(|| missing(name))?).map_err(map_err(name))
}

fn missing(name: &'static str) -> EbpfError {
    EbpfError::Map(
        name,
        aya::maps::MapError::InvalidName {
            name: name.to_owned(),
        },
    )
}

/// [`program`], to read.
fn program_ref<'a, P>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a P, EbpfError>
where
    &'a P: TryFrom<&'a aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program(name).ok_or(EbpfError::Program(
        name,
        aya::programs::ProgramError::NotLoaded,
    ))?;
    prog.try_into().map_err(|e| EbpfError::Program(name, e))
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, EbpfError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(EbpfError::Program(
        name,
        aya::programs::ProgramError::NotLoaded,
    ))?;
    prog.try_into().map_err(|e| EbpfError::Program(name, e))
}

/// Polls the aya-log ring buffer from the tokio runtime. Keeping the logger alive matters:
/// dropping it closes the map the programs write to.
fn spawn_log_forwarder(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    // SAFETY: the logger owns the ring buffer's fd and keeps it open for as long as the
    // AsyncFd (which owns the logger) lives.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!("eBPF logs not forwarded: {e}");
            return;
        }
    };
    tokio::spawn(async move {
        let mut fd = fd;
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_picks_cls_bpf_where_the_pins_die_with_the_agent_and_tcx_given_is_kept_loudly() {
        let new = Some(KernelVersion::new(6, 18, 0));
        let old = Some(KernelVersion::new(6, 1, 0));
        let tcx = |how: TcAttach, version, pins| how.choose(version, pins).tcx;
        assert!(tcx(TcAttach::Auto, new, PinLifetime::Outlives));
        assert!(!tcx(TcAttach::Auto, old, PinLifetime::Outlives));
        for pins in [PinLifetime::DiesWithAgent, PinLifetime::Unknown] {
            assert!(!tcx(TcAttach::Auto, new, pins));
            assert!(tcx(TcAttach::Tcx, new, pins));
            assert!(!tcx(TcAttach::Netlink, new, pins));
        }

        // Nothing to say where the pins outlive the agent.
        let choice = TcAttach::Auto.choose(new, PinLifetime::Outlives);
        assert_eq!(choice.note(true), None);
        let choice = TcAttach::Auto.choose(new, PinLifetime::DiesWithAgent);
        let (level, text) = choice.note(false).expect("a note");
        assert_eq!(level, log::Level::Info);
        assert!(
            text.starts_with(
                "bpffs here dies with the agent (private mount namespace): attaching with \
                 cls_bpf, which outlives it; "
            ),
            "{text}"
        );
        assert!(text.contains("sk_lookup"), "{text}");
        // --local's cgroup links go with bpffs: a hole, said as a warning.
        let (level, text) = choice.note(true).expect("a note");
        assert_eq!(level, log::Level::Warn);
        assert!(text.contains("--local"), "{text}");
        let (level, text) = TcAttach::Tcx
            .choose(new, PinLifetime::DiesWithAgent)
            .note(false)
            .expect("a note");
        assert_eq!(level, log::Level::Warn);
        assert!(text.contains("no classifier is left"), "{text}");
    }
}
