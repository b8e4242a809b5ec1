//! Where the agent pins what must outlive it (T12): the TCX links and the sk_lookup link,
//! in bpffs, under a directory unique to the network namespace and the routing table.
//!
//! ```text
//! /sys/fs/bpf/proxy/<dev>_<ino>/table-<N>/
//!     tcx-<iface>       the TCX link at <iface> ingress
//!     sk_lookup         the namespace's sk_lookup link
//!     cgroup-<program>-<cgroup id>
//!                       `--local`: a cgroup program's link at the cgroup with that id
//!     clsact-<iface>/   an empty directory: the agent added <iface>'s clsact qdisc itself
//!     sysctl-<key>-<previous>-<value>-<iface>/
//!                       an empty directory: the agent set net.ipv4.conf.<iface>.<key>
//!                       (src_valid_mark), to be put back after a crash
//!     new-<name>        a link being pinned, renamed over <name> at once
//! ```
//!
//! bpffs refuses names with a dot (`bpf_lookup`: reserved), which interface names may have
//! (`eth0.100`): a dot is written `:`, which interface names never have (`dev_valid_name`).
//!
//! `<dev>_<ino>` identify the network namespace (`stat /proc/thread-self/ns/net`), as
//! `ip netns identify` would; `<N>` keeps two agents of one namespace apart, as it does
//! for `proxy stats`. A pinned link stays attached when the agent dies uncleanly, and the
//! program keeps its maps: the classifier goes on with the rules, finds no socket once the
//! agent's listeners are closed, and each rule's no-socket behaviour (drop, or fail-open)
//! applies, as with the iptables rules of a dead proxy. A clean stop unpins, and the links
//! go. The cls_bpf filters of `--tc-attach netlink` need no pin: the qdisc holds them.
//!
//! All this holds only where bpffs outlives the agent. One the agent mounts itself in a
//! mount namespace of its own (`ip netns exec`) goes with it, pins and marks included
//! ([`PinLifetime`]): there `--tc-attach auto` attaches with cls_bpf, and the next agent
//! tells a clsact qdisc a crashed one added by what is under it (see
//! `Classifier::add_clsact`).

use std::{
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use log::info;

/// Where bpffs is mounted, as systemd and most distributions do.
pub const BPFFS: &str = "/sys/fs/bpf";

/// The agents' directory in bpffs.
pub const ROOT: &str = "/sys/fs/bpf/proxy";

/// The pin directory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The network namespace could not be identified.
    #[error("identifying the network namespace (stat /proc/thread-self/ns/net)")]
    Netns(#[source] io::Error),
    /// bpffs is not mounted and mounting it failed.
    #[error("mounting bpffs at {BPFFS} (mount -t bpf bpf {BPFFS})")]
    Mount(#[source] nix::Error),
    /// A directory could not be created.
    #[error("creating {0}")]
    Dir(PathBuf, #[source] io::Error),
}

/// The pin directory of one agent: this network namespace, one routing table.
#[derive(Debug, Clone)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    /// The directory of `table`'s agent in the calling thread's network namespace, whether
    /// it exists or not.
    pub fn of(table: u32) -> Result<Self, PinError> {
        Ok(PinDir {
            path: netns_dir()?.join(format!("table-{table}")),
        })
    }

    /// Creates the directory, with bpffs mounted first if it is not.
    pub fn create(&self) -> Result<(), PinError> {
        mount_bpffs()?;
        std::fs::create_dir_all(&self.path).map_err(|e| PinError::Dir(self.path.clone(), e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The TCX link at `iface` ingress.
    pub fn tcx_link(&self, iface: &str) -> PathBuf {
        self.path.join(format!("tcx-{}", iface.replace('.', ":")))
    }

    /// The sk_lookup link.
    pub fn sk_lookup_link(&self) -> PathBuf {
        self.path.join("sk_lookup")
    }

    /// `--local`: the link of cgroup program `program` at the cgroup whose id is `cgroup`.
    pub fn cgroup_link(&self, program: &str, cgroup: u64) -> PathBuf {
        self.path.join(format!("cgroup-{program}-{cgroup}"))
    }

    /// The mark that the agent added `iface`'s clsact qdisc, so that the agent after a
    /// crash knows it may remove it.
    pub fn clsact_mark(&self, iface: &str) -> PathBuf {
        self.path
            .join(format!("clsact-{}", iface.replace('.', ":")))
    }

    /// The mark that the agent set sysctl `key` of `iface` to `value`, from `previous`:
    /// an agent that died uncleanly leaves it, so that the next agent's clean exit or
    /// `proxy cleanup` can put the value back (bpffs holds no files, only names).
    pub fn sysctl_mark(&self, mark: &SysctlMark) -> PathBuf {
        self.path.join(format!(
            "sysctl-{}-{}-{}-{}",
            mark.key,
            mark.previous,
            mark.value,
            mark.iface.replace('.', ":")
        ))
    }

    /// The sysctl marks in the directory (none if it does not exist).
    pub fn sysctl_marks(&self) -> Vec<SysctlMark> {
        let Ok(entries) = std::fs::read_dir(&self.path) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter_map(|e| SysctlMark::parse(e.file_name().to_str()?))
            .collect()
    }

    /// Sets a mark (an empty directory: [`clsact_mark`](Self::clsact_mark),
    /// [`sysctl_mark`](Self::sysctl_mark)), creating the pin directory first if needed.
    pub fn set_mark(&self, mark: &Path) -> Result<(), PinError> {
        self.create()?;
        match std::fs::create_dir(mark) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(PinError::Dir(mark.to_owned(), e)),
        }
    }

    /// Clears a mark; one already gone is fine.
    pub fn clear_mark(mark: &Path) {
        let _ = std::fs::remove_dir(mark);
    }

    /// Removes the (empty) directory, then its namespace's and the agents' directories if
    /// nothing else is left in them.
    pub fn remove(&self) -> io::Result<()> {
        match std::fs::remove_dir(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        for parent in self.path.ancestors().skip(1) {
            if parent == Path::new(BPFFS) || std::fs::remove_dir(parent).is_err() {
                break;
            }
        }
        Ok(())
    }
}

/// A sysctl the agent changed, as its pin directory records it: `sysctl-<key>-<previous>-
/// <value>-<iface>` (the interface last, since its name may hold a `-`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SysctlMark {
    pub iface: String,
    /// `accept_local` or `rp_filter`, under `net.ipv4.conf.<iface>`.
    pub key: String,
    pub previous: u32,
    pub value: u32,
}

impl SysctlMark {
    fn parse(name: &str) -> Option<SysctlMark> {
        let mut parts = name.strip_prefix("sysctl-")?.splitn(4, '-');
        Some(SysctlMark {
            key: parts.next()?.to_owned(),
            previous: parts.next()?.parse().ok()?,
            value: parts.next()?.parse().ok()?,
            iface: iface_of(parts.next()?),
        })
    }
}

/// The interface a `tcx-` or `clsact-` entry is about, from the rest of its name.
pub fn iface_of(rest: &str) -> String {
    rest.replace(':', ".")
}

/// Where a link is pinned before it is renamed over `path` (see [`PinDir`]).
pub fn fresh(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!("new-{name}"))
}

/// `/sys/fs/bpf/proxy/<dev>_<ino>` of the calling thread's network namespace.
pub fn netns_dir() -> Result<PathBuf, PinError> {
    let ns = std::fs::metadata("/proc/thread-self/ns/net").map_err(PinError::Netns)?;
    Ok(Path::new(ROOT).join(format!("{}_{}", ns.dev(), ns.ino())))
}

/// The tables with a pin directory in this network namespace.
pub fn tables() -> Result<Vec<u32>, PinError> {
    let dir = netns_dir()?;
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(Vec::new());
    };
    let mut tables: Vec<u32> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("table-")?.parse().ok())
        .collect();
    tables.sort_unstable();
    Ok(tables)
}

fn is_bpffs(path: &str) -> bool {
    use nix::sys::statfs::{BPF_FS_MAGIC, statfs};
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// Whether what the agent pins in bpffs outlives it: the TCX links (for which
/// `--tc-attach auto` then picks cls_bpf instead, see [`crate::ebpf::TcAttach::choose`]), the
/// sk_lookup link and `--local`'s cgroup links.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinLifetime {
    /// bpffs was mounted before the agent, or the agent mounts it in init's mount namespace:
    /// the pins stay after a crash.
    Outlives,
    /// The agent mounts bpffs itself, in a mount namespace other than init's (`ip netns
    /// exec`, a service's private mounts) or as the first process of a container: the
    /// mount, and every pin in it, goes with the last process of that namespace, the agent.
    DiesWithAgent,
    /// The agent mounts bpffs itself, and whether in init's mount namespace cannot be told
    /// (`/proc/1/ns/mnt` unreadable: a sandbox, `hidepid`).
    Unknown,
}

impl PinLifetime {
    /// The reason, for a log line, when the pins may not outlive the agent.
    pub fn why_not(self) -> Option<&'static str> {
        match self {
            PinLifetime::Outlives => None,
            PinLifetime::DiesWithAgent => {
                Some("bpffs here dies with the agent (private mount namespace)")
            }
            PinLifetime::Unknown => Some(
                "bpffs here may die with the agent (mounted by it, and whether in init's mount \
                 namespace cannot be told: /proc/1/ns/mnt unreadable)",
            ),
        }
    }
}

/// What [`mount_bpffs`] found when it mounted bpffs itself.
static MOUNTED_HERE: std::sync::OnceLock<PinLifetime> = std::sync::OnceLock::new();

/// How long the pins of this process live: as measured when it mounted bpffs itself, or as
/// they would if it mounted bpffs now (`proxy doctor`, and the agent before its first pin).
pub fn pin_lifetime() -> PinLifetime {
    if let Some(lifetime) = MOUNTED_HERE.get() {
        return *lifetime;
    }
    if is_bpffs(BPFFS) {
        return PinLifetime::Outlives;
    }
    own_mount_lifetime()
}

/// The inode of the initial mount namespace on kernels that give it a fixed one
/// (`PROC_MNT_INIT_INO`, include/linux/proc_ns.h); no other namespace ever has it.
const MNT_NS_INIT_INO: u64 = 0xEFFF_FFF8;

/// How long a mount made now by this process lives: as long as init's mount namespace when
/// it is that one, else with the last process of its own.
fn own_mount_lifetime() -> PinLifetime {
    let ns = |pid: &str| std::fs::metadata(format!("/proc/{pid}/ns/mnt")).map(|m| m.ino());
    match (ns("self"), ns("1")) {
        (Ok(own), _) if own == MNT_NS_INIT_INO => PinLifetime::Outlives,
        // The agent is init of its own pid namespace (a container's first process): its
        // end is that of every process in it, its mount namespace's too.
        (Ok(_), _) if std::process::id() == 1 => PinLifetime::DiesWithAgent,
        (Ok(own), Ok(init)) if own == init => PinLifetime::Outlives,
        (Ok(_), Ok(_)) => PinLifetime::DiesWithAgent,
        _ => PinLifetime::Unknown,
    }
}

/// Mounts bpffs at [`BPFFS`] unless it is there: some hosts, the machines this was built on
/// among them, do not mount it by default. A mount made in a mount namespace of the agent's
/// own goes when its last process does, and the pins with it: [`pin_lifetime`] says so from
/// then on, and the attach says what it means ([`crate::ebpf::AttachChoice::note`]).
fn mount_bpffs() -> Result<(), PinError> {
    if is_bpffs(BPFFS) {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(PinError::Mount)?;
    let lifetime = own_mount_lifetime();
    let _ = MOUNTED_HERE.set(lifetime);
    match lifetime.why_not() {
        None => info!("bpffs mounted at {BPFFS}"),
        Some(why) => info!("bpffs mounted at {BPFFS}: {why}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sysctl_mark_reads_back_whatever_the_interface_name() {
        let dir = PinDir {
            path: PathBuf::from("/x"),
        };
        for iface in ["r0", "wg-home", "eth0.100"] {
            let mark = SysctlMark {
                iface: iface.to_owned(),
                key: "accept_local".to_owned(),
                previous: 0,
                value: 1,
            };
            let path = dir.sysctl_mark(&mark);
            let name = path.file_name().and_then(|n| n.to_str()).expect("name");
            assert!(!name.contains('.'), "{name}");
            assert_eq!(SysctlMark::parse(name), Some(mark));
        }
        assert_eq!(SysctlMark::parse("sysctl-rp_filter-x-2-r0"), None);
        assert_eq!(SysctlMark::parse("tcx-r0"), None);
    }
}
