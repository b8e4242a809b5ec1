//! `proxy cleanup`: removes what an agent that died uncleanly left in this network namespace,
//! for an operator who will not restart it. Until then the classifier it left goes on with
//! its rules (T12: drop, or pass with fail-open) and the policy routing stays, as the
//! iptables rules of a dead proxy do.
//!
//! What belongs to the agent of table N: the pins under its directory ([`crate::pins`]) and
//! the links they hold, the cls_bpf filters whose handle is N and whose program is ours,
//! the clsact qdiscs it noted it added, the fwmark rules and table-N routes tagged with
//! [`crate::routing::RTPROT_PROXY`]. An agent still running (its `proxy stats` socket
//! answers) is left alone.

use std::{
    io,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
};

use crate::{
    config::CleanupArgs,
    ebpf,
    pins::{self, PinDir, PinError},
    routing::{self, PolicyRouting, RoutingError},
    src_valid_mark::SrcValidMark,
    stats,
    tc_filter::{self, ClsactRemoval},
};

/// `proxy cleanup` could not remove something.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// Removing links, filters and routes needs root.
    #[error(
        "must run as root: removing eBPF links, tc filters and routing needs CAP_BPF and CAP_NET_ADMIN"
    )]
    NotRoot,
    /// The netlink socket could not be opened.
    #[error("opening a netlink socket")]
    Netlink(#[source] io::Error),
    /// The pin directory could not be found.
    #[error(transparent)]
    Pins(#[from] PinError),
    /// The policy routing could not be removed.
    #[error("policy routing")]
    Routing(#[from] RoutingError),
    /// Something else could not be removed.
    #[error("removing {what}")]
    Remove {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn remove_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> CleanupError {
    let what = what.into();
    move |source| CleanupError::Remove { what, source }
}

/// Removes what dead agents left, printing one line per thing removed.
pub async fn run(args: &CleanupArgs) -> Result<(), CleanupError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(CleanupError::NotRoot);
    }
    let (connection, handle, _) = rtnetlink::new_connection().map_err(CleanupError::Netlink)?;
    tokio::spawn(connection);
    let tables = match args.table {
        Some(table) => vec![table],
        None => tables(&handle).await?,
    };
    let mut removed = 0;
    for table in tables {
        if agent_running(table) {
            println!(
                "table {table}: an agent is running (proxy stats --table {table}); left alone"
            );
            continue;
        }
        for what in clean_table(&handle, table).await? {
            println!("table {table}: removed {what}");
            removed += 1;
        }
    }
    if removed == 0 {
        println!("nothing to clean up in this network namespace");
    }
    Ok(())
}

/// Whether the agent of `table` answers on its stats socket.
fn agent_running(table: u32) -> bool {
    stats::socket_addr(table).is_ok_and(|addr| UnixStream::connect_addr(&addr).is_ok())
}

/// Every table something of ours is left for: pin directories, fwmark rules, filters.
async fn tables(handle: &rtnetlink::Handle) -> Result<Vec<u32>, CleanupError> {
    let mut tables = pins::tables()?;
    tables.extend(routing::tables_of_ours(handle).await?);
    tables.extend(ebpf::our_filters().iter().map(|(_, f)| f.handle));
    tables.sort_unstable();
    tables.dedup();
    Ok(tables)
}

/// Removes what the agent of `table` left: classifiers first (the traffic then passes
/// untouched), then the routing.
async fn clean_table(handle: &rtnetlink::Handle, table: u32) -> Result<Vec<String>, CleanupError> {
    let mut removed = Vec::new();
    let pins = PinDir::of(table)?;
    let mut entries: Vec<(String, PathBuf)> = std::fs::read_dir(pins.path())
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                .collect()
        })
        .unwrap_or_default();
    entries.sort();
    let mut clsact = Vec::new();
    for (name, path) in &entries {
        if name.starts_with("sysctl-") {
            // Put back below, with the routing.
            continue;
        }
        if let Some(iface) = name.strip_prefix("clsact-") {
            clsact.push((pins::iface_of(iface), path.clone()));
            continue;
        }
        let what = match name.strip_prefix("tcx-") {
            Some(iface) => format!(
                "the TCX link at {} ingress (pinned at {})",
                pins::iface_of(iface),
                path.display()
            ),
            None => format!("the {name} link (pinned at {})", path.display()),
        };
        // The link goes with its last reference, the pin.
        if unpin(path).map_err(remove_err(&what))? {
            removed.push(what);
        }
    }
    for (iface, filter) in ebpf::filters_of_table(table) {
        let what = format!(
            "the cls_bpf filter {} at {iface} ingress (pref {} handle {:#x})",
            filter.name, filter.priority, filter.handle
        );
        ebpf::detach_filter(&iface, &filter).map_err(remove_err(&what))?;
        removed.push(what);
    }
    for (iface, mark) in clsact {
        let what = format!("the clsact qdisc of {iface}");
        if let Some(index) = crate::ifaddrs::ifindex(&iface) {
            match tc_filter::remove_clsact(handle, index).await {
                Ok(ClsactRemoval::Removed) => removed.push(what),
                Ok(ClsactRemoval::KeptInUse(n)) => println!(
                    "table {table}: kept {what}: {n} other filter(s) under it (`tc qdisc del \
                     dev {iface} clsact` once they are gone)"
                ),
                // Gone already.
                Err(rtnetlink::Error::NetlinkError(e))
                    if matches!(-e.raw_code(), libc::ENOENT | libc::EINVAL) => {}
                Err(e) => return Err(remove_err(what)(io::Error::other(e))),
            }
        }
        PinDir::clear_mark(&mark);
    }
    removed.extend(
        PolicyRouting::new(handle.clone(), table)
            .remove_leftovers()
            .await?,
    );
    removed.extend(
        SrcValidMark::restore_recorded(pins.clone())
            .into_iter()
            .map(|restored| format!("the sysctl change (put back {restored})")),
    );
    pins.remove()
        .map_err(remove_err(pins.path().display().to_string()))?;
    Ok(removed)
}

/// Removes a pin; false if there was none.
fn unpin(path: &Path) -> io::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}
